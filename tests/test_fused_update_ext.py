"""Two optional features of the fused-update contract, on every backend.

* Per-sample draw numbers: ``step`` an int64 [B] tensor keys sample b's Philox stream by
  (seeds[b], step[b]) -- bit for bit the update of that sample alone at its scalar step, so
  a batch mixing requests at different steps of their plans runs one update.
* The inpainting blend: ``mask`` (any float dtype) and ``mask_coef`` ([K] or [B, K]) give
  out = m * res + (1 - m) * sum_k mask_coef_k * bufs_k in the same pass (aux unmasked).

Tolerance (STYLE habit 5, as in the per-backend files): a backend's error against the float64
reference (tests/reference.py) is at most twice plain torch's own error at the same dtype (the
torch backend on the same inputs), or one rounding of the terms where torch is exact. Noisy
updates feed the backend's own normals to both (out = 0 x + 1 z, per-sample steps included);
those normals are checked against pyengine.noise to 1e-6.

Backends: torch, cpp and numba on CPU; cuda and triton on a GPU (skipped without one); triton
on CPU under TRITON_INTERPRET=1 in a child process (the variable must be set before triton
is imported and must not leak into other test modules), on fewer cases: the interpreter is
slow and has no half types.
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

from pyengine import backends
from pyengine.backends import dispatch, torch_ref
from pyengine.noise import philox_normal, seeds_tensor

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

if INTERPRETED:
    BACKENDS = [("triton", "cpu")]
else:
    BACKENDS = [("torch", "cpu"), ("cpp", "cpu"), ("numba", "cpu"), ("cuda", "cuda"),
                ("triton", "cuda")]


def _module(name, device):
    """The backend module, or a skip saying why it cannot run on ``device``."""
    why = dispatch.unavailable_reason(name, device)
    if why is not None:
        pytest.skip(f"{name} on {device}: {why}")
    return dispatch.resolve(dispatch.REGISTRY[name])


def _dtypes(name, device):
    if name == "numba" or (name == "triton" and device == "cpu"):
        return ALL_DTYPES[:2]                     # numpy views / the interpreter: no half types
    return ALL_DTYPES


def _ks(name, device):
    """Every K where a call is cheap; a few where each K is a compile (numba, ~2 s)."""
    if name == "numba":
        return (2, 7)
    return tuple(range(1, 9))


def _cases(per):
    out = []
    for name, device in BACKENDS:
        out += [(name, device, *rest) for rest in per(name, device)]
    return out


def _bufs(K, shape, dtype, g, device):
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
            for _ in range(K)]


def _coef(kind, B, K, g, device):
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
    v = torch.randint(-(2 ** 63), 2 ** 63 - 1, (B,), generator=g, dtype=torch.int64)
    return v.to(device)


def kernel_normals(be, seeds, step, shape, device):
    """The backend's own normals for these seeds and step(s): out = 0 x + 1 z."""
    z = torch.empty(shape, device=device)
    be.fused_update(z, [torch.ones(shape, device=device)], np.array([0.0]), 1.0, seeds, step)
    return z


def _scale(bufs, coef, nc=0.0, noise=None):
    """The size of the terms: sum_k |c_k| max |buf_k| (+ |c_z| max |z|)."""
    c = torch.as_tensor(coef, dtype=torch.float64).abs().cpu()
    c = c.max(0).values if c.dim() == 2 else c
    s = sum(float(c[k]) * b.double().abs().max().item() for k, b in enumerate(bufs))
    if noise is not None:
        ncm = nc.abs().max().item() if isinstance(nc, torch.Tensor) else abs(nc)
        s += ncm * noise.double().abs().max().item()
    return s


def check(be, bufs, coef, nc=0.0, seeds=None, step=-1, aux_coef=None, mask=None,
          mask_coef=None, out_alias=None):
    """Run ``be`` and torch on the same inputs; ``be``'s error <= 2x torch's (see top)."""
    shape, dtype, device = bufs[0].shape, bufs[0].dtype, bufs[0].device
    ref_in = [b.clone() for b in bufs]
    z = None
    if isinstance(nc, torch.Tensor) or nc != 0.0:
        z = kernel_normals(be, seeds, step, shape, device)
    ref, ref_aux = fused_update_reference(ref_in, coef, nc, seeds, step, aux_coef, z, mask,
                                          mask_coef)
    t_out = torch.empty(shape, dtype=dtype, device=device)
    t_aux = torch.empty_like(t_out) if aux_coef is not None else None
    torch_ref.fused_update(t_out, [b.clone() for b in ref_in], coef, nc, seeds, step, t_aux,
                           aux_coef, noise=z, mask=mask, mask_coef=mask_coef)
    out = bufs[out_alias] if out_alias is not None else torch.empty_like(t_out)
    aux = torch.empty_like(t_out) if aux_coef is not None else None
    res = be.fused_update(out, bufs, coef, nc, seeds, step, aux, aux_coef, mask=mask,
                          mask_coef=mask_coef)
    assert res is out and out.dtype == dtype and out.shape == shape
    eps = torch.finfo(dtype).eps
    scale = _scale(ref_in, coef, nc, z) + (_scale(ref_in, mask_coef) if mask is not None else 0)
    for got, want, mine in ((out, ref, t_out), (aux, ref_aux, t_aux)):
        if got is None:
            continue
        err = (got.double() - want).abs().max().item()
        torch_err = (mine.double() - want).abs().max().item()
        assert err <= max(2 * torch_err, eps * scale), (err, torch_err, eps * scale)
    return out, aux


# ---------------------------------------------------------------------------------------
# per-sample draw numbers
# ---------------------------------------------------------------------------------------


def _step_cases(name, device):
    if name == "triton" and device == "cpu":     # the interpreter: ~1 s a case
        return [(torch.float32, "per_step"), (torch.float64, "per_sample")]
    return [(dt, kind) for dt in _dtypes(name, device)[:2] for kind in ("per_step", "per_sample")]


@pytest.mark.parametrize("name,device,dtype,kind", _cases(_step_cases),
                         ids=lambda p: str(p).replace("torch.", ""))
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
def test_per_sample_normals_match_the_reference(name, device):
    be = _module(name, device)
    seeds = seeds_tensor([0, 2 ** 64 - 1, 12345, 7], 4).to(device)
    steps = torch.tensor([0, 2 ** 32 - 1, 5, 2 ** 40 + 9], dtype=torch.int64, device=device)
    z = kernel_normals(be, seeds, steps, (4, 1031), device)
    torch.testing.assert_close(z.cpu(), philox_normal(seeds.cpu(), steps.cpu(), 1031), rtol=0,
                               atol=1e-6)
    assert not torch.equal(z[0], z[2])               # the steps do change the stream


# ---------------------------------------------------------------------------------------
# the inpainting mask
# ---------------------------------------------------------------------------------------


def _mask_cases(name, device):
    if name == "triton" and device == "cpu":     # the interpreter: ~0.5 s a case
        return [(torch.float32, 1, "binary"), (torch.float32, 4, "uniform"),
                (torch.float64, 8, "uniform")]
    return [(dt, K, mk) for dt in _dtypes(name, device) for K in _ks(name, device)
            for mk in ("uniform", "binary")]


@pytest.mark.parametrize("name,device,dtype,K,mask_kind", _cases(_mask_cases),
                         ids=lambda p: str(p).replace("torch.", ""))
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
    other = "meta" if device == "cpu" else "cpu"
    shape = (2, 5)

    def m(**kw):
        return kw

    return [
        ("mask_only", lambda o, b: m(mask=torch.rand(shape, device=device)),
         "mask and mask_coef"),
        ("mask_coef_only", lambda o, b: m(mask_coef=[1.0, 0.0]), "mask and mask_coef"),
        ("mask_shape", lambda o, b: m(mask=torch.rand(2, 4, device=device),
                                      mask_coef=[1.0, 0.0]), "mask has shape"),
        ("mask_dtype", lambda o, b: m(mask=torch.ones(shape, dtype=torch.int32, device=device),
                                      mask_coef=[1.0, 0.0]), "mask has unsupported dtype"),
        ("mask_device", lambda o, b: m(mask=torch.rand(shape, device=other),
                                       mask_coef=[1.0, 0.0]), "mask is on"),
        ("mask_is_out", lambda o, b: m(mask=o, mask_coef=[1.0, 0.0]),
         "mask shares memory with out"),
        ("mask_view_of_out", lambda o, b: m(mask=o.view(5, 2).t(), mask_coef=[1.0, 0.0]),
         "mask shares memory with out"),
        ("mask_coef_len", lambda o, b: m(mask=torch.rand(shape, device=device), mask_coef=[1.0]),
         "mask_coef has 1 entries"),
        ("mask_coef_shape", lambda o, b: m(mask=torch.rand(shape, device=device),
                                           mask_coef=torch.ones(3, 2, dtype=torch.float64)),
         r"mask_coef must be \[K\]"),
        ("step_dtype", lambda o, b: m(step=torch.ones(2, dtype=torch.int32, device=device)),
         "step must be"),
        ("step_shape", lambda o, b: m(step=torch.ones(3, dtype=torch.int64, device=device)),
         "step must be"),
        ("step_2d", lambda o, b: m(step=torch.ones(2, 1, dtype=torch.int64, device=device)),
         "step must be"),
    ]


@pytest.mark.parametrize("name,device", BACKENDS)
def test_validation_names_the_argument(name, device):
    be = _module(name, device)
    for label, make, msg in _bad_calls(device):
        g = torch.Generator().manual_seed(1)
        out = torch.randn(2, 5, generator=g).to(device)
        bufs = [torch.randn(2, 5, generator=g).to(device) for _ in range(2)]
        keep = [out.clone()] + [b.clone() for b in bufs]
        kw = make(out, bufs)
        mask = kw.get("mask")
        mask_keep = mask.clone() if isinstance(mask, torch.Tensor) and \
            mask.device.type != "meta" else None
        step = kw.pop("step", 3)
        with pytest.raises(ValueError, match=msg):
            be.fused_update(out, bufs, np.array([0.5, 0.5]), 0.3,
                            seeds_tensor(1, 2).to(device), step, **kw)
        for got, want in zip([out, *bufs], keep):
            assert torch.equal(got, want), label
        if mask_keep is not None:
            assert torch.equal(mask, mask_keep), label


# ---------------------------------------------------------------------------------------
# the layers above the backends: the dispatcher and the torch.library op
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,device", BACKENDS)
def test_dispatcher_passes_both_features_through(name, device):
    be = _module(name, device)
    g = torch.Generator().manual_seed(2)
    bufs = _bufs(3, (4, 37), torch.float32, g, device)
    coef, mcoef = np.array([0.5, -1.0, 0.25]), np.array([0.0, 1.0, 0.5])
    mask = torch.rand((4, 37), generator=g).to(device)
    steps = torch.tensor([4, 9, 0, 1], dtype=torch.int64, device=device)
    seeds = seeds_tensor(5, 4).to(device)
    want, got = torch.empty_like(bufs[0]), torch.empty_like(bufs[0])
    be.fused_update(want, bufs, coef, 0.2, seeds, steps, mask=mask, mask_coef=mcoef)
    backends.fused_update(got, bufs, coef, 0.2, seeds, steps, mask=mask, mask_coef=mcoef,
                          backend=name)
    assert torch.equal(got, want)


if not INTERPRETED:
    def test_library_op_takes_steps_and_mask():
        from pyengine import ops
        from pyengine.backends import cpp

        if cpp.unavailable_reason("cpu") is not None:
            pytest.skip(cpp.unavailable_reason("cpu"))
        g = torch.Generator().manual_seed(4)
        bufs = _bufs(3, (4, 2, 33), torch.float32, g, "cpu")
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

    def test_triton_under_the_interpreter():
        """This file's triton cases, on CPU tensors, in a child with TRITON_INTERPRET=1."""
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-x", str(Path(__file__))], env=env, capture_output=True, text=True,
                           cwd=Path(__file__).parent.parent, timeout=600, check=False)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout
