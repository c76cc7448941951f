"""Solvers as plans. Importing this package registers every solver family."""

from . import comfy, ddim, dpm, euler, ipndm, sde, unipc  # noqa: F401  (registration side effects)
from . import diffusers_compat  # noqa: F401,E402
from .registry import REGISTRY, SolverInfo, get, list_solvers, register

__all__ = ["REGISTRY", "SolverInfo", "get", "list_solvers", "register"]
