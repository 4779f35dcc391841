"""The `v4hal` command. Each subcommand lives in the module that owns its work and exposes
`add_arguments(parser)` and `main(args) -> exit code`; modules are imported only when their
subcommand runs, so `v4hal info` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": ("v4hal.backends.info", "per op: the chosen backend and why each other one was not; versions, devices"),
    "parity": ("v4hal.bench.parity", "compare every backend with the float64 cpu reference"),
    "bench": ("v4hal.bench.speed", "time ops against same-run peers; JSON, Markdown and a plot"),
    "generate": ("v4hal.model.generate", "prefill + decode a DeepSeek checkpoint (or the tiny preset with random weights)"),
    "plan": ("v4hal.model.plan", "weight, KV-cache and activation memory per device for a model, context and layout"),
    "convert": ("v4hal.conversion.cli", "convert checkpoints between formats and frameworks (streaming, resumable, verified)"),
    "dryrun": ("v4hal.backends.ascend.dryrun", "check the ascend backend without an NPU: schema check + Meta dry run against the pinned torch-npu"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="v4hal", description="DeepSeek-V4-class models on Ascend, NVIDIA and CPU")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(module=module)
        # Only the chosen subcommand's module is imported (help for all imports them all).
        if not argv or name == argv[0] or argv[0] in ("-h", "--help"):
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    from v4hal.backends.registry import BackendError
    from v4hal.ops._check import OpInputError

    try:
        return importlib.import_module(args.module).main(args)
    except (BackendError, OpInputError) as exc:
        print(f"v4hal {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
