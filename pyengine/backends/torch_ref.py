"""The torch reference backend: the definition of correct for every kernel, on any device.

The update written with torch ops (:mod:`pyengine.fused_update.reference` states the exact
order of operations); no limit on the number of buffers.
"""

from __future__ import annotations

import torch

from ..fused_update import contract, reference

name = "torch"
device_types = None             # any device torch runs on
dtypes = contract.FLOAT_DTYPES
max_buffers = None
FLOAT_DTYPES = contract.FLOAT_DTYPES


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return contract.compute_dtype_for(dtype)


fused_update = contract.entry_point(__name__, reference.fused_update)
