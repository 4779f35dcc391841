"""The pinned torch-npu wheel: the ground truth for every `npu_*` call, readable without CANN.

The wheel on PyPI carries the op schemas (`csrc/aten/npu_native_functions_by_codegen.yaml`), the
docs (`_op_plugin_docs.py`) and the Meta (shape-inference) implementations
(`op_plugin/meta/_meta_registrations.py`). Importing `torch_npu` needs CANN, so these files are
read straight out of the zip. The wheel is fetched once with `pip download --no-deps` into
`$V4HAL_CACHE/torch_npu/` (default `~/.cache/v4hal/torch_npu/`) and checked against its sha256.

Version matrix we target:
- torch-npu 2.13.0, built from the branch `v2.13.0-26.2.0` (TorchNPU release 26.2.0; the wheel's
  README names the branch), requires torch 2.13.0 (`Requires-Dist: torch==2.13.0.*`).
- CANN 9.2.0: TorchNPU's COMPATIBILITY table pairs release 26.0.0 with CANN 9.0.0 and 26.1.0 with
  CANN 9.1.0; 26.2.0 follows as CANN 9.2.0, and the wheel's own Meta code gates features on
  `get_cann_version() >= "9.2.0"` (its README table stops at CANN 8.5.0).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path

TORCH_NPU_VERSION = "2.13.0"
TORCH_VERSION = "2.13.0"
TORCH_NPU_RELEASE = "26.2.0"
TORCH_NPU_BRANCH = f"v{TORCH_NPU_VERSION}-{TORCH_NPU_RELEASE}"
CANN_VERSION = "9.2.0"
# The Python parts are identical in every platform build; one build is pinned so the download is
# reproducible on any machine (pip fetches it for a foreign platform with --only-binary).
WHEEL_FILE = f"torch_npu-{TORCH_NPU_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl"
WHEEL_SHA256 = "0deb809cf447d3fce636ccfdc9c9f874950f1fe76f18f4aaab31e2d345f7dac0"

SCHEMA_MEMBER = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
DOCS_MEMBER = "torch_npu/_op_plugin_docs.py"
META_MEMBER = "torch_npu/op_plugin/meta/_meta_registrations.py"


class WheelError(RuntimeError):
    """The pinned wheel could not be fetched or does not match its pin."""


def cache_dir() -> Path:
    root = os.environ.get("V4HAL_CACHE") or Path.home() / ".cache" / "v4hal"
    return Path(root) / "torch_npu"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(dest: Path) -> Path:
    """`pip download` the pinned build into `dest` (about 44 MB); returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"torch-npu=={TORCH_NPU_VERSION}", "--no-deps",
           "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
           "--platform", "manylinux_2_28_x86_64", "--dest", str(dest), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / WHEEL_FILE
    if done.returncode != 0 or not path.exists():
        raise WheelError(f"could not download torch-npu {TORCH_NPU_VERSION} ({' '.join(cmd)}): "
                         f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return path


def wheel_path() -> Path:
    """The cached pinned wheel, downloaded first if missing; sha256-checked."""
    path = cache_dir() / WHEEL_FILE
    if not path.exists():
        download(path.parent)
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        raise WheelError(f"{path}: sha256 {digest} does not match the pinned {WHEEL_SHA256}; "
                         f"delete it to download again")
    return path


@lru_cache(maxsize=None)
def read(member: str) -> str:
    """The text of one file inside the pinned wheel."""
    with zipfile.ZipFile(wheel_path()) as z:
        return z.read(member).decode("utf-8")


def schema_yaml() -> str:
    return read(SCHEMA_MEMBER)


def docs_source() -> str:
    return read(DOCS_MEMBER)


def meta_source() -> str:
    return read(META_MEMBER)


def version_matrix() -> dict[str, str]:
    return {"torch": TORCH_VERSION, "torch-npu": TORCH_NPU_VERSION, "TorchNPU release": TORCH_NPU_RELEASE,
            "branch": TORCH_NPU_BRANCH, "CANN": CANN_VERSION, "wheel": WHEEL_FILE, "sha256": WHEEL_SHA256}
