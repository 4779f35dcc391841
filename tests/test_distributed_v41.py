"""DeepSeek-V4.1 under tensor parallelism on CPU (gloo, 2 ranks): each rank holds only its hash
columns' rows of every Engram table (vLLM's split: ceil(columns / tp) columns per rank, here 3
columns so the last rank's piece is one short) and its share of `kv_proj`, and the model gives the
single-process logits for a prefill and 16 decode steps, the same greedy tokens, and the same
tokens from `v4hal generate --tp 2` under torchrun; so does the checkpoint resharded by
`convert run --mp 2`, whose rank files hold only their rows. The model has V4.1's shared
compressed caches (ratio-2 and ratio-1 sources and readers), so these run split too. Under data
parallelism (ep = dp = 2, tp = 1) each rank runs its own prompts (other batch sizes and lengths)
and still holds only its hash columns' rows: every rank looks up its columns for both ranks'
tokens, and each gets the single-process logits and tokens of its own prompts. Under each layout
a decode step makes, rank by rank, the collectives (kind and bytes) `bench.distributed` computes
for docs/distributed.md's communication table, the Engram exchanges included."""

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_util import TIMEOUT, free_port
from v4hal.bench.distributed import collectives, engram_collectives
from test_distributed import BATCH, DECODE, PROMPT, _run, spawn
from test_model_v41 import IMAGE, _v41_topology
from v4hal.cli import main
from v4hal.model.config import ModelArgs
from v4hal.model.engram import ColumnShard, EngramArgs
from v4hal.model.generate import Sampling, generate
from v4hal.model.collectives import recording
from v4hal.model.loader import load_checkpoint
from v4hal.model.model import build
from v4hal.model.parallel import Layout, LayoutError
from v4hal.model.save import save_checkpoint

NEW = 6
# data parallelism: rank -> (its sequences of _ids, its prompt length): token counts differ by rank
DP_PROMPTS = {0: (slice(0, 2), PROMPT), 1: (slice(2, 3), PROMPT - 5)}
DP_DECODE, DP_NEW = 4, 3
DP_BATCH = 2  # sequences per rank in the data-parallel decode step whose collectives are counted
LAYOUTS = {"hf": Layout(tp=2), "mp": Layout(tp=2, ep=2), "dp": Layout(ep=2, dp=2)}


def v41_args(**changes) -> ModelArgs:
    """Engram on layers 1 and 3 with 4-grams of one head: 3 hash columns per layer."""
    args = _v41_topology(**changes)
    return args.replace(torch_dtype="float32", extra={**args.extra, "engram_max_ngram_size": 4, "engram_n_heads": 1})


def _ids(args) -> torch.Tensor:
    ids = torch.randint(0, args.vocab_size, (BATCH, PROMPT + DECODE), generator=torch.Generator().manual_seed(1))
    ids[1, 4], ids[2, PROMPT + 2] = IMAGE, IMAGE  # dead tokens, in the prompt and in a decode step
    return ids


def _dp_ids(args, rank: int) -> tuple[torch.Tensor, int]:
    rows, prompt = DP_PROMPTS[rank]
    return _ids(args)[rows, : prompt + DP_DECODE], prompt


def _run_prompt(model, ids: torch.Tensor, prompt: int) -> dict:
    """Prefill `prompt` tokens, decode the rest one by one, then greedy tokens after the prompt."""
    with torch.no_grad():
        cache = model.new_cache()
        steps = [model(ids[:, :prompt], cache=cache)]
        steps += [model(ids[:, i:i + 1], cache=cache) for i in range(prompt, ids.shape[1])]
        tokens = generate(model, ids[:, :prompt].tolist(), DP_NEW, Sampling(temperature=0.0)).tokens
    return {"logits": torch.cat(steps, dim=1), "tokens": tokens}


def _decode_collectives(model, ids: torch.Tensor) -> list[tuple[str, int]]:
    """The collectives the decode step of `ids`' last token makes, after a prefill of the rest."""
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :-1], cache=cache)
        with recording() as made:
            model(ids[:, -1:], cache=cache)
    return made


def _worker(rank, world, port, path, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT))
    try:
        for kind, source in (("hf", path), ("mp", f"{path}-mp{world}"), ("dp", path)):
            layout = LAYOUTS[kind]
            args = ModelArgs.from_json(source)
            model = build(args, layout=layout, timeout_s=TIMEOUT)
            report = load_checkpoint(model, source, args)
            out = _run_prompt(model, *_dp_ids(args, rank)) if kind == "dp" else _run(model, _ids(args))
            out["token_map"] = report.engram_token_map
            out["tables"] = {i: tuple(model.model.layers[i].engram.embed.weight.shape) for i in (1, 3)}
            out["kv_proj"] = tuple(model.model.layers[1].engram.kv_proj.weight.shape)
            own = slice(rank * DP_BATCH, (rank + 1) * DP_BATCH) if kind == "dp" else slice(None)  # equal token counts
            out["decode_collectives"] = _decode_collectives(model, _ids(args)[own, : PROMPT + 1])
            torch.save(out, os.path.join(out_dir, f"{kind}.{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny V4.1 checkpoint (float32, random weights and token map) and its single-process run."""
    args = v41_args()
    model = build(args).init_random(0)
    model.set_engram_token_map(torch.randint(0, 300, (512,), generator=torch.Generator().manual_seed(4)))
    path = tmp_path_factory.mktemp("v41") / "ckpt"
    save_checkpoint(model, args, path)
    assert main(["convert", "run", "--to", "copy", "--mp", "2", "--no-progress", str(path), f"{path}-mp2"]) == 0
    return str(path), _run(model, _ids(args))


@pytest.mark.parametrize("kind", ["hf", "mp"])
def test_tp2_splits_the_tables_by_hash_columns_and_gives_the_single_process_logits(kind, checkpoint, runs):
    path, ref = checkpoint
    ea = EngramArgs(ModelArgs.from_json(path))
    assert ea.columns == 3 and ea.primes[0] == [[71], [73], [79]]
    for rank in range(2):
        got = torch.load(runs / f"{kind}.{rank}.pt")
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{kind} rank {rank}: {m}")
        assert got["tokens"] == ref["tokens"] and got["token_map"] == "engram_token_map.json"
        # rank 0: columns 0-1 (primes 71 + 73 rows); rank 1: column 2 (79 rows) and a zero-padded column
        expected_rows = {0: (71 + 73, 83 + 89), 1: (79, 97)}[rank]
        assert tuple(rows for rows, _ in got["tables"].values()) == expected_rows
        assert sum(expected_rows) == ea.table_rows(2, rank) < sum(ea.num_embeddings)
        assert got["kv_proj"] == ((4 + 1) * 64 // 2, 3 * 32)  # column parallel: half of (hc_mult + 1) * hidden


def test_dp2_splits_the_tables_by_hash_columns_and_each_rank_gets_its_own_prompts_logits(checkpoint, runs):
    path = checkpoint[0]
    args = ModelArgs.from_json(path)
    model = build(args)
    load_checkpoint(model, path, args)
    for rank in range(2):
        ref, got = _run_prompt(model, *_dp_ids(args, rank)), torch.load(runs / f"dp.{rank}.pt")
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"dp rank {rank}: {m}")
        assert got["tokens"] == ref["tokens"]
        # the same hash-column rows as tp=2 (test above), kv_proj whole
        rows = tuple(rows for rows, _ in got["tables"].values())
        assert rows == {0: (71 + 73, 83 + 89), 1: (79, 97)}[rank]
        assert sum(rows) == EngramArgs(args).table_rows(2, rank)  # what `plan` counts
        assert got["kv_proj"] == ((4 + 1) * 64, 3 * 32)


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory):
    """Both ranks' results at tp=2, from the checkpoint and from its `convert run --mp 2` output,
    and at ep = dp = 2 (`DP_PROMPTS`)."""
    out = tmp_path_factory.mktemp("v41-runs")
    spawn(_worker, 2, checkpoint[0], str(out))
    return out


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_a_decode_step_makes_the_computed_collectives(kind, checkpoint, runs):
    args, layout = ModelArgs.from_json(checkpoint[0]), LAYOUTS[kind]
    tokens = DP_BATCH if layout.dp > 1 else BATCH
    computed = collectives(args, layout, PROMPT + 1, tokens=tokens, act_bytes=4)  # float32 model
    made = [torch.load(runs / f"{kind}.{rank}.pt")["decode_collectives"] for rank in range(2)]
    # the Engram exchanges by hand: 2 of the 3 hash columns per rank, 32 values each; layers 1 and 3
    if layout.dp > 1:  # token counts and 2 layers' hashed rows (int64) gathered; looked-up columns back
        engram = ([("all_gather", 2 * 8), ("all_gather", 2 * 2 * tokens * 3 * 8)],
                  dict.fromkeys((1, 3), [("all_to_all", 2 * tokens * 2 * 32 * 4)]))
    else:  # looked-up columns gathered, then the (hc_mult + 1) * hidden kv_proj outputs
        engram = [], dict.fromkeys((1, 3), [("all_gather", tokens * 2 * 2 * 32 * 4), ("all_gather", tokens * 5 * 64 * 4)])
    assert EngramArgs(args).columns == 3 and engram_collectives(args, layout, tokens, 4) == engram
    # the MoE's rows back depend on the routing (computed for an even spread): their sum over ranks
    # is the rows sent; every other collective matches rank by rank
    back = {i + 2 for i, c in enumerate(computed) if c == ("all_to_all", args.n_routed_experts * 8)}
    for rank in range(2):
        assert [k for k, _ in made[rank]] == [k for k, _ in computed], f"{kind} rank {rank}"
        assert [c for i, c in enumerate(made[rank]) if i not in back] == [c for i, c in enumerate(computed) if i not in back]
    for i in back:
        assert made[0][i][1] + made[1][i][1] == 2 * computed[i][1]


def test_convert_mp2_writes_each_rank_only_its_hash_columns_rows(checkpoint):
    from safetensors import safe_open

    path = checkpoint[0]
    for rank, rows in ((0, (71 + 73, 83 + 89)), (1, (79, 97))):
        (shard,) = Path(f"{path}-mp2").glob(f"model{rank}-mp2-*.safetensors")
        with safe_open(str(shard), "pt") as f:
            assert tuple(f.get_slice(f"model.layers.{i}.engram.embed.weight").get_shape()[0] for i in (1, 3)) == rows
            assert f.get_slice("model.layers.1.engram.kv_proj.weight").get_shape() == [160, 96]


def test_generate_under_torchrun_with_tp2(checkpoint):
    path, ref = checkpoint
    prompt = _ids(ModelArgs.from_json(path))[1, :PROMPT].tolist()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "v4hal.cli", "generate", "--tp", "2", "--dist-timeout", "60", "--config", path, "--weights", path,
           "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(NEW)]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr
    assert f"[0] generated: {ref['tokens'][1]}" in run.stdout, run.stdout
    assert "Engram token map from engram_token_map.json" in run.stdout
    # each rank's bytes held beside plan's prediction for that rank, its Engram rows in host memory
    # shown apart: rank 0 holds 71 + 73 and 83 + 89 rows of 32 float32 values, rank 1 79 and 97
    lines = re.findall(r"rank (\d) on cpu: weights ([\d,]+) bytes held .*, plan predicts ([\d,]+) "
                       r"\(([\d,]+) device weights \+ ([\d,]+) Engram tables in host memory\)", run.stdout)
    assert [r for r, *_ in lines] == ["0", "1"], run.stdout
    for rank, held, predicted, device, host in lines:
        held, predicted, device, host = (int(x.replace(",", "")) for x in (held, predicted, device, host))
        assert held == predicted == device + host, run.stdout
        assert host == {"0": 71 + 73 + 83 + 89, "1": 79 + 97}[rank] * 32 * 4


def test_column_shards_and_a_split_that_leaves_a_rank_without_columns():
    ea = EngramArgs(v41_args())
    assert [ColumnShard.of(ea, 1, 2, r) for r in (0, 1)] == [ColumnShard(3, 0, 2, 2, 0, 83 + 89),
                                                              ColumnShard(3, 2, 3, 2, 83 + 89, 83 + 89 + 97)]
    with pytest.raises(LayoutError, match=r"tp=4 leaves ranks without Engram hash columns: 3 "
                                          r"\(\(engram_max_ngram_size - 1\) \* engram_n_heads\) in pieces of 1"):
        Layout(tp=4).check(v41_args().replace(o_groups=4))
    with pytest.raises(LayoutError, match=r"tp\*dp=4 leaves ranks without Engram hash columns: 3 "):
        Layout(ep=4, dp=4).check(v41_args())
    with pytest.raises(LayoutError, match=r"tp=2 must divide the 325 Engram kv_proj outputs \(\(hc_mult \+ 1\) \* hidden_size\)"):
        Layout(tp=2).check(v41_args().replace(hidden_size=65))


def test_reshard_needs_the_configs_engram_layers():
    from v4hal.conversion import reshard
    from v4hal.conversion.formats import Job
    from v4hal.conversion.output import OutSpec

    job = Job("layers.1.engram.embed.weight", "raw", "raw", [OutSpec("layers.1.engram.embed.weight", torch.uint8, (330, 32))])
    with pytest.raises(ValueError, match=r"reshard: layers.1.engram.embed.weight is a V4.1 Engram table, but the "
                                         r"checkpoint's config.json lists no such Engram layer"):
        reshard.assign([job], 2, None, None)
    reshard.assign([job], 2, None, reshard.engram_rows(v41_args().to_dict(), 2))
    assert job.split == ("rows", [(0, 71 + 73), (71 + 73, 71 + 73 + 79)])


def test_the_docs_communication_table_is_what_the_bench_prints():
    """docs/distributed.md's communication table is `python -m v4hal.bench.distributed comm`'s
    output as printed (header, layouts and rows), not a hand-edited copy."""
    from v4hal.bench.distributed import comm_table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    table = comm_table()
    assert table.splitlines()[0] in doc, table.splitlines()[0]
    assert table in doc, table
