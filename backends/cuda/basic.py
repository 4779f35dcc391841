"""CUDA RMSNorm and linear: the fused, device-agnostic torch code of cpu_fast (F.rms_norm,
F.linear); quantized linears go through the quant contracts and so reach cuda's fp8_matmul."""

from v4hal.backends.cpu_fast.basic import linear, rms_norm  # noqa: F401
