"""Checkpoint loading: HF names, DeepSeek's FP8 naming (`weight_scale_inv` for V3/V3.2, `scale` for
V4), weights kept quantized or dequantized, several shards with an index (a scale in another shard
than its weight), MXFP4 experts, meta-device builds, and the errors for missing, unexpected,
mis-shaped and scale-less tensors."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from v4hal import ops
from v4hal.model.config import ModelArgs, preset
from v4hal.model.loader import LoadError, canonical_name, load_checkpoint
from v4hal.model.model import build

from test_model_logits import make_pair


def _quantizable(name: str, t: torch.Tensor) -> bool:
    """Linear weights DeepSeek ships quantized: not embeddings, head, norms, routers, nor the V4
    compressor / indexer-weight projections transformers keeps in float32. `wo_a` too here: its
    per-group rows (16 in these tiny configs, 1024 in real ones) must fill whole 128-row scale blocks."""
    skip = ("norm", "embed", "head.", "lm_head", ".gate.weight", "compressor.", "weights_proj", "wo_a")
    return t.dim() == 2 and name.endswith(".weight") and not any(k in name for k in skip)


def _quantize_dir(d, suffix: str, shards: int = 1, fp4_experts: bool = False,
                  fp4_storage: torch.dtype = torch.uint8, ue8m0: bool = False) -> tuple[dict, dict]:
    """Rewrite the checkpoint in `d` with FP8 weights (or MXFP4 routed experts only), split over
    `shards` files with an index; returns (dequantized reference tensors, formats by name)."""
    path = next(d.glob("*.safetensors"))
    tensors = load_file(path)
    path.unlink()
    out, ref, fmt = {}, {}, {}
    for name, t in tensors.items():
        if fp4_experts and ".experts." in name and t.dim() == 2:
            q, s = ops.quantize_fp4(t)
            ref[name], fmt[name] = ops.dequantize_fp4(q, s, out_dtype=torch.float32), "fp4"
            if fp4_storage == torch.int8:  # as DeepSeek ships V4: int8 bytes, ue8m0 scales (exact: powers of 2)
                q, s = q.view(torch.int8), s.to(torch.float8_e8m0fnu)
            out[name], out[name[:-len("weight")] + suffix.lstrip(".")] = q, s
        elif _quantizable(name, t) and not fp4_experts:
            q, s = ops.quantize_fp8(t, (128, 128), scale_fmt="ue8m0" if ue8m0 else "fp32")
            ref[name], fmt[name] = ops.dequantize_fp8(q, s, out_dtype=torch.float32), "fp8"
            out[name], out[name[:-len("weight")] + suffix.lstrip(".")] = q, s.to(torch.float8_e8m0fnu) if ue8m0 else s
        else:
            out[name] = ref[name] = t
    names = sorted(out)  # weights sort before their `weight_scale_inv`; `.scale` sorts before `.weight`
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: out[k].contiguous() for k in part}, d / fname)
        weight_map.update({k: fname for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ref, fmt


def _dense_twin(d, args, ref, tmp_path):
    twin = tmp_path / "dense"
    twin.mkdir()
    (twin / "config.json").write_text((d / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in ref.items()}, twin / "model.safetensors")
    m = build(args)
    load_checkpoint(m, twin, args)
    return m


@pytest.mark.parametrize("name,suffix,ue8m0", [("v32-groups-dsa", "weight_scale_inv", False), ("v4-mixed", "scale", False),
                                               ("v4-mixed", "scale", True)], ids=["v32", "v4", "v4-e8m0-scales"])
def test_fp8_checkpoint_kept_quantized_or_dequantized(name, suffix, ue8m0, tmp_path):
    """FP8 weights with fp32 scales, or with float8_e8m0fnu ones as V4 ships them (scale_fmt ue8m0)."""
    d = tmp_path / "ckpt"
    d.mkdir()
    _, _ = make_pair(name, d)
    ref, fmt = _quantize_dir(d, "." + suffix, shards=3, ue8m0=ue8m0)
    assert "fp8" in fmt.values()
    args = ModelArgs.from_json(d)
    ids = torch.randint(0, args.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    dense = _dense_twin(d, args, ref, tmp_path)

    deq = build(args)
    report = load_checkpoint(deq, d, args, keep_quantized=False)
    assert report.dequantized == sum(f == "fp8" for f in fmt.values()) and report.files == 3
    with torch.no_grad():
        torch.testing.assert_close(deq(ids), dense(ids), rtol=0, atol=0)

    q = build(args)
    report = load_checkpoint(q, d, args)
    kept = [n for n, p in q.state_dict().items() if p.dtype == torch.float8_e4m3fn]
    assert kept and report.formats["fp8"] == sum(f == "fp8" for f in fmt.values())
    with torch.no_grad():
        a, b = q(ids), dense(ids)
    # FP8 activations (1x128 blocks) against float ones, through 3 layers whose top-k routing and
    # indexer choices may flip: DeepGEMM's figure of merit, looser than for one GEMM
    diff = 1 - 2 * (a * b).sum() / (a.square().sum() + b.square().sum())
    assert diff < 2e-2, float(diff)


def test_config_scale_fmt_ue8m0_scales_every_fp8_activation_as_deepseek_does(tmp_path, fp8_scale_fmts):
    """A checkpoint whose config says `quantization_config.scale_fmt: ue8m0` (DeepSeek's V3.2 and V4)
    runs every FP8 product with power-of-two activation scales; one without it keeps fp32 scales."""
    d = tmp_path / "ckpt"
    d.mkdir()
    make_pair("v4-mixed", d)
    ref, _ = _quantize_dir(d, ".scale", ue8m0=True)
    dense = _dense_twin(d, ModelArgs.from_json(d), ref, tmp_path)
    config = json.loads((d / "config.json").read_text())
    ids = torch.randint(0, config["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(0))
    logits = {}
    for fmt in ("fp32", "ue8m0"):
        quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": fmt}
        (d / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
        args = ModelArgs.from_json(d)
        assert args.act_scale_fmt == fmt
        model = build(args)
        load_checkpoint(model, d, args)
        fp8_scale_fmts.clear()
        with torch.no_grad():
            logits[fmt] = model(ids)
        assert len(fp8_scale_fmts) >= 10 and set(fp8_scale_fmts) == {fmt}
        b = dense(ids)
        diff = 1 - 2 * (logits[fmt] * b).sum() / (logits[fmt].square().sum() + b.square().sum())
        assert diff < 2e-2, float(diff)
    assert not torch.allclose(logits["fp32"], logits["ue8m0"], rtol=1e-4, atol=1e-4)


def test_fp8_experts_stay_quantized_in_the_fused_layout(tmp_path):
    """Per-expert FP8 gate/up/down matrices (V3 naming) stack into `gate_up_proj` `[E, 2I, H]`
    e4m3 with `gate_up_proj_scale` `[E, 2I/128, H/128]`, and run quantized."""
    d = tmp_path / "ckpt"
    d.mkdir()
    make_pair("v3-wide", d)
    ref, fmt = _quantize_dir(d, ".weight_scale_inv", shards=2)
    args = ModelArgs.from_json(d)
    q = build(args)
    load_checkpoint(q, d, args)
    experts = q.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn and tuple(experts.gate_up_proj_scale.shape) == (8, 2, 1)
    assert experts.down_proj.dtype == torch.float8_e4m3fn and tuple(experts.down_proj_scale.shape) == (8, 1, 1)
    gate = ref["model.layers.1.mlp.experts.3.gate_proj.weight"]
    torch.testing.assert_close(ops.dequantize_fp8(experts.gate_up_proj[3], experts.gate_up_proj_scale[3],
                                                  out_dtype=torch.float32)[:128], gate, rtol=0, atol=0)
    dense = _dense_twin(d, args, ref, tmp_path)
    ids = torch.randint(0, args.vocab_size, (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = q(ids), dense(ids)
    assert 1 - 2 * (a * b).sum() / (a.square().sum() + b.square().sum()) < 2e-2


@pytest.mark.parametrize("storage", [torch.uint8, torch.int8], ids=["uint8", "int8-as-deepseek-ships"])
def test_fp4_experts_load(tmp_path, storage):
    """MXFP4 experts, packed in uint8 or (as DeepSeek's V4 checkpoints store them) in int8 bytes
    beside ue8m0 scales: the int8 ones are FP4, not W8A8."""
    d = tmp_path / "ckpt"
    d.mkdir()
    make_pair("v4-mixed", d)
    ref, fmt = _quantize_dir(d, ".scale", fp4_experts=True, fp4_storage=storage)
    assert "fp4" in fmt.values()
    args = ModelArgs.from_json(d)
    dense = _dense_twin(d, args, ref, tmp_path)
    q = build(args)
    report = load_checkpoint(q, d, args)
    assert report.formats["fp4"] == sum(f == "fp4" for f in fmt.values()) and not report.formats["int8"]
    assert any(p.dtype == torch.uint8 for n, p in q.state_dict().items() if "experts" in n)
    ids = torch.randint(0, args.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(q(ids), dense(ids), rtol=2e-3, atol=2e-3)


def test_deepseek_v4_names_translate_to_hf_names():
    for deepseek, hf in [("layers.2.attn.wq_a.weight", "model.layers.2.self_attn.q_a_proj.weight"),
                         ("layers.2.attn.indexer.compressor.ape", "model.layers.2.self_attn.compressor.indexer.position_bias"),
                         ("layers.2.attn.indexer.wq_b.scale", "model.layers.2.self_attn.compressor.indexer.q_b_proj.scale"),
                         ("layers.2.attn.compressor.norm.weight", "model.layers.2.self_attn.compressor.kv_norm.weight"),
                         ("layers.0.ffn.experts.7.w3.weight", "model.layers.0.mlp.experts.7.up_proj.weight"),
                         ("layers.0.ffn.gate.bias", "model.layers.0.mlp.gate.e_score_correction_bias"),
                         ("layers.0.hc_ffn_scale", "model.layers.0.ffn_hc.scale"),
                         ("hc_head_fn", "model.hc_head.hc_fn"), ("head.weight", "lm_head.weight"),
                         ("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]:
        assert canonical_name(deepseek, v4=True) == hf
    # V3 / V3.2 publish HF names; their indexer's wq_b is its real name
    assert canonical_name("model.layers.1.self_attn.indexer.wq_b.weight_scale_inv", v4=False) == \
        "model.layers.1.self_attn.indexer.wq_b.scale"


def _saved(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    make_pair("v32-groups-dsa", d)
    path = next(d.glob("*.safetensors"))
    return d, path, load_file(path), ModelArgs.from_json(d)


def test_missing_tensor_is_named(tmp_path):
    d, path, tensors, args = _saved(tmp_path)
    del tensors["model.layers.1.self_attn.q_a_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(LoadError, match=r"1 missing tensor\(s\): model.layers.1.self_attn.q_a_proj.weight"):
        load_checkpoint(build(args), d, args)


def test_unexpected_and_misshaped_tensors_are_named(tmp_path):
    d, path, tensors, args = _saved(tmp_path)
    tensors["model.layers.0.self_attn.bogus.weight"] = torch.zeros(2, 2)
    tensors["model.norm.weight"] = torch.zeros(7)
    save_file(tensors, path)
    with pytest.raises(LoadError) as err:
        load_checkpoint(build(args), d, args)
    msg = str(err.value)
    assert "unexpected tensor(s) (not in the model): model.layers.0.self_attn.bogus.weight" in msg
    assert "model.norm.weight: checkpoint shape (7,), model expects (64,)" in msg
    assert "missing" not in msg  # present, though refused


def test_quantized_weight_without_scale(tmp_path):
    d, path, tensors, args = _saved(tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, path)
    with pytest.raises(LoadError, match=f"{name}: quantized .* but no scale tensor") as err:
        load_checkpoint(build(args), d, args)
    assert "missing" not in str(err.value)  # present, though unusable


def test_empty_directory(tmp_path):
    with pytest.raises(LoadError, match="no \\*.safetensors"):
        load_checkpoint(build(preset("tiny")), tmp_path, preset("tiny"))


def test_meta_build_of_a_real_config_and_load_into_meta(tmp_path):
    """The full V4-Flash model builds on the meta device (shapes only, for dry runs) in seconds."""
    m = build(preset("v4-flash"), device="meta")
    p = m.model.layers[3].self_attn.q_b_proj.weight
    assert p.is_meta and tuple(p.shape) == (64 * 512, 1024)
    assert sum(t.numel() for t in m.state_dict().values()) > 250e9
    d, _, _, args = _saved(tmp_path)
    meta = build(args, device="meta")
    load_checkpoint(meta, d, args)
    assert not any(t.is_meta for t in meta.state_dict().values())
    with safe_open(str(next(d.glob("*.safetensors"))), "pt") as f:
        torch.testing.assert_close(meta.state_dict()["model.norm.weight"], f.get_tensor("model.norm.weight"))


PEAK_SCRIPT = r"""
import sys
from v4hal.model.config import ModelArgs
from v4hal.model.loader import load_checkpoint
from v4hal.model.model import build
args = ModelArgs.from_json(sys.argv[1])
model = build(args)
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
before = rss()
load_checkpoint(model, sys.argv[1], args)
print(hwm() - before, sum(t.numel() * t.element_size() for t in model.state_dict().values()))
"""


def test_streaming_load_peak_memory_is_near_the_model_size(tmp_path):
    """~70 MB of weights over 8 shards: the resident peak grows by well under twice that (the
    weights' values do not matter here, so the model is saved as built, uninitialised)."""
    import subprocess
    import sys

    from v4hal.bench.cases_model import BENCH_V4

    args = BENCH_V4.replace(vocab_size=16384)
    model = build(args)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del model
    names = sorted(state)
    per = -(-len(names) // 8)
    weight_map = {}
    for i in range(8):
        fname = f"model-{i:05d}.safetensors"
        save_file({k: state[k] for k in names[i * per:(i + 1) * per]}, tmp_path / fname)
        weight_map.update({k: fname for k in names[i * per:(i + 1) * per]})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(args.to_dict()))
    del state
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True)
    growth, size = map(int, out.stdout.split())
    assert size > 60e6
    assert growth < 1.5 * size, (growth, size)


def test_fp8_weight_with_a_nan_code_is_refused_by_name(tmp_path):
    """e4m3 has no Inf; 0x7f / 0xff are NaN, which the fast CPU decode would read as +-480."""
    d, path, tensors, args = _saved(tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    q, s = ops.quantize_fp8(tensors[name].float(), (128, 128))
    codes = q.view(torch.uint8).clone()
    codes[0, :3] = torch.tensor([0x7F, 0xFF, 0x7E], dtype=torch.uint8)  # two NaNs and 448
    tensors[name], tensors[name + "_scale_inv"] = codes.view(torch.float8_e4m3fn), s
    save_file(tensors, path)
    with pytest.raises(LoadError, match=f"{name}: 2 e4m3 NaN code"):
        load_checkpoint(build(args), d, args)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16])
def test_an_fp8_block_scale_of_another_dtype_is_refused_at_load(tmp_path, dtype):
    """128x128 scales as uint8 exponent bytes (or float16, which `fp8_matmul` refuses too) are
    rejected on load, naming the weight and the dtypes, not left to fail inside `fp8_matmul`."""
    d, path, tensors, args = _saved(tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    q, s = ops.quantize_fp8(tensors[name].float(), (128, 128), scale_fmt="ue8m0")
    exponents = (torch.log2(s).to(torch.int64) + 127).to(torch.uint8)
    tensors[name], tensors[name + "_scale_inv"] = q, exponents if dtype == torch.uint8 else s.to(dtype)
    save_file(tensors, path)
    for keep in (True, False):
        with pytest.raises(LoadError, match=rf"1 rejected tensor\(s\): {name}: FP8 128x128 block scale stored as "
                                            rf"{dtype}: expected torch.float32 or torch.float64 or torch.float8_e8m0fnu$"):
            load_checkpoint(build(args), d, args, keep_quantized=keep)


def test_saving_a_quantized_model_keeps_its_scales(tmp_path):
    """Regression: `Linear` held `weight_scale_inv` as a plain attribute, outside the state dict, so
    saving a loaded FP8 model wrote FP8 weights without their scales."""
    from v4hal.model.save import save_checkpoint

    d = tmp_path / "ckpt"
    d.mkdir()
    make_pair("v4-mixed", d)
    _quantize_dir(d, ".scale", shards=2, ue8m0=True)
    args = ModelArgs.from_json(d)
    q = build(args)
    load_checkpoint(q, d, args)
    state = q.state_dict()
    fp8 = [n for n, t in state.items() if t.dtype == torch.float8_e4m3fn]
    linears = [n for n in fp8 if n.endswith(".weight")]
    assert linears and all(n + "_scale_inv" in state for n in linears)
    assert all(n + "_scale" in state for n in fp8 if n not in linears)  # fused experts' stacks

    save_checkpoint(q, args, tmp_path / "saved")
    again = build(args)
    load_checkpoint(again, tmp_path / "saved", args)
    ids = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), q(ids), rtol=0, atol=0)


@pytest.mark.parametrize("block,what", [((128, 128), "FP8 128x128 block"), ((1, 32), "MXFP8")], ids=["fp8", "mxfp8"])
def test_an_e8m0_weight_scale_holding_nan_is_refused_by_name_and_index(tmp_path, block, what):
    """Byte 0xFF is e8m0's NaN: read as a factor it would make its whole block NaN."""
    d, path, tensors, args = _saved(tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    q, s = ops.quantize_fp8(tensors[name].float(), block, scale_fmt="ue8m0")
    codes = s.to(torch.float8_e8m0fnu).view(torch.uint8).clone()
    codes[0, 0] = 0xFF
    tensors[name], tensors[name + "_scale_inv"] = q, codes.view(torch.float8_e8m0fnu)
    save_file(tensors, path)
    for keep in (True, False):
        with pytest.raises(LoadError, match=rf"1 rejected tensor\(s\): {name}: 1 {what} scale\(s\) hold e8m0 byte "
                                            rf"0xFF \(NaN\), first at \[0, 0\]"):
            load_checkpoint(build(args), d, args, keep_quantized=keep)
