"""The fused-update contract's one validator and one overlap check (DESIGN.md s.5).

:func:`validate` checks every argument of a call -- shapes, dtypes, devices, K <= K_MAX, the
coefficient tables, the noise / seeds / step rules, the mask rules -- and the overlap rules
(:func:`check_overlap`), raising ValueError that names the argument. Every backend's
``fused_update`` calls it unless the caller passes ``trusted=True`` (the executor validates
once per plan and shape, then runs its steps trusted); the torch.library op's fake
implementation calls its shape part (``data=False``: fake tensors have no memory).

It returns a :class:`Signature`, the call's structure: two calls with equal signatures are
the same call as far as the contract goes, so a caller may cache it.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import torch

#: The most buffers one update reads: the kernels' compile-time maximum (csrc/fused_update/
#: fused_update.h kKMax, asserted equal by tests/test_fused_update.py).
K_MAX = 8
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
COMPUTE_DTYPES = (torch.float32, torch.float64)
_REAL = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
         torch.int16, torch.int8, torch.uint8)


class Signature(NamedTuple):
    """The structure of a validated call (what ``trusted=True`` promises is unchanged)."""

    shape: tuple
    device: torch.device
    dtypes: tuple            # of bufs, then out (then aux_out)
    K: int
    coef: str                # "step" ([K]) or "sample" ([B, K]); the same for aux and mask
    aux: str | None
    mask: str | None
    noise: str               # "none", "philox" or "tensor"
    per_sample_steps: bool
    compute_dtype: torch.dtype


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def compute_dtype_for(out_dtype, compute_dtype=None) -> torch.dtype:
    """float64 for float64 outputs (or when asked), float32 otherwise."""
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if out_dtype == torch.float64 else torch.float32


def check_compute_dtype(compute_dtype) -> None:
    """ValueError naming ``compute_dtype`` unless it is None, torch.float32 or float64."""
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64 (or None), got "
                         f"{compute_dtype!r}")


def has_noise(noise_coef) -> bool:
    """Whether the update draws noise: a [B] noise coefficient, or a nonzero scalar."""
    return isinstance(noise_coef, torch.Tensor) or noise_coef != 0.0


# ---------------------------------------------------------------------------------------
# the validator
# ---------------------------------------------------------------------------------------


class Limits:
    """What the validator needs from a backend: its name, device types (None: any), the
    storage dtypes of its data tensors, the most buffers it reads (None: no limit)."""

    __slots__ = ("name", "device_types", "dtypes", "max_buffers")

    def __init__(self, name, device_types=None, dtypes=FLOAT_DTYPES, max_buffers=K_MAX):
        self.name, self.device_types = name, device_types
        self.dtypes, self.max_buffers = dtypes, max_buffers


_ANY = Limits("fused_update")


def _limits(backend) -> Limits:
    if backend is None:
        return _ANY
    if isinstance(backend, Limits):
        return backend
    if isinstance(backend, str):
        from ..backends import dispatch           # the registry sits above this package
        if backend not in dispatch.REGISTRY:
            raise ValueError(f"backend must be one of {sorted(dispatch.REGISTRY)}, got "
                             f"{backend!r}")
        backend = dispatch.resolve(dispatch.REGISTRY[backend])
    return Limits(getattr(backend, "name", "given"), getattr(backend, "device_types", None),
                  getattr(backend, "dtypes", FLOAT_DTYPES), getattr(backend, "max_buffers", K_MAX))


def _tensor(t, name, shape, device, be):
    """ValueError naming ``t`` unless it is a float tensor of ``shape`` on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, bufs[0] on {device}")
    if t.dtype not in be.dtypes:
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has unsupported dtype {_name(t.dtype)} (float32, "
                             f"float64, float16, bfloat16)")
        raise ValueError(f"{name} has dtype {_name(t.dtype)}: the {be.name} backend takes "
                         f"{' and '.join(_name(d) for d in be.dtypes)}")


def _writable(t, name):
    """An output must give each element its own memory (no expanded, stride-0 views)."""
    if t.is_contiguous():
        return
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())) or (
            t.device.type != "meta" and torch._debug_has_internal_overlap(t) == 1):
        raise ValueError(f"{name} has elements that share memory (stride {tuple(t.stride())}, "
                         f"e.g. an expanded view): each element of {name} must be its own "
                         f"memory")


def coef_kind(coef, B, K, name) -> str:
    """"step" for [K] coefficients, "sample" for a [B, K] table; ValueError naming it."""
    if isinstance(coef, torch.Tensor):
        shape = tuple(coef.shape)
        if coef.dtype not in _REAL:
            raise ValueError(f"{name} must hold real numbers, got a {_name(coef.dtype)} tensor")
    elif isinstance(coef, np.ndarray) and coef.dtype.kind in "fiu":
        shape = coef.shape
    else:
        try:
            shape = np.asarray(coef, dtype=np.float64).shape
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a float64 array [K] or a tensor [B, K], got "
                             f"{type(coef).__name__}") from None
    if len(shape) == 1:
        if shape[0] != K:
            raise ValueError(f"{name} has {shape[0]} entries for {K} buffers")
        return "step"
    if shape == (B, K):
        return "sample"
    raise ValueError(f"{name} must be [K]={K} or [B, K]=({B}, {K}), got {shape}")


def check_finite(coef, name) -> None:
    """ValueError naming ``coef`` if a host coefficient (a number, a list, an array) is NaN
    or infinite. Tensors are not read: that would be a host read of device memory (and of
    the compiled loop's tables, which never reads back); the executor's tables come from
    plans, whose builder checks every number."""
    if isinstance(coef, torch.Tensor):
        return
    if type(coef) is float:
        ok = math.isfinite(coef)
    elif type(coef) is np.ndarray and coef.ndim == 1 and coef.dtype.kind == "f":
        ok = all(map(math.isfinite, coef.tolist()))          # [K]: faster than a ufunc
    elif isinstance(coef, numbers.Real):
        ok = math.isfinite(float(coef))
    else:
        try:
            ok = bool(np.isfinite(np.asarray(coef, dtype=np.float64)).all())
        except (TypeError, ValueError):
            return                     # not numbers at all: the structure checks name it
    if not ok:
        raise ValueError(f"{name} must be finite, got {coef!r}")


def check_step(step, B):
    """True for an int64 [B] (or [1]) tensor of per-sample draw numbers, False for an int;
    ValueError naming ``step`` otherwise."""
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.dim() != 1 or step.shape[0] not in (B, 1):
            raise ValueError(f"step must be an int or an int64 [B]={B} tensor of per-sample "
                             f"draw numbers, got {step.dtype} {tuple(step.shape)}")
        return True
    return False


def validate(out, bufs, coef, noise_coef=0.0, seeds=None, step=-1, aux_out=None, aux_coef=None,
             *, noise=None, compute_dtype=None, mask=None, mask_coef=None, backend=None,
             data: bool = True) -> Signature:
    """Check a fused-update call against the contract; ValueError naming the argument.

    ``backend`` (a registry name or a backend module; None: any device, every float dtype,
    K <= K_MAX) adds that backend's device types, storage dtypes and buffer limit.
    ``data=False`` checks structure only (fake tensors, which have no memory to overlap).
    """
    be = _limits(backend)
    if not isinstance(bufs, (list, tuple)) or not bufs:
        raise ValueError("bufs must be a non-empty list of tensors")
    K = len(bufs)
    if be.max_buffers is not None and K > be.max_buffers:
        raise ValueError(f"bufs has {K} tensors; the {be.name} kernel reads at most "
                         f"{be.max_buffers}")
    ref = bufs[0]
    if not isinstance(ref, torch.Tensor):
        raise ValueError(f"bufs[0] must be a tensor, got {type(ref).__name__}")
    if ref.dim() < 1:
        raise ValueError("bufs must be [B, ...] tensors, got a 0-dim bufs[0]")
    shape, device = ref.shape, ref.device
    if be.device_types is not None and device.type not in be.device_types:
        raise ValueError(f"bufs[0] is on {device}: the {be.name} backend runs on "
                         f"{' and '.join(be.device_types)} tensors")
    for i, b in enumerate(bufs):
        _tensor(b, f"bufs[{i}]", shape, device, be)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a tensor of shape {tuple(shape)} on {device}, got "
                         f"{type(out).__name__}")
    _tensor(out, "out", shape, device, be)
    _writable(out, "out")
    if (aux_out is None) != (aux_coef is None):
        raise ValueError("aux_out and aux_coef must be given together")
    if aux_out is not None:
        _tensor(aux_out, "aux_out", shape, device, be)
        _writable(aux_out, "aux_out")
        if aux_out is out:
            raise ValueError("aux_out must be a different tensor from out")
    check_compute_dtype(compute_dtype)
    B = shape[0]
    kind = coef_kind(coef, B, K, "coef")
    aux_kind = coef_kind(aux_coef, B, K, "aux_coef") if aux_out is not None else None
    if data:
        check_finite(coef, "coef")
        if aux_out is not None:
            check_finite(aux_coef, "aux_coef")
    if (mask is None) != (mask_coef is None):
        raise ValueError("mask and mask_coef must be given together")
    mask_kind = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a tensor, got {type(mask).__name__}")
        if mask.shape != shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device}, bufs[0] on {device}")
        if mask.dtype not in FLOAT_DTYPES:
            raise ValueError(f"mask has unsupported dtype {_name(mask.dtype)} (float32, "
                             f"float64, float16, bfloat16)")
        mask_kind = coef_kind(mask_coef, B, K, "mask_coef")
        if data:
            check_finite(mask_coef, "mask_coef")
    per_sample = check_step(step, B)
    if not per_sample and type(step) is not int and (
            isinstance(step, bool) or not isinstance(step, numbers.Integral)):
        raise ValueError(f"step must be an int or an int64 [B] tensor of draw numbers, got "
                         f"{step!r}")
    if not per_sample and not -2 ** 63 <= step < 2 ** 63:
        raise ValueError(f"step must fit in int64 (a draw number), got {step}")

    # noise: Philox keyed by (seeds[b], step) or the given tensor, times a scalar or [B] c_z
    if isinstance(noise_coef, torch.Tensor):
        if noise_coef.numel() != B or (noise_coef.dim() > 1 and noise_coef.dim() != ref.dim()):
            raise ValueError(f"noise_coef must be a float or a [B]={B} tensor, got shape "
                             f"{tuple(noise_coef.shape)}")
    elif type(noise_coef) is not float and (isinstance(noise_coef, bool) or
                                            not isinstance(noise_coef, numbers.Real)):
        raise ValueError(f"noise_coef must be a float or a [B] tensor, got "
                         f"{type(noise_coef).__name__}")
    if data:
        check_finite(noise_coef, "noise_coef")
    noise_kind = "none"
    if has_noise(noise_coef):
        if noise is not None:
            _tensor(noise, "noise", shape, device, be)
            noise_kind = "tensor"
        else:
            if not isinstance(seeds, torch.Tensor) or (not per_sample and (
                    type(step) is not int and (isinstance(step, bool) or
                                               not isinstance(step, numbers.Integral))
                    or step < 0)):
                raise ValueError("a noisy update needs seeds (an int64 [B] tensor) and step "
                                 ">= 0 or an int64 [B] step tensor (or noise=)")
            if seeds.dtype != torch.int64 or seeds.shape != (B,):
                raise ValueError(f"seeds must be an int64 [B]={B} tensor, got {seeds.dtype} "
                                 f"{tuple(seeds.shape)}")
            noise_kind = "philox"
    if data:
        check_overlap(out, bufs, aux_out, noise if noise_kind == "tensor" else None, mask)
    dtypes = tuple(b.dtype for b in bufs) + (out.dtype,) + (
        (aux_out.dtype,) if aux_out is not None else ())
    return Signature(tuple(shape), device, dtypes, K, kind, aux_kind, mask_kind, noise_kind,
                     per_sample, compute_dtype_for(out.dtype, compute_dtype))


# ---------------------------------------------------------------------------------------
# the overlap check
# ---------------------------------------------------------------------------------------


def _span(t):
    """The byte range [lo, hi) that tensor ``t``'s elements lie in (empty: lo == hi)."""
    lo = t.data_ptr()
    if t.is_contiguous():
        return lo, lo + t.nbytes
    if t.numel() == 0:
        return lo, lo
    n = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return lo, lo + n * t.element_size()


def overlaps(a, b) -> bool:
    """Whether tensors ``a`` and ``b`` may share memory (their byte ranges intersect)."""
    if a.device != b.device:
        return False
    alo, ahi = _span(a)
    blo, bhi = _span(b)
    return alo < bhi and blo < ahi and alo < ahi and blo < bhi


def _same(a, b) -> bool:
    """``a`` and ``b`` are the very same elements (an in-place update reads and writes each
    element at one place)."""
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def check_overlap(out, bufs, aux_out=None, noise=None, mask=None):
    """The one overlap rule of every backend (DESIGN.md s.5: ``out`` may alias an input, never
    silently another): ``out`` and ``aux_out`` may each be exactly one of the inputs (bufs,
    noise), never overlap one partially; ``aux_out`` and ``out`` share no memory; ``mask``
    (read while the outputs are written) shares none with either. ValueError naming both.
    One byte-range test per pair (a few us per call): strided views that interleave without
    sharing an element are refused too."""
    outs = [("out", out, *_span(out))]
    if aux_out is not None:
        outs.append(("aux_out", aux_out, *_span(aux_out)))
    ins = [(f"bufs[{k}]", b) for k, b in enumerate(bufs)]
    if noise is not None:
        ins.append(("noise", noise))
    for iname, t in ins:
        lo, hi = _span(t)
        for oname, o, olo, ohi in outs:
            if olo < hi and lo < ohi and o.device == t.device and not _same(o, t):
                raise ValueError(f"{oname} overlaps {iname} without being the same tensor (it "
                                 f"may alias one input exactly, for an in-place update); pass "
                                 f"a separate tensor or a clone")
    if aux_out is not None and overlaps(aux_out, out):
        raise ValueError("aux_out overlaps out: they must be separate tensors")
    if mask is not None:
        for oname, o, _, _ in outs:
            if overlaps(mask, o):
                raise ValueError(f"mask shares memory with {oname}: the mask is read while "
                                 f"{oname} is written, so it must be a separate tensor")


# ---------------------------------------------------------------------------------------
# the backends' entry point: validate (unless trusted), then launch
# ---------------------------------------------------------------------------------------


def entry_point(module_name: str, launch, ready=None):
    """A backend's ``fused_update``: the contract's signature, written here once.

    ``launch(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise,
    compute_dtype, mask, mask_coef)`` runs validated arguments; ``ready()`` raises
    RuntimeError when the backend cannot run at all. The backend module (``module_name``)
    supplies the validator's limits: ``name``, ``device_types``, ``dtypes``, ``max_buffers``.
    """
    limits = []

    def fused_update(out, bufs, coef, noise_coef=0.0, seeds=None, step=-1, aux_out=None,
                     aux_coef=None, *, noise=None, compute_dtype=None, mask=None,
                     mask_coef=None, trusted: bool = False):
        if ready is not None:
            ready()
        if not trusted:
            if not limits:
                import sys
                limits.append(_limits(sys.modules[module_name]))
            validate(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise=noise,
                     compute_dtype=compute_dtype, mask=mask, mask_coef=mask_coef,
                     backend=limits[0])
        return launch(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise,
                      compute_dtype, mask, mask_coef)

    fused_update.__module__ = module_name
    fused_update.__qualname__ = "fused_update"
    fused_update.__doc__ = (
        "The fused update (pyengine.fused_update) on this backend; returns ``out``.\n\n"
        "``trusted=True``: the caller promises the structure (shapes, dtypes, devices, K, "
        "coefficient kinds, noise and mask modes, overlaps) of a call it validated before "
        "with :func:`pyengine.fused_update.validate`; the checks are skipped.")
    return fused_update
