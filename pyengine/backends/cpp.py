"""The C++ CPU backend: pyengine._C's fused update over host memory (csrc/fused_update/).

fused_update(out, bufs[K], coef[K] or [B, K], noise_coef or [B], seeds[B], step or step[B],
             aux_out=None, aux_coef=None, *, noise=None, compute_dtype=None,
             mask=None, mask_coef=None)

    out = sum_k coef_k * bufs_k + noise_coef * z       aux_out = sum_k aux_coef_k * bufs_k
    with a mask: out = mask * out + (1 - mask) * sum_k mask_coef_k * bufs_k

One pass over the inputs: each buffer is read once, out (and aux_out) written once, the
Philox noise z made inside the kernel (bit-identical words to :mod:`pyengine.noise`).
Arithmetic in float32 (float64 for float64 outputs, or ``compute_dtype``); buffers may mix
storage dtypes. ``out`` may be one of the inputs (in-place update). Large updates are split
across ``torch.get_num_threads()`` OpenMP threads.

``step`` may be an int64 [B] tensor: each sample's Philox stream is keyed by its own draw
number (read once per tile). The inpainting ``mask`` (any float dtype, converted a block at
a time in L1; see pyengine.backends.torch_ref for the exact formula) is blended in the same
pass: a template flag of the one-dtype fast path, a branch per block of the general one.
"""

from __future__ import annotations

import torch

from . import _native

name = "cpp"
device_types = ("cpu",)


def unavailable_reason(device_type: str = "cpu") -> str | None:
    """None when this backend can run on ``device_type``, else why not."""
    if _native._C is None:
        return _native.IMPORT_ERROR
    if device_type != "cpu":
        return f"the cpp backend runs on CPU tensors, not {device_type}"
    return None


def fused_update(out, bufs, coef, noise_coef=0.0, seeds=None, step=-1, aux_out=None,
                 aux_coef=None, *, noise=None, compute_dtype=None, mask=None, mask_coef=None):
    if _native._C is None:
        raise RuntimeError(f"the cpp backend is unavailable: {_native.IMPORT_ERROR}")
    m = _native.marshal(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise,
                        compute_dtype, backend=name, device_type="cpu", mask=mask,
                        mask_coef=mask_coef)
    if not m.empty:
        _native._C.fused_update_cpu(*m.args, torch.get_num_threads())
        m.finish()
    return out


def philox_words(seed: int, step: int, nq: int, q0: int = 0) -> torch.Tensor:
    """The raw Philox-4x32-10 words of quads q0..q0+nq-1 of a sample: int64 [nq, 4] (uint32
    values), computed by the C++ header the kernels use."""
    if _native._C is None:
        raise RuntimeError(f"the cpp backend is unavailable: {_native.IMPORT_ERROR}")
    w = torch.empty((nq, 4), dtype=torch.int32)
    _native._C.philox_words(w.data_ptr(), int(seed) & (2 ** 64 - 1), int(step) & 0xFFFFFFFF,
                            int(q0), int(nq))
    return w.to(torch.int64) & 0xFFFFFFFF


def philox_normal(seeds: torch.Tensor, step: int, numel: int) -> torch.Tensor:
    """float32 normals [B, numel] from the C++ kernels' noise (cf. pyengine.noise.philox_normal)."""
    if _native._C is None:
        raise RuntimeError(f"the cpp backend is unavailable: {_native.IMPORT_ERROR}")
    seeds = seeds.to(device="cpu", dtype=torch.int64).contiguous()
    z = torch.empty((seeds.shape[0], numel), dtype=torch.float32)
    _native._C.philox_normal(z.data_ptr(), seeds.data_ptr(), seeds.shape[0], numel,
                             int(step) & 0xFFFFFFFF)
    return z
