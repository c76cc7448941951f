"""Forward processes in the canonical form x_t = s(t) * (x_0 + sigma(t) * eps).

A process is the pair of functions s(t) (scale) and sigma(t) (noise level of the
scaled state x/s), plus the model's time convention. Everything downstream
(schedules, solvers, kernels) works with sigma alone; the process supplies

* ``s_of_sigma(sigma)``   the scale at a noise level,
* ``t_of_sigma(sigma)``   the time value the model is called with,
* ``sigma_of_t(t)`` / ``s_of_t(t)`` the process as a function of its own time,
* ``sigma_min`` / ``sigma_max`` the trained range (defaults for schedules),
* ``prior_std(sigma)``    the standard deviation of x at sigma for data of unit
  variance, which is how standard-normal noise is scaled to the first level.

All functions take and return float64 numpy arrays (or Python floats).

| process | s(t) | sigma(t) |
|---|---|---|
| VP / DDPM | sqrt(alpha_bar) | sqrt((1 - alpha_bar) / alpha_bar) |
| sub-VP    | sqrt(alpha_bar) | (1 - alpha_bar) / sqrt(alpha_bar) |
| VE        | 1               | sigma_min (sigma_max / sigma_min)^t |
| EDM       | 1               | t |
| flow      | 1 - t           | t / (1 - t) |
"""

from __future__ import annotations

import math

import numpy as np

from .errors import check_int, check_real

__all__ = ["Process", "VP", "VPDiscrete", "VPContinuous", "SubVP", "VE", "EDM", "RectifiedFlow",
           "betas_for", "NAMED", "named", "describe"]


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def _ret(x, like):
    """Return a Python float for scalar input, an array otherwise."""
    return float(x) if np.ndim(like) == 0 else x


class Process:
    """Base class: a forward process x_t = s(t) (x_0 + sigma(t) eps)."""

    name = "process"
    #: "sigma" when the model takes sigma itself as its time input (EDM).
    time_kind = "t"

    sigma_min: float
    sigma_max: float

    # -- to override -------------------------------------------------------------------
    def sigma_of_t(self, t):
        raise NotImplementedError

    def s_of_t(self, t):
        raise NotImplementedError

    def t_of_sigma(self, sigma):
        raise NotImplementedError

    def s_of_sigma(self, sigma):
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------
    def model_time(self, sigma):
        """The time value the model is called with at noise level sigma."""
        return self.t_of_sigma(sigma)

    def sigma_of_model_time(self, t):
        """Inverse of :meth:`model_time`."""
        return self.sigma_of_t(t)

    def prior_std(self, sigma):
        """Std of x at noise level sigma for unit-variance data: s * sqrt(sigma^2 + 1)."""
        sg = _f64(sigma)
        return _ret(self.s_of_sigma(sg) * np.sqrt(sg * sg + 1.0), sigma)

    def alpha_sigma_dpm(self, sigma):
        """(alpha_t, sigma_t) in DPM-Solver notation: alpha = s, sigma_dpm = s * sigma."""
        s = self.s_of_sigma(sigma)
        return s, s * _f64(sigma)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sigma_min={self.sigma_min:.4g}, "
                f"sigma_max={self.sigma_max:.4g})")


# ---------------------------------------------------------------------------------------
# VP (DDPM): discrete tables and continuous beta(t)
# ---------------------------------------------------------------------------------------


#: The most training timesteps of a discrete VP process (diffusers' models use 1000 to 4000;
#: the tables are float64 arrays of this length).
MAX_TRAIN_TIMESTEPS = 1_000_000


def betas_for(beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
              beta_end: float = 2e-2, trained_betas=None) -> np.ndarray:
    """The float64 beta table of a discrete VP process.

    ``linear``: linspace(beta_start, beta_end); ``scaled_linear``: linspace of sqrt, squared
    (Stable Diffusion); ``squaredcos_cap_v2`` / ``cosine``: Nichol & Dhariwal 2021 eq. 17 with
    s = 0.008 and betas capped at 0.999; or an explicit ``trained_betas`` table.
    """
    if trained_betas is not None:
        b = _f64(trained_betas).reshape(-1)
        if b.size < 2 or not np.all(np.isfinite(b)) or np.any(b <= 0) or np.any(b >= 1):
            raise ValueError("trained_betas must be a table of at least 2 values in (0, 1)")
        return b
    n = check_int("num_train_timesteps", num_train_timesteps, lo=2, hi=MAX_TRAIN_TIMESTEPS)
    if beta_schedule == "linear":
        b = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        b = np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    elif beta_schedule in ("squaredcos_cap_v2", "cosine"):
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        b = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    else:
        raise ValueError(
            f"beta_schedule must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2', "
            f"'cosine', got {beta_schedule!r}")
    if not (0 < b.min() and b.max() < 1):
        raise ValueError("betas must lie in (0, 1); check beta_start and beta_end")
    return b


class VPDiscrete(Process):
    """DDPM's discrete VP process: alpha_bar_t = prod_{i<=t} (1 - beta_i), t = 0..N-1.

    The model is called with the (possibly fractional) timestep. Between table entries,
    sigma is interpolated linearly in log sigma against t (as k-diffusion and diffusers do).
    """

    name = "vp_discrete"

    def __init__(self, beta_schedule: str = "linear", *, beta_start: float = 1e-4,
                 beta_end: float = 2e-2, num_train_timesteps: int = 1000, trained_betas=None):
        self.beta_schedule = "trained" if trained_betas is not None else beta_schedule
        self.betas = betas_for(beta_schedule, num_train_timesteps, beta_start, beta_end,
                               trained_betas)
        self.num_train_timesteps = int(self.betas.size)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        self.log_sigmas = np.log(self.sigmas)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def sigma_of_t(self, t):
        tt = _f64(t)
        if np.any(tt < 0) or np.any(tt > self.num_train_timesteps - 1):
            raise ValueError(f"t must lie in [0, {self.num_train_timesteps - 1}]")
        return _ret(np.exp(np.interp(tt, np.arange(self.num_train_timesteps), self.log_sigmas)), t)

    def s_of_t(self, t):
        return self.s_of_sigma(self.sigma_of_t(t))

    def t_of_sigma(self, sigma):
        sg = _f64(sigma)
        with np.errstate(divide="ignore"):
            ls = np.log(np.maximum(sg, 1e-300))
        t = np.interp(ls, self.log_sigmas, np.arange(self.num_train_timesteps, dtype=np.float64))
        # Snap values that are integers to rounding so table points map to exact timesteps.
        r = np.round(t)
        t = np.where(np.abs(t - r) < 1e-9, r, t)
        return _ret(t, sigma)

    def s_of_sigma(self, sigma):
        sg = _f64(sigma)
        return _ret(1.0 / np.sqrt(1.0 + sg * sg), sigma)

    def __repr__(self) -> str:
        return (f"VP.discrete({self.beta_schedule!r}, num_train_timesteps="
                f"{self.num_train_timesteps})")


def _vp_log_abar(t, beta_min, beta_max):
    return -0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min


class VPContinuous(Process):
    """score_sde's VP SDE with linear beta(t) = beta_min + t (beta_max - beta_min), t in [eps, 1].

    alpha_bar(t) = exp(-t^2 (beta_max - beta_min) / 2 - t beta_min); model time is t.
    """

    name = "vp_continuous"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        beta_min = check_real("beta_min", beta_min, lo=0.0, lo_open=True)
        beta_max = check_real("beta_max", beta_max, lo=0.0, lo_open=True)
        if not (0 < beta_min < beta_max):
            raise ValueError("need 0 < beta_min < beta_max")
        t_min = check_real("t_min", t_min, lo=0.0, hi=1.0, lo_open=True)
        if t_min >= 1.0:
            raise ValueError(f"t_min must lie in (0, 1), got {t_min!r}")
        self.beta_min, self.beta_max, self.t_min = beta_min, beta_max, t_min
        self.sigma_min = float(self.sigma_of_t(self.t_min))
        self.sigma_max = float(self.sigma_of_t(1.0))

    def _log_abar(self, t):
        # log alpha_bar = 2 * log_mean_coeff of score_sde
        return 2.0 * _vp_log_abar(_f64(t), self.beta_min, self.beta_max)

    def sigma_of_t(self, t):
        return _ret(np.sqrt(np.expm1(-self._log_abar(t))), t)

    def s_of_t(self, t):
        return _ret(np.exp(0.5 * self._log_abar(t)), t)

    def _t_of_log_abar(self, log_abar):
        # Solve 0.5 t^2 (bmax - bmin) + t bmin = -log_abar for t >= 0.
        a, b = self.beta_max - self.beta_min, self.beta_min
        c = -_f64(log_abar)
        return 2.0 * c / (b + np.sqrt(b * b + 2.0 * a * c))

    def t_of_sigma(self, sigma):
        sg = _f64(sigma)
        return _ret(self._t_of_log_abar(-np.log1p(sg * sg)), sigma)

    def s_of_sigma(self, sigma):
        sg = _f64(sigma)
        return _ret(1.0 / np.sqrt(1.0 + sg * sg), sigma)


class SubVP(VPContinuous):
    """score_sde's sub-VP SDE: s = sqrt(alpha_bar), sigma = (1 - alpha_bar) / sqrt(alpha_bar)."""

    name = "sub_vp"

    def sigma_of_t(self, t):
        la = self._log_abar(t)
        return _ret(-np.expm1(la) / np.exp(0.5 * la), t)

    def _sqrt_abar(self, sigma):
        # u = sqrt(alpha_bar) solves u^2 + sigma u - 1 = 0
        sg = _f64(sigma)
        return 2.0 / (sg + np.sqrt(sg * sg + 4.0))

    def t_of_sigma(self, sigma):
        return _ret(self._t_of_log_abar(2.0 * np.log(self._sqrt_abar(sigma))), sigma)

    def s_of_sigma(self, sigma):
        return _ret(self._sqrt_abar(sigma), sigma)


class VP:
    """Namespace of the VP constructors: ``VP.discrete(...)`` and ``VP.continuous(...)``."""

    @staticmethod
    def discrete(beta_schedule: str = "linear", **kw) -> VPDiscrete:
        return VPDiscrete(beta_schedule, **kw)

    @staticmethod
    def continuous(beta_min: float = 0.1, beta_max: float = 20.0,
                   t_min: float = 1e-3) -> VPContinuous:
        return VPContinuous(beta_min, beta_max, t_min)

    @staticmethod
    def sub_vp(beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> SubVP:
        return SubVP(beta_min, beta_max, t_min)


# ---------------------------------------------------------------------------------------
# VE, EDM, rectified flow
# ---------------------------------------------------------------------------------------


class VE(Process):
    """SMLD / NCSN: s = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t, t in [0, 1]."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        sigma_min = check_real("sigma_min", sigma_min, lo=0.0, lo_open=True)
        sigma_max = check_real("sigma_max", sigma_max, lo=0.0, lo_open=True)
        if not (0 < sigma_min < sigma_max):
            raise ValueError("need 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sigma_of_t(self, t):
        return _ret(self.sigma_min * (self.sigma_max / self.sigma_min) ** _f64(t), t)

    def s_of_t(self, t):
        return _ret(np.ones_like(_f64(t)), t)

    def t_of_sigma(self, sigma):
        sg = np.maximum(_f64(sigma), 1e-300)
        return _ret(np.log(sg / self.sigma_min) / math.log(self.sigma_max / self.sigma_min), sigma)

    def s_of_sigma(self, sigma):
        return _ret(np.ones_like(_f64(sigma)), sigma)

    def prior_std(self, sigma):
        # VE's prior is N(0, sigma_max^2 I) (score_sde, diffusers' ScoreSdeVe).
        return _ret(_f64(sigma) * 1.0, sigma)


class EDM(VE):
    """Karras et al. 2022: s = 1, sigma(t) = t; the model is called with sigma itself."""

    name = "edm"
    time_kind = "sigma"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        super().__init__(sigma_min, sigma_max)
        self.sigma_data = check_real("sigma_data", sigma_data, lo=0.0, lo_open=True)

    def sigma_of_t(self, t):
        return _ret(_f64(t) * 1.0, t)

    def t_of_sigma(self, sigma):
        return _ret(_f64(sigma) * 1.0, sigma)


class RectifiedFlow(Process):
    """Rectified flow / flow matching: x_t = (1 - t) x_0 + t eps, so s = 1 - t, sigma = t / (1 - t).

    ``shift`` is the timestep shift of flow-matching models (SD3: 3.0): schedules that are
    uniform in t warp it as t' = shift t / (1 + (shift - 1) t). ``time_scale`` multiplies t
    before the model sees it (1000 for diffusers' flow-matching transformers).
    """

    name = "flow"

    def __init__(self, shift: float = 1.0, time_scale: float = 1.0, t_min: float = 1e-3,
                 t_max: float = 1.0 - 1e-3):
        shift = check_real("shift", shift, lo=0.0, lo_open=True)
        time_scale = check_real("time_scale", time_scale, lo=0.0, lo_open=True)
        if not (0 < t_min < t_max < 1):
            raise ValueError("need 0 < t_min < t_max < 1")
        self.shift, self.time_scale = float(shift), float(time_scale)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.sigma_min = float(self.sigma_of_t(t_min))
        self.sigma_max = float(self.sigma_of_t(t_max))

    def warp(self, t):
        """The timestep shift applied to uniform-in-t schedules."""
        tt = _f64(t)
        return _ret(self.shift * tt / (1.0 + (self.shift - 1.0) * tt), t)

    def sigma_of_t(self, t):
        tt = _f64(t)
        with np.errstate(divide="ignore"):
            return _ret(tt / (1.0 - tt), t)

    def s_of_t(self, t):
        return _ret(1.0 - _f64(t), t)

    def t_of_sigma(self, sigma):
        sg = _f64(sigma)
        return _ret(sg / (1.0 + sg), sigma)

    def s_of_sigma(self, sigma):
        sg = _f64(sigma)
        return _ret(1.0 / (1.0 + sg), sigma)

    def model_time(self, sigma):
        return _ret(self.time_scale * _f64(self.t_of_sigma(sigma)), sigma)

    def sigma_of_model_time(self, t):
        return self.sigma_of_t(_f64(t) / self.time_scale)

    def __repr__(self) -> str:
        return f"RectifiedFlow(shift={self.shift:g})"


# ---------------------------------------------------------------------------------------
# the named processes: the one list the CLI, the plots and the tests read
# ---------------------------------------------------------------------------------------

#: name -> (description, constructor)
NAMED: dict = {
    "vp": ("VP discrete, linear betas 1e-4..0.02, 1000 steps (DDPM)",
           lambda: VP.discrete("linear")),
    "vp_scaled_linear": ("VP discrete, scaled-linear betas 0.00085..0.012 (Stable Diffusion)",
                         lambda: VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)),
    "vp_cosine": ("VP discrete, cosine alpha_bar (Nichol & Dhariwal)",
                  lambda: VP.discrete("squaredcos_cap_v2")),
    "vp_continuous": ("VP SDE, beta 0.1..20 (score_sde)", VP.continuous),
    "sub_vp": ("sub-VP SDE (score_sde)", VP.sub_vp),
    "ve": ("VE, sigma 0.01..50 (SMLD/NCSN)", VE),
    "edm": ("EDM, sigma 0.002..80 (Karras 2022)", EDM),
    "flow": ("rectified flow / flow matching", RectifiedFlow),
    "flow_shift3": ("rectified flow, timestep shift 3, model time 0..1000 (SD3)",
                    lambda: RectifiedFlow(shift=3.0, time_scale=1000.0)),
}


def named(name: str) -> Process:
    """A fresh process of the name in :data:`NAMED`."""
    try:
        return NAMED[name][1]()
    except KeyError:
        raise ValueError(f"unknown process {name!r}; known: {', '.join(NAMED)}") from None


def describe(name: str) -> str:
    """The one-line description of a named process."""
    if name not in NAMED:
        raise ValueError(f"unknown process {name!r}; known: {', '.join(NAMED)}")
    return NAMED[name][0]
