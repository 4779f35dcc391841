"""The cuda backend's Triton kernels compile for the GPUs they are meant for (sm80 / sm89 / sm90)
at the real model shapes, on this machine without a GPU (triton ships ptxas), and fit the shared
memory a block gets there. This is what the interpreter tests (tests/test_cuda_triton.py) cannot
see: a construct the GPU compiler rejects (FP8 tensor-core products, the products' precision
modes, layouts) or a tile too large for an SM. Whether the kernels are fast stays the device
check's question."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from triton_compile_util import SHARED_LIMIT

if platform.system() == "Linux" and platform.machine() == "x86_64":
    import triton  # noqa: F401  (pinned in the test extra for this platform: a missing one is a failure)
else:
    pytest.importorskip("triton", reason="triton wheels exist for Linux x86_64 only")

UTIL = Path(__file__).with_name("triton_compile_util.py")


@pytest.fixture(scope="module")
def compiled():
    # Its own process: TRITON_INTERPRET (which another test file sets) would make the kernels
    # interpreted functions, which do not compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9's default, stated (it warns when unset)
    run = subprocess.run([sys.executable, str(UTIL)], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_every_kernel_compiles_for_its_targets(compiled):
    seen = {(r["kernel"], r["arch"]) for r in compiled}
    assert seen == {("_sparse_attention", 80), ("_sparse_attention", 90), ("_indexer_scores", 80),
                    ("_indexer_scores", 90), ("_hc_pre", 80), ("_hc_pre", 90), ("_fp8_block_scaled_mm", 89),
                    ("_fp8_block_scaled_mm", 90), ("_sparse_attention_fp8kv", 80), ("_sparse_attention_fp8kv", 90),
                    ("_indexer_scores_fp8kv", 80), ("_indexer_scores_fp8kv", 90)}
    assert all(r["cubin_bytes"] > 0 for r in compiled)
    for attention in ("_sparse_attention", "_sparse_attention_fp8kv"):
        splits = {r["constexprs"]["SPLIT"] for r in compiled if r["kernel"] == attention}
        precisions = {r["constexprs"]["PRECISION"] for r in compiled if r["kernel"] == attention}
        assert splits == {True, False} and precisions == {"tf32", "ieee"}, attention


def test_every_configuration_fits_a_blocks_shared_memory(compiled):
    over = [r for r in compiled if r["shared"] > SHARED_LIMIT[r["arch"]]]
    assert not over, over
