"""Quantized checkpoints, whole model, through the ascend backend on the vendor-op emulator, in bf16
(the dtype the quantized kernels write), against the dequantized float model on the cpu reference:

- int8 W8A8 (msmodelslim layout, `v4hal convert run --to w8a8`) on A2 / A3: `npu_dynamic_quant` +
  `npu_quant_matmul` per linear, `npu_grouped_matmul` int8 experts.
- FP8 (128x128 e4m3 weights) on A5: `npu_quant_matmul` FP8 x FP8 with `group_sizes=[1,128,128]`
  and, with ue8m0 activation scales (V4's config), `npu_dynamic_mx_quant`; on A2 / A3 the same
  checkpoint takes the BF16-dequant path and no FP8 tensor reaches a vendor op (the emulator would
  refuse it).
- MXFP4 routed experts (V4) on A5 and A2: dequantized by table lookup, one BF16 matmul (no vendor
  GEMM takes them yet, see backends/ascend/quant.py); routing and combine are vendor ops.

Budgets are DeepGEMM's figure of merit `1 - 2<a,b>/(|a|^2+|b|^2)` against the float model holding
the dequantized weights, stated with what was measured here; a flipped glue decision (a scale read
the wrong way) breaks each one.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from v4hal.backends import ascend, registry
from v4hal.model.config import ModelArgs
from v4hal.model.loader import load_checkpoint
from v4hal.model.model import build
from v4hal.tools.ascend.emulator import Emulator

from ascend_util import Flipped, answer_npu_with
from convert_util import cli, save_hf
from test_model_loader import _quantize_dir
from test_model_loader_w8a8 import BUDGET as W8A8_BUDGET  # its derivation is there; measured here below
from test_model_loader_w8a8 import diff
from test_model_logits import make_pair

# FP8 weights and 1x128 FP8 activations: e4m3 keeps 3 mantissa bits (relative rounding up to 2^-4,
# rms ~2%), so one GEMM's diff is ~4e-4 and a dozen GEMMs in series plus the routing and indexer
# choices they flip reach a few 1e-3. Measured: 7.9e-4 (V4, ue8m0), 9.4e-4 / 2.7e-3 (V3 wide, A5 /
# A2-A3), 5.6e-3 / 4.6e-3 (V3.2, A5 / A2-A3); an activation scale off by one exponent: 0.29.
FP8_BUDGET = 1e-2
# MXFP4 experts dequantize exactly (the twin holds those values), so only bf16 compute separates
# the two: measured 3.0e-5.
FP4_BUDGET = 2e-4


def load(directory, dtype, keep=True):
    args = ModelArgs.from_json(directory)
    model = build(args, dtype)
    load_checkpoint(model, directory, args, keep_quantized=keep)
    return model


def token_ids(model) -> torch.Tensor:
    # 12 tokens: within the tiny V3.2's index_topk, so quantization noise cannot flip a selection
    return torch.randint(0, model.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, backend) -> torch.Tensor:
    with registry.forced(backend), torch.no_grad():
        return model(token_ids(model)).double()


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    """kind -> W8A8 dir, converted once per kind."""
    made = {}

    def get(kind):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"w8a8-{kind}")
            save_hf(kind, root / "bf16")
            assert cli("run", "--to", "w8a8", "--no-progress", root / "bf16", root / "w8a8") == 0
            made[kind] = root / "w8a8"
        return made[kind]

    return get


@pytest.mark.parametrize("chip", ["A2", "A3"])
@pytest.mark.parametrize("kind", ["v3", "v32", "v4"])
def test_w8a8_within_int8_budget_of_the_dequantized_model(emulate, w8a8, kind, chip):
    d = w8a8(kind)
    want = logits(load(d, torch.float32, keep=False), "cpu")
    emulate(chip)
    model = load(d, torch.bfloat16)
    got = logits(model, "ascend")
    assert diff(got, want) < W8A8_BUDGET, diff(got, want)  # measured 2.1e-5 (V3), 3.9e-5 (V4), 4.2e-4 (V3.2)
    # the emulated kernels accumulate in float32 and round once, as the cpu reference does
    assert diff(got, logits(model, "cpu")) < 1e-5
    calls = ascend.npu().calls
    assert calls["npu_quant_matmul"] >= 10 and calls["npu_dynamic_quant"] > calls["npu_quant_matmul"]
    assert calls["npu_grouped_matmul"] > 0


def _weight_scale_reversed(fn, x1, x2, scale, **kw):
    return fn(x1, x2, scale.flip(0).contiguous(), **kw)


def test_w8a8_budget_catches_a_weight_scale_read_backwards(emulate, monkeypatch, w8a8):
    d = w8a8("v3")
    want = logits(load(d, torch.float32, keep=False), "cpu")
    emulate("A3")
    answer_npu_with(monkeypatch, Flipped(Emulator("A3"), "npu_quant_matmul", _weight_scale_reversed))
    assert diff(logits(load(d, torch.bfloat16), "ascend"), want) > W8A8_BUDGET  # measured 8.2e-3


FP8_CASES = {  # id -> (test_model_logits config, scale tensor suffix, activation scale format)
    "v4-ue8m0": ("v4-mixed", ".scale", "ue8m0"),
    "v32-fp32-scales": ("v32-groups-dsa", ".weight_scale_inv", "fp32"),
    "v3-wide-fp8-experts": ("v3-wide", ".weight_scale_inv", "fp32"),
}


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """(case id, fp4 experts?) -> (quantized dir, float twin dir holding the dequantized weights)."""
    made = {}

    def get(case, fp4=False):
        if (case, fp4) not in made:
            name, suffix, act_fmt = FP8_CASES[case]
            root = tmp_path_factory.mktemp(case)
            d, twin = root / "quantized", root / "twin"
            d.mkdir()
            twin.mkdir()
            make_pair(name, d)
            ref, _ = _quantize_dir(d, suffix, ue8m0=act_fmt == "ue8m0", fp4_experts=fp4)
            config = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**config, "quantization_config": {
                "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": act_fmt}}))
            (twin / "config.json").write_text(json.dumps(config))
            save_file({k: v.contiguous() for k, v in ref.items()}, str(twin / "model.safetensors"))
            made[case, fp4] = d, twin
        return made[case, fp4]

    return get


@pytest.mark.parametrize("chip", ["A2", "A3", "A5"])
@pytest.mark.parametrize("case", list(FP8_CASES))
def test_fp8_within_budget_of_the_dequantized_model(emulate, fp8, case, chip):
    d, twin = fp8(case)
    want = logits(load(twin, torch.float32), "cpu")
    emulate(chip)
    got = logits(load(d, torch.bfloat16), "ascend")
    assert diff(got, want) < FP8_BUDGET, diff(got, want)
    calls = ascend.npu().calls
    if chip == "A5":
        assert calls["npu_quant_matmul"] >= 10
        assert (calls["npu_dynamic_mx_quant"] > 0) == (FP8_CASES[case][2] == "ue8m0")
    else:  # no FP8 units: every FP8 GEMM is BF16 dequant + matmul, no vendor op sees FP8
        assert calls["npu_quant_matmul"] == calls["npu_dynamic_mx_quant"] == 0


def _activation_scale_doubled(fn, *a, **kw):
    y, codes = fn(*a, **kw)
    return y, codes + 1  # e8m0: one more in the exponent


def test_fp8_budget_catches_an_activation_scale_off_by_one_exponent(emulate, monkeypatch, fp8):
    d, twin = fp8("v4-ue8m0")
    want = logits(load(twin, torch.float32), "cpu")
    emulate("A5")
    answer_npu_with(monkeypatch, Flipped(Emulator("A5"), "npu_dynamic_mx_quant", _activation_scale_doubled))
    assert diff(logits(load(d, torch.bfloat16), "ascend"), want) > FP8_BUDGET


@pytest.mark.parametrize("chip", ["A2", "A5"])
def test_mxfp4_experts_within_budget_of_the_dequantized_model(emulate, fp8, chip):
    d, twin = fp8("v4-ue8m0", fp4=True)
    want = logits(load(twin, torch.float32), "cpu")
    emulate(chip)
    model = load(d, torch.bfloat16)
    assert any(p.dtype == torch.uint8 for n, p in model.state_dict().items() if ".experts." in n)
    got = logits(model, "ascend")
    assert diff(got, want) < FP4_BUDGET, diff(got, want)
    calls = ascend.npu().calls
    assert calls["npu_moe_init_routing_v2"] > 0 and calls["npu_moe_finalize_routing"] > 0
