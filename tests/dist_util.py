"""Launching v4hal under torchrun from a test: `torchrun(argv)` runs `python -m
torch.distributed.run --nproc-per-node N -m v4hal.cli argv` (gloo on the CPU, one thread per
rank), with a `prelude` first run in every rank (a patch the test needs) when given."""

import os
import socket
import subprocess
import sys

TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv: list[str], nproc: int = 2, prelude: str = "", folder=None) -> subprocess.CompletedProcess:
    """The finished launch (a test fails, never hangs, past TIMEOUT). `prelude`: Python source
    each rank runs before the CLI, written as a script into `folder`."""
    target = ["-m", "v4hal.cli"]
    if prelude:
        script = os.path.join(folder, "patched_cli.py")
        with open(script, "w") as f:
            f.write(f"import sys\n{prelude}\nfrom v4hal.cli import main\nsys.exit(main())\n")
        target = [script]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), *target, *argv]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=TIMEOUT)
