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
