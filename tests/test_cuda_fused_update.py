"""The CUDA fused update (backend "cuda"): what only this backend has.

The cases every backend shares run in tests/test_fused_update.py (the cuda rows skip without
a GPU). Here: the build (the CUDA kernel compiled for sm_80 and sm_90 wherever nvcc is
installed, as in CI; runs everywhere), unaligned views (the scalar path), streams, CUDA graph
capture and replay, the mask in every dtype aligned and not, and the torch.library op on
CUDA. bench/gpu_check.sh runs this file on a machine with a GPU.

Tolerance as everywhere: at most twice plain torch's own error at the same dtype, both
against a float64 reference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pyengine.backends import torch_ref
from pyengine.fused_update import native
from pyengine.noise import seeds_tensor
from reference import fused_update_reference

_C = native._C
HAS_GPU = _C is not None and _C.has_cuda() and torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device, a CUDA build of torch and "
                                             "pyengine._C built with its CUDA kernel")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _nvcc():
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).exists()), None)


# ---------------------------------------------------------------------------------------
# the build (runs everywhere)
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed: the CUDA kernel is "
                                            "skipped by design")
def test_cuda_kernel_compiled_when_nvcc_is_present():
    assert _C is not None, native.IMPORT_ERROR
    assert _C.has_cuda(), "nvcc is installed but pyengine._C was built without the CUDA kernel"
    so = Path(_C.__file__).read_bytes()
    for arch in (b"sm_80", b"sm_90"):
        assert arch in so, f"no {arch.decode()} code in {_C.__file__}"


def test_cuda_backend_explains_itself():
    from pyengine.backends import cuda

    why = cuda.unavailable_reason("cuda")
    if HAS_GPU:
        assert why is None
    else:
        assert isinstance(why, str) and why
        with pytest.raises(RuntimeError, match="cuda backend is unavailable"):
            cuda.fused_update(torch.empty(1, 2), [torch.randn(1, 2)], [1.0])


# ---------------------------------------------------------------------------------------
# the kernel (GPU only)
# ---------------------------------------------------------------------------------------


def _normals(seeds, step, shape):
    """The CUDA kernel's own normals: one fused update of a zero buffer with c_z = 1."""
    from pyengine.backends import cuda

    z = torch.empty(shape, device="cuda")
    cuda.fused_update(z, [torch.zeros(shape, device="cuda")], [0.0], 1.0, seeds, step)
    return z


def check(bufs, coef, nc=0.0, seeds=None, step=-1, aux_coef=None, noise=None, out_alias=None,
          dtype=None):
    from pyengine.backends import cuda

    shape, dtype = bufs[0].shape, dtype or bufs[0].dtype
    ref_in = [b.clone() for b in bufs]
    ref_noise = noise
    if noise is None and (isinstance(nc, torch.Tensor) or nc != 0.0):
        ref_noise = _normals(seeds, step, shape)
    ref, ref_aux = fused_update_reference(ref_in, coef, nc, seeds, step, aux_coef, ref_noise)
    t_out = torch.empty(shape, dtype=dtype, device="cuda")
    t_aux = torch.empty_like(t_out) if aux_coef is not None else None
    torch_ref.fused_update(t_out, ref_in, coef, nc, seeds, step, t_aux, aux_coef,
                           noise=ref_noise)
    out = bufs[out_alias] if out_alias is not None else torch.empty_like(t_out)
    aux = torch.empty_like(t_out) if aux_coef is not None else None
    cuda.fused_update(out, bufs, coef, nc, seeds, step, aux, aux_coef, noise=noise)
    torch.cuda.synchronize()
    eps = torch.finfo(dtype).eps
    for got, want, mine in ((out, ref, t_out), (aux, ref_aux, t_aux)):
        if got is None or got.numel() == 0:
            continue
        err = (got.double() - want).abs().max().item()
        torch_err = (mine.double() - want).abs().max().item()
        scale = max(want.abs().max().item(), 1.0)
        assert err <= max(2 * torch_err, 4 * eps * scale), (err, torch_err)
    return out


def _bufs(K, shape, dtype, g):
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).cuda()
            for _ in range(K)]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 1031), (2, 3, 5, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_unaligned_views_take_the_scalar_path(dtype, shape):
    """Views one element off their 16-byte alignment, sizes no multiple of the pack."""
    g = torch.Generator().manual_seed(sum(shape))
    n = int(np.prod(shape))
    flat = _bufs(3, (n + 1,), dtype, g)
    views = [f[1:].view(shape) for f in flat]
    check(views, [0.5, -1.5, 2.0], 0.3, seeds_tensor(1, shape[0]).cuda(), 4)


@gpu
def test_launches_on_the_current_stream():
    from pyengine.backends import cuda

    x = torch.randn(8, 1 << 20, device="cuda")
    out = torch.empty_like(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuda.fused_update(out, [x], [2.0])
        done = torch.cuda.Event()
        done.record(s)
    done.synchronize()
    torch.testing.assert_close(out, 2 * x)


@gpu
def test_cuda_graph_capture_and_replay():
    from pyengine.backends import cuda

    x = torch.randn(4, 4096, device="cuda")
    e = torch.randn_like(x)
    out = torch.empty_like(x)
    seeds = seeds_tensor(3, 4).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                    # warm-up outside the capture
        cuda.fused_update(out, [x, e], [0.9, 0.1], 0.2, seeds, 5)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda.fused_update(out, [x, e], [0.9, 0.1], 0.2, seeds, 5)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    want = torch.empty_like(x)
    cuda.fused_update(want, [x, e], [0.9, 0.1], 0.2, seeds, 5)
    assert torch.equal(out, want)


@gpu
def test_cuda_graph_replays_new_per_sample_steps_and_mask():
    """Per-sample draw numbers and the mask are read from device memory: a captured update
    replays with the new values written into them (continuous batching, inpainting)."""
    from pyengine.backends import cuda

    x = torch.randn(4, 4096, device="cuda")
    e, x0 = torch.randn_like(x), torch.randn_like(x)
    out = torch.empty_like(x)
    seeds = seeds_tensor(3, 4).cuda()
    steps = torch.tensor([0, 1, 2, 3], dtype=torch.int64, device="cuda")
    mask = (torch.rand_like(x) < 0.5).float()

    def update(dst, st, m):
        cuda.fused_update(dst, [x, e, x0], [0.9, 0.1, 0.0], 0.2, seeds, st, mask=m,
                          mask_coef=[0.0, 0.0, 1.0])

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                    # warm-up outside the capture
        update(out, steps, mask)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        update(out, steps, mask)
    steps.copy_(torch.tensor([7, 7, 0, 2 ** 32 + 5], dtype=torch.int64))
    mask.copy_((torch.rand_like(x) < 0.5).float())
    graph.replay()
    torch.cuda.synchronize()
    want = torch.empty_like(x)
    update(want, steps.clone(), mask.clone())
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@gpu
@pytest.mark.parametrize("mask_dtype", DTYPES)
def test_mask_aligned_and_unaligned_in_every_dtype(mask_dtype):
    """An aligned mask takes the packed kernel, one element off its alignment the scalar one;
    both against the float64 reference, at most twice torch's error."""
    from pyengine.backends import cuda

    g = torch.Generator().manual_seed(6)
    shape = (3, 1024)
    bufs = _bufs(3, shape, torch.float32, g)
    coef, mcoef = [0.5, -1.5, 2.0], [1.0, 0.0, 0.5]
    flat = torch.rand(3 * 1024 + 1, generator=g, dtype=torch.float64).to(mask_dtype).cuda()
    for mask in (flat[:-1].view(shape), flat[1:].view(shape)):
        ref, _ = fused_update_reference(bufs, coef, mask=mask, mask_coef=mcoef)
        mine = torch.empty(shape, device="cuda")
        torch_ref.fused_update(mine, bufs, coef, mask=mask, mask_coef=mcoef)
        out = torch.empty(shape, device="cuda")
        cuda.fused_update(out, bufs, coef, mask=mask, mask_coef=mcoef)
        torch.cuda.synchronize()
        err = (out.double() - ref).abs().max().item()
        torch_err = (mine.double() - ref).abs().max().item()
        scale = sum(map(abs, coef + mcoef)) * max(b.abs().max().item() for b in bufs)
        assert err <= max(2 * torch_err, torch.finfo(torch.float32).eps * scale), (err,
                                                                                   torch_err)


@gpu
def test_custom_op_on_cuda_and_under_compile():
    from pyengine import ops

    x = torch.randn(2, 3, 64, device="cuda")
    e = torch.randn_like(x)
    out = torch.empty_like(x)
    ops.fused_update(out, [x, e], np.array([0.5, 2.0]))
    torch.testing.assert_close(out, 0.5 * x + 2.0 * e)

    def f(o, a, b):
        ops.fused_update(o, [a * 2, b], np.array([0.5, 2.0]))
        return o + 1

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(out, x, e)
    torch.testing.assert_close(got, x + 2.0 * e + 1)


@gpu
def test_registry_defaults_to_cuda_on_gpu():
    from pyengine import backends

    assert backends.get(device="cuda").name == "cuda"
    assert "cuda" in backends.available()
