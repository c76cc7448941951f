"""The fused update: the one op every solver step runs (DESIGN.md s.2, s.5).

    res = sum_k coef_k * bufs_k + noise_coef * z          aux_out = sum_k aux_coef_k * bufs_k
    out = res,   or with a mask m:   out = m * res + (1 - m) * sum_k mask_coef_k * bufs_k

    fused_update(out, bufs[K], coef[K] or [B, K], noise_coef=0.0 or [B], seeds=None [B],
                 step=-1 or step[B], aux_out=None, aux_coef=None [K] or [B, K], *,
                 noise=None, compute_dtype=None, mask=None, mask_coef=None [K] or [B, K])

- ``bufs``: 1 to K_MAX float tensors of one [B, ...] shape and device (float32, float64,
  float16, bfloat16; they may mix); ``out`` (and ``aux_out``) the same shape and device.
  ``out`` may be exactly one of the inputs (an in-place update), never overlap one partially;
  ``aux_out`` shares no memory with ``out``; the ``mask`` shares none with either.
- Arithmetic in float32 (float64 for float64 outputs, or ``compute_dtype``), stored once in
  the output's dtype; each buffer read once.
- z: Philox-4x32-10 normals keyed by (seeds[b], step) -- or (seeds[b], step[b]) for an int64
  [B] step tensor -- made inside the kernel (DESIGN.md s.6), or the tensor ``noise``.
  ``noise_coef`` is a float or a [B] tensor; 0.0 draws nothing.
- ``mask`` (any float dtype, bufs[0]'s shape) blends with the ``mask_coef`` combination;
  aux_out is not masked. :mod:`pyengine.fused_update.reference` states the exact order of
  operations every backend follows.

This package holds the contract's one validator and one overlap check (:mod:`.contract`),
the torch reference (:mod:`.reference`), the launchers of the native kernels (:mod:`.native`,
over csrc/), the numba kernels (:mod:`.numba_kernels`) and the Triton kernel
(:mod:`.triton_kernels`). :mod:`pyengine.backends` registers them and picks one per call.

Validation costs a few microseconds per call. A caller that runs the same structure many
times (the executor: one plan, one shape) validates once with :func:`validate` and passes
``trusted=True`` to the backend's ``fused_update`` on every step.
"""

from __future__ import annotations

from .contract import (COMPUTE_DTYPES, FLOAT_DTYPES, K_MAX, Signature, check_overlap,
                       overlaps, validate)

__all__ = ["COMPUTE_DTYPES", "FLOAT_DTYPES", "K_MAX", "Signature", "check_overlap",
           "fused_update", "overlaps", "validate"]


def fused_update(out, bufs, coef, noise_coef=0.0, seeds=None, step=-1, aux_out=None,
                 aux_coef=None, *, noise=None, compute_dtype=None, mask=None, mask_coef=None,
                 backend=None):
    """The update through the backend :func:`pyengine.backends.select` picks for this call
    (``backend``: a registry name to force one)."""
    from ..backends import dispatch
    return dispatch.fused_update(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef,
                                 noise=noise, compute_dtype=compute_dtype, mask=mask,
                                 mask_coef=mask_coef, backend=backend)
