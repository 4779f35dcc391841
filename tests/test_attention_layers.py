"""The composed attention layers reproduce transformers' DeepseekV4Attention (sliding-only, CSA,
HCA) and DeepseekV32Attention on the same weights, in float64: prefill longer than the window and
not a multiple of the compression ratios, then decode steps against the cache. Also RoPE/YaRN
tables against transformers' and the layers' bad-input errors."""

import pytest
import torch
from transformers import DeepseekV4Config, DeepseekV32Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

from v4hal import ops
from v4hal.backends import registry
from v4hal.bench.attention_layers import TINY_V4, TINY_V32, ref_cache, v4_config, v4_pair, v32_pair
from v4hal.model.cache import Rows
from v4hal.model.rope import Rope

V4_TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
BACKENDS = ["cpu", "cpu_fast", "mindspore"]
ATTENTION_OPS = ["apply_rope", "layer_norm", "kv_compress", "indexer_scores", "indexer_topk", "indexer_select",
                 "sparse_attention", "window_attention"]


def _pos(b, s, start=0):
    return (start + torch.arange(s)).unsqueeze(0).expand(b, -1)


def _prefill_then_decode(ours, run_ref, cfg, x, prefill, backend):
    """Outputs of ours and of transformers for a prefill of `prefill` tokens, then one token at a
    time for the rest of x."""
    b, n, _ = x.shape
    cache, rcache = ours.new_cache(), ref_cache(cfg)
    pairs = []
    registry.configure(op_backends={op: backend for op in ATTENTION_OPS})  # linear & norms stay on auto
    with torch.no_grad():
        pairs.append((ours(x[:, :prefill], _pos(b, prefill), cache), run_ref(x[:, :prefill], rcache, 0)))
        for t in range(prefill, n):
            pairs.append((ours(x[:, t:t + 1], _pos(b, 1, t), cache), run_ref(x[:, t:t + 1], rcache, t)))
    return pairs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_type", V4_TYPES)
def test_v4_layer_matches_transformers_prefill_and_decode(layer_type, backend):
    cfg = v4_config(layer_type, **TINY_V4)
    ours, _, run_ref = v4_pair(layer_type, cfg, dtype=torch.float64, std=0.3)
    # 21 > window 8 and not a multiple of 4 or 8; the decode steps close windows of both ratios.
    x = torch.randn(2, 21 + 12, cfg.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for i, (out, ref) in enumerate(_prefill_then_decode(ours, run_ref, cfg, x, 21, backend)):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("layer_type", V4_TYPES)
def test_v4_chunked_and_cacheless_prefill_agree(layer_type):
    cfg = v4_config(layer_type, **TINY_V4)
    ours, _, run_ref = v4_pair(layer_type, cfg, dtype=torch.float64, std=0.3)
    x = torch.randn(1, 30, cfg.hidden_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        whole = ours(x, _pos(1, 30))  # no cache: a one-shot prefill
        ours.prefill_chunk = 7
        chunked = ours(x, _pos(1, 30), ours.new_cache())
        torch.testing.assert_close(whole, run_ref(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked, whole, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_v32_layer_matches_transformers_prefill_and_decode(backend):
    cfg = DeepseekV32Config(num_hidden_layers=1, **TINY_V32)
    ours, _, run_ref = v32_pair(cfg, dtype=torch.float64)
    x = torch.randn(2, 13 + 4, cfg.hidden_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for i, (out, ref) in enumerate(_prefill_then_decode(ours, run_ref, cfg, x, 13, backend)):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"step {i}: {m}")


def test_v32_layer_without_indexer_is_v3_mla():
    """index_heads=0 drops DSA: every causal token is attended, as transformers' DeepseekV3Attention."""
    import dataclasses

    from transformers import DeepseekV3Config
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    from v4hal.model.attention_v32 import V32Attention, V32AttentionConfig

    kw = {k: v for k, v in TINY_V32.items() if not k.startswith("index")}
    cfg = DeepseekV3Config(num_hidden_layers=1, **kw)
    cfg._attn_implementation = "eager"
    ref = DeepseekV3Attention(cfg, 0).double()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.25)
    ours = V32Attention(dataclasses.replace(V32AttentionConfig.from_hf(cfg), index_heads=0))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    rot, rcache, cache = DeepseekV3RotaryEmbedding(cfg), DynamicCache(config=cfg), ours.new_cache()
    x = torch.randn(1, 9, cfg.hidden_size, generator=g, dtype=torch.float64)
    for lo, hi in ((0, 7), (7, 8), (8, 9)):
        xs, pos = x[:, lo:hi], _pos(1, hi - lo, lo)
        mask = create_causal_mask(config=cfg, inputs_embeds=xs, attention_mask=None, past_key_values=rcache,
                                  position_ids=pos)
        with torch.no_grad():
            want = ref(xs, rot(xs, pos), mask, past_key_values=rcache)[0]
            got = ours(xs, pos, cache)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_layers_hold_the_official_tensor_names():
    cfg = v4_config("compressed_sparse_attention", **TINY_V4)
    ours, ref, _ = v4_pair("compressed_sparse_attention", cfg)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert "compressor.indexer.scorer.weights_proj.weight" in ours.state_dict()
    ours32, ref32, _ = v32_pair(DeepseekV32Config(num_hidden_layers=1, **TINY_V32))
    assert set(ours32.state_dict()) == set(ref32.state_dict())
    assert "indexer.k_norm.bias" in ours32.state_dict()


def test_v4_layer_runs_fp8_weights():
    """Projections go through ops.linear, so an FP8 checkpoint (128x128 block scales) loads as is."""
    cfg = v4_config("sliding_attention", **{**TINY_V4, "hidden_size": 256, "q_lora_rank": 128})
    ours, _, _ = v4_pair("sliding_attention", cfg)
    x = torch.randn(1, 5, 256, generator=torch.Generator().manual_seed(4))
    dense = ours(x, _pos(1, 5))
    w, s = ops.quantize_fp8(ours.q_a_proj.weight.data, (128, 128))
    ours.q_a_proj.weight = torch.nn.Parameter(w, requires_grad=False)
    ours.q_a_proj.weight_scale_inv = s
    quant = ours(x, _pos(1, 5))
    cos = torch.nn.functional.cosine_similarity(quant.flatten(), dense.flatten(), dim=0)
    assert quant.dtype == torch.float32 and cos > 0.99


def test_yarn_tables_match_transformers():
    cfg = DeepseekV4Config(rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                                            "beta_fast": 32, "beta_slow": 1})
    inv, att = ROPE_INIT_FUNCTIONS["yarn"](cfg, None, layer_type="compress")
    rope = Rope.from_params(64, cfg.rope_parameters["compress"], cfg.max_position_embeddings)
    torch.testing.assert_close(rope.inv_freq().float(), inv, rtol=1e-6, atol=0)
    assert rope.attention_factor == att == 1.0
    v32 = DeepseekV32Config(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                             "original_max_position_embeddings": 4096, "mscale": 1.0,
                                             "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})
    inv, att = ROPE_INIT_FUNCTIONS["yarn"](v32, None)
    rope = Rope.from_params(64, v32.rope_parameters, v32.max_position_embeddings)
    torch.testing.assert_close(rope.inv_freq().float(), inv, rtol=1e-6, atol=0)
    assert rope.attention_factor == pytest.approx(att)


@pytest.mark.parametrize("interleaved", [True, False])
def test_apply_rope_matches_transformers_layouts(interleaved):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 16, generator=g, dtype=torch.float64)
    ang = torch.rand(2, 4, 8, generator=g, dtype=torch.float64) * 6
    ours = ops.apply_rope(x, ang.cos().unsqueeze(1), ang.sin().unsqueeze(1), interleaved=interleaved)
    if interleaved:  # transformers' V4 rotation of the trailing rope slice
        ref = apply_rotary_pos_emb(x, ang.cos(), ang.sin())
    else:  # rotate_half with cat(freqs, freqs), as V3.2's indexer
        c, s = torch.cat([ang.cos()] * 2, -1).unsqueeze(1), torch.cat([ang.sin()] * 2, -1).unsqueeze(1)
        ref = x * c + torch.cat([-x[..., 8:], x[..., :8]], -1) * s
    torch.testing.assert_close(ours, ref)
    back = ops.apply_rope(ours, ang.cos().unsqueeze(1), -ang.sin().unsqueeze(1), interleaved=interleaved)
    torch.testing.assert_close(back, x)


def test_layer_bad_input_names_the_problem():
    cfg = v4_config("heavily_compressed_attention", **TINY_V4)
    ours, _, _ = v4_pair("heavily_compressed_attention", cfg)
    x = torch.randn(1, 1, cfg.hidden_size)
    with pytest.raises(ValueError, match="V4Attention: positions must continue the cache, which holds 0"):
        ours(x, _pos(1, 1, 50), ours.new_cache())  # decode against an empty cache
    with pytest.raises(ValueError, match=r"positions must be \[B, S\]"):
        ours(x, _pos(1, 2))
    with pytest.raises(ValueError, match="hidden_states must be"):
        ours(x[0], _pos(1, 1))
    o32, _, _ = v32_pair(DeepseekV32Config(num_hidden_layers=1, **TINY_V32))
    with pytest.raises(ValueError, match="V32Attention: positions must continue the cache"):
        o32(torch.randn(1, 1, 64), _pos(1, 1, 3), o32.new_cache())


def test_cache_rows_grow_without_losing_or_moving_rows():
    """`Rows` (compressed entries, latents, indexer keys) equals concatenating every append,
    across capacity growth, and `followed_by` lends spare rows without committing them."""
    rows, appended = Rows(), []
    g = torch.Generator().manual_seed(0)
    for n in [0, 3, 1, 0, 1, 200, 1, 1, 97, 1]:
        new = torch.randn(2, n, 5, generator=g)
        rows.append(new)
        appended.append(new)
        tail = torch.randn(2, 7, 5, generator=g)
        both = rows.followed_by(tail)
        expected = torch.cat(appended, dim=1)
        assert len(rows) == expected.shape[1]
        torch.testing.assert_close(both, torch.cat([expected, tail], dim=1), rtol=0, atol=0)
        torch.testing.assert_close(rows.tensor, expected, rtol=0, atol=0)
    start = Rows()
    assert start.tensor is None and len(start) == 0
    start.append(torch.ones(1, 4, 2))
    start.append(torch.zeros(1, 1, 2))
    assert start.tensor.tolist() == [[[1, 1]] * 4 + [[0, 0]]]


def test_rope_tables_reused_only_for_the_same_unmodified_positions():
    rope = Rope(16, 10000.0)
    p = torch.arange(6).unsqueeze(0)
    first = rope.cos_sin(p)
    assert rope.cos_sin(p) is first  # every layer of a step asks again
    p.add_(5)  # modified in place: recomputed
    fresh = Rope(16, 10000.0).cos_sin(torch.arange(5, 11).unsqueeze(0))
    torch.testing.assert_close(rope.cos_sin(p), fresh, rtol=0, atol=0)
    assert rope.cos_sin(p, torch.float64)[0].dtype == torch.float64


def test_attention_report_decode_point_runs_on_a_prefilled_cache():
    """The decode benchmark (`python -m v4hal.bench.attention_report decode`) on a small context:
    it builds a CSA cache of the context's size and times steps on fresh copies of its rows."""
    from v4hal.bench import attention_report

    point = attention_report.measure_decode(600, torch.float32, steps=1)
    assert point["compressed_entries"] == 599 // 4
    assert point["step_s"] > 0 and point["attention_s"] > 0 and point["dense_sdpa_s"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "stepped", "odd_offset"])
def test_apply_rope_takes_non_contiguous_inputs(backend, layout):
    g = torch.Generator().manual_seed(6)
    ang = torch.rand(2, 4, 8, generator=g) * 6
    cos, sin = ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)
    if layout == "transposed":  # [B, H, S, D] seen from a [B, S, H, D] buffer
        x = torch.randn(2, 4, 3, 16, generator=g).transpose(1, 2)
    elif layout == "stepped":  # every other channel pair of a wider buffer
        x = torch.randn(2, 3, 4, 33, generator=g)[..., :32:2]
    else:  # the rope slice starts one element into the row
        x = torch.randn(2, 3, 4, 17, generator=g)[..., 1:]
    registry.configure(op_backends={"apply_rope": backend})
    try:
        ours = ops.apply_rope(x, cos, sin, interleaved=True)
    finally:
        registry.configure()
    torch.testing.assert_close(ours, apply_rotary_pos_emb(x.contiguous(), ang.cos(), ang.sin()))
