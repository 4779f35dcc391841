"""ONNX export of v4hal's model (`v4hal convert onnx`): onnx.checker, onnxruntime logits against our
model on inputs the trace never saw, refusal when they disagree, bad inputs."""

import json
import subprocess
import sys

import onnx
import onnxruntime as ort
import pytest
import torch
from convert_util import cli
from safetensors.torch import save_file

from v4hal import ops
from v4hal.backends import registry
from v4hal.conversion import onnx_export
from v4hal.model.moe import MoE

# docs/parity.md: assert_close per dtype, atol scaled by the reduction length (float32 logits after a
# few layers of 64-wide GEMMs); the exporter's own gate is tighter still (1e-4).
TOL = dict(rtol=1e-4, atol=1e-4)

# A small V3.2 (MLA + DSA, a dense first layer, sigmoid routing; no group-limited routing, which
# the tracer cannot record: see docs/conversion.md). 16 indexer heads: with very few,
# ReLU leaves tied zero scores and top-k may legitimately pick other entries in onnxruntime.
SMALL_V32 = dict(model_type="deepseek_v32", vocab_size=256, hidden_size=64, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=64,
                 moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                 scoring_func="sigmoid",
                 routed_scaling_factor=2.5, first_k_dense_replace=1, index_topk=8, index_n_heads=16,
                 index_head_dim=16, max_position_embeddings=4096, torch_dtype="float32")


def ort_logits(path, ids):
    # Our own onnxruntime call rather than the module's, so the test does not trust the code it tests.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy()})[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset exported for [2, 40] (40 tokens cross its window, both compression ratios
    and the indexer's top-4, so routing and selection really vary with the input)."""
    model, args = onnx_export.build_model(preset="tiny", seed=3)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    checks = onnx_export.export(model, args.vocab_size, path, seq_len=40, batch=2)
    return model, args, path, checks


def test_tiny_export_passes_checker_and_matches_on_a_fresh_input(tiny):
    model, args, path, checks = tiny
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids"]
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == [2, 40, args.vocab_size]
    assert len(checks) == 1 + onnx_export.FRESH_INPUTS and all(c.ok for c in checks)
    ids = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        ref = model(ids)
    got = ort_logits(path, ids)
    torch.testing.assert_close(got, ref, **TOL)
    # The input really changes the routing: experts chosen for the two batches differ from the trace's.
    assert not torch.equal(got, ort_logits(path, onnx_export.random_ids(args.vocab_size, 2, 40, 0)))


def test_decode_sized_export_does_not_freeze_the_fast_paths(tmp_path):
    """One sequence of 3 tokens is what cpu_fast's decode shortcuts (Python-float mHC, per-expert
    MoE, complex RoPE) take eagerly; under the tracer they must not, or the graph would hold the
    example's numbers (the exporter's own fresh-input check would then refuse to write it)."""
    model, args = onnx_export.build_model(preset="tiny", seed=4)
    path = tmp_path / "short.onnx"
    assert all(c.ok for c in onnx_export.export(model, args.vocab_size, path, seq_len=3, batch=1))
    ids = torch.randint(0, args.vocab_size, (1, 3), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        torch.testing.assert_close(ort_logits(path, ids), model(ids), **TOL)


def fresh_python(*args):
    """Run in a new interpreter, where no backend module is imported yet (the suite hides import
    order: an earlier test has usually imported them all)."""
    run = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_readme_command_exports_in_a_fresh_interpreter(tmp_path):
    """The README's command. Its first dispatches once imported backend modules inside the trace,
    and cpu_fast's import-time oneDNN probe broke the trace (a JIT internal assert)."""
    out = tmp_path / "tiny.onnx"
    stdout = fresh_python("-m", "v4hal.cli", "convert", "onnx", "--preset", "tiny", "--seq", 40, out)
    assert f"wrote {out}" in stdout and "onnx.checker ok" in stdout
    assert [d.dim_value for d in onnx.load(str(out)).graph.output[0].type.tensor_type.shape.dim] == [1, 40, 512]


def test_importing_cpu_fast_linear_inside_a_trace_records_nothing():
    """What an op's first dispatch does inside torch.jit.trace: the import must leave the graph as
    it was (no tensor work at import; cpu_fast's oneDNN probe runs at the first eager product)."""
    code = ("import torch\n"
            "def f(x):\n"
            "    import v4hal.backends.cpu_fast.basic\n"
            "    return x * 2\n"
            "graph = torch.jit.trace(f, (torch.ones(3),), check_trace=False).graph\n"
            "print(sorted(n.kind() for n in graph.nodes()))\n")
    assert fresh_python("-c", code).strip() == "['aten::mul', 'prim::Constant']"


def test_export_mode_imports_every_backend_module_before_the_trace():
    """Any module imported inside the trace could record its import-time tensor work (cpu_fast's
    quant tables do) into the graph, so the export mode imports them all first, even families
    the tiny model never dispatches to."""
    code = ("import sys\n"
            "from v4hal.conversion import onnx_export\n"
            "model, _ = onnx_export.build_model(preset='tiny')\n"
            "with onnx_export._export_mode(model):\n"
            "    print(sorted(m for m in sys.modules if m.startswith('v4hal.backends.cpu_fast.')))\n")
    families = sorted({spec.family for spec in registry.ops().values()})
    assert fresh_python("-c", code).strip() == str([f"v4hal.backends.cpu_fast.{family}" for family in families])


def test_gathered_experts_equal_the_model(tiny):
    """The exchange step a trace takes (gathers of each token's chosen experts) gives the model's
    own logits; the export mode leaves the layers as they were."""
    model, args, _, _ = tiny
    ids = onnx_export.random_ids(args.vocab_size, 1, 24, 77)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    with torch.no_grad():
        ref = model(ids)
        with onnx_export._export_mode(model):
            assert all(m.exchange is None for m in moes)
        try:
            for m in moes:
                m.exchange = ops.moe.GATHERED
            gathered = model(ids)
        finally:
            for m in moes:
                m.exchange = None
    torch.testing.assert_close(gathered, ref, **TOL)


def test_small_config_with_weights_through_the_cli(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(SMALL_V32))
    model, args = onnx_export.build_model(config=str(src / "config.json"), seed=5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src / "model.safetensors")
    out = tmp_path / "small.onnx"
    assert cli("onnx", "--config", src, "--weights", src, "--seq", 24, out) == 0
    ids = torch.randint(0, args.vocab_size, (1, 24), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref = model(ids)
    torch.testing.assert_close(ort_logits(out, ids), ref, **TOL)


def test_refuses_to_write_a_model_that_disagrees(tiny, tmp_path, monkeypatch):
    model, args, _, _ = tiny
    real = onnx_export.reference_logits
    # Our model "changes" after the trace: from the second comparison on (a fresh input) it differs.
    calls = []

    def drifting(m, ids):
        calls.append(1)
        return real(m, ids) + (0.01 if len(calls) > 1 else 0.0)

    monkeypatch.setattr(onnx_export, "reference_logits", drifting)
    out = tmp_path / "bad.onnx"
    with pytest.raises(onnx_export.OnnxExportError, match="fresh input 1: .*FAILS"):
        onnx_export.export(model, args.vocab_size, out, seq_len=8, fresh_inputs=1)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs(tiny, tmp_path, capsys):
    _, args, path, _ = tiny
    # The graph is fixed to its traced shape: onnxruntime rejects another sequence length.
    with pytest.raises(Exception, match="input_ids"):
        ort_logits(path, torch.zeros(2, 41, dtype=torch.int64))
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
        onnx_export.export(None, args.vocab_size, tmp_path / "x.onnx", seq_len=0)
    assert cli("onnx", "--preset", "nope", tmp_path / "x.onnx") == 2
    assert "preset" in capsys.readouterr().err
    assert cli("onnx", "--preset", "tiny", "--weights", tmp_path / "missing", tmp_path / "x.onnx") == 2
    assert not (tmp_path / "x.onnx").exists()
