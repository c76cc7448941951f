"""Every schedule against an independent closed form, and the grid contract.

Closed forms are written as per-index loops from the papers' equations (Karras et al. 2022
eq. 5, DPM-Solver's logSNR skip, k-diffusion's polyexponential, diffusers' timestep
spacings from "Common Diffusion Noise Schedules are Flawed", Table 2); the diffusers
spacings are also compared with DDIMScheduler.set_timesteps itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import pyengine as pe
from pyengine import schedules as S

SMIN, SMAX = 0.002, 80.0


def _check_grid(s, n=None, append_zero=True):
    """The contract: float64, n levels (+ a final 0), strictly decreasing, positive."""
    assert isinstance(s, np.ndarray) and s.dtype == np.float64 and s.ndim == 1
    if n is not None:
        assert s.size == n + (1 if append_zero else 0)
    assert np.all(np.diff(s) < 0)
    if append_zero:
        assert s[-1] == 0.0 and np.all(s[:-1] > 0)
    else:
        assert np.all(s > 0)


# ---------------------------------------------------------------------------------------
# sigma-space schedules
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 30])
@pytest.mark.parametrize("rho", [7.0, 3.0, 1.0])
def test_karras(n, rho):
    s = S.karras(n, SMIN, SMAX, rho=rho)
    _check_grid(s, n)
    for i in range(n):
        ramp = i / (n - 1) if n > 1 else 0.0
        want = (SMAX ** (1 / rho) + ramp * (SMIN ** (1 / rho) - SMAX ** (1 / rho))) ** rho
        assert s[i] == pytest.approx(want, rel=1e-13)
    assert s[0] == pytest.approx(SMAX, rel=1e-14)
    if n > 1:
        assert s[n - 1] == pytest.approx(SMIN, rel=1e-12)
    if n > 1:   # a single level is not a grid; with the final 0 it is one step
        np.testing.assert_array_equal(S.karras(n, SMIN, SMAX, rho=rho, append_zero=False), s[:-1])


@pytest.mark.parametrize("n", [2, 5, 40])
def test_exponential_and_logsnr(n):
    e = S.exponential(n, SMIN, SMAX)
    lam = S.logsnr_uniform(n, SMIN, SMAX)
    _check_grid(e, n)
    _check_grid(lam, n)
    for i in range(n):
        want = SMAX * (SMIN / SMAX) ** (i / (n - 1))
        assert e[i] == pytest.approx(want, rel=1e-12)
    # uniform in half-log-SNR lambda = -log sigma: equal increments
    h = np.diff(-np.log(lam[:-1]))
    np.testing.assert_allclose(h, math.log(SMAX / SMIN) / (n - 1), rtol=1e-12)
    np.testing.assert_allclose(lam, e, rtol=1e-12)


@pytest.mark.parametrize("rho", [0.5, 1.0, 2.0])
def test_polyexponential(rho):
    n = 12
    s = S.polyexponential(n, SMIN, SMAX, rho=rho)
    _check_grid(s, n)
    for i in range(n):
        ramp = (1 - i / (n - 1)) ** rho
        want = math.exp(math.log(SMIN) + ramp * (math.log(SMAX) - math.log(SMIN)))
        assert s[i] == pytest.approx(want, rel=1e-12)
    if rho == 1.0:
        np.testing.assert_allclose(s, S.exponential(n, SMIN, SMAX), rtol=1e-12)


# ---------------------------------------------------------------------------------------
# time-uniform grids
# ---------------------------------------------------------------------------------------


def test_time_uniform_ve_is_exponential():
    ve = pe.processes.VE(sigma_min=0.01, sigma_max=50.0)
    s = S.time_uniform(ve, 9)
    _check_grid(s, 9)
    for i in range(9):
        t = 1.0 - i / 8
        assert s[i] == pytest.approx(0.01 * 5000.0 ** t, rel=1e-12)


def test_time_uniform_vp_continuous():
    b0, b1, eps = 0.1, 20.0, 1e-3
    proc = pe.processes.VP.continuous(b0, b1, eps)
    n = 10
    s = S.time_uniform(proc, n, append_zero=False)
    _check_grid(s, n, append_zero=False)
    for i in range(n):
        t = 1.0 + (eps - 1.0) * i / (n - 1)
        abar = math.exp(-(b0 * t + 0.5 * (b1 - b0) * t * t))
        assert s[i] == pytest.approx(math.sqrt((1 - abar) / abar), rel=1e-10)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_time_uniform_flow_applies_shift(shift):
    proc = pe.processes.RectifiedFlow(shift=shift)
    n = 8
    s = S.time_uniform(proc, n)
    _check_grid(s, n)
    for i in range(n):
        t = proc.t_max + (proc.t_min - proc.t_max) * i / (n - 1)
        tw = shift * t / (1 + (shift - 1) * t)
        assert s[i] == pytest.approx(tw / (1 - tw), rel=1e-11)


def test_time_uniform_explicit_range_and_errors():
    proc = pe.processes.VP.continuous()
    s = S.time_uniform(proc, 4, t_start=0.8, t_end=0.2, append_zero=False)
    np.testing.assert_allclose(s, proc.sigma_of_t(np.array([0.8, 0.6, 0.4, 0.2])), rtol=1e-12)
    with pytest.raises(ValueError, match="t_start > t_end"):
        S.time_uniform(proc, 4, t_start=0.2, t_end=0.8)
    with pytest.raises(ValueError, match="steps"):
        S.time_uniform(proc, 0)


# ---------------------------------------------------------------------------------------
# diffusers timestep spacings for discrete VP
# ---------------------------------------------------------------------------------------


def spacing_closed_form(N, n, spacing, offset):
    """The three spacings of Table 2 (Lin et al. 2024), one index at a time, descending."""
    if spacing == "linspace":
        ts = [int(np.round(i * (N - 1) / (n - 1))) if n > 1 else 0 for i in range(n)]
    elif spacing == "leading":
        ts = [i * (N // n) + offset for i in range(n)]
    else:  # trailing
        ts = [int(np.round(N - i * N / n)) - 1 for i in range(n)]
    return sorted(ts, reverse=True)


SPACING_CASES = [(n, sp, off) for sp in ("leading", "trailing", "linspace")
                 for n in (1, 3, 7, 10, 20, 50, 333) for off in (0, 1)]


@pytest.mark.parametrize("n,spacing,offset", SPACING_CASES)
def test_vp_spacings_closed_form(n, spacing, offset):
    ts = S.vp_timesteps(1000, n, spacing, steps_offset=offset)
    assert ts.dtype == np.int64
    assert ts.tolist() == spacing_closed_form(1000, n, spacing, offset)


@pytest.mark.parametrize("n,spacing,offset", SPACING_CASES)
def test_vp_spacings_match_diffusers(n, spacing, offset):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing,
                                  steps_offset=offset)
    sch.set_timesteps(n)
    ours = S.vp_timesteps(1000, n, spacing, steps_offset=offset)
    np.testing.assert_array_equal(ours, sch.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_vp_discrete_sigmas(spacing):
    proc = pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
    n = 10
    ts = spacing_closed_form(1000, n, spacing, 1)
    abar = proc.alphas_cumprod
    want = [math.sqrt((1 - abar[t]) / abar[t]) for t in ts]
    s = S.vp_discrete(proc, n, spacing, steps_offset=1)
    _check_grid(s, n)
    np.testing.assert_allclose(s[:-1], want, rtol=1e-12)
    s2 = S.vp_discrete(proc, n, spacing, steps_offset=1, final="sigma_min")
    assert s2[-1] == proc.sigma_min
    if ts[-1] == 0:
        # linspace already ends at timestep 0 = sigma_min; the level is not repeated
        np.testing.assert_array_equal(s2, s[:-1])
    else:
        np.testing.assert_array_equal(s2[:-1], s[:-1])
    # through the named-schedule table, append_zero=False gives n steps between n + 1 of the
    # table's own levels
    s3 = S.get_sigmas(spacing, proc, n, append_zero=False, steps_offset=1)
    ts3 = spacing_closed_form(1000, n + 1, spacing, 1)
    assert len(s3) == n + 1
    np.testing.assert_allclose(s3, [math.sqrt((1 - abar[t]) / abar[t]) for t in ts3], rtol=1e-12)


def test_vp_spacing_errors():
    with pytest.raises(ValueError, match="steps"):
        S.vp_timesteps(1000, 0)
    with pytest.raises(ValueError, match="steps"):
        S.vp_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="spacing"):
        S.vp_timesteps(1000, 10, "middle")
    with pytest.raises(ValueError, match="steps_offset"):
        S.vp_timesteps(1000, 1000, "leading", steps_offset=1)
    proc = pe.processes.VP.discrete("linear")
    with pytest.raises(ValueError, match="final"):
        S.vp_discrete(proc, 10, final="one")
    with pytest.raises(ValueError, match="discrete VP"):
        S.get_sigmas("leading", pe.processes.EDM(), 10)


# ---------------------------------------------------------------------------------------
# named schedules, user lists, validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(S.SCHEDULES))
@pytest.mark.parametrize("append_zero", [True, False])
def test_every_named_schedule_builds_a_valid_grid(name, append_zero):
    proc = pe.processes.VP.discrete("linear")
    s = S.get_sigmas(name, proc, 12, append_zero=append_zero)
    _check_grid(s, None, append_zero)
    assert s[0] <= proc.sigma_max * (1 + 1e-12)
    assert s[-2 if append_zero else -1] >= proc.sigma_min * (1 - 1e-12)


def test_named_schedules_use_process_range():
    proc = pe.processes.EDM()
    np.testing.assert_array_equal(S.get_sigmas("karras", proc, 9),
                                  S.karras(9, proc.sigma_min, proc.sigma_max))
    np.testing.assert_array_equal(S.get_sigmas("exponential", proc, 9, sigma_min=0.1,
                                               sigma_max=5.0),
                                  S.exponential(9, 0.1, 5.0))
    np.testing.assert_array_equal(S.get_sigmas("karras", proc, 9, rho=3.0),
                                  S.karras(9, proc.sigma_min, proc.sigma_max, rho=3.0))
    with pytest.raises(ValueError, match="schedule must be one of"):
        S.get_sigmas("karas", proc, 9)


def test_from_list():
    s = S.from_list([14, 7.5, 2, 0.5, 0])
    assert s.dtype == np.float64
    np.testing.assert_array_equal(s, [14.0, 7.5, 2.0, 0.5, 0.0])
    np.testing.assert_array_equal(S.from_list((3.0, 1.0)), [3.0, 1.0])
    np.testing.assert_array_equal(S.from_list(np.array([2.0, 1.0, 0.0], np.float32)),
                                  [2.0, 1.0, 0.0])


BAD_GRIDS = [
    ([1.0, 2.0, 0.0], "strictly decreasing"),
    ([3.0, 1.0, 1.0, 0.0], "strictly decreasing"),
    ([3.0, 1.0, 0.0, 0.0], "strictly decreasing"),
    ([2.0, 1.0, -0.5], "positive"),
    ([2.0, 0.0, -1.0], "positive"),           # a zero in the middle
    ([-1.0, -2.0], "positive"),
    ([float("inf"), 1.0, 0.0], "finite"),
    ([5.0, float("nan"), 0.0], "finite"),
    ([1.0], "at least 2"),
    ([], "at least 2"),
    ([[2.0, 1.0], [1.0, 0.0]], "1-D"),
    (["a", "b"], "numbers"),
]


@pytest.mark.parametrize("grid,msg", BAD_GRIDS, ids=[str(g) for g, _ in BAD_GRIDS])
def test_invalid_grids_rejected(grid, msg):
    with pytest.raises(ValueError, match=msg):
        S.from_list(grid)
    with pytest.raises(ValueError, match="sigmas"):
        S.validate(grid)


def test_increasing_grids_for_inversion():
    np.testing.assert_array_equal(S.validate([0.0, 0.5, 3.0], increasing=True), [0.0, 0.5, 3.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        S.validate([0.0, 0.5, 0.5], increasing=True)
    with pytest.raises(ValueError, match="positive"):
        S.validate([-1.0, 0.5, 1.0], increasing=True)
    with pytest.raises(ValueError, match="positive"):
        S.validate([-1.0, 0.0, 1.0], increasing=True)


@pytest.mark.parametrize("build", [S.karras, S.exponential, S.logsnr_uniform, S.polyexponential])
def test_wrong_steps_and_range_rejected(build):
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            build(n, SMIN, SMAX)
    for lo, hi in ((0.0, 1.0), (2.0, 1.0), (1.0, 1.0), (0.1, math.inf), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="sigma_min"):
            build(5, lo, hi)
