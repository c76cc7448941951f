"""The native fused update as a torch.library op, so torch.compile and CUDA graph capture can
see it (DESIGN.md s.5, STYLE habit 9).

    out = sum_k coef_k * bufs_k + noise_coef * z       aux_out = sum_k aux_coef_k * bufs_k
    with a mask: out = mask * out + (1 - mask) * sum_k mask_coef_k * bufs_k

``torch.ops.pyengine.fused_update`` mutates ``out`` and ``aux_out`` (schema ``Tensor(a!)``)
and returns nothing; its fake implementation runs the contract validator's structure part
(pyengine.fused_update.validate with data=False: shapes, dtypes, devices), so tracing never
touches data and meta tensors are refused as on the direct call. On CPU tensors it runs the
C++ kernel, on CUDA tensors the CUDA kernel.
:func:`fused_update` here takes the backend contract's arguments (numpy coefficients, a float
or [B] noise coefficient) and calls the op. The backends' own ``fused_update`` is the direct
call, with no dispatcher in between; bench/bench_fused_update.py measures both. A per-sample
step tensor travels as ``steps`` (``step`` is then ignored); ``steps``, ``mask`` and
``mask_coef`` default to None, so the op's older 11-argument calls still hold.

The op is defined with a schema string on a ``torch.library.Library`` rather than with the
``torch.library.custom_op`` decorator, whose Python wrapper is costly: per call at 1x4x8x8 on
the (loaded) 2-core EPYC, the decorator's op took 215 us, this one 36-54 us, the direct call
20 us (mostly argument validation).
"""

import numbers
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .backends import cpp as _cpp
from .backends import cuda as _cuda
from .fused_update import contract

__all__ = ["fused_update"]

SCHEMA = ("fused_update(Tensor(a!) out, Tensor[] bufs, Tensor coef, float noise_coef, "
          "Tensor? noise_coef_per_sample, Tensor? seeds, int step, Tensor(b!)? aux_out, "
          "Tensor? aux_coef, Tensor? noise, ScalarType? compute_dtype, Tensor? steps=None, "
          "Tensor? mask=None, Tensor? mask_coef=None) -> ()")

_lib = torch.library.Library("pyengine", "DEF")
_lib.define(SCHEMA)


def _contract_args(out, bufs, coef, noise_coef, noise_coef_per_sample, seeds, step, aux_out,
                   aux_coef, noise, compute_dtype, steps, mask, mask_coef):
    """The op's arguments as the contract's (positional, then keywords)."""
    nc = noise_coef_per_sample if noise_coef_per_sample is not None else noise_coef
    return ((out, list(bufs), coef, nc, seeds, steps if steps is not None else step, aux_out,
             aux_coef), {"noise": noise, "compute_dtype": compute_dtype, "mask": mask,
                         "mask_coef": mask_coef})


def _impl(out: Tensor, bufs: list[Tensor], coef: Tensor, noise_coef: float,
          noise_coef_per_sample: Optional[Tensor], seeds: Optional[Tensor], step: int,
          aux_out: Optional[Tensor], aux_coef: Optional[Tensor], noise: Optional[Tensor],
          compute_dtype: Optional[torch.dtype], steps: Optional[Tensor] = None,
          mask: Optional[Tensor] = None, mask_coef: Optional[Tensor] = None) -> None:
    args, kw = _contract_args(out, bufs, coef, noise_coef, noise_coef_per_sample, seeds, step,
                              aux_out, aux_coef, noise, compute_dtype, steps, mask, mask_coef)
    (_cuda if out.is_cuda else _cpp).fused_update(*args, **kw)


_lib.impl("fused_update", _impl, "CompositeExplicitAutograd")


@torch.library.register_fake("pyengine::fused_update", lib=_lib)
def _fake(out, bufs, coef, noise_coef, noise_coef_per_sample, seeds, step, aux_out, aux_coef,
          noise, compute_dtype, steps=None, mask=None, mask_coef=None):
    """The validator's structure part (fake tensors have no memory). Real meta tensors come
    here too: no kernel runs on them, so they are refused like any other device."""
    args, kw = _contract_args(out, bufs, coef, noise_coef, noise_coef_per_sample, seeds, step,
                              aux_out, aux_coef, noise, compute_dtype, steps, mask, mask_coef)
    contract.validate(*args, **kw, backend=_LIMITS, data=False)
    return None


#: the devices the op's kernels run on (C++ on CPU, CUDA on CUDA), every float dtype
_LIMITS = contract.Limits("torch.ops.pyengine.fused_update", ("cpu", "cuda"))


def _as_tensor(coef) -> Tensor:
    if isinstance(coef, Tensor):
        return coef
    return torch.from_numpy(np.ascontiguousarray(np.asarray(coef, dtype=np.float64)))


def fused_update(out, bufs, coef, noise_coef=0.0, seeds=None, step=-1, aux_out=None,
                 aux_coef=None, *, noise=None, compute_dtype=None, mask=None, mask_coef=None):
    """The backend contract through ``torch.ops.pyengine.fused_update`` (traceable).

    Arguments the op's schema cannot take (a list for ``out``, a string coefficient, a step
    that is not an integer) are reported by the contract's validator, naming the argument."""
    if not torch.compiler.is_compiling():           # (traced: the fake implementation checks)
        for name, c in (("coef", coef), ("aux_coef", aux_coef), ("mask_coef", mask_coef),
                        ("noise_coef", noise_coef)):
            if c is not None:
                contract.check_finite(c, name)      # host numbers, before they become tensors
    try:
        if not isinstance(step, Tensor) and (isinstance(step, bool) or
                                             not isinstance(step, numbers.Integral)):
            raise TypeError("step")
        per_sample = noise_coef if isinstance(noise_coef, Tensor) else None
        scalar = 0.0 if per_sample is not None else float(noise_coef)
        steps = step if isinstance(step, Tensor) else None
        args = (out, list(bufs), _as_tensor(coef), scalar, per_sample, seeds,
                -1 if steps is not None else int(step), aux_out,
                None if aux_coef is None else _as_tensor(aux_coef), noise, compute_dtype, steps,
                mask, None if mask_coef is None else _as_tensor(mask_coef))
    except (TypeError, ValueError, AttributeError, OverflowError):
        _explain(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise,
                 compute_dtype, mask, mask_coef)
        raise
    try:
        torch.ops.pyengine.fused_update(*args)
    except (RuntimeError, AttributeError, TypeError):
        # the dispatcher's schema messages and type errors: the validator names the argument
        _explain(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise,
                 compute_dtype, mask, mask_coef)
        raise
    return out


def _explain(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise, compute_dtype,
             mask, mask_coef) -> None:
    """Raise the contract validator's ValueError for a call the op refused (nothing when the
    validator finds the call well formed: the caller re-raises the op's own error)."""
    if not isinstance(step, Tensor) and (isinstance(step, bool) or
                                         not isinstance(step, numbers.Integral)):
        raise ValueError(f"step must be an int or an int64 [B] tensor of draw numbers, got "
                         f"{step!r}") from None
    contract.validate(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise=noise,
                      compute_dtype=compute_dtype, mask=mask, mask_coef=mask_coef,
                      backend=_LIMITS)
