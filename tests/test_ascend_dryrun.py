"""Meta dry run of the ascend backend against the pinned torch-npu wheel's schemas and Meta
kernels, per chip path (A2/A3 without FP8, A5 with FP8/MX), at the real model shapes."""

import pytest
import torch

from v4hal.backends import ascend, registry
from v4hal.tools.ascend import dryrun
from v4hal.bench.cases import parity_cases


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_vendor_namespace_and_meta_kernels_load():
    v = dryrun.vendor()
    assert not v.define_failed and len(v.defined) > 300
    for op in ("npu_quant_matmul", "npu_mhc_pre", "npu_sparse_flash_attention", "npu_moe_gating_top_k",
               "npu_grouped_matmul", "npu_rms_norm", "npu_dynamic_mx_quant"):
        assert op in v.meta
    # The vendor's overrides of aten Meta kernels are not installed into this process's torch.
    assert "aten::_convolution" in v.skipped_aten
    out = torch.nn.functional.conv2d(meta(1, 3, 8, 8, dtype=torch.float32), meta(4, 3, 3, 3, dtype=torch.float32))
    assert out.shape == (1, 4, 6, 6)


def test_install_switches_the_backend_and_restores_it():
    with dryrun.install("A3") as session:
        assert ascend.probe()[0] and ascend.device().type == "meta" and ascend.chip() == "A3"
        assert ascend.npu() is session.shim and registry.probe("ascend")[0]
        assert ascend.npu().float4_e2m1fn_x2 == 296
        with pytest.raises(AttributeError, match="no op 'npu_not_an_op'"):
            ascend.npu().npu_not_an_op
    assert ascend._dry_run is None
    assert not registry.probe("ascend")[0]  # no torch_npu on this machine


def test_soc_version_follows_the_chip():
    # npu_mla_prolog's Meta kernel refuses SoC versions below Ascend950 (260): the chip reaches it.
    with dryrun.install("A5"):
        assert dryrun._runtime_stubs(dryrun.vendor())["torch_npu.npu._backends"].get_soc_version() == 260
    with dryrun.install("A2"):
        assert dryrun._runtime_stubs(dryrun.vendor())["torch_npu.npu._backends"].get_soc_version() == 223


def test_wrong_calls_through_the_shim_are_caught():
    x8, w8 = meta(4, 512, dtype=torch.int8), meta(512, 256, dtype=torch.int8)
    scale, ps = meta(256, dtype=torch.float32), meta(4, dtype=torch.float32)
    with dryrun.install("A2") as session:
        npu = ascend.npu()
        # misspelled keyword: the schema binding refuses it
        with pytest.raises(dryrun.VendorRejected, match="pertokn_scale"):
            npu.npu_quant_matmul(x8, w8, scale, pertokn_scale=ps, output_dtype=torch.bfloat16)
        # a layout the vendor's Meta kernel does not support
        with pytest.raises(dryrun.VendorRejected, match="layout"):
            npu.npu_sparse_flash_attention(meta(1, 1, 64, 512), meta(1, 100, 1, 512), meta(1, 100, 1, 512),
                                           meta(1, 1, 1, 64, dtype=torch.int32), 0.1, layout_query="BNSD")
        # missing output_dtype: the kernel returns int8
        assert npu.npu_quant_matmul(x8, w8, scale, pertoken_scale=ps).dtype == torch.int8
        # wrong dtype (float32 activations for the int8 kernel) and FP8 on a chip without FP8
        npu.npu_quant_matmul(meta(4, 512, dtype=torch.float32), w8, scale, pertoken_scale=ps,
                             output_dtype=torch.bfloat16)
        npu.npu_quant_matmul(meta(4, 512, dtype=torch.float8_e4m3fn), meta(512, 256, dtype=torch.float8_e4m3fn),
                             scale, pertoken_scale=ps, output_dtype=torch.bfloat16)
        # a tensor left on the host
        npu.npu_rms_norm(torch.zeros(4, 64, dtype=torch.bfloat16), meta(64), epsilon=1e-6)
    problems = [p for c in session.calls for p in c.problems]
    assert any("x1 of npu_quant_matmul takes int32, int8, got float32[4, 512]" in p for p in problems), problems
    assert any("float8_e4m3fn[4, 512] reaches npu_quant_matmul on A2, which has no FP8 units" in p for p in problems)
    assert any("bfloat16[4, 64]@cpu reaches npu_rms_norm but is not on the device" in p for p in problems)


def _fp8_case():
    return next(c for c in parity_cases(select="fp8_matmul/v4-pro/q_a"))


def test_a_backend_bug_fails_the_case(monkeypatch):
    from v4hal.backends.ascend import quant

    case = _fp8_case()
    assert dryrun.run_case(case, "A5").status == "pass"

    def forgets_output_dtype(a, a_scale, b, b_scale, out_dtype):
        k = a.shape[-1]
        return ascend.npu().npu_quant_matmul(a.reshape(-1, k), b.t(), b_scale.float().t(),
                                             pertoken_scale=a_scale.reshape(-1, a_scale.shape[-1]).float(),
                                             group_sizes=[1, 128, 128])

    monkeypatch.setattr(quant, "fp8_matmul", forgets_output_dtype)
    r = dryrun.run_case(case, "A5")
    assert r.status == "fail" and "int8" in r.note and "the reference gives torch.bfloat16" in r.note

    def misspells(a, a_scale, b, b_scale, out_dtype):
        return ascend.npu().npu_quant_matmul(a, b.t(), b_scale.t(), pertokn_scale=a_scale, output_dtype=out_dtype)

    monkeypatch.setattr(quant, "fp8_matmul", misspells)
    r = dryrun.run_case(case, "A5")
    assert r.status == "fail" and r.note.startswith("vendor Meta kernel: npu_quant_matmul rejected")

    def fp8_on_a2(a, a_scale, b, b_scale, out_dtype):
        return forgets_output_dtype(a, a_scale, b, b_scale, out_dtype).to(out_dtype)

    monkeypatch.setattr(quant, "fp8_matmul", fp8_on_a2)
    r = dryrun.run_case(case, "A2")
    assert r.status == "fail" and "which has no FP8 units" in r.note


@pytest.fixture(scope="module")
def all_results() -> list[dryrun.Result]:
    """Every parity case (and gap case) on every chip, once for the module."""
    return dryrun.run_cases(dryrun.ascend.CHIPS)


@pytest.mark.parametrize("chip", ["A2", "A3", "A5"])
def test_every_ascend_op_passes_the_dry_run(all_results, chip):
    results = [r for r in all_results if r.chip == chip]
    failed = [f"{r.case}: {r.note}" for r in results if r.status == "fail"]
    assert failed == []
    checked = {r.op for r in results if r.status == "pass"}
    assert {"fp8_matmul", "hc_pre", "sparse_attention", "rms_norm", "moe_route", "grouped_matmul"} <= checked
    # Real model shapes are among the passing cases, not just the small ones.
    assert {"v4-flash", "v4-pro", "v3.2"} <= {r.case.split("/")[1] for r in results if r.status == "pass"}
    used = {c.op for r in results for c in r.calls}
    # Each chip's path reaches the vendor kernels it is meant to.
    assert {"npu_quant_matmul", "npu_rms_norm", "npu_sparse_flash_attention", "npu_moe_gating_top_k"} <= used
    if chip == "A5":
        assert {"npu_mhc_pre", "npu_mhc_post", "npu_mhc_sinkhorn"} <= used
        assert any(c.op == "npu_quant_matmul" and "float8_e4m3fn" in c.args[0] for r in results for c in r.calls)
    else:
        fp8 = [c.signature() for r in results for c in r.calls if "float8" in c.signature()]
        assert fp8 == []


@pytest.mark.parametrize("chip", ["A2", "A3", "A5"])
def test_quantized_expert_gemms_read_no_values(all_results, chip):
    """FP8 / MXFP4 experts go through npu_grouped_matmul on Meta tensors to the end: no value read
    (on an NPU a host sync per MoE call), at the real shapes too."""
    cases = [r for r in all_results if r.chip == chip and r.op == "grouped_matmul"
             and any(f in r.case for f in ("fp8", "fp4"))]
    assert len(cases) >= 7
    for r in cases:
        assert r.status != "fail" and "npu_grouped_matmul" in r.vendor_ops, (r.case, r.note)
        assert not any("reads tensor values" in w for w in r.warnings), (r.case, r.warnings)


@pytest.mark.parametrize("chip", ["A2", "A5"])
@pytest.mark.parametrize("name", ["tiny-v4", "tiny-v32"])
def test_model_forward_vendor_calls_pass(name, chip):
    r = dryrun.run_model(name, chip)
    assert r.status != "fail", r.note
    used = set(r.vendor_ops)
    assert {"npu_rms_norm", "npu_moe_init_routing_v2"} <= used
    if name == "tiny-v4" and chip == "A5":
        assert {"npu_mhc_pre", "npu_mhc_post"} <= used
    if name == "tiny-v32":
        assert {"npu_lightning_indexer", "npu_sparse_flash_attention"} <= used


@pytest.mark.parametrize("chip", ["A2", "A3", "A5"])
@pytest.mark.parametrize("name", ["v4-flash", "v4-pro", "v3.2"])
def test_real_model_forward_passes_on_meta(name, chip):
    """The whole forward at the real preset's shapes, on Meta tensors: every vendor call accepted
    and no value read on the way (a value read would be a host sync on an NPU)."""
    r = dryrun.run_model(name, chip)
    assert r.status == "pass", r.note
    used = set(r.vendor_ops)
    assert {"npu_rms_norm", "npu_moe_gating_top_k", "npu_grouped_matmul", "npu_sparse_flash_attention"} <= used
    assert ("npu_mhc_pre" in used) == (chip == "A5" and name != "v3.2")


def test_report_lists_every_contract_and_the_version_matrix():
    from v4hal.tools.ascend import schema

    results = dryrun.run_cases(("A2", "A5"), select="hc_post")
    sites, findings = schema.check()
    text = dryrun.format_markdown(results, findings, sites, "v4hal dryrun --op hc_post")
    assert "| 2.13.0 | 2.13.0 | 26.2.0 (`v2.13.0-26.2.0`) | 9.2.0 |" in text
    for op in registry.ops():
        assert f"| `{op}` |" in text
    row = next(line for line in text.splitlines() if line.startswith("| `hc_post` |"))
    assert "torch ops on the NPU" in row.split("|")[3] and "`npu_mhc_post`" in row.split("|")[4]


def test_report_numerics_column_comes_from_emulated_parity_runs(emulate, tmp_path):
    import json

    from v4hal.bench import parity
    from v4hal.tools.ascend.numerics import NumericsError, load

    files = []
    for chip in ("A2", "A5"):
        emulate(chip)
        rows = [r for c in parity_cases(quick=True, select="hc_post") for r in parity.run_case(c, ["ascend"])]
        if chip == "A5":  # one failure, as a broken glue decision would leave it
            rows[0] = {**rows[0], "status": "fail", "note": "out: cosine 0.5"}
        files.append(tmp_path / f"{chip}.json")
        files[-1].write_text(json.dumps({"rows": rows}))
    results = dryrun.run_cases(("A2", "A5"), select="hc_post")
    text = dryrun.format_markdown(results, [], [], "v4hal dryrun --op hc_post", load(files))
    row = next(line for line in text.splitlines() if line.startswith("| `hc_post` |"))
    n = len(parity_cases(select="hc_post"))
    assert row.split("|")[5].strip().startswith(f"A2: pass {len(rows)}/{len(rows)} ({n - len(rows)} not run); "
                                                f"A5: pass {len(rows) - 1}/{len(rows)} **FAILS** ")
    assert "out: cosine 0.5" in row and "| numerics (emulated) |" in text
    cpu_rows = tmp_path / "cpu.json"
    cpu_rows.write_text(json.dumps({"rows": [{**rows[0], "backend": "cpu_fast"}]}))
    with pytest.raises(NumericsError, match="one emulated ascend chip"):
        load([cpu_rows])


def test_speed_cases_run_on_the_device_they_are_built_for():
    results = dryrun.run_speed_cases(("A2", "A5"), select="fp8_matmul/M8-N4096")
    assert [r.status for r in results] == ["pass", "pass"]
    a2, a5 = results
    assert a2.vendor_ops == [] and a5.vendor_ops == ["npu_quant_matmul"]


@pytest.mark.parametrize("compiled", [False, True])
def test_model_decode_case_builds_on_meta_without_running_its_transformers_peer(compiled):
    """The decode case fills a cache before timing; on meta it fills only ours (transformers'
    float32 grouped-GEMM experts have no meta kernel) and the step itself reaches the vendor ops.
    The compiled case runs its fixed-shape step uncompiled there."""
    from v4hal.bench.cases import SpeedCase
    from v4hal.bench.cases_model import decode

    case = SpeedCase("model_decode", "bench-v4/300-context", decode(300, compiled=compiled, chunk=128))
    result = dryrun.run_speed_case(case, "A2")
    assert result.status == "pass", result.note
    assert "npu_moe_gating_top_k" in result.vendor_ops
