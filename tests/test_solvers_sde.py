"""Reverse-SDE samplers (score_sde): Euler-Maruyama and the Langevin predictor-corrector.

Step by step against independent float64 statements of Song et al. 2021 (App. E reverse
diffusion, Alg. 4/5 Langevin corrector) with the Gaussian-mixture denoiser as a nonlinear
model and the same noise (Philox draws, or a torch generator in plan order); then
reproducibility, batch invariance, and the distributions the samplers reach on Gaussian data.
"""

from __future__ import annotations

import math

import pytest
import torch

import pyengine as pe
from pyengine.models import GaussianMixture
from pyengine.noise import philox_normal, sample_seed, seeds_tensor

GMM = GaussianMixture.random(d=12, M=3, seed=7)
B, SEED = 3, 5
# The formula checks run on the torch reference backend, whose Philox normals are the
# reference's own bits; the C++ kernels make the same Philox words but their float32 log/cos
# round differently (1e-8 relative on these samples), checked separately below.
CPU_BACKENDS = ([n for n, why in pe.backends.explain("cpu").items() if why is None]
                if hasattr(pe.backends, "explain") else pe.backends.available())
PROCS = {"ve": (pe.processes.VE(sigma_min=0.01, sigma_max=50.0), "score"),
         "edm": (pe.processes.EDM(), "sample"),
         "vp": (pe.processes.VP.continuous(), "epsilon"),
         "flow": (pe.processes.RectifiedFlow(), "v")}
GRIDS = {"to_zero": pe.schedules.karras(7, 0.02, 40.0),
         "sigma_min": pe.schedules.exponential(6, 0.05, 40.0, append_zero=False)}


def _noise(b=B, d=12):
    return torch.randn(b, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _close(a, b, tol=1e-12):
    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"


class Draws:
    """The noise of draw k: Philox keyed by the batch seed, or the next torch.randn."""

    def __init__(self, generator=None):
        self.k, self.generator = 0, generator

    def __call__(self, shape):
        if self.generator is not None:
            z = torch.randn(shape, generator=self.generator, dtype=torch.float64)
        else:
            z = philox_normal(seeds_tensor(SEED, shape[0]), self.k, shape[1]).to(torch.float64)
        self.k += 1
        return z


def reference(proc, sig, x, *, n_corrector=0, snr=0.16, generator=None):
    """score_sde's PC sampler in the process space, with exact mixture scores:
    Langevin x <- x + e score + sqrt(2 e) z, e = 2 (snr |z| / |score|)^2 per sample, score =
    grad_x log p = (s D(x/s) - x) / (s sigma)^2; then the reverse-diffusion predictor
    x_hat' = x_hat + (sigma^2 - sigma'^2) score_hat + sqrt(sigma^2 - sigma'^2) z (the mean on
    the step to sigma 0)."""
    draw = Draws(generator)
    for i in range(len(sig) - 1):
        s, sn = float(proc.s_of_sigma(sig[i])), float(proc.s_of_sigma(sig[i + 1]))
        for _ in range(n_corrector):
            score = (s * GMM.denoise(x / s, sig[i]) - x) / (s * sig[i]) ** 2
            z = draw(x.shape)
            e = 2.0 * (snr * z.norm(dim=1) / score.norm(dim=1)) ** 2
            x = x + e[:, None] * score + (2.0 * e[:, None]).sqrt() * z
        x_hat = x / s
        score_hat = (GMM.denoise(x_hat, sig[i]) - x_hat) / sig[i] ** 2
        if sig[i + 1] == 0:
            x_hat = x_hat + sig[i] ** 2 * score_hat
        else:
            q = sig[i] ** 2 - sig[i + 1] ** 2
            x_hat = x_hat + q * score_hat + math.sqrt(q) * draw(x.shape)
        x = sn * x_hat
    return x


CASES = [("euler_maruyama", {}), ("pc_langevin", {}), ("pc_langevin", dict(n_corrector=3)),
         ("pc_langevin", dict(snr=0.05, n_corrector=2))]


@pytest.mark.parametrize("noise_source", ["philox", "generator"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("proc_name", PROCS)
@pytest.mark.parametrize("solver,opts", CASES, ids=lambda c: str(c))
def test_formula(solver, opts, proc_name, grid, noise_source):
    proc, pred = PROCS[proc_name]
    sig = GRIDS[grid]
    sp = pe.Sampler(proc, solver, sigmas=sig, prediction=pred, **opts)
    gen = (lambda: torch.Generator().manual_seed(3)) if noise_source == "generator" else None
    out = sp.sample(GMM.as_model(proc, pred), _noise(), seed=SEED,
                    generator=gen() if gen else None, backend="torch")
    nc = opts.get("n_corrector", 1) if solver == "pc_langevin" else 0
    ref = reference(proc, sig, _noise() * sp.init_noise_scale, n_corrector=nc,
                    snr=opts.get("snr", 0.16), generator=gen() if gen else None)
    _close(out, ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("solver", ["euler_maruyama", "pc_langevin"])
def test_backends_agree(solver, backend):
    """Every CPU backend runs the plan, the Langevin op included, to the rounding of the
    noise's float32 log/cos."""
    proc = pe.processes.VP.continuous()
    sp = pe.Sampler(proc, solver, sigmas=GRIDS["to_zero"], prediction="epsilon")
    model = GMM.as_model(proc, "epsilon")
    ref = sp.sample(model, _noise(), seed=SEED, backend="torch")
    _close(sp.sample(model, _noise(), seed=SEED, backend=backend), ref, tol=1e-6)


def test_pc_without_corrector_is_euler_maruyama():
    proc = pe.processes.VP.continuous()
    sig = GRIDS["to_zero"]
    a = pe.Sampler(proc, "pc_langevin", sigmas=sig, n_corrector=0)
    b = pe.Sampler(proc, "euler_maruyama", sigmas=sig)
    model = GMM.as_model(proc, "epsilon")
    assert torch.equal(a.sample(model, _noise(), seed=2), b.sample(model, _noise(), seed=2))


def test_plans():
    sig = GRIDS["to_zero"]
    em = pe.build_plan(pe.processes.EDM(), "euler_maruyama", sig, "sample")
    assert em.nfe == 7 and em.n_noise == 6            # no draw on the step to sigma 0
    assert em.updates[-1].noise_index == -1
    pc = pe.build_plan(pe.processes.EDM(), "pc_langevin", sig, "sample", n_corrector=2)
    assert pc.nfe == 7 * 3 and pc.n_noise == 7 * 2 + 6
    assert pc.describe().count("custom LangevinCorrector") == 7 * 2


# ---------------------------------------------------------------------------------------
# reproducibility and batch invariance
# ---------------------------------------------------------------------------------------

def _elementwise(x, t):
    """Acts on each element alone, so any batch dependence would come from the solver."""
    tt = t.to(torch.float64).view(-1, *([1] * (x.dim() - 1)))
    return (torch.tanh(1.3 * x + 0.2) * (1 + tt) * 0.5 + 0.1 * x).to(x.dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", ["euler_maruyama", "pc_langevin"])
def test_same_seed_same_bits_and_batch_invariance(solver, dtype, backend):
    proc = pe.processes.VP.continuous()
    sp = pe.Sampler(proc, solver, 8, prediction="epsilon", backend=backend)
    x = torch.randn(5, 3, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    full = sp.sample(_elementwise, x, seed=9)
    assert full.dtype == dtype and torch.isfinite(full).all()
    assert torch.equal(full, sp.sample(_elementwise, x, seed=9))
    assert not torch.equal(full, sp.sample(_elementwise, x, seed=10))
    # alone, or in a shuffled batch, each sample keeps its own result bit for bit
    for j in (0, 3):
        one = sp.sample(_elementwise, x[j:j + 1], seed=[sample_seed(9, j)])
        assert torch.equal(one[0], full[j])
    perm = [3, 0, 4, 1, 2]
    shuffled = sp.sample(_elementwise, x[perm], seed=[sample_seed(9, j) for j in perm])
    assert torch.equal(shuffled, full[perm])


def test_generator_mode_is_reproducible():
    proc = pe.processes.EDM()
    sp = pe.Sampler(proc, "pc_langevin", 5, prediction="sample")
    model = GMM.as_model(proc, "sample")
    a = sp.sample(model, _noise(), generator=torch.Generator().manual_seed(4))
    b = sp.sample(model, _noise(), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# distributions on Gaussian data (exact diagonal-Gaussian denoiser, elementwise and cheap)
# ---------------------------------------------------------------------------------------

DIM, N_SAMPLES = 256, 1000
_g = torch.Generator().manual_seed(5)
MU = torch.randn(DIM, dtype=torch.float64, generator=_g)
VAR = 0.2 + 1.3 * torch.rand(DIM, dtype=torch.float64, generator=_g)


def _gaussian_denoiser(x_hat, sigma):
    s2 = sigma.to(torch.float64).view(-1, 1) ** 2
    return MU + VAR / (VAR + s2) * (x_hat - MU)


def _samples(solver, steps, **opts):
    proc = pe.processes.VE(sigma_min=0.01, sigma_max=30.0)
    sp = pe.Sampler(proc, solver, steps, schedule="exponential", prediction="sample", **opts)
    noise = torch.randn(N_SAMPLES, DIM, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    return sp, sp.sample(pe.Denoiser(_gaussian_denoiser), noise, seed=1)


def test_euler_maruyama_reaches_the_law_its_recursion_predicts():
    """On Gaussian data every step is affine in x_hat plus Gaussian noise, so the sampler's
    output law is N(m, V) per coordinate with m, V from the exact recursion
    x_hat' - mu = a (x_hat - mu) + sqrt(q) z, a = 1 - c sigma^2 / (v + sigma^2); the samples
    must match it to sampling error (a sharper check than the data law itself)."""
    sp, out = _samples("euler_maruyama", 30)
    sig = sp.sigmas
    mean, var = -MU, torch.full_like(MU, sp.init_noise_scale ** 2)    # of x_hat - mu
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        a = VAR / (VAR + s * s) if sn == 0 else 1 - (s * s - sn * sn) / (VAR + s * s)
        q = 0.0 if sn == 0 else s * s - sn * sn
        mean, var = a * mean, a * a * var + q
    z_mean = (out.mean(0) - MU - mean) / (var / N_SAMPLES).sqrt()
    ratio = out.var(0) / var
    # 256 standardized means: rms 1 +- 0.05; pooled variance ratio: 1 +- 0.003 (sd)
    assert z_mean.pow(2).mean().sqrt() < 1.25 and z_mean.abs().max() < 4.5
    assert abs(ratio.mean().item() - 1) < 0.015
    # ... while the data's own variance is overshot by the 30-step discretization (1.34)
    assert (out.var(0) / VAR).mean() > 1.2


def test_pc_langevin_reaches_the_data_distribution():
    """Langevin correction at every level brings the samples to N(mu, diag(v)) up to a small
    variance bias: 1.04 measured at 60 and at 100 steps (Euler-Maruyama alone: 1.09 at 100
    steps), the Langevin step's own bias (eps / 2v ~ snr^2 per correction)."""
    _, out = _samples("pc_langevin", 60)
    z_mean = (out.mean(0) - MU) / (VAR / N_SAMPLES).sqrt()
    ratio = out.var(0) / VAR
    assert z_mean.pow(2).mean().sqrt() < 1.25 and z_mean.abs().max() < 4.5
    assert abs(ratio.mean().item() - 1) < 0.07
    assert ratio.min() > 0.8 and ratio.max() < 1.35
