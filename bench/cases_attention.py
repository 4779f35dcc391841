"""Parity and speed cases for the sparse-attention family: small quick cases, and the real
V4-Flash / V4-Pro / V3.2 shapes (heads, head dims, index heads, top-k, ratios) for prefill (many
queries) and decode (one query against a long cache). Top-k outputs are judged tie-aware
(docs/parity.md): a differing index passes only if its reference score is within tolerance of the
k-th best reference score."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from v4hal import ops
from v4hal.backends import registry
from v4hal.bench.cases import SHAPES, Case, SpeedCase, Tolerance, randn
from v4hal.bench.peers_cuda import torch_path

F32 = Tolerance.for_dtype(torch.float32)
# Index outputs are judged by the tie-aware `check` below, not element by element: this
# tolerance only keeps the harness's shape and NaN checks.
BY_CHECK = Tolerance("close", rtol=0.0, atol=float("inf"))


def _tol(dtype: torch.dtype, reduction: int) -> Tolerance:
    return Tolerance.for_dtype(dtype, reduction)


# ------------------------------------------------------------------------------ tie-aware top-k


def topk_agrees(ref_idx: torch.Tensor, out_idx: torch.Tensor, scores: torch.Tensor, atol: float) -> tuple[bool, str]:
    """Judge a top-k index output against the reference one, given the reference scores
    `[B, S, T]` (float64). Passes when every row has the same number of valid (>= 0) slots, no
    duplicates, valid slots first, and every index the reference did not pick scores within `atol`
    of the reference's k-th best score of that row."""
    if out_idx.shape != ref_idx.shape:
        return False, f"top-k shape {tuple(out_idx.shape)} != reference {tuple(ref_idx.shape)}"
    t = scores.shape[-1]

    def mask(idx):
        m = torch.zeros(*idx.shape[:-1], t + 1, dtype=torch.bool)
        return m.scatter_(-1, torch.where(idx >= 0, idx.long(), t), True)[..., :t]

    nref, nout = (ref_idx >= 0).sum(-1), (out_idx >= 0).sum(-1)
    if not torch.equal(nref, nout):
        return False, f"{int((nref != nout).sum())} row(s) with a different number of visible entries"
    if int(out_idx.max()) >= t:
        return False, f"index {int(out_idx.max())} out of range [0, {t})"
    valid_first = ((out_idx >= 0).int().diff(dim=-1) <= 0).all()
    if not bool(valid_first):
        return False, "a -1 slot before a valid index"
    rm, om = mask(ref_idx), mask(out_idx)
    if not torch.equal(om.sum(-1), nout):
        return False, "duplicate indices in a row"
    kth = torch.where(rm, scores, float("inf")).amin(-1, keepdim=True)
    extra = om & ~rm
    short = extra & (scores < kth - atol)
    if bool(short.any()):
        worst = float((kth - scores).masked_fill(~short, 0).max())
        return False, f"{int(short.sum())} index(es) outside the tie band (worst {worst:.2e} below the k-th score)"
    return True, f"{int(extra.sum())} index(es) differ within ties" if bool(extra.any()) else ""


def _score_atol(scores: torch.Tensor, reduction: int) -> float:
    return 1e-6 * reduction ** 0.5 * max(1.0, float(scores.abs().max()))


# ---------------------------------------------------------------------------------------- inputs


def _positions(b: int, s: int, start: int) -> torch.Tensor:
    return (start + torch.arange(s)).unsqueeze(0).expand(b, -1).contiguous()


def _rope_inputs(shape, dtype):
    def make(g):
        x = randn(g, *shape, dtype=dtype)
        ang = torch.rand(*shape[:-1], shape[-1] // 2, generator=g) * 6.28
        return dict(x=x, cos=ang.cos().to(dtype), sin=ang.sin().to(dtype), interleaved=True)
    return make


def _compress_run(kv, gate, position_bias, norm_weight, ratio, overlap, buf_kv, buf_gate, prev_kv, prev_gate):
    state = ops.CompressState(buf_kv, buf_gate, prev_kv, prev_gate, emitted=3)
    entries, new = ops.kv_compress(kv, gate, position_bias, norm_weight, ratio, overlap=overlap, state=state)
    return entries, new.kv, new.gate


def _compress_inputs(b, s, d, ratio, overlap, buffered, with_prev):
    c = 2 * d if overlap else d

    def make(g):
        return dict(kv=randn(g, b, s, c), gate=randn(g, b, s, c), position_bias=randn(g, ratio, c, scale=0.5),
                    norm_weight=1 + randn(g, d, scale=0.1), ratio=ratio, overlap=overlap,
                    buf_kv=randn(g, b, buffered, c), buf_gate=randn(g, b, buffered, c),
                    prev_kv=randn(g, b, ratio, d) if with_prev else None,
                    prev_gate=randn(g, b, ratio, d) if with_prev else None)
    return make


def _indexer_inputs(b, s, t, h, d, start=None, ratio=1, topk=None, dtype=torch.float32):
    def make(g):
        out = dict(q=randn(g, b, s, h, d, dtype=dtype), k=randn(g, b, t, d, dtype=dtype),
                   weights=randn(g, b, s, h, dtype=dtype),
                   scale=(d * h) ** -0.5)
        if topk is not None:
            first = t * ratio - s if start is None else start
            out.update(topk=topk, positions=_positions(b, s, first), ratio=ratio)
        return out
    return make


def _select_check(reduction):
    def check(ref, out, inputs):
        with registry.forced("cpu"):
            scores = ops.indexer_scores(*(inputs[n].double() for n in ("q", "k", "weights")), inputs["scale"])
        return topk_agrees(ref["out"], out["out"], scores, _score_atol(scores, reduction))
    return check


def _topk_inputs(b, s, t, k, ratio):
    def make(g):
        # Rounded scores make exact ties common, which the tie-aware check must absorb.
        return dict(scores=(randn(g, b, s, t) * 4).round() / 4, k=k, positions=_positions(b, s, t * ratio - s),
                    ratio=ratio)
    return make


def _topk_check(ref, out, inputs):
    return topk_agrees(ref["out"], out["out"], inputs["scores"].double(), 1e-9)


def _sparse_inputs(b, s, n, h, d, k, sink=True, v_dim=None, dtype=torch.float32, holes=0.1):
    def make(g):
        idx = torch.randint(0, n, (b, s, k), generator=g)
        idx = torch.where(torch.rand(b, s, k, generator=g) < holes, -1, idx).to(torch.int32)
        return dict(q=randn(g, b, s, h, d, dtype=dtype), kv=randn(g, b, n, d, dtype=dtype), indices=idx,
                    scale=d ** -0.5, sink=randn(g, h).to(dtype) if sink else None, v_dim=v_dim, return_lse=True)
    return make


def _window_inputs(b, s, n, h, d, window, dtype=torch.float32, sink=True):
    def make(g):
        return dict(q=randn(g, b, s, h, d, dtype=dtype), kv=randn(g, b, n, d, dtype=dtype), window=window,
                    scale=d ** -0.5, sink=randn(g, h).to(dtype) if sink else None, return_lse=True)
    return make


def _window_case(name, b, s, n, h, d, window, quick=False, dtype=torch.float32, sink=True):
    red = window * d
    return Case("window_attention", name, ops.window_attention, _window_inputs(b, s, n, h, d, window, dtype, sink),
                {"out0": _tol(dtype, red), "out1": _tol(torch.float32, red)}, quick=quick)


def _sparse_case(name, b, s, n, h, d, k, quick=False, dtype=torch.float32, **kw):
    red = k * d
    return Case("sparse_attention", name, ops.sparse_attention, _sparse_inputs(b, s, n, h, d, k, dtype=dtype, **kw),
                {"out0": _tol(dtype, red), "out1": _tol(torch.float32, red)}, quick=quick)


def _select_case(name, b, s, t, h, d, topk, ratio, quick=False, dtype=torch.float32):
    return Case("indexer_select", name, ops.indexer_select,
                _indexer_inputs(b, s, t, h, d, ratio=ratio, topk=topk, dtype=dtype),
                BY_CHECK, quick=quick, check=_select_check(h * d))


V4F, V4P, V32 = SHAPES["v4-flash"], SHAPES["v4-pro"], SHAPES["v3.2"]
MLA_D = V32["kv_lora"] + V32["rope_dim"]

PARITY = [
    _window_case("small", 2, 5, 9, 3, 8, 4, quick=True),
    _window_case("small/decode", 1, 1, 3, 2, 8, 4, quick=True),
    # bf16: the dtype vendor attention kernels take (float32 runs their torch fallbacks).
    _window_case("small-bf16", 2, 5, 9, 3, 16, 4, quick=True, dtype=torch.bfloat16),
    _window_case("small-bf16/no-sink", 2, 5, 9, 3, 16, 4, quick=True, dtype=torch.bfloat16, sink=False),
    _window_case("small-bf16/no-sink-decode", 1, 1, 7, 2, 16, 4, quick=True, dtype=torch.bfloat16, sink=False),
    _window_case("v4-flash/prefill", 1, 256, 256 + 127, V4F["heads"], V4F["head_dim"], V4F["window"]),
    _window_case("v4-flash/decode-bf16", 2, 1, 128, V4F["heads"], V4F["head_dim"], V4F["window"], dtype=torch.bfloat16),
    _window_case("v4-pro/prefill-bf16", 1, 64, 64 + 127, V4P["heads"], V4P["head_dim"], V4P["window"],
                 dtype=torch.bfloat16),
    Case("apply_rope", "small", ops.apply_rope, _rope_inputs((2, 5, 3, 8), torch.float32), F32, quick=True),
    Case("apply_rope", "v4-flash/q", ops.apply_rope, _rope_inputs((1, 64, V4F["heads"], V4F["rope_dim"]), torch.bfloat16),
         _tol(torch.bfloat16, 2)),
    Case("layer_norm", "v3.2/index_k", ops.layer_norm,
         lambda g: dict(x=randn(g, 4, 33, V32["index_dim"]), weight=randn(g, V32["index_dim"]),
                        bias=randn(g, V32["index_dim"]), eps=1e-6), _tol(torch.float32, V32["index_dim"]), quick=True),
    # kv_compress: buffered tokens from an earlier call plus new ones, so windows straddle calls.
    Case("kv_compress", "small/csa", _compress_run, _compress_inputs(2, 9, 8, 4, True, 3, True), F32, quick=True),
    Case("kv_compress", "small/hca", _compress_run, _compress_inputs(2, 13, 8, 8, False, 5, False), F32, quick=True),
    Case("kv_compress", "small/csa-first", _compress_run, _compress_inputs(1, 12, 8, 4, True, 0, False), F32, quick=True),
    Case("kv_compress", "v4-flash/csa-prefill", _compress_run, _compress_inputs(1, 1023, V4F["head_dim"], 4, True, 1, True),
         _tol(torch.float32, 8)),
    Case("kv_compress", "v4-flash/hca-prefill", _compress_run, _compress_inputs(1, 1000, V4F["head_dim"], 128, False, 24, False),
         _tol(torch.float32, 128)),
    Case("kv_compress", "v4-flash/indexer-decode", _compress_run, _compress_inputs(2, 1, V4F["index_dim"], 4, True, 3, True),
         _tol(torch.float32, 8)),
    Case("indexer_scores", "small", ops.indexer_scores, _indexer_inputs(2, 5, 7, 3, 16), _tol(torch.float32, 48), quick=True),
    Case("indexer_scores", "v4-flash/prefill", ops.indexer_scores, _indexer_inputs(1, 64, 1024, V4F["index_heads"], V4F["index_dim"]),
         _tol(torch.float32, V4F["index_heads"] * V4F["index_dim"])),
    Case("indexer_topk", "small/ties", ops.indexer_topk, _topk_inputs(2, 6, 9, 4, 1), BY_CHECK, quick=True,
         check=_topk_check),
    Case("indexer_topk", "small/ratio4", ops.indexer_topk, _topk_inputs(1, 12, 5, 3, 4), BY_CHECK, quick=True,
         check=_topk_check),
    _select_case("small/csa", 2, 9, 6, 4, 16, 3, 4, quick=True),
    _select_case("small/dsa", 1, 7, 11, 4, 16, 5, 1, quick=True),
    _select_case("small/dsa-bf16", 1, 7, 11, 4, 16, 5, 1, quick=True, dtype=torch.bfloat16),
    _select_case("v4-flash/prefill", 1, 64, 2048, V4F["index_heads"], V4F["index_dim"], V4F["index_topk"], 4),
    _select_case("v4-flash/decode-32k", 1, 1, 8192, V4F["index_heads"], V4F["index_dim"], V4F["index_topk"], 4),
    _select_case("v4-pro/decode-32k", 1, 1, 8192, V4P["index_heads"], V4P["index_dim"], V4P["index_topk"], 4),
    _select_case("v3.2/prefill", 1, 32, 4096, V32["index_heads"], V32["index_dim"], V32["index_topk"], 1),
    _select_case("v3.2/prefill-bf16", 1, 32, 4096, V32["index_heads"], V32["index_dim"], V32["index_topk"], 1,
                 dtype=torch.bfloat16),
    _select_case("v3.2/decode-16k", 1, 1, 16384, V32["index_heads"], V32["index_dim"], V32["index_topk"], 1),
    _sparse_case("small/mqa-sink", 2, 5, 11, 3, 16, 6, quick=True),
    _sparse_case("small/mla", 1, 4, 9, 2, 24, 5, quick=True, sink=False, v_dim=16),
    _sparse_case("small/empty-rows", 1, 3, 4, 2, 8, 3, quick=True, holes=0.7),
    _sparse_case("small/mqa-sink-bf16", 2, 5, 11, 3, 16, 6, quick=True, dtype=torch.bfloat16),
    _sparse_case("small/mla-bf16", 1, 4, 9, 2, 24, 5, quick=True, sink=False, v_dim=16, dtype=torch.bfloat16),
    _sparse_case("v4-flash/prefill", 1, 32, 4096, V4F["heads"], V4F["head_dim"], V4F["index_topk"] + V4F["window"]),
    _sparse_case("v4-flash/decode", 2, 1, 8192 + 128, V4F["heads"], V4F["head_dim"], V4F["index_topk"] + V4F["window"]),
    _sparse_case("v4-flash/decode-bf16", 1, 1, 8192 + 128, V4F["heads"], V4F["head_dim"],
                 V4F["index_topk"] + V4F["window"], dtype=torch.bfloat16),
    _sparse_case("v4-pro/decode", 1, 1, 8192 + 128, V4P["heads"], V4P["head_dim"], V4P["index_topk"] + V4P["window"]),
    _sparse_case("v3.2/prefill", 1, 8, 4096, V32["heads"], MLA_D, V32["index_topk"], sink=False, v_dim=V32["kv_lora"]),
    _sparse_case("v3.2/decode", 1, 1, 16384, V32["heads"], MLA_D, V32["index_topk"], sink=False, v_dim=V32["kv_lora"]),
    _sparse_case("v3.2/decode-bf16", 1, 1, 16384, V32["heads"], MLA_D, V32["index_topk"], sink=False,
                 v_dim=V32["kv_lora"], dtype=torch.bfloat16),
]


# ----------------------------------------------------------------------------------------- speed


def _sparse_speed(n: int, h: int, d: int, k: int, s: int = 1, dtype=torch.float32):
    def make(device):
        g = torch.Generator().manual_seed(0)
        inp = _sparse_inputs(1, s, n, h, d, k, holes=0.0, dtype=dtype)(g)
        inp = {kk: v.to(device) if isinstance(v, torch.Tensor) else v for kk, v in inp.items()}
        inp["return_lse"] = False
        q, kv = inp["q"].transpose(1, 2), inp["kv"].unsqueeze(1).expand(-1, h, -1, -1)
        peers = {"dense SDPA over all rows": lambda: F.scaled_dot_product_attention(q, kv, kv, scale=inp["scale"])}
        if device.type == "cuda":  # the gather path the cuda backend's Triton kernel replaces
            peers["torch gather path (cpu_fast)"] = torch_path(
                "sparse_attention", inp["q"], inp["kv"], inp["indices"], inp["scale"], inp["sink"], d)
        return (lambda: ops.sparse_attention(**inp)), peers
    return make


def _select_speed(t: int, h: int, d: int, k: int, ratio: int):
    def make(device):
        g = torch.Generator().manual_seed(0)
        inp = {kk: v.to(device) if isinstance(v, torch.Tensor) else v
               for kk, v in _indexer_inputs(1, 1, t, h, d, ratio=ratio, topk=k)(g).items()}

        def plain():
            sc = torch.einsum("bshd,btd->bsht", inp["q"], inp["k"]).relu()
            return (sc * inp["weights"].unsqueeze(-1)).sum(2).topk(k, dim=-1).indices
        peers = {"torch einsum + topk": plain}
        if device.type == "cuda":  # the chunked scoring the cuda backend's Triton kernel replaces
            peers["torch chunked scores + topk (cpu_fast)"] = torch_path(
                "indexer_select", *(inp[n] for n in ("q", "k", "weights", "scale", "topk", "positions", "ratio")))
        return (lambda: ops.indexer_select(**inp)), peers
    return make


def _layer_speed(seq: int):
    """CSA layer prefill (V4-Flash dims), v4hal's V4Attention vs transformers' on the same weights."""
    def make(device):
        from v4hal.bench.attention_layers import v4_pair  # noqa: PLC0415  (heavy import, speed only)
        ours, ref, run_ref = v4_pair("compressed_sparse_attention", device=device)
        x = torch.randn(1, seq, ours.c.hidden, generator=torch.Generator().manual_seed(0)).to(device)
        pos = _positions(1, seq, 0).to(device)
        return (lambda: ours(x, pos)), {"transformers DeepseekV4Attention": lambda: run_ref(x)}
    return make


SPEED = [
    SpeedCase("sparse_attention", f"v4-flash/decode-N{n}", _sparse_speed(n, V4F["heads"], V4F["head_dim"], 640),
              flops=4 * V4F["heads"] * 640 * V4F["head_dim"], bytes=640 * V4F["head_dim"] * 4, quick=n <= 8192)
    for n in (8192, 32768)
] + [
    SpeedCase("sparse_attention", "v4-flash/decode-N32768-bf16",
              _sparse_speed(32768, V4F["heads"], V4F["head_dim"], 640, dtype=torch.bfloat16),
              flops=4 * V4F["heads"] * 640 * V4F["head_dim"], bytes=640 * V4F["head_dim"] * 2)
] + [
    SpeedCase("indexer_select", f"v4-flash/decode-T{t}", _select_speed(t, V4F["index_heads"], V4F["index_dim"], 512, 4),
              flops=2 * V4F["index_heads"] * V4F["index_dim"] * t, bytes=t * V4F["index_dim"] * 4, quick=t <= 8192)
    for t in (8192, 32768)
] + [
    SpeedCase("attention_layer", f"v4-flash/csa-prefill-S{s}", _layer_speed(s)) for s in (256, 1024)
]
