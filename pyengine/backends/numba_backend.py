"""The numba CPU backend: parallel numba kernels over zero-copy numpy views of the tensors
(:mod:`pyengine.fused_update.numba_kernels`).

float32 and float64 data only (numpy has no bfloat16; float16 would be computed through
conversions numba cannot vectorize): other dtypes make the call unsupported, with the reason
in :func:`reasons_unsupported`, and the dispatcher picks another backend. The mask may be any
float dtype. numba is imported on first use (0.3 s), never by ``import pyengine``.
"""

from __future__ import annotations

import importlib.util

import torch

from ..fused_update import contract

name = "numba"
device_types = ("cpu",)
dtypes = (torch.float32, torch.float64)
max_buffers = contract.K_MAX


def _kernels():
    from ..fused_update import numba_kernels
    return numba_kernels


def unavailable_reason(device_type: str = "cpu") -> str | None:
    """None when this backend can run on ``device_type``, else why not."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install numba)"
    if device_type != "cpu":
        return f"the numba backend runs on CPU tensors, not {device_type}"
    return _kernels().IMPORT_ERROR


def reasons_unsupported(call) -> list[str]:
    """Why this backend cannot run ``call`` (a :class:`pyengine.backends.dispatch.Call`)."""
    why = []
    r = unavailable_reason(call.device_type)
    if r is not None:
        why.append(r)
    bad = sorted({str(d).replace("torch.", "") for d in call.dtypes if d not in dtypes})
    if bad:
        why.append(f"float32/float64 only (numpy views), got {', '.join(bad)}")
    if call.K > max_buffers:
        why.append(f"reads at most {max_buffers} buffers, got {call.K}")
    return why


def _ready():
    why = unavailable_reason("cpu")
    if why is not None:
        raise RuntimeError(f"the numba backend is unavailable: {why}")


def _launch(*args):
    return _kernels().fused_update(*args)


fused_update = contract.entry_point(__name__, _launch, _ready)


def philox_words(seed: int, step: int, nq: int, q0: int = 0) -> torch.Tensor:
    """The raw Philox-4x32-10 words of quads q0..q0+nq-1 of a sample: int64 [nq, 4]."""
    _ready()
    return _kernels().philox_words(seed, step, nq, q0)


def philox_normal(seeds: torch.Tensor, step: int, numel: int) -> torch.Tensor:
    """float32 normals [B, numel] from the numba kernel's noise."""
    _ready()
    return _kernels().philox_normal(seeds, step, numel)
