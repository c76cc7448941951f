"""The C++ CPU fused update (backend "cpp") against the float64 reference.

Tolerance (STYLE habit 5, flash-attention's rule): the kernel's error against the float64
reference is at most twice plain torch's own error at the same dtype (the torch backend, same
inputs), measured in each test; where torch happens to be exact, one rounding of the result
(eps of the dtype times the size of the terms) is the least any kernel can promise. Noisy
updates are compared with the kernel's own normals fed to the reference: the normals
themselves are checked against pyengine.noise separately (bits exact, values to 1e-6).

Every kernel test runs on each CPU kernel build this machine has (baseline x86-64, and
AVX2/FMA/F16C where the CPU has them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyengine.backends import _native, cpp, torch_ref
from pyengine.noise import philox4x32, philox_normal, sample_seed, seeds_tensor
from reference import fused_update_reference

if _native._C is None:
    pytest.skip(f"the C++ extension is not built: {_native.IMPORT_ERROR}",
                allow_module_level=True)
_C = _native._C

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ISAS = _C.cpu_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    prev = _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(prev)


def _bufs(K, shape, dtype, g):
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(K)]


def _coef(kind, B, K, g):
    if kind == "per_step":
        return torch.randn(K, generator=g, dtype=torch.float64).numpy()
    return torch.randn(B, K, generator=g, dtype=torch.float64)


def _scale(bufs, coef, nc=0.0, noise=None):
    """The size of the terms: sum |c_k| max |buf_k| (+ |c_z| max |z|)."""
    if bufs[0].numel() == 0:
        return 0.0
    c = torch.as_tensor(coef, dtype=torch.float64).abs()
    c = c.max(0).values if c.dim() == 2 else c
    s = sum(float(c[k]) * b.double().abs().max().item() for k, b in enumerate(bufs))
    if noise is not None:
        ncm = nc.abs().max().item() if isinstance(nc, torch.Tensor) else abs(nc)
        s += ncm * noise.double().abs().max().item()
    return s


def check(bufs, coef, nc=0.0, seeds=None, step=-1, aux_coef=None, noise=None, dtype=None,
          out_alias=None, compute_dtype=None):
    """Run cpp and torch on the same inputs; assert the cpp error <= 2x torch's (see top)."""
    ref_in = [b.clone() for b in bufs]
    shape, dtype = bufs[0].shape, dtype or bufs[0].dtype
    kw = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
    ref_noise = noise
    if noise is None and (isinstance(nc, torch.Tensor) or nc != 0.0):
        ref_noise = cpp.philox_normal(seeds, step, int(np.prod(shape[1:]))).view(shape)
    ref, ref_aux = fused_update_reference(ref_in, coef, nc, seeds, step, aux_coef, ref_noise)

    t_out = torch.empty(shape, dtype=dtype)
    t_aux = torch.empty(shape, dtype=dtype) if aux_coef is not None else None
    torch_ref.fused_update(t_out, [b.clone() for b in ref_in], coef, nc, seeds, step, t_aux,
                           aux_coef, noise=ref_noise, **kw)

    out = bufs[out_alias] if out_alias is not None else torch.empty(shape, dtype=dtype)
    aux = torch.empty(shape, dtype=dtype) if aux_coef is not None else None
    res = cpp.fused_update(out, bufs, coef, nc, seeds, step, aux, aux_coef, noise=noise, **kw)
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


# ---------------------------------------------------------------------------------------
# arithmetic: every dtype, K = 1..K_MAX, per-step and per-sample coefficients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", range(1, _C.K_MAX + 1))
@pytest.mark.parametrize("kind", ["per_step", "per_sample"])
def test_k_dtype_sweep(isa, dtype, K, kind):
    """Prime per-sample size (131), Philox noise with a per-sample c_z, and an aux output."""
    g = torch.Generator().manual_seed(100 * K + DTYPES.index(dtype))
    B, shape = 3, (3, 131)
    bufs = _bufs(K, shape, dtype, g)
    nc = torch.rand(B, generator=g, dtype=torch.float64)
    check(bufs, _coef(kind, B, K, g), nc, seeds_tensor(7, B), K, _coef(kind, B, K, g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (1, 4, 64, 64), (2, 3, 5, 7), (5, 1031),
                                   (3, 40001), (1, 65537), (0, 5), (4, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_shapes(isa, dtype, shape):
    """Batch 1, primes, sizes that are no multiple of the block (256) or tile (32768),
    several tiles per sample, empty tensors."""
    g = torch.Generator().manual_seed(sum(shape))
    K = 3
    bufs = _bufs(K, shape, dtype, g)
    check(bufs, _coef("per_step", shape[0], K, g), 0.37, seeds_tensor(3, shape[0]), 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noise_kind", ["none", "philox", "tensor"])
@pytest.mark.parametrize("nc_kind", ["scalar", "per_sample"])
@pytest.mark.parametrize("with_aux", [False, True])
@pytest.mark.parametrize("kind", ["per_step", "per_sample"])
def test_noise_aux_coefficient_combinations(isa, dtype, noise_kind, nc_kind, with_aux, kind):
    g = torch.Generator().manual_seed(17)
    B, K, shape = 4, 3, (4, 2, 5, 7)
    bufs = _bufs(K, shape, dtype, g)
    coef = _coef(kind, B, K, g)
    aux_coef = _coef(kind, B, K, g) if with_aux else None
    if noise_kind == "none":
        check(bufs, coef, 0.0, None, -1, aux_coef)
        return
    nc = torch.rand(B, generator=g, dtype=torch.float64) if nc_kind == "per_sample" else 0.8
    noise = torch.randn(shape, generator=g, dtype=dtype) if noise_kind == "tensor" else None
    check(bufs, coef, nc, seeds_tensor(5, B), 3, aux_coef, noise)


# ---------------------------------------------------------------------------------------
# aliasing, mixed dtypes, non-contiguous views, compute dtype
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alias", [0, 1, 3])
def test_output_aliases_an_input(isa, dtype, alias):
    """out is one of the buffers (in-place update); the other buffers are untouched."""
    g = torch.Generator().manual_seed(alias)
    K, shape = 4, (3, 1000)
    bufs = _bufs(K, shape, dtype, g)
    keep = [b.clone() for b in bufs]
    check(bufs, _coef("per_sample", 3, K, g), 0.5, seeds_tensor(1, 3), 2,
          _coef("per_step", 3, K, g), out_alias=alias)
    for k in range(K):
        if k != alias:
            assert torch.equal(bufs[k], keep[k])


def test_aux_aliases_an_input_and_out_another():
    g = torch.Generator().manual_seed(4)
    bufs = _bufs(3, (2, 300), torch.float32, g)
    keep = [b.clone() for b in bufs]
    coef, aux_coef = [0.5, -1.0, 2.0], [1.0, 0.25, -0.5]
    ref, ref_aux = fused_update_reference(keep, coef, aux_coef=aux_coef)
    cpp.fused_update(bufs[2], bufs, coef, aux_out=bufs[0], aux_coef=aux_coef)
    torch.testing.assert_close(bufs[2].double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(bufs[0].double(), ref_aux, rtol=0, atol=1e-6)
    assert torch.equal(bufs[1], keep[1])


def test_same_buffer_twice_and_as_output():
    x = torch.randn(2, 99)
    keep = x.clone()
    cpp.fused_update(x, [x, x], [0.5, 0.25])
    torch.testing.assert_close(x, 0.75 * keep, rtol=0, atol=1e-7)


def test_partial_overlap_is_refused():
    base = torch.randn(2, 101)
    a, b = base[:, :100], base[:, 1:]
    x = torch.randn(200)
    with pytest.raises(ValueError, match="overlaps bufs"):
        cpp.fused_update(x[1:101].view(2, 50), [x[:100].view(2, 50)], [1.0])
    out = torch.empty(2, 100)
    cpp.fused_update(out, [a, b], [1.0, 1.0])     # non-contiguous views are copied: fine
    torch.testing.assert_close(out, a + b)
    y = torch.randn(300)
    with pytest.raises(ValueError, match="aux_out overlaps out"):
        cpp.fused_update(y[:100].view(2, 50), [torch.randn(2, 50)], [1.0],
                         aux_out=y[50:150].view(2, 50), aux_coef=[1.0])


def test_mixed_buffer_dtypes():
    """A bfloat16 state with float32 model outputs and a float64 history buffer."""
    g = torch.Generator().manual_seed(9)
    shape = (3, 257)
    bufs = [torch.randn(shape, generator=g).to(dt)
            for dt in (torch.bfloat16, torch.float32, torch.float64, torch.float16)]
    for dtype in DTYPES:
        check(bufs, [0.3, -1.1, 0.7, 2.0], 0.2, seeds_tensor(2, 3), 1, [1.0, 0.5, 0.0, -1.0],
              dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compute_dtype_float64(dtype):
    g = torch.Generator().manual_seed(8)
    bufs = _bufs(4, (2, 333), dtype, g)
    check(bufs, _coef("per_step", 2, 4, g), 0.1, seeds_tensor(4, 2), 6, dtype=dtype,
          compute_dtype=torch.float64)


def test_non_contiguous_inputs_and_output():
    g = torch.Generator().manual_seed(10)
    bufs = [torch.randn(40, 6, generator=g).t() for _ in range(3)]   # [6, 40] views
    out = torch.empty(40, 6).t()
    aux = torch.empty(40, 6).t()
    coef, aux_coef = [1.5, -0.5, 0.25], [0.0, 1.0, 1.0]
    ref, ref_aux = fused_update_reference(bufs, coef, aux_coef=aux_coef)
    cpp.fused_update(out, bufs, coef, aux_out=aux, aux_coef=aux_coef)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(aux.double(), ref_aux, rtol=0, atol=1e-6)
    assert out.stride() == (1, 6)


# ---------------------------------------------------------------------------------------
# float16 / bfloat16 storage: every bit pattern in, torch's rounding out
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_half_bit_pattern_round_trips(isa, dtype):
    bits = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(4, -1)
    out = torch.empty_like(x)
    cpp.fused_update(out, [x], [1.0])
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), x[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_to_half_matches_torch(isa, dtype):
    """float32 values over the whole range, and the exact ties between neighbours, stored as
    float16/bfloat16: bitwise torch's round-to-nearest-even, overflow and subnormals."""
    g = torch.Generator().manual_seed(0)
    mant = torch.rand(60000, generator=g) + 1.0
    expo = torch.randint(-30, 20, (60000,), generator=g).float()
    sign = torch.where(torch.rand(60000, generator=g) < 0.5, -1.0, 1.0)
    wide = sign * mant * torch.exp2(expo)
    lo = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    lo = lo[torch.isfinite(lo)].float()
    ties = (lo[:-1] + lo[1:]) / 2                      # exact in float32
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.99,
                            65520.0, 1e-8, -6e-8, 3e38])
    x = torch.cat([wide, ties[torch.isfinite(ties)], special])
    x = x[: x.numel() // 2 * 2].reshape(2, -1).contiguous()
    out = torch.empty(x.shape, dtype=dtype)
    cpp.fused_update(out, [x], [1.0])
    want = x.to(dtype)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    nan = torch.tensor([float("nan")]).expand(2, 8).contiguous()
    o = torch.empty(2, 8, dtype=dtype)
    cpp.fused_update(o, [nan], [1.0])
    assert torch.isnan(o).all()


# ---------------------------------------------------------------------------------------
# noise: the C++ Philox stream is pyengine.noise's, bit for bit
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,step,q0", [(0, 0, 0), (12345, 3, 0), (2 ** 64 - 1, 2 ** 32 - 1, 7),
                                          (sample_seed(5, 2), 9, 2 ** 32 - 70),
                                          (0xDEADBEEFCAFEF00D, 123456, 2 ** 40 + 3)])
def test_philox_words_bit_exact(isa, seed, step, q0):
    nq = 301
    got = cpp.philox_words(seed, step, nq, q0=q0)
    q = torch.arange(q0, q0 + nq, dtype=torch.int64)
    key = [torch.tensor(seed & 0xFFFFFFFF), torch.tensor(seed >> 32)]
    want = philox4x32(q & 0xFFFFFFFF, q >> 32, torch.full_like(q, step), torch.zeros_like(q),
                      *key)
    assert torch.equal(got, torch.stack(want, dim=1))


def test_normals_match_the_reference(isa):
    """float32 log/cos/sin round differently in C++ and in torch (Sleef): at most a few ulp,
    so the normals agree to 1e-6 (|z| < 5.9); the words underneath are equal (above)."""
    seeds = seeds_tensor([0, 1, 2 ** 64 - 1, sample_seed(77, 3)], 4)
    for step, numel in ((0, 1), (5, 3), (2 ** 32 - 1, 4099), (17, 1 << 18)):
        got = cpp.philox_normal(seeds, step, numel)
        want = philox_normal(seeds, step, numel)
        assert got.shape == want.shape == (4, numel)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_kernel_noise_is_the_philox_stream(isa):
    """The in-kernel noise equals the standalone normals, at every element of each sample
    and whatever the batch around it."""
    shape = (3, 5, 211)
    x = torch.zeros(shape)
    out = torch.empty(shape)
    seeds = seeds_tensor([3, 2 ** 63 + 5, 11], 3)
    cpp.fused_update(out, [x], [1.0], 1.0, seeds, 42)
    assert torch.equal(out.view(3, -1), cpp.philox_normal(seeds, 42, 5 * 211))
    alone = torch.empty(1, 5, 211)
    cpp.fused_update(alone, [x[1:2]], [1.0], 1.0, seeds[1:2], 42)
    assert torch.equal(alone[0], out[1])


def test_threads_do_not_change_the_result():
    shape = (4, 300000)             # above the parallel threshold
    g = torch.Generator().manual_seed(1)
    bufs = _bufs(2, shape, torch.float32, g)
    outs = []
    prev = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            o = torch.empty(shape)
            cpp.fused_update(o, bufs, [0.9, 0.1], 0.3, seeds_tensor(1, 4), 0)
            outs.append(o)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1])


def test_per_sample_steps_and_mask_over_tiles_threads_and_isas(isa):
    """Several noisy tiles (4096) per sample on 1 and 2 threads, the mask on the block path:
    still bitwise each sample alone at its own step; tests/test_fused_update_ext.py checks
    the values."""
    shape = (3, 20001)
    g = torch.Generator().manual_seed(2)
    bufs = _bufs(3, shape, torch.float32, g)
    mask = torch.rand(shape, generator=g).to(torch.float16)
    seeds, steps = seeds_tensor(4, 3), torch.tensor([5, 0, 2 ** 33 + 1], dtype=torch.int64)
    coef, mcoef = [0.9, 0.1, -0.3], [0.0, 0.5, 1.0]
    outs = []
    prev = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            o = torch.empty(shape)
            cpp.fused_update(o, bufs, coef, 0.3, seeds, steps, mask=mask, mask_coef=mcoef)
            outs.append(o)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1])
    for b in range(3):
        alone = torch.empty(1, shape[1])
        cpp.fused_update(alone, [x[b:b + 1].clone() for x in bufs], coef, 0.3, seeds[b:b + 1],
                         int(steps[b]) & 0xFFFFFFFF, mask=mask[b:b + 1].clone(), mask_coef=mcoef)
        assert torch.equal(alone[0], outs[0][b])


# ---------------------------------------------------------------------------------------
# validation: ValueError naming the argument, before anything runs
# ---------------------------------------------------------------------------------------


def _ok():
    return torch.zeros(2, 5), [torch.randn(2, 5), torch.randn(2, 5)]


@pytest.mark.parametrize("call,msg", [
    (lambda o, b: cpp.fused_update(o, [], [1.0]), "bufs must be a non-empty list"),
    (lambda o, b: cpp.fused_update(o, [b[0]] * 9, [1.0] * 9), "at most 8"),
    (lambda o, b: cpp.fused_update(o, [b[0], b[1][:, :3]], [1.0, 1.0]), r"bufs\[1\] has shape"),
    (lambda o, b: cpp.fused_update(o, [b[0], b[1].int()], [1.0, 1.0]), r"bufs\[1\] has unsupp"),
    (lambda o, b: cpp.fused_update(o, [b[0], "x"], [1.0, 1.0]), r"bufs\[1\] must be a tensor"),
    (lambda o, b: cpp.fused_update(o[:, :2], b, [1.0, 1.0]), "out has shape"),
    (lambda o, b: cpp.fused_update(o.int(), b, [1.0, 1.0]), "out has unsupported dtype"),
    (lambda o, b: cpp.fused_update(o, b, [1.0]), "coef has 1 entries for 2 buffers"),
    (lambda o, b: cpp.fused_update(o, b, torch.ones(3, 2)), r"coef must be \[K\]"),
    (lambda o, b: cpp.fused_update(o, b, [1.0, 1.0], 0.5), "seeds"),
    (lambda o, b: cpp.fused_update(o, b, [1.0, 1.0], 0.5, seeds_tensor(1, 3), 0), "seeds must"),
    (lambda o, b: cpp.fused_update(o, b, [1.0, 1.0], torch.ones(3)), "noise_coef must"),
    (lambda o, b: cpp.fused_update(o, b, [1.0, 1.0], 0.5, noise=torch.randn(2, 4)),
     "noise has shape"),
    (lambda o, b: cpp.fused_update(o, b, [1.0, 1.0], aux_out=torch.empty(2, 5)),
     "aux_out and aux_coef"),
    (lambda o, b: cpp.fused_update(o, b, [1.0, 1.0], aux_out=o, aux_coef=[1.0, 1.0]),
     "aux_out must be a different tensor"),
    (lambda o, b: cpp.fused_update(o, b, [1.0, 1.0], aux_out=torch.empty(2, 5),
                                   aux_coef=[1.0]), "aux_coef has 1 entries"),
    (lambda o, b: cpp.fused_update(o, b, [1.0, 1.0], compute_dtype=torch.float16),
     "compute_dtype"),
    (lambda o, b: cpp.fused_update(o, [torch.tensor(1.0)], [1.0]), "0-dim"),
])
def test_validation_names_the_argument(call, msg):
    out, bufs = _ok()
    keep = out.clone()
    with pytest.raises(ValueError, match=msg):
        call(out, bufs)
    assert torch.equal(out, keep)


def test_native_layer_validates_too():
    """The launcher checks what reaches it directly (the bindings are public)."""
    x = torch.randn(2, 5)
    args = [x.data_ptr(), 0, 0, 0, [x.data_ptr()], [0], 2, 5, [1.0], 0, [], 0, 0, 0.0, 0, 0, 0,
            0, 0, 0, 0, 0, [], 0, False, 1]
    bad = list(args)
    bad[1] = 9
    with pytest.raises(ValueError, match="out has unknown dtype code 9"):
        _C.fused_update_cpu(*bad)
    bad = list(args)
    bad[12] = 1                     # Philox noise without seeds
    with pytest.raises(ValueError, match="seeds is a null pointer"):
        _C.fused_update_cpu(*bad)
    bad = list(args)
    bad[4], bad[5], bad[8] = [x.data_ptr()] * 9, [0] * 9, [1.0] * 9
    with pytest.raises(ValueError, match="1 to 8"):
        _C.fused_update_cpu(*bad)
    bad = list(args)
    bad[20], bad[22] = x.data_ptr(), [1.0]       # a mask that is out itself
    with pytest.raises(ValueError, match="out overlaps mask"):
        _C.fused_update_cpu(*bad)
    bad[22] = [1.0, 2.0]
    with pytest.raises(ValueError, match="mask_coef has 2 entries"):
        _C.fused_update_cpu(*bad)
    with pytest.raises(ValueError, match="cpu isa must be one of"):
        _C.set_cpu_isa("sse9")


def test_registry_defaults_to_cpp_on_cpu(monkeypatch):
    from pyengine import backends

    monkeypatch.delenv("PYENGINE_BACKEND", raising=False)
    assert "cpp" in backends.available()
    assert backends.get().name == "cpp"
    assert backends.get(device="cpu").name == "cpp"
    assert backends.get("torch").name == "torch"
    monkeypatch.setenv("PYENGINE_BACKEND", "torch")
    assert backends.get().name == "torch"
    reasons = backends.explain("cpu")
    assert reasons["cpp"] is None and reasons["torch"] is None and reasons["cuda"]


# ---------------------------------------------------------------------------------------
# the torch.library op: the same kernel, visible to torch.compile
# ---------------------------------------------------------------------------------------


def test_library_op_matches_the_direct_call():
    from pyengine import ops

    g = torch.Generator().manual_seed(12)
    bufs = _bufs(3, (4, 2, 33), torch.float32, g)
    coef = torch.randn(4, 3, generator=g, dtype=torch.float64)
    nc = torch.rand(4, generator=g, dtype=torch.float64)
    seeds = seeds_tensor(8, 4)
    want, want_aux = torch.empty(4, 2, 33), torch.empty(4, 2, 33)
    cpp.fused_update(want, bufs, coef, nc, seeds, 6, want_aux, [1.0, 0.0, -1.0])
    got, got_aux = torch.empty(4, 2, 33), torch.empty(4, 2, 33)
    assert ops.fused_update(got, bufs, coef, nc, seeds, 6, got_aux, [1.0, 0.0, -1.0]) is got
    assert torch.equal(got, want) and torch.equal(got_aux, want_aux)
    keep = bufs[1].clone()
    ops.fused_update(bufs[1], bufs, [0.5, 0.5, 0.5])        # in place through the op
    torch.testing.assert_close(bufs[1], 0.5 * (bufs[0] + keep + bufs[2]))


def test_library_op_opcheck():
    x, e = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    coef = torch.tensor([0.9, 0.1], dtype=torch.float64)
    torch.library.opcheck(torch.ops.pyengine.fused_update.default,
                          (torch.empty(2, 3, 8), [x, e], coef, 0.25, None, seeds_tensor(1, 2), 3,
                           torch.empty(2, 3, 8), coef, None, None))


def test_library_op_under_torch_compile():
    from pyengine import ops

    def step(out, x, eps):
        denoised = x - 0.5 * eps                    # traced torch ops around the kernel
        ops.fused_update(out, [x, denoised], np.array([0.25, 0.75]))
        return out * 2

    x, eps = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(torch.empty(3, 4, 16), x, eps)
    torch.testing.assert_close(got, 2 * (0.25 * x + 0.75 * (x - 0.5 * eps)))


def test_library_op_fake_checks_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out, x = torch.empty(2, 5), torch.empty(2, 5)
        torch.ops.pyengine.fused_update(out, [x], torch.ones(1, dtype=torch.float64), 0.0,
                                        None, None, -1, None, None, None, None)
        with pytest.raises(ValueError, match=r"bufs\[0\] has shape"):
            torch.ops.pyengine.fused_update(out, [torch.empty(2, 4)],
                                            torch.ones(1, dtype=torch.float64), 0.0, None,
                                            None, -1, None, None, None, None)


def test_registry_falls_back_to_torch_without_the_extension(monkeypatch):
    from pyengine import backends

    monkeypatch.delenv("PYENGINE_BACKEND", raising=False)
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "IMPORT_ERROR", "pyengine._C is not built (test)")
    # the next CPU backend in priority takes over: numba where it is installed, else torch
    assert backends.get().name == ("numba" if "numba" in backends.available() else "torch")
    assert "cpp" not in backends.available()
    assert "not built" in backends.explain()["cpp"]
    with pytest.raises(ValueError, match="backend 'cpp' cannot run: pyengine._C is not built"):
        backends.get("cpp")
    with pytest.raises(RuntimeError, match="cpp backend is unavailable"):
        cpp.fused_update(torch.empty(1, 2), [torch.randn(1, 2)], [1.0])
