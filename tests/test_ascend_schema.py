"""Static conformance of the ascend backend against the pinned torch-npu wheel (schemas + docs).

The wheel is downloaded into the cache on first use (CI starts from nothing; about 44 MB)."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from v4hal.tools.ascend import schema, wheel

FIXTURE_BAD = '''
import torch
from v4hal.backends.ascend import npu


def wrong(x, w, s, ps, rows, src, idx):
    a = npu().npu_quant_matmul(x, w, s, pertoken_scale=ps)
    b = npu().npu_quant_matmul(x, w, s, pertokn_scale=ps, output_dtype=torch.bfloat16)
    c = npu().npu_quant_matmul(x, w, s, None, ps, output_dtype=torch.bfloat16)
    d = npu().npu_quant_matmul(x, w, s, pertoken_scale=ps, output_dtype=torch.float32)
    e = npu().npu_moe_finalize_routing(rows, None, None, None, s, src, expert_for_source_row=idx)
    f = npu().npu_sparse_flash_attention(x, x, x, idx, 0.1, sparse_block_size=64, layout_query="BNSD")
    g = npu().npu_rms_norm(x)
    h = npu().npu_not_an_op(x)
    i = npu().npu_dynamic_block_quant(x, dst_type=torch.float8_e4m3fn)
    j = npu().npu_dynamic_mx_quant(x, round_mode=3)
    return a, b, c, d, e, f, g, h, i, j


def unreachable(x, w):
    import torch_npu
    t = npu()
    return t.npu_rms_norm(x, w)
'''

FIXTURE_GOOD = '''
import torch
from v4hal.backends.ascend import npu


def right(x, w, s, ps, rows, src, idx, q, k, wt):
    y = npu().npu_quant_matmul(x, w, s, pertoken_scale=ps, output_dtype=torch.bfloat16)
    out = npu().npu_moe_finalize_routing(rows, None, None, None, s, src, idx, drop_pad_mode=0, k=8)
    q8, sc = npu().npu_dynamic_mx_quant(x, dst_type=npu().float8_e4m3fn, round_mode="rint", block_size=32)
    bq = npu().npu_dynamic_block_quant(x, dst_type=1, row_block_size=1, col_block_size=128)
    att = npu().npu_sparse_flash_attention(q, k, k, idx, 0.1, sparse_block_size=1, layout_query="TND",
                                           layout_kv="PA_BSND", sparse_mode=3)
    sel = npu().npu_lightning_indexer(q, k, wt, layout_query="BSND", layout_key="BSND", sparse_count=512)
    return y, out, q8, sc, bq, att, sel
'''


def findings_of(tmp_path: Path, source: str) -> list[schema.Finding]:
    path = tmp_path / "fixture.py"
    path.write_text(source)
    return schema.check([path])[1]


def messages(findings, line_text: str, source: str) -> list[str]:
    line = next(i for i, text in enumerate(source.splitlines(), 1) if line_text in text)
    return [f.message for f in findings if f.line == line]


def test_wheel_is_the_pinned_one():
    path = wheel.wheel_path()
    assert path.name == wheel.WHEEL_FILE and wheel._sha256(path) == wheel.WHEEL_SHA256
    assert wheel.version_matrix()["CANN"] == "9.2.0" and wheel.TORCH_NPU_VERSION == "2.13.0"
    assert "__version__ = '2.13.0'" in wheel.read("torch_npu/version.py")


def test_cache_dir_follows_v4hal_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("V4HAL_CACHE", str(tmp_path))
    assert wheel.cache_dir() == tmp_path / "torch_npu"


def test_schemas_parse_with_the_2_13_signatures():
    ops = schema.schemas()
    assert len(ops) > 300
    qmm = ops["npu_quant_matmul"][0]
    assert [p.name for p in qmm.positional] == ["x1", "x2", "scale"]
    assert qmm.param("output_dtype").kwarg_only and qmm.param("output_dtype").default is None
    fin = ops["npu_moe_finalize_routing"][0]
    spot = fin.param("export_for_source_row")
    assert not spot.kwarg_only and not spot.has_default and spot.optional
    # 2.13.0 made sparse_block_size keyword-only (the docs still show it positional).
    assert schema.schemas()["npu_sparse_flash_attention"][0].param("sparse_block_size").kwarg_only
    assert len(ops["npu_grouped_matmul"]) == 2  # the default and the .List overload


def test_docs_give_layouts_modes_dtypes_and_chips():
    assert schema.allowed_values("npu_sparse_flash_attention", "layout_kv") == {"BSND", "TND", "PA_BSND"}
    assert schema.allowed_values("npu_sparse_flash_attention", "layout_query") == {"BSND", "TND"}
    assert schema.allowed_values("npu_lightning_indexer", "sparse_mode") == {0, 3}
    assert schema.allowed_values("npu_dynamic_block_quant", "col_block_size") == {128}
    assert schema.allowed_values("npu_dynamic_mx_quant", "round_mode") == {"rint", "floor", "round"}
    codes = schema.npu_dtype_codes()
    assert schema.allowed_values("npu_quant_matmul", "output_dtype") == {
        codes["torch.int8"], codes["torch.float16"], codes["torch.bfloat16"], codes["torch.int32"]}
    assert codes["torch_npu.float4_e2m1fn_x2"] == 296 and codes["torch_npu.float8_e4m3fn"] == 292
    assert schema.allowed_values("npu_moe_gating_top_k", "k") is None  # a range, not a list
    assert schema.doc_chips("npu_mhc_pre") == {"A5"}
    assert schema.doc_chips("npu_dynamic_block_quant") == {"A2", "A3"}
    import torch

    assert schema.tensor_dtypes("npu_mhc_post", "h_res") == {torch.float32}
    assert schema.tensor_dtypes("npu_quant_matmul", "x1") == {torch.int8, torch.int32}


def test_every_call_site_of_the_real_backend_passes():
    sites, findings = schema.check()
    assert [str(f) for f in findings] == []
    checked = {Path(s.path).name for s in sites}
    assert sites and checked <= {p.name for p in schema.backend_files()}
    # Every backend module that mentions npu() is among those with checked call sites.
    for path in schema.backend_files():
        if "npu()." in path.read_text():
            assert path.name in checked


def test_good_fixture_has_no_findings(tmp_path):
    assert [str(f) for f in findings_of(tmp_path, FIXTURE_GOOD)] == []


@pytest.mark.parametrize("line_text, expected", [
    ("a = npu().npu_quant_matmul", "returns int8 unless output_dtype is given"),
    ("pertokn_scale=ps", "unknown keyword 'pertokn_scale' (did you mean 'pertoken_scale'?)"),
    ("s, None, ps,", "positional argument #4 would fill keyword-only parameter 'offset'"),
    ("output_dtype=torch.float32", "'output_dtype'=torch.float32 is not a value the docs allow"),
    ("expert_for_source_row=idx", "the schema spells it export_for_source_row"),
    ("expert_for_source_row=idx", "required argument 'export_for_source_row'"),
    ('layout_query="BNSD"', "'layout_query'=BNSD is not a value the docs allow (BSND, TND)"),
    ("npu().npu_rms_norm(x)", "required argument 'gamma' (Tensor) is missing"),
    ("npu_not_an_op", "no such op in torch-npu 2.13.0"),
    ("dst_type=torch.float8_e4m3fn", "'dst_type'=torch.float8_e4m3fn is not a value the docs allow"),
    ("round_mode=3", "'round_mode' expects str, got the literal 3"),
    ("import torch_npu", "import torch_npu directly"),
    ("t = npu()", "npu() used other than as npu().npu_<name>(...)"),
])
def test_wrong_calls_are_caught(tmp_path, line_text, expected):
    found = messages(findings_of(tmp_path, FIXTURE_BAD), line_text, FIXTURE_BAD)
    assert any(expected in m for m in found), found


def test_each_wrong_line_is_caught_and_nothing_else(tmp_path):
    findings = findings_of(tmp_path, FIXTURE_BAD)
    lines = FIXTURE_BAD.splitlines()
    flagged = {f.line for f in findings}
    for i, text in enumerate(lines, 1):
        wrong = ("npu()." in text and "return" not in text) or "import torch_npu" in text or "t = npu()" in text
        assert (i in flagged) == wrong, (i, text)


def _call_source(sch: schema.Schema, drop: str | None = None) -> str:
    """A call of `sch` with every required argument spelled as a variable (positional ones
    positionally), optionally leaving one out."""
    args = [p.name for p in sch.positional if not p.has_default and p.name != drop]
    kwargs = [f"{p.name}={p.name}" for p in sch.params if p.kwarg_only and not p.has_default and p.name != drop]
    kwargs += [f"{k}=torch.bfloat16" for k, _ in [schema.REQUIRED_BY_DOCS.get(sch.name, (None, None))] if k]
    return f"import torch\nfrom v4hal.backends.ascend import npu\nnpu().{sch.name}({', '.join(args + kwargs)})\n"


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(n for n, s in schema.schemas().items() if n.startswith("npu_") and len(s) == 1)))
def test_schema_built_calls_pass_and_missing_arguments_are_caught(tmp_path_factory, name):
    sch = schema.schemas()[name][0]
    path = tmp_path_factory.mktemp("calls") / "call.py"
    path.write_text(_call_source(sch))
    assert [str(f) for f in schema.check([path])[1]] == []
    required = [p.name for p in sch.params if not p.has_default]
    if required:
        path.write_text(_call_source(sch, drop=required[-1]))
        found = [f.message for f in schema.check([path])[1]]
        assert any(f"required argument '{required[-1]}'" in m for m in found), found
