"""DeepSeek-V4.1 in the model: a tiny random V4.1 (Engram on layers 1 and 3, a hash-routed MoE
layer, mHC with the delayed pre-mix) gives the same logits one-shot, with a cache, in chunks, over
24 decode steps eager and static, with lookups prefetched or inline; config and token-map errors."""

import pytest
import torch

from v4hal.model.config import ConfigError, ModelArgs, preset
from v4hal.model.model import build
from v4hal.model.static import StaticDecoder
from v4hal.ops._check import OpInputError

IMAGE = 500  # the dead token (V4.1's image placeholder)


def tiny_v41(quantized: bool = False) -> ModelArgs:
    text = {k: v for k, v in preset("tiny").to_dict().items() if k not in ("model_type", "quantization_config")}
    text.update(engram_layer_ids=[1, 3], engram_num_embeddings=[330, 400], engram_max_ngram_size=3,
                engram_n_heads=2, engram_head_dim=32, engram_vocab_size=71, engram_compressed_vocab_size=300,
                engram_pad_token_id=2, image_token_id=IMAGE)
    if quantized:
        text["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                       "scale_fmt": "ue8m0"}
    return ModelArgs.from_dict({"model_type": "deepseek_v41", "text_config": text, "vision_config": {}})


def tiny_model(quantized=False, dtype=torch.float64):
    model = build(tiny_v41(quantized), dtype=dtype).init_random(0)
    model.set_engram_token_map(torch.randint(0, 300, (512,), generator=torch.Generator().manual_seed(4)))
    return model


def _ids(total=40):
    ids = torch.randint(0, 512, (2, total), generator=torch.Generator().manual_seed(2))
    ids[0, 5], ids[1, 17:19], ids[0, total - 10] = IMAGE, IMAGE, IMAGE
    return ids


def test_config_nests_text_config_and_builds_engram_where_listed():
    args = tiny_v41()
    assert args.model_type == "deepseek_v41" and args.is_v4 and args.is_v41 and args.hidden_size == 64
    model = build(args)
    names = [n for n, _ in model.named_parameters() if ".engram." in n]
    assert {n.split(".engram.")[0] for n in names} == {"model.layers.1", "model.layers.3"}
    assert "model.layers.1.engram.embed.weight" in names and "model.layers.1.engram.kv_proj.weight" in names
    assert not any("hc_head" in n for n, _ in model.named_parameters())  # V4.1 has none
    q = build(tiny_v41(quantized=True)).model.layers[1].engram.embed
    assert q.weight.dtype == torch.float8_e4m3fn and q.scale.shape == (330, 1) and q.scale.dtype == torch.float8_e8m0fnu


@pytest.mark.parametrize("quantized", [False, True], ids=["float-table", "fp8-table"])
def test_prefill_chunks_and_decode_give_the_same_logits(quantized):
    model, ids = tiny_model(quantized), _ids()
    prompt = 16
    with torch.no_grad():
        whole = model(ids)
        cache = model.new_cache()
        chunked = torch.cat([model(ids[:, i:min(i + 7, prompt)], cache=cache) for i in range(0, prompt, 7)], 1)
        assert cache.engram.ids.tolist() == ids[:, prompt - 2:prompt].tolist()
        decoder = StaticDecoder(model, cache, capacity=ids.shape[1], compile=False)
        eager, static = [], []
        for i in range(prompt, ids.shape[1]):
            eager.append(model(ids[:, i:i + 1], cache=cache))
            static.append(decoder(ids[:, i:i + 1]))
    torch.testing.assert_close(chunked, whole[:, :prompt], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(eager, 1), whole[:, prompt:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(static, 1), whole[:, prompt:], rtol=1e-10, atol=1e-10)
    assert len(eager) == 24


def test_engram_reaches_the_logits_and_a_dead_token_passes_its_streams_through():
    model, ids = tiny_model(), _ids()
    with torch.no_grad():
        base = model(ids)
        model.model.layers[3].engram.embed.weight.mul_(2.0)
        assert not torch.allclose(model(ids), base)
        engram = model.model.layers[1].engram
        streams, memory = torch.randn(2, 3, 4, 64, dtype=torch.float64), torch.randn(2, 3, 4 * 32, dtype=torch.float64)
        keep = torch.tensor([[True, False, True], [False, True, True]])
        out = engram(streams, memory, keep)
    assert torch.equal(out[~keep], streams[~keep]) and not torch.equal(out[keep], streams[keep])


def test_prefetched_lookups_equal_inline_lookups():
    """The tables stay in host memory either way here (CPU); the prefetch path (background thread,
    keyed hand-off) must give bit-identical logits to lookups inline in each layer."""
    model, ids = tiny_model(quantized=True), _ids()
    with torch.no_grad():
        model.model.engram_hashing.prefetch = False
        on_device = model(ids)  # tables where the model is, lookups inline
        model.keep_engram_tables_on_host()  # on this CPU-only machine: the same memory, the same code path
        model.model.engram_hashing.prefetch = True
        prefetched = model(ids)
        assert torch.equal(prefetched, on_device)
        model.model.engram_hashing.prefetch = False
        inline = model(ids)
    assert torch.equal(prefetched, inline)


@pytest.mark.cuda
def test_tables_in_host_memory_with_the_model_on_a_gpu():
    model, ids = tiny_model(quantized=True, dtype=torch.float32), _ids()
    with torch.no_grad():
        expected = model(ids)
        model.to("cuda").keep_engram_tables_on_host()
        assert model.model.layers[1].engram.embed.weight.device.type == "cpu"
        torch.testing.assert_close(model(ids.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_static_decode_equals_eager():
    # Engram and V4.1's shared caches with candidate blocks, through inductor.
    model = build(_v41_topology(**CANDIDATES), dtype=torch.float32).init_random(0)
    model.set_engram_token_map(torch.randint(0, 300, (512,), generator=torch.Generator().manual_seed(4)))
    ids = _ids(24)
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :12], cache=cache)
        decoder = StaticDecoder(model, cache, capacity=24)
        static = torch.cat([decoder(ids[:, i:i + 1]) for i in range(12, 24)], 1)
        eager = torch.cat([model(ids[:, i:i + 1], cache=cache) for i in range(12, 24)], 1)
    torch.testing.assert_close(static, eager, rtol=1e-4, atol=1e-4)


def test_bad_config_and_token_map():
    text = {k: v for k, v in tiny_v41().to_dict().items() if k != "model_type"}
    with pytest.raises(ConfigError, match="engram_num_embeddings: 100 rows cannot hold"):
        build(ModelArgs.from_dict({"model_type": "deepseek_v41", "text_config": {**text, "engram_num_embeddings": [100, 400]}}))
    with pytest.raises(ConfigError, match="engram_layer_ids: increasing layer ids in \\[0, 4\\)"):
        build(ModelArgs.from_dict({"model_type": "deepseek_v41", "text_config": {**text, "engram_layer_ids": [1, 9]}}))
    model = build(tiny_v41())
    with pytest.raises(RuntimeError, match="no compressed token map"):
        model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(OpInputError, match=r"Engram: argument 'token_map' expected one compressed id per token of the vocabulary \(512\)"):
        model.set_engram_token_map(torch.zeros(100, dtype=torch.long))
    with pytest.raises(OpInputError, match=r"Engram: argument 'token_map' expected compressed ids in \[0, 300\)"):
        model.set_engram_token_map(torch.full((512,), 300))


CANDIDATES = {"compress_ratios": [0, 1, 1, 1], "kv_source_layer_ids": [1, 3], "index_source_layer_ids": [1, 2, 3],
              "candidate_source_layer_id": 1, "candidate_topk_blocks": 3, "candidate_block_size": 2}


def _v41_topology(**changes):
    text = {k: v for k, v in tiny_v41().to_dict().items() if k not in ("model_type", "layer_types")}
    text.update({"compress_ratios": [0, 2, 2, 1, 0], "kv_source_layer_ids": [1, 3], "index_source_layer_ids": [1, 3],
                 **changes})
    return ModelArgs.from_dict({"model_type": "deepseek_v41", "text_config": text})


def test_v41_topology_config_and_its_errors():
    args = _v41_topology()  # the MTP layer's trailing ratio is dropped
    assert args.compress_ratios == [0, 2, 2, 1] and args.layer_types[1:] == ["c2_attention"] * 2 + ["c1_attention"]
    assert [args.kv_source(i) for i in range(4)] == [None, 1, 1, 3] == [args.index_source(i) for i in range(4)]
    assert ModelArgs.from_dict(args.to_dict()).kv_source_layer_ids == [1, 3]
    assert _v41_topology(kv_source_layer_ids=[3, 1, 4]).kv_source_layer_ids == [1, 3]  # 4: the MTP layer
    flash = preset("v4.1-flash")
    assert flash.compress_ratios == [0] * 2 + [2] * 18 + [1] * 20
    assert [flash.kv_source(i) for i in (1, 2, 7, 8, 19, 20, 23, 24, 39)] == [None, 2, 2, 8, 14, 20, 20, 24, 36]
    bad = [({"compress_ratios": [0, 2, 4, 1]}, "compress_ratios: V4.1's ratios are \\[0, 1, 2\\]"),
           ({"kv_source_layer_ids": [2, 3]}, "kv_source_layer_ids: compressed layer 1 needs a source at or below it"),
           ({"kv_source_layer_ids": [1]}, "kv_source_layer_ids: layer 3 \\(ratio 1\\) would read layer 1 of ratio 2"),
           ({"index_source_layer_ids": [1, 3, 0]}, "index_source_layer_ids: layer 0 must be a compressed layer"),
           ({"index_source_layer_ids": [1, 9]}, "index_source_layer_ids: layer 9 must be .* got out of range"),
           ({"kv_source_layer_ids": [1, 2, 3]}, "index_source_layer_ids: layer 2 reads KV source 2 but index source 1"),
           ({"kv_source_layer_ids": None}, "kv_source_layer_ids: V4.1's compressed layers need a non-empty list"),
           ({"candidate_source_layer_id": 2}, "candidate_source_layer_id: expected -1 or one of index_source_layer_ids"),
           ({"candidate_source_layer_id": 1, "candidate_topk_blocks": 2}, "candidate_block_size: expected an int"),
           ({"candidate_source_layer_id": 1, "candidate_topk_blocks": 2, "candidate_block_size": 2},
            "candidate_source_layer_id: index source 3 \\(ratio 1\\) would take candidate blocks of ratio 2")]
    for changes, message in bad:
        with pytest.raises(ConfigError, match=message):
            _v41_topology(**changes)
    with pytest.raises(ConfigError, match="kv_source_layer_ids: only for V4.1's compress_ratios 1 / 2"):
        ModelArgs.from_dict({**tiny_v41().to_dict(), "kv_source_layer_ids": [1]})


@pytest.mark.parametrize("topology", [{}, {"compress_ratios": [0, 2, 2, 2], "kv_source_layer_ids": [1],
                                             "index_source_layer_ids": [1, 2]},
                                      CANDIDATES],
                         ids=["c2-then-c1", "index-only-source", "candidate-blocks"])
def test_shared_compressed_caches_give_the_same_logits_one_shot_chunked_and_decoding(topology):
    args = _v41_topology(**topology)
    model = build(args, dtype=torch.float64).init_random(0)
    model.set_engram_token_map(torch.randint(0, 300, (512,), generator=torch.Generator().manual_seed(4)))
    params = {n for n, _ in model.named_parameters() if ".self_attn.compressor." in n}
    kv_sources, index_sources = args.kv_source_layer_ids, args.index_source_layer_ids
    for i in range(4):  # a reader owns no compressor or indexer weights
        owns = {n.split(".compressor.")[1] for n in params if n.startswith(f"model.layers.{i}.")}
        kv = {"kv_proj.weight", "kv_norm.weight"} | ({"gate_proj.weight"} if args.compress_ratio(i) == 2 else set())
        index = {"indexer.q_b_proj.weight", "indexer.scorer.weights_proj.weight"}
        keys = {"indexer.k_proj.weight", "indexer.k_norm.weight"}
        assert owns == ((kv if i in kv_sources else set()) | (index if i in index_sources else set())
                        | (keys if i in kv_sources and i in index_sources else set())), i
    ids, prompt = _ids(), 16
    with torch.no_grad():
        whole = model(ids)
        cache = model.new_cache()
        chunked = torch.cat([model(ids[:, i:min(i + 7, prompt)], cache=cache) for i in range(0, prompt, 7)], 1)
        decoder = StaticDecoder(model, cache, capacity=ids.shape[1], compile=False)
        eager, static = [], []
        for i in range(prompt, ids.shape[1]):
            eager.append(model(ids[:, i:i + 1], cache=cache))
            static.append(decoder(ids[:, i:i + 1]))
        entries = [len(c.compressed) for c in cache.layers]  # held once, by the KV sources
        assert entries == [40 // args.compress_ratio(i) if i in kv_sources else 0 for i in range(4)]
        picks = cache.layers[index_sources[-1]].picks
        assert picks.shape == (2, 1, args.index_topk) and bool((picks >= 0).all())
        if args.candidate_source_layer_id >= 0:  # later indexers pick inside the published blocks only
            blocks = cache.layers[args.candidate_source_layer_id].blocks
            assert blocks.shape == (2, 1, 3) and bool((blocks == (40 - 1) // 2).any(-1).all())  # the newest stays
            for i in (2, 3):
                inside = (cache.layers[i].picks.unsqueeze(-1) // 2 == blocks.unsqueeze(-2)).any(-1)
                assert bool(inside.all()), i
        for i in kv_sources:  # the shared entries reach the logits
            model.model.layers[i].self_attn.compressor.kv_norm.weight.mul_(1.5)
        assert not torch.allclose(model(ids), whole)
    torch.testing.assert_close(chunked, whole[:, :prompt], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(eager, 1), whole[:, prompt:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(static, 1), whole[:, prompt:], rtol=1e-10, atol=1e-10)


def test_plan_counts_the_tables_as_host_bytes():
    from v4hal.model.engram import EngramArgs
    from v4hal.model.parallel import Layout
    from v4hal.model.plan import format_plan, plan

    args = preset("v4.1-flash")
    p = plan(args, Layout(), context=4096)
    rows, width = sum(args.extra["engram_num_embeddings"]), args.extra["engram_head_dim"]
    assert p["host"] == {"engram tables": rows * (width + width // 32)}  # float8 values + ue8m0 bytes
    assert 180 * 2**30 < p["host"]["engram tables"] < 200 * 2**30
    # tp=8: each rank holds 2 of each layer's 16 hash columns, i.e. the rows of their 2 primes
    split = plan(args, Layout(tp=8), context=4096)
    primes = EngramArgs(args).primes
    most = max(sum(sum([p for order in layer for p in order][2 * r:2 * r + 2]) for layer in primes) for r in range(8))
    assert split["host"] == {"engram tables": most * (width + width // 32)}
    device = sum(split["weights"].values()) + sum(split["kv_cache"].values()) + split["activation_peak"]
    assert split["total"] == pytest.approx(device)  # the tables are not in the device total
    gates = 2 * (2 * args.hc_mult * args.hidden_size * 2)  # q_weight / k_weight of 2 layers stay whole on every rank
    assert split["weights"]["engram projections"] * 8 - p["weights"]["engram projections"] == 7 * gates
    assert "engram tables" in format_plan("v4.1-flash", args, split)
    # ep = dp = 8: the tables split over the 8 data-parallel ranks alike, the projections whole;
    # tp=2 x dp=4 (planned only) cuts them in tp * dp = 8 pieces too
    data = plan(args, Layout(ep=8, dp=8), context=4096)
    assert data["host"] == split["host"] == plan(args, Layout(tp=2, ep=2, dp=4), context=4096)["host"]
    assert data["weights"]["engram projections"] == p["weights"]["engram projections"]
    assert plan(preset("v4-flash"), Layout(), context=4096)["host"] == {}


def _deepseek_name(key: str) -> str:
    """Our (HF) name -> DeepSeek's V4.1 name for Engram tensors; the rest without `model.`."""
    return key.removeprefix("model.").replace(".engram.kv_proj.", ".engram.wkv.")


@pytest.mark.parametrize("naming", ["hf", "deepseek"])
def test_checkpoint_round_trip_keeps_the_tables_as_shipped(naming, tmp_path):
    from safetensors.torch import load_file, save_file

    from v4hal.model.loader import load_checkpoint
    from v4hal.model.save import save_checkpoint

    model, ids = tiny_model(quantized=True), _ids(12)
    save_checkpoint(model, model.args, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(path)
    assert state["model.layers.1.engram.embed.weight"].dtype == torch.float8_e4m3fn
    if naming == "deepseek":
        save_file({_deepseek_name(k): v for k, v in state.items()}, path)
        assert "layers.3.engram.wkv.weight" in load_file(path)
    fresh = build(tiny_v41(quantized=True), dtype=torch.float64)
    load_checkpoint(fresh, tmp_path / "ckpt", fresh.args)
    fresh.set_engram_token_map(model.model.engram_hashing.token_map.clamp_min(0))
    table = fresh.model.layers[1].engram.embed
    assert table.weight.dtype == torch.float8_e4m3fn and table.scale.dtype == torch.float8_e8m0fnu
    model.set_engram_token_map(fresh.model.engram_hashing.token_map.clamp_min(0))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_a_checkpoint_missing_an_engram_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from v4hal.model.loader import LoadError, load_checkpoint
    from v4hal.model.save import save_checkpoint

    model = tiny_model(quantized=True)
    save_checkpoint(model, model.args, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(path)
    for gone in ("model.layers.3.engram.embed.scale", "model.layers.1.engram.q_weight"):
        del state[gone]
    save_file(state, path)
    with pytest.raises(LoadError, match=r"2 missing tensor\(s\): model.layers.1.engram.q_weight, model.layers.3.engram.embed.scale"):
        load_checkpoint(build(tiny_v41(quantized=True)), tmp_path / "ckpt", tiny_v41(quantized=True))


def test_candidate_blocks_by_hand():
    from v4hal.model.attention_v41 import Candidates

    pick = Candidates(source=1, topk_blocks=2, block_size=2, writes=True)
    scores = torch.tensor([[[5.0, 0.0, 1.0, 9.0, 7.0, 2.0, 3.0]] * 3], dtype=torch.float64)  # [1, 3, 7]
    visible = torch.tensor([[7, 3, 0]])
    # 7 visible: blocks (5, 9, 7, 3), the newest (block 3) kept first, then block 1 (9).
    # 3 visible: blocks (5, 1), the newest is block 1 -> [1, 0]. None visible: no block.
    assert pick.select(scores, visible).tolist() == [[[3, 1], [1, 0], [-1, -1]]]
    masked = pick.mask(scores, torch.tensor([[[3, 1], [0, -1], [-1, -1]]]))
    inf = float("-inf")
    assert masked.tolist() == [[[inf, inf, 1.0, 9.0, inf, inf, 3.0], [5.0, 0.0] + [inf] * 5, [inf] * 7]]


_V41_ATTENTION_NAMES = [(".self_attn.compressor.indexer.scorer.weights_proj.", ".attn.indexer.weights_proj."),
                        (".self_attn.compressor.indexer.q_b_proj.", ".attn.indexer.wq_b."),
                        (".self_attn.compressor.indexer.k_proj.", ".attn.indexer.wk."),
                        (".self_attn.compressor.indexer.k_norm.", ".attn.indexer.k_norm."),
                        (".self_attn.compressor.kv_proj.", ".attn.compressor.wkv."),
                        (".self_attn.compressor.gate_proj.", ".attn.compressor.wgate."),
                        (".self_attn.compressor.kv_norm.", ".attn.compressor.norm.")]


def test_shared_cache_checkpoint_in_deepseek_naming_and_a_reader_with_its_own_compressor(tmp_path):
    from safetensors.torch import load_file, save_file

    from v4hal.model.loader import LoadError, load_checkpoint
    from v4hal.model.save import save_checkpoint

    args = _v41_topology()
    model = build(args, dtype=torch.float64).init_random(0)
    save_checkpoint(model, args, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    state = {}
    for key, value in load_file(path).items():
        for ours, theirs in _V41_ATTENTION_NAMES:
            key = key.replace(ours, theirs)
        state[_deepseek_name(key)] = value
    assert "layers.3.attn.indexer.wk.weight" in state and "layers.1.attn.compressor.wgate.weight" in state
    assert not any(k.startswith("layers.2.attn.compressor.") for k in state)
    save_file(state, path)
    fresh = build(args, dtype=torch.float64)
    load_checkpoint(fresh, tmp_path / "ckpt", args)
    token_map = torch.randint(0, 300, (512,), generator=torch.Generator().manual_seed(4))
    model.set_engram_token_map(token_map)
    fresh.set_engram_token_map(token_map)
    with torch.no_grad():
        assert torch.equal(fresh(_ids(12)), model(_ids(12)))
    save_file({**state, "layers.2.attn.compressor.wkv.weight": state["layers.1.attn.compressor.wkv.weight"].clone()}, path)
    with pytest.raises(LoadError, match=r"model.layers.2.self_attn.compressor.kv_proj.weight \(layers \[2\]: V4.1 builds "
                                        r"a compressor only on kv_source_layer_ids \[1, 3\]"):
        load_checkpoint(build(args), tmp_path / "ckpt", args)


@pytest.mark.parametrize("target", ["bf16", "copy"])
def test_convert_keeps_the_tables_as_shipped(target, tmp_path):
    from safetensors.torch import load_file, save_file

    from v4hal.cli import main
    from v4hal.model.config import ModelArgs
    from v4hal.model.loader import load_checkpoint
    from v4hal.model.save import save_checkpoint

    model, ids = tiny_model(quantized=True), _ids(12)
    save_checkpoint(model, model.args, tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    source = {_deepseek_name(k): v for k, v in load_file(path).items()}  # DeepSeek naming
    save_file(source, path)
    assert main(["convert", "run", "--to", target, "--no-progress", "--workers", "1", str(tmp_path / "src"),
                 str(tmp_path / "out")]) == 0
    out = {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(f).items()}
    for key in ("layers.1.engram.embed.weight", "layers.3.engram.embed.scale"):
        assert out[key].dtype == source[key].dtype and torch.equal(out[key].view(torch.uint8), source[key].view(torch.uint8))
    args = ModelArgs.from_json(tmp_path / "out" / "config.json")
    converted = build(args, dtype=torch.float64)
    load_checkpoint(converted, tmp_path / "out", args)
    assert converted.model.layers[1].engram.embed.weight.dtype == torch.float8_e4m3fn  # adopted as stored
    converted.set_engram_token_map(model.model.engram_hashing.token_map.clamp_min(0))
    model.set_engram_token_map(model.model.engram_hashing.token_map.clamp_min(0))
    with torch.no_grad():
        if target == "copy":
            assert torch.equal(converted(ids), model(ids))
        else:  # bf16 weights from float64 ones: close
            torch.testing.assert_close(converted(ids), model(ids), rtol=0.05, atol=0.05)
