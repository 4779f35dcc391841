"""The tensor + expert parallel model on CPU: gloo process groups of 2 and 4 ranks must give the
single-process logits (float32) for a prefill and 16 decode steps, and the same greedy tokens, on
tiny V4 (sliding / CSA / HCA layers, a hash layer), V3.2 and V3 models from transformers
checkpoints, and each rank must hold exactly the weight bytes `v4hal plan` predicts. Layouts:
tp=2 and tp=4; ep=2 and ep=4 (with dp = ep: each rank its own sequence, tokens exchanged by
all-to-all); tp=2 x ep=2 and tp=4 x ep=4 (heads and vocabulary split, each rank running its share
of the experts). One launch per world size runs all of its layouts.
"""

import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
from safetensors.torch import load_file, save_file
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing._internal.distributed.fake_pg import FakeStore

from dist_util import TIMEOUT, free_port, torchrun

from v4hal import ops
from v4hal.bench.cases_model import hf_model
from v4hal.cli import main as cli
from v4hal.model.config import ModelArgs, preset
from v4hal.model.generate import Sampling, generate
from v4hal.model.loader import LoadError, load_checkpoint
from v4hal.model.model import build
from v4hal.model.parallel import Layout, LayoutError, scale_split
from v4hal.model.plan import weight_bytes

MLA = dict(model_type="deepseek_v3", vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
           n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
           max_position_embeddings=1024, torch_dtype="float32", attention_bias=True)
# tiny V4 with 4 output projection groups, so that tp=4 fits
CONFIGS = {"v4": preset("tiny").replace(o_groups=4).to_dict(),
           "v32": {**MLA, "model_type": "deepseek_v32", "index_n_heads": 8, "index_head_dim": 16, "index_topk": 6},
           "v3": MLA,
           # block-FP8 (128 x 128) V4 whose tp=2 splits fall on whole blocks (tp=4 would cut them)
           "v4fp8": preset("tiny").replace(hidden_size=256, head_dim=128, q_lora_rank=128, o_groups=2, o_lora_rank=128,
                                           moe_intermediate_size=256, index_head_dim=32).to_dict()}
WORLDS = {"v4fp8": (2,)}  # the launches a checkpoint joins (default: all)
# FP8 logits are compared by cosine (DESIGN.md's accept line), not 1e-5, and tokens not at all:
# a float32 rounding difference (partial sums in another order, a GEMM over other rows) flips
# activations' FP8 codes and then the near-tied routers of a random model. The single-process
# FP8 run differs from itself that much between batch 2 and batch 4 (cosine 0.994, measured);
# the layouts here gave 0.993 to 0.999.
FP8_TOLERANCE = {"v4fp8": 0.99}
# (layout, checkpoint): "hf" the transformers checkpoint, "mp" its `convert run --mp world` output
LAUNCHES = {w: [(Layout(tp=w), "hf"), (Layout(ep=w, dp=w), "hf"), (Layout(tp=w, ep=w), "hf"), (Layout(tp=w, ep=w), "mp")]
            for w in (2, 4)}
BATCH, PROMPT, DECODE, NEW = 4, 13, 16, 6  # a prompt crossing the tiny windows, decode steps, greedy tokens


def _ids(args: ModelArgs) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (BATCH, PROMPT + DECODE), generator=torch.Generator().manual_seed(1))


def _run(model, ids: torch.Tensor) -> dict:
    """Prefill logits, each decode step's logits, and greedy tokens."""
    with torch.no_grad():
        cache = model.new_cache()
        steps = [model(ids[:, :PROMPT], cache=cache)]
        steps += [model(ids[:, i:i + 1], cache=cache) for i in range(PROMPT, ids.shape[1])]
        tokens = generate(model, ids[:, :PROMPT].tolist(), NEW, Sampling(temperature=0.0)).tokens
    return {"logits": torch.cat(steps, dim=1), "tokens": tokens}


def _rows(layout: Layout, rank: int) -> slice:
    """The sequences a rank runs: all of them, or with dp its own share."""
    per = BATCH // layout.dp
    return slice(rank // layout.tp * per, (rank // layout.tp + 1) * per)


def _source(path: str, kind: str, world: int) -> str:
    return path if kind == "hf" else f"{path}-mp{world}"


def _quantize_fp8(path) -> None:
    """Rewrite the checkpoint in `path` as DeepSeek ships FP8: every linear weight e4m3 with a
    `.scale` per 128 x 128 block (routed experts one by one), except embeddings, head, norms,
    router, the compressors and the indexer's weights_proj (bf16 on disk)."""
    (shard,) = path.glob("*.safetensors")
    tensors, out = load_file(shard), {}

    def fp8(name, weight):
        out[name], out[name[:-len("weight")] + "scale"] = ops.quantize_fp8(weight, (128, 128))

    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, N, K] -> experts.{e}.{proj}.weight
            for e, w in enumerate(t):
                if name.endswith("down_proj"):
                    fp8(name.replace("down_proj", f"{e}.down_proj.weight"), w)
                else:
                    for proj, half in zip(("gate_proj", "up_proj"), w.chunk(2)):
                        fp8(name.replace("gate_up_proj", f"{e}.{proj}.weight"), half)
        elif t.dim() == 2 and name.endswith(".weight") and not any(
                k in name for k in ("norm", "embed", "head.", ".gate.weight", "compressor.", "weights_proj")):
            fp8(name, t)
        else:
            out[name] = t
    shard.unlink()
    save_file({k: v.contiguous() for k, v in out.items()}, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config))


def _worker(rank, world, port, cases, ckpts, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT))
    try:
        for layout, kind in cases:
            for name, path in ckpts.items():
                path = _source(path, kind, world)
                args = ModelArgs.from_json(path)
                model = build(args, layout=layout, timeout_s=TIMEOUT)
                load_checkpoint(model, path, args)  # this rank's slices (or its own files) only
                out = _run(model, _ids(args)[_rows(layout, rank)])
                out["held"] = model.held_bytes()
                torch.save(out, os.path.join(out_dir, f"{name}.{layout}.{kind}.{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, port, *args) in `world` processes; fail (never hang) past TIMEOUT."""
    ctx = mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed run did not finish within {TIMEOUT} s")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint directory, single-process result); beside each, its resharded copies."""
    out = {}
    for name, cfg in CONFIGS.items():
        path = tmp_path_factory.mktemp(name)
        hf_model(ModelArgs.from_dict(cfg), seed=0).save_pretrained(path)
        if name == "v4fp8":
            _quantize_fp8(path)
        for world in WORLDS.get(name, LAUNCHES):
            assert cli(["convert", "run", "--to", "copy", "--mp", str(world), str(path), f"{path}-mp{world}"]) == 0
        args = ModelArgs.from_json(path)
        model = build(args)
        load_checkpoint(model, path, args)
        out[name] = (str(path), _run(model, _ids(args)))
    return out


@pytest.mark.parametrize("world", list(LAUNCHES))
def test_parallel_layouts_match_one_process(world, checkpoints, tmp_path):
    runs = {n: c for n, c in checkpoints.items() if world in WORLDS.get(n, LAUNCHES)}
    spawn(_worker, world, LAUNCHES[world], {n: p for n, (p, _) in runs.items()}, str(tmp_path))
    for lay, kind in LAUNCHES[world]:
        for name, (path, ref) in runs.items():
            planned = sum(weight_bytes(ModelArgs.from_json(path), lay).values())
            for rank in range(world):
                got = torch.load(tmp_path / f"{name}.{lay}.{kind}.{rank}.pt")
                rows, case = _rows(lay, rank), f"{name} {lay} from {kind}, rank {rank}"
                if name in FP8_TOLERANCE:
                    a, b = got["logits"].double().flatten(), ref["logits"][rows].double().flatten()
                    cosine = float(a @ b / a.norm() / b.norm())
                    assert cosine > FP8_TOLERANCE[name], f"{case}: cosine {cosine} to the single-process FP8 logits"
                else:
                    torch.testing.assert_close(got["logits"], ref["logits"][rows], rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"{case}: {m}")
                    assert got["tokens"] == ref["tokens"][rows], case
                assert got["held"] == planned, f"{case}: holds {got['held']} bytes, plan says {planned}"


@pytest.mark.parametrize("layout", [Layout(), Layout(tp=2), Layout(ep=2, dp=2), Layout(tp=4, ep=4)])
def test_a_resharded_checkpoint_is_refused_under_another_layout(layout, checkpoints):
    path = f"{checkpoints['v3'][0]}-mp2"
    args = ModelArgs.from_json(path)
    if layout.devices > 1:  # this rank's model, the other ranks stood in for by torch's fake group
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=layout.devices)
    try:
        model = build(args, layout=layout)
        with pytest.raises(LoadError, match=rf"resharded for 2 ranks \(convert run --mp 2\) and loads only under "
                                            rf"torchrun --nproc-per-node 2 with --tp 2 --ep 2; this run's layout is "
                                            rf"{layout} \({layout.devices} process"):
            load_checkpoint(model, path, args)
    finally:
        if layout.devices > 1:
            dist.destroy_process_group()


def test_generate_under_torchrun_from_resharded_output(checkpoints):
    path, ref = checkpoints["v4"]
    prompt = _ids(ModelArgs.from_json(path))[0, :PROMPT].tolist()
    run = torchrun(["generate", "--tp", "2", "--ep", "2", "--dist-timeout", "60", "--config", f"{path}-mp2",
                    "--weights", f"{path}-mp2", "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(NEW)])
    assert run.returncode == 0, run.stderr
    assert f"[0] generated: {ref['tokens'][0]}" in run.stdout, run.stdout
    planned = sum(weight_bytes(ModelArgs.from_json(path), Layout(tp=2, ep=2)).values())
    assert "process group: gloo, 2 ranks" in run.stdout, run.stdout
    for rank in (0, 1):
        assert f"rank {rank} on cpu: weights {planned:,.0f} bytes held" in run.stdout, run.stdout
        assert f"plan predicts {planned:,.0f}" in run.stdout


def _rank_env(rank: int, world: int, port: int) -> dict:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def _generate_rank0(path: str, world: int, port: int, *extra: str) -> subprocess.CompletedProcess:
    """`v4hal generate --tp 2` as rank 0 of `world`, failing the test if it outlives TIMEOUT."""
    cmd = [sys.executable, "-m", "v4hal.cli", "generate", "--tp", "2", "--dist-timeout", "3", "--config", path,
           "--weights", path, "--prompt-ids", "1,2,3", "--max-new-tokens", "2", *extra]
    return subprocess.run(cmd, env=_rank_env(0, world, port), capture_output=True, text=True, timeout=TIMEOUT)


def test_a_rank_that_never_joins_is_an_error_after_the_timeout(checkpoints):
    run = _generate_rank0(checkpoints["v3"][0], 2, free_port())
    assert run.returncode == 2, run.stderr
    assert ("v4hal generate: error: layout tp=2 ep=1 pp=1 dp=1: not every one of the 2 processes joined "
            "within 3 s") in run.stderr, run.stderr


def test_a_rank_that_dies_is_an_error_on_its_peers(checkpoints):
    port = free_port()
    dies = "import os, torch.distributed as d; d.init_process_group('gloo'); os._exit(3)"
    peer = subprocess.Popen([sys.executable, "-c", dies], env=_rank_env(1, 2, port))
    try:
        run = _generate_rank0(checkpoints["v3"][0], 2, port)
    finally:
        peer.wait(timeout=TIMEOUT)
    assert run.returncode == 2, run.stderr
    assert ("v4hal generate: error: layout tp=2 ep=1 pp=1 dp=1: rank 0 stopped in a collective:" in run.stderr
            and "another rank died or stalled; collectives wait --dist-timeout 3 s" in run.stderr), run.stderr


def test_a_process_group_backend_of_another_device_is_refused(checkpoints):
    run = _generate_rank0(checkpoints["v3"][0], 2, free_port(), "--dist-backend", "nccl")
    assert run.returncode == 2, run.stderr
    assert ("v4hal generate: error: --dist-backend nccl: the model runs on cpu, whose process-group backend "
            "is gloo; nccl needs cuda devices") in run.stderr, run.stderr


def test_a_world_of_another_size_is_refused(checkpoints):
    run = _generate_rank0(checkpoints["v3"][0], 4, free_port())
    assert run.returncode == 2, run.stderr
    assert "layout tp=2 ep=1 pp=1 dp=1: needs 2 processes, torchrun started 4 (--nproc-per-node 2)" in run.stderr


@pytest.mark.parametrize("layout, setting", [(Layout(tp=3), "tp=3 must divide the 4 attention heads"),
                                              (Layout(ep=3, dp=3), "ep=3 must divide the 8 routed experts"),
                                              (Layout(tp=4), "tp=4 must divide the 2 output projection groups"),
                                              (Layout(tp=2, ep=4), "ep=4 cannot exceed tp\\*dp=2"),
                                              (Layout(tp=2, pp=2), "pp=2"), (Layout(tp=2, dp=2, ep=4), "dp=2")])
def test_layouts_that_do_not_fit_name_the_setting(layout, setting):
    with pytest.raises(LayoutError, match=setting):
        build(preset("tiny"), layout=layout)


@pytest.mark.parametrize("change, layout, setting", [
    (dict(vocab_size=511), Layout(tp=2), "tp=2 must divide the 511 vocabulary entries"),
    (dict(index_n_heads=3), Layout(tp=2), "tp=2 must divide the 3 indexer heads"),
    (dict(o_groups=4, moe_intermediate_size=34), Layout(tp=4), "tp=4 must divide the 34 shared expert columns"),
    (dict(o_groups=4, n_shared_experts=2, moe_intermediate_size=18), Layout(tp=4),
     "tp\\*dp=4 must divide the 18 expert columns"),
    (dict(n_routed_experts=6, n_group=2), Layout(tp=4, ep=4), "ep=4 must divide the 6 routed experts")])
def test_every_split_is_checked_naming_the_setting(change, layout, setting):
    with pytest.raises(LayoutError, match=setting):
        Layout.check(layout, preset("tiny").replace(**change))


def test_dense_mlp_split_is_checked():
    with pytest.raises(LayoutError, match="tp=4 must divide the 90 dense MLP columns"):
        Layout(tp=4).check(ModelArgs.from_dict({**MLA, "intermediate_size": 90}))


def test_a_layout_needs_its_processes():
    with pytest.raises(LayoutError, match="run under torchrun"):
        build(preset("tiny"), layout=Layout(tp=2))


def test_quantization_scales_are_sliced_with_their_weights():
    # FP8 [256, 384] weight, [2, 3] block scales: a column split of rows at 128 takes scale row 1
    assert scale_split("w.scale", (0, [(128, 256)]), (256, 384), (2, 3), True, Layout(tp=2)) == (0, [(1, 2)])
    # the last block may be partial: rows [192, 300) of 300 are scale rows 1..2 (blocks 128 wide)
    assert scale_split("w.scale", (0, [(128, 300)]), (300, 64), (3, 1), True, Layout(tp=2)) == (0, [(1, 3)])
    # int8 per-row scale [N, 1] under a row-parallel (column) split stays whole
    assert scale_split("w.scale", (1, [(32, 64)]), (16, 64), (16, 1), False, Layout(tp=2)) is None
    # MXFP4 experts [E, N, K/2] bytes with [E, N, K/32] scales: 16 bytes per scale
    assert scale_split("e.scale", (2, [(16, 32)]), (4, 8, 32), (4, 8, 2), False, Layout(tp=2)) == (2, [(1, 2)])


def test_a_split_through_an_fp8_block_is_refused_naming_tensor_and_layout():
    with pytest.raises(LayoutError, match=r"q_b_proj.scale: layout tp=2 ep=1 pp=1 dp=1 cuts dimension 0 at \[64, 128\)"):
        scale_split("model.layers.0.self_attn.q_b_proj.scale", (0, [(64, 128)]), (128, 32), (1, 1), True, Layout(tp=2))
