"""What the native backends (cpp, cuda) share: the contract's validation and its marshalling.

pyengine._C takes no tensors (it does not link libtorch): this module checks the arguments of
``fused_update`` (DESIGN.md s.5) before anything is launched, raising ValueError with the
offending argument's name, and turns them into data pointers, element counts and dtype codes.
Non-contiguous inputs are copied to contiguous ones; a non-contiguous output is computed into
a contiguous temporary and copied back. The checks of a per-sample ``step`` tensor and of the
inpainting ``mask`` (:func:`per_sample_steps`, :func:`check_mask`) serve every backend.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

try:
    from .. import _C
except ImportError as exc:          # the extension was not built (pure-Python install)
    _C = None
    IMPORT_ERROR = f"pyengine._C is not built ({exc})"
else:
    IMPORT_ERROR = None

#: dtype codes of csrc/fused_update/dtypes.h
CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
K_MAX = 8
NO_NOISE, PHILOX_NOISE, TENSOR_NOISE = 0, 1, 2
_MASK32 = 0xFFFFFFFF


def _check_tensor(t, name, shape, device_index):
    """The dtype code of tensor ``t`` after checking it against bufs[0]; ValueError naming it."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.get_device() != device_index:
        raise ValueError(f"{name} is on {t.device}, bufs[0] on "
                         f"{'cpu' if device_index < 0 else f'cuda:{device_index}'}")
    code = CODES.get(t.dtype)
    if code is None:
        raise ValueError(f"{name} has unsupported dtype {t.dtype} (float32, float64, float16, "
                         f"bfloat16)")
    return code


def _coefficients(coef, B, K, device, name):
    """([K] floats, None) for per-step coefficients or (None, float64 [B, K] table)."""
    if type(coef) is np.ndarray and coef.ndim == 1 and coef.dtype == np.float64:
        if coef.shape[0] != K:                                   # the plans' own kind: fast
            raise ValueError(f"{name} has {coef.shape[0]} entries for {K} buffers")
        return coef.tolist(), None
    if isinstance(coef, torch.Tensor):
        if coef.dim() == 1:
            if coef.shape[0] != K:
                raise ValueError(f"{name} has {coef.shape[0]} entries for {K} buffers")
            return coef.tolist(), None
        if coef.dim() == 2 and tuple(coef.shape) == (B, K):
            return None, coef.to(device=device, dtype=torch.float64).contiguous()
        raise ValueError(f"{name} must be [K]={K} or [B, K]=({B}, {K}), got {tuple(coef.shape)}")
    try:
        c = np.asarray(coef, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a float64 array [K] or a tensor [B, K], got "
                         f"{type(coef).__name__}") from None
    if c.ndim == 1:
        if c.shape[0] != K:
            raise ValueError(f"{name} has {c.shape[0]} entries for {K} buffers")
        return c.tolist(), None
    if c.ndim == 2 and c.shape == (B, K):
        return None, torch.from_numpy(np.ascontiguousarray(c)).to(device)
    raise ValueError(f"{name} must be [K]={K} or [B, K]=({B}, {K}), got {c.shape}")


def _contiguous(t):
    return t if t.is_contiguous() else t.contiguous()


def per_sample_steps(step, B, device=None, expand=True):
    """None for an int ``step``; for a tensor, the int64 per-sample draw numbers: [B], or [1]
    (one draw number for the batch, read from memory so that a captured graph replays with a
    new one) expanded to [B] unless ``expand`` is False; moved to ``device`` and made
    contiguous unless ``device`` is None (then only checked). ValueError naming ``step`` for
    another dtype or shape. The kernels use the low 32 bits of each, as of an int step."""
    if not isinstance(step, torch.Tensor):
        return None
    if step.dtype != torch.int64 or step.dim() != 1 or step.shape[0] not in (B, 1):
        raise ValueError(f"step must be an int or an int64 [B]={B} tensor of per-sample draw "
                         f"numbers, got {step.dtype} {tuple(step.shape)}")
    if device is None:
        return step
    if step.device != device:
        step = step.to(device)
    if expand and step.shape[0] != B:
        step = step.expand(B)
    return _contiguous(step)


def _byte_range(t):
    lo = t.data_ptr()
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return lo, lo + span * t.element_size()


def overlaps(a, b) -> bool:
    """Whether tensors ``a`` and ``b`` may share memory (their address ranges intersect)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    alo, ahi = _byte_range(a)
    blo, bhi = _byte_range(b)
    return alo < bhi and blo < ahi


def check_mask(mask, mask_coef, out, aux_out, shape, device):
    """The inpainting blend's arguments: both or neither, ``mask`` a float tensor of bufs[0]'s
    shape and device, sharing no memory with ``out`` or ``aux_out`` (it is read while they are
    written). ValueError naming the argument; True when there is a mask."""
    if (mask is None) != (mask_coef is None):
        raise ValueError("mask and mask_coef must be given together")
    if mask is None:
        return False
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, bufs[0] on {device}")
    if mask.dtype not in CODES:
        raise ValueError(f"mask has unsupported dtype {mask.dtype} (float32, float64, float16, "
                         f"bfloat16)")
    for name, o in (("out", out), ("aux_out", aux_out)):
        if isinstance(o, torch.Tensor) and overlaps(mask, o):
            raise ValueError(f"mask shares memory with {name}: the mask is read while {name} "
                             f"is written, so it must be a separate tensor")
    return True


class Marshalled:
    """The pointer arguments of one _C call, the tensors they point into (kept alive for the
    call) and the copies back into non-contiguous or converted outputs."""

    __slots__ = ("args", "keep", "copy_back", "empty")

    def __init__(self):
        self.args = ()
        self.keep = []
        self.copy_back = []
        self.empty = False

    def finish(self):
        for dst, src in self.copy_back:
            dst.copy_(src)


def marshal(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise, compute_dtype,
            *, backend: str, device_type: str, uniform_dtypes: bool = False, mask=None,
            mask_coef=None) -> Marshalled:
    """Validate the contract's arguments and build the _C arguments.

    ``step`` is an int or an int64 [B] tensor of per-sample draw numbers (passed as a
    pointer); ``mask`` (any float dtype, read by the kernel as it is) blends the update with
    the ``mask_coef`` combination, see pyengine.backends.torch_ref.

    ``uniform_dtypes`` (the CUDA kernel): every buffer in one dtype, out and aux in one dtype,
    float64 exactly when computing in float64, noise in the compute dtype. Other mixes are
    converted here (exactly: to the compute dtype) and computed into temporaries.

    Written for a small per-call cost (a few us: it runs once per solver step): one pass over
    the buffers, device indices compared as ints, dtype codes looked up once.
    """
    m = Marshalled()
    if not isinstance(bufs, (list, tuple)) or not bufs:
        raise ValueError("bufs must be a non-empty list of tensors")
    K = len(bufs)
    if K > K_MAX:
        raise ValueError(f"bufs has {K} tensors; the {backend} kernel reads at most {K_MAX}")
    ref = bufs[0]
    if not isinstance(ref, torch.Tensor):
        raise ValueError(f"bufs[0] must be a tensor, got {type(ref).__name__}")
    shape, dev_index = ref.shape, ref.get_device()
    if not (ref.is_cuda if device_type == "cuda" else ref.is_cpu):
        raise ValueError(f"bufs[0] is on {ref.device}: the {backend} backend runs on "
                         f"{device_type} tensors")
    if len(shape) < 1:
        raise ValueError("bufs must be [B, ...] tensors, got a 0-dim bufs[0]")
    codes, contiguous = [], True
    for i, b in enumerate(bufs):
        code = CODES.get(b.dtype) if isinstance(b, torch.Tensor) else None
        if code is None or b.shape != shape or b.get_device() != dev_index:
            code = _check_tensor(b, f"bufs[{i}]", shape, dev_index)   # raises, naming it
        codes.append(code)
        contiguous = contiguous and b.is_contiguous()
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a tensor of shape {tuple(shape)} on {ref.device}")
    out_code = _check_tensor(out, "out", shape, dev_index)
    if (aux_out is None) != (aux_coef is None):
        raise ValueError("aux_out and aux_coef must be given together")
    if aux_out is not None:
        _check_tensor(aux_out, "aux_out", shape, dev_index)
        if aux_out is out:
            raise ValueError("aux_out must be a different tensor from out")
    has_mask = mask is not None or mask_coef is not None
    if has_mask:
        check_mask(mask, mask_coef, out, aux_out, shape, ref.device)
    steps = per_sample_steps(step, shape[0])           # checked here, moved when drawn
    f64 = out_code == 1 if compute_dtype is None else compute_dtype == torch.float64
    if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got "
                         f"{compute_dtype}")
    B = shape[0]
    numel = ref.numel() // B if B else 0
    device = ref.device                                   # tables live beside the data
    coef_vals, coef_table = _coefficients(coef, B, K, device, "coef")
    aux_vals, aux_table = (_coefficients(aux_coef, B, K, device, "aux_coef")
                           if aux_out is not None else ([], None))
    mask_vals, mask_table = (_coefficients(mask_coef, B, K, device, "mask_coef")
                             if has_mask else ([], None))

    # noise: Philox keyed by (seeds[b], step) or the given tensor, times a scalar or [B] c_z
    nc_table = None
    if type(noise_coef) is float or type(noise_coef) is int:
        nc_scalar = float(noise_coef)
        has_noise = nc_scalar != 0.0
    elif isinstance(noise_coef, torch.Tensor):
        if noise_coef.numel() != B or (noise_coef.dim() > 1 and noise_coef.dim() != ref.dim()):
            raise ValueError(f"noise_coef must be a float or a [B]={B} tensor, got shape "
                             f"{tuple(noise_coef.shape)}")
        nc_table = noise_coef.to(device=device, dtype=torch.float64).reshape(B).contiguous()
        nc_scalar, has_noise = 0.0, True
    elif isinstance(noise_coef, numbers.Real):
        nc_scalar = float(noise_coef)
        has_noise = nc_scalar != 0.0
    else:
        raise ValueError(f"noise_coef must be a float or a [B] tensor, got "
                         f"{type(noise_coef).__name__}")
    cdt = torch.float64 if f64 else torch.float32
    mode, seeds_ptr, step32, steps_ptr, noise_ptr, noise_code = NO_NOISE, 0, 0, 0, 0, 0
    if has_noise and noise is not None:
        noise_code = _check_tensor(noise, "noise", shape, dev_index)
        if uniform_dtypes and noise.dtype != cdt:
            noise = noise.to(cdt)
            noise_code = CODES[cdt]
        noise = _contiguous(noise)
        mode, noise_ptr = TENSOR_NOISE, noise.data_ptr()
        m.keep.append(noise)
    elif has_noise:
        if not isinstance(seeds, torch.Tensor) or (steps is None and (
                isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0)):
            raise ValueError("a noisy update needs seeds (an int64 [B] tensor) and step >= 0 "
                             "or an int64 [B] step tensor (or noise=)")
        if seeds.dtype != torch.int64 or seeds.shape != (B,):
            raise ValueError(f"seeds must be an int64 [B]={B} tensor, got {seeds.dtype} "
                             f"{tuple(seeds.shape)}")
        if seeds.get_device() != dev_index:
            seeds = seeds.to(ref.device)
        seeds = _contiguous(seeds)
        mode, seeds_ptr = PHILOX_NOISE, seeds.data_ptr()
        m.keep.append(seeds)
        if steps is None:
            step32 = int(step) & _MASK32
        else:
            steps = per_sample_steps(steps, B, ref.device)
            steps_ptr = steps.data_ptr()
            m.keep.append(steps)
    if B * numel == 0:
        m.empty = True
        return m

    # inputs: contiguous, and under uniform_dtypes one dtype the kernel has an instantiation for
    ins = bufs
    if not contiguous:
        ins = [_contiguous(b) for b in bufs]
        m.keep += ins
    out_dtype = out.dtype
    if uniform_dtypes:
        native = (not f64 and out_code != 1 and all(c == out_code for c in codes)) or \
            (f64 and out_code == 1 and all(c == 1 for c in codes))
        if not native:
            ins = [b if b.dtype == cdt else b.to(cdt) for b in ins]
            codes = [CODES[cdt]] * K
            m.keep += ins
            if f64 or out_code == 1:
                out_dtype = cdt          # float64 <-> float32 mixes go through a temporary
    o, a = out, aux_out
    if not (out.is_contiguous() and out.dtype == out_dtype):
        o = torch.empty(shape, dtype=out_dtype, device=out.device)
        m.copy_back.append((out, o))
    if aux_out is not None and not (aux_out.is_contiguous() and aux_out.dtype == out_dtype):
        a = torch.empty(shape, dtype=out_dtype, device=out.device)
        m.copy_back.append((aux_out, a))
    mask_ptr, mask_code = 0, 0
    if has_mask:
        mask = _contiguous(mask)
        mask_ptr, mask_code = mask.data_ptr(), CODES[mask.dtype]
        m.keep.append(mask)
    m.keep += [x for x in (coef_table, aux_table, nc_table, mask_table) if x is not None]
    m.args = (o.data_ptr(), CODES[o.dtype], 0 if a is None else a.data_ptr(),
              CODES[a.dtype] if a is not None else 0,
              [b.data_ptr() for b in ins], codes, B, numel,
              coef_vals or [], 0 if coef_table is None else coef_table.data_ptr(),
              aux_vals or [], 0 if aux_table is None else aux_table.data_ptr(),
              mode, nc_scalar, 0 if nc_table is None else nc_table.data_ptr(),
              seeds_ptr, step32, steps_ptr, noise_ptr, noise_code,
              mask_ptr, mask_code, mask_vals or [],
              0 if mask_table is None else mask_table.data_ptr(), f64)
    return m
