"""v4hal: DeepSeek-V4-class models on Ascend NPUs, NVIDIA GPUs and CPUs from one code base.

`import v4hal` stays light: it imports no vendor package (torch_npu, mindspore, triton).
The op contracts live in `v4hal.ops`, backend selection in `v4hal.backends.registry`.
"""

__version__ = "0.1.0"
