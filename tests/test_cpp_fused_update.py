"""The C++ CPU fused update (backend "cpp"): what only this backend has.

The cases every backend shares (arithmetic, shapes, aliasing, noise, masks, validation,
overlaps, random calls) run in tests/test_fused_update.py on both CPU kernel builds. Here:
float16/bfloat16 rounding bit for bit, the Philox words and normals of the C++ header, thread
counts, the named argument struct the bindings take, the registry's defaults and the
torch.library op.

Every kernel test runs on each CPU kernel build this machine has (baseline x86-64, and
AVX2/FMA/F16C where the CPU has them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyengine.backends import cpp
from pyengine.fused_update import native
from pyengine.noise import philox4x32, philox_normal, sample_seed, seeds_tensor

if native._C is None:
    pytest.skip(f"the C++ extension is not built: {native.IMPORT_ERROR}",
                allow_module_level=True)
_C = native._C

ISAS = _C.cpu_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    prev = _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(prev)


def _bufs(K, shape, dtype, g):
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(K)]


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
    still bitwise each sample alone at its own step; tests/test_fused_update.py checks
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


def _struct(x):
    """A valid one-buffer update x -> x (in place) as the named struct."""
    a = _C.FusedUpdateArgs()
    a.out, a.out_dtype = x.data_ptr(), _C.DTYPE_CODES["float32"]
    a.bufs, a.buf_dtypes, a.coef = [x.data_ptr()], [_C.DTYPE_CODES["float32"]], [2.0]
    a.batch, a.numel = x.shape[0], x.shape[1]
    return a


def test_native_struct_is_set_by_name_and_validated():
    """The bindings take one FusedUpdateArgs whose fields are set by name (a misspelt field
    is an AttributeError, not a silently shifted argument); the launcher checks what reaches
    it directly (the bindings are public)."""
    x = torch.randn(2, 5)
    keep = x.clone()
    a = _struct(x)
    assert a.K == 1 and a.coef == [2.0] and a.bufs == [x.data_ptr()]
    _C.fused_update_cpu(a, 1)
    torch.testing.assert_close(x, 2 * keep)
    with pytest.raises(AttributeError):
        a.coefs = [1.0]
    bad = _struct(x)
    bad.out_dtype = 9
    with pytest.raises(ValueError, match="out has unknown dtype code 9"):
        _C.fused_update_cpu(bad, 1)
    bad = _struct(x)
    bad.noise_mode = _C.NOISE_MODES["philox"]           # Philox noise without seeds
    with pytest.raises(ValueError, match="seeds is a null pointer"):
        _C.fused_update_cpu(bad, 1)
    with pytest.raises(ValueError, match="1 to 8"):
        bad.bufs = [x.data_ptr()] * 9
    with pytest.raises(ValueError, match="at most 8"):
        bad.coef = [1.0] * 9
    bad = _struct(x)
    bad.coef = [1.0, 2.0]
    with pytest.raises(ValueError, match="coef has 2 entries for 1 buffers"):
        _C.fused_update_cpu(bad, 1)
    bad = _struct(x)
    bad.mask, bad.mask_coef = x.data_ptr(), [1.0]        # a mask that is out itself
    with pytest.raises(ValueError, match="out overlaps mask"):
        _C.fused_update_cpu(bad, 1)
    bad.mask_coef = [1.0, 2.0]
    with pytest.raises(ValueError, match="mask_coef has 2 entries"):
        _C.fused_update_cpu(bad, 1)
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
        with pytest.raises(ValueError, match=r"out has shape"):
            torch.ops.pyengine.fused_update(out, [torch.empty(2, 4)],
                                            torch.ones(1, dtype=torch.float64), 0.0, None,
                                            None, -1, None, None, None, None)


def test_registry_falls_back_to_torch_without_the_extension(monkeypatch):
    from pyengine import backends

    monkeypatch.delenv("PYENGINE_BACKEND", raising=False)
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "IMPORT_ERROR", "pyengine._C is not built (test)")
    # the next CPU backend in priority takes over: numba where it is installed, else torch
    assert backends.get().name == ("numba" if "numba" in backends.available() else "torch")
    assert "cpp" not in backends.available()
    assert "not built" in backends.explain()["cpp"]
    with pytest.raises(ValueError, match="backend 'cpp' cannot run: pyengine._C is not built"):
        backends.get("cpp")
    with pytest.raises(RuntimeError, match="cpp backend is unavailable"):
        cpp.fused_update(torch.empty(1, 2), [torch.randn(1, 2)], [1.0])


def test_library_op_takes_steps_and_mask():
    from pyengine import ops

    g = torch.Generator().manual_seed(4)
    bufs = _bufs(3, (4, 2, 33), torch.float32, g)
    coef = torch.randn(4, 3, generator=g, dtype=torch.float64)
    mcoef = np.array([0.0, 0.5, 1.0])
    mask = torch.rand((4, 2, 33), generator=g)
    nc = torch.rand(4, generator=g, dtype=torch.float64)
    seeds, steps = seeds_tensor(8, 4), torch.tensor([3, 1, 4, 1], dtype=torch.int64)
    want, got = torch.empty(4, 2, 33), torch.empty(4, 2, 33)
    cpp.fused_update(want, bufs, coef, nc, seeds, steps, mask=mask, mask_coef=mcoef)
    assert ops.fused_update(got, bufs, coef, nc, seeds, steps, mask=mask,
                            mask_coef=mcoef) is got
    assert torch.equal(got, want)
    torch.library.opcheck(
        torch.ops.pyengine.fused_update.default,
        (torch.empty(4, 2, 33), bufs, coef, 0.0, nc, seeds, -1, None, None, None, None,
         steps, mask, torch.from_numpy(mcoef)),
        test_utils=("test_schema", "test_faketensor"))


def test_library_op_validates_devices_like_the_direct_call():
    """Issue 13 #12: an ``out`` on the meta device went through the op's fake
    implementation and returned silently; it is refused, naming the argument, as by
    cpp.fused_update. The fake implementation runs the contract's one validator."""
    from pyengine import ops

    x = torch.randn(2, 5)
    meta = torch.empty(2, 5, device="meta")
    for call in (lambda: ops.fused_update(meta, [x], np.array([1.0])),
                 lambda: torch.ops.pyengine.fused_update(
                     meta, [x], torch.ones(1, dtype=torch.float64), 0.0, None, None, -1, None,
                     None, None, None),
                 lambda: cpp.fused_update(meta, [x], np.array([1.0]))):
        with pytest.raises(ValueError, match="out is on meta"):
            call()
    with pytest.raises(ValueError, match="bufs.0. is on meta"):
        ops.fused_update(meta, [meta], np.array([1.0]))
    with pytest.raises(ValueError, match="aux_out and aux_coef"):
        ops.fused_update(torch.empty(2, 5), [x], np.array([1.0]), aux_out=torch.empty(2, 5))
