"""Engram ops with DeepSeek-V4.1's released semantics: hash rows against known answers worked by
hand and against `released_rows` (below), identical on every backend, in chunks and in decode;
lookups (BF16 and float8 tables with ue8m0 scales); the gate; one host read; bad input.

`released_rows` is written from the released semantics (docs/engram.md, read from vLLM 0.32's
`models/deepseek_v41/common/engram.py`, `_hash_ids_kernel`) with Python's unbounded integers, one
position and one shift at a time, sharing no code with the backends. The known-answer vectors of
`test_hash_by_hand` are worked out in its docstring."""

import numpy as np
import pytest
import torch

from v4hal import ops
from v4hal.backends import registry
from v4hal.bench.host_reads import HostReads
from v4hal.model.engram import _is_prime, layer_multipliers, table_primes, token_map_from_tokenizer
from v4hal.ops._check import OpInputError

cuda_engram = registry.family_view("cuda", "engram")
BACKENDS = ["cpu", "cpu_fast", "mindspore"]


def released_rows(ids, lookback, token_map, multipliers, primes, pad_id):
    """Rows of every position's n-grams, Python ints. ids: [B][T]; lookback: [B][L] or None."""
    token_map, mult, primes = token_map.tolist(), multipliers.tolist(), primes.tolist()
    starts = [0] + list(np.cumsum([p for order in primes for p in order]))
    out = []
    for b, row in enumerate(ids.tolist()):
        history = ([] if lookback is None else lookback[b].tolist()) + row
        first = len(history) - len(row)
        out_row = []
        for t in range(len(row)):
            blocked, mix, cols = False, 0, []
            for k in range(len(mult)):
                j = first + t - k
                token = history[j] if j >= 0 else -1           # -1: before the sequence start
                source = token_map[token] if token >= 0 else -1
                blocked = blocked or source < 0                  # a dead token or the start
                mix ^= (pad_id if blocked else source) * mult[k]
                for h, p in enumerate(primes[k - 1] if k else []):
                    cols.append(mix % p + int(starts[(k - 1) * len(primes[0]) + h]))
            out_row.append(cols)
        out.append(out_row)
    return torch.tensor(out, dtype=torch.int64)


def _layout(seed=0, vocab=1000, compressed=700, max_ngram=3, heads=3, dead=(7, 99)):
    g = torch.Generator().manual_seed(seed)
    token_map = torch.randint(0, compressed, (vocab,), generator=g)
    token_map[list(dead)] = ops.DEAD
    primes = torch.tensor(table_primes(5000, 1, max_ngram, heads)[0])
    return dict(token_map=token_map, multipliers=layer_multipliers(3, compressed, max_ngram), primes=primes,
                pad_id=int(token_map[2]))


def _ids(seed, shape, vocab=1000, dead=(7, 99)):
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    ids.view(-1)[::5] = dead[0]  # dead tokens at every fifth position
    ids.view(-1)[3::11] = dead[1]
    return ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_by_hand(backend):
    """ids (5, 9, 7, 9), identity map with 7 dead, compressed pad 4, multipliers (3, 5, 11), one
    head per order with 7 rows (2-grams, rows 0-6) and 13 rows (3-grams, rows 7-19).
    t=0: 5*3=15; the start blocks: ^ 4*5 -> 27, 27 % 7 = 6; ^ 4*11 -> 55, 55 % 13 = 3 -> row 10
    t=1: 9*3=27 ^ 5*5=25 -> 2, row 2; ^ 4*11 (start) -> 46, 46 % 13 = 7 -> row 14
    t=2: 7 is dead, so every shift is pad: 4*3=12 ^ 4*5=20 -> 24, 24 % 7 = 3; ^ 44 -> 52 % 13 = 0 -> row 7
    t=3: 9*3=27; shift 1 is the dead 7: ^ 20 -> 15, 15 % 7 = 1; ^ 44 -> 35 % 13 = 9 -> row 16"""
    token_map = torch.arange(20)
    token_map[7] = ops.DEAD
    args = (token_map, torch.tensor([3, 5, 11]), torch.tensor([[7], [13]]), 4)
    with registry.forced(backend):
        rows = ops.engram_hash(torch.tensor([[5, 9, 7, 9]]), *args)
    assert rows.tolist() == [[[6, 10], [2, 14], [3, 7], [1, 16]]]
    assert torch.equal(rows, released_rows(torch.tensor([[5, 9, 7, 9]]), None, *args))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_ngram,heads", [(2, 1), (3, 2), (3, 8), (4, 5)])
def test_hashes_equal_the_released_semantics(backend, max_ngram, heads):
    """Rows with lookback ids (full, partly before the start, holding a dead token, none)."""
    s = _layout(max_ngram=max_ngram, heads=heads)
    ids = _ids(1, (4, 23))
    lookback = torch.tensor([[5, 6, 8], [-1, -1, 400], [99, 12, 13], [-1, -1, -1]])[:, 3 - (max_ngram - 1):]
    expected = released_rows(ids, lookback, **s)
    with registry.forced(backend):
        rows = ops.engram_hash(ids, lookback=lookback, **s)
        fresh = ops.engram_hash(ids, **s)
    assert rows.dtype == torch.int64 and torch.equal(rows, expected)
    assert torch.equal(fresh, released_rows(ids, None, **s))
    assert torch.equal(fresh[3], rows[3])  # all -1 lookback: the sequence starts with the chunk


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_and_decode_equal_prefill(backend):
    """A sequence hashed at once, in chunks of 5 with the ids before each chunk as lookback, and one
    token at a time keeping the last max_ngram - 1 ids: the same rows."""
    s = _layout(max_ngram=4, heads=2)
    ids = _ids(2, (2, 17))
    with registry.forced(backend):
        whole = ops.engram_hash(ids, **s)
        chunks = [ops.engram_hash(ids[:, i:i + 5], lookback=ids[:, max(0, i - 3):i], **s) for i in range(0, 17, 5)]
        steps = [ops.engram_hash(ids[:, i:i + 1], lookback=ids[:, max(0, i - 3):i], **s) for i in range(17)]
    assert torch.equal(torch.cat(chunks, 1), whole) and torch.equal(torch.cat(steps, 1), whole)
    assert torch.equal(whole, released_rows(ids, None, **s))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_rows_hash_like_each_row_alone(backend):
    """Rows of 9, 4 and 1 tokens right-padded to 9: each row's tokens hash as that row alone."""
    s = _layout()
    ids = _ids(3, (3, 9))
    lengths = [9, 4, 1]
    with registry.forced(backend):
        batch = ops.engram_hash(ids, **s)
        for b, n in enumerate(lengths):
            assert torch.equal(batch[b, :n], ops.engram_hash(ids[b:b + 1, :n], **s)[0])


def test_cuda_code_path_exercised_on_cpu():
    s = _layout()
    ids, lookback = _ids(4, (2, 11)), torch.tensor([[1, 2], [-1, 3]])
    rows = cuda_engram.engram_hash(ids, s["token_map"], s["multipliers"], s["primes"], s["pad_id"], lookback)
    assert torch.equal(rows, released_rows(ids, lookback, **s))
    table = torch.randn(int(s["primes"].sum()), 4)
    with registry.forced("cpu"):
        ref = ops.engram_lookup(rows, table)
    assert torch.equal(cuda_engram.engram_lookup(rows, table, None, torch.device("cpu"), torch.float32), ref)


def test_layout_helpers():
    assert table_primes(10, 2, 3, 2) == [[[11, 13], [17, 19]], [[23, 29], [31, 37]]]
    primes = [p for layer in table_primes(5000, 3, 4, 8) for order in layer for p in order]
    assert len(set(primes)) == len(primes) == 72 and all(_is_prime(p) and p >= 5000 for p in primes)
    m = layer_multipliers(14, 300_000, 3)
    assert m.dtype == torch.int64 and bool((m % 2 == 1).all()) and int(m.max()) * 300_000 < 2**63
    draws = np.random.default_rng(10007 * 14).integers(0, (np.iinfo(np.int64).max // 300_000) // 2, size=3)
    assert m.tolist() == (draws * 2 + 1).tolist()
    assert torch.equal(ops.engram_offsets(torch.tensor([[7, 11], [13, 17]])), torch.tensor([0, 7, 18, 31]))


def test_token_map_from_a_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = ["The", "the", "THE", " the", "é", "e", " ", "\n", "  ", "x", "Ⅸ", "ix"]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({v: i for i, v in enumerate(vocab)},
                                                                              unk_token="x")))
    token_map, size = token_map_from_tokenizer(tok)
    m = dict(zip(vocab, token_map.tolist()))
    assert m["The"] == m["the"] == m["THE"] == m[" the"] == 0   # case and surrounding space fold
    assert m["é"] == m["e"] and m["Ⅸ"] == m["ix"]                 # accents, NFKC compatibility forms
    assert m[" "] == m["\n"] == m["  "] != m["x"]                 # a lone (folded) space stays a token
    assert size == len(set(token_map.tolist())) == 5   # the, e, space, x, ix
    raw, raw_size = token_map_from_tokenizer(tok.backend_tokenizer)  # a tokenizers.Tokenizer, as a checkpoint holds it
    assert torch.equal(raw, token_map) and raw_size == size


@pytest.mark.parametrize("backend", BACKENDS)
def test_lookup_by_hand(backend):
    table = torch.arange(2 * 10, dtype=torch.float32).reshape(10, 2)  # row r = (2r, 2r+1)
    rows = torch.tensor([[[2, 3, 8], [0, 6, 9]]])
    with registry.forced(backend):
        out = ops.engram_lookup(rows, table, primes=torch.tensor([[3, 4, 3]]))  # rows 0-2, 3-6, 7-9
    assert out.tolist() == [[[4, 5, 6, 7, 16, 17], [0, 1, 12, 13, 18, 19]]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_kind", ["uint8", "e8m0", "float32"])
def test_float8_table_with_block_scales(backend, scale_kind):
    """DeepSeek's tables: e4m3 values, one ue8m0 scale per 32 columns; the reference dequantizes
    in float64 (exact: a power of two times an e4m3 value)."""
    g = torch.Generator().manual_seed(5)
    values = (torch.randn(40, 64, generator=g) * 100).to(torch.float8_e4m3fn)
    exponents = torch.randint(110, 140, (40, 2), generator=g, dtype=torch.uint8)
    scale = {"uint8": exponents, "e8m0": exponents.view(torch.float8_e8m0fnu),
             "float32": torch.exp2(exponents.float() - 127)}[scale_kind]
    rows = torch.randint(0, 40, (2, 3, 4), generator=g)
    factors = torch.exp2(exponents.double() - 127).repeat_interleave(32, 1)
    expected = (values.double() * factors)[rows].flatten(-2)
    with registry.forced(backend):
        out = ops.engram_lookup(rows, values, scale, dtype=torch.float32)
        default = ops.engram_lookup(rows, values, scale)
    assert torch.equal(out.double(), expected) and default.dtype == torch.bfloat16
    assert torch.equal(default, expected.to(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lookup_reads_the_table_it_is_given_not_one_seen_before_at_that_address(backend):
    """Same data pointer, shape and dtype, different rows (views, a buffer rewritten outside torch,
    an in-place write): each lookup returns the rows of the table passed (mindspore caches tables)."""
    buffer = np.arange(36, dtype=np.float32).reshape(6, 6)
    table = torch.from_numpy(buffer)
    rows = torch.arange(6).view(1, 6, 1)
    with registry.forced(backend):
        for view in (table, table.t(), table.as_strided((6, 6), (1, 6)), table.as_strided((6, 3), (6, 2))):
            assert torch.equal(ops.engram_lookup(rows, view)[0], view), view.stride()
        ops.engram_lookup(rows, table)
        buffer[:] = -buffer
        fresh = torch.from_numpy(buffer)
        assert torch.equal(ops.engram_lookup(rows, fresh)[0], fresh)
        table[2, 3] = 100.0
        assert ops.engram_lookup(rows, table)[0, 2, 3] == 100.0


def test_prefetcher():
    table = torch.randn(50, 4)
    rows = torch.randint(0, 50, (2, 3, 6))
    with ops.EngramPrefetcher("cpu") as pf:
        with pytest.raises(KeyError, match="no lookup submitted"):
            pf.get(0)
        pf.submit(0, rows, table)
        pf.submit(1, torch.full((1, 2, 6), 50), table)
        with pytest.raises(ValueError, match="already submitted"):
            pf.submit(0, rows, table)
        assert torch.equal(pf.get(0), ops.engram_lookup(rows, table))
        with pytest.raises(OpInputError, match="engram_lookup: argument 'rows'"):
            pf.get(1)  # the lookup's own error reaches the consumer


@pytest.mark.cuda
def test_host_table_lookup_to_gpu():
    table = torch.randn(500, 64, dtype=torch.bfloat16)
    rows = torch.randint(0, 500, (2, 9, 6))
    with ops.EngramPrefetcher("cuda") as pf:
        pf.submit("l", rows, table)
        host = pf.get("l")
    assert host.device.type == "cuda"
    assert torch.equal(host, ops.engram_lookup(rows.cuda(), table.cuda()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_by_hand(backend):
    """One stream, D = 4: key = query = (1, 1, 1, 1) with unit norms gives <k, q>/sqrt(4) = 2, so
    g = sigmoid(sqrt(2)); key = -query gives sigmoid(-sqrt(2)); a token with keep False gets 0."""
    q = torch.ones(1, 3, 1, 4, dtype=torch.float64)
    key = torch.cat([q[:, :1], -q[:, 1:]], 1)
    value = torch.tensor([[[1.0, 2, 3, 4]] * 3], dtype=torch.float64)
    w = torch.ones(1, 4, dtype=torch.float64)
    with registry.forced(backend):
        out = ops.engram_gate(q, key, value, w, w, 1e-12, keep=torch.tensor([[True, True, False]]))
    g = torch.sigmoid(torch.tensor([2.0 ** 0.5, -(2.0 ** 0.5), 0.0], dtype=torch.float64))
    g[2] = 0.0
    torch.testing.assert_close(out[0, :, 0], g.unsqueeze(-1) * value[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_equals_the_reference_and_propagates_nan(backend):
    g = torch.Generator().manual_seed(3)
    hidden, key = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    value, kn, qn = torch.randn(2, 8, generator=g), torch.rand(4, 8, generator=g), torch.rand(4, 8, generator=g)
    hidden[0, 1, 2] = float("nan")
    with registry.forced("cpu"):
        ref = ops.engram_gate(hidden.double(), key.double(), value.double(), kn.double(), qn.double())
    with registry.forced(backend):
        out = ops.engram_gate(hidden, key, value, kn, qn)
    assert torch.equal(ref.isnan(), torch.zeros_like(ref, dtype=torch.bool).index_fill_(1, torch.tensor([1]), True)
                       & (torch.arange(2) == 0).view(2, 1, 1))
    torch.testing.assert_close(out, ref.float(), equal_nan=True)


@pytest.mark.parametrize("backend", ["cpu", "cpu_fast"])
def test_one_host_read_for_the_checks(backend):
    s = _layout()
    ids, lookback = _ids(6, (2, 7)), torch.tensor([[1, 2], [-1, 3]])
    table = torch.randn(int(s["primes"].sum()), 32).to(torch.float8_e4m3fn)
    scale = torch.full((table.shape[0], 1), 127, dtype=torch.uint8)
    with registry.forced(backend):
        rows = ops.engram_hash(ids, lookback=lookback, **s)
        with HostReads() as hash_reads:
            ops.engram_hash(ids, lookback=lookback, **s)
        with HostReads() as lookup_reads:
            ops.engram_lookup(rows, table, scale, primes=s["primes"])
    assert hash_reads.checks == 1, hash_reads.where
    assert lookup_reads.checks == 1, lookup_reads.where


def test_bad_input_names_op_and_argument():
    s = _layout()
    ok = torch.tensor([[1, 2]])
    cases = [
        (dict(token_ids=torch.tensor([[1, 1000]])), r"engram_hash: argument 'token_ids' expected values in \[0, 999\]"),
        (dict(token_ids=torch.tensor([[-1, 3]])), r"'token_ids' expected values in \[0, 999\]"),
        (dict(lookback=torch.tensor([[-2, 3]])), r"'lookback' expected values in \[-1, 999\]"),
        (dict(token_map=torch.full((1000,), -3)), r"'token_map' expected values in \[-1, "),
        (dict(token_map=s["token_map"][:500], token_ids=torch.tensor([[600]])), r"'token_ids' expected values in \[0, 499\]"),
        (dict(primes=s["primes"][:1]), r"'primes' expected shape \(2, 3\)"),
        (dict(primes=s["primes"] * 0 + 1), r"'primes' expected values in \[2, "),
        (dict(multipliers=torch.tensor([2**62 + 1, 3, 5])), r"'multipliers' expected positive multipliers with id"),
        (dict(multipliers=torch.tensor([0, 3, 5])), r"'multipliers' expected positive"),
        (dict(pad_id=-1), r"'pad_id' expected a non-negative int"),
        (dict(lookback=torch.tensor([[1]] * 3)), r"'lookback' expected batch size"),
    ]
    for change, message in cases:
        args = dict(token_ids=ok, **s)
        args.update(change)
        with pytest.raises(OpInputError, match=message):
            ops.engram_hash(**args)
    table = torch.randn(int(s["primes"].sum()), 32)
    rows = torch.zeros(1, 6, dtype=torch.int64)
    with pytest.raises(OpInputError, match=r"engram_lookup: argument 'rows' expected values in \[0, "):
        ops.engram_lookup(rows + table.shape[0], table)
    with pytest.raises(OpInputError, match=r"engram_lookup: argument 'table' expected at least the rows .* got 100 rows for"):
        ops.engram_lookup(rows, table[:100], primes=s["primes"])
    with pytest.raises(OpInputError, match=r"engram_lookup: argument 'rows' expected one row per \(order, head\)"):
        ops.engram_lookup(rows[:, :4], table, primes=s["primes"])
    fp8 = table.to(torch.float8_e4m3fn)
    with pytest.raises(OpInputError, match=r"engram_lookup: argument 'scale' expected a torch.Tensor"):
        ops.engram_lookup(rows, fp8)
    with pytest.raises(OpInputError, match=r"engram_lookup: argument 'scale' expected shape"):
        ops.engram_lookup(rows, fp8, torch.zeros(table.shape[0], 2, dtype=torch.uint8))
    hidden = torch.randn(2, 4, 8)
    with pytest.raises(OpInputError, match=r"engram_gate: argument 'key_norm' expected shape \(4, 8\).*4 streams"):
        ops.engram_gate(hidden, hidden, torch.randn(2, 8), torch.ones(3, 8), torch.ones(4, 8))
    with pytest.raises(OpInputError, match=r"engram_gate: argument 'keep' expected shape \(2,\)"):
        ops.engram_gate(hidden, hidden, torch.randn(2, 8), torch.ones(4, 8), torch.ones(4, 8), keep=torch.ones(3, dtype=torch.bool))
