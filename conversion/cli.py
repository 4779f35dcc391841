"""`v4hal convert`: run | verify | onnx.

  v4hal convert run --to bf16 SRC DST            FP8/FP4 -> BF16 (Ascend A2/A3, transformers)
  v4hal convert run --to fp8 [--scale-fmt ue8m0] SRC DST   (default: the source's scale_fmt)
  v4hal convert run --to w8a8 SRC DST            int8 W8A8 dynamic, msmodelslim layout
  v4hal convert run --to mxfp8 SRC DST           Ascend A5: MXFP8, MXFP4 experts kept
  v4hal convert run --to copy --mp 8 SRC DST     reshard for 8 tensor/expert-parallel ranks
  v4hal convert run --to mindspore SRC DST       MindSpore .ckpt (or --ms-format safetensors)
  v4hal convert run --to hf SRC DST              a MindSpore conversion back to HF safetensors
  v4hal convert verify DST [--source SRC]
  v4hal convert onnx --preset tiny [--seq 16] OUT.onnx            ONNX graph of our model, checked in onnxruntime
  v4hal convert onnx --config CFG --weights DIR OUT.onnx
Every run accepts --dry-run (list outputs and disk needed, write nothing) and --workers N (source
shards converted at once, in N processes; default: four per core available, at most one per GiB of free memory).
"""

from __future__ import annotations

import argparse
import errno

from v4hal.subcommand import BAD_INPUT, CHECK_FAILED, NO_RESOURCES, OK, at_least, error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    sub = parser.add_subparsers(dest="convert_command", required=True, metavar="ACTION")
    run = sub.add_parser("run", help="convert a checkpoint (streaming, resumable)")
    run.add_argument("--to", required=True, choices=("bf16", "fp8", "w8a8", "mxfp8", "copy", "mindspore", "hf"))
    run.add_argument("source", metavar="SRC", help="checkpoint directory (or one .safetensors file)")
    run.add_argument("dest", metavar="DST", help="output directory (created; resumed if a run was interrupted)")
    run.add_argument("--scale-fmt", choices=("auto", "fp32", "ue8m0"), default="auto",
                     help="fp8: block scale format, also the config's scale_fmt, which sets how activations are "
                          "scaled at run time (auto: the source config's, fp32 where it states none)")
    run.add_argument("--scale-name", choices=("auto", "weight_scale_inv", "scale"), default="auto",
                     help="fp8/mxfp8: scale tensor suffix (auto: as the source, else by naming style)")
    run.add_argument("--keep", metavar="REGEX", help="tensor names never to quantize (in addition to norms, "
                     "embeddings, router gates, biases)")
    run.add_argument("--engram-tables", choices=("keep", "bf16"), default="keep",
                     help="V4.1's Engram tables: keep (as shipped, float8 + ue8m0) or bf16 (decoded, exact wherever "
                          "BF16 holds the product, for Ascend A2 / A3, which cannot read float8; twice the bytes)")
    run.add_argument("--mp", type=at_least(1), default=1, help="reshard for this many tensor/expert-parallel ranks")
    run.add_argument("--n-experts", type=at_least(1), help="routed experts (default: highest expert index + 1)")
    run.add_argument("--ms-format", choices=("ckpt", "safetensors"), default="ckpt", help="mindspore: file format")
    run.add_argument("--ms-names", choices=("mindspore", "hf"), default="mindspore",
                     help="mindspore: rename to MindSpore-style names (see docs/conversion.md) or keep HF names")
    run.add_argument("--dry-run", action="store_true", help="list what would be written and the disk it needs")
    run.add_argument("--restart", action="store_true", help="discard another conversion's partial output in DST")
    run.add_argument("--overwrite", action="store_true", help="write into a DST holding files v4hal did not write, "
                     "replacing those of the same names")
    run.add_argument("--workers", type=at_least(1), metavar="N", help="convert up to N source shards at once, "
                     "in N processes (default: four per core this process may use, at most one per GiB of available memory)")
    run.add_argument("--verify-source", action="store_true", help="hash every source file, even one whose hash is "
                     "stated (Hugging Face cache blob name, a v4hal manifest), and refuse one that differs")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--no-fsync", action="store_true", help="do not fsync each shard before its rename (faster; "
                     "a killed process still resumes safely, a power cut may not)")
    ver = sub.add_parser("verify", help="check an output against its manifest (and its source)")
    ver.add_argument("dest", metavar="DST")
    ver.add_argument("--source", metavar="SRC", help="also decode every tensor of both and compare")
    ver.add_argument("--no-hash", action="store_true", help="skip hashing (sizes and headers only)")
    onx = sub.add_parser("onnx", help="export a fixed-shape prefill of our model to ONNX "
                         "(refused unless onnxruntime reproduces its logits)")
    src = onx.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a model preset (e.g. tiny)")
    src.add_argument("--config", help="a config.json or its directory")
    onx.add_argument("--weights", default="random", help="checkpoint directory (dequantized on load), or 'random'")
    onx.add_argument("--seq", type=int, default=16, help="sequence length the graph is fixed to (default 16)")
    onx.add_argument("--batch", type=int, default=1, help="batch size the graph is fixed to (default 1)")
    onx.add_argument("--seed", type=int, default=0, help="seed of random weights and of the check inputs")
    onx.add_argument("output", metavar="OUT.onnx")


def main(args: argparse.Namespace) -> int:
    from v4hal.checkpoint_files import CheckpointError
    from v4hal.conversion.onnx_export import OnnxExportError
    from v4hal.conversion.plan import ConversionError, NotEnoughSpace
    from v4hal.conversion.workers import WorkerDied
    from v4hal.model.loader import LoadError

    try:
        return {"run": _run, "verify": _verify, "onnx": _onnx}[args.convert_command](args)
    except (CheckpointError, ConversionError, OnnxExportError, LoadError, ValueError, OSError, MemoryError, WorkerDied) as exc:
        message = str(exc) or type(exc).__name__  # MemoryError() says nothing itself
        if isinstance(exc, (NotEnoughSpace, MemoryError)) or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return error("convert", message, NO_RESOURCES)
        # onnxruntime disagreeing with our model is a check that found a failure
        return error("convert", message, CHECK_FAILED if isinstance(exc, OnnxExportError) else BAD_INPUT)


def _run(args) -> int:
    from v4hal.conversion import plan as planning
    from v4hal.conversion.formats import Options

    if args.to in ("mindspore", "hf"):
        from v4hal.conversion import mindspore as msconv

        if args.mp != 1:
            raise ValueError("--mp reshards safetensors targets; convert to MindSpore after resharding")
        if args.engram_tables != "keep":
            raise ValueError("--engram-tables re-encodes in safetensors targets; convert to MindSpore after")

        p = msconv.plan(args.source, args.to, args.ms_format, args.ms_names)
    else:
        from v4hal.conversion.io import Source

        opts = Options(target=args.to, scale_fmt=args.scale_fmt, scale_name=args.scale_name, keep=args.keep,
                       mp=args.mp, n_experts=args.n_experts, engram_tables=args.engram_tables)
        p = planning.Plan(Source(args.source), opts)
    if args.dry_run:
        for line in p.describe():
            print(line)
        need, free = p.output_bytes(), planning.free_bytes(args.dest)
        print(f"total: {need / 1e9:.3f} GB of shards from {sum(p.source.files.values()) / 1e9:.3f} GB of input; "
              f"{free / 1e9:.1f} GB free at the destination" + ("" if need <= free else " (NOT ENOUGH)"))
        from v4hal.conversion import kernels

        print(f"FP8 decode: {kernels.describe()}")
        return OK
    p.fsync, p.verify_source = not args.no_fsync, args.verify_source
    manifest = planning.run(p, args.dest, progress=not args.no_progress, restart=args.restart, overwrite=args.overwrite,
                            n_workers=args.workers)
    print(f"wrote {len(manifest['outputs'])} files to {args.dest}; manifest: {args.dest}/{planning.MANIFEST}")
    return OK


def _onnx(args) -> int:
    from v4hal.conversion import onnx_export

    return onnx_export.main(args)


def _verify(args) -> int:
    from v4hal.conversion.verify import verify

    problems = verify(args.dest, args.source, check_hash=not args.no_hash)
    for p in problems:
        print(p)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return OK if not problems else CHECK_FAILED

