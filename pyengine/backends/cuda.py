"""The CUDA backend: pyengine._C's CUDA fused update (csrc/cuda/fused_update.cu).

One kernel launch on the current CUDA stream (torch.cuda.current_stream(), never the default
stream unless that is the current one): 16-byte loads of every buffer, one store of out (and
aux_out), Philox noise generated in registers. Per-step coefficients travel by value in the
launch; a [B, K] coefficient table, a [B] noise coefficient, a per-sample ``step`` tensor and
the inpainting ``mask`` are read from device memory. No host synchronization, so it can be
captured in a CUDA graph. Buffers of mixed dtypes are converted to the compute dtype first
(an extra pass). The contract: :mod:`pyengine.fused_update`; the launcher:
:mod:`pyengine.fused_update.native`.
"""

from __future__ import annotations

import torch

from ..fused_update import contract, native

name = "cuda"
device_types = ("cuda",)
dtypes = contract.FLOAT_DTYPES
max_buffers = contract.K_MAX


def unavailable_reason(device_type: str = "cuda") -> str | None:
    """None when this backend can run on ``device_type``, else why not."""
    if native._C is None:
        return native.IMPORT_ERROR
    if not native._C.has_cuda():
        return "pyengine._C was built without the CUDA kernel (no CUDA compiler at build time)"
    if device_type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device_type}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


_ready_seen = []        # set once the checks above have passed (they cost ~us per call)


def _ready():
    if not _ready_seen:
        why = unavailable_reason("cuda")
        if why is not None:
            raise RuntimeError(f"the cuda backend is unavailable: {why}")
        _ready_seen.append(True)


fused_update = contract.entry_point(__name__, native.fused_update_cuda, _ready)
