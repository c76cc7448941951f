"""Counter-based noise: Philox-4x32-10 known answers, Box-Muller, statistics, batch invariance.

The known-answer vectors are Random123's kat_vectors for philox4x32_10. A second, plain
Python-int Philox (written from Salmon et al. 2011, Figure 2) checks the torch int64 version
on random counters and keys, and the normals are recomputed from the words in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyengine import noise as N

M32 = 0xFFFFFFFF

KAT = [  # (counter c0..c3, key k0 k1) -> words, Random123 kat_vectors, philox4x32 10 rounds
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_py(ctr, key, rounds=10):
    """Philox-4x32 on Python ints: the round is (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1,
    lo(A c0)) with A = 0xD2511F53, B = 0xCD9E8D57 and the Weyl key schedule."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


def _t(v):
    return torch.tensor(v, dtype=torch.int64)


@pytest.mark.parametrize("ctr,key,want", KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(ctr, key, want):
    assert philox_py(ctr, key) == want
    got = N.philox4x32(*[_t(c) for c in ctr], *[_t(k) for k in key])
    assert tuple(int(w) for w in got) == want


def test_philox_torch_matches_python_on_random_inputs():
    g = np.random.default_rng(11)
    ctr = g.integers(0, 2 ** 32, size=(4, 257), dtype=np.uint64).astype(np.int64)
    key = g.integers(0, 2 ** 32, size=(2, 257), dtype=np.uint64).astype(np.int64)
    got = N.philox4x32(*[torch.from_numpy(c) for c in ctr], *[torch.from_numpy(k) for k in key])
    got = torch.stack(got).numpy()
    for j in range(257):
        want = philox_py(tuple(int(c) for c in ctr[:, j]), tuple(int(k) for k in key[:, j]))
        assert tuple(int(w) for w in got[:, j]) == want
    assert got.min() >= 0 and got.max() <= M32


def _normals_reference(seed64, step, numel):
    """The normals of one sample, from the documented recipe, in float64."""
    k = (seed64 & M32, seed64 >> 32)
    out = []
    for q in range((numel + 3) // 4):
        w = philox_py((q & M32, q >> 32, step & M32, 0), k)
        u = [((wk >> 8) + 0.5) * 2.0 ** -24 for wk in w]
        r01, r23 = math.sqrt(-2 * math.log(u[0])), math.sqrt(-2 * math.log(u[2]))
        out += [r01 * math.cos(2 * math.pi * u[1]), r01 * math.sin(2 * math.pi * u[1]),
                r23 * math.cos(2 * math.pi * u[3]), r23 * math.sin(2 * math.pi * u[3])]
    return np.array(out[:numel])


@pytest.mark.parametrize("seed64,step,numel", [(0, 0, 11), (12345, 3, 64), (2 ** 64 - 1, 7, 9),
                                               (N.sample_seed(5, 2), 2 ** 32 - 1, 6)])
def test_box_muller_recipe(seed64, step, numel):
    z = N.philox_normal(N.seeds_tensor([seed64], 1), step, numel)
    assert z.shape == (1, numel) and z.dtype == torch.float32
    # float32 log/cos against float64: a few ulp of values up to ~6
    np.testing.assert_allclose(z[0].double().numpy(), _normals_reference(seed64, step, numel),
                               rtol=0, atol=5e-6)


def test_normal_statistics():
    from scipy import stats

    B, n = 4, 1 << 15
    z = N.philox_normal(N.seeds_tensor(2024, B), 0, n, dtype=torch.float64).numpy()
    flat = z.reshape(-1)
    m = flat.size
    assert abs(flat.mean()) < 5 / math.sqrt(m)
    assert abs(flat.var() - 1) < 5 * math.sqrt(2 / m)
    assert abs(stats.skew(flat)) < 5 * math.sqrt(6 / m)
    assert abs(stats.kurtosis(flat)) < 5 * math.sqrt(24 / m)
    assert stats.kstest(flat, "norm").pvalue > 1e-4
    assert np.isfinite(flat).all() and np.abs(flat).max() < 5.9   # u >= 2^-25 bounds |z|
    # independence: within a Box-Muller quadruple, across elements, samples and draws
    tol = 5 / math.sqrt(n)
    for lag in (1, 2, 3, 4, 5):
        for row in z:
            assert abs(np.corrcoef(row[:-lag], row[lag:])[0, 1]) < tol
            sq = row ** 2
            assert abs(np.corrcoef(sq[:-lag], sq[lag:])[0, 1]) < tol
    c = np.corrcoef(z)
    assert np.abs(c[~np.eye(B, dtype=bool)]).max() < tol
    z2 = N.philox_normal(N.seeds_tensor(2024, B), 1, n, dtype=torch.float64).numpy()
    for a, b in zip(z, z2):
        assert abs(np.corrcoef(a, b)[0, 1]) < tol
    # consecutive batch seeds and consecutive sample seeds are unrelated
    z3 = N.philox_normal(N.seeds_tensor(2025, B), 0, n, dtype=torch.float64).numpy()
    for a, b in zip(z, z3):
        assert abs(np.corrcoef(a, b)[0, 1]) < tol


def test_batch_invariance():
    """A sample's noise depends only on its own seed: not on batch size, position, or numel."""
    S, step, numel = 77, 5, 37
    batch = N.philox_normal(N.seeds_tensor(S, 6), step, numel)
    for i in range(6):
        alone = N.philox_normal(N.seeds_tensor([N.sample_seed(S, i)], 1), step, numel)
        assert torch.equal(alone[0], batch[i])
    seeds = [N.sample_seed(S, i) for i in (4, 0, 5)]
    shuffled = N.philox_normal(N.seeds_tensor(seeds, 3), step, numel)
    assert torch.equal(shuffled, batch[[4, 0, 5]])
    longer = N.philox_normal(N.seeds_tensor(S, 6), step, numel + 50)
    assert torch.equal(longer[:, :numel], batch)
    assert not torch.equal(N.philox_normal(N.seeds_tensor(S, 6), step + 1, numel), batch)
    assert not torch.equal(N.philox_normal(N.seeds_tensor(S + 1, 6), step, numel), batch)
    f64 = N.philox_normal(N.seeds_tensor(S, 6), step, numel, dtype=torch.float64)
    assert f64.dtype == torch.float64 and torch.equal(f64.float(), batch)


def test_seed_mapping():
    assert N.sample_seed(5, 0) == 5
    assert N.sample_seed(5, 3) == 5 + (3 << 32)
    assert N.seeds_tensor(9, 3).tolist() == [N.sample_seed(9, i) for i in range(3)]
    # uint64 seeds are carried as their two's-complement int64 bits
    assert N.seeds_tensor([2 ** 64 - 1, 2 ** 63, 1], 3).tolist() == [-1, -(2 ** 63), 1]
    assert N.seeds_tensor(torch.tensor([3, 4]), 2).tolist() == [3, 4]
    assert N.seeds_tensor((3, 4), 2).dtype == torch.int64


@pytest.mark.parametrize("seed,batch,msg", [
    (-1, 2, r"\[0, 2\*\*32\)"),
    (2 ** 32, 2, r"\[0, 2\*\*32\)"),
    (True, 2, "seed must be an int"),
    (None, 2, "seed must be an int"),
    (1.5, 2, "seed must be an int"),
    ("12", 2, "seed must be an int or a sequence of ints"),
    ([1, 2], 3, "2 per-sample seeds but the batch has 3"),
    ([2 ** 64], 1, r"\[0, 2\*\*64\)"),
    ([-1], 1, r"\[0, 2\*\*64\)"),
])
def test_seed_validation(seed, batch, msg):
    with pytest.raises(ValueError, match=msg):
        N.seeds_tensor(seed, batch)


def test_per_sample_steps_are_each_samples_own_draw():
    """A [B] step tensor gives row b the normals of sample b alone at step[b] (low 32 bits);
    a [1] tensor is the int step for the whole batch."""
    seeds = N.seeds_tensor([5, 2 ** 64 - 1, 77], 3)
    steps = torch.tensor([0, 2 ** 32 - 1, 2 ** 32 + 7], dtype=torch.int64)
    z = N.philox_normal(seeds, steps, 37)
    for b in range(3):
        alone = N.philox_normal(seeds[b:b + 1], int(steps[b]) & M32, 37)
        assert torch.equal(z[b], alone[0])
    one = torch.tensor([9], dtype=torch.int64)
    assert torch.equal(N.philox_normal(seeds, one, 37), N.philox_normal(seeds, 9, 37))
    for bad in (steps.int(), steps[:2], steps.view(3, 1)):
        with pytest.raises(ValueError, match="step must be"):
            N.philox_normal(seeds, bad, 37)


# ---- the float32 normal transform: its definition, accuracy and bitwise agreement -------------

F32 = np.float32


def _box_muller_numpy(u, v):
    """pyengine.noise's documented transform, restated on numpy float32 scalars arrays (numpy
    rounds every float32 +, -, * and sqrt on its own, as the contract asks)."""
    u, v = np.asarray(u, F32), np.asarray(v, F32)
    i = u.view(np.int32).astype(np.int64) - 0x3F3504F3
    e = (i >> 23).astype(F32)
    m = ((i & 0x7FFFFF) + 0x3F3504F3).astype(np.int32).view(F32)
    f = m - F32(1)
    p = F32(N.LOG_COEFS[8])
    for c in N.LOG_COEFS[7::-1]:
        p = p * f + F32(c)
    lg = e * F32(N.LN2_HI) + (e * F32(N.LN2_LO) + (f + (f * f) * p))
    r = np.sqrt(F32(-2) * lg)
    n = (v * F32(4) + F32(0.5)).astype(np.int32)
    y = v - n.astype(F32) * F32(0.25)
    t = y * y
    s = F32(N.SIN_COEFS[3])
    c = F32(N.COS_COEFS[3])
    for k in (2, 1, 0):
        s = s * t + F32(N.SIN_COEFS[k])
        c = c * t + F32(N.COS_COEFS[k])
    s = y * s
    c = F32(1) + t * c
    odd = (n & 1) == 1
    cq, sq = np.where(odd, s, c), np.where(odd, c, s)
    cq = np.where(((n + 1) & 2) != 0, -cq, cq)
    sq = np.where((n & 2) != 0, -sq, sq)
    return r * cq, r * sq


def _edge_and_random_uniforms(g, n):
    """float32 uniforms as the words give them: the extremes, quadrant boundaries of the
    angle, the rounding of (w >> 8) + 0.5 above 2^23, and random words."""
    a = [0, 1, 2, (1 << 22) - 1, 1 << 22, (1 << 22) + 1, (1 << 23) - 1, 1 << 23, (1 << 23) + 1,
         3 << 21, (3 << 21) - 1, (3 << 22) + 1, (1 << 24) - 2, (1 << 24) - 1, 0x3504F3, 0xB504F3]
    a = torch.tensor(a + g.integers(0, 1 << 24, size=n).tolist(), dtype=torch.int64)
    return N.uniform24(a << 8)


def test_box_muller_is_the_documented_sequence():
    """The torch definition equals an independent numpy statement of the docstring's steps,
    bit for bit, on edge and random uniforms."""
    g = np.random.default_rng()
    u = _edge_and_random_uniforms(g, 50000)
    v = u[torch.from_numpy(g.permutation(u.numel()))]
    z0, z1 = N.box_muller(u, v)
    w0, w1 = _box_muller_numpy(u.numpy(), v.numpy())
    assert torch.equal(z0, torch.from_numpy(w0)) and torch.equal(z1, torch.from_numpy(w1))
    assert z0.dtype == z1.dtype == torch.float32
    with pytest.raises(ValueError, match="float32 uniforms"):
        N.box_muller(u.double(), v)


def test_box_muller_accuracy_over_every_uniform():
    """Over all 2^24 uniforms of each kind, against float64 log, sqrt, cos, sin of the same
    float32 uniforms: radius within 3.6e-7, cos and sin within 8.8e-8; so each normal is
    within 1.2e-6 of the float64 Box-Muller (checked on random pairs too)."""
    u = N.uniform24(torch.arange(1 << 24, dtype=torch.int64) << 8)
    ud = u.double()
    r = torch.sqrt((-2.0 * N.log_unit(u)).double()).float()
    err_r = (r.double() - torch.sqrt(-2.0 * torch.log(ud))).abs().max().item()
    c, s = N.sincos_turn(u)
    th = 2 * math.pi * ud
    err_cs = max((c.double() - torch.cos(th)).abs().max().item(),
                 (s.double() - torch.sin(th)).abs().max().item())
    assert 0 < err_r <= 3.6e-7 and 0 < err_cs <= 8.8e-8
    # |c|, |s| <= 1 holds, so |z| stays below the largest radius, sqrt(2 * 25 log 2)
    assert c.abs().max() <= 1 and s.abs().max() <= 1
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    uu = u[torch.randint(0, 1 << 24, (1 << 20,), generator=g)]
    vv = u[torch.randint(0, 1 << 24, (1 << 20,), generator=g)]
    z0, z1 = N.box_muller(uu, vv)
    rr = torch.sqrt(-2.0 * torch.log(uu.double()))
    th = 2 * math.pi * vv.double()
    err = max((z0.double() - rr * torch.cos(th)).abs().max().item(),
              (z1.double() - rr * torch.sin(th)).abs().max().item())
    assert err <= 1.2e-6


def _random_seeds_and_sizes(g):
    seeds = [0, 2 ** 64 - 1] + [int(s) for s in g.integers(0, 2 ** 63, size=3)]
    step = int(g.integers(0, 2 ** 32))
    numel = int(g.integers(1, 9000)) | 1              # odd: a partial last quad
    return N.seeds_tensor(seeds, len(seeds)), step, numel


def test_cpp_normals_bitwise_equal_the_definition():
    from pyengine.backends import cpp
    if cpp.unavailable_reason() is not None:
        pytest.skip(cpp.unavailable_reason())
    from pyengine.fused_update import fused_update
    g = np.random.default_rng()
    for _ in range(3):
        seeds, step, numel = _random_seeds_and_sizes(g)
        want = N.philox_normal(seeds, step, numel)
        assert torch.equal(cpp.philox_normal(seeds, step, numel), want)
        out = torch.empty(seeds.shape[0], numel)
        fused_update(out, [torch.zeros_like(out)], [1.0], 1.0, seeds, step, backend="cpp")
        assert torch.equal(out, want)
    # the same bits from the vectorized paths of every instruction set the CPU runs
    from pyengine.fused_update import native as _native
    isas = getattr(_native._C, "cpu_isas", lambda: [])()
    for isa in isas:
        prev = _native._C.set_cpu_isa(isa)
        try:
            assert torch.equal(cpp.philox_normal(seeds, step, numel), want), isa
        finally:
            _native._C.set_cpu_isa(prev)


def test_numba_normals_bitwise_equal_the_definition():
    from pyengine.backends import numba_backend as nb
    if nb.unavailable_reason() is not None:
        pytest.skip(nb.unavailable_reason())
    from pyengine.fused_update import fused_update
    g = np.random.default_rng()
    seeds, step, numel = _random_seeds_and_sizes(g)
    want = N.philox_normal(seeds, step, numel)
    assert torch.equal(nb.philox_normal(seeds, step, numel), want)
    out = torch.empty(seeds.shape[0], numel)
    fused_update(out, [torch.zeros_like(out)], [1.0], 1.0, seeds, step, backend="numba")
    assert torch.equal(out, want)


_TRITON_CHILD = """
import sys, torch
from pyengine import noise as N
from pyengine.fused_update import triton_kernels as tk
seeds = N.seeds_tensor([0, 2 ** 64 - 1, int(sys.argv[1])], 3)
step, numel = int(sys.argv[2]), int(sys.argv[3])
out = torch.empty(3, numel)
tk.fused_update(out, [torch.zeros_like(out)], [1.0], 1.0, seeds, step, None, None, None, None,
                None, None)
want = N.philox_normal(seeds, step, numel)
print("DIFFER", int((out != want).sum()), "OF", want.numel())
"""


def test_triton_interpreter_normals_bitwise_equal_the_definition():
    """The Triton kernel's noise (interpreted on the CPU, in a child: TRITON_INTERPRET must be
    set before triton is imported) is the definition's, bit for bit."""
    import importlib.util
    import os
    import subprocess
    import sys
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    g = np.random.default_rng()
    args = [str(int(g.integers(0, 2 ** 63))), str(int(g.integers(0, 2 ** 32))),
            str(int(g.integers(1, 3000)) | 1)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHILD, *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"DIFFER 0 OF {3 * int(args[2])}" in proc.stdout, f"child args {args}: " + \
        proc.stdout + proc.stderr[-2000:]


_CPP_CHILD = """
import sys, torch
from pyengine import noise as N
from pyengine.backends import cpp
from pyengine.fused_update import fused_update
seeds = N.seeds_tensor([0, 2 ** 64 - 1, int(sys.argv[1])], 3)
step, numel = int(sys.argv[2]), int(sys.argv[3])
want = N.philox_normal(seeds, step, numel)
out = torch.empty(3, numel)
fused_update(out, [torch.zeros_like(out)], [1.0], 1.0, seeds, step, backend="cpp")
print("DIFFER", int((cpp.philox_normal(seeds, step, numel) != want).sum()),
      int((out != want).sum()))
"""


def test_cpp_normals_without_avx512_bitwise_equal_the_definition():
    """CPUs without AVX-512 make the noise with the AVX2 loops (8 lanes): the same bits. On a
    machine with AVX-512 the child forces that path (PYENGINE_CPU_NO_AVX512=1)."""
    import os
    import subprocess
    import sys
    from pyengine.backends import cpp
    if cpp.unavailable_reason() is not None:
        pytest.skip(cpp.unavailable_reason())
    g = np.random.default_rng()
    args = [str(int(g.integers(0, 2 ** 63))), str(int(g.integers(0, 2 ** 32))),
            str(int(g.integers(1000, 40000)) | 1)]
    env = dict(os.environ, PYENGINE_CPU_NO_AVX512="1")
    proc = subprocess.run([sys.executable, "-c", _CPP_CHILD, *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DIFFER 0 0" in proc.stdout, f"child args {args}: " + proc.stdout + \
        proc.stderr[-2000:]
