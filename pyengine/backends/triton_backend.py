"""The Triton backend: :mod:`pyengine.fused_update.triton_kernels` on CUDA tensors.

Loads float32/float16/bfloat16 (float64), computes in float32 (float64 when the output is
float64 or ``compute_dtype=torch.float64``), stores the output's dtype; the Philox noise is
made in the kernel, bit-identical words to :mod:`pyengine.noise`. ``step`` may be an int, an
int64 tensor of one element (read by the kernel: a captured graph replays with a new step
written into it, as with ``seeds``) or an int64 [B] tensor of per-sample draw numbers. The
inpainting ``mask`` (any float dtype) blends in the same pass. Call :func:`warmup` before
capturing a graph.

Test-only path: with ``TRITON_INTERPRET=1`` in the environment before triton is imported,
the interpreter runs the same kernel on CPU tensors (float32/float64; it has no bfloat16:
a half-precision mask is widened to float32 first there, exactly).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..fused_update import contract

name = "triton"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
device_types = ("cuda", "cpu") if INTERPRET else ("cuda",)
dtypes = contract.FLOAT_DTYPES
max_buffers = contract.K_MAX
_kernels = None
_IMPORT_ERROR = None


def _load():
    """pyengine.fused_update.triton_kernels (imports triton: about 1 s, so only on first use)."""
    global _kernels, _IMPORT_ERROR
    if _kernels is None and _IMPORT_ERROR is None:
        try:
            from ..fused_update import triton_kernels as k
            _kernels = k
        except Exception as exc:  # noqa: BLE001  (triton missing or broken: say why, once)
            _IMPORT_ERROR = f"pyengine.fused_update.triton_kernels cannot be imported ({exc})"
    return _kernels


def unavailable_reason(device_type: str = "cuda") -> str | None:
    """None when this backend can run on ``device_type``, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device_type not in device_types:
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
    interpreted = INTERPRET and call.device_type == "cpu"
    allowed = (torch.float32, torch.float64) if interpreted else dtypes
    bad = sorted({str(d).replace("torch.", "") for d in call.dtypes if d not in allowed})
    if bad:
        why.append(f"unsupported dtype {', '.join(bad)}"
                   + (" (the interpreter has no half types)" if interpreted else ""))
    if call.K > max_buffers:
        why.append(f"reads at most {max_buffers} buffers, got {call.K}")
    return why


def _kernels_or_raise():
    k = _load()
    if k is None:
        raise RuntimeError(f"the triton backend is unavailable: {_IMPORT_ERROR}")
    return k


def _ready():
    _kernels_or_raise()


def _launch(*args):
    return _kernels.fused_update(*args)


def _launch_op(*args):
    return _kernels.fused_update(*args, op=True)


fused_update = contract.entry_point(__name__, _launch, _ready)
#: the same update through ``torch.ops.pyengine.triton_fused_update`` (traceable by
#: torch.compile, which sees the Triton kernel itself)
fused_update_op = contract.entry_point(__name__, _launch_op, _ready)


def warmup(**kw):
    """Autotune before graph capture; see pyengine.fused_update.triton_kernels.warmup."""
    _kernels_or_raise().warmup(**kw)


def philox_words(seed: int, step: int, nq: int, q0: int = 0, device=None) -> torch.Tensor:
    """The raw words [nq, 4] (int64) from the Triton Philox."""
    k = _kernels_or_raise()
    device = device or ("cpu" if INTERPRET else "cuda")
    return k.philox_words(seed, step, nq, q0, device=device).cpu()
