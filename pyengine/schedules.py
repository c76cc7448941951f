"""Noise schedules: pure functions returning float64 sigma grids.

Every function returns a strictly decreasing float64 array of noise levels (of the scaled
state x / s). With ``append_zero=True`` (the default) it ends in an explicit 0, the level the
solver's final step goes to; with ``append_zero=False`` it ends at sigma_min ("pure
discretization", used to measure a solver's order). ``validate`` states the contract and
every public constructor runs it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

__all__ = ["validate", "karras", "exponential", "logsnr_uniform", "time_uniform",
           "polyexponential", "vp_timesteps", "vp_discrete", "from_list", "get_sigmas",
           "SCHEDULES", "FLOW_SHIFTS", "time_snr_shift", "time_shift_exponential",
           "time_shift_linear", "stretch_to_terminal", "flow_mu", "flux2_mu",
           "flow_match_sigmas", "flow_sigmas_multistep", "flow_to_sigma", "sigma_to_flow",
           "ModelSampling",
           "model_sampling_for", "simple", "ddim_uniform", "normal", "sgm_uniform", "beta",
           "linear_quadratic", "kl_optimal", "AYS_LEVELS", "loglinear_interp",
           "align_your_steps", "COMFY_SCHEDULERS", "split_at", "split_denoise",
           "flux_mu_for_size", "ltxv_sigmas", "manual_sigmas",
           "truncate_denoise", "flip"]


def validate(sigmas, *, name: str = "sigmas", increasing: bool = False) -> np.ndarray:
    """Check a sigma grid and return it as float64.

    Rules: 1-D, at least 2 entries, finite, strictly decreasing (strictly increasing with
    ``increasing=True``, for inversion), positive except a single 0 at the end (at the start
    when increasing).
    """
    if getattr(sigmas, "is_meta", False):
        raise ValueError(f"{name} is a tensor on the meta device (it has no values); pass real "
                         f"noise levels")
    if hasattr(sigmas, "detach") and hasattr(sigmas, "cpu"):
        sigmas = sigmas.detach().cpu()
    try:
        s = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as e:
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


#: The most levels a schedule function builds (80 MB of float64). A plan has at most
#: pyengine.solvers.registry.MAX_STEPS steps; this bound only keeps a mistyped count from
#: exhausting memory.
MAX_LEVELS = 10_000_000


def _count(n, name: str = "n (number of steps)") -> int:
    """A positive integer count of levels (at most :data:`MAX_LEVELS`); ValueError naming it."""
    if isinstance(n, bool) or not isinstance(n, (numbers.Real, np.integer)) or \
            not math.isfinite(float(n)) or int(n) != n or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    if n > MAX_LEVELS:
        raise ValueError(f"{name} must be at most {MAX_LEVELS:,} (MAX_LEVELS), got {n!r}")
    return int(n)


def _real(x, name: str) -> float:
    """A real number (a Python or numpy number, or a 0-d real tensor) as a float."""
    if not isinstance(x, (numbers.Real, np.integer, np.floating)) and \
            getattr(x, "ndim", None) == 0 and getattr(getattr(x, "device", None), "type",
                                                     None) != "meta":
        x = x.item()                                 # k-diffusion passes model.sigma_min
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(x).__name__} {x!r}")
    return float(x)


def _check_range(n, sigma_min, sigma_max):
    _count(n)
    sigma_min, sigma_max = _real(sigma_min, "sigma_min"), _real(sigma_max, "sigma_max")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")
    return sigma_min, sigma_max


def _finish(s, append_zero):
    s = np.asarray(s, dtype=np.float64)
    if append_zero:
        s = np.concatenate([s, [0.0]])
    return validate(s)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
           append_zero: bool = True) -> np.ndarray:
    """Karras et al. 2022 eq. 5:
    sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    if not (isinstance(rho, (int, float, np.floating, np.integer)) and math.isfinite(rho)
            and rho > 0):
        raise ValueError(f"rho must be a positive finite number, got {rho!r}")
    ramp = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, append_zero)


def exponential(n: int, sigma_min: float, sigma_max: float, append_zero: bool = True) -> np.ndarray:
    """Uniform in log sigma from sigma_max down to sigma_min."""
    sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    return _finish(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)), append_zero)


def logsnr_uniform(n: int, sigma_min: float, sigma_max: float,
                   append_zero: bool = True) -> np.ndarray:
    """Uniform in half-log-SNR lambda = -log sigma (DPM-Solver's 'logSNR' skip type).

    In the canonical form this grid coincides with ``exponential``; it is computed through
    lambda so that the two statements check each other.
    """
    sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    lam = np.linspace(-math.log(sigma_max), -math.log(sigma_min), n)
    return _finish(np.exp(-lam), append_zero)


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                    append_zero: bool = True) -> np.ndarray:
    """log sigma = log smin + (1 - i/(n-1))^rho (log smax - log smin); rho=1 is exponential."""
    sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    _positive(rho, "rho")
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


# ---------------------------------------------------------------------------------------
# Flow matching: shifts of t in [0, 1] (the flow's own sigma, x_t = (1 - t) x0 + t eps)
# ---------------------------------------------------------------------------------------
#
# These work in the units flow-matching libraries use (diffusers' FlowMatch* "sigmas",
# ComfyUI's CONST sigmas): t, not pyengine's sigma of the scaled state, which is t / (1 - t)
# (:func:`flow_to_sigma`). They return float64 arrays and name the argument they reject.

#: Static shifts of the models that ship one (ComfyUI's ModelSamplingSD3 / ModelSamplingAuraFlow
#: defaults; Flux's shift depends on the resolution: :func:`flow_mu`).
FLOW_SHIFTS = {"sd3": 3.0, "auraflow": 1.73}


def _flow_t(t, name: str = "t") -> np.ndarray:
    a = np.asarray(t, dtype=np.float64)
    if not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a > 1):
        raise ValueError(f"{name} must lie in [0, 1] (flow time), got {t!r}")
    return a


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def time_snr_shift(t, shift: float) -> np.ndarray:
    """Static shift t' = a t / (1 + (a - 1) t) (SD3 Sec. 5.3.2: the SNR divided by a^2)."""
    a = _positive(shift, "shift")
    tt = _flow_t(t)
    return a * tt / (1.0 + (a - 1.0) * tt)


def time_shift_exponential(t, mu: float, sigma_exp: float = 1.0) -> np.ndarray:
    """Dynamic shift t' = e^mu / (e^mu + (1/t - 1)^sigma_exp) (Flux; t = 0 stays 0)."""
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu!r}")
    _positive(sigma_exp, "sigma_exp")
    tt = _flow_t(t)
    with np.errstate(divide="ignore"):
        r = np.where(tt > 0, (1.0 / np.where(tt > 0, tt, 1.0) - 1.0) ** sigma_exp, np.inf)
    return math.exp(mu) / (math.exp(mu) + r)


def time_shift_linear(t, mu: float, sigma_exp: float = 1.0) -> np.ndarray:
    """Linear dynamic shift t' = mu / (mu + (1/t - 1)^sigma_exp) (time_shift_type="linear")."""
    mu = _positive(mu, "mu")
    _positive(sigma_exp, "sigma_exp")
    tt = _flow_t(t)
    with np.errstate(divide="ignore"):
        r = np.where(tt > 0, (1.0 / np.where(tt > 0, tt, 1.0) - 1.0) ** sigma_exp, np.inf)
    return mu / (mu + r)


def stretch_to_terminal(t, terminal: float) -> np.ndarray:
    """Terminal stretch (LTX-Video): 1 - t' = (1 - t) (1 - terminal) / (1 - t[-1]), so the
    last level becomes ``terminal``."""
    if not (isinstance(terminal, (int, float, np.floating)) and 0 < terminal < 1):
        raise ValueError(f"shift_terminal must lie in (0, 1), got {terminal!r}")
    tt = _flow_t(t)
    if tt.ndim != 1 or tt.size < 1 or tt[-1] >= 1:
        raise ValueError("t must be a 1-D list of flow times whose last entry is below 1")
    return 1.0 - (1.0 - tt) * (1.0 - terminal) / (1.0 - tt[-1])


def flow_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of the dynamic shift, linear in the latent sequence length through (base_seq_len,
    base_shift) and (max_seq_len, max_shift): Flux, LTX-Video and Qwen-Image pipelines pass
    their scheduler config's four values (``calculate_shift``); ComfyUI's ModelSamplingFlux
    computes the same line with width * height / 256 tokens."""
    if not max_seq_len != base_seq_len:
        raise ValueError(f"max_seq_len must differ from base_seq_len, got {max_seq_len!r}")
    if not (isinstance(image_seq_len, (int, float, np.integer)) and image_seq_len > 0):
        raise ValueError(f"image_seq_len must be positive, got {image_seq_len!r}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(image_seq_len * m + base_shift - m * base_seq_len)


def flux2_mu(image_seq_len: int, num_steps: int) -> float:
    """mu of Flux 2 (``compute_empirical_mu``): two fitted lines in image_seq_len (10 and 200
    steps) interpolated linearly in the step count; the 200-step line above 4300 tokens."""
    if not (isinstance(image_seq_len, (int, float, np.integer)) and image_seq_len > 0):
        raise ValueError(f"image_seq_len must be positive, got {image_seq_len!r}")
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    m200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(m200)
    m10 = 8.73809524e-05 * image_seq_len + 1.89833333
    slope = (m200 - m10) / 190.0
    return float(slope * num_steps + m200 - 200.0 * slope)


def flow_match_sigmas(n: int | None = None, *, shift: float = 1.0, mu: float | None = None,
                      time_shift_type: str = "exponential", shift_terminal: float | None = None,
                      spacing: str | None = None, sigmas=None, invert: bool = False,
                      num_train_timesteps: int = 1000, append_zero: bool = True) -> np.ndarray:
    """The flow times of diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps.

    Start: ``sigmas`` if given, else linspace(t_max, t_min, n) with t_max = 1 and t_min the
    scheduler's smallest training level (1/N, already shifted by ``shift`` when ``mu`` is None,
    as the scheduler does). Then the shift (``mu`` given: the dynamic exponential or linear
    shift, else the static ``shift``), the terminal stretch, and ``spacing`` "karras" (rho 7),
    "exponential" or "beta" (alpha = beta = 0.6) between the first and last level. A final 0
    with ``append_zero`` (1 with ``invert``, which returns 1 - t: Mochi's inverted sigmas)."""
    N = int(num_train_timesteps)
    if sigmas is None:
        if isinstance(n, bool) or n is None or int(n) != n or n < 1:
            raise ValueError(f"n (number of steps) must be a positive integer, got {n!r}")
        t_min = 1.0 / N if mu is not None else float(time_snr_shift(1.0 / N, shift))
        t = np.linspace(1.0, t_min, int(n))
    else:
        t = _flow_t(np.asarray(sigmas, dtype=np.float64).reshape(-1), "sigmas")
        if t.size < 1:
            raise ValueError("sigmas must hold at least one flow time")
    if mu is not None:
        if time_shift_type == "exponential":
            t = time_shift_exponential(t, mu)
        elif time_shift_type == "linear":
            t = time_shift_linear(t, mu)
        else:
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got "
                             f"{time_shift_type!r}")
    else:
        t = time_snr_shift(t, shift)
    if shift_terminal:
        t = stretch_to_terminal(t, shift_terminal)
    k = t.size
    if spacing == "karras":
        t = karras(k, float(t[-1]), float(t[0]), append_zero=False) if k > 1 else t
    elif spacing == "exponential":
        t = exponential(k, float(t[-1]), float(t[0]), append_zero=False) if k > 1 else t
    elif spacing == "beta":
        t = _beta_between(k, float(t[-1]), float(t[0]))
    elif spacing is not None:
        raise ValueError(f"spacing must be None, 'karras', 'exponential' or 'beta', got "
                         f"{spacing!r}")
    if invert:
        t = 1.0 - t
    if append_zero:
        t = np.concatenate([t, [1.0 if invert else 0.0]])
    return t


def flow_sigmas_multistep(n: int, flow_shift: float = 1.0, num_train_timesteps: int = 1000,
                          style: str = "dpm", mu: float | None = None,
                          time_shift_type: str = "exponential",
                          shift_terminal: float | None = None, final: str = "zero") -> np.ndarray:
    """Flow times of diffusers' multistep schedulers with ``use_flow_sigmas`` (Wan, SANA).

    ``style="dpm"`` (DPMSolverMultistepScheduler): u = 1 - linspace(1, 1/N, n + 1) shifted by
    ``flow_shift``, reversed, the last (t = 0) dropped. ``style="unipc"``
    (UniPCMultistepScheduler): linspace(1, 1/N, n + 1) without its last entry, shifted
    (``mu``: the dynamic shift of :func:`flow_match_sigmas`), stretched to ``shift_terminal``,
    and a first level within 1e-6 of 1 lowered by 1e-6. ``final``: "zero" appends 0;
    "sigma_min" appends the last level again for unipc (a repeated level: a zero-length last
    step) and the VP table's smallest level is the caller's business for dpm."""
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n (number of steps) must be a positive integer, got {n!r}")
    N = int(num_train_timesteps)
    if N < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps!r}")
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
    if style == "dpm":
        u = 1.0 - np.linspace(1.0, 1.0 / N, int(n) + 1)
        t = time_snr_shift(u, flow_shift)[::-1][:-1].copy()
    elif style == "unipc":
        t = np.linspace(1.0, 1.0 / N, int(n) + 1)[:-1]
        if mu is not None:
            t = (time_shift_exponential(t, mu) if time_shift_type == "exponential"
                 else time_shift_linear(t, mu))
        else:
            t = time_snr_shift(t, flow_shift)
        if shift_terminal:
            t = stretch_to_terminal(t, shift_terminal)
        if abs(t[0] - 1.0) < 1e-6:
            t[0] -= 1e-6
    else:
        raise ValueError(f"style must be 'dpm' or 'unipc', got {style!r}")
    if final == "zero":
        return np.concatenate([t, [0.0]])
    return np.concatenate([t, [t[-1]]]) if style == "unipc" else t


def _beta_between(n: int, lo: float, hi: float, alpha: float = 0.6, beta: float = 0.6):
    """lo + (hi - lo) * BetaPPF(1 - i/(n-1); alpha, beta) (Lee et al. 2024, "Beta Sampling is
    All You Need"; diffusers' _convert_to_beta)."""
    from scipy.stats import beta as _beta
    q = 1.0 - np.linspace(0.0, 1.0, n)
    return lo + _beta.ppf(q, alpha, beta) * (hi - lo)


def flow_to_sigma(t, name: str = "sigmas") -> np.ndarray:
    """pyengine's sigma of the scaled state at flow time t: t / (1 - t) (0 stays 0). A flow
    time of 1 (pure noise) has sigma = inf, which no plan can hold: replace it first (ComfyUI's
    exponential samplers use its offset_first_sigma_for_snr level there)."""
    tt = _flow_t(t, name)
    if np.any(tt >= 1):
        raise ValueError(f"{name} holds a flow time of 1 (pure noise, sigma = inf); clip it "
                         f"below 1 first (e.g. to 1 - 1e-4 as ComfyUI's SNR samplers do)")
    return tt / (1.0 - tt)


def sigma_to_flow(sigma) -> np.ndarray:
    """Flow time of pyengine's sigma: t = sigma / (1 + sigma) (inf -> 1)."""
    s = np.asarray(sigma, dtype=np.float64)
    if np.any(np.isnan(s)) or np.any(s < 0):
        raise ValueError(f"sigma must be non-negative, got {sigma!r}")
    return np.where(np.isinf(s), 1.0, s / (1.0 + np.where(np.isinf(s), 0.0, s)))


# ---------------------------------------------------------------------------------------
# ComfyUI's model sampling and schedulers (comfy/model_sampling.py, comfy/samplers.py)
# ---------------------------------------------------------------------------------------


class ModelSampling:
    """A model's noise-level table the way ComfyUI's model_sampling holds it, in float64.

    ``sigmas``: ascending training levels in ComfyUI's units (sigma of x / s for eps / v
    models, flow time t for flow models); ``timestep(sigma)`` / ``sigma(timestep)`` its time
    map; ``flow``: True for flow (CONST) models. Build one with :meth:`discrete`,
    :meth:`flow_shift`, :meth:`flux`, :meth:`continuous` or :func:`model_sampling_for`."""

    def __init__(self, sigmas, timestep, sigma, *, flow: bool, name: str):
        self.sigmas = np.asarray(sigmas, dtype=np.float64)
        self._timestep, self._sigma = timestep, sigma
        self.flow, self.name = bool(flow), name

    sigma_min = property(lambda self: float(self.sigmas[0]))
    sigma_max = property(lambda self: float(self.sigmas[-1]))

    def timestep(self, sigma):
        return self._timestep(np.asarray(sigma, dtype=np.float64))

    def sigma(self, timestep):
        return self._sigma(np.asarray(timestep, dtype=np.float64))

    def percent_to_sigma(self, percent: float) -> float:
        """The level at fraction ``percent`` of the way from pure noise (0) to data (1), as
        each ComfyUI model sampling defines it (flow: shift(1 - p); discrete: sigma((1 - p)
        999); continuous: log-uniform between the end levels)."""
        percent = _real(percent, "percent")
        if math.isnan(percent):
            raise ValueError("percent must be a number in [0, 1], got nan")
        if percent <= 0.0:
            return 1.0 if self.flow else 999999999.9
        if percent >= 1.0:
            return 0.0
        if self.flow:
            return float(self.sigma((1.0 - percent) * self._multiplier))
        if self.name == "continuous":
            lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
            return math.exp((hi - lo) * (1.0 - percent) + lo)
        return float(self.sigma((1.0 - percent) * 999.0))

    def to_sigma(self, levels) -> np.ndarray:
        """pyengine sigmas (of x / s) of levels in this table's units."""
        return flow_to_sigma(levels) if self.flow else np.asarray(levels, dtype=np.float64)

    @classmethod
    def discrete(cls, sigmas_table) -> ModelSampling:
        """ModelSamplingDiscrete: the table sqrt((1 - alpha_bar) / alpha_bar) of the training
        timesteps; timestep = nearest table index in log sigma, sigma = log-linear in t."""
        table = _as_list(sigmas_table, "sigmas_table")
        if table.size < 2 or not np.all(np.isfinite(table)) or np.any(table <= 0) or \
                np.any(np.diff(table) <= 0):
            raise ValueError(f"sigmas_table must hold at least 2 positive, finite, strictly "
                             f"increasing levels, got {table.size} levels")
        logs = np.log(table)
        idx = np.arange(table.size, dtype=np.float64)

        def timestep(s):
            return np.abs(np.log(s)[..., None] - logs).argmin(axis=-1).astype(np.float64)

        def sigma(t):
            tt = np.clip(t, 0, table.size - 1)
            return np.exp(np.interp(tt, idx, logs))
        return cls(table, timestep, sigma, flow=False, name="discrete")

    @classmethod
    def flow_shift(cls, shift: float = 1.0, multiplier: float = 1000.0,
                   timesteps: int = 1000) -> ModelSampling:
        """ModelSamplingDiscreteFlow (SD3, AuraFlow, Wan, ...): table time_snr_shift(shift,
        k / timesteps), k = 1..timesteps; timestep = t * multiplier."""
        _positive(shift, "shift")
        ts = np.arange(1, int(timesteps) + 1, dtype=np.float64) / int(timesteps)

        def sigma(t):
            return time_snr_shift(np.clip(t / multiplier, 0.0, 1.0), shift)
        ms = cls(time_snr_shift(ts, shift), lambda s: s * multiplier, sigma, flow=True,
                 name=f"flow(shift={shift:g})")
        ms._multiplier = float(multiplier)
        return ms

    @classmethod
    def flux(cls, mu: float = 1.15, timesteps: int = 10000) -> ModelSampling:
        """ModelSamplingFlux: table time_shift_exponential(k / timesteps, mu), k = 1..timesteps;
        the model time is t itself (multiplier 1)."""
        ts = np.arange(1, int(timesteps) + 1, dtype=np.float64) / int(timesteps)

        def sigma(t):
            return time_shift_exponential(np.clip(t, 0.0, 1.0), mu)
        ms = cls(time_shift_exponential(ts, mu), lambda s: s * 1.0, sigma, flow=True,
                 name=f"flux(mu={mu:g})")
        ms._multiplier = 1.0
        return ms

    @classmethod
    def continuous(cls, sigma_min: float, sigma_max: float) -> ModelSampling:
        """ModelSamplingContinuousEDM: 1000 levels uniform in log sigma; timestep = log(sigma)/4."""
        _check_range(2, sigma_min, sigma_max)
        table = np.exp(np.linspace(math.log(sigma_min), math.log(sigma_max), 1000))
        return cls(table, lambda s: 0.25 * np.log(s), lambda t: np.exp(t / 0.25), flow=False,
                   name="continuous")

    def __repr__(self) -> str:
        return f"ModelSampling.{self.name}"


def model_sampling_for(process) -> ModelSampling:
    """The ComfyUI model sampling of a pyengine process: the discrete VP table, the flow table
    with the process's shift, or 1000 log-uniform levels over the process's range."""
    if hasattr(process, "num_train_timesteps") and hasattr(process, "sigmas"):
        return ModelSampling.discrete(process.sigmas)
    if getattr(process, "name", None) == "flow":
        return ModelSampling.flow_shift(process.shift)
    return ModelSampling.continuous(process.sigma_min, process.sigma_max)


def _steps(n, name="steps") -> int:
    return _count(n, name)


def simple(ms: ModelSampling, steps: int) -> np.ndarray:
    """ComfyUI "simple": table[-(1 + floor(i * N / steps))] for i < steps, then 0."""
    steps = _steps(steps)
    ss = ms.sigmas.size / steps
    return np.array([ms.sigmas[-(1 + int(i * ss))] for i in range(steps)] + [0.0])


def ddim_uniform(ms: ModelSampling, steps: int) -> np.ndarray:
    """ComfyUI "ddim_uniform": every (N // steps)-th table level from index 1 up, reversed,
    then 0 (no 0 appended when the table's second level is already ~0)."""
    steps = _steps(steps)
    t = ms.sigmas
    zero_at_1 = math.isclose(float(t[1]), 0.0, abs_tol=1e-5)
    if zero_at_1:
        steps += 1
    stride = max(t.size // steps, 1)
    picked = [float(t[x]) for x in range(1, t.size, stride)]
    return np.array(picked[::-1] + ([] if zero_at_1 else [0.0]))


def normal(ms: ModelSampling, steps: int, sgm: bool = False) -> np.ndarray:
    """ComfyUI "normal" (sgm=True: "sgm_uniform"): sigma(t) at t uniform from
    timestep(sigma_max) to timestep(sigma_min) (sgm: steps + 1 points, last dropped), then 0
    (no 0 appended when sigma at the end is already ~0)."""
    steps = _steps(steps)
    start, end = float(ms.timestep(ms.sigma_max)), float(ms.timestep(ms.sigma_min))
    zero = True
    if sgm:
        ts = np.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0.0, abs_tol=1e-5):
            steps += 1
            zero = False
        ts = np.linspace(start, end, steps)
    s = ms.sigma(ts)
    return np.concatenate([s, [0.0]]) if zero else s


def sgm_uniform(ms: ModelSampling, steps: int) -> np.ndarray:
    """ComfyUI "sgm_uniform": :func:`normal` with sgm=True."""
    return normal(ms, steps, sgm=True)


def beta(ms: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """ComfyUI "beta" (Lee et al. 2024): table[rint(BetaPPF(1 - i/steps) (N - 1))] for
    i < steps, consecutive repeats dropped (so fewer levels are possible), then 0."""
    from scipy.stats import beta as _beta
    steps = _steps(steps)
    _positive(alpha, "alpha")
    _positive(beta, "beta")
    total = ms.sigmas.size - 1
    ts = np.rint(_beta.ppf(1.0 - np.linspace(0.0, 1.0, steps, endpoint=False), alpha, beta)
                 * total)
    out, last = [], -1.0
    for t in ts:
        if t != last:
            out.append(float(ms.sigmas[int(t)]))
        last = t
    return np.array(out + [0.0])


def linear_quadratic(ms: ModelSampling, steps: int, threshold_noise: float = 0.025,
                     linear_steps: int | None = None) -> np.ndarray:
    """ComfyUI "linear_quadratic" (Mochi): 1 - t_i with t linear up to ``threshold_noise`` over
    ``linear_steps`` (steps // 2) steps, then quadratic to 1, times sigma_max; ends in 0."""
    steps = _steps(steps)
    threshold_noise = _real(threshold_noise, "threshold_noise")
    if not 0.0 < threshold_noise < 1.0:
        raise ValueError(f"threshold_noise must lie in (0, 1), got {threshold_noise!r}")
    if steps == 1:
        return np.array([1.0, 0.0]) * ms.sigma_max
    L = steps // 2 if linear_steps is None else _steps(linear_steps, "linear_steps")
    if L >= steps:
        raise ValueError(f"linear_steps must be below steps={steps}, got {linear_steps!r}")
    lin = [i * threshold_noise / L for i in range(L)]
    diff = L - threshold_noise * steps
    q = steps - L
    qc = diff / (L * q * q)
    lc = threshold_noise / L - 2.0 * diff / (q * q)
    const = qc * L * L
    quad = [qc * i * i + lc * i + const for i in range(L, steps)]
    return (1.0 - np.array(lin + quad + [1.0])) * ms.sigma_max


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """ComfyUI "kl_optimal" (AYS appendix / A1111 #15608): uniform in arctan sigma,
    tan((1 - i/(n-1)) atan(sigma_max) + i/(n-1) atan(sigma_min)), then 0 (n = 1: sigma_max)."""
    n = _steps(n, "n (number of steps)")
    _check_range(2, sigma_min, sigma_max)
    r = np.arange(n) / (n - 1) if n > 1 else np.zeros(1)
    return np.concatenate([np.tan(r * math.atan(sigma_min) + (1 - r) * math.atan(sigma_max)),
                           [0.0]])


#: Align Your Steps 10-step levels (Sabour et al. 2024; ComfyUI nodes_align_your_steps.py).
AYS_LEVELS = {
    "SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177,
            1.3943805092, 0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662,
            0.0291671582],
    "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945,
             0.8620721141, 0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177,
             0.0291671582],
    "SVD": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def loglinear_interp(levels, n: int) -> np.ndarray:
    """n levels log-linearly interpolated along a decreasing list (AYS's interpolation)."""
    lv = _as_list(levels, "levels")
    if lv.size < 2 or not np.all(np.isfinite(lv)) or np.any(lv <= 0) or np.any(np.diff(lv) >= 0):
        raise ValueError(f"levels must hold at least 2 positive, finite, strictly decreasing "
                         f"levels, got {lv.tolist()!r}")
    n = _steps(n, "n")
    ys = np.log(lv[::-1])
    return np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, lv.size), ys))[::-1].copy()


def align_your_steps(model_type: str, steps: int, denoise: float = 1.0) -> np.ndarray:
    """ComfyUI's AlignYourStepsScheduler: the model's 10-step list, log-linearly interpolated
    to steps + 1 levels, the last ``round(steps * denoise)`` steps kept, the last level set
    to 0 (the list's own smallest level is replaced, as ComfyUI does)."""
    if model_type not in AYS_LEVELS:
        raise ValueError(f"model_type must be one of {sorted(AYS_LEVELS)}, got {model_type!r}")
    steps = _steps(steps)
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must lie in (0, 1], got {denoise!r}")
    total = round(steps * denoise) if denoise < 1.0 else steps
    lv = np.asarray(AYS_LEVELS[model_type], dtype=np.float64)
    if steps + 1 != lv.size:
        lv = loglinear_interp(lv, steps + 1)
    lv = lv[-(total + 1):].copy()
    lv[-1] = 0.0
    return lv


def flux_mu_for_size(width: int, height: int, max_shift: float = 1.15,
                     base_shift: float = 0.5) -> float:
    """ComfyUI's ModelSamplingFlux shift for an image of width x height pixels: flow_mu of
    width * height / 256 latent tokens on the line through (256, base_shift), (4096,
    max_shift)."""
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return flow_mu(width * height / 256.0, 256, 4096, base_shift, max_shift)


def ltxv_sigmas(steps: int, max_shift: float = 2.05, base_shift: float = 0.95,
                stretch: bool = True, terminal: float = 0.1, tokens: int = 4096) -> np.ndarray:
    """ComfyUI's LTXVScheduler: t = linspace(1, 0, steps + 1), the dynamic exponential shift
    with mu = flow_mu(tokens, 1024, 4096, base_shift, max_shift) on the nonzero levels, then
    (``stretch``) the terminal stretch of those levels to ``terminal``; ends in 0."""
    steps = _steps(steps)
    mu = flow_mu(tokens, 1024, 4096, base_shift, max_shift)
    t = np.linspace(1.0, 0.0, steps + 1)
    t[:-1] = time_shift_exponential(t[:-1], mu)
    if stretch:
        t[:-1] = stretch_to_terminal(t[:-1], terminal)
    return t


def manual_sigmas(text: str) -> np.ndarray:
    """Levels typed as text ("14.6, 7.2, 3.1, 0"), as ComfyUI's ManualSigmas node reads them:
    every number in the string, in order."""
    import re
    if not isinstance(text, str):
        raise ValueError(f"sigmas must be a string of numbers, got {type(text).__name__}")
    nums = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text)
    if not nums:
        raise ValueError(f"sigmas holds no number: {text!r}")
    return np.array([float(v) for v in nums], dtype=np.float64)


# ---------------------------------------------------------------------------------------
# Cutting and flipping sigma lists (img2img, two-stage sampling, inversion)
# ---------------------------------------------------------------------------------------


def _as_list(sigmas, name="sigmas") -> np.ndarray:
    if getattr(sigmas, "is_meta", False):
        raise ValueError(f"{name} is a tensor on the meta device (it has no values)")
    if hasattr(sigmas, "detach"):
        sigmas = sigmas.detach().cpu()
    try:
        s = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a sequence of numbers ({e})") from None
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(s.shape)}")
    return s


def split_at(sigmas, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas[:step + 1], sigmas[step:]): the first ``step`` steps and the rest, sharing the
    level at the cut (ComfyUI's SplitSigmas)."""
    s = _as_list(sigmas)
    if isinstance(step, bool) or int(step) != step or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return s[:int(step) + 1].copy(), s[int(step):].copy()


def split_denoise(sigmas, denoise: float) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) with ``low`` the last round(steps * denoise) steps (img2img strength) and
    ``high`` the levels before them (ComfyUI's SplitSigmasDenoise)."""
    s = _as_list(sigmas)
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must lie in [0, 1], got {denoise!r}")
    k = round(max(s.size - 1, 0) * denoise)
    return s[:s.size - k].copy(), s[s.size - k - 1:].copy()


def truncate_denoise(sigmas_of_steps, steps: int, denoise: float) -> np.ndarray:
    """ComfyUI's scheduler ``denoise``: build a schedule for int(steps / denoise) steps with
    ``sigmas_of_steps(total)`` and keep its last steps + 1 levels."""
    steps = _steps(steps)
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must lie in (0, 1], got {denoise!r}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    return np.asarray(sigmas_of_steps(total), dtype=np.float64)[-(steps + 1):].copy()


def flip(sigmas, first: float = 1e-4) -> np.ndarray:
    """The list reversed (for inversion: data towards noise); a leading 0 becomes ``first``
    (ComfyUI's FlipSigmas uses 1e-4)."""
    s = _as_list(sigmas)[::-1].copy()
    first = _real(first, "first")
    if not (0.0 < first < math.inf):
        raise ValueError(f"first (the level that replaces a leading 0) must be a positive "
                         f"finite number, got {first!r}")
    if s.size and s[0] == 0:
        s[0] = first
    return s



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


def _comfy(fn):
    """A ComfyUI scheduler as a named schedule of a process: its model sampling
    (:func:`model_sampling_for`), levels converted to pyengine sigmas. A flow time of 1
    (ComfyUI starts flow schedules there: sigma = inf) becomes percent_to_sigma(1e-4), the
    level ComfyUI's own SNR samplers put there (offset_first_sigma_for_snr)."""
    def build(p, n, z, **kw):
        ms = model_sampling_for(p)
        lv = np.asarray(fn(ms, n, **kw), dtype=np.float64)
        if ms.flow:
            lv = np.where(lv >= 1.0, ms.percent_to_sigma(1e-4), lv)
        s = ms.to_sigma(lv)
        if not z and s[-1] == 0:
            s = s[:-1]
        return validate(s)
    return build


#: ComfyUI's scheduler names (comfy/samplers.py SCHEDULER_HANDLERS) -> functions of
#: (ModelSampling, steps) returning levels in the model's own units, ending in 0.
COMFY_SCHEDULERS = {
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "karras": lambda ms, n, **kw: karras(n, ms.sigma_min, ms.sigma_max, **kw),
    "exponential": lambda ms, n: exponential(n, ms.sigma_min, ms.sigma_max),
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "normal": normal,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": lambda ms, n: kl_optimal(n, ms.sigma_min, ms.sigma_max),
}

for _name in ("simple", "sgm_uniform", "ddim_uniform", "beta", "normal", "linear_quadratic",
              "kl_optimal"):
    SCHEDULES[_name] = _comfy(COMFY_SCHEDULERS[_name])


def get_sigmas(schedule: str, process, n: int, append_zero: bool = True, **kw) -> np.ndarray:
    """A named schedule for ``process`` with exactly ``n`` steps: n positive levels and a final
    0 with ``append_zero``, else n + 1 positive levels ending at the low end of the range."""
    try:
        build = SCHEDULES[schedule]
    except (KeyError, TypeError):
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}") from None
    n = _count(n)
    if not callable(getattr(process, "sigma_of_t", None)):
        raise ValueError(f"process must be a pyengine process (pe.processes.*), got "
                         f"{type(process).__name__}")
    if not (append_zero or schedule in ("leading", "trailing", "linspace")):
        n += 1
    try:
        return build(process, n, append_zero, **dict(kw))
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        bad = str(exc).rsplit(" ", 1)[-1]
        raise ValueError(f"schedule {schedule!r} has no option {bad} (schedule_options "
                         f"{sorted(kw)})") from None
