"""The fused update (pyengine.fused_update) on every backend, on the same cases.

Backends: torch, cpp (each CPU kernel build: AVX2 and baseline) and numba on CPU; cuda and
triton on a GPU (skipped without one); triton on CPU under TRITON_INTERPRET=1 in a child
process (the variable must be set before triton is imported and must not leak into other
test modules), on fewer cases: the interpreter is slow and has no half types.

Tolerance (STYLE habit 5, flash-attention's rule): a backend's error against the float64
reference (tests/reference.py) is at most twice plain torch's own error at the same dtype
(the torch backend on the same inputs), or one rounding of the terms where torch happens to
be exact. Noisy updates feed the backend's own normals to both (out = 0 x + 1 z); those
normals are checked against pyengine.noise to 1e-6, their words bit for bit in each
backend's own test file.

Backend-specific tests stay beside their backend: tests/test_cpp_fused_update.py (Philox
words, half rounding, threads, the native struct, the torch.library op),
test_numba_fused_update.py, test_triton_fused_update.py, test_cuda_fused_update.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import fused_update_reference

import pyengine.fused_update as fu
from pyengine import backends
from pyengine.backends import dispatch, torch_ref
from pyengine.fused_update import native
from pyengine.noise import philox_normal, seeds_tensor

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ISAS = native._C.cpu_isas() if native._C is not None else []

if INTERPRETED:
    BACKENDS = [("triton", "cpu")]
else:
    BACKENDS = [("torch", "cpu"), ("cpp", "cpu")]
    if "avx2" in ISAS:
        BACKENDS.append(("cpp-baseline", "cpu"))        # the other build of the CPU kernel
    BACKENDS += [("numba", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]


@pytest.fixture(autouse=True)
def _restore_isa():
    prev = native._C.cpu_isa() if native._C is not None else None
    yield
    if prev is not None:
        native._C.set_cpu_isa(prev)


def _module(name, device):
    """The backend module (the cpp kernel build set), or a skip saying why it cannot run."""
    base, _, isa = name.partition("-")
    why = dispatch.unavailable_reason(base, device)
    if why is not None:
        pytest.skip(f"{base} on {device}: {why}")
    if isa:
        native._C.set_cpu_isa(isa)
    return dispatch.resolve(dispatch.REGISTRY[base])


def _dtypes(name, device):
    if name == "numba" or (name == "triton" and device == "cpu"):
        return ALL_DTYPES[:2]                     # numpy views / the interpreter: no half types
    return ALL_DTYPES


def _interp(name, device):
    return name == "triton" and device == "cpu"


def _cases(per):
    out = []
    for name, device in BACKENDS:
        out += [(name, device, *rest) for rest in per(name, device)]
    return out


def _ids(p):
    return str(p).replace("torch.", "")


def _bufs(K, shape, dtype, g, device="cpu"):
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
            for _ in range(K)]


def _coef(kind, B, K, g, device="cpu"):
    if kind == "per_step":
        return torch.randn(K, generator=g, dtype=torch.float64).numpy()
    return torch.randn(B, K, generator=g, dtype=torch.float64).to(device)


def _mask(kind, shape, dtype, g, device):
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    m = (u < 0.5).to(torch.float64) if kind == "binary" else u
    return m.to(dtype).to(device)


def _steps(B, g, device):
    """Random per-sample draw numbers, one of them >= 2^32 (only its low 32 bits count)."""
    s = torch.randint(0, 2 ** 31, (B,), generator=g, dtype=torch.int64)
    s[B // 2] += 2 ** 32 + 2 ** 33
    return s.to(device)


def _random_seeds(B, g, device):
    return torch.randint(-(2 ** 63), 2 ** 63 - 1, (B,), generator=g, dtype=torch.int64).to(device)


def kernel_normals(be, seeds, step, shape, device):
    """The backend's own normals for these seeds and step(s): out = 0 x + 1 z."""
    z = torch.empty(shape, device=device)
    be.fused_update(z, [torch.ones(shape, device=device)], np.array([0.0]), 1.0, seeds, step)
    return z


def _scale(bufs, coef, nc=0.0, noise=None):
    """The size of the terms: sum_k |c_k| max |buf_k| (+ |c_z| max |z|)."""
    if bufs[0].numel() == 0:
        return 0.0
    c = torch.as_tensor(coef, dtype=torch.float64).abs().cpu()
    c = c.max(0).values if c.dim() == 2 else c
    s = sum(float(c[k]) * b.double().abs().max().item() for k, b in enumerate(bufs))
    if noise is not None:
        ncm = nc.abs().max().item() if isinstance(nc, torch.Tensor) else abs(nc)
        s += ncm * noise.double().abs().max().item()
    return s


def check(be, bufs, coef, nc=0.0, seeds=None, step=-1, aux_coef=None, mask=None,
          mask_coef=None, noise=None, out_alias=None, dtype=None, compute_dtype=None):
    """Run ``be`` and torch on the same inputs; ``be``'s error <= 2x torch's (see top)."""
    shape, device = bufs[0].shape, bufs[0].device
    dtype = dtype or bufs[0].dtype
    kw = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
    ref_in = [b.clone() for b in bufs]
    z = noise
    if noise is None and (isinstance(nc, torch.Tensor) or nc != 0.0):
        z = kernel_normals(be, seeds, step, shape, device)
    ref, ref_aux = fused_update_reference(ref_in, coef, nc, seeds, step, aux_coef, z, mask,
                                          mask_coef)
    t_out = torch.empty(shape, dtype=dtype, device=device)
    t_aux = torch.empty_like(t_out) if aux_coef is not None else None
    torch_ref.fused_update(t_out, [b.clone() for b in ref_in], coef, nc, seeds, step, t_aux,
                           aux_coef, noise=z, mask=mask, mask_coef=mask_coef, **kw)
    out = bufs[out_alias] if out_alias is not None else torch.empty_like(t_out)
    aux = torch.empty_like(t_out) if aux_coef is not None else None
    res = be.fused_update(out, bufs, coef, nc, seeds, step, aux, aux_coef, noise=noise,
                          mask=mask, mask_coef=mask_coef, **kw)
    assert res is out and out.dtype == dtype and out.shape == shape
    eps = torch.finfo(compute_dtype or dtype).eps
    for got, want, mine, coefs in ((out, ref, t_out, coef), (aux, ref_aux, t_aux, aux_coef)):
        if got is None or got.numel() == 0:
            continue
        scale = _scale(ref_in, coefs, nc if got is out else 0.0, z if got is out else None)
        if got is out and mask is not None:
            scale += _scale(ref_in, mask_coef)
        err = (got.double().cpu() - want.cpu()).abs().max().item()
        torch_err = (mine.double().cpu() - want.cpu()).abs().max().item()
        assert err <= max(2 * torch_err, eps * scale), (err, torch_err, eps * scale)
    return out, aux


# ---------------------------------------------------------------------------------------
# K_MAX: one definition per language, tied here
# ---------------------------------------------------------------------------------------


def test_k_max_is_the_native_one():
    """pyengine.fused_update.K_MAX (Python) and kKMax (csrc/fused_update/fused_update.h, C++
    and CUDA) are the two definitions; the plans' limit is the kernels'."""
    import pyengine.plan

    assert pyengine.plan.K_MAX == fu.K_MAX
    if native._C is None:
        pytest.skip(native.IMPORT_ERROR)
    assert native._C.K_MAX == fu.K_MAX


# ---------------------------------------------------------------------------------------
# arithmetic: every dtype, K = 1..K_MAX, per-step and per-sample coefficients
# ---------------------------------------------------------------------------------------


def _sweep(name, device):
    return [(dt, K, kind) for dt in _dtypes(name, device) for K in range(1, fu.K_MAX + 1)
            for kind in ("per_step", "per_sample")]


@pytest.mark.parametrize("name,device,dtype,K,kind", _cases(_sweep), ids=_ids)
def test_k_dtype_sweep(name, device, dtype, K, kind):
    """Prime per-sample size (131), Philox noise with a per-sample c_z, and an aux output."""
    be = _module(name, device)
    g = torch.Generator().manual_seed(100 * K + ALL_DTYPES.index(dtype))
    B, shape = 3, (3, 131)
    bufs = _bufs(K, shape, dtype, g, device)
    nc = torch.rand(B, generator=g, dtype=torch.float64).to(device)
    check(be, bufs, _coef(kind, B, K, g, device), nc, seeds_tensor(7, B).to(device), K,
          _coef(kind, B, K, g, device))


def _shapes(name, device):
    shapes = [(1, 7), (2, 3, 5, 7), (0, 5), (4, 0)]
    if _interp(name, device):
        shapes += [(2, 1031)]                     # several programs per sample (block 64 quads)
    elif device == "cuda":
        shapes += [(5, 1031), (1, 1 << 20), (3, 4, 64, 64)]
    else:
        shapes += [(5, 1031), (3, 40001), (1, 65537)]   # several tiles per sample, threads
        if name != "numba":
            shapes += [(1, 4, 64, 64)]
    return [(dt, s) for dt in _dtypes(name, device) for s in shapes]


@pytest.mark.parametrize("name,device,dtype,shape", _cases(_shapes), ids=_ids)
def test_shapes(name, device, dtype, shape):
    """Batch 1, primes, sizes that are no multiple of a block or tile, several tiles per
    sample, empty tensors."""
    be = _module(name, device)
    g = torch.Generator().manual_seed(sum(shape))
    bufs = _bufs(3, shape, dtype, g, device)
    check(be, bufs, _coef("per_step", shape[0], 3, g), 0.37,
          seeds_tensor(3, shape[0]).to(device), 11)


def _combos(name, device):
    kinds = ("per_step", "per_sample")
    return [(dt, nk, nck, aux, kind) for dt in _dtypes(name, device)[:2]
            for nk in ("none", "philox", "tensor") for nck in ("scalar", "per_sample")
            for aux in (False, True) for kind in kinds
            if not (_interp(name, device) and (not aux or kind == "per_step"))]


@pytest.mark.parametrize("name,device,dtype,noise_kind,nc_kind,with_aux,kind", _cases(_combos),
                         ids=_ids)
def test_noise_aux_coefficient_combinations(name, device, dtype, noise_kind, nc_kind, with_aux,
                                            kind):
    be = _module(name, device)
    g = torch.Generator().manual_seed(17)
    B, K, shape = 4, 3, (4, 2, 5, 7)
    bufs = _bufs(K, shape, dtype, g, device)
    coef = _coef(kind, B, K, g, device)
    aux_coef = _coef(kind, B, K, g, device) if with_aux else None
    if noise_kind == "none":
        check(be, bufs, coef, 0.0, None, -1, aux_coef)
        return
    nc = torch.rand(B, generator=g, dtype=torch.float64).to(device) \
        if nc_kind == "per_sample" else 0.8
    noise = torch.randn(shape, generator=g, dtype=dtype).to(device) \
        if noise_kind == "tensor" else None
    check(be, bufs, coef, nc, seeds_tensor(5, B).to(device), 3, aux_coef, noise=noise)


def test_reference_backend_against_float64():
    """The torch backend itself: one rounding of the output (2^-24, 2^-11, 2^-8 of the size
    of the largest term) plus a few float32 ulps from accumulating K terms."""
    for dtype, tol in [(torch.float64, 1e-13), (torch.float32, 4e-6), (torch.float16, 2e-3),
                       (torch.bfloat16, 1.6e-2)]:
        for K in (1, 2, 3, 5, 8):
            for shape in ((1, 7), (3, 4, 5, 5), (2, 131)):
                g = torch.Generator().manual_seed(K * 100 + len(shape))
                bufs = _bufs(K, shape, dtype, g)
                coef = np.random.default_rng(K).normal(size=K)
                out = torch.empty(shape, dtype=dtype)
                torch_ref.fused_update(out, bufs, coef)
                ref, _ = fused_update_reference(bufs, coef)
                scale = sum(abs(c) for c in coef) * max(b.abs().max().item() for b in bufs)
                assert (out.double() - ref).abs().max().item() <= tol * scale
                assert out.dtype == dtype


# ---------------------------------------------------------------------------------------
# aliasing, mixed dtypes, non-contiguous views, compute dtype
# ---------------------------------------------------------------------------------------


def _alias(name, device):
    return [(dt, a) for dt in _dtypes(name, device) for a in (0, 1, 3)]


@pytest.mark.parametrize("name,device,dtype,alias", _cases(_alias), ids=_ids)
def test_output_aliases_an_input(name, device, dtype, alias):
    """out is one of the buffers (in-place update, over two tiles); the others untouched."""
    be = _module(name, device)
    g = torch.Generator().manual_seed(alias)
    K, shape = 4, (3, 517 if _interp(name, device) else 9000)
    bufs = _bufs(K, shape, dtype, g, device)
    keep = [b.clone() for b in bufs]
    check(be, bufs, _coef("per_sample", 3, K, g, device), 0.5, seeds_tensor(1, 3).to(device),
          2, _coef("per_step", 3, K, g), out_alias=alias)
    for k in range(K):
        if k != alias:
            assert torch.equal(bufs[k], keep[k])


@pytest.mark.parametrize("name,device", BACKENDS)
def test_aux_aliases_an_input_and_out_another(name, device):
    be = _module(name, device)
    g = torch.Generator().manual_seed(4)
    bufs = _bufs(3, (2, 300), torch.float32, g, device)
    keep = [b.clone() for b in bufs]
    coef, aux_coef = np.array([0.5, -1.0, 2.0]), np.array([1.0, 0.25, -0.5])
    ref, ref_aux = fused_update_reference(keep, coef, aux_coef=aux_coef)
    be.fused_update(bufs[2], bufs, coef, aux_out=bufs[0], aux_coef=aux_coef)
    torch.testing.assert_close(bufs[2].double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(bufs[0].double(), ref_aux, rtol=0, atol=1e-5)
    assert torch.equal(bufs[1], keep[1])


@pytest.mark.parametrize("name,device", BACKENDS)
def test_same_buffer_twice_and_as_output(name, device):
    be = _module(name, device)
    x = torch.randn(2, 99, device=device)
    keep = x.clone()
    be.fused_update(x, [x, x], np.array([0.5, 0.25]))
    torch.testing.assert_close(x, 0.75 * keep, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,device", BACKENDS)
def test_mixed_buffer_dtypes(name, device):
    """A bfloat16 state with float32 model outputs and a float64 history buffer, stored in
    every output dtype (numba and the interpreter: float32 and float64 mixed)."""
    be = _module(name, device)
    g = torch.Generator().manual_seed(9)
    shape = (3, 257)
    dts = _dtypes(name, device)
    bufs = [torch.randn(shape, generator=g).to(dts[k % len(dts)]).to(device)
            for k in (3, 0, 1, 2)]
    for dtype in dts:
        check(be, bufs, np.array([0.3, -1.1, 0.7, 2.0]), 0.2, seeds_tensor(2, 3).to(device), 1,
              np.array([1.0, 0.5, 0.0, -1.0]), dtype=dtype)


@pytest.mark.parametrize("name,device", BACKENDS)
def test_compute_dtype_float64(name, device):
    be = _module(name, device)
    g = torch.Generator().manual_seed(8)
    for dtype in _dtypes(name, device)[::2]:        # float32 (and float16)
        bufs = _bufs(4, (2, 333), dtype, g, device)
        check(be, bufs, _coef("per_step", 2, 4, g), 0.1, seeds_tensor(4, 2).to(device), 6,
              dtype=dtype, compute_dtype=torch.float64)


@pytest.mark.parametrize("name,device", BACKENDS)
def test_non_contiguous_inputs_and_outputs(name, device):
    be = _module(name, device)
    g = torch.Generator().manual_seed(10)
    bufs = [torch.randn(40, 6, generator=g).to(device).t() for _ in range(3)]   # [6, 40] views
    out = torch.empty(40, 6, device=device).t()
    aux = torch.empty(6, 80, device=device)[:, ::2]
    coef, aux_coef = np.array([1.5, -0.5, 0.25]), np.array([0.0, 1.0, 1.0])
    ref, ref_aux = fused_update_reference(bufs, coef, aux_coef=aux_coef)
    be.fused_update(out, bufs, coef, aux_out=aux, aux_coef=aux_coef)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(aux.double(), ref_aux, rtol=0, atol=1e-6)
    assert out.stride() == (1, 6)


# ---------------------------------------------------------------------------------------
# per-sample draw numbers and the noise itself
# ---------------------------------------------------------------------------------------


def _step_cases(name, device):
    if _interp(name, device):                     # the interpreter: ~1 s a case
        return [(torch.float32, "per_step"), (torch.float64, "per_sample")]
    return [(dt, kind) for dt in _dtypes(name, device)[:2] for kind in ("per_step", "per_sample")]


@pytest.mark.parametrize("name,device,dtype,kind", _cases(_step_cases), ids=_ids)
def test_per_sample_steps_equal_each_sample_alone(name, device, dtype, kind):
    """Sample b of a batch with step[b] is bitwise that sample updated alone at step[b]
    (& 0xffffffff), out and aux; an all-equal step tensor is the int step, bitwise."""
    be = _module(name, device)
    g = torch.Generator().manual_seed(3 + ALL_DTYPES.index(dtype))
    B, K, shape = 5, 3, (5, 3, 7, 11)
    bufs = _bufs(K, shape, dtype, g, device)
    coef, aux_coef = _coef(kind, B, K, g, device), _coef(kind, B, K, g, device)
    nc = torch.rand(B, generator=g, dtype=torch.float64).to(device)
    seeds, steps = _random_seeds(B, g, device), _steps(B, g, device)
    out, aux = check(be, bufs, coef, nc, seeds, steps, aux_coef)
    for b in range(B):
        one = [x[b:b + 1].clone() for x in bufs]
        o, a = torch.empty_like(one[0]), torch.empty_like(one[0])
        cb = coef if kind == "per_step" else coef[b:b + 1]
        ab = aux_coef if kind == "per_step" else aux_coef[b:b + 1]
        be.fused_update(o, one, cb, nc[b:b + 1], seeds[b:b + 1], int(steps[b]) & 0xFFFFFFFF,
                        a, ab)
        assert torch.equal(o[0], out[b]) and torch.equal(a[0], aux[b]), b
    # one draw number for everyone, as a tensor (on the CPU: moved by the backend)
    same = torch.full((B,), 2 ** 32 + 77, dtype=torch.int64)
    want = torch.empty_like(out)
    be.fused_update(want, bufs, coef, nc, seeds, 77)
    got = torch.empty_like(out)
    be.fused_update(got, bufs, coef, nc, seeds, same)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name,device", BACKENDS)
def test_kernel_normals_match_the_reference_and_the_batch(name, device):
    """The in-kernel noise is pyengine.noise's normals (to 1e-6: float32 log/cos round
    differently from torch's), per-sample steps included, and a sample's noise does not depend
    on the batch around it."""
    be = _module(name, device)
    seeds = seeds_tensor([0, 2 ** 64 - 1, 12345, 7], 4).to(device)
    steps = torch.tensor([0, 2 ** 32 - 1, 5, 2 ** 40 + 9], dtype=torch.int64, device=device)
    z = kernel_normals(be, seeds, steps, (4, 1031), device)
    torch.testing.assert_close(z.cpu(), philox_normal(seeds.cpu(), steps.cpu(), 1031), rtol=0,
                               atol=1e-6)
    assert not torch.equal(z[0], z[2])               # the steps do change the stream
    for step, numel in ((0, 1), (5, 3), (2 ** 32 - 1, 4099)):
        z = kernel_normals(be, seeds, step, (4, numel), device)
        torch.testing.assert_close(z.cpu(), philox_normal(seeds.cpu(), step, numel), rtol=0,
                                   atol=1e-6)
        alone = kernel_normals(be, seeds[1:2], step, (1, numel), device)
        assert torch.equal(alone[0], z[1])


# ---------------------------------------------------------------------------------------
# the inpainting mask
# ---------------------------------------------------------------------------------------


def _mask_cases(name, device):
    if _interp(name, device):                     # the interpreter: ~0.5 s a case
        return [(torch.float32, 1, "binary"), (torch.float32, 4, "uniform"),
                (torch.float64, 8, "uniform")]
    ks = (2, 7) if name == "numba" else tuple(range(1, fu.K_MAX + 1))
    return [(dt, K, mk) for dt in _dtypes(name, device) for K in ks
            for mk in ("uniform", "binary")]


@pytest.mark.parametrize("name,device,dtype,K,mask_kind", _cases(_mask_cases), ids=_ids)
def test_mask_matches_the_reference(name, device, dtype, K, mask_kind):
    """Philox noise with a per-sample c_z, an aux output and the mask at once; odd sizes;
    the mask's dtype cycles through all four; every other K updates bufs[0] in place."""
    be = _module(name, device)
    g = torch.Generator().manual_seed(100 * K + ALL_DTYPES.index(dtype))
    B, shape = 3, (3, 5, 7, 11)
    bufs = _bufs(K, shape, dtype, g, device)
    keep = [b.clone() for b in bufs]
    mask = _mask(mask_kind, shape, ALL_DTYPES[K % 4], g, device)
    mask_keep = mask.clone()
    nc = torch.rand(B, generator=g, dtype=torch.float64).to(device)
    alias = 0 if K % 2 else None
    check(be, bufs, _coef("per_step", B, K, g, device), nc, seeds_tensor(7, B).to(device),
          K, _coef("per_step", B, K, g, device), mask, _coef("per_step", B, K, g, device),
          out_alias=alias)
    assert torch.equal(mask, mask_keep)
    for k in range(1 if alias == 0 else 0, K):
        assert torch.equal(bufs[k], keep[k])


@pytest.mark.parametrize("name,device", BACKENDS)
def test_mask_per_sample_coefficients_steps_and_views(name, device):
    """[B, K] mask_coef and coef, per-sample steps, a non-contiguous mask, out = bufs[0]."""
    be = _module(name, device)
    g = torch.Generator().manual_seed(5)
    B, K, shape = 5, 4, (5, 2, 9, 13)
    for dtype in _dtypes(name, device):
        bufs = _bufs(K, shape, dtype, g, device)
        wide = torch.rand((5, 2, 9, 26), generator=g).to(device)
        mask = wide[..., ::2]                           # a strided view
        check(be, bufs, _coef("per_sample", B, K, g, device),
              torch.rand(B, generator=g, dtype=torch.float64).to(device),
              _random_seeds(B, g, device), _steps(B, g, device),
              _coef("per_sample", B, K, g, device), mask, _coef("per_sample", B, K, g, device),
              out_alias=0)


@pytest.mark.parametrize("name,device", BACKENDS)
def test_binary_mask_selects_exactly(name, device):
    """m = 1 keeps the unmasked update bit for bit, m = 0 takes sum_k mask_coef_k bufs_k bit
    for bit (computed as an update of its own); aux is not masked."""
    be = _module(name, device)
    g = torch.Generator().manual_seed(8)
    B, K, shape = 3, 5, (3, 4, 67)
    for dtype in _dtypes(name, device):
        bufs = _bufs(K, shape, dtype, g, device)
        coef, mcoef = _coef("per_step", B, K, g, device), _coef("per_sample", B, K, g, device)
        acoef = _coef("per_step", B, K, g, device)
        mask = _mask("binary", shape, torch.bfloat16, g, device)
        seeds = seeds_tensor(3, B).to(device)
        res, aux = torch.empty_like(bufs[0]), torch.empty_like(bufs[0])
        be.fused_update(res, bufs, coef, 0.4, seeds, 6, aux, acoef)
        base = torch.empty_like(bufs[0])
        be.fused_update(base, bufs, mcoef)
        out, maux = torch.empty_like(bufs[0]), torch.empty_like(bufs[0])
        be.fused_update(out, bufs, coef, 0.4, seeds, 6, maux, acoef, mask=mask, mask_coef=mcoef)
        assert torch.equal(out, torch.where(mask.bool(), res, base))
        assert torch.equal(maux, aux)


# ---------------------------------------------------------------------------------------
# validation: ValueError naming the argument, before anything is written
# ---------------------------------------------------------------------------------------


def _bad_calls(device):
    """(label, call(be, out, bufs, seeds), message): each a contract violation."""
    other = "meta" if device == "cpu" else "cpu"
    shape = (2, 5)
    c2 = np.array([1.0, 1.0])

    def rand(*s, **kw):
        return torch.rand(*s, device=device, **kw)

    return [
        ("no_bufs", lambda be, o, b, s: be.fused_update(o, [], np.array([1.0])),
         "bufs must be a non-empty list"),
        ("nine_bufs", lambda be, o, b, s: be.fused_update(o, [b[0]] * 9, np.ones(9)),
         "at most 8"),
        ("buf_shape", lambda be, o, b, s: be.fused_update(o, [b[0], b[1][:, :3]], c2),
         r"bufs\[1\] has shape"),
        ("buf_dtype", lambda be, o, b, s: be.fused_update(o, [b[0], b[1].int()], c2),
         r"bufs\[1\] has unsupported dtype"),
        ("buf_type", lambda be, o, b, s: be.fused_update(o, [b[0], "x"], c2),
         r"bufs\[1\] must be a tensor"),
        ("buf_device", lambda be, o, b, s: be.fused_update(o, [b[0], b[1].to(other)], c2),
         r"bufs\[1\] is on"),
        ("buf_0d", lambda be, o, b, s: be.fused_update(o, [torch.tensor(1.0, device=device)],
                                                       np.array([1.0])), "0-dim"),
        ("out_shape", lambda be, o, b, s: be.fused_update(o[:, :2], b, c2), "out has shape"),
        ("out_dtype", lambda be, o, b, s: be.fused_update(o.int(), b, c2),
         "out has unsupported dtype"),
        ("out_type", lambda be, o, b, s: be.fused_update(None, b, c2), "out must be a tensor"),
        ("out_meta", lambda be, o, b, s: be.fused_update(torch.empty(shape, device="meta"), b,
                                                         c2), "out is on meta"),
        ("out_0d", lambda be, o, b, s: be.fused_update(o[0, 0], b, c2), "out has shape"),
        ("out_stride0", lambda be, o, b, s: be.fused_update(
            torch.zeros(5, device=device).expand(2, 5), b, c2), "out has elements that share"),
        ("coef_len", lambda be, o, b, s: be.fused_update(o, b, np.array([1.0])),
         "coef has 1 entries for 2 buffers"),
        ("coef_shape", lambda be, o, b, s: be.fused_update(o, b, torch.ones(3, 2)),
         r"coef must be \[K\]"),
        ("coef_type", lambda be, o, b, s: be.fused_update(o, b, "ab"), "coef must be"),
        ("coef_complex", lambda be, o, b, s: be.fused_update(
            o, b, torch.ones(2, dtype=torch.complex64)), "coef must hold real numbers"),
        ("no_seeds", lambda be, o, b, s: be.fused_update(o, b, c2, 0.5), "seeds"),
        ("seeds_shape", lambda be, o, b, s: be.fused_update(o, b, c2, 0.5,
                                                            seeds_tensor(1, 3).to(device), 0),
         "seeds must"),
        ("noise_coef_shape", lambda be, o, b, s: be.fused_update(o, b, c2, torch.ones(3)),
         "noise_coef must"),
        ("noise_coef_type", lambda be, o, b, s: be.fused_update(o, b, c2, "x"),
         "noise_coef must"),
        ("noise_shape", lambda be, o, b, s: be.fused_update(o, b, c2, 0.5,
                                                            noise=rand(2, 4)), "noise has shape"),
        ("aux_alone", lambda be, o, b, s: be.fused_update(o, b, c2, aux_out=rand(*shape)),
         "aux_out and aux_coef"),
        ("aux_is_out", lambda be, o, b, s: be.fused_update(o, b, c2, aux_out=o, aux_coef=c2),
         "aux_out must be a different tensor"),
        ("aux_coef_len", lambda be, o, b, s: be.fused_update(o, b, c2, aux_out=rand(*shape),
                                                             aux_coef=np.array([1.0])),
         "aux_coef has 1 entries"),
        ("compute_dtype", lambda be, o, b, s: be.fused_update(o, b, c2,
                                                              compute_dtype=torch.float16),
         "compute_dtype"),
        ("mask_only", lambda be, o, b, s: be.fused_update(o, b, c2, 0.3, s, 3,
                                                          mask=rand(*shape)),
         "mask and mask_coef"),
        ("mask_coef_only", lambda be, o, b, s: be.fused_update(o, b, c2, mask_coef=c2),
         "mask and mask_coef"),
        ("mask_shape", lambda be, o, b, s: be.fused_update(o, b, c2, mask=rand(2, 4),
                                                           mask_coef=c2), "mask has shape"),
        ("mask_dtype", lambda be, o, b, s: be.fused_update(
            o, b, c2, mask=torch.ones(shape, dtype=torch.int32, device=device), mask_coef=c2),
         "mask has unsupported dtype"),
        ("mask_device", lambda be, o, b, s: be.fused_update(
            o, b, c2, mask=torch.rand(shape, device=other), mask_coef=c2), "mask is on"),
        ("mask_is_out", lambda be, o, b, s: be.fused_update(o, b, c2, mask=o, mask_coef=c2),
         "mask shares memory with out"),
        ("mask_view_of_out", lambda be, o, b, s: be.fused_update(
            o, b, c2, mask=o.view(5, 2).t(), mask_coef=c2), "mask shares memory with out"),
        ("mask_coef_len", lambda be, o, b, s: be.fused_update(
            o, b, c2, mask=rand(*shape), mask_coef=np.array([1.0])), "mask_coef has 1 entries"),
        ("mask_coef_shape", lambda be, o, b, s: be.fused_update(
            o, b, c2, mask=rand(*shape), mask_coef=torch.ones(3, 2, dtype=torch.float64)),
         r"mask_coef must be \[K\]"),
        ("step_dtype", lambda be, o, b, s: be.fused_update(
            o, b, c2, 0.3, s, torch.ones(2, dtype=torch.int32, device=device)), "step must be"),
        ("step_shape", lambda be, o, b, s: be.fused_update(
            o, b, c2, 0.3, s, torch.ones(3, dtype=torch.int64, device=device)), "step must be"),
        ("step_2d", lambda be, o, b, s: be.fused_update(
            o, b, c2, 0.3, s, torch.ones(2, 1, dtype=torch.int64, device=device)),
         "step must be"),
        ("step_negative", lambda be, o, b, s: be.fused_update(o, b, c2, 0.3, s, -1),
         "needs seeds"),
    ]


@pytest.mark.parametrize("name,device", BACKENDS)
def test_validation_names_the_argument(name, device):
    """Every contract violation raises ValueError naming the argument (no IndexError for a
    0-d tensor, no null-pointer message for a meta tensor, no pybind11 signature dump, no
    torch copy-back error for a stride-0 out), and nothing is written."""
    be = _module(name, device)
    for label, call, msg in _bad_calls(device):
        if label == "nine_bufs" and name == "torch":
            continue                                   # the reference has no buffer limit
        g = torch.Generator().manual_seed(1)
        out = torch.randn(2, 5, generator=g).to(device)
        bufs = [torch.randn(2, 5, generator=g).to(device) for _ in range(2)]
        keep = [out.clone()] + [b.clone() for b in bufs]
        with pytest.raises(ValueError, match=msg):
            call(be, out, bufs, seeds_tensor(1, 2).to(device))
        for got, want in zip([out, *bufs], keep):
            assert torch.equal(got, want), label


@pytest.mark.parametrize("name,device", BACKENDS)
def test_partial_overlap_is_refused(name, device):
    """Issue 13 #6: out or aux_out overlapping an input without being it, or aux_out
    overlapping out, raises (numba and Triton returned wrong values, errors up to 7.4; the
    torch backend accepted aux_out == out); an exact alias is an in-place update."""
    be = _module(name, device)
    x = torch.randn(300, device=device)
    keep = x.clone()
    one = np.array([1.0])
    with pytest.raises(ValueError, match=r"out overlaps bufs\[0\] without being"):
        be.fused_update(x[1:101].view(2, 50), [x[:100].view(2, 50)], one)
    with pytest.raises(ValueError, match=r"aux_out overlaps bufs\[1\]"):
        be.fused_update(torch.empty(2, 50, device=device), [torch.randn(2, 50, device=device),
                                                            x[:100].view(2, 50)],
                        np.array([1.0, 1.0]), aux_out=x[50:150].view(2, 50),
                        aux_coef=np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="aux_out overlaps out"):
        be.fused_update(x[:100].view(2, 50), [torch.randn(2, 50, device=device)], one,
                        aux_out=x[50:150].view(2, 50), aux_coef=one)
    with pytest.raises(ValueError, match="out overlaps noise"):
        be.fused_update(x[1:101].view(2, 50), [torch.randn(2, 50, device=device)], one, 0.5,
                        noise=x[:100].view(2, 50))
    assert torch.equal(x, keep)
    # inputs may overlap each other (they are only read); out may be exactly one of them
    base = torch.randn(2, 101, device=device)
    a, b = base[:, :100], base[:, 1:]
    out = torch.empty(2, 100, device=device)
    be.fused_update(out, [a, b], np.array([1.0, 1.0]))
    torch.testing.assert_close(out, a + b)
    y = torch.randn(2, 64, device=device)
    want = 3 * y
    be.fused_update(y, [y, y.clone()], np.array([1.0, 2.0]))
    torch.testing.assert_close(y, want)


# ---------------------------------------------------------------------------------------
# validation once, then trusted calls
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,device", BACKENDS)
def test_trusted_calls_equal_validated_ones(name, device):
    """``trusted=True`` skips the checks, not the work: bitwise the validated call's result,
    per-sample tables, steps, aux and mask included."""
    be = _module(name, device)
    g = torch.Generator().manual_seed(11)
    B, K, shape = 3, 3, (3, 2, 37)
    bufs = _bufs(K, shape, torch.float32, g, device)
    args = (bufs, _coef("per_sample", B, K, g, device),
            torch.rand(B, generator=g, dtype=torch.float64).to(device),
            seeds_tensor(2, B).to(device), _steps(B, g, device))
    kw = {"mask": _mask("uniform", shape, torch.float32, g, device),
          "mask_coef": _coef("per_step", B, K, g)}
    aux_coef = _coef("per_step", B, K, g)
    sig = fu.validate(torch.empty(shape, device=device), *args,
                      aux_out=torch.empty(shape, device=device), aux_coef=aux_coef,
                      backend=name.partition("-")[0], **kw)
    assert sig.K == K and sig.coef == "sample" and sig.noise == "philox" and sig.mask == "step"
    outs = []
    for trusted in (False, True):
        out, aux = torch.empty(shape, device=device), torch.empty(shape, device=device)
        be.fused_update(out, *args, aux, aux_coef, trusted=trusted, **kw)
        outs.append((out, aux))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_trusted_calls_run_no_python_validation(monkeypatch):
    """The steady state of a validated structure runs no Python re-validation."""
    from pyengine.fused_update import contract

    def refuse(*a, **k):
        raise AssertionError("validated a trusted call")

    monkeypatch.setattr(contract, "validate", refuse)
    monkeypatch.setattr(contract, "check_overlap", refuse)
    x = torch.randn(2, 9)
    for name in ("torch", "cpp", "numba"):
        if dispatch.unavailable_reason(name, "cpu") is not None:
            continue
        out = torch.empty_like(x)
        dispatch.resolve(dispatch.REGISTRY[name]).fused_update(out, [x, x], np.array([1.0, 2.0]),
                                                               trusted=True)
        torch.testing.assert_close(out, 3 * x)
        with pytest.raises(AssertionError, match="validated"):
            dispatch.resolve(dispatch.REGISTRY[name]).fused_update(out, [x], np.array([1.0]))


def test_validate_knows_each_backends_limits():
    x = torch.randn(2, 8).to(torch.bfloat16)
    with pytest.raises(ValueError, match="the numba backend takes float32 and float64"):
        fu.validate(torch.empty_like(x), [x], [1.0], backend="numba")
    with pytest.raises(ValueError, match="the cuda backend runs on cuda tensors"):
        fu.validate(torch.empty_like(x), [x], [1.0], backend="cuda")
    many = [torch.randn(2, 3)] * 9
    assert fu.validate(torch.empty(2, 3), many, [1.0] * 9, backend="torch").K == 9
    with pytest.raises(ValueError, match="reads at most 8"):
        fu.validate(torch.empty(2, 3), many, [1.0] * 9, backend="cpp")
    with pytest.raises(ValueError, match="backend must be one of"):
        fu.validate(torch.empty(2, 3), many[:1], [1.0], backend="tpu")


# ---------------------------------------------------------------------------------------
# the layers above the backends: the dispatcher and the torch.library op
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,device", BACKENDS)
def test_dispatcher_passes_every_feature_through(name, device):
    be = _module(name, device)
    g = torch.Generator().manual_seed(2)
    bufs = _bufs(3, (4, 37), torch.float32, g, device)
    coef, mcoef = np.array([0.5, -1.0, 0.25]), np.array([0.0, 1.0, 0.5])
    mask = torch.rand((4, 37), generator=g).to(device)
    steps = torch.tensor([4, 9, 0, 1], dtype=torch.int64, device=device)
    seeds = seeds_tensor(5, 4).to(device)
    want, got, got2 = (torch.empty_like(bufs[0]) for _ in range(3))
    be.fused_update(want, bufs, coef, 0.2, seeds, steps, mask=mask, mask_coef=mcoef)
    backends.fused_update(got, bufs, coef, 0.2, seeds, steps, mask=mask, mask_coef=mcoef,
                          backend=name.partition("-")[0])
    fu.fused_update(got2, bufs, coef, 0.2, seeds, steps, mask=mask, mask_coef=mcoef,
                    backend=name.partition("-")[0])
    assert torch.equal(got, want) and torch.equal(got2, want)


# ---------------------------------------------------------------------------------------
# property tests: random structure against the float64 reference, every CPU backend
# ---------------------------------------------------------------------------------------

if not INTERPRETED:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    CPU_BACKENDS = [n for n, d in BACKENDS if d == "cpu"]

    @st.composite
    def _calls(draw, name):
        """A random call: shape (odd and prime sizes, batch 1..5), K, dtypes, coefficient
        kinds, noise, aux, mask, a non-contiguous view or an in-place output."""
        dts = _dtypes(name, "cpu")
        B = draw(st.integers(1, 5))
        inner = draw(st.lists(st.sampled_from([1, 2, 3, 5, 7, 13, 31, 64, 97, 131]),
                              min_size=1, max_size=3))
        while len(inner) > 1 and int(np.prod(inner)) > 6000:     # small: seconds in all
            inner.pop()
        shape = (B, *inner)
        # numba compiles a kernel per K (2 s each): the Ks the cases above compiled already
        K = draw(st.sampled_from([2, 3, 7]) if name == "numba" else st.integers(1, fu.K_MAX))
        dtype = draw(st.sampled_from(dts))
        seed = draw(st.integers(0, 2 ** 32 - 1))
        g = torch.Generator().manual_seed(seed)
        bufs = []
        for _ in range(K):
            t = torch.randn(shape, generator=g, dtype=torch.float64)
            if draw(st.booleans()):                # a non-contiguous view of a wider tensor
                wide = torch.randn((*shape[:-1], 2 * shape[-1]), generator=g,
                                   dtype=torch.float64)
                t = wide[..., ::2]
            bufs.append(t.to(draw(st.sampled_from(dts)) if draw(st.booleans()) else dtype))
        per_sample = draw(st.booleans())
        coef = _coef("per_sample" if per_sample else "per_step", B, K, g)
        nc = draw(st.sampled_from(["none", "scalar", "per_sample"]))
        nc = {"none": 0.0, "scalar": float(torch.rand(1, generator=g)),
              "per_sample": torch.rand(B, generator=g, dtype=torch.float64)}[nc]
        aux_coef = _coef("per_step", B, K, g) if draw(st.booleans()) else None
        mask = mcoef = None
        if draw(st.booleans()):
            mask = _mask(draw(st.sampled_from(["binary", "uniform"])), shape,
                         draw(st.sampled_from(ALL_DTYPES)), g, "cpu")
            mcoef = _coef("per_sample" if draw(st.booleans()) else "per_step", B, K, g)
        steps = _steps(B, g, "cpu") if draw(st.booleans()) else draw(st.integers(0, 2 ** 32))
        alias = draw(st.sampled_from([None, 0])) if bufs[0].dtype == dtype and \
            bufs[0].is_contiguous() else None
        return dict(bufs=bufs, coef=coef, nc=nc, seeds=_random_seeds(B, g, "cpu"), step=steps,
                    aux_coef=aux_coef, mask=mask, mask_coef=mcoef, out_alias=alias,
                    dtype=dtype)

    @pytest.mark.parametrize("name", CPU_BACKENDS)
    def test_random_calls_match_the_float64_reference(name):
        be = _module(name, "cpu")

        @settings(max_examples=25, deadline=None, derandomize=True, database=None)
        @given(_calls(name))
        def run(call):
            check(be, **call)

        run()

    def test_under_the_triton_interpreter():
        """This file's triton cases, on CPU tensors, in a child with TRITON_INTERPRET=1."""
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-x", str(Path(__file__))], env=env, capture_output=True, text=True,
                           cwd=Path(__file__).parent.parent, timeout=900, check=False)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout
