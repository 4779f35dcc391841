"""Re-check a converted checkpoint: every file against the manifest (present, size, hash, a
parseable safetensors header), the manifest against the folder (every file present and every
tensor stored is listed: an emptied or trimmed manifest is a failure), and optionally every
tensor against the source by decoding both sides to float32 row chunk by row chunk (which also
names the tensor holding a byte the hash found changed):

- raw copies must be byte-identical; BF16 must equal the source decoded then rounded to BF16;
- FP8 / MXFP8 must lie within half an e4m3 step of the source: |y - x| <= 2^-4 |x| + 2^-10 s
  (s the block scale: the subnormal step is s * 2^-9);
- int8 must lie within half a quantization step of the source: |y - x| <= s_row / 2 (+ fp32 slack).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from v4hal.conversion import formats
from v4hal.checkpoint_files import CheckpointError, confined
from v4hal.conversion.io import Source, digest_of, hash_file, read_header, read_rows
from v4hal.conversion.plan import CHUNK_BYTES, MANIFEST, is_scratch
from v4hal.ops import quant


def verify(dst: str | Path, source: str | Path | None = None, check_hash: bool = True, progress=None) -> list[str]:
    """Problems found (empty when the output is sound), each naming file and tensor."""
    dst = Path(dst)
    try:
        manifest = json.loads((dst / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{dst / MANIFEST}: cannot read the manifest ({exc}); the conversion did not finish"]
    problems = [f"{dst / name}: present but not listed in the manifest's outputs"
                for name in sorted(p.name for p in dst.iterdir())
                if name != MANIFEST and not is_scratch(name) and name not in manifest["outputs"]]
    listed = {name for t in manifest["tensors"].values() for name in t["outputs"]}
    changed = []  # files whose hash differs: the source comparison (if asked) then names the tensor
    for name, meta in manifest["outputs"].items():
        try:
            path = confined(dst, name)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if path.stat().st_size != meta["size"]:
            problems.append(f"{path}: size {path.stat().st_size}, manifest says {meta['size']}")
            continue
        if name.endswith(".safetensors"):
            try:
                stored = read_header(path)[0]
            except CheckpointError as exc:
                problems.append(str(exc))
                continue
            problems += [f"{path}, tensor '{t}': not listed in the manifest's tensors" for t in stored if t not in listed]
        if check_hash and (problem := hash_problem(path, meta, "differs from the manifest (corrupt or modified)", progress)):
            changed.append(problem)
    if source is None or problems:
        return problems + changed
    if manifest["options"]["target"] in ("mindspore", "hf"):
        return changed + compare_renamed(source, dst)
    problems = changed
    src = Source(source)
    problems += [f"{src.dir / name}: source shard not listed in the manifest's sources"
                 for name in src.files if name not in manifest["sources"]]
    for name, meta in manifest["sources"].items():
        if name not in src.files:
            problems.append(f"{src.dir / name}: source shard missing")
        elif check_hash and (problem := hash_problem(src.dir / name, meta, "differs from the source shard converted", progress)):
            problems.append(problem)
    mp = manifest["options"].get("mp", 1)
    shards = sorted(n for n in manifest["outputs"] if n.endswith(".safetensors"))
    # Each rank holds its own copy of every replicated tensor: compare each rank's files alone.
    ranks = [shards] if mp == 1 else [[n for n in shards if n.startswith(f"model{r}-mp{mp}-")] for r in range(mp)]
    for files in ranks:
        out = Source(dst, files)
        for t in manifest["tensors"].values():
            if t["split"] and t["split"][0] != "all":
                continue  # resharded pieces: checked by the manifest hashes only
            try:
                problems += compare(src, out, t)
            except CheckpointError as exc:
                problems.append(str(exc))
    return problems


def hash_problem(path: Path, meta: dict, what: str, progress) -> str | None:
    """A problem line if `path`'s content does not have the hash `meta` records (with the
    algorithm it names: blake3, or sha256 in older manifests), else None."""
    try:
        algo, digest = digest_of(meta)
    except ValueError as exc:
        return f"{path}: {exc}"
    return None if hash_file(path, algo, progress) == digest else f"{path}: {algo} {what}"


def _decode_out(encode: str, out: Source, names: list[str], r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 rows of a converted tensor, plus the per-element tolerance scale (or None)."""
    q = read_rows(out.tensors[names[0]], r0, r1)
    if encode in ("raw", "bf16"):
        return q.float(), None
    if encode == "int8":
        s = read_rows(out.tensors[names[1]], r0, r1)
        off = read_rows(out.tensors[names[2]], r0, r1)
        return (q.float() - off) * s, s.expand_as(q) / 2
    if encode == "fp8":
        b = quant.WEIGHT_BLOCK[0]
        s = read_rows(out.tensors[names[1]], r0 // b, math.ceil(r1 / b))
        per_elem = s.repeat_interleave(b, 0).repeat_interleave(b, 1)[: q.shape[0], : q.shape[1]]
        return quant.dequantize_fp8(q, s, quant.WEIGHT_BLOCK, torch.float32), per_elem * 2.0**-10
    if encode == "mxfp8":
        s = read_rows(out.tensors[names[1]], r0, r1).float()
        per_elem = s.repeat_interleave(formats.MX_BLOCK, 1)[:, : q.shape[1]]
        return quant.dequantize_fp8(q, s, (1, formats.MX_BLOCK), torch.float32), per_elem * 2.0**-10
    raise ValueError(encode)


def compare(src: Source, out: Source, t: dict) -> list[str]:
    info = src.tensors[t["source"]]
    names = t["outputs"]
    main = out.tensors.get(names[0])
    if main is None:
        return [f"{out.dir}: tensor '{names[0]}' missing from the output"]
    if t["encode"] == "raw":
        return [f"{main.file}, tensor '{name}': differs from source '{sname}'"
                for name, sname in zip(names, [t["source"], t["source_scale"]])
                if not torch.equal(read_rows(out.tensors[name]).view(torch.uint8),
                                   read_rows(src.tensors[sname]).view(torch.uint8))]
    sinfo = src.tensors[t["source_scale"]] if t["source_scale"] else None
    scale = formats.float_scale(read_rows(sinfo), sinfo) if sinfo else None
    rows = main.shape[0]
    step = max(128, CHUNK_BYTES // (4 * math.prod(main.shape[1:]) or 1) // 128 * 128)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = formats.decode_rows(t["decode"], read_rows(info, r0, r1), scale, r0)
        y, tol = _decode_out(t["encode"], out, names, r0, r1)
        if t["encode"] == "bf16":
            bad = y != x.to(torch.bfloat16).float()
        elif t["encode"] == "int8":
            bad = (y - x).abs() > tol * (1 + 1e-5) + 1e-12
        else:
            bad = (y - x).abs() > x.abs() * 2.0**-4 + tol * (1 + 1e-5)
        # a finite source value stored as +-inf (or NaN) is wrong though inf equals inf; e4m3 / e2m1
        # codes have no inf, so an inf in x is a finite product past float32's range
        finite = x.isfinite() if t["decode"] == "plain" else ~x.isnan()
        bad |= ~y.isfinite() & finite
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0])
            row, col = divmod(i, x.shape[1]) if x.dim() == 2 else (i, 0)
            got, want = float(y.flatten()[i]), float(x.flatten()[i])
            vs = f"vs {want}" if math.isfinite(want) else "for a finite source value (past float32's range)"
            return [f"{main.file}, tensor '{names[0]}': {int(bad.sum())} element(s) outside the {t['encode']} error "
                    f"budget of source '{t['source']}', first at [{r0 + row}, {col}]: {got} {vs}"]
    return []


def _open(path: str | Path):
    """(checkpoint, get(name) -> tensor) for HF safetensors or a MindSpore conversion output."""
    from v4hal.conversion import mindspore as msconv

    if (Path(path) / msconv.SIDECAR).exists():
        ckpt = msconv.MindSporeSource(path)
        if ckpt.format == "safetensors":
            return ckpt, lambda name: read_rows(ckpt.tensors[name])
        loaded: dict[str, msconv.MsReader] = {}

        def get(name):
            file = Path(ckpt.tensors[name].file).name
            if file not in loaded:
                loaded.clear()  # one MindSpore file in memory at a time
                loaded[file] = msconv.MsReader(ckpt, file, None)
            return loaded[file].companion(ckpt.tensors[name])
        return ckpt, get
    ckpt = Source(path)
    return ckpt, lambda name: read_rows(ckpt.tensors[name])


def compare_renamed(source: str | Path, dst: Path) -> list[str]:
    """MindSpore conversions rename but never change a value: every tensor, under its HF name,
    must be bit-identical on both sides."""
    src, get_src = _open(source)
    out, get_out = _open(dst)
    problems = [f"{out.dir}: tensor '{n}' of the source is missing" for n in src.tensors if n not in out.tensors]
    for name in sorted(out.tensors, key=lambda n: out.tensors[n].file):
        if name not in src.tensors:
            problems.append(f"{out.tensors[name].file}, tensor '{name}': not in the source")
        elif not torch.equal(get_out(name).reshape(-1).view(torch.uint8), get_src(name).reshape(-1).view(torch.uint8)):
            problems.append(f"{out.tensors[name].file}, tensor '{name}': differs from the source")
    return problems
