"""The CUDA fused update (backend "cuda") against the float64 reference, on a GPU.

Without a CUDA device every GPU test skips; the build test still checks that the CUDA kernel
was compiled (for sm_80 and sm_90) wherever nvcc is installed, as in CI. bench/gpu_check.sh
runs this file on a machine with a GPU.

Tolerance as for the CPU kernel (tests/test_cpp_fused_update.py): at most twice plain torch's
own error at the same dtype, both against a float64 reference fed the kernel's own normals.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pyengine.backends import _native, torch_ref
from pyengine.noise import philox_normal, seeds_tensor
from reference import fused_update_reference

_C = _native._C
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
    assert _C is not None, _native.IMPORT_ERROR
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
@pytest.mark.parametrize("K", range(1, 9))
@pytest.mark.parametrize("per_sample", [False, True])
def test_k_dtype_sweep(dtype, K, per_sample):
    g = torch.Generator().manual_seed(K)
    B, shape = 3, (3, 4, 64, 64)
    bufs = _bufs(K, shape, dtype, g)
    coef = (torch.randn(B, K, generator=g, dtype=torch.float64).cuda() if per_sample
            else np.random.default_rng(K).normal(size=K))
    aux_coef = np.random.default_rng(K + 1).normal(size=K)
    nc = torch.rand(B, generator=g, dtype=torch.float64).cuda()
    check(bufs, coef, nc, seeds_tensor(7, B).cuda(), K, aux_coef)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 1031), (2, 3, 5, 7), (1, 1 << 20), (0, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_odd_sizes_take_the_scalar_path(dtype, shape):
    """Sizes that are no multiple of the 16-byte pack, and an offset (unaligned) view."""
    g = torch.Generator().manual_seed(sum(shape))
    bufs = _bufs(3, shape, dtype, g)
    check(bufs, [0.5, -1.5, 2.0], 0.3, seeds_tensor(1, shape[0]).cuda(), 4)
    if shape[0] and shape[-1] > 1:
        flat = _bufs(3, (shape[0] * shape[-1] + 1,), dtype, g)
        views = [f[1:].view(shape[0], shape[-1]) for f in flat]   # one element off 16 bytes
        check(views, [0.5, -1.5, 2.0])


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alias", [0, 2])
def test_output_aliases_an_input(dtype, alias):
    g = torch.Generator().manual_seed(alias)
    bufs = _bufs(3, (4, 1000), dtype, g)
    keep = [b.clone() for b in bufs]
    check(bufs, [0.25, 1.0, -0.5], 0.5, seeds_tensor(2, 4).cuda(), 1, out_alias=alias)
    for k in range(3):
        if k != alias:
            assert torch.equal(bufs[k], keep[k])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_noise_and_mixed_dtypes(dtype):
    g = torch.Generator().manual_seed(3)
    shape = (3, 515)
    bufs = [torch.randn(shape, generator=g).to(dt).cuda()
            for dt in (torch.bfloat16, torch.float32, torch.float64)]
    noise = torch.randn(shape, generator=g).cuda()
    check(bufs, [0.3, -1.1, 0.7], torch.rand(3, dtype=torch.float64).cuda(), aux_coef=[1, 0, 2],
          noise=noise, dtype=dtype)


@gpu
def test_normals_match_the_reference_and_batch():
    seeds = seeds_tensor([0, 2 ** 64 - 1, 12345], 3).cuda()
    z = _normals(seeds, 9, (3, 4099))
    torch.testing.assert_close(z.cpu(), philox_normal(seeds.cpu(), 9, 4099), rtol=0, atol=1e-6)
    alone = _normals(seeds[1:2], 9, (1, 4099))
    assert torch.equal(alone[0], z[1])


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
