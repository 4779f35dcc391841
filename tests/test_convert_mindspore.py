"""HF safetensors -> MindSpore (.ckpt and MindSpore safetensors) -> HF: MindSpore's own loader
reads the output under the documented names, and the way back is bit-exact."""

import json

import mindspore as ms
import pytest
import torch

from convert_util import cli, file_bytes, fp8_checkpoint, load_hf, logits, save_hf, write_shards
from v4hal.conversion.mindspore import ms_name


def ms_to_torch(p):
    if p.dtype == ms.bfloat16:
        return torch.from_numpy(p.astype(ms.float32).asnumpy()).to(torch.bfloat16)
    return torch.from_numpy(p.asnumpy())


def test_name_mapping_follows_the_documented_table():
    assert ms_name("model.embed_tokens.weight") == "model.tok_embeddings.embedding_weight"
    assert ms_name("model.layers.3.self_attn.q_a_proj.weight") == "model.layers.3.attention.q2l_proj.weight"
    assert ms_name("model.layers.3.self_attn.kv_b_proj.weight_scale_inv") == "model.layers.3.attention.lkv2kv.weight_scale_inv"
    assert ms_name("model.layers.3.mlp.experts.7.down_proj.weight") == "model.layers.3.feed_forward.routed_experts.7.w2.weight"
    assert ms_name("model.layers.3.mlp.gate.e_score_correction_bias") == "model.layers.3.feed_forward.router.e_score_correction_bias"
    assert ms_name("model.layers.3.post_attention_layernorm.weight") == "model.layers.3.ffn_norm.weight"
    assert ms_name("model.norm.weight") == "model.norm_out.weight"
    assert ms_name("lm_head.weight") == "lm_head.weight"


def test_tiny_v3_to_mindspore_ckpt_and_back_is_bit_exact(tmp_path):
    model_dir = tmp_path / "bf16"
    save_hf("v3", model_dir)
    assert cli("run", "--to", "mindspore", "--no-progress", model_dir, tmp_path / "ms") == 0
    params = ms.load_checkpoint(str(tmp_path / "ms" / "model.ckpt"))
    from safetensors.torch import load_file

    src = load_file(str(model_dir / "model.safetensors"))
    assert set(params) == {ms_name(n) for n in src}
    for name, t in src.items():
        assert torch.equal(ms_to_torch(params[ms_name(name)]), t), name
    sidecar = json.loads((tmp_path / "ms" / "v4hal-mindspore.json").read_text())
    assert {t["hf_name"] for t in sidecar["tensors"]} == set(src)
    assert cli("verify", tmp_path / "ms", "--source", model_dir) == 0
    assert cli("run", "--to", "hf", "--no-progress", tmp_path / "ms", tmp_path / "back") == 0
    assert cli("run", "--to", "copy", "--no-progress", model_dir, tmp_path / "copy") == 0
    back, copy = file_bytes(tmp_path / "back"), file_bytes(tmp_path / "copy")
    assert back["model.safetensors"] == copy["model.safetensors"]
    assert back["model.safetensors.index.json"] == copy["model.safetensors.index.json"]
    assert torch.equal(logits(load_hf(tmp_path / "back")), logits(load_hf(model_dir)))


@pytest.mark.parametrize("ms_format", ["ckpt", "safetensors"])
def test_fp8_checkpoint_round_trip_keeps_every_bit(tmp_path, ms_format):
    fp8_checkpoint(tmp_path / "src")
    assert cli("run", "--to", "mindspore", "--ms-format", ms_format, "--no-progress", tmp_path / "src", tmp_path / "ms") == 0
    assert cli("run", "--to", "hf", "--no-progress", tmp_path / "ms", tmp_path / "back") == 0
    assert cli("run", "--to", "copy", "--no-progress", tmp_path / "src", tmp_path / "copy") == 0
    back, copy = file_bytes(tmp_path / "back"), file_bytes(tmp_path / "copy")
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"):
        assert back[name] == copy[name], name
    assert cli("verify", tmp_path / "back", "--source", tmp_path / "ms") == 0


def test_mindspore_safetensors_format_is_read_by_mindspore(tmp_path):
    # float32 / int8 / FP8-as-uint8: this environment's MindSpore cannot build numpy bfloat16
    # (its numpy ABI differs), so BF16 MindSpore-safetensors loading is checked by our reader only.
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-100, 100, (128, 64), dtype=torch.int8, generator=gen)
    w = torch.randn(64, 64, generator=gen)
    fp8 = torch.randn(128, 128, generator=gen).to(torch.float8_e4m3fn)
    write_shards(tmp_path / "src", [{"model.layers.0.mlp.up_proj.weight": w, "model.layers.0.mlp.down_proj.weight": q,
                                     "model.layers.0.self_attn.o_proj.weight": fp8,
                                     "model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1, 1)}])
    assert cli("run", "--to", "mindspore", "--ms-format", "safetensors", "--no-progress", tmp_path / "src", tmp_path / "ms") == 0
    params = ms.load_checkpoint(str(tmp_path / "ms" / "model-00001-of-00001.safetensors"), format="safetensors")
    assert torch.equal(ms_to_torch(params["model.layers.0.feed_forward.w3.weight"]), w)
    assert torch.equal(ms_to_torch(params["model.layers.0.feed_forward.w2.weight"]), q)
    assert torch.equal(ms_to_torch(params["model.layers.0.attention.wo.weight"]), fp8.view(torch.uint8))


def test_hf_names_option_keeps_names(tmp_path):
    fp8_checkpoint(tmp_path / "src")
    assert cli("run", "--to", "mindspore", "--ms-names", "hf", "--no-progress", tmp_path / "src", tmp_path / "ms") == 0
    params = ms.load_checkpoint(str(tmp_path / "ms" / "model-00001-of-00002.ckpt"))
    assert "model.layers.0.self_attn.q_b_proj.weight" in params


def test_to_hf_needs_a_mindspore_conversion(tmp_path, capsys):
    fp8_checkpoint(tmp_path / "src")
    assert cli("run", "--to", "hf", "--no-progress", tmp_path / "src", tmp_path / "out") == 2
    assert "v4hal-mindspore.json" in capsys.readouterr().err
