"""The one solver registry (name, order, model evaluations per step, stochastic), read by the
CLI, the adapters and the tests; with every option's type and range (:data:`OPTION_SPECS`,
:data:`PLAN_SCALARS`), validated only in :func:`check_options` / :func:`check_scalar`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import Option

__all__ = ["SolverInfo", "Option", "register", "get", "list_solvers", "featured",
           "check_options", "check_scalar", "check_timesteps", "REGISTRY", "OPTION_SPECS",
           "EXCLUSIVE", "PLAN_SCALARS", "MAX_STEPS"]

#: The most steps a plan may have. A plan is built on the host in Python: dpmpp_2m takes
#: 1.2 s for 10^4 steps and 12 s for 10^5 (2-core EPYC), so 10^7 would take most of an hour.
MAX_STEPS = 10_000


_REAL_NONNEG = Option("real", lo=0.0)
#: option name -> its type and range, shared by every solver that accepts it (a solver may
#: narrow one in ``register(specs=...)``). Options absent here (sequences such as
#: ``disable_corrector``, ``order_list``) are checked by their solver.
OPTION_SPECS: dict[str, Option] = {
    "eta": _REAL_NONNEG,
    "s_noise": _REAL_NONNEG,
    "s_churn": _REAL_NONNEG,
    "s_tmin": _REAL_NONNEG,
    "s_tmax": Option("real", lo=0.0, allow_inf=True),
    "snr": Option("real", lo=0.0, lo_open=True),
    "n_corrector": Option("int", lo=0, hi=100),
    "order": Option("int", lo=1, hi=3),
    "solver_type": Option("choice", choices=("midpoint", "heun")),
    "algorithm": Option("choice", choices=("dpmsolver++", "dpmsolver")),
    "variance_type": Option("choice", choices=("fixed_small", "fixed_large")),
    "variant": Option("choice", choices=("bh1", "bh2")),
    "lower_order_final": Option("bool"),
    "corrector": Option("bool"),
    # the lambda of the SEEDS family (pyengine.solvers.stochasticity): 0 the PF-ODE, 1 the
    # reverse SDE; None: the solver's own eta
    "stochasticity": Option("real", lo=0.0, hi=1.0, allow_none=True),
}

#: option -> the option it excludes: a solver accepting both refuses both given at values
#: other than their defaults (stochasticity is the solver-independent form of that eta).
EXCLUSIVE: dict[str, str] = {"stochasticity": "eta"}

#: The plan-wide scalars of build_plan / Sampler (None, where allowed, is checked by the
#: caller before).
PLAN_SCALARS: dict[str, Option] = {
    "steps": Option("int", lo=1, hi=MAX_STEPS),
    "init_noise_scale": Option("real", lo=0.0, lo_open=True),
    "guidance_scale": Option("real"),
    "guidance_rescale": Option("real", lo=0.0, hi=1.0),
    "strength": Option("real", lo=0.0, hi=1.0),
    "start_sigma": Option("real", lo=0.0, allow_inf=True),
    "warmup": Option("int", lo=0, hi=100),
}


@dataclass(frozen=True)
class SolverInfo:
    name: str
    build: Callable = field(repr=False)   # build(builder, **options) -> None
    order: int                            # the convergence order it really has (measured)
    nfe_per_step: int                     # model evaluations per step
    stochastic: bool
    family: str
    summary: str
    options: tuple = ()                   # accepted option names
    defaults: dict = field(default_factory=dict, repr=False)
    #: configurations with their own order, for solvers whose options change the order:
    #: tuples (label, options dict, order, nfe_per_step). The order test runs each one.
    variants: tuple = ()
    #: option name -> Option, for the options this solver accepts that have one
    specs: dict = field(default_factory=dict, repr=False)
    #: shown by default where a few solvers stand for all (the CLI demo's digits section)
    featured: bool = False

    def configurations(self):
        """[(label, options, order, nfe_per_step)]: the variants, or the default alone."""
        if self.variants:
            return list(self.variants)
        return [(self.name, {}, self.order, self.nfe_per_step)]


REGISTRY: dict[str, SolverInfo] = {}


def register(name, *, order, nfe_per_step, stochastic, family, summary, options=(), variants=(),
             defaults=None, specs=None, featured=False, **option_defaults):
    """Register a plan builder ``fn(builder, **options)``.

    Every option needs a default, given as keyword arguments or in ``defaults`` (needed for an
    option called ``order``, which is also this function's keyword for the convergence order).
    ``order`` and ``nfe_per_step`` describe the default configuration. ``specs`` narrows an
    option's range from :data:`OPTION_SPECS` for this solver."""
    defaults = {**(defaults or {}), **option_defaults}
    own = {k: v for k, v in OPTION_SPECS.items() if k in options}
    own.update(specs or {})

    def deco(fn):
        if name in REGISTRY:
            raise RuntimeError(f"solver {name!r} registered twice")
        missing = set(options) - set(defaults)
        if missing:
            raise RuntimeError(f"solver {name!r}: options without defaults: {sorted(missing)}")
        REGISTRY[name] = SolverInfo(name=name, build=fn, order=order, nfe_per_step=nfe_per_step,
                                    stochastic=stochastic, family=family, summary=summary,
                                    options=tuple(options), defaults=dict(defaults),
                                    variants=tuple(variants), specs=own,
                                    featured=featured)
        return fn
    return deco


def get(name: str) -> SolverInfo:
    if not isinstance(name, str):
        raise ValueError(f"solver must be a solver's name (a str; pe.list_solvers() lists "
                         f"them), got {type(name).__name__} {name!r}")
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def list_solvers() -> list[SolverInfo]:
    return [REGISTRY[k] for k in sorted(REGISTRY)]


def featured() -> list[SolverInfo]:
    """The solvers registered with ``featured=True`` (a few that stand for the families)."""
    return [i for i in list_solvers() if i.featured]


def check_options(info: SolverInfo, options: dict) -> dict:
    """``options`` of solver ``info`` checked against its specs: unknown names and values of
    the wrong type or out of range raise ValueError naming the option; returns the options
    with the defaults filled in and scalars normalized (float, int, bool)."""
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        accepted = ", ".join(info.options) or "none"
        raise ValueError(f"solver {info.name!r} has no option {unknown[0]!r} (it accepts: "
                         f"{accepted})")
    out = {**info.defaults, **options}
    for key in options:
        spec = info.specs.get(key)
        if spec is not None:
            out[key] = spec.check(key, options[key], f"solver {info.name!r}: ")
    for a, b in EXCLUSIVE.items():
        if a in options and b in options and out[a] != info.defaults.get(a) and \
                out[b] != info.defaults.get(b):
            raise ValueError(f"solver {info.name!r}: give {a}={options[a]!r} or {b}="
                             f"{options[b]!r}, not both ({a} is the solver-independent form "
                             f"of {b}; docs/solvers.md)")
    return out


def check_scalar(name: str, value):
    """A plan-wide scalar (:data:`PLAN_SCALARS`: steps, init_noise_scale, ...) checked."""
    return PLAN_SCALARS[name].check(name, value)


def check_timesteps(timesteps) -> np.ndarray:
    """Explicit model times: a 1-D sequence of finite numbers, as float64."""
    try:
        ts = np.asarray(timesteps, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"timesteps must be a sequence of numbers ({e})") from None
    if ts.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(ts.shape)}")
    if not np.all(np.isfinite(ts)):
        bad = int(np.flatnonzero(~np.isfinite(ts))[0])
        raise ValueError(f"timesteps must be finite; entry {bad} is {ts[bad]}")
    return ts
