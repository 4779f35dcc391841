"""mHC modules holding DeepSeek-V4's hyper-connection parameters under transformers' names.

Inside `DeepseekV4DecoderLayer` each layer has two `HyperConnection`s, `attn_hc` and `ffn_hc`
(parameters `layers.{i}.attn_hc.fn`, `.base`, `.scale`; DeepSeek's own checkpoint spells them
`layers.{i}.hc_attn_fn` / `hc_attn_base` / `hc_attn_scale` and `hc_ffn_*`), and
`DeepseekV4Model` has one `HyperHead` named `hc_head` (parameters `hc_head.hc_fn`,
`hc_head.hc_base`, `hc_head.hc_scale`; DeepSeek: `hc_head_fn` / `hc_head_base` / `hc_head_scale`).
Parameters are float32, as transformers keeps them (`_keep_in_fp32_modules_strict`).

A decoder layer uses them as

    layer_input, post, comb = self.attn_hc(streams)            # streams: [B, S, n, D]
    streams = self.attn_hc.expand(attn(norm(layer_input)), streams, post, comb)
    layer_input, post, comb = self.ffn_hc(streams)
    streams = self.ffn_hc.expand(moe(norm(layer_input)), streams, post, comb)

and the model starts with `streams = embeddings.unsqueeze(-2).expand(..., n, D)` and ends with
`norm(self.hc_head(streams))`. All math runs through `v4hal.ops` (hc_pre, hc_post, hc_head).
"""

from __future__ import annotations

import torch
from torch import nn

from v4hal import ops


class HyperConnection(nn.Module):
    """One mHC site (`attn_hc` or `ffn_hc`).

    hidden_size: D (config.hidden_size); hc_mult: n streams (config.hc_mult, 4 in V4);
    sinkhorn_iters: config.hc_sinkhorn_iters (20); hc_eps: config.hc_eps (1e-6);
    norm_eps: config.rms_norm_eps (1e-6), the epsilon of the RMS factor over the n*D streams.
    Parameters: fn `[(2+n)*n, n*D]`, base `[(2+n)*n]`, scale `[3]` (float32, uninitialised:
    load a checkpoint or call `reset_parameters`).
    """

    def __init__(self, hidden_size: int, hc_mult: int = 4, sinkhorn_iters: int = 20,
                 hc_eps: float = 1e-6, norm_eps: float = 1e-6, device=None):
        super().__init__()
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.sinkhorn_iters, self.hc_eps, self.norm_eps = sinkhorn_iters, hc_eps, norm_eps
        rows = ops.hc_mix_width(hc_mult)
        kw = dict(dtype=torch.float32, device=device)
        self.fn = nn.Parameter(torch.empty(rows, hc_mult * hidden_size, **kw))
        self.base = nn.Parameter(torch.empty(rows, **kw))
        self.scale = nn.Parameter(torch.empty(3, **kw))

    def reset_parameters(self, std: float = 0.02) -> None:
        """transformers' initialisation: fn ~ N(0, std), base 0, scale 1."""
        with torch.no_grad():
            self.fn.normal_(0.0, std)
            self.base.zero_()
            self.scale.fill_(1.0)

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams `[..., n, D]` -> (layer_input `[..., D]`, post `[..., n]`, comb `[..., n, n]`).
        Note the order differs from transformers' module, which returns (post, comb, collapsed)."""
        return ops.hc_pre(streams, self.fn, self.scale, self.base, norm_eps=self.norm_eps,
                          hc_eps=self.hc_eps, iters=self.sinkhorn_iters)

    @staticmethod
    def expand(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """The sub-layer output `[..., D]` back into n streams plus the comb-mixed residual."""
        return ops.hc_post(out, streams, post, comb)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, hc_mult={self.hc_mult}, "
                f"sinkhorn_iters={self.sinkhorn_iters}, hc_eps={self.hc_eps}, norm_eps={self.norm_eps}")


class HyperHead(nn.Module):
    """The final stream collapse (`hc_head`): pre weights only, no Sinkhorn.

    hidden_size: D; hc_mult: n; hc_eps: config.hc_eps; norm_eps: config.rms_norm_eps.
    Parameters: hc_fn `[n, n*D]`, hc_base `[n]`, hc_scale `[1]` (float32).
    """

    def __init__(self, hidden_size: int, hc_mult: int = 4, hc_eps: float = 1e-6,
                 norm_eps: float = 1e-6, device=None):
        super().__init__()
        self.hidden_size, self.hc_mult, self.hc_eps, self.norm_eps = hidden_size, hc_mult, hc_eps, norm_eps
        kw = dict(dtype=torch.float32, device=device)
        self.hc_fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size, **kw))
        self.hc_base = nn.Parameter(torch.empty(hc_mult, **kw))
        self.hc_scale = nn.Parameter(torch.empty(1, **kw))

    def reset_parameters(self, std: float = 0.02) -> None:
        with torch.no_grad():
            self.hc_fn.normal_(0.0, std)
            self.hc_base.zero_()
            self.hc_scale.fill_(1.0)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """streams `[..., n, D]` -> `[..., D]` in streams' dtype."""
        return ops.hc_head(streams, self.hc_fn, self.hc_scale, self.hc_base,
                           norm_eps=self.norm_eps, hc_eps=self.hc_eps)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, hc_mult={self.hc_mult}, hc_eps={self.hc_eps}, norm_eps={self.norm_eps}"


def expand_streams(hidden: torch.Tensor, hc_mult: int) -> torch.Tensor:
    """Token embeddings `[..., D]` -> n identical streams `[..., n, D]` (contiguous), as the model
    starts its residual."""
    return hidden.unsqueeze(-2).expand(*hidden.shape[:-1], hc_mult, hidden.shape[-1]).contiguous()
