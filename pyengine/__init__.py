"""pyengine: a compiled sampling engine for diffusion models.

Solvers compile to float64 coefficient plans; one fused update kernel per backend runs them.
"""

from . import (backends, noise, parameterization, plan, processes, runtime, sampling, schedules,
               solvers)
from .batching import Request, RequestScheduler
from .inversion import Inverter, invert
from .likelihood import LikelihoodResult, log_likelihood
from .parameterization import Denoiser
from .plan import Plan
from .sampler import Sampler, build_plan
from .solvers import list_solvers
from . import training
from .training import denoising_loss, loss_weight, sample_sigmas
from .tuning.artifact import load_plan
from .tuning.fit import tune

__version__ = "0.1.0"

__all__ = ["Sampler", "build_plan", "Plan", "Denoiser", "list_solvers", "invert", "Inverter",
           "log_likelihood", "LikelihoodResult", "processes", "schedules", "solvers", "backends",
           "noise", "parameterization", "sampling", "plan", "runtime", "RequestScheduler",
           "Request", "load_plan", "__version__"]
__all__ += ["training", "denoising_loss", "loss_weight", "sample_sigmas"]
__all__ += ["tune"]


def __getattr__(name):
    # Lazy submodules with optional dependencies.
    if name in ("integrations", "models", "distributed", "plots"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pyengine' has no attribute {name!r}")
