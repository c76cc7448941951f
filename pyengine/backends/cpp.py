"""The C++ CPU backend: pyengine._C's fused update over host memory (csrc/fused_update/).

One pass over the inputs: each buffer is read once, out (and aux_out) written once, the
Philox noise z made inside the kernel (bit-identical words to :mod:`pyengine.noise`).
Arithmetic in float32 (float64 for float64 outputs, or ``compute_dtype``); buffers may mix
storage dtypes. Large updates are split across ``torch.get_num_threads()`` threads.
A per-sample ``step`` tensor is read once per tile; the inpainting ``mask`` (any float
dtype, converted a block at a time in L1) is blended in the same pass. The contract:
:mod:`pyengine.fused_update`; the launcher: :mod:`pyengine.fused_update.native`.
"""

from __future__ import annotations

import torch

from ..fused_update import contract, native

name = "cpp"
device_types = ("cpu",)
dtypes = contract.FLOAT_DTYPES
max_buffers = contract.K_MAX


def unavailable_reason(device_type: str = "cpu") -> str | None:
    """None when this backend can run on ``device_type``, else why not."""
    if native._C is None:
        return native.IMPORT_ERROR
    if device_type != "cpu":
        return f"the cpp backend runs on CPU tensors, not {device_type}"
    return None


def _ready():
    if native._C is None:
        raise RuntimeError(f"the cpp backend is unavailable: {native.IMPORT_ERROR}")


fused_update = contract.entry_point(__name__, native.fused_update_cpu, _ready)


def walk_launches(compute_dtype=None):
    """A walk's launch cache (:class:`pyengine.fused_update.native.CpuWalkLaunches`): the
    executor's steady-state path, after it validated each call structure once."""
    _ready()
    return native.CpuWalkLaunches(compute_dtype)


def philox_words(seed: int, step: int, nq: int, q0: int = 0) -> torch.Tensor:
    """The raw Philox-4x32-10 words of quads q0..q0+nq-1 of a sample: int64 [nq, 4] (uint32
    values), computed by the C++ header the kernels use."""
    _ready()
    w = torch.empty((nq, 4), dtype=torch.int32)
    native._C.philox_words(w.data_ptr(), int(seed) & (2 ** 64 - 1), int(step) & 0xFFFFFFFF,
                           int(q0), int(nq))
    return w.to(torch.int64) & 0xFFFFFFFF


def philox_normal(seeds: torch.Tensor, step: int, numel: int) -> torch.Tensor:
    """float32 normals [B, numel] from the C++ kernels' noise (cf. pyengine.noise.philox_normal)."""
    _ready()
    seeds = seeds.to(device="cpu", dtype=torch.int64).contiguous()
    z = torch.empty((seeds.shape[0], numel), dtype=torch.float32)
    native._C.philox_normal(z.data_ptr(), seeds.data_ptr(), seeds.shape[0], numel,
                            int(step) & 0xFFFFFFFF)
    return z
