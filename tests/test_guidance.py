"""Fused classifier-free guidance: one model call on the doubled batch, the two halves read by
the fused update with D = D_u + w (D_c - D_u) folded into its coefficients, against guidance
done in plain torch (the model called twice, combined, the same solver run unguided)."""

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine.models import GaussianMixture

GMM = GaussianMixture.random(d=12, M=3, seed=7)
B, SEED, W = 3, 5, 4.5

SOLVERS = ["ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpm_2", "dpm_solver_3",
           "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpm_singlestep", "unipc", "ipndm",
           "euler_maruyama", "pc_langevin"]


def _noise():
    return torch.randn(B, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _ctx():
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, 1, dtype=torch.float64, generator=g), torch.zeros(B, 1,
                                                                           dtype=torch.float64)


def _cond_model(proc, prediction, calls=None):
    """A conditional model: the exact GMM prediction bent nonlinearly by a context."""
    base = GMM.as_model(proc, prediction)

    def model(x, t, context):
        if calls is not None:
            calls.append(x.shape[0])
        assert context.shape[0] == x.shape[0]
        return base(x, t) * (1.0 + 0.1 * torch.tanh(context)) + 0.05 * context * torch.sin(x)
    return model


def _close(a, b, tol=1e-12):
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def _pair(proc, solver, prediction, w=W, backend="torch", **opts):
    cond, uncond = _ctx()
    model = _cond_model(proc, prediction)
    sigmas = pe.schedules.karras(6, 0.05, 40.0)
    fused = pe.Sampler(proc, solver, sigmas=sigmas, prediction=prediction, guidance_scale=w,
                       **opts).sample(model, _noise(), seed=SEED, backend=backend,
                                      extra_args={"context": torch.cat([uncond, cond])})

    def guided(x, t):                          # guidance in plain torch: two calls, combined
        u, c = model(x, t, context=uncond), model(x, t, context=cond)
        return u + w * (c - u)
    ref = pe.Sampler(proc, solver, sigmas=sigmas, prediction=prediction,
                     **opts).sample(guided, _noise(), seed=SEED, backend=backend)
    return fused, ref


@pytest.mark.parametrize("solver", SOLVERS)
def test_fused_cfg_matches_torch_guidance(solver):
    proc = pe.processes.VP.continuous()
    fused, ref = _pair(proc, solver, "epsilon")
    assert fused.shape == (B, 12)
    _close(fused, ref)


@pytest.mark.parametrize("proc,prediction", [
    (pe.processes.EDM(), "sample"), (pe.processes.VP.continuous(), "v"),
    (pe.processes.RectifiedFlow(), "flow"), (pe.processes.EDM(), "epsilon")])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler_ancestral", "unipc"])
def test_fused_cfg_processes_and_predictions(proc, prediction, solver):
    fused, ref = _pair(proc, solver, prediction)
    _close(fused, ref)


def test_fused_cfg_native_backend():
    proc = pe.processes.VP.continuous()
    fused, ref = _pair(proc, "dpmpp_2m_sde", "epsilon", backend=None)
    _close(fused, ref, 1e-11)


@pytest.mark.parametrize("w", [0.0, 1.0, -0.5])
def test_guidance_scale_edges(w):
    proc = pe.processes.VP.continuous()
    fused, ref = _pair(proc, "dpmpp_3m", "epsilon", w=w)
    _close(fused, ref)


def test_one_call_on_doubled_batch_per_evaluation():
    proc = pe.processes.VP.continuous()
    calls = []
    cond, uncond = _ctx()
    sp = pe.Sampler(proc, "heun", steps=4, guidance_scale=3.0)
    sp.sample(_cond_model(proc, "epsilon", calls), _noise(),
              extra_args={"context": torch.cat([uncond, cond])})
    assert calls == [2 * B] * sp.nfe
    assert sp.plan.guidance_scale == 3.0
    ev = [op for op in sp.plan.ops if isinstance(op, pe.plan.Eval)]
    assert all(op.guidance == 3.0 for op in ev)
    # the guidance sits in the coefficients: (1 - w) on the uncond half, w on the cond half
    up = sp.plan.updates[0]
    cu, cc = up.coefs[up.bufs.index("e1/u")], up.coefs[up.bufs.index("e1/c")]
    assert np.isclose(cu / cc, (1 - 3.0) / 3.0)
    assert "cfg w=3" in sp.plan.describe()


def test_sample_overrides_guidance_scale():
    proc = pe.processes.VP.continuous()
    cond, uncond = _ctx()
    model = _cond_model(proc, "epsilon")
    args = {"context": torch.cat([uncond, cond])}
    a = pe.Sampler(proc, "dpmpp_2m", steps=5, guidance_scale=2.0).sample(
        model, _noise(), extra_args=args)
    sp = pe.Sampler(proc, "dpmpp_2m", steps=5)
    b = sp.sample(model, _noise(), extra_args=args, guidance_scale=2.0)
    assert torch.equal(a, b)
    c = sp.sample(model, _noise(), extra_args={"context": cond})      # unguided again
    d = pe.Sampler(proc, "dpmpp_2m", steps=5).sample(model, _noise(),
                                                     extra_args={"context": cond})
    assert torch.equal(c, d)


def test_bad_guidance_scale():
    with pytest.raises(ValueError, match="guidance_scale"):
        pe.Sampler(pe.processes.EDM(), "euler", steps=3, guidance_scale=float("nan"))


def _rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """diffusers' rescale_noise_cfg (Lin et al. 2024, eq. 16), written out."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "euler_ancestral", "unipc", "heun"])
@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_torch(solver, phi):
    proc = pe.processes.VP.continuous()
    cond, uncond = _ctx()
    model = _cond_model(proc, "epsilon")
    sigmas = pe.schedules.karras(6, 0.05, 40.0)
    sp = pe.Sampler(proc, solver, sigmas=sigmas, guidance_scale=W, guidance_rescale=phi)
    fused = sp.sample(model, _noise(), seed=SEED, backend="torch",
                      extra_args={"context": torch.cat([uncond, cond])})
    assert sum(isinstance(op, pe.plan.GuidanceRescale) for op in sp.plan.ops) == \
        (sp.nfe if phi else 0)

    def guided(x, t):
        u, c = model(x, t, context=uncond), model(x, t, context=cond)
        return _rescale_noise_cfg(u + W * (c - u), c, phi)
    ref = pe.Sampler(proc, solver, sigmas=sigmas).sample(guided, _noise(), seed=SEED,
                                                         backend="torch")
    _close(fused, ref)
    if phi:
        plain = pe.Sampler(proc, solver, sigmas=sigmas, guidance_scale=W).sample(
            model, _noise(), seed=SEED, backend="torch",
            extra_args={"context": torch.cat([uncond, cond])})
        assert (plain - fused).abs().max() > 1e-6


def test_guidance_rescale_errors_and_override():
    with pytest.raises(ValueError, match="needs guidance_scale"):
        pe.Sampler(pe.processes.EDM(), "euler", steps=3, guidance_rescale=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pe.Sampler(pe.processes.EDM(), "euler", steps=3, guidance_scale=2.0,
                   guidance_rescale=1.5)
    proc = pe.processes.VP.continuous()
    cond, uncond = _ctx()
    model = _cond_model(proc, "epsilon")
    args = {"context": torch.cat([uncond, cond])}
    a = pe.Sampler(proc, "dpmpp_2m", steps=5, guidance_scale=2.0, guidance_rescale=0.7).sample(
        model, _noise(), extra_args=args)
    b = pe.Sampler(proc, "dpmpp_2m", steps=5).sample(model, _noise(), extra_args=args,
                                                     guidance_scale=2.0, guidance_rescale=0.7)
    assert torch.equal(a, b)
