"""The op contracts: one module per op family.

Each public function documents its math, shapes and dtypes, validates its inputs once, then
dispatches to the backend chosen by `v4hal.backends.registry`. Every public name of every family
module is re-exported here, so `v4hal.ops.fp8_matmul` works, as are the error every contract
raises (`OpInputError`) and `may_read_values(t)`: whether a check may read t's values here (not on
the meta device, under torch.compile or with V4HAL_CHECKS=shapes), for model code that checks its
own inputs the way the contracts do.
"""

import importlib
import pkgutil

__all__: list[str] = []
for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        for _name in _module.__all__:
            globals()[_name] = getattr(_module, _name)
        __all__ += _module.__all__

from v4hal.ops._check import OpInputError, reads as may_read_values  # noqa: E402  (after the families)

__all__ += ["OpInputError", "may_read_values"]
