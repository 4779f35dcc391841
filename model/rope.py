"""Rotary position embedding tables, plain or YaRN-scaled, as the V4 and V3.2 configs ask.

V4 has two tables: "main" (sliding-only layers, theta 10000, no scaling) and "compress" (CSA/HCA
layers and their compressors/indexer, theta 160000, YaRN factor 16 in the released checkpoints
with attention_factor forced to 1). V3.2 has one table (YaRN factor 40, mscale = mscale_all_dim
= 1, so the cos/sin factor is 1 and the softmax scale gains mscale(40)**2 instead, see
`softmax_scale`).
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch


def _mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class Rope:
    """One RoPE table over `dim` rotated channels (even). Build it from the HF rope_parameters
    dict of the table with `from_params` (rope_type "default" or "yarn", rope_theta, factor,
    beta_fast, beta_slow, original_max_position_embeddings, mscale, mscale_all_dim,
    attention_factor) or from plain numbers."""

    dim: int
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position: int = 4096
    attention_factor: float = 1.0

    @classmethod
    def from_params(cls, dim: int, params: dict, max_position: int | None = None) -> "Rope":
        kind = params.get("rope_type", params.get("type", "default"))
        theta = float(params["rope_theta"])
        if kind == "default":
            return cls(dim, theta)
        if kind != "yarn":
            raise ValueError(f"rope_type {kind!r} not supported (default or yarn)")
        factor = params.get("factor")
        original = params.get("original_max_position_embeddings") or max_position
        if factor is None:
            factor = max_position / original
        att = params.get("attention_factor")
        if att is None:
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            att = _mscale(factor, m) / _mscale(factor, m_all) if m and m_all else _mscale(factor)
        return cls(dim, theta, "yarn", float(factor), float(params.get("beta_fast") or 32),
                   float(params.get("beta_slow") or 1), int(original), float(att))

    def inv_freq(self) -> torch.Tensor:
        """`[dim/2]` float64 angular frequencies per channel pair."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim
        base = 1.0 / self.theta ** exponents
        if self.rope_type == "default":
            return base
        # YaRN: keep high frequencies (many rotations over the original context), interpolate low
        # ones by `factor`, ramp linearly in between (correction range rounded outwards).
        def pair_for(rotations: float) -> float:
            return self.dim * math.log(self.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low = max(math.floor(pair_for(self.beta_fast)), 0)
        high = min(math.ceil(pair_for(self.beta_slow)), self.dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(self.dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        return base / self.factor * ramp + base * (1 - ramp)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[*positions.shape, dim/2]` (times attention_factor), for `ops.apply_rope`.
        Angles are formed in float32 as the reference implementations do, so long positions
        round the same way. Every layer of a step asks with the same positions tensor: the last
        answer per table is reused while that tensor is alive and unmodified (not under
        torch.compile, whose graph cannot consult a Python-side memo; there the tables are a few
        elementwise ops the compiler fuses)."""
        if torch.compiler.is_compiling():  # the lru_cache is Python state too: the graph folds this
            return self._tables(positions, dtype, _float32_inv_freq.__wrapped__(self, positions.device))
        key = (None if positions.is_inference() else positions._version, dtype)  # inference tensors have no version
        last = _LAST_TABLES.get(self)
        if last is not None and last[0]() is positions and last[1] == key:
            return last[2]
        tables = self._tables(positions, dtype, _float32_inv_freq(self, positions.device))
        _LAST_TABLES[self] = (weakref.ref(positions), key, tables)
        return tables

    def _tables(self, positions: torch.Tensor, dtype: torch.dtype, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32).unsqueeze(-1) * inv
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


_LAST_TABLES: dict[Rope, tuple] = {}


@functools.lru_cache(maxsize=64)
def _float32_inv_freq(rope: Rope, device: torch.device) -> torch.Tensor:
    # Built once per table and device: decode asks for cos/sin several times a step.
    return rope.inv_freq().to(torch.float32).to(device)


def softmax_scale(head_dim: int, params: dict | None) -> float:
    """V3.2's attention scale: head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 under YaRN."""
    scale = head_dim ** -0.5
    if params and params.get("rope_type", "default") == "yarn" and params.get("mscale_all_dim"):
        scale *= _mscale(params["factor"], params["mscale_all_dim"]) ** 2
    return scale
