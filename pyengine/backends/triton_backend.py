"""The Triton backend: kernels/fused_update.py on CUDA tensors.

fused_update(out, bufs[K], coef[K] or [B, K], noise_coef or [B], seeds[B], step,
             aux_out=None, aux_coef=None, *, noise=None, compute_dtype=None,
             mask=None, mask_coef=None)

    out = sum_k coef_k * bufs_k + noise_coef * z       aux_out = sum_k aux_coef_k * bufs_k
    with a mask: out = mask * out + (1 - mask) * sum_k mask_coef_k * bufs_k

Loads float32/float16/bfloat16 (float64), computes in float32 (float64 when the output is
float64 or ``compute_dtype=torch.float64``), stores the output's dtype; the Philox noise is
made in the kernel, bit-identical words to :mod:`pyengine.noise`. ``step`` may be an int, an
int64 tensor of one element (read by the kernel: a captured graph replays with a new step
written into it, as with ``seeds``) or an int64 [B] tensor of per-sample draw numbers (each
sample's noise that of the sample updated alone at its step). The inpainting ``mask`` (any
float dtype, read in the kernel; see pyengine.backends.torch_ref for the exact formula)
blends in the same pass. Call :func:`warmup` before capturing a graph.

Test-only path: with ``TRITON_INTERPRET=1`` in the environment before triton is imported,
the interpreter runs the same kernel on CPU tensors (float32/float64; it has no bfloat16:
a half-precision mask is widened to float32 first there, exactly).
"""

from __future__ import annotations

import importlib.util
import numbers
import os

import numpy as np
import torch

from ._native import _coefficients as coefficients  # the same [K] / [B, K] rules
from ._native import check_mask, per_sample_steps

name = "triton"
device_types = ("cuda",)
K_MAX = 8
_kernels = None
_IMPORT_ERROR = None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load():
    """kernels.fused_update (imports triton: about 1 s, so only on first use)."""
    global _kernels, _IMPORT_ERROR
    if _kernels is None and _IMPORT_ERROR is None:
        try:
            from kernels import fused_update as k
            _kernels = k
        except Exception as exc:  # noqa: BLE001  (triton missing or broken: say why, once)
            _IMPORT_ERROR = f"kernels.fused_update cannot be imported ({exc})"
    return _kernels


def _device_types() -> tuple[str, ...]:
    return ("cuda", "cpu") if _interpret() else ("cuda",)


def unavailable_reason(device_type: str = "cuda") -> str | None:
    """None when this backend can run on ``device_type``, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device_type not in _device_types():
        return (f"the triton backend runs on CUDA tensors, not {device_type} (CPU only in "
                f"tests, under TRITON_INTERPRET=1)")
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if _load() is None:
        return _IMPORT_ERROR
    return None


def reasons_unsupported(call) -> list[str]:
    """Why this backend cannot run ``call`` (a :class:`pyengine.backends.dispatch.Call`)."""
    why = []
    r = unavailable_reason(call.device_type)
    if r is not None:
        why.append(r)
    allowed = (torch.float32, torch.float64) if _interpret() and call.device_type == "cpu" \
        else (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    bad = sorted({str(d).replace("torch.", "") for d in call.dtypes if d not in allowed})
    if bad:
        why.append(f"unsupported dtype {', '.join(bad)}"
                   + (" (the interpreter has no half types)" if len(allowed) == 2 else ""))
    if call.K > K_MAX:
        why.append(f"reads at most {K_MAX} buffers, got {call.K}")
    return why


_STEPS: dict = {}


def _step_tensor(step, device):
    """An int64 [1] device tensor holding ``step``, cached per (device, step): made once, in
    the eager warm-up run, never during a capture. A step tensor is checked elsewhere."""
    key = (str(device), int(step))
    t = _STEPS.get(key)
    if t is None:
        t = _STEPS[key] = torch.tensor([int(step) & 0xFFFFFFFF], dtype=torch.int64,
                                       device=device)
    return t


def _check(t, argname, shape, device):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{argname} must be a tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"{argname} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"{argname} is on {t.device}, bufs[0] on {device}")
    if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"{argname} has unsupported dtype {t.dtype}")


def prepare(out, bufs, coef, noise_coef=0.0, seeds=None, step=-1, aux_out=None, aux_coef=None,
            *, noise=None, compute_dtype=None, mask=None, mask_coef=None):
    """Validate the contract's arguments and return (kernel args, copy-backs) or None (empty)."""
    if not isinstance(bufs, (list, tuple)) or not bufs:
        raise ValueError("bufs must be a non-empty list of tensors")
    K = len(bufs)
    if K > K_MAX:
        raise ValueError(f"bufs has {K} tensors; the triton kernel reads at most {K_MAX}")
    ref = bufs[0]
    if not isinstance(ref, torch.Tensor) or ref.dim() < 1:
        raise ValueError("bufs must be [B, ...] tensors")
    shape, device = ref.shape, ref.device
    if device.type not in _device_types():
        raise ValueError(f"bufs[0] is on {device}: the triton backend runs on CUDA tensors")
    for i, b in enumerate(bufs):
        _check(b, f"bufs[{i}]", shape, device)
    _check(out, "out", shape, device)
    if (aux_out is None) != (aux_coef is None):
        raise ValueError("aux_out and aux_coef must be given together")
    if aux_out is not None:
        _check(aux_out, "aux_out", shape, device)
        if aux_out is out:
            raise ValueError("aux_out must be a different tensor from out")
    if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got "
                         f"{compute_dtype}")
    has_mask = check_mask(mask, mask_coef, out, aux_out, shape, device)
    f64 = (compute_dtype or out.dtype) == torch.float64
    B = shape[0]
    steps = per_sample_steps(step, B)            # checked here; [1] or [B] for the kernel
    cv, ct = coefficients(coef, B, K, device, "coef")
    av, at = coefficients(aux_coef, B, K, device, "aux_coef") if aux_out is not None else ([], None)
    mv, mt = coefficients(mask_coef, B, K, device, "mask_coef") if has_mask else ([], None)
    if f64:      # Triton passes Python floats as fp32: float64 math reads float64 tables
        if ct is None:
            ct = torch.tensor([cv], dtype=torch.float64, device=device)
        if aux_out is not None and at is None:
            at = torch.tensor([av], dtype=torch.float64, device=device)
        if has_mask and mt is None:
            mt = torch.tensor([mv], dtype=torch.float64, device=device)
    nc_table, nc_scalar = None, 0.0
    if isinstance(noise_coef, torch.Tensor):
        if noise_coef.numel() != B:
            raise ValueError(f"noise_coef must be a float or a [B]={B} tensor, got shape "
                             f"{tuple(noise_coef.shape)}")
        nc_table = noise_coef.to(device=device, dtype=torch.float64).reshape(B).contiguous()
        has_noise = True
    elif isinstance(noise_coef, numbers.Real):
        nc_scalar = float(noise_coef)
        has_noise = nc_scalar != 0.0
        if has_noise and f64:
            nc_table = torch.tensor([nc_scalar], dtype=torch.float64, device=device)
    else:
        raise ValueError(f"noise_coef must be a float or a [B] tensor, got "
                         f"{type(noise_coef).__name__}")
    mode, st, sd, nz = 0, None, None, None
    if has_noise and noise is not None:
        _check(noise, "noise", shape, device)
        mode, nz = 2, noise.contiguous()
    elif has_noise:
        step_ok = steps is not None or (
            isinstance(step, numbers.Integral) and not isinstance(step, bool) and step >= 0)
        if not isinstance(seeds, torch.Tensor) or not step_ok:
            raise ValueError("a noisy update needs seeds (an int64 [B] tensor) and step >= 0 "
                             "or an int64 [B] step tensor (or noise=)")
        if seeds.dtype != torch.int64 or seeds.shape != (B,):
            raise ValueError(f"seeds must be an int64 [B]={B} tensor, got {seeds.dtype} "
                             f"{tuple(seeds.shape)}")
        mode, sd = 1, seeds.to(device).contiguous()
        st = (per_sample_steps(steps, B, device, expand=False) if steps is not None
              else _step_tensor(step, device))
    mk = None
    if has_mask:
        mk = mask.contiguous()
        if device.type == "cpu" and mk.dtype not in (torch.float32, torch.float64):
            mk = mk.float()            # the interpreter has no half types; exact
    if ref.numel() == 0:
        return None
    ins = [b.contiguous() for b in bufs]
    copy_back = []
    o, a = out, aux_out
    if not out.is_contiguous():
        o = torch.empty(shape, dtype=out.dtype, device=device)
        copy_back.append((out, o))
    if aux_out is not None and not aux_out.is_contiguous():
        a = torch.empty(shape, dtype=aux_out.dtype, device=device)
        copy_back.append((aux_out, a))
    args = (o, ins, cv or [], ct, a, av or [], at, mode, nc_scalar, nc_table, sd, st, nz, f64,
            mk, mv or [], mt)
    return args, copy_back


def fused_update(out, bufs, coef, noise_coef=0.0, seeds=None, step=-1, aux_out=None,
                 aux_coef=None, *, noise=None, compute_dtype=None, mask=None, mask_coef=None):
    k = _load()
    if k is None:
        raise RuntimeError(f"the triton backend is unavailable: {_IMPORT_ERROR}")
    prep = prepare(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise=noise,
                   compute_dtype=compute_dtype, mask=mask, mask_coef=mask_coef)
    if prep is None:
        return out
    args, copy_back = prep
    k.launch(*args)
    for dst, src in copy_back:
        dst.copy_(src)
    return out


def fused_update_op(out, bufs, coef, noise_coef=0.0, seeds=None, step=-1, aux_out=None,
                    aux_coef=None, *, noise=None, compute_dtype=None, mask=None, mask_coef=None):
    """The same update through ``torch.ops.pyengine.triton_fused_update`` (traceable by
    torch.compile, which sees the Triton kernel itself)."""
    k = _load()
    if k is None:
        raise RuntimeError(f"the triton backend is unavailable: {_IMPORT_ERROR}")
    prep = prepare(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise=noise,
                   compute_dtype=compute_dtype, mask=mask, mask_coef=mask_coef)
    if prep is None:
        return out
    args, copy_back = prep
    torch.ops.pyengine.triton_fused_update(*args)
    for dst, src in copy_back:
        dst.copy_(src)
    return out


def warmup(**kw):
    """Autotune before graph capture; see kernels.fused_update.warmup."""
    k = _load()
    if k is None:
        raise RuntimeError(f"the triton backend is unavailable: {_IMPORT_ERROR}")
    k.warmup(**kw)


def philox_words(seed: int, step: int, nq: int, q0: int = 0, device=None) -> torch.Tensor:
    """The raw words [nq, 4] (int64) from the Triton Philox."""
    k = _load()
    if k is None:
        raise RuntimeError(f"the triton backend is unavailable: {_IMPORT_ERROR}")
    device = device or ("cpu" if _interpret() else "cuda")
    return k.philox_words(seed, step, nq, q0, device=device).cpu()
