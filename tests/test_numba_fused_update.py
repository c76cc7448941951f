"""The numba CPU fused update (backend "numba") against the float64 reference.

Tolerance (STYLE habit 5): the kernel's error against the float64 reference is at most twice
plain torch's own error at the same dtype (the torch backend, same inputs); where torch is
exact, one rounding of the result (eps times the size of the terms) is the floor. Noisy
updates feed the kernel's own normals to the reference; the normals are checked against
pyengine.noise separately (words bit-exact, values to 1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import fused_update_reference

from pyengine.backends import numba_backend as nb
from pyengine.backends import torch_ref
from pyengine.noise import philox4x32, philox_normal, sample_seed, seeds_tensor

if nb.numba is None:
    pytest.skip(nb.IMPORT_ERROR, allow_module_level=True)

DTYPES = [torch.float32, torch.float64]


def _bufs(K, shape, dtype, g):
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(K)]


def _coef(kind, B, K, g):
    if kind == "per_step":
        return torch.randn(K, generator=g, dtype=torch.float64).numpy()
    return torch.randn(B, K, generator=g, dtype=torch.float64)


def _scale(bufs, coef, nc=0.0, noise=None):
    if bufs[0].numel() == 0:
        return 0.0
    c = torch.as_tensor(coef, dtype=torch.float64).abs()
    c = c.max(0).values if c.dim() == 2 else c
    s = sum(float(c[k]) * b.double().abs().max().item() for k, b in enumerate(bufs))
    if noise is not None:
        ncm = nc.abs().max().item() if isinstance(nc, torch.Tensor) else abs(nc)
        s += ncm * noise.double().abs().max().item()
    return s


def check(bufs, coef, nc=0.0, seeds=None, step=-1, aux_coef=None, noise=None, out_alias=None,
          compute_dtype=None):
    """Run numba and torch on the same inputs; numba's error <= 2x torch's (see top)."""
    ref_in = [b.clone() for b in bufs]
    shape, dtype = bufs[0].shape, bufs[0].dtype
    kw = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
    ref_noise = noise
    if noise is None and (isinstance(nc, torch.Tensor) or nc != 0.0):
        ref_noise = nb.philox_normal(seeds, step, int(np.prod(shape[1:]))).view(shape)
    ref, ref_aux = fused_update_reference(ref_in, coef, nc, seeds, step, aux_coef, ref_noise)
    t_out = torch.empty(shape, dtype=dtype)
    t_aux = torch.empty(shape, dtype=dtype) if aux_coef is not None else None
    torch_ref.fused_update(t_out, [b.clone() for b in ref_in], coef, nc, seeds, step, t_aux,
                           aux_coef, noise=ref_noise, **kw)
    out = bufs[out_alias] if out_alias is not None else torch.empty(shape, dtype=dtype)
    aux = torch.empty(shape, dtype=dtype) if aux_coef is not None else None
    res = nb.fused_update(out, bufs, coef, nc, seeds, step, aux, aux_coef, noise=noise, **kw)
    assert res is out and out.dtype == dtype and out.shape == shape
    eps = torch.finfo(compute_dtype or dtype).eps
    for got, want, mine, coefs in ((out, ref, t_out, coef), (aux, ref_aux, t_aux, aux_coef)):
        if got is None:
            continue
        scale = _scale(ref_in, coefs, nc if got is out else 0.0,
                       ref_noise if got is out else None)
        err = (got.double() - want).abs().max().item() if got.numel() else 0.0
        torch_err = (mine.double() - want).abs().max().item() if got.numel() else 0.0
        assert err <= max(2 * torch_err, eps * scale), (err, torch_err, eps * scale)
    return out, aux


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", range(1, nb.K_MAX + 1))
@pytest.mark.parametrize("kind", ["per_step", "per_sample"])
def test_k_dtype_sweep(dtype, K, kind):
    """Prime per-sample size (131), Philox noise with a per-sample c_z, and an aux output."""
    g = torch.Generator().manual_seed(100 * K + DTYPES.index(dtype))
    B, shape = 3, (3, 131)
    bufs = _bufs(K, shape, dtype, g)
    nc = torch.rand(B, generator=g, dtype=torch.float64)
    check(bufs, _coef(kind, B, K, g), nc, seeds_tensor(7, B), K, _coef(kind, B, K, g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (2, 3, 5, 7), (3, 40001), (1, 65537), (0, 5), (4, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_shapes(dtype, shape):
    """Batch 1, primes, several tiles per sample (tile 4096) on the parallel path, empty."""
    g = torch.Generator().manual_seed(sum(shape))
    bufs = _bufs(3, shape, dtype, g)
    check(bufs, _coef("per_step", shape[0], 3, g), 0.37, seeds_tensor(3, shape[0]), 11)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise_kind", ["none", "philox", "tensor"])
@pytest.mark.parametrize("nc_kind", ["scalar", "per_sample"])
@pytest.mark.parametrize("with_aux", [False, True])
def test_noise_aux_combinations(dtype, noise_kind, nc_kind, with_aux):
    g = torch.Generator().manual_seed(17)
    B, K, shape = 4, 3, (4, 2, 5, 7)
    bufs = _bufs(K, shape, dtype, g)
    coef = _coef("per_sample", B, K, g)
    aux_coef = _coef("per_step", B, K, g) if with_aux else None
    if noise_kind == "none":
        check(bufs, coef, 0.0, None, -1, aux_coef)
        return
    nc = torch.rand(B, generator=g, dtype=torch.float64) if nc_kind == "per_sample" else 0.8
    noise = torch.randn(shape, generator=g, dtype=dtype) if noise_kind == "tensor" else None
    check(bufs, coef, nc, seeds_tensor(5, B), 3, aux_coef, noise)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alias", [0, 2])
def test_output_aliases_an_input(dtype, alias):
    g = torch.Generator().manual_seed(alias)
    bufs = _bufs(3, (3, 9000), dtype, g)             # two tiles per sample
    check(bufs, _coef("per_sample", 3, 3, g), 0.5, seeds_tensor(1, 3), 2,
          _coef("per_step", 3, 3, g), out_alias=alias)


def test_aux_aliases_an_input_and_out_another():
    g = torch.Generator().manual_seed(4)
    bufs = _bufs(3, (2, 50), torch.float32, g)
    ref, ref_aux = fused_update_reference([b.clone() for b in bufs], [0.5, -1.0, 2.0], 0.0,
                                          aux_coef=[1.0, 1.0, -0.25])
    nb.fused_update(bufs[0], bufs, np.array([0.5, -1.0, 2.0]), aux_out=bufs[1],
                    aux_coef=np.array([1.0, 1.0, -0.25]))
    torch.testing.assert_close(bufs[0].double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bufs[1].double(), ref_aux, rtol=1e-6, atol=1e-6)


def test_mixed_dtypes_compute_dtype_and_non_contiguous():
    g = torch.Generator().manual_seed(6)
    a = torch.randn(3, 40, generator=g, dtype=torch.float64)
    b = torch.randn(40, 3, generator=g).t()                      # non-contiguous float32
    out = torch.empty(3, 80, dtype=torch.float32)[:, ::2]        # non-contiguous output
    nb.fused_update(out, [a, b], np.array([0.3, -1.1]))
    want = 0.3 * a.float() + -1.1 * b
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    check(_bufs(2, (3, 33), torch.float32, g), _coef("per_step", 3, 2, g), 0.2,
          seeds_tensor(2, 3), 1, compute_dtype=torch.float64)


@pytest.mark.parametrize("seed,step,q0", [(0, 0, 0), (2 ** 64 - 1, 2 ** 32 - 1, 7),
                                          (sample_seed(5, 2), 9, 2 ** 32 - 70),
                                          (0xDEADBEEFCAFEF00D, 123456, 2 ** 40 + 3)])
def test_philox_words_bit_exact(seed, step, q0):
    nq = 301
    got = nb.philox_words(seed, step, nq, q0=q0)
    q = torch.arange(q0, q0 + nq, dtype=torch.int64)
    want = philox4x32(q & 0xFFFFFFFF, q >> 32, torch.full_like(q, step), torch.zeros_like(q),
                      torch.tensor(seed & 0xFFFFFFFF), torch.tensor(seed >> 32))
    assert torch.equal(got, torch.stack(want, dim=1))
    from pyengine.backends import _native, cpp
    if _native._C is not None:
        assert torch.equal(got, cpp.philox_words(seed, step, nq, q0=q0))


def test_normals_and_kernel_noise():
    seeds = seeds_tensor([0, 1, 2 ** 64 - 1, sample_seed(77, 3)], 4)
    for step, numel in ((0, 1), (5, 3), (2 ** 32 - 1, 4099), (17, 9001)):
        torch.testing.assert_close(nb.philox_normal(seeds, step, numel),
                                   philox_normal(seeds, step, numel), rtol=0, atol=1e-6)
    # the kernel adds exactly those normals: out = 0 * x + 1 * z (over several tiles)
    x = torch.ones(4, 9001)
    out = torch.empty_like(x)
    nb.fused_update(out, [x], np.array([0.0]), 1.0, seeds, 17)
    assert torch.equal(out, nb.philox_normal(seeds, 17, 9001))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_are_refused_with_a_reason(dtype):
    from pyengine.backends.dispatch import Call
    x = torch.randn(2, 8).to(dtype)
    why = nb.reasons_unsupported(Call.of(torch.empty_like(x), [x]))
    assert why and "float32/float64 only" in why[0] and str(dtype).split(".")[1] in why[0]
    with pytest.raises(ValueError, match="float32 and float64"):
        nb.fused_update(torch.empty_like(x), [x], np.array([1.0]))


@pytest.mark.parametrize("call,msg", [
    (lambda x: nb.fused_update(torch.empty(2, 3), [x], np.array([1.0])), "out has shape"),
    (lambda x: nb.fused_update(torch.empty_like(x), [x] * 9, np.ones(9)), "at most 8"),
    (lambda x: nb.fused_update(torch.empty_like(x), [x], np.ones(2)), "2 entries for 1"),
    (lambda x: nb.fused_update(torch.empty_like(x), [x], np.ones(1), 0.5), "needs seeds"),
    (lambda x: nb.fused_update(x, [x], np.ones(1), aux_out=x, aux_coef=np.ones(1)),
     "different tensor"),
])
def test_validation_names_the_argument(call, msg):
    with pytest.raises(ValueError, match=msg):
        call(torch.randn(2, 5))
