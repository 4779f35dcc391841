"""How fast could a compiled, static-shape decode step be on this CPU? An estimate, not the model.

One decode step of `bench-v4` (cases_model.BENCH_V4) at a given context, written as plain torch
over fixed-size caches and compiled whole (`torch.compile(dynamic=False, fullgraph=True)`): the
same weights, shapes and work as our model's step (mHC with a tensor Sinkhorn, every projection
as a multiply-and-sum, the indexer over every compressed key and its top-k, gathered sparse
attention, window attention, routed experts as a gather-and-reduce, the head), but NOT its exact
semantics: cache writes are fixed-size `index_copy_`s into random caches and the compressors are
a gated pool over a fixed window. Its outputs mean nothing; its time is a floor for the model's
own fixed-shape compiled step, `model.static.StaticDecoder` (docs/model.md, "Why eager decode
stays near 1.25x": 2.4 ms here against StaticDecoder's 3.0-3.1 ms at 16k).

    python -m v4hal.bench.decode_ceiling [--context 16384] [--threads 1]

prints the step time of this function eager and compiled, and, in the same process, our model's
eager decode step and transformers' (the `model_decode` speed case's callables).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from v4hal.bench.cases_model import BENCH_V4, decode, model_for

EPS = 1e-6
WINDOW, ROPE_DIM = BENCH_V4.sliding_window, BENCH_V4.qk_rope_head_dim


def _rms(x, w=None):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return y if w is None else y * w


def _gemv(w, x):
    return (w * x.reshape(1, -1)).sum(-1)


def _rope_tail(x, cos, sin):
    a, b = x[..., -ROPE_DIM:].unflatten(-1, (-1, 2)).unbind(-1)
    return torch.cat([x[..., :-ROPE_DIM], torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)], -1)


def _put(buf, row, value):
    buf.index_copy_(0, (row % buf.shape[0]).view(1), value.view(1, -1))


class StaticStep:
    """The step function and its fixed-size caches for one model and context length."""

    def __init__(self, model, context: int):
        self.p, self.b = dict(model.named_parameters()), dict(model.named_buffers())
        g = torch.Generator().manual_seed(0)
        heads, head_dim = BENCH_V4.num_attention_heads, BENCH_V4.head_dim
        self.heads, self.head_dim = heads, head_dim
        self.inv = 1.0 / (BENCH_V4.compress_rope_theta ** (torch.arange(0, ROPE_DIM, 2) / ROPE_DIM))
        self.layers = []
        for kind in BENCH_V4.layer_types:
            c = {"raw": torch.randn(WINDOW, head_dim, generator=g)}
            ratio = BENCH_V4.compress_rates.get(kind)
            if ratio:
                overlap = 2 if kind == "compressed_sparse_attention" else 1
                c["entries"] = torch.randn(context // ratio, head_dim, generator=g)
                c["state"] = torch.randn(overlap * ratio, overlap * head_dim, generator=g)
                if overlap == 2:
                    c["keys"] = torch.randn(context // ratio, BENCH_V4.index_head_dim, generator=g)
                    c["key_state"] = torch.randn(2 * ratio, 2 * BENCH_V4.index_head_dim, generator=g)
            self.layers.append((ratio, c))

    def _hc_pre(self, h, name):
        fn, base, scale = (self.p[f"{name}.{k}"] for k in ("fn", "base", "scale"))
        flat = h.reshape(-1)
        mix = _gemv(fn, flat) * torch.rsqrt(flat.pow(2).mean() + EPS)
        pre = torch.sigmoid(mix[:4] * scale[0] + base[:4]) + EPS
        post = 2 * torch.sigmoid(mix[4:8] * scale[1] + base[4:8])
        comb = torch.softmax((mix[8:] * scale[2] + base[8:]).view(4, 4), -1) + EPS
        comb = comb / (comb.sum(0, keepdim=True) + EPS)
        for _ in range(BENCH_V4.hc_sinkhorn_iters - 1):
            comb = comb / (comb.sum(1, keepdim=True) + EPS)
            comb = comb / (comb.sum(0, keepdim=True) + EPS)
        return pre @ h, post, comb

    def _attend(self, q, rows, sink):
        logits = (q @ rows.T) * self.head_dim ** -0.5
        top = torch.maximum(logits.amax(-1, keepdim=True), sink.unsqueeze(-1))
        p = torch.exp(logits - top)
        return (p @ rows) / (p.sum(-1, keepdim=True) + torch.exp(sink.unsqueeze(-1) - top))

    def _pool(self, state, kv, gate, pos, norm, cos, sin):
        """Compressor stand-in: write this token's projections, pool the window with the gates."""
        _put(state, pos, kv)
        width = norm.shape[0]
        weights = torch.softmax(state[:, :width] + gate[:width], 0)
        return _rope_tail(_rms((weights * state[:, :width]).sum(0), norm), cos, sin)

    def _attention(self, l, ratio, c, x, pos, cos, sin):
        p, a = self.p, f"model.layers.{l}.self_attn."
        q_res = _rms(_gemv(p[a + "q_a_proj.weight"], x), p[a + "q_a_norm.weight"])
        q = _rope_tail(_rms(_gemv(p[a + "q_b_proj.weight"], q_res).view(self.heads, self.head_dim)), cos, sin)
        _put(c["raw"], pos, _rope_tail(_rms(_gemv(p[a + "kv_proj.weight"], x), p[a + "kv_norm.weight"]), cos, sin))
        rows = c["raw"]
        if ratio:
            cp = a + "compressor."
            entry = self._pool(c["state"], _gemv(p[cp + "kv_proj.weight"], x), _gemv(p[cp + "gate_proj.weight"], x),
                               pos, p[cp + "kv_norm.weight"], cos, sin)
            _put(c["entries"], pos // ratio, entry)
            picked = c["entries"]
            if "keys" in c:
                ip = cp + "indexer."
                key = self._pool(c["key_state"], _gemv(p[ip + "kv_proj.weight"], x), _gemv(p[ip + "gate_proj.weight"], x),
                                 pos, p[ip + "kv_norm.weight"], cos, sin)
                _put(c["keys"], pos // ratio, key)
                qi = _rope_tail(_gemv(p[ip + "q_b_proj.weight"], q_res).view(BENCH_V4.index_n_heads, -1), cos, sin)
                weights = _gemv(p[ip + "scorer.weights_proj.weight"], x)
                scores = (weights.unsqueeze(-1) * torch.relu(qi @ c["keys"].T)).sum(0)
                top = torch.topk(scores, min(BENCH_V4.index_topk, scores.shape[0])).indices
                picked = c["entries"].index_select(0, top)
            rows = torch.cat([picked, rows], 0)
        o = _rope_tail(self._attend(q, rows, p[a + "sinks"]), cos, -sin).reshape(BENCH_V4.o_groups, -1)
        groups = p[a + "o_a_proj.weight"].view(BENCH_V4.o_groups, -1, o.shape[-1])
        return _gemv(p[a + "o_b_proj.weight"], (groups * o.unsqueeze(1)).sum(-1).reshape(-1))

    def _moe(self, l, x, tok):
        p, m = self.p, f"model.layers.{l}.mlp."
        scores = torch.sqrt(F.softplus(_gemv(p[m + "gate.weight"], x)))
        if BENCH_V4.mlp_layer_types[l] == "hash_moe":
            ids = self.b[m + "gate.tid2eid"].index_select(0, tok.view(1)).view(-1)
        else:
            ids = torch.topk(scores + self.b[m + "gate.e_score_correction_bias"], BENCH_V4.num_experts_per_tok).indices
        w = scores[ids] / scores[ids].sum() * BENCH_V4.routed_scaling_factor
        limit, inter = BENCH_V4.swiglu_limit, BENCH_V4.moe_intermediate_size
        gate_up = (p[m + "experts.gate_up_proj"][ids] * x).sum(-1)
        act = F.silu(gate_up[:, :inter].clamp(max=limit)) * gate_up[:, inter:].clamp(-limit, limit)
        y = (w.unsqueeze(-1) * (p[m + "experts.down_proj"][ids] * act.unsqueeze(1)).sum(-1)).sum(0)
        s = m + "shared_experts."
        shared = (F.silu(_gemv(p[s + "gate_proj.weight"], x).clamp(max=limit))
                  * _gemv(p[s + "up_proj.weight"], x).clamp(-limit, limit))
        return y + _gemv(p[s + "down_proj.weight"], shared)

    def __call__(self, tok, pos):
        p = self.p
        h = p["model.embed_tokens.weight"].index_select(0, tok.view(1)).expand(4, -1).contiguous()
        angles = pos.float() * self.inv
        cos, sin = angles.cos(), angles.sin()
        for l, (ratio, c) in enumerate(self.layers):
            pre = f"model.layers.{l}."
            x, post, comb = self._hc_pre(h, pre + "attn_hc")
            out = self._attention(l, ratio, c, _rms(x, p[pre + "input_layernorm.weight"]), pos, cos, sin)
            h = post.unsqueeze(-1) * out + comb.T @ h
            x, post, comb = self._hc_pre(h, pre + "ffn_hc")
            h = post.unsqueeze(-1) * self._moe(l, _rms(x, p[pre + "post_attention_layernorm.weight"]), tok) + comb.T @ h
        fn, base, scale = p["model.hc_head.hc_fn"], p["model.hc_head.hc_base"], p["model.hc_head.hc_scale"]
        flat = h.reshape(-1)
        pre = torch.sigmoid(_gemv(fn, flat) * torch.rsqrt(flat.pow(2).mean() + EPS) * scale[0] + base) + EPS
        return _gemv(p["lm_head.weight"], _rms(pre @ h, p["model.norm.weight"]))


def median_ms(fn, repeats: int) -> float:
    samples = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2] * 1e3


def main(context: int, repeats: int) -> dict:
    step = StaticStep(model_for("bench-v4"), context)
    tok, pos = torch.tensor(7), torch.tensor(context)
    compiled = torch.compile(step, dynamic=False, fullgraph=True)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(tok, pos)
    compile_s = time.perf_counter() - start
    ours, peers = decode(context)(torch.device("cpu"))
    return {"compile_s": compile_s,
            "static step, compiled": median_ms(lambda: compiled(tok, pos), repeats),
            "static step, eager": median_ms(lambda: step(tok, pos), repeats),
            "v4hal model decode, eager": median_ms(ours, repeats),
            "transformers decode, eager": median_ms(peers["transformers eager"], repeats)}


if __name__ == "__main__":
    import argparse

    from v4hal.bench.machine import describe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    result = main(a.context, a.repeats)
    print(f"machine: {describe(torch.device('cpu'))}; context {a.context}; compile {result.pop('compile_s'):.0f} s")
    for name, ms in result.items():
        print(f"{name:28s} {ms:6.2f} ms per step")
