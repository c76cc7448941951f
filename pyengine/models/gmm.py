"""A Gaussian-mixture data distribution with its exact denoiser and exact PF-ODE endpoints.

For p(x0) = sum_m w_m N(mu_m, S_m) and x_hat = x0 + sigma eps, the noisy marginal is
sum_m w_m N(mu_m, S_m + sigma^2 I) and the denoiser is exact:

    D(x_hat; sigma) = sum_m gamma_m(x_hat) [mu_m + S_m (S_m + sigma^2 I)^-1 (x_hat - mu_m)]

with gamma_m the posterior responsibilities. The probability-flow ODE in log sigma,
d x_hat / d log sigma = x_hat - D(x_hat; sigma), is integrated with scipy's DOP853 at
rtol 1e-10 to give the exact endpoint every solver is measured against.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import check_int, check_real
from ..parameterization import output_from_denoised

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """Mixture of M Gaussians in d dimensions; all computation in float64.

    ``covs`` is [M, d, d] (full), [M, d] (diagonal) or [M] (isotropic variances).
    """

    def __init__(self, means, covs, weights=None):
        mu = torch.as_tensor(np.asarray(means, dtype=np.float64))
        if mu.dim() != 2 or mu.numel() == 0:
            raise ValueError(f"means must be [M, d] with M, d >= 1, got shape {tuple(mu.shape)}")
        if not bool(torch.isfinite(mu).all()):
            raise ValueError("means must be finite")
        M, d = mu.shape
        c = torch.as_tensor(np.asarray(covs, dtype=np.float64))
        if c.shape == (M,):
            c = c.view(M, 1, 1) * torch.eye(d, dtype=torch.float64)
        elif c.shape == (M, d):
            c = torch.diag_embed(c)
        elif c.shape != (M, d, d):
            raise ValueError(f"covs must be [M, d, d], [M, d] or [M]; got {tuple(c.shape)}")
        if not bool(torch.isfinite(c).all()):
            raise ValueError("covs must be finite")
        c = 0.5 * (c + c.transpose(1, 2))
        lam, U = torch.linalg.eigh(c)
        if lam.min() < 0:
            raise ValueError("covariances must be positive semi-definite")
        w = torch.full((M,), 1.0 / M, dtype=torch.float64) if weights is None else \
            torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if w.shape != (M,) or not w.min() > 0 or not bool(torch.isfinite(w).all()):
            raise ValueError("weights must be M positive numbers")
        self.means, self.covs, self.weights = mu, c, w / w.sum()
        self.lam, self.U = lam.clamp_min(0.0), U
        self.M, self.d = M, d

    @classmethod
    def random(cls, d: int = 16, M: int = 4, *, seed: int = 0, full: bool = True,
               scale: float = 1.0) -> GaussianMixture:
        """A reproducible random mixture with well-separated means and anisotropic covariances."""
        d, M = check_int("d", d, lo=1), check_int("M", M, lo=1)
        scale = check_real("scale", scale, lo=0.0, lo_open=True)
        g = np.random.default_rng(seed)
        means = g.normal(size=(M, d)) * scale
        if full:
            A = g.normal(size=(M, d, d)) / math.sqrt(d)
            covs = 0.05 * scale ** 2 * (A @ A.transpose(0, 2, 1) + 0.2 * np.eye(d))
        else:
            covs = (0.05 + 0.2 * g.random(M)) * scale ** 2
        weights = 0.5 + g.random(M)
        return cls(means, covs, weights)

    # -- sampling and density -------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        n = check_int("n", n, lo=1)
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.d, dtype=torch.float64, generator=generator)
        L = self.U * self.lam.sqrt().unsqueeze(1)          # U diag(sqrt(lam))
        return self.means[comp] + torch.einsum("nij,nj->ni", L[comp], z)

    def _parts(self, x_hat: torch.Tensor, sigma):
        """Per-component log N(x_hat; mu, S + sigma^2) [B, M] and projected coordinates."""
        x = x_hat.to(torch.float64).reshape(x_hat.shape[0], -1)
        if x.shape[1] != self.d:
            raise ValueError(f"expected states with {self.d} elements per sample, got {x.shape[1]}")
        s = torch.as_tensor(sigma, dtype=torch.float64)
        if s.device.type == "cpu" and not bool(((s >= 0) & torch.isfinite(s)).all()):
            raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
        s2 = s.reshape(-1, 1, 1) ** 2                                              # [B|1,1,1]
        y = torch.einsum("mji,bmj->bmi", self.U, x[:, None, :] - self.means[None])  # [B, M, d]
        var = self.lam[None] + s2                                                 # [B, M, d]
        logn = -0.5 * ((y * y) / var).sum(-1) - 0.5 * torch.log(var).sum(-1) \
            - 0.5 * self.d * math.log(2 * math.pi)
        return x, y, var, logn

    def log_prob(self, x_hat: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """Exact log-density of the noisy marginal at level sigma (sigma=0: the data)."""
        _, _, _, logn = self._parts(x_hat, sigma)
        return torch.logsumexp(torch.log(self.weights)[None] + logn, dim=1)

    def denoise(self, x_hat: torch.Tensor, sigma) -> torch.Tensor:
        """The exact denoiser D(x_hat; sigma) = E[x0 | x_hat], float64, shape of x_hat."""
        x, y, var, logn = self._parts(x_hat, sigma)
        gam = torch.softmax(torch.log(self.weights)[None] + logn, dim=1)        # [B, M]
        shrunk = y * (self.lam[None] / var)                                       # [B, M, d]
        dm = self.means[None] + torch.einsum("mij,bmj->bmi", self.U, shrunk)      # [B, M, d]
        return (gam.unsqueeze(-1) * dm).sum(1).reshape(x_hat.shape)

    # -- as a model ------------------------------------------------------------------------
    def as_denoiser(self):
        """A k-diffusion-style D(x_hat, sigma) callable (use with pe.Denoiser)."""
        def D(x_hat, sigma):
            return self.denoise(x_hat, sigma.to(torch.float64)).to(x_hat.dtype)
        return D

    def as_model(self, process, prediction: str = "epsilon"):
        """``model(x, t)`` in the process's convention returning the given prediction kind;
        ``t`` is per sample (a [B] tensor, as the request scheduler mixes noise levels in one
        batch) or one time for the whole batch (a number or a 0-d / 1-element tensor)."""
        from ..parameterization import check_prediction
        from ..processes import Process
        if not isinstance(process, Process):
            raise TypeError(f"process must be a pyengine process (pe.processes.*), got "
                            f"{type(process).__name__}")
        prediction = check_prediction(prediction)

        def model(x, t):
            B = x.shape[0]
            tt = torch.as_tensor(t, dtype=torch.float64).detach().cpu().reshape(-1)
            if tt.numel() not in (1, B):
                raise ValueError(f"t must be one time or one per sample ({B}), got "
                                 f"{tt.numel()} values")
            sig = torch.from_numpy(np.asarray(process.sigma_of_model_time(tt.numpy()),
                                              dtype=np.float64).reshape(-1))
            s = torch.from_numpy(np.asarray(process.s_of_sigma(sig.numpy()),
                                            dtype=np.float64).reshape(-1))
            sd = s * sig
            top = torch.isinf(sig)
            if bool(top.any()):
                sig, s, sd, top = (v.expand(B) for v in (sig, s, sd, top))
                # sigma = inf (a flow model at t = 1): x = s sigma eps carries no information
                # about x0, so D is the data mean; s sigma is its finite limit there
                big = 1e300
                s = torch.where(top, torch.zeros_like(s), s)
                sd = torch.where(top, torch.as_tensor(
                    float(np.asarray(process.s_of_sigma(big))) * big, dtype=torch.float64), sd)
            view = (-1,) + (1,) * (x.dim() - 1)
            sig, s, sd = (v.to(x.device).view(view) for v in (sig, s, sd))
            x64 = x.to(torch.float64)
            top = torch.isinf(sig.reshape(-1))
            if bool(top.any()):
                mean = (self.weights[:, None] * self.means).sum(0) / self.weights.sum()
                D = torch.empty_like(x64)
                D[top] = mean.to(x.device).reshape(x.shape[1:])
                if bool((~top).any()):
                    D[~top] = self.denoise(x64[~top] / s[~top], sig[~top].reshape(-1))
            else:
                D = self.denoise(x64 / s, sig.reshape(-1))
            return output_from_denoised(prediction, x64, D, s, sd).to(x.dtype)
        return model

    # -- exact PF-ODE ----------------------------------------------------------------------
    def ode_endpoint(self, x_hat: torch.Tensor, sigma_start: float, sigma_end: float,
                     rtol: float = 1e-10, atol: float = 1e-12) -> torch.Tensor:
        """Exact PF-ODE solution from sigma_start to sigma_end (in the scaled space x_hat).

        Integrates d x_hat / d log sigma = x_hat - D in log sigma (DOP853). For sigma_end = 0
        it integrates to 1e-7 and applies D there (the remaining change is O(sigma^2)).
        """
        from scipy.integrate import solve_ivp

        shape = x_hat.shape
        B = shape[0]
        target = sigma_end if sigma_end > 0 else 1e-7

        def f(ls, y):
            xt = torch.from_numpy(y).view(B, self.d)
            return (xt - self.denoise(xt, math.exp(ls))).reshape(-1).numpy()

        y0 = x_hat.detach().to(torch.float64).reshape(-1).cpu().numpy()
        sol = solve_ivp(f, (math.log(sigma_start), math.log(target)), y0, method="DOP853",
                        rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        out = torch.from_numpy(sol.y[:, -1].copy()).view(B, self.d)
        if sigma_end == 0:
            out = self.denoise(out, target)
        return out.reshape(shape)
