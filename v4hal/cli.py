"""The `v4hal` command. Each subcommand lives in the module that owns its work and exposes
`add_arguments(parser)` and `main(args) -> exit code`; modules are imported only when their
subcommand runs, so `v4hal info` stays fast.

Exit codes: `v4hal.subcommand` (0, 1, 2, 3), and 141 when the reader closed the pipe. An exception
no command handles ends in a traceback and Python's exit code 1."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from v4hal.subcommand import error

COMMANDS = {
    "info": ("v4hal.backends.info", "per op: the chosen backend and why each other one was not; versions, devices"),
    "parity": ("v4hal.bench.parity", "compare every backend with the float64 cpu reference"),
    "bench": ("v4hal.bench.speed", "time ops against same-run peers; JSON, Markdown and a plot"),
    "generate": ("v4hal.model.generate", "prefill + decode a DeepSeek checkpoint (or a preset with random weights)"),
    "checkpoint": ("v4hal.model.save", "save a preset's random-weights model as a Hugging Face checkpoint"),
    "plan": ("v4hal.model.plan", "weight, KV-cache and activation memory per device for a model, context and layout"),
    "convert": ("v4hal.conversion.cli", "convert checkpoints between formats and frameworks (streaming, resumable, verified)"),
    "selfcheck": ("v4hal.bench.selfcheck", "the one device check: backends, parity, model logits, decode, speed vs peers in one folder"),
    "dryrun": ("v4hal.tools.ascend.dryrun", "check the ascend backend without an NPU: schema check + Meta dry run against the pinned torch-npu"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser with the subcommand named in `argv` (all of them for help) fully defined."""
    parser = argparse.ArgumentParser(prog="v4hal", description="DeepSeek-V4-class models on Ascend, NVIDIA and CPU",
                                     epilog="exit codes: 0 success, 1 a check found failures, 2 bad input or a "
                                            "refused request, 3 not enough memory or disk, 141 the reader closed "
                                            "the pipe (docs/cli.md)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(module=module)
        # Only the chosen subcommand's module is imported (help for all imports them all).
        if not argv or name == argv[0] or argv[0] in ("-h", "--help"):
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return code
    except BrokenPipeError:
        # The reader went away (`v4hal info | head`): Python's recipe, so the interpreter's own
        # flush at exit does not raise again; 141 = 128 + SIGPIPE, as a shell reports it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _run(argv: list[str]) -> int:
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:  # argparse: --help exits 0, a usage error exits 2
        return int(exc.code or 0)
    from v4hal.backends.registry import BackendError
    from v4hal.ops import OpInputError

    try:
        return importlib.import_module(args.module).main(args)
    except (BackendError, OpInputError) as exc:
        return error(args.command, str(exc))


if __name__ == "__main__":
    sys.exit(main())
