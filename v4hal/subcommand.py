"""What every subcommand module (`add_arguments(parser)`, `main(args) -> exit code`) shares: the exit
codes, `error()` and the `at_least` argument type. It sits below every layer, so model/,
conversion/ and bench/ modules that own a subcommand import it and never `v4hal.cli`, the
dispatcher above them all.

Exit codes (docs/cli.md): 0 success; 1 a check ran and found failures; 2 bad input or a refused
request (argparse's usage errors too); 3 not enough resources (memory, disk). `v4hal.cli` adds 141:
the reader closed the pipe."""

from __future__ import annotations

import argparse
import sys

OK, CHECK_FAILED, BAD_INPUT, NO_RESOURCES = 0, 1, 2, 3


def error(command: str, message: str, code: int = BAD_INPUT) -> int:
    """Print `v4hal COMMAND: error: MESSAGE` on stderr and return `code`, for `return error(...)`."""
    print(f"v4hal {command}: error: {message}", file=sys.stderr)
    return code


def at_least(minimum: int | float, kind=int):
    """An argparse `type` accepting numbers >= minimum, so `--batch 0` is a usage error naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} "
                                             f">= {minimum}, got {text!r}")
        return value
    return parse
