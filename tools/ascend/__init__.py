"""Ascend tooling that runs without an NPU: the torch_npu schema check, the Meta-tensor dry run
and the numerics emulator of the vendor ops the ascend backend calls."""
