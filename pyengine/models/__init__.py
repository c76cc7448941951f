"""Built-in models: the exact Gaussian-mixture denoiser (ground truth for every solver) and a
small denoiser trained on scikit-learn's 8x8 digits (weights in digits.pt)."""

from .digits import load_digits_model
from .gmm import GaussianMixture

__all__ = ["GaussianMixture", "load_digits_model"]
