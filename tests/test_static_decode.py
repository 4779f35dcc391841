"""Fixed-shape decode (`model.static.StaticDecoder`): every step against transformers and against
the eager cache, from prefills that end before, on and after window and compression boundaries;
the bad-input errors. The compiled step's tests are at the end."""

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from compile_util import data_dependent
from test_model_logits import CONFIGS, TOL, make_pair
from v4hal.bench.cases_model import TINY_V32
from v4hal.cli import main as cli
from v4hal.model.config import preset
from v4hal.model.generate import Sampling, generate
from v4hal.model.model import build
from v4hal.model.static import StaticDecoder

V4_TINY = preset("tiny")  # window 8; CSA ratio 4, index_topk 4; HCA ratio 8
EAGER_TWINS = {"v4-tiny": V4_TINY, "v32": TINY_V32, "v3": dataclasses.replace(TINY_V32, model_type="deepseek_v3")}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_static_step_matches_transformers(name, tmp_path):
    hf, ours = make_pair(name, tmp_path)
    ids = torch.randint(0, ours.args.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    prompt = 13
    with torch.no_grad():
        cache, pkv = ours.new_cache(), DynamicCache(config=hf.config)
        ours(ids[:, :prompt], cache=cache)
        hf(ids[:, :prompt], past_key_values=pkv, use_cache=True)
        decoder = StaticDecoder(ours, cache, capacity=ids.shape[1], compile=False)
        for i in range(prompt, ids.shape[1]):
            step = ids[:, i:i + 1]
            torch.testing.assert_close(decoder(step), hf(step, past_key_values=pkv, use_cache=True).logits,
                                       **TOL, msg=lambda m: f"static decode step at position {i}: {m}")
    assert decoder.length == ids.shape[1]


def _eager_and_static(args, prompt: int, total: int, compile: bool = False, dtype=torch.float64):
    """(eager logits, static logits) `[steps, B, vocab]` decoding tokens prompt..total-1."""
    model = build(args, dtype=dtype).init_random(0)
    ids = torch.randint(0, args.vocab_size, (2, total), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :prompt], cache=cache, last_only=True)
        decoder = StaticDecoder(model, cache, capacity=total, compile=compile)
        eager, static = [], []
        for i in range(prompt, total):
            eager.append(model(ids[:, i:i + 1], cache=cache)[:, 0])
            static.append(decoder(ids[:, i:i + 1])[:, 0])
    return torch.stack(eager), torch.stack(static)


# Prefills ending inside the first window, right before / on a CSA window, on an HCA window, and
# past the sliding window (the ring has wrapped).
@pytest.mark.parametrize("prompt", [1, 3, 4, 8, 11])
@pytest.mark.parametrize("name", list(EAGER_TWINS))
def test_static_steps_equal_eager_steps_in_float64(name, prompt):
    eager, static = _eager_and_static(EAGER_TWINS[name], prompt, total=30)
    torch.testing.assert_close(static, eager, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(EAGER_TWINS))
def test_static_steps_equal_eager_steps_in_bfloat16(name):
    # bf16 buffers: the compressor windows, the biased gates and the -inf start keep the model dtype.
    eager, static = _eager_and_static(EAGER_TWINS[name], prompt=6, total=20, dtype=torch.bfloat16)
    torch.testing.assert_close(static.float(), eager.float(), rtol=1.6e-2, atol=1e-2)


def test_indexer_keeps_fewer_entries_than_the_static_slots():
    # 30 tokens / ratio 4 = 7 closed windows against index_topk 2: the picks must be the eager ones,
    # among written slots only.
    args = dataclasses.replace(V4_TINY, index_topk=2)
    eager, static = _eager_and_static(args, prompt=5, total=30)
    torch.testing.assert_close(static, eager, rtol=1e-12, atol=1e-12)


def test_generate_with_compile_flag_gives_the_eager_tokens(monkeypatch):
    # The flag's wiring, with the step left eager (the compiled step has its own tests below).
    import v4hal.model.static as static

    monkeypatch.setattr(static, "compiled_step", lambda: static._step)
    model = build(V4_TINY).init_random(0)
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6]]
    eager = generate(model, prompts, 9, Sampling(temperature=0.0))
    fixed = generate(model, prompts, 9, Sampling(temperature=0.0), compile=True)
    assert fixed.tokens == eager.tokens
    assert fixed.decode_steps == eager.decode_steps - len(prompts)  # each group's first step compiles
    assert fixed.compile_seconds > 0


def _decoder(prompt: int = 5, capacity: int = 8) -> StaticDecoder:
    model = build(V4_TINY).init_random(0)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.arange(prompt).view(1, prompt), cache=cache)
    return StaticDecoder(model, cache, capacity=capacity, compile=False)


def test_bad_input_is_named():
    model = build(V4_TINY).init_random(0)
    with pytest.raises(ValueError, match="cache is empty"):
        StaticDecoder(model, model.new_cache(), capacity=8, compile=False)
    with pytest.raises(ValueError, match="capacity must exceed the 5 cached"):
        _decoder(prompt=5, capacity=5)
    decoder = _decoder()
    with pytest.raises(ValueError, match=r"ids must be \[1, 1\].*got shape \(2, 1\)"):
        decoder(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\), got values in \[600, 600\]"):
        decoder(torch.full((1, 1), 600))
    layer = decoder.model.model.layers[1]
    x = torch.zeros(2, 1, V4_TINY.hidden_size)
    cache = layer.self_attn.static_cache(layer.self_attn.new_cache(), 2, 8, x)
    with pytest.raises(ValueError, match=r"same position, got positions \[3, 4\]"):
        layer.self_attn(x, torch.tensor([[3], [4]]), cache)
    with pytest.raises(ValueError, match=r"decodes one token per sequence.*got shape \(2, 2, 64\)"):
        layer.self_attn(torch.zeros(2, 2, 64), torch.tensor([[3, 4], [3, 4]]), cache)
    for _ in range(3):
        decoder(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="cache is full \\(8 tokens"):
        decoder(torch.zeros(1, 1, dtype=torch.long))
    assert decoder.length == 8


# -- compiled ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(EAGER_TWINS))
def test_the_whole_step_traces_as_one_graph(name, monkeypatch):
    # dynamo alone, fullgraph: a graph break anywhere in a layer, op or backend fails here, and so
    # does a value read captured as an unbacked symbol (what fullgraph makes of `.tolist()`).
    import v4hal.model.static as static

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    traced = torch.compile(static._step, backend=record, fullgraph=True, dynamic=False)
    monkeypatch.setattr(static, "compiled_step", lambda: traced)
    eager, compiled = _eager_and_static(EAGER_TWINS[name], prompt=6, total=14, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    # 8 steps over new positions, one graph: nothing that changes per step is baked into it.
    assert len(graphs) == 1
    assert not data_dependent(graphs[0])
    torch._dynamo.reset()


def test_inductor_compiled_decode_gives_the_eager_greedy_tokens_in_float32():
    # The real thing (inductor's generated C++), once: compiling takes ~30-60 s on a 2-core CPU
    # (minutes when it is loaded). float32 logits at float32 rounding (the compiled RoPE tables'
    # cos / sin, formed in float32 as the reference implementations do, round differently from
    # eager's), hence the eager greedy tokens, as docs/model.md says. bfloat16 gives no such
    # promise: fused kernels round at other points than eager, so a near-tie can flip a token.
    torch._dynamo.reset()
    model = build(V4_TINY, dtype=torch.float32).init_random(0)
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4, 6, 0, 11, 8]]  # one length: one group, one graph
    eager = generate(model, prompts, 14, Sampling(temperature=0.0), keep_logits=True)
    compiled = generate(model, prompts, 14, Sampling(temperature=0.0), keep_logits=True, compile=True)
    torch._dynamo.reset()
    assert compiled.decode_steps == 12 and compiled.compile_seconds > 0  # the compiled path ran
    assert compiled.tokens == eager.tokens
    for ours, theirs in zip(compiled.logits, eager.logits):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_cli_compile_flag_decodes_through_the_static_decoder(monkeypatch, capsys):
    import v4hal.model.static as static

    calls = []
    monkeypatch.setattr(static, "compiled_step", lambda: lambda *a: calls.append(1) or static._step(*a))
    argv = ["generate", "--preset", "tiny", "--max-new-tokens", "5", "--batch", "2"]
    assert cli(argv) == 0
    eager = [line for line in capsys.readouterr().out.splitlines() if "generated:" in line]
    assert cli(argv + ["--compile"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "generated:" in line] == eager
    assert "compiled decode: first steps (compiling) took" in out
    assert len(calls) == 2 * 4  # two prompt groups, 4 decode steps each


def test_fp8_weights_kept_quantized_compile_with_graph_breaks_and_stay_right(tmp_path, monkeypatch):
    # FP8 products read their scales' values (graph breaks); the step must still equal eager decode.
    import v4hal.model.static as static
    from test_model_loader import _quantize_dir
    from v4hal.model.config import ModelArgs
    from v4hal.model.loader import load_checkpoint

    make_pair("v4-mixed", tmp_path)
    _quantize_dir(tmp_path, ".scale")
    args = ModelArgs.from_json(tmp_path)
    model = build(args)
    load_checkpoint(model, tmp_path, args)
    assert any(p.dtype == torch.float8_e4m3fn for p in model.state_dict().values())
    torch._dynamo.reset()
    traced = torch.compile(static._step, backend="eager", dynamic=False)
    monkeypatch.setattr(static, "compiled_step", lambda: traced)
    ids = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :9], cache=cache)
        decoder = StaticDecoder(model, cache, capacity=24)
        for i in range(9, 24):
            torch.testing.assert_close(decoder(ids[:, i:i + 1]), model(ids[:, i:i + 1], cache=cache),
                                       rtol=1e-5, atol=1e-5, msg=lambda m: f"position {i}: {m}")
    torch._dynamo.reset()
