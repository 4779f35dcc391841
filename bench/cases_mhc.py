"""Parity and speed cases for mHC (hc_pre, hc_post, hc_head, sinkhorn) at the real V4-Flash and
V4-Pro hidden sizes with 4 streams, plus small ones; speed peers are transformers' own
`DeepseekV4HyperConnection` / `DeepseekV4HyperHead` run on the same weights in the same run."""

from __future__ import annotations

import torch

from v4hal import ops
from v4hal.bench.cases import SHAPES, Case, SpeedCase, Tolerance, randn

HC_EPS = NORM_EPS = 1e-6
ITERS = 20
FN_STD = 0.02  # transformers' initializer_range: mixes of a few units, as in trained checkpoints


def _params(g: torch.Generator, n: int, d: int, rows: int, scales: int) -> dict:
    return dict(fn=randn(g, rows, n * d, scale=FN_STD), scale=1 + 0.5 * torch.rand(scales, generator=g),
                base=randn(g, rows, scale=0.5))


def _streams(g: torch.Generator, tokens: int, n: int, d: int) -> torch.Tensor:
    return randn(g, tokens, n, d, dtype=torch.bfloat16)


def _pre_inputs(tokens: int, n: int, d: int):
    def make(g: torch.Generator) -> dict:
        return dict(x=_streams(g, tokens, n, d), **_params(g, n, d, ops.hc_mix_width(n), 3))

    return make


def _head_inputs(tokens: int, n: int, d: int):
    def make(g: torch.Generator) -> dict:
        return dict(x=_streams(g, tokens, n, d), **_params(g, n, d, n, 1))

    return make


def _post_inputs(tokens: int, n: int, d: int):
    def make(g: torch.Generator) -> dict:
        comb = torch.softmax(randn(g, tokens, n, n, scale=2.0), -1)
        comb = comb / comb.sum(-2, keepdim=True)  # column-stochastic, like a Sinkhorn output
        return dict(out=randn(g, tokens, d, dtype=torch.bfloat16), x=_streams(g, tokens, n, d),
                    post=2 * torch.rand(tokens, n, generator=g), comb=comb)

    return make


def _sinkhorn_inputs(tokens: int, n: int, spread: float):
    def make(g: torch.Generator) -> dict:
        return dict(logits=randn(g, tokens, n, n, scale=spread), iters=ITERS, eps=HC_EPS)

    return make


def _hc_pre(x, fn, scale, base):
    return ops.hc_pre(x, fn, scale, base, norm_eps=NORM_EPS, hc_eps=HC_EPS, iters=ITERS)


def _hc_head(x, fn, scale, base):
    return ops.hc_head(x, fn, scale, base, norm_eps=NORM_EPS, hc_eps=HC_EPS)


def _mix_tolerance(n: int, d: int) -> dict[str, Tolerance]:
    mixes = Tolerance.for_dtype(torch.float32, n * d)
    return {"out0": Tolerance.for_dtype(torch.bfloat16, n), "out1": mixes, "out2": mixes}


# (name, tokens, streams, hidden, quick)
SIZES = [("small", 6, 4, 64, True), ("ragged-n3", 5, 3, 40, True), ("multi-block", 130, 4, 64, True),
         ("v4-flash", 16, SHAPES["v4-flash"]["hc"], SHAPES["v4-flash"]["hidden"], False),
         ("v4-pro", 16, SHAPES["v4-pro"]["hc"], SHAPES["v4-pro"]["hidden"], False)]

PARITY = (
    [Case("hc_pre", name, _hc_pre, _pre_inputs(t, n, d), _mix_tolerance(n, d), quick=q)
     for name, t, n, d, q in SIZES]
    + [Case("hc_post", name, ops.hc_post, _post_inputs(t, n, d), Tolerance.for_dtype(torch.bfloat16, n), quick=q)
       for name, t, n, d, q in SIZES]
    + [Case("hc_head", name, _hc_head, _head_inputs(t, n, d), Tolerance.for_dtype(torch.bfloat16, n), quick=q)
       for name, t, n, d, q in SIZES]
    + [Case("sinkhorn", f"{name}-spread{spread:g}", ops.sinkhorn, _sinkhorn_inputs(t, n, spread),
            Tolerance.for_dtype(torch.float32, n * ITERS), quick=q)
       for name, t, n, _, q in SIZES[:3] + [("v4-2048tok", 2048, 4, 0, False)] for spread in (1.0, 8.0)]
)


def _transformers_config(d: int, n: int):
    from transformers import DeepseekV4Config

    return DeepseekV4Config(hidden_size=d, hc_mult=n, hc_sinkhorn_iters=ITERS, hc_eps=HC_EPS,
                            rms_norm_eps=NORM_EPS)


def transformers_hc(d: int, n: int, device: torch.device):
    """transformers' DeepseekV4HyperConnection with random weights, and our HyperConnection
    holding the same weights."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    from v4hal.model.hyper import HyperConnection

    torch.manual_seed(0)
    ref = DeepseekV4HyperConnection(_transformers_config(d, n)).to(device)
    with torch.no_grad():
        ref.fn.normal_(0.0, FN_STD)
        ref.base.normal_(0.0, 0.5)
        ref.scale.uniform_(1.0, 1.5)
    ours = HyperConnection(d, n, ITERS, HC_EPS, NORM_EPS, device=device)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def transformers_site(ref, streams: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One mHC site as DeepseekV4DecoderLayer runs it: the module, then its residual formula."""
    post, comb, _ = ref(streams)
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


def _site_speed(tokens: int, n: int, d: int):
    def make(device: torch.device):
        ref, ours = transformers_hc(d, n, device)
        g = torch.Generator().manual_seed(0)
        x = _streams(g, tokens, n, d).unsqueeze(0).to(device)  # transformers takes [B, S, n, D]
        out = randn(g, 1, tokens, d, dtype=torch.bfloat16).to(device)

        @torch.no_grad()
        def run():
            _, post, comb = ours(x)
            return ours.expand(out, x, post, comb)

        return run, {"transformers DeepseekV4HyperConnection": torch.no_grad()(lambda: transformers_site(ref, x, out))}

    return make


def _sinkhorn_speed(tokens: int, n: int):
    def make(device: torch.device):
        logits = randn(torch.Generator().manual_seed(0), tokens, n, n).to(device)

        def eager():  # transformers' loop, verbatim in effect: softmax + eps, col, (row, col) x 19
            m = torch.softmax(logits, -1) + HC_EPS
            m = m / (m.sum(-2, keepdim=True) + HC_EPS)
            for _ in range(ITERS - 1):
                m = m / (m.sum(-1, keepdim=True) + HC_EPS)
                m = m / (m.sum(-2, keepdim=True) + HC_EPS)
            return m

        return (lambda: ops.sinkhorn(logits, ITERS, HC_EPS)), {"eager torch (transformers' loop)": eager}

    return make


def _stream_bytes(tokens: int, n: int, d: int) -> float:
    """hc_pre reads the bf16 streams; hc_post reads them and the output and writes new streams."""
    return 2.0 * tokens * d * (n + n + 1 + n)


SPEED = [
    SpeedCase("hc_pre+hc_post", f"T{t}-n{n}-D{d}", _site_speed(t, n, d),
              flops=2.0 * t * n * d * (ops.hc_mix_width(n) + 1 + n), bytes=_stream_bytes(t, n, d), quick=t <= 64)
    for t, n, d in [(64, 4, 512), (2048, 4, SHAPES["v4-flash"]["hidden"])]
] + [
    SpeedCase("sinkhorn", f"T{t}-n4", _sinkhorn_speed(t, 4), quick=t <= 64) for t in (64, 2048)
]


def _v4_flash_module(build, experts: int):
    """A transformers V4-Flash module with N(0, 0.02) bf16 weights built directly in bf16."""
    from transformers import DeepseekV4Config

    cfg = DeepseekV4Config(num_local_experts=experts)
    cfg._attn_implementation = "eager"
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        module = build(cfg).eval()
    finally:
        torch.set_default_dtype(saved)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module, cfg


def _time_mhc_sites(g: torch.Generator, tokens: int, repeats: int) -> dict:
    """Our two mHC sites of a layer (cpu_fast) and transformers' two, timed in turns."""
    from v4hal.backends import registry
    from v4hal.bench.speed import interleaved

    d, n = SHAPES["v4-flash"]["hidden"], SHAPES["v4-flash"]["hc"]
    cpu = torch.device("cpu")
    streams = _streams(g, tokens, n, d).unsqueeze(0)
    out = randn(g, 1, tokens, d, dtype=torch.bfloat16)
    (ref_a, ours_a), (ref_f, ours_f) = transformers_hc(d, n, cpu), transformers_hc(d, n, cpu)

    @torch.no_grad()
    def ours():
        s = streams
        for site in (ours_a, ours_f):
            _, post, comb = site(s)
            s = site.expand(out, s, post, comb)
        return s

    @torch.no_grad()
    def theirs():
        s = streams
        for site in (ref_a, ref_f):
            s = transformers_site(site, s, out)
        return s

    with registry.forced("cpu_fast"):
        return interleaved({"mhc x2 (v4hal cpu_fast)": ours, "mhc x2 (transformers)": theirs}, repeats * 2)


def _time_attention(x: torch.Tensor, experts: int, repeats: int) -> dict:
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as tm

    from v4hal.bench.speed import interleaved

    attn, cfg = _v4_flash_module(lambda c: tm.DeepseekV4Attention(c, c.layer_types.index("compressed_sparse_attention")), experts)
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    rope = tm.DeepseekV4RotaryEmbedding(cfg)
    pe = {k: rope(x, pos, layer_type=k) for k in ("main", "compress")}
    return interleaved({"attention (CSA layer)": torch.no_grad()(lambda: attn(x, pe, pos, None))}, repeats)


def _time_moe(x: torch.Tensor, experts: int, repeats: int, name: str) -> dict:
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as tm

    from v4hal.bench.speed import interleaved

    moe, _ = _v4_flash_module(lambda c: tm.DeepseekV4SparseMoeBlock(c, c.mlp_layer_types.index("moe")), experts)
    return interleaved({name: torch.no_grad()(lambda: moe(x))}, repeats)


def layer_share(tokens: int = 2048, experts: int = 8, repeats: int = 3) -> dict:
    """Seconds per V4-Flash layer on this machine, measured in one run: our two mHC sites
    (hc_pre + hc_post around attention and around the MoE, cpu_fast), transformers' two sites,
    transformers' DeepseekV4Attention (a compressed-sparse-attention layer, eager) and
    DeepseekV4SparseMoeBlock (top-6 of `experts` routed experts + the shared one: the real 256 do
    not fit this machine; per-token work is the same, each expert sees more tokens) on bf16
    weights. Reported: min and median per callable; the share is ours / (attention + MoE), on
    the minima (the least disturbed runs on a shared machine)."""
    import gc

    d = SHAPES["v4-flash"]["hidden"]
    g = torch.Generator().manual_seed(0)
    # One helper per group: each one's modules are freed when it returns, before the next builds.
    samples = _time_mhc_sites(g, tokens, repeats)
    x = randn(g, 1, tokens, d, dtype=torch.bfloat16)
    samples.update(_time_attention(x, experts, repeats))
    gc.collect()
    moe_name = f"MoE (top-6 of {experts} experts + shared)"
    samples.update(_time_moe(x, experts, repeats, moe_name))
    best = {k: min(v) for k, v in samples.items()}
    median = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    layer = best["attention (CSA layer)"] + best[moe_name]
    return {"tokens": tokens, "experts": experts, "min_s": best, "median_s": median, "samples_s": samples,
            "share_ours": best["mhc x2 (v4hal cpu_fast)"] / layer,
            "share_transformers": best["mhc x2 (transformers)"] / layer}


if __name__ == "__main__":
    import argparse
    import json

    from v4hal.bench.machine import describe

    p = argparse.ArgumentParser(description="mHC cost per V4-Flash layer as a share of attention + MoE")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (1 avoids OpenMP barrier stalls on a shared, oversubscribed machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = layer_share(args.tokens, args.experts, args.repeats)
    print(f"machine: {describe(torch.device('cpu'))}")
    for k, v in r["min_s"].items():
        print(f"{k:45s} min {v * 1e3:10.1f} ms   median {r['median_s'][k] * 1e3:10.1f} ms")
    print(f"mHC share of attention + MoE: v4hal {r['share_ours']:.2%}, transformers {r['share_transformers']:.2%}")
    print(json.dumps(r))
