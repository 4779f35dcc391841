"""`v4hal checkpoint`: save a preset's model with random weights as a Hugging Face checkpoint
(config.json + model.safetensors, or shards + model.safetensors.index.json, HF tensor names), so
`v4hal generate --config DIR/config.json --weights DIR` and `v4hal convert` have something small to
read. The whole checkpoint is written into a temporary sibling folder and renamed into place, so
DIR either holds all of it or none; a non-empty DIR or an existing file is refused, never overwritten."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from v4hal.model.config import PRESETS, ModelArgs, preset
from v4hal.model.engram import TOKEN_MAP_FILE, random_token_map, save_token_map

INDEX = "model.safetensors.index.json"


class OutputRefused(ValueError):
    """The output path exists and is not an empty folder."""


def shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in name order, split into groups of at most `max_bytes` (a bigger tensor alone)."""
    out: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        t = state[name]
        nbytes = t.numel() * t.element_size()
        if out[-1] and size + nbytes > max_bytes:
            out.append({})
            size = 0
        out[-1][name] = t.contiguous()
        size += nbytes
    return out


def check_output(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise OutputRefused(f"{directory}: expected a new or empty folder, got an existing file")
    if directory.is_dir() and any(directory.iterdir()):
        raise OutputRefused(f"{directory}: expected a new or empty folder, got one holding "
                            f"{sorted(p.name for p in directory.iterdir())[:5]}; refusing to overwrite it")


def save_checkpoint(model: torch.nn.Module, args: ModelArgs, directory: str | Path,
                    max_shard_bytes: int = 2 * 2 ** 30) -> list[Path]:
    """Write `model`'s state dict (HF names) and `args` as a checkpoint in `directory`, which must be
    absent or empty (OutputRefused otherwise); a V4.1 model's compressed token map, when set, as
    `engram_token_map.json`. Returns the files written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    check_output(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    config = {**args.to_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}
    groups = shards(model.state_dict(), max_shard_bytes)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        for name, group in zip(names, groups):
            save_file(group, staging / name, metadata={"format": "pt"})
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for g in groups for t in g.values())},
                     "weight_map": {k: name for name, g in zip(names, groups) for k in g}}
            (staging / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
        (staging / "config.json").write_text(json.dumps(config, indent=1))
        hashing = getattr(getattr(model, "model", None), "engram_hashing", None)
        if hashing is not None and hashing.token_map.numel():  # V4.1 cannot run without it
            save_token_map(hashing.token_map, staging / TOKEN_MAP_FILE)
        _usual_permissions(staging)
        os.replace(staging, directory)  # replaces an empty folder too, in one step
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(directory.iterdir())


def _usual_permissions(folder: Path) -> None:
    """mkdtemp makes the folder private (0700); give it and its files what a plain mkdir / open would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


# -- CLI -------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    from v4hal.subcommand import at_least

    p.add_argument("--preset", choices=sorted(PRESETS), required=True, help="the configuration to save")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="weight dtype (default: the preset's)")
    p.add_argument("--shard-mb", type=at_least(1), default=2048,
                   help="largest shard in MiB; more than one shard adds model.safetensors.index.json")
    p.add_argument("directory", type=Path, help="a new or empty folder")


def main(ns: argparse.Namespace) -> int:
    from v4hal.subcommand import NO_RESOURCES, error
    from v4hal.model.model import DTYPES, build
    from v4hal.model.plan import memory_shortfall, random_model_bytes

    try:
        check_output(ns.directory)
    except OutputRefused as exc:
        return error("checkpoint", str(exc))
    args = preset(ns.preset)
    dtype = getattr(torch, ns.dtype) if ns.dtype else DTYPES.get(args.torch_dtype, torch.float32)
    shortfall = memory_shortfall(args, dtype.itemsize)
    if shortfall:
        return error("checkpoint", f"--preset {ns.preset}: {shortfall}", NO_RESOURCES)
    need = random_model_bytes(args, dtype.itemsize)
    parent = next(p for p in (ns.directory, *ns.directory.parents) if p.exists())
    free = shutil.disk_usage(parent).free
    if need > free:
        return error("checkpoint", f"{ns.directory}: the checkpoint needs about {need / 2 ** 30:.2f} GiB "
                                   f"but {parent} has {free / 2 ** 30:.2f} GiB free", NO_RESOURCES)
    model = build(args, dtype).init_random(ns.seed)
    if args.is_v41:
        model.set_engram_token_map(random_token_map(args, ns.seed))
    files = save_checkpoint(model, args, ns.directory, ns.shard_mb * 2 ** 20)
    print(f"wrote {ns.directory}: {', '.join(f.name for f in files)} ({ns.preset}, random weights, seed {ns.seed}, "
          f"{dtype}); try: v4hal generate --config {ns.directory / 'config.json'} --weights {ns.directory}")
    return 0
