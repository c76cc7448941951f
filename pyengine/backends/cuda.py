"""The CUDA backend: pyengine._C's CUDA fused update (csrc/cuda/fused_update.cu).

fused_update(out, bufs[K], coef[K] or [B, K], noise_coef or [B], seeds[B], step or step[B],
             aux_out=None, aux_coef=None, *, noise=None, compute_dtype=None,
             mask=None, mask_coef=None)

    out = sum_k coef_k * bufs_k + noise_coef * z       aux_out = sum_k aux_coef_k * bufs_k
    with a mask: out = mask * out + (1 - mask) * sum_k mask_coef_k * bufs_k

One kernel launch on the current CUDA stream (torch.cuda.current_stream(), never the default
stream unless that is the current one): 16-byte loads of every buffer, one store of out (and
aux_out), Philox noise generated in registers. Per-step coefficients travel by value in the
launch; a [B, K] coefficient table and a [B] noise coefficient are read from device memory.
No host synchronization, so it can be captured in a CUDA graph. Buffers of mixed dtypes are
converted to the compute dtype first (an extra pass).

``step`` may be an int64 [B] device tensor of per-sample draw numbers, read by the kernel
(a CPU one is copied to the device); each sample's noise is that of the sample updated alone.
The inpainting ``mask`` (any float dtype, read in its own dtype in the same pass; a template
flag, so the unmasked kernels are unchanged) blends the result with the ``mask_coef``
combination, see pyengine.backends.torch_ref for the exact formula.
"""

from __future__ import annotations

import torch

from . import _native

name = "cuda"
device_types = ("cuda",)


def unavailable_reason(device_type: str = "cuda") -> str | None:
    """None when this backend can run on ``device_type``, else why not."""
    if _native._C is None:
        return _native.IMPORT_ERROR
    if not _native._C.has_cuda():
        return "pyengine._C was built without the CUDA kernel (no CUDA compiler at build time)"
    if device_type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device_type}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


_ready = False          # set once the checks above have passed (they cost ~us per call)


def fused_update(out, bufs, coef, noise_coef=0.0, seeds=None, step=-1, aux_out=None,
                 aux_coef=None, *, noise=None, compute_dtype=None, mask=None, mask_coef=None):
    global _ready
    if not _ready:
        why = unavailable_reason("cuda")
        if why is not None:
            raise RuntimeError(f"the cuda backend is unavailable: {why}")
        _ready = True
    m = _native.marshal(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise,
                        compute_dtype, backend=name, device_type="cuda", uniform_dtypes=True,
                        mask=mask, mask_coef=mask_coef)
    if not m.empty:
        dev = bufs[0].device
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(dev).cuda_stream
        _native._C.fused_update_cuda(*m.args, index, stream)
        m.finish()
    return out
