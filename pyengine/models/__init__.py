"""Built-in models: the exact Gaussian-mixture denoiser (ground truth for every solver)."""

from .gmm import GaussianMixture

__all__ = ["GaussianMixture"]
