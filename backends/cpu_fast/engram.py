"""Fast Engram on CPU: every (order, head) modulus in one broadcast, one gather for all heads
(with its scales for a float8 table, decoded with integer ops), the gate over all streams at once.

Device-agnostic torch, inherited by cuda and ascend (torch_npu has no Engram kernel: no `npu_*` op
in the pinned wheel hashes n-grams or gathers multi-head tables). A table in host memory is
gathered on the host and the rows copied to the device from pinned memory without blocking (what
`EngramPrefetcher` overlaps with earlier layers); a table in device memory is gathered in place."""

import torch

from v4hal.ops.e4m3 import e4m3_as_f32
from v4hal.ops.engram import DEAD, SCALE_BLOCK, engram_offsets, lookback_window


def engram_hash(token_ids, token_map, multipliers, primes, pad_id, lookback):
    span, length = multipliers.shape[0] - 1, token_ids.shape[1]
    ids = lookback_window(token_ids, lookback, span)
    c = torch.where(ids >= 0, token_map[ids.clamp_min(0)], DEAD)  # no token (-1) blocks like a dead one
    dead = c == DEAD
    mixes, blocked = [], torch.zeros_like(dead[:, span:])
    for k in range(span + 1):  # the token k positions back; blocked once any of shifts 0..k is dead
        blocked = blocked | dead[:, span - k:span - k + length]
        term = torch.where(blocked, pad_id, c[:, span - k:span - k + length]) * multipliers[k]
        mix = term if k == 0 else mix ^ term
        if k:
            mixes.append(mix)
    rows = torch.remainder(torch.stack(mixes, -1).unsqueeze(-1), primes) + engram_offsets(primes).view(primes.shape)
    return rows.flatten(-2)


def _e8m0_as_f32(scale):
    """2 ** (byte - 127) as float32 by placing the byte in the exponent field (byte 0 is the
    subnormal 2 ** -127, bit pattern 0x00400000; 0xFF comes out Inf, where e8m0 says NaN)."""
    byte = scale.view(torch.uint8).to(torch.int32)
    return torch.where(byte > 0, byte * (1 << 23), 0x00400000).view(torch.float32)


def _dequantized(values, scale):
    """float8 rows times their per-32-column scales, float32, exactly as the reference computes
    them; the e4m3 bytes decoded with integer ops (PyTorch's CPU float8 cast is a scalar loop)."""
    n, d = values.shape
    x = e4m3_as_f32(values, torch.empty(values.shape, dtype=torch.int32, device=values.device)).mul_(2.0 ** 120)
    factor = scale if scale.dtype == torch.float32 else _e8m0_as_f32(scale)
    out = (x.view(n, d // SCALE_BLOCK, SCALE_BLOCK) * factor.unsqueeze(-1)).view(n, d)
    return out.masked_fill((values.view(torch.uint8) & 0x7F) == 0x7F, float("nan"))  # e4m3's NaN code


def _pinned(t):
    return t.pin_memory() if torch.cuda.is_available() or hasattr(torch, "npu") else t


def engram_lookup(rows, table, scale, device, dtype):
    flat = rows.to(table.device).flatten()
    out = table.index_select(0, flat)
    if scale is not None:
        out = _dequantized(out, scale.index_select(0, flat))
    out = out.to(dtype).view(*rows.shape[:-1], rows.shape[-1] * table.shape[1])
    if out.device == device:
        return out
    if out.device.type == "cpu":  # host-resident table: copy the gathered rows from pinned memory
        return _pinned(out).to(device, non_blocking=True)
    return out.to(device)


def engram_gate(hidden, key, value, key_norm, query_norm, eps, inv_sqrt_d, keep):
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    k, q = key.to(cd), hidden.to(cd)
    k_inv = torch.rsqrt(k.pow(2).mean(-1) + eps)
    q_inv = torch.rsqrt(q.pow(2).mean(-1) + eps)
    w = key_norm.to(cd) * query_norm.to(cd)
    g = (k * q * w).sum(-1) * (k_inv * q_inv * inv_sqrt_d)
    g = torch.sigmoid(torch.sign(g) * g.abs().clamp_min(1e-6).sqrt())
    if keep is not None:
        g = torch.where(keep.unsqueeze(-1), g, 0.0)
    return (g.unsqueeze(-1) * value.to(cd).unsqueeze(-2)).to(hidden.dtype)
