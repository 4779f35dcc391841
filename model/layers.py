"""The generic layers every model module is built from, holding their weights under HF's names.

Linear layers are `Linear` modules calling `ops.linear`, so FP8 (`weight_scale_inv` 128x128 block
scales), FP4 and int8 weights load as they come. Norms call `ops.rms_norm`/`ops.layer_norm`.
"""

from __future__ import annotations

import torch
from torch import nn

from v4hal import ops
from v4hal.model.collectives import SOLO, Collectives


class Linear(nn.Module):
    """`ops.linear` with the weight (and, for quantized checkpoints, `weight_scale_inv`) under
    HF's names. Set `weight` / `weight_scale_inv` by loading a state dict or assigning;
    `act_scale_fmt` ("fp32" or "ue8m0") is how an FP8 weight's activations are scaled (the whole
    model sets it from its config's `quantization_config.scale_fmt`). `reduce`: the tensor-parallel
    group of a row-parallel layer (each rank holds a slice of the input columns): the partial
    products are summed over it before the (whole, replicated) bias is added."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce: Collectives = SOLO):
        super().__init__()
        self.reduce = reduce
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.register_buffer("weight_scale_inv", None)  # in the state dict once a quantized weight loads
        self.act_scale_fmt = "fp32"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce.size == 1:
            return ops.linear(x, self.weight, self.weight_scale_inv, self.bias, self.act_scale_fmt)
        y = self.reduce.all_reduce(ops.linear(x, self.weight, self.weight_scale_inv, None, self.act_scale_fmt))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a float matrix (dequantized if quantized), for absorbed-MLA algebra."""
        return ops.dequantize_weight(self.weight, self.weight_scale_inv, dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)
