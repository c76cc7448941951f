"""The one solver registry: every solver registers its name, order, model evaluations per
step and whether it is stochastic. The CLI, the diffusers adapter and the tests read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

__all__ = ["SolverInfo", "register", "get", "list_solvers", "REGISTRY"]


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

    def configurations(self):
        """[(label, options, order, nfe_per_step)]: the variants, or the default alone."""
        if self.variants:
            return list(self.variants)
        return [(self.name, {}, self.order, self.nfe_per_step)]


REGISTRY: dict[str, SolverInfo] = {}


def register(name, *, order, nfe_per_step, stochastic, family, summary, options=(), variants=(),
             defaults=None, **option_defaults):
    """Register a plan builder ``fn(builder, **options)``.

    Every option needs a default, given as keyword arguments or in ``defaults`` (needed for an
    option called ``order``, which is also this function's keyword for the convergence order).
    ``order`` and ``nfe_per_step`` describe the default configuration."""
    defaults = {**(defaults or {}), **option_defaults}

    def deco(fn):
        if name in REGISTRY:
            raise RuntimeError(f"solver {name!r} registered twice")
        missing = set(options) - set(defaults)
        if missing:
            raise RuntimeError(f"solver {name!r}: options without defaults: {sorted(missing)}")
        REGISTRY[name] = SolverInfo(name=name, build=fn, order=order, nfe_per_step=nfe_per_step,
                                    stochastic=stochastic, family=family, summary=summary,
                                    options=tuple(options), defaults=dict(defaults),
                                    variants=tuple(variants))
        return fn
    return deco


def get(name: str) -> SolverInfo:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def list_solvers() -> list[SolverInfo]:
    return [REGISTRY[k] for k in sorted(REGISTRY)]
