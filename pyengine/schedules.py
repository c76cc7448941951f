"""Noise schedules: pure functions returning float64 sigma grids.

Every function returns a strictly decreasing float64 array of noise levels (of the scaled
state x / s). With ``append_zero=True`` (the default) it ends in an explicit 0, the level the
solver's final step goes to; with ``append_zero=False`` it ends at sigma_min ("pure
discretization", used to measure a solver's order). ``validate`` states the contract and
every public constructor runs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["validate", "karras", "exponential", "logsnr_uniform", "time_uniform",
           "polyexponential", "vp_timesteps", "vp_discrete", "from_list", "get_sigmas",
           "SCHEDULES"]


def validate(sigmas, *, name: str = "sigmas", increasing: bool = False) -> np.ndarray:
    """Check a sigma grid and return it as float64.

    Rules: 1-D, at least 2 entries, finite, strictly decreasing (strictly increasing with
    ``increasing=True``, for inversion), positive except a single 0 at the end (at the start
    when increasing).
    """
    try:
        s = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of numbers ({e})") from None
    if s.ndim != 1 or s.size < 2:
        raise ValueError(f"{name} must be a 1-D sequence of at least 2 noise levels, got shape "
                         f"{tuple(s.shape)}")
    if not np.all(np.isfinite(s)):
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"{name} must be finite; entry {bad} is {s[bad]}")
    d = np.diff(s)
    if increasing:
        if np.any(d <= 0):
            i = int(np.flatnonzero(d <= 0)[0])
            raise ValueError(f"{name} must be strictly increasing; entries {i} and {i + 1} are "
                             f"{s[i]:g} and {s[i + 1]:g}")
        inner = s[1:]
    else:
        if np.any(d >= 0):
            i = int(np.flatnonzero(d >= 0)[0])
            raise ValueError(f"{name} must be strictly decreasing; entries {i} and {i + 1} are "
                             f"{s[i]:g} and {s[i + 1]:g}")
        inner = s[:-1]
    if np.any(inner <= 0) or np.any(s < 0):
        raise ValueError(f"{name} must be positive, with 0 allowed only as the final level")
    return s


def _check_range(n, sigma_min, sigma_max):
    if int(n) != n or n < 1:
        raise ValueError(f"n (number of steps) must be a positive integer, got {n!r}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")


def _finish(s, append_zero):
    s = np.asarray(s, dtype=np.float64)
    if append_zero:
        s = np.concatenate([s, [0.0]])
    return validate(s)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
           append_zero: bool = True) -> np.ndarray:
    """Karras et al. 2022 eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    _check_range(n, sigma_min, sigma_max)
    ramp = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, append_zero)


def exponential(n: int, sigma_min: float, sigma_max: float, append_zero: bool = True) -> np.ndarray:
    """Uniform in log sigma from sigma_max down to sigma_min."""
    _check_range(n, sigma_min, sigma_max)
    return _finish(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)), append_zero)


def logsnr_uniform(n: int, sigma_min: float, sigma_max: float,
                   append_zero: bool = True) -> np.ndarray:
    """Uniform in half-log-SNR lambda = -log sigma (DPM-Solver's 'logSNR' skip type).

    In the canonical form this grid coincides with ``exponential``; it is computed through
    lambda so that the two statements check each other.
    """
    _check_range(n, sigma_min, sigma_max)
    lam = np.linspace(-math.log(sigma_max), -math.log(sigma_min), n)
    return _finish(np.exp(-lam), append_zero)


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                    append_zero: bool = True) -> np.ndarray:
    """log sigma = log smin + (1 - i/(n-1))^rho (log smax - log smin); rho=1 is exponential."""
    _check_range(n, sigma_min, sigma_max)
    ramp = np.linspace(1.0, 0.0, n) ** rho
    return _finish(np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)),
                   append_zero)


def time_uniform(process, n: int, t_start: float | None = None, t_end: float | None = None,
                 append_zero: bool = True) -> np.ndarray:
    """Uniform in the process's own time t from t_start down to t_end, mapped to sigma(t).

    Defaults span the process's trained range. A rectified-flow process applies its timestep
    shift to the uniform grid first.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n (number of steps) must be a positive integer, got {n!r}")
    t0 = float(process.t_of_sigma(process.sigma_max)) if t_start is None else float(t_start)
    t1 = float(process.t_of_sigma(process.sigma_min)) if t_end is None else float(t_end)
    if not t0 > t1:
        raise ValueError(f"need t_start > t_end, got {t0} and {t1}")
    t = np.linspace(t0, t1, n)
    warp = getattr(process, "warp", None)
    if warp is not None:
        t = warp(t)
    return _finish(process.sigma_of_t(t), append_zero)


def vp_timesteps(num_train_timesteps: int, n: int, spacing: str = "leading",
                 steps_offset: int = 0) -> np.ndarray:
    """Integer timesteps of a discrete VP sampler, in diffusers' spacings (descending).

    ``linspace``: round(linspace(0, N-1, n)); ``leading``: arange(n) * (N // n) + steps_offset;
    ``trailing``: round(arange(N, 0, -N/n)) - 1. (Common Diffusion Noise Schedules are Flawed,
    Table 2.)
    """
    N = int(num_train_timesteps)
    if int(n) != n or not (1 <= n <= N):
        raise ValueError(f"n (number of steps) must be in [1, {N}], got {n!r}")
    if spacing == "linspace":
        ts = np.linspace(0, N - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (N // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(N, 0, -N / n)) - 1
    else:
        raise ValueError(f"spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")
    ts = ts.astype(np.int64)
    if ts.max() > N - 1 or ts.min() < 0:
        raise ValueError(f"steps_offset={steps_offset} puts timesteps outside [0, {N - 1}]")
    return ts


def vp_discrete(process, n: int, spacing: str = "leading", steps_offset: int = 0,
                final: str = "zero") -> np.ndarray:
    """Sigmas at the diffusers timesteps of a discrete VP process.

    ``final``: "zero" ends at sigma 0 (alpha_bar = 1, diffusers' set_alpha_to_one=True);
    "sigma_min" ends at the table's first level (alpha_bar_0, set_alpha_to_one=False);
    "none" ends at the last timestep's level (n timesteps, n - 1 steps).
    """
    ts = vp_timesteps(process.num_train_timesteps, n, spacing, steps_offset)
    s = process.sigmas[ts]
    if final == "zero":
        s = np.concatenate([s, [0.0]])
    elif final == "sigma_min":
        # A last timestep of 0 already sits at sigma_min: the step to alpha_bar_0 would be
        # the identity, so it is not repeated.
        if s[-1] != process.sigma_min:
            s = np.concatenate([s, [process.sigma_min]])
    elif final != "none":
        raise ValueError(f"final must be 'zero', 'sigma_min' or 'none', got {final!r}")
    return validate(s)


def from_list(sigmas: Sequence[float]) -> np.ndarray:
    """A user-given grid, validated."""
    return validate(sigmas)


#: schedule name -> builder(process, n, append_zero, **kw)
SCHEDULES = {
    "karras": lambda p, n, z, **kw: karras(n, kw.pop("sigma_min", p.sigma_min),
                                           kw.pop("sigma_max", p.sigma_max), append_zero=z, **kw),
    "exponential": lambda p, n, z, **kw: exponential(n, kw.pop("sigma_min", p.sigma_min),
                                                     kw.pop("sigma_max", p.sigma_max),
                                                     append_zero=z, **kw),
    "logsnr": lambda p, n, z, **kw: logsnr_uniform(n, kw.pop("sigma_min", p.sigma_min),
                                                   kw.pop("sigma_max", p.sigma_max),
                                                   append_zero=z, **kw),
    "polyexponential": lambda p, n, z, **kw: polyexponential(n, kw.pop("sigma_min", p.sigma_min),
                                                             kw.pop("sigma_max", p.sigma_max),
                                                             append_zero=z, **kw),
    "time_uniform": lambda p, n, z, **kw: time_uniform(p, n, append_zero=z, **kw),
}


def _vp_spacing(spacing):
    def build(p, n, z, **kw):
        if not hasattr(p, "num_train_timesteps"):
            raise ValueError(f"schedule {spacing!r} needs a discrete VP process, got {p!r}")
        if z:
            return vp_discrete(p, n, spacing, **kw)
        # n steps between n + 1 of the table's own levels
        kw.setdefault("final", "none")
        return vp_discrete(p, n + 1, spacing, **kw)
    return build


for _sp in ("leading", "trailing", "linspace"):
    SCHEDULES[_sp] = _vp_spacing(_sp)


def get_sigmas(schedule: str, process, n: int, append_zero: bool = True, **kw) -> np.ndarray:
    """A named schedule for ``process`` with exactly ``n`` steps: n positive levels and a final
    0 with ``append_zero``, else n + 1 positive levels ending at the low end of the range."""
    try:
        build = SCHEDULES[schedule]
    except KeyError:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}") from None
    if int(n) != n or n < 1:
        raise ValueError(f"n (number of steps) must be a positive integer, got {n!r}")
    if append_zero or schedule in ("leading", "trailing", "linspace"):
        return build(process, n, append_zero, **dict(kw))
    return build(process, n + 1, append_zero, **dict(kw))
