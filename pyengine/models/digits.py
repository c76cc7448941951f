"""A real trained denoiser: 8x8 handwritten digits, EDM preconditioning, weights in the repo.

The network is a small U-Net (8x8 -> 4x4 -> 8x8, residual blocks modulated by a sinusoidal
embedding of the noise level) trained by ``pyengine/models/train_digits.py`` on the 1797
digits that scikit-learn ships (UCI optical digits, pixels 0..16 mapped to [-1, 1]).

It is wrapped in EDM's preconditioning (Karras et al. 2022, Table 1), so it is a denoiser:

    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = log(sigma) / 4

with sd = sigma_data, the data's standard deviation. The process is EDM (s = 1,
sigma(t) = t, the model is called with sigma) and the prediction kind is "sample":

>>> from pyengine.models.digits import load_digits_model, to_pixels
>>> process, model, prediction = load_digits_model()
>>> sampler = pe.Sampler(process, solver="dpmpp_2m", steps=10, prediction=prediction)
>>> x = sampler.sample(model, torch.randn(16, *model.sample_shape), seed=0)
>>> images = to_pixels(x)                          # [16, 8, 8] in [0, 1]

The weights file also holds a small digit classifier and reference statistics of the data
in its feature space; :func:`quality` scores samples with them (a "digits FID").
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..parameterization import edm_scalings

__all__ = ["WEIGHTS", "DigitsClassifier", "DigitsDenoiser", "DigitsUNet", "frechet_distance",
           "from_pixels", "load_checkpoint", "load_digits_model", "quality", "to_pixels"]

#: the committed weights (a plain torch state-dict bundle, torch.load(weights_only=True))
WEIGHTS = Path(__file__).with_name("digits.pt")


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> pixel intensity [0, 1], clipped, shape [B, 8, 8]."""
    return ((x.detach().to(torch.float32).reshape(-1, 8, 8) + 1.0) * 0.5).clamp(0.0, 1.0)


def from_pixels(v: torch.Tensor) -> torch.Tensor:
    """scikit-learn's digit pixels 0..16 ([B, 64]) -> model space [-1, 1], shape [B, 1, 8, 8]."""
    return (torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0) - 1.0


# ---------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------


class _Embed(nn.Module):
    """c_noise -> sinusoidal features -> MLP (the time embedding of DDPM/EDM U-Nets)."""

    def __init__(self, dim: int):
        super().__init__()
        self.half = dim // 2
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        # c_noise = log(sigma) / 4 spans about [-1.6, 1.1]: frequencies 0.5..50 rad per unit
        k = torch.arange(self.half, dtype=torch.float32, device=c_noise.device)
        freqs = 0.5 * torch.exp(math.log(100.0) * k / (self.half - 1))
        a = c_noise.to(torch.float32)[:, None] * freqs[None]
        return self.mlp(torch.cat([a.cos(), a.sin()], dim=1))


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding as a per-channel scale and shift in between."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, e):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        scale, shift = self.film(e)[:, :, None, None].chunk(2, dim=1)
        h = nn.functional.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(h)


class DigitsUNet(nn.Module):
    """F(x, c_noise): 8x8 -> 4x4 -> 8x8 with skip connections; ``ch`` channels at 8x8."""

    def __init__(self, ch: int = 32, emb: int = 128):
        super().__init__()
        self.config = {"ch": ch, "emb": emb}
        self.embed = _Embed(emb)
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.down1 = _ResBlock(ch, ch, emb)
        self.pool = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.mid1 = _ResBlock(2 * ch, 2 * ch, emb)
        self.mid2 = _ResBlock(2 * ch, 2 * ch, emb)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = _ResBlock(3 * ch, ch, emb)
        self.up2 = _ResBlock(2 * ch, ch, emb)
        self.out_norm = nn.GroupNorm(8, ch)
        self.out = nn.Conv2d(ch, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, c_noise):
        e = self.embed(c_noise)
        h0 = self.inp(x)
        h1 = self.down1(h0, e)                                  # 8x8, ch
        h = self.mid2(self.mid1(self.pool(h1), e), e)           # 4x4, 2ch
        h = self.up1(torch.cat([self.up(h), h1], dim=1), e)     # 8x8, ch
        h = self.up2(torch.cat([h, h0], dim=1), e)
        return self.out(nn.functional.silu(self.out_norm(h)))


class DigitsDenoiser(nn.Module):
    """EDM preconditioning around :class:`DigitsUNet`: ``model(x, sigma) -> x0_hat``.

    Takes states of any shape with 64 elements per sample ([B, 1, 8, 8], [B, 8, 8], [B, 64])
    and any float dtype; computes in float32 and returns the input's shape and dtype.
    """

    #: the shape of one sample, for callers that draw noise
    sample_shape = (1, 8, 8)

    def __init__(self, net: DigitsUNet, sigma_data: float):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        xf = x.reshape(shape[0], 1, 8, 8).to(torch.float32)
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sig = sig.expand(shape[0]) if sig.numel() == 1 else sig
        c_skip, c_out, c_in = (c[:, None, None, None] for c in
                               edm_scalings(sig, self.sigma_data))
        c_noise = sig.clamp_min(1e-20).log() / 4.0
        d = c_skip * xf + c_out * self.net(c_in * xf, c_noise)
        return d.reshape(shape).to(dtype)


class DigitsClassifier(nn.Module):
    """A tiny MLP digit classifier (64 -> 128 -> 64 -> 10) whose 64 penultimate features
    serve as the embedding of the Frechet distance in :func:`quality`."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features of images in [0, 1] (any shape with 64 elements per sample)."""
        return self.body(pixels.reshape(-1, 64).to(torch.float32) * 2.0 - 1.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


# ---------------------------------------------------------------------------------------
# loading and scoring
# ---------------------------------------------------------------------------------------

_CACHE: dict = {}


def load_checkpoint(path=None) -> dict:
    """The weights bundle: {"config", "model", "classifier", "reference", "meta"}."""
    path = Path(path) if path is not None else WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"digits weights not found at {path}; train them with "
                                f"`python -m pyengine.models.train_digits`")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_digits_model(path=None):
    """(process, model, prediction) for :class:`pyengine.Sampler`: EDM, the preconditioned
    denoiser (eval mode, no gradients) and ``"sample"``."""
    from ..processes import EDM

    ck = load_checkpoint(path)
    cfg = ck["config"]
    net = DigitsUNet(ch=cfg["ch"], emb=cfg["emb"])
    net.load_state_dict(ck["model"])
    model = DigitsDenoiser(net, cfg["sigma_data"]).eval().requires_grad_(False)
    process = EDM(sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"],
                  sigma_data=cfg["sigma_data"])
    return process, model, "sample"


def _classifier(path=None):
    key = str(path or WEIGHTS)
    if key not in _CACHE:
        ck = load_checkpoint(path)
        clf = DigitsClassifier()
        clf.load_state_dict(ck["classifier"])
        _CACHE[key] = (clf.eval().requires_grad_(False), ck["reference"])
    return _CACHE[key]


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), in float64."""
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    cov1, cov2 = cov1.to(torch.float64), cov2.to(torch.float64)
    lam, U = torch.linalg.eigh(cov1)
    r1 = (U * lam.clamp_min(0).sqrt()) @ U.T
    m = r1 @ cov2 @ r1
    tr_sqrt = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt)


@torch.no_grad()
def quality(x: torch.Tensor, path=None, *, pixels: bool = False) -> dict:
    """Scores of samples ``x`` (model space; ``pixels=True``: images in [0, 1]).

    ``fd``: Frechet distance between the classifier features of the samples and of the
    1797 training digits; ``confidence``: the classifier's mean top probability; ``classes``:
    how many samples it assigns to each digit; ``pixel_mean_err``: max |mean image - data's|.
    The FD of n samples is biased upward at small n; the bundle's ``reference`` holds the
    yardsticks at n = 64, 128, 256: held-out real digits (``fd_real_<n>``, measured 19.7,
    5.9, 2.5) and a Gaussian with the digits' pixel mean and covariance (``fd_gauss_<n>``,
    30.8, 30.1, 31.7), and the confidence on real digits (``confidence_real``, 0.98).
    """
    clf, ref = _classifier(path)
    p = x.reshape(-1, 64).to(torch.float32) if pixels else to_pixels(x).reshape(-1, 64)
    f = clf.features(p).to(torch.float64)
    mu = f.mean(0)
    cov = (f - mu).T @ (f - mu) / max(1, f.shape[0] - 1)
    prob = torch.softmax(clf.head(f.to(torch.float32)), dim=1)
    return {
        "fd": frechet_distance(mu, cov, ref["feat_mean"], ref["feat_cov"]),
        "confidence": float(prob.max(1).values.mean()),
        "classes": torch.bincount(prob.argmax(1), minlength=10).tolist(),
        "pixel_mean_err": float((p.mean(0).to(torch.float64) - ref["pixel_mean"]).abs().max()),
    }
