"""Checkpoint loading by the official tensor names, one shard at a time.

Accepted namings (mixed freely, per tensor):
- HF, as transformers' `save_pretrained` writes it: `model.layers.3.self_attn.q_a_proj.weight`,
  fused experts `model.layers.3.mlp.experts.gate_up_proj` `[E, 2I, H]` / `down_proj` `[E, H, I]`.
- HF as DeepSeek publishes V3 / V3.2: the same, with experts one module each
  (`mlp.experts.17.gate_proj.weight`) and FP8 weights beside `...weight_scale_inv`.
- DeepSeek's own V4 naming (`layers.3.attn.wq_a.weight`, `layers.3.ffn.experts.17.w1.weight`,
  `hc_head_fn`, `embed.weight`, `head.weight`, ...) with `...scale` beside FP8 / FP4 weights.
- msmodelslim's W8A8 dynamic layout (what `v4hal convert run --to w8a8` writes), in either naming:
  int8 `P.weight` with per-output-channel `P.weight_scale` `[N, 1]` and `P.weight_offset` `[N, 1]`,
  and `quant_model_description.json` naming each tensor's quant type (see `_Description`).

Quantized weights (FP8 e4m3 + 128x128 block scales, MXFP4 packed + 1x32 ue8m0 scales, int8 +
per-row scales) stay quantized where the target is a `Linear` (or a fused expert tensor with a
`<name>_scale` slot) and `keep_quantized` is on; otherwise they are dequantized once, on load.
Shards are memory-mapped and copied tensor by tensor into the model's (untouched, lazily
allocated) storage, so the peak resident memory is near the model's size, not twice it.
MXFP8 weights (e4m3 + 1x32 ue8m0 scales, `convert run --to mxfp8`) are always dequantized on load.
An FP8 weight's scales (128x128 or 1x32) must be float32, float64 or float8_e8m0fnu
(`ops.quant.FP8_STORED_SCALE_DTYPES`); uint8 or another dtype is rejected naming the weight, and so
is a float8_e8m0fnu scale holding byte 0xFF (e8m0's NaN), naming its first index.
V4.1's Engram table scales (ue8m0, one per 32 columns) are held as float8_e8m0fnu, whether stored
so or as uint8 holding the same exponent bytes; byte 0xFF (e8m0's NaN) or another dtype is rejected.
float32 table scales are held as stored (factors, not necessarily powers of two).
Every shard must be a regular file inside the checkpoint folder (symlinks resolved); a tensor
stored twice, or an integer tensor without a scale for a float slot, is rejected.
The MTP layers (`model.layers.{N}` for N >= num_hidden_layers, `mtp.*`) are skipped.

A model built for a parallel layout (`build(..., layout=...)`) reads only this rank's slices
(`model.parallel.shard`) from the memory-mapped shards (safetensors' `get_slice`), and only its
own routed experts; quantized weights stay quantized, their scales sliced with them.
`v4hal convert run --mp N` output loads under tp = ep = N, each rank opening only its own files
(`model{rank}-mp{N}-*.safetensors`); under any other layout it is refused, naming both.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from v4hal import ops
from v4hal.checkpoint_files import CheckpointError, confined
from v4hal.model import engram
from v4hal.model.engram import EngramTable
from v4hal.model.config import ModelArgs
from v4hal.model.parallel import SOLO_PARALLEL, local_expert, scale_split, shard, take

QUANT_DTYPES = (torch.float8_e4m3fn, torch.uint8, torch.int8)
MX_BLOCK = (1, 32)  # OCP microscaling blocks, as MXFP4's (ops.FP4_BLOCK) and MXFP8's
SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".scale")
OFFSET_SUFFIX = ".weight_offset"
DESCRIPTION = "quant_model_description.json"
W8A8_DYNAMIC, FLOAT = "W8A8_DYNAMIC", "FLOAT"
# DeepSeek's own V4 names -> HF names, applied to a key without its optional `model.` prefix
# (transformers itself writes V4 checkpoints in these names, under `model.`).
_V4_RENAMES = [
    (r"^embed\.weight$", "embed_tokens.weight"),
    (r"^head\.weight$", "lm_head.weight"),
    (r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1"),
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    # V4.1's index keys come from the compressor's latent (model.attention_v41)
    (r"\.self_attn\.indexer\.wk\.", ".self_attn.compressor.indexer.k_proj."),
    (r"\.self_attn\.indexer\.k_norm\.", ".self_attn.compressor.indexer.k_norm."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_sink$", ".sinks"),
    (r"\.self_attn\.indexer\.weights_proj\.", ".self_attn.compressor.indexer.scorer.weights_proj."),
    (r"\.self_attn\.indexer\.wq_b\.", ".self_attn.compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.(shared_experts|experts\.\d+)\.w1\.", r".\1.gate_proj."),
    (r"\.(shared_experts|experts\.\d+)\.w2\.", r".\1.down_proj."),
    (r"\.(shared_experts|experts\.\d+)\.w3\.", r".\1.up_proj."),
]
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class LoadError(RuntimeError):
    """The checkpoint does not fit the model; the message lists every offending tensor."""


@dataclass
class LoadReport:
    files: int = 0
    tensors: int = 0
    formats: Counter = field(default_factory=Counter)  # target tensors by stored format
    dequantized: int = 0
    skipped: list[str] = field(default_factory=list)  # MTP tensors
    bytes_read: int = 0
    seconds: float = 0.0
    engram_token_map: str | None = None  # V4.1: the file the compressed token map came from

    def summary(self) -> str:
        fmts = ", ".join(f"{n} {k}" for k, n in sorted(self.formats.items()))
        where = f"; Engram token map from {self.engram_token_map}" if self.engram_token_map else ""
        return (f"{self.tensors} tensors from {self.files} file(s) ({fmts}); {self.dequantized} dequantized, "
                f"{len(self.skipped)} MTP tensors skipped; {self.bytes_read / 2**20:.1f} MiB in {self.seconds:.2f} s"
                + where)


def _inside(directory: Path, name: str) -> Path:
    """`directory / name` if it is a regular file inside `directory` after resolving symlinks, or a
    blob of the Hugging Face cache repo `directory` is a snapshot of (see
    `v4hal.checkpoint_files.confined`: the loader only reads); else LoadError."""
    try:
        confined(directory, name, hf_cache=True)
    except CheckpointError as exc:
        raise LoadError(f"weights: {exc}") from None
    return directory / name


_RANK_INDEX = re.compile(r"^model(\d+)-mp(\d+)\.safetensors\.index\.json$")


def resharded_for(directory: str | Path) -> int | None:
    """N where `directory` holds `v4hal convert run --mp N` output (one index per rank), else None."""
    sizes = {int(m.group(2)) for p in Path(directory).glob("model*-mp*.safetensors.index.json")
             if (m := _RANK_INDEX.match(p.name))}
    if len(sizes) > 1:
        raise LoadError(f"weights: {directory} holds rank indexes for several world sizes {sorted(sizes)}")
    return sizes.pop() if sizes else None


def checkpoint_files(directory: str | Path, par=SOLO_PARALLEL) -> list[Path]:
    """The shards to read: all of them, or for `convert run --mp N` output this rank's own (which
    needs the layout tp = ep = N, the one DeepSeek's convert script reshards for)."""
    d = Path(directory)
    if not d.is_dir():
        raise LoadError(f"weights: {d} is not a directory")
    mp = resharded_for(d)
    if mp is not None:
        lay = par.layout
        if (lay.tp, lay.ep, lay.dp, lay.pp) != (mp, mp, 1, 1):
            raise LoadError(f"weights: {d} is resharded for {mp} ranks (convert run --mp {mp}) and loads only under "
                            f"torchrun --nproc-per-node {mp} with --tp {mp} --ep {mp}; this run's layout is {lay} "
                            f"({lay.devices} process(es)): reshard the original checkpoint for it, or load that one")
        index = d / f"model{par.tp.rank}-mp{mp}.safetensors.index.json"
        if not index.exists():
            raise LoadError(f"weights: {d} is resharded for {mp} ranks but has no {index.name}")
    else:
        index = d / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(_inside(d, index.name).read_text())["weight_map"].values()))
        missing = [n for n in names if not (d / n).exists()]
        if missing:
            raise LoadError(f"weights: {index.name} names shards that are absent: {missing}")
    else:
        names = sorted(p.name for p in d.glob("*.safetensors"))
        if not names:
            raise LoadError(f"weights: no *.safetensors file in {d}")
    return [_inside(d, n) for n in names]


def canonical_name(key: str, v4: bool) -> str:
    """A checkpoint key in HF naming: DeepSeek's V4 names translated (V3 / V3.2 publish HF names
    already), V3's `weight_scale_inv` and msmodelslim's `weight_scale` (both multiply the stored
    codes) spelled `scale`, `model.` prefixed except for `lm_head`."""
    for suffix in (".weight_scale_inv", ".weight_scale"):
        if key.endswith(suffix):
            key = key[: -len(suffix)] + ".scale"
            break
    body = key[len("model."):] if key.startswith("model.") else key
    if v4:
        for pattern, repl in _V4_RENAMES:
            body = re.sub(pattern, repl, body)
    return body if body.startswith("lm_head.") else "model." + body


def _is_mtp(name: str, args: ModelArgs) -> bool:
    m = _LAYER.match(name)
    return name.startswith(("mtp.", "model.mtp.")) or (m is not None and int(m.group(1)) >= args.num_hidden_layers)


def _slot(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    module_path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_path) if module_path else model
    except AttributeError:
        return None
    if attr in module._parameters or attr in module._buffers:
        return module, attr
    return None


def _is_quant_scale(model: nn.Module, name: str) -> bool:
    """`x.scale` is a quantization scale unless the model holds a tensor of that name (mHC's
    `attn_hc.scale` is a parameter; a `Linear`'s empty `scale` slot waits for one)."""
    if not name.endswith(".scale"):
        return False
    slot = _slot(model, name)
    return slot is None or getattr(*slot) is None


def _packed_fp4_as_int8(weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """DeepSeek V4 ships its MXFP4 experts as int8 bytes (two e2m1 values each) beside a
    `[N, K/32]` ue8m0 scale; a W8A8 int8 weight has one float scale per row. Told apart by the
    scale: its e8m0 / byte dtype, or more than one column."""
    if weight.dtype != torch.int8 or scale is None or weight.dim() != 2:
        return False
    return scale.dtype in (torch.float8_e8m0fnu, torch.uint8) or (
        scale.dim() == 2 and scale.shape[1] > 1 and scale.shape[1] == -(-2 * weight.shape[1] // ops.FP4_BLOCK))


def _is_mxfp8(weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """MXFP8 (`v4hal convert run --to mxfp8`): e4m3 `[N, K]` with one ue8m0 scale per 1x32 block,
    `[N, K/32]`, where DeepSeek's FP8 has one per 128x128 block. (For N = 1 and K <= 32 both
    layouts are one scale over the whole matrix: either reading is exact.)"""
    return (scale is not None and weight.dim() == 2 and scale.dim() == 2
            and tuple(scale.shape) == ops.scale_shape(tuple(weight.shape), MX_BLOCK)
            and tuple(scale.shape) != ops.scale_shape(tuple(weight.shape), ops.WEIGHT_BLOCK))


def _logical_shape(t: torch.Tensor) -> tuple[int, ...]:
    """Shape of the matrix a stored tensor stands for (packed FP4 holds two values per byte)."""
    return (*t.shape[:-1], t.shape[-1] * 2) if t.dtype == torch.uint8 else tuple(t.shape)


def _install_quantized(module: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Put a quantized weight and its scale into a linear module that can run it (one with a
    `weight_scale_inv` slot, as `model.layers.Linear`); False if the module holds only floats."""
    if not hasattr(module, "weight_scale_inv"):
        return False
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.weight_scale_inv = scale
    return True


class _Description:
    """msmodelslim's `quant_model_description.json` (`{"model_quant_type": T, key: type, ...}`), when
    the checkpoint has one. Only W8A8_DYNAMIC (int8 `weight` + float `weight_scale` /
    `weight_offset`) and FLOAT (stored as is, so never int8) are read; other msmodelslim types
    (static W8A8 with `deq_scale`, W4A8, W8A16, ...) need tensors and math this loader lacks."""

    FLOATS = ("F64", "F32", "F16", "BF16")

    def __init__(self, directory: Path):
        path = directory / DESCRIPTION
        self.types: dict[str, str] | None = None
        self.seen: set[str] = set()
        if not path.exists():
            return
        _inside(directory, DESCRIPTION)
        try:
            raw = json.loads(path.read_text())
        except ValueError as e:
            raise LoadError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise LoadError(f"{path}: expected an object of tensor name -> quant type")
        other = {k: v for k, v in raw.items() if v not in (W8A8_DYNAMIC, FLOAT)}
        if other:
            shown = ", ".join(f"{k}: {v!r}" for k, v in list(other.items())[:5])
            raise LoadError(f"{path}: only {W8A8_DYNAMIC} and {FLOAT} quantization can be loaded; "
                            f"{len(other)} entr(ies) name another type ({shown}{' ...' if len(other) > 5 else ''})")
        self.types = {k: v for k, v in raw.items() if k != "model_quant_type"}

    def check(self, key: str, dtype: str) -> str | None:
        """Why the stored tensor `key` (safetensors dtype string) contradicts the description."""
        self.seen.add(key)
        kind = self.types.get(key)
        if kind is None:
            return f"{key}: not named in {DESCRIPTION}"
        if kind == FLOAT and dtype == "I8":
            return f"{key}: {DESCRIPTION} says {FLOAT} but it is stored as int8"
        if kind == W8A8_DYNAMIC and key.endswith(".weight") and dtype != "I8":
            return f"{key}: {DESCRIPTION} says {W8A8_DYNAMIC} but it is stored as {dtype}, not int8"
        if kind == W8A8_DYNAMIC and key.endswith((".weight_scale", OFFSET_SUFFIX)) and dtype not in self.FLOATS:
            return f"{key}: {DESCRIPTION} says {W8A8_DYNAMIC} but this scale / offset is stored as {dtype}, not float"
        return None

    def absent(self) -> list[str]:
        return [] if self.types is None else sorted(set(self.types) - self.seen)


class _Loader:
    def __init__(self, model: nn.Module, args: ModelArgs, keep_quantized: bool):
        self.model, self.args, self.keep = model, args, keep_quantized
        self.expected = set(model.state_dict().keys())
        self.filled: dict[str, set] = {}  # target name -> pieces written (experts fill piecewise)
        self.pieces_needed: dict[str, int] = {}
        self.errors: list[str] = []
        self.unexpected: list[str] = []
        self.rejected: list[str] = []  # tensors present and shaped right but not loadable as they are
        self.refused: set[str] = set()  # names in errors or rejected: present, so not also missing
        self.quantized: set[str] = set()  # weights that came with a scale
        self.report = LoadReport()

    # One logical tensor: a float tensor, or a quantized weight with its scale.
    def put(self, name: str, tensor: torch.Tensor, scale: torch.Tensor | None) -> None:
        table = _slot(self.model, name)
        if table is not None and isinstance(table[0], EngramTable):
            if table[1] == "scale":  # a float8-built table's scale (its weight comes alone)
                tensor = self._table_scale(name, tensor)
                if tensor is None:
                    return
                if tensor.dtype == torch.float32:  # factors kept as stored: the float8_e8m0fnu slot would round them
                    table[0].scale = nn.Parameter(torch.empty_like(table[0].scale, dtype=torch.float32), requires_grad=False)
            elif scale is not None:  # a float8 table with its scale, for a table built float: adopted below
                scale = self._table_scale(name[: -len("weight")] + "scale", scale)
                if scale is None:
                    self.refused.add(name)  # refused with its scale, not also missing
                    return
        fp8 = torch.float8_e4m3fn
        if table is not None and isinstance(table[0], EngramTable) and table[1] == "weight" \
                and (tensor.dtype == fp8) != (table[0].weight.dtype == fp8):
            table[0].adopt(tensor, scale)  # a table in the other encoding (float8 / float) than the model built
            self.expected.discard(name[: -len("weight")] + "scale")  # a float table has none
            self.filled[name] = {None}
            return
        if tensor.dtype == fp8 and scale is not None and scale.dtype not in ops.quant.FP8_STORED_SCALE_DTYPES:
            # uint8 exponent bytes would reach fp8_matmul (which refuses them, at run time) or be read as 0-255
            what = "MXFP8" if _is_mxfp8(tensor, scale) else "FP8 128x128 block"
            self._refuse(self.rejected, name, f"{what} scale stored as {scale.dtype}: expected "
                                              f"{' or '.join(map(str, ops.quant.FP8_STORED_SCALE_DTYPES))}")
            return
        if _packed_fp4_as_int8(tensor, scale):
            tensor = tensor.view(torch.uint8)
        elif tensor.dtype == fp8 and scale is not None and scale.dtype == torch.float8_e8m0fnu:
            nan = scale.view(torch.uint8) == 0xFF
            if bool(nan.any()):  # as a factor, NaN for its whole block
                what = "MXFP8" if _is_mxfp8(tensor, scale) else "FP8 128x128 block"
                first = [int(i) for i in nan.nonzero()[0]]
                self._refuse(self.rejected, name, f"{int(nan.sum())} {what} scale(s) hold e8m0 byte 0xFF (NaN), "
                                                  f"first at {first}: expected powers of two (bytes 0-254)")
                return
            scale = scale.float()  # V4's ue8m0 block scales; exact (powers of two), what fp8_matmul takes
        if tensor.dtype == torch.float8_e4m3fn:
            nan_codes = int(((tensor.view(torch.uint8) & 0x7F) == 0x7F).sum())
            if nan_codes:  # the fp8_matmul contract excludes them (not checked per call): refused once, here
                self._refuse(self.rejected, name, f"{nan_codes} e4m3 NaN code(s) (0x7f/0xff) in an FP8 weight")
                return
            if _is_mxfp8(tensor, scale):  # no kernel here runs 1x32 FP8 blocks: dequantized once, now
                tensor, scale = ops.dequantize_fp8(tensor, scale.float(), MX_BLOCK, torch.float32), None
                self.report.dequantized += 1
        if scale is not None:
            self.quantized.add(name)
            if tensor.dtype == torch.int8:
                scale = self._row_scale(name, tensor, scale)
                if scale is None:
                    return
        m = _PER_EXPERT.match(name)
        if m is not None:
            self._put_expert(m, name, tensor, scale)
            return
        slot = _slot(self.model, name)
        if slot is None:
            self.unexpected.append(name)
            return
        module, attr = slot
        target = getattr(module, attr)
        if scale is None and self._wrong_kind(name, tensor, target):
            return
        if _logical_shape(tensor) != tuple(target.shape):
            self._refuse(self.errors, name, f"checkpoint shape {tuple(_logical_shape(tensor))}, model expects {tuple(target.shape)}")
            return
        self.report.formats[ops.weight_format(tensor, scale) if scale is not None else "dense"] += 1
        if scale is not None and self.keep and attr == "weight" and _install_quantized(module, tensor, scale):
            pass
        else:
            if scale is not None:
                tensor = ops.dequantize_weight(tensor, scale, target.dtype)
                self.report.dequantized += 1
            self._copy(module, attr, target, tensor)
        self.filled[name] = {None}

    def _refuse(self, problems: list[str], name: str, why: str) -> None:
        problems.append(f"{name}: {why}")
        self.refused.add(name)

    def _table_scale(self, name: str, scale: torch.Tensor) -> torch.Tensor | None:
        """A V4.1 Engram table's scale `name` as the model holds it: ue8m0 exponent bytes, stored
        as float8_e8m0fnu or as uint8 holding the same bytes (as `ops.engram_lookup` and vLLM's
        V4.1 loader read them; never the integers 0-255), as float8_e8m0fnu; float32 factors as
        they are. Another dtype, or byte 0xFF (e8m0's NaN: NaN for the 32 values it scales), is
        refused naming the tensor (None)."""
        allowed = ops.engram.SCALE_DTYPES
        if scale.dtype not in allowed:
            self._refuse(self.rejected, name, f"Engram table scale stored as {scale.dtype}: expected "
                                              f"{' or '.join(map(str, allowed))}")
            return None
        if scale.dtype == torch.float32:
            return scale
        nan = int((scale.view(torch.uint8) == 0xFF).sum())
        if nan:
            self._refuse(self.rejected, name, f"{nan} Engram table scale byte(s) 0xFF, e8m0's NaN "
                                              f"(stored as {scale.dtype}, read as ue8m0 exponent bytes)")
            return None
        return scale.view(torch.float8_e8m0fnu)

    def _wrong_kind(self, name: str, tensor: torch.Tensor, target: torch.Tensor) -> bool:
        """A tensor without a scale is copied as is, so an integer one into a float slot (or the
        reverse) would be silently converted: rejected instead."""
        if tensor.dtype.is_floating_point == target.dtype.is_floating_point:
            return False
        self._refuse(self.rejected, name, f"stored as {tensor.dtype} without a scale, the model holds {target.dtype}")
        return True

    def _row_scale(self, name: str, tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        """An int8 weight's per-output-channel scale as the `[N]` float32 vector `ops.linear` and
        `ops.moe_forward` take (msmodelslim stores `[N, 1]`, in any float dtype)."""
        n = tensor.shape[0]
        if tensor.dim() != 2 or tuple(scale.shape) not in ((n,), (n, 1)):
            self._refuse(self.errors, name, f"int8 weight {list(tensor.shape)} needs one scale per output row "
                                            f"([{n}] or [{n}, 1]); its scale is {list(scale.shape)}")
            return None
        return scale.reshape(n).float()

    def _copy(self, module: nn.Module, attr: str, target: torch.Tensor, tensor: torch.Tensor, index=None) -> None:
        if target.is_meta:  # a model built on the meta device gets real storage as it loads
            target = torch.empty(target.shape, dtype=target.dtype)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(target, requires_grad=False)
            else:
                module._buffers[attr] = target
        with torch.no_grad():
            (target if index is None else target[index]).copy_(tensor)

    def _put_expert(self, m: re.Match, name: str, tensor: torch.Tensor, scale: torch.Tensor | None) -> None:
        prefix, e, proj = m.group("prefix"), int(m.group("e")), m.group("proj")
        fused = f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
        slot = _slot(self.model, fused)
        if slot is None:
            self.unexpected.append(name)
            return
        module, attr = slot
        target = getattr(module, attr)
        if scale is None and self._wrong_kind(name, tensor, target):
            return
        n_exp, rows = target.shape[0], target.shape[1]
        half = rows // 2 if proj != "down_proj" else rows
        expect = (half, target.shape[2]) if target.dtype not in QUANT_DTYPES else None
        if e >= n_exp or (expect is not None and _logical_shape(tensor) != expect):
            self._refuse(self.errors, name, f"checkpoint shape {tuple(_logical_shape(tensor))} (expert {e}), model "
                                            f"expects {expect} for each of {n_exp} experts in {fused}")
            return
        row0 = 0 if proj != "up_proj" else half
        self.report.formats[ops.weight_format(tensor, scale) if scale is not None else "dense"] += 1
        scale_attr = f"{attr}_scale"
        keep = scale is not None and self.keep and hasattr(module, scale_attr) and self._fusable(scale, half, tensor)
        if keep:
            qt = getattr(module, attr)
            if qt.dtype != tensor.dtype:  # first quantized expert: swap in quantized storage
                qt = torch.empty((n_exp, rows, tensor.shape[1]), dtype=tensor.dtype)
                srows = scale.shape[0] * (rows // half)
                setattr(module, scale_attr, torch.empty((n_exp, srows, *scale.shape[1:]), dtype=scale.dtype))
                module._parameters[attr] = nn.Parameter(qt, requires_grad=False)
            s = getattr(module, scale_attr)
            with torch.no_grad():
                qt[e, row0: row0 + half].copy_(tensor)
                s0 = row0 * scale.shape[0] // half
                s[e, s0: s0 + scale.shape[0]].copy_(scale)
        else:
            if scale is not None:
                tensor = ops.dequantize_weight(tensor, scale, target.dtype)
                self.report.dequantized += 1
            self._copy(module, attr, target, tensor, (e, slice(row0, row0 + half)))
        self.pieces_needed[fused] = n_exp * (1 if proj == "down_proj" else 2)
        self.filled.setdefault(fused, set()).add((e, proj))

    @staticmethod
    def _fusable(scale: torch.Tensor, half: int, tensor: torch.Tensor) -> bool:
        """Gate and up scales stack into one tensor only when no scale block straddles them
        (FP8's 128-row blocks; FP4 and int8 scale each row)."""
        return tensor.dtype != torch.float8_e4m3fn or half % ops.WEIGHT_BLOCK[0] == 0

    def _shared_cache_hint(self) -> str:
        """V4.1: a compressor or indexer tensor on a layer that reads another layer's."""
        if not self.args.shares_compressed_caches:
            return ""
        layers = sorted({int(m.group(1)) for name in self.unexpected if ".self_attn.compressor." in name
                         for m in [_LAYER.match(name)] if m})
        if not layers:
            return ""
        return (f" (layers {layers}: V4.1 builds a compressor only on kv_source_layer_ids "
                f"{self.args.kv_source_layer_ids} and an indexer only on index_source_layer_ids "
                f"{self.args.index_source_layer_ids}; the config and the checkpoint disagree)")

    def finish(self) -> None:
        missing = []
        for name in sorted(self.expected - self.refused):
            got = self.filled.get(name)
            if got is None or (name in self.pieces_needed and len(got) < self.pieces_needed[name]):
                have = "" if got is None else f" ({len(got)} of {self.pieces_needed[name]} expert matrices)"
                missing.append(name + have)
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing tensor(s): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if self.unexpected:
            problems.append(f"{len(self.unexpected)} unexpected tensor(s) (not in the model): "
                            + ", ".join(self.unexpected[:20]) + (" ..." if len(self.unexpected) > 20 else "")
                            + self._shared_cache_hint())
        if self.errors:
            problems.append(f"{len(self.errors)} mis-shaped tensor(s): " + "; ".join(self.errors[:20]))
        if self.rejected:
            problems.append(f"{len(self.rejected)} rejected tensor(s): " + "; ".join(self.rejected[:20]))
        if problems:
            raise LoadError("checkpoint does not match the model:\n  " + "\n  ".join(problems))


def _stored(files: list[Path], args: ModelArgs) -> dict[str, tuple[tuple[int, ...], str]]:
    """Canonical name -> (stored shape, safetensors dtype) of every tensor, from the headers."""
    out = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[canonical_name(key, args.is_v4)] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _rank_slice(sl, name: str, model: nn.Module, stored: dict, par, resharded: bool) -> torch.Tensor:
    """This rank's part of the stored tensor `sl` (a safetensors slice) named `name`. In resharded
    output a tensor already of this rank's shape is its part (its scale with it); one stored whole
    (the reshard keeps what DeepSeek's convert script does not split) is sliced here."""
    shape = tuple(sl.get_shape())
    table = _slot(model, name.rpartition(".")[0] + ".weight")  # an Engram table's weight or scale
    if table is not None and isinstance(table[0], EngramTable) and table[0].shard is not None:
        rows = table[0].shard
        if resharded and shape[0] == rows.row_stop - rows.row_start:  # `convert --mp` wrote this rank's rows
            return sl[:]
        return take(sl, (0, [(rows.row_start, rows.row_stop)]))  # its hash columns' rows
    if _is_quant_scale(model, name):
        base = name[: -len(".scale")] + ".weight"
        wshape, wdtype = stored.get(base, (shape, ""))
        split = None if resharded and _holds(model, base, wshape) else \
            scale_split(name, shard(base, wshape, par), wshape, shape, wdtype == "F8_E4M3", par.layout)
    else:
        split = None if resharded and _holds(model, name, shape) else shard(name, shape, par)
    return sl[:] if split is None else take(sl, split)


def _holds(model: nn.Module, name: str, shape: tuple[int, ...]) -> bool:
    slot = _slot(model, name)
    return slot is not None and tuple(getattr(*slot).shape) == shape


def load_checkpoint(model: nn.Module, directory: str | Path, args: ModelArgs, *, keep_quantized: bool = True,
                    engram_token_map: str | Path | None = None) -> LoadReport:
    """Fill `model`'s parameters and buffers from the safetensors shards in `directory`; a V4.1
    model also gets its Engram token map (`set_engram_token_map`, from `engram_token_map` if given).

    msmodelslim W8A8 weights run as int8 (per-token activation quantization, `int8_matmul`) when
    kept quantized. Their `weight_offset` must be zero: W8A8 dynamic is symmetric and so is
    `int8_matmul`, so a non-zero offset means another scheme and is rejected, naming the tensor,
    rather than dropped or applied in one mode only. With `quant_model_description.json` present,
    every tensor must be named there and stored as its type says.

    Raises LoadError naming every missing, unexpected, mis-shaped and rejected tensor."""
    start = time.perf_counter()
    loader = _Loader(model, args, keep_quantized)
    par = getattr(model, "parallel", SOLO_PARALLEL)
    files = checkpoint_files(directory, par)
    resharded = resharded_for(directory) is not None
    stored = _stored(files, args) if par is not SOLO_PARALLEL else {}
    description = _Description(Path(directory))
    pending_w: dict[str, torch.Tensor] = {}  # quantized weights whose scale is in a later shard
    pending_s: dict[str, torch.Tensor] = {}
    offsets: dict[str, str] = {}  # weight name -> its (all-zero) weight_offset key
    shard_of: dict[str, str] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in shard_of:
                    loader.rejected.append(f"{key}: stored twice, in {shard_of[key]} and {path.name}")
                    continue
                shard_of[key] = path.name
                if description.types is not None and (why := description.check(key, f.get_slice(key).get_dtype())):
                    loader.rejected.append(why)
                offset = key.endswith(OFFSET_SUFFIX)
                name = canonical_name(key[: -len("_offset")] if offset else key, args.is_v4)
                if _is_mtp(name, args):
                    loader.report.skipped.append(key)
                    continue
                name = local_expert(name, args.n_routed_experts, par)
                if name is None:  # another rank's expert
                    continue
                tensor = f.get_tensor(key) if not stored else _rank_slice(f.get_slice(key), name, model, stored, par, resharded)
                loader.report.bytes_read += tensor.numel() * tensor.element_size()
                loader.report.tensors += 1
                if offset:
                    offsets[name] = key
                    if tensor.count_nonzero():
                        loader.rejected.append(
                            f"{key}: non-zero weight offset (max |offset| {tensor.float().abs().max().item():g}); "
                            "W8A8 dynamic weights are symmetric and int8_matmul has no offset term")
                elif _is_quant_scale(model, name):
                    base = name[: -len(".scale")] + ".weight"
                    if base in pending_w:
                        loader.put(base, pending_w.pop(base), tensor)
                    else:
                        pending_s[base] = tensor
                elif name.endswith(".weight") and tensor.dtype in QUANT_DTYPES \
                        and _is_quant_scale(model, name[: -len(".weight")] + ".scale"):  # V4.1's engram tables hold their own
                    if name in pending_s:
                        loader.put(name, tensor, pending_s.pop(name))
                    else:
                        pending_w[name] = tensor
                else:
                    loader.put(name, tensor, None)
        loader.report.files += 1
    for name in pending_w:
        loader._refuse(loader.errors, name, f"quantized ({pending_w[name].dtype}) but no scale tensor "
                                            f"({name[:-7]}.scale, .weight_scale_inv or .weight_scale) in the checkpoint")
    for name in pending_s:
        loader.unexpected.append(name[: -len(".weight")] + ".scale")
    loader.unexpected += [key for name, key in offsets.items() if name not in loader.quantized and name not in pending_w]
    loader.rejected += [f"{key}: named in {DESCRIPTION} but not in the checkpoint" for key in description.absent()]
    loader.finish()
    if args.is_v41:
        loader.report.engram_token_map = set_engram_token_map(model, Path(directory), engram_token_map)
    loader.report.seconds = time.perf_counter() - start
    return loader.report


def set_engram_token_map(model: nn.Module, directory: Path, path: str | Path | None = None) -> str | None:
    """V4.1: give `model` the compressed token map from `path` (a `tokenizer.json` or an
    `engram_token_map.json`), by default from the checkpoint folder's tokenizer, else its saved
    map (`model.engram.token_map_file`). Returns the file used, None when the folder has neither;
    LoadError naming the file when it does not fit the model."""
    if path is None:
        name = engram.token_map_file(directory)
        if name is None:
            return None
        path = _inside(directory, name)
    elif not Path(path).is_file():
        raise LoadError(f"Engram token map {path}: no such file")
    try:
        model.set_engram_token_map(engram.token_map_source(path))
    except ValueError as exc:  # OpInputError too
        raise LoadError(f"Engram token map {path}: {exc}") from None
    return Path(path).name
