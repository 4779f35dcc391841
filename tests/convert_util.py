"""Tiny checkpoints for the conversion tests: random transformers DeepSeek V3 / V3.2 / V4 models
saved with `save_pretrained`, and FP8 / MXFP4 checkpoints built directly from random codes and
scales (independently of the converter's own quantizer)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

# index_topk covers the whole test sequence: FP8 noise must not flip a discrete top-k choice.
COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=256)


def hf_model(kind: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "v4":
        cfg = tf.DeepseekV4Config(**COMMON, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16,
                                  sliding_window=8, index_n_heads=2, index_head_dim=16, index_topk=16,
                                  layer_types=["sliding_attention", "compressed_sparse_attention"], num_nextn_predict_layers=0)
        model = tf.DeepseekV4ForCausalLM(cfg)
    else:
        mla = dict(intermediate_size=128, num_key_value_heads=4, n_group=1, topk_group=1, first_k_dense_replace=1,
                   q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        if kind == "v32":
            model = tf.DeepseekV32ForCausalLM(tf.DeepseekV32Config(**COMMON, **mla, index_n_heads=2, index_head_dim=16, index_topk=16))
        else:
            model = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(**COMMON, **mla))
    # Non-trivial norms and biases, so a dropped or mangled one shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(torch.bfloat16).eval()


def save_hf(kind: str, path: Path, seed: int = 0):
    model = hf_model(kind, seed)
    model.save_pretrained(path)
    return model


def load_hf(path: Path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


def random_fp8(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 codes (NaN excluded) and fp32 block scales, as a DeepSeek FP8 weight."""
    bits = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen)
    bits = torch.where((bits & 0x7F) == 0x7F, bits & 0xF0, bits)  # 0x7F / 0xFF are NaN in e4m3fn
    scale = torch.rand(math.ceil(n / 128), math.ceil(k / 128), generator=gen) * 1e-3 + 1e-5
    return bits.view(torch.float8_e4m3fn), scale


def write_shards(path: Path, shards: list[dict[str, torch.Tensor]], config: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / name))
        weight_map.update({k: name for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "deepseek_v3",
                                                            "quantization_config": {"quant_method": "fp8"}}))


def fp8_checkpoint(path: Path, seed: int = 0, rows: tuple[int, ...] = (300, 256), cols: int = 200) -> dict:
    """A two-shard V3-named FP8 checkpoint with ragged block tails; returns its tensors."""
    gen = torch.Generator().manual_seed(seed)
    shards = []
    for i, n in enumerate(rows):
        q, s = random_fp8(n, cols, gen)
        lin = f"model.layers.{i}.self_attn.q_b_proj" if i == 0 else f"model.layers.{i}.mlp.experts.1.down_proj"
        shards.append({f"{lin}.weight": q, f"{lin}.weight_scale_inv": s,
                       f"model.layers.{i}.input_layernorm.weight": torch.randn(cols, generator=gen).bfloat16(),
                       f"model.layers.{i}.mlp.gate.weight": torch.randn(4, cols, generator=gen).bfloat16()})
    shards[0]["model.embed_tokens.weight"] = torch.randn(64, cols, generator=gen).bfloat16()
    write_shards(path, shards)
    return {k: v for s in shards for k, v in s.items()}


def expert_shards(root: Path, seed: int) -> Path:
    """Five shards of three FP8 experts and a BF16 norm each: enough units to kill a conversion
    between them."""
    gen = torch.Generator().manual_seed(seed)
    shards = []
    for i in range(5):
        shard = {}
        for j in range(3):
            q, s = random_fp8(384, 320, gen)
            shard[f"model.layers.{i}.mlp.experts.{j}.up_proj.weight"] = q
            shard[f"model.layers.{i}.mlp.experts.{j}.up_proj.weight_scale_inv"] = s
        shard[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(320, generator=gen).bfloat16()
        shards.append(shard)
    write_shards(root, shards)
    return root


# Run as `python -c KILL_DRIVER POINT N MARKER <v4hal args>`: the CLI, stalled at the N-th time
# (per process) it reaches POINT, after writing its pid to MARKER, until the test kills it.
KILL_DRIVER = r"""
import os, sys, time
from pathlib import Path
from v4hal.conversion import io, output, plan
point, n, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
count = [0]

def stall():
    # Renamed into place, so a test that sees the marker also sees the whole pid.
    Path(marker + f".{os.getpid()}").write_text(str(os.getpid()))
    os.replace(marker + f".{os.getpid()}", marker)
    time.sleep(600)

def hook(owner, name, when):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        if when(args) and count[0] == n - 1:
            if point.endswith("before"):
                stall()
            result = original(*args, **kwargs)
            stall()
        if when(args):
            count[0] += 1
        return original(*args, **kwargs)
    setattr(owner, name, wrapped)

if point == "write":          # in the middle of an output shard
    hook(output.ShardWriter, "write", lambda a: True)
elif point == "rename":       # a shard renamed into place, its unit not yet journaled
    hook(output.ShardWriter, "close", lambda a: True)
elif point == "journal":      # between two units
    hook(plan, "write_json_atomic", lambda a: a[0].name == plan.PROGRESS and a[1]["units"])
elif point == "finish-before":  # after all shards, before the index / manifest
    hook(plan, "write_json_atomic", lambda a: a[0].name == io.INDEX_NAME)
from v4hal.cli import main
sys.exit(main(sys.argv[4:]))
"""


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def cli(*args: str) -> int:
    from v4hal.cli import main

    return main(["convert", *map(str, args)])


os.environ.setdefault("TQDM_DISABLE", "1")
