"""Backend registry: name -> implementation of the fused-update contract (DESIGN.md s.5, s.7).

Every backend is a module with ``name``, ``device_types``, ``dtypes``, ``max_buffers``,
``fused_update(...)`` (the signature of :mod:`pyengine.fused_update`, plus ``trusted``) and
``unavailable_reason(device_type)`` (None when it can run there); numba and triton also
answer ``reasons_unsupported(call)`` for a concrete call. Defaults by device, best first
(:func:`priority`): CUDA -> cuda, triton, torch; CPU -> cpp, numba, torch (a measured
ranking, ``PYENGINE_RANK=1 pyengine info``, may reorder them per device name). The torch
reference backend is always there. ``PYENGINE_BACKEND=<name>`` or ``backend=`` forces one; a
forced backend that cannot run raises ValueError saying why, and when nothing fits the error
lists every backend with its reasons. The logic lives in :mod:`pyengine.backends.dispatch`.
"""

from __future__ import annotations

from . import cpp, cuda, torch_ref  # noqa: F401  (the eager backends; numba/triton are lazy)
from .dispatch import (Call, available, explain, fused_update, get, names, priority, rank,
                       reasons, select)

__all__ = ["Call", "available", "explain", "fused_update", "get", "names", "priority", "rank",
           "reasons", "select"]
