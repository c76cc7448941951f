"""The schedule-only baseline: dynamic programming exact against brute force, the teacher's
accuracy, and GITS grids beating the Karras grid on held-out noise of an exact mixture."""

import itertools

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine.models import GaussianMixture
from pyengine.tuning.gits import dp_path, gits_schedule, step_costs, teacher_trajectory

D = 24
PROC = pe.processes.EDM()


@pytest.fixture(scope="module")
def mixture():
    """(model, train noise, held-out noise, exact endpoints of the held-out noise at 0.002)."""
    gmm = GaussianMixture.random(d=D, M=4, seed=0)
    g = torch.Generator().manual_seed(10)
    train = torch.randn(32, D, generator=g, dtype=torch.float64)
    test = torch.randn(32, D, generator=g, dtype=torch.float64)
    exact = gmm.ode_endpoint(test * PROC.sigma_max, PROC.sigma_max, PROC.sigma_min)
    return gmm.as_model(PROC, "sample"), train, test, exact


def _brute(cost, steps):
    L = cost.shape[0]
    best = (np.inf, None)
    for mid in itertools.combinations(range(1, L - 1), steps - 1):
        path = (0,) + mid + (L - 1,)
        total = sum(cost[a, b] for a, b in zip(path[:-1], path[1:]))
        if total < best[0]:
            best = (total, list(path))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_exact_against_brute_force(seed):
    g = np.random.default_rng(seed)
    L = 9
    cost = g.random((L, L)) * g.random((L, L)) ** 3      # skewed, so paths differ clearly
    cost[np.tril_indices(L)] = -5.0                      # ignored: only i < j are steps
    for steps in range(1, L):
        path, total = dp_path(cost, steps)
        want_total, want_path = _brute(cost, steps)
        assert len(path) == steps + 1 and path[0] == 0 and path[-1] == L - 1
        assert all(a < b for a, b in zip(path[:-1], path[1:]))
        assert total == pytest.approx(want_total, rel=1e-12)
        assert sum(cost[a, b] for a, b in zip(path[:-1], path[1:])) == pytest.approx(total)
        assert path == want_path


def test_dp_refuses():
    with pytest.raises(ValueError, match="steps must be an integer in \\[1, 3\\]"):
        dp_path(np.zeros((4, 4)), 4)
    with pytest.raises(ValueError, match="square"):
        dp_path(np.zeros((3, 4)), 1)


def test_costs_are_ddim_steps(mixture):
    model, train, _, _ = mixture
    smp = pe.Sampler(PROC, "ipndm", steps=5, prediction="sample", to_zero=False)
    tr = teacher_trajectory(smp, model, train[:5], fine_steps=12)
    assert tr.sigmas.size == 13 and tr.sigmas[0] == PROC.sigma_max
    assert tr.sigmas[-1] == pytest.approx(PROC.sigma_min)
    C = step_costs(tr, max_elements=50)                   # chunked
    i, j = 3, 8
    r = tr.sigmas[j] / tr.sigmas[i]
    pred = r * tr.x_hat[i] + (1 - r) * tr.denoised[i]
    assert C[i, j] == pytest.approx(float((pred - tr.x_hat[j]).norm(dim=1).mean()), rel=1e-12)
    assert np.isinf(C[j, i]) and np.isinf(C[4, 4])
    # the recorded denoised estimates are the model's at the recorded states
    den = model(tr.x_hat[i], torch.full((5,), tr.sigmas[i], dtype=torch.float64))
    assert torch.allclose(den, tr.denoised[i], rtol=0, atol=1e-12)


def test_teacher_accuracy(mixture):
    model, _, test, exact = mixture
    smp = pe.Sampler(PROC, "ipndm", steps=5, prediction="sample", to_zero=False)
    tr = teacher_trajectory(smp, model, test, fine_steps=150)
    err = float((tr.x_hat[-1] - exact).norm(dim=1).median())
    karras = float((smp.sample(model, test) - exact).norm(dim=1).median())
    assert err < 1e-3 * karras, (err, karras)


@pytest.mark.parametrize("solver, weight, ratio", [("ipndm", "none", 0.6),
                                                   ("ipndm", "contraction", 0.65),
                                                   ("unipc", "contraction", 0.6)])
def test_gits_beats_karras_held_out(mixture, solver, weight, ratio):
    model, train, test, exact = mixture
    karras = pe.Sampler(PROC, solver, steps=5, prediction="sample", to_zero=False)
    grid = gits_schedule(karras, model, train, 5, fine_steps=150, weight=weight)
    assert grid.size == 6 and grid[0] == PROC.sigma_max
    assert grid[-1] == pytest.approx(PROC.sigma_min) and (np.diff(grid) < 0).all()
    tuned = pe.Sampler(PROC, solver, sigmas=grid, prediction="sample")
    e_k = float((karras.sample(model, test) - exact).norm(dim=1).median())
    e_g = float((tuned.sample(model, test) - exact).norm(dim=1).median())
    assert e_g < ratio * e_k, (e_g, e_k)


def test_process_input_and_zero_end(mixture):
    model, train, _, _ = mixture
    grid = gits_schedule(PROC, model, train[:8], 4, fine_steps=40, prediction="sample")
    assert grid.size == 5 and grid[0] == PROC.sigma_max and grid[-1] == 0.0
    vp = pe.processes.named("vp")
    gmm = GaussianMixture.random(d=6, M=2, seed=1)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = gits_schedule(pe.Sampler(vp, "dpmpp_2m", steps=3), gmm.as_model(vp, "epsilon"),
                         x, 3, fine_steps=30)
    assert grid.size == 4 and grid[-1] == 0.0 and grid[0] == pytest.approx(vp.sigma_max)


def test_refusals(mixture):
    model, train, _, _ = mixture
    smp = pe.Sampler(PROC, "ipndm", steps=5, prediction="sample")
    with pytest.raises(ValueError, match="teacher 'euler_ancestral' must be a deterministic"):
        gits_schedule(smp, model, train, 5, teacher="euler_ancestral")
    with pytest.raises(ValueError, match="nfe must be an integer in \\[1, 20\\]"):
        gits_schedule(smp, model, train, 21, fine_steps=20)
    with pytest.raises(ValueError, match="weight"):
        gits_schedule(smp, model, train, 3, fine_steps=20, weight="l1")
    with pytest.raises(ValueError, match="prediction='epsilon' disagrees"):
        gits_schedule(smp, model, train, 3, prediction="epsilon")
