"""Inpainting: every state the plan writes is blended with the known region re-noised to that
state's level, m * state + (1 - m) * s (x0 + sigma * noise), inside the fused update (the mask
is one more kernel buffer). Checked against a float64 torch walk of the same plan with the
blend done by hand, against diffusers' inpainting loop (DDIM), and for its invariants."""

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine.models import GaussianMixture
from pyengine.noise import philox_normal, seeds_tensor
from pyengine.plan import Eval, Update

GMM = GaussianMixture.random(d=12, M=3, seed=7)
B, SEED, STEPS = 3, 5, 8


def _t(seed, shape=(B, 12), dtype=torch.float64):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _mask(shape=(B, 12), soft=False):
    g = torch.Generator().manual_seed(11)
    m = torch.rand(shape, generator=g, dtype=torch.float64)
    return m if soft else (m > 0.5).to(torch.float64)


def reference(plan, model, x, init, noise, mask, seed):
    """The plan walked in float64 torch, the blend applied after every update by hand."""
    seeds = seeds_tensor(seed, x.shape[0])
    slots = {"x": x.clone()}
    for op in plan.ops:
        if isinstance(op, Eval):
            t = torch.full((x.shape[0],), op.t, dtype=torch.float64)
            slots[op.dst] = model(slots[op.src], t)
            continue
        assert isinstance(op, Update)
        res = sum(c * slots[b] for c, b in zip(op.coefs, op.bufs))
        if op.noise_index >= 0 and op.noise != 0.0:
            z = philox_normal(seeds, op.noise_index, x[0].numel()).view(x.shape).double()
            res = res + op.noise * z
        aux = None
        if op.aux_dst is not None:
            aux = sum(c * slots[b] for c, b in zip(op.aux_coefs, op.bufs))
        known = op.scale * (init + op.sigma * noise)
        slots[op.dst] = mask * res + (1 - mask) * known
        if aux is not None:
            slots[op.aux_dst] = aux
    return slots[plan.output]


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "euler_ancestral", "heun", "dpmpp_2m",
                                    "dpmpp_3m", "dpmpp_2m_sde", "unipc", "dpm_solver_3",
                                    "dpm_singlestep"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_matches_torch_reference(solver, strength):
    proc = pe.processes.VP.discrete("linear")
    model = GMM.as_model(proc, "epsilon")
    sp = pe.Sampler(proc, solver, steps=STEPS)
    init, noise, mask = _t(3), _t(1), _mask(soft=solver == "heun")
    got = sp.sample(model, noise, seed=SEED, init=init, strength=strength, mask=mask,
                    backend="torch")
    plan, x = sp.start(noise, init=init, strength=strength)
    ref = reference(plan, model, x, init, noise, mask, SEED)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # the known region is the data itself at sigma 0
    keep = mask == 0
    assert torch.equal(got[keep], init[keep])


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_native_backends_float32(backend):
    if backend not in pe.backends.available():
        pytest.skip(f"{backend} unavailable")
    proc = pe.processes.EDM()
    model = GMM.as_model(proc, "epsilon")
    sp = pe.Sampler(proc, "dpmpp_2m_sde", steps=STEPS)
    init, noise = _t(3, dtype=torch.float32), _t(1, dtype=torch.float32)
    mask = _mask(soft=True).float()
    got = sp.sample(model, noise, seed=SEED, init=init, mask=mask, backend=backend)
    ref = sp.sample(model, noise, seed=SEED, init=init, mask=mask, backend="torch")
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_mask_broadcast_and_full_masks():
    proc = pe.processes.VP.discrete("linear")
    model = lambda x, t: torch.tanh(x) * 0.5   # noqa: E731
    sp = pe.Sampler(proc, "dpmpp_2m", steps=STEPS)
    init, noise = _t(3, (2, 3, 4, 4)), _t(1, (2, 3, 4, 4))
    m = (torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4) % 3 == 0).double()
    got = sp.sample(model, noise, init=init, mask=m, backend="torch")
    full = sp.sample(model, noise, init=init, mask=m.expand(2, 3, 4, 4), backend="torch")
    assert torch.equal(got, full)
    # mask 1 everywhere: plain img2img; mask 0 everywhere: the data back
    plain = sp.sample(model, noise, init=init, backend="torch")
    assert torch.equal(sp.sample(model, noise, init=init, mask=torch.ones(1), backend="torch"),
                       plain)
    assert torch.equal(sp.sample(model, noise, init=init, mask=torch.zeros(1), backend="torch"),
                       init)


def test_errors():
    proc = pe.processes.VP.discrete("linear")
    model = GMM.as_model(proc, "epsilon")
    sp = pe.Sampler(proc, "ddim", steps=4)
    x = _t(1)
    with pytest.raises(ValueError, match="needs init"):
        sp.sample(model, x, mask=_mask())
    with pytest.raises(ValueError, match="mask of shape"):
        sp.sample(model, x, init=x, mask=torch.ones(5, 7))
    with pytest.raises(ValueError, match="pc_langevin"):
        pe.Sampler(pe.processes.VE(), "pc_langevin", steps=3).sample(model, x, init=x,
                                                                     mask=_mask())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_matches_diffusers_inpainting_loop():
    """diffusers' inpainting pipelines (a UNet without mask channels): after each step,
    latents = (1 - mask) * add_noise(image, noise, t_next) + mask * latents, and the image
    itself after the last step."""
    D = pytest.importorskip("diffusers")
    from pyengine.integrations.diffusers import from_diffusers
    n = 10
    g = torch.Generator().manual_seed(4)
    init = torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    mask = (torch.rand(2, 1, 4, 4, generator=g) > 0.4).float()

    def model(x, t):
        t = torch.as_tensor(t).to(torch.float32).reshape(-1)[0]
        return torch.tanh(x) * (1 + 0.5 * torch.sin(t / 157.0)) + 0.2 * x * torch.cos(t / 311.0)

    ref = D.DDIMScheduler(clip_sample=False)
    ref.set_timesteps(n)
    ts = ref.timesteps
    x = ref.add_noise(init, noise, ts[:1])
    for i, t in enumerate(ts):
        x = ref.step(model(x, t), t, x).prev_sample
        known = init if i == len(ts) - 1 else ref.add_noise(init, noise, ts[i + 1:i + 2])
        x = (1 - mask) * known + mask * x
    sp = from_diffusers(D.DDIMScheduler(clip_sample=False), n)
    out = sp.to_scheduler_space(sp.sample(model, noise, init=init, mask=mask))
    err = ((out - x).abs().max() / x.abs().max()).item()
    assert err < 1e-5, err
    assert np.isfinite(err)
