"""The op contracts: one module per op family.

Each public function documents its math, shapes and dtypes, validates its inputs once, then
dispatches to the backend chosen by `v4hal.backends.registry`. Every public name of every family
module is re-exported here, so `v4hal.ops.fp8_matmul` works.
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
