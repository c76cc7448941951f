"""Every solver in the registry, end to end through the cpp backend, against the torch one.

A Plan runs on the cpp backend unchanged: the same ops, the same coefficients, another kernel.
Solvers come from the registry (pe.list_solvers() and each one's configurations), so a newly
registered solver is covered without editing this file; stochastic ones also run with their
noise on, deterministic ones with their noise option (eta, s_churn) where they have one.

Data: an exact Gaussian-mixture denoiser as an epsilon model on the VP process, 8 steps.
Tolerances: float64 states agree to float64 rounding; float32 states obey the kernel rule:
the cpp run's error against a more precise torch run is at most twice the float32 torch
run's, or at most one float32 rounding of the state per step (where torch happens to land
closer). The more precise run is the float64 run for deterministic solvers, and for noisy
ones (generator= noise, which both backends read as the same tensor, but whose float32 and
float64 draws differ) the float32 run with float64 update arithmetic (compute_dtype). With
Philox seeds the normals of the two implementations differ by up to 1e-6
(tests/test_cpp_fused_update.py), so those runs agree to that times the noise scale.
"""

from __future__ import annotations

import pytest
import torch

import pyengine as pe
from pyengine.fused_update import native as _native
from pyengine.models import GaussianMixture

if _native._C is None:
    pytest.skip(f"the C++ extension is not built: {_native.IMPORT_ERROR}",
                allow_module_level=True)

D, B, STEPS = 16, 3, 8


def _cases():
    out = []
    for info in pe.list_solvers():
        configs = [(label, dict(opts)) for label, opts, _, _ in info.configurations()]
        if "eta" in info.options and not info.stochastic:
            configs.append((f"{info.name}[eta=1]", {"eta": 1.0}))
        if "s_churn" in info.options:
            configs.append((f"{info.name}[s_churn=2]", {"s_churn": 2.0}))
        for label, opts in configs:
            out.append(pytest.param(info, opts, id=label))
    return out


def _noisy(info, options):
    return bool(info.stochastic or options.get("eta", 0) or options.get("s_churn", 0))


def _draws(info, options) -> bool:
    """Whether the plan adds noise at all (a stochastic solver at eta = 0 draws nothing)."""
    sampler = pe.Sampler(pe.processes.VP.discrete("linear"), solver=info.name, steps=STEPS,
                         **options)
    return any(op.noise_index >= 0 and op.noise != 0.0 for op in sampler.plan.updates)


def _run(info, options, dtype, backend, **sample_kw):
    proc = pe.processes.VP.discrete("linear")
    gmm = GaussianMixture.random(d=D, M=4, seed=0)
    sampler = pe.Sampler(proc, solver=info.name, steps=STEPS, **options)
    g = torch.Generator().manual_seed(3)
    if info.family == "inversion":
        x = gmm.sample(B, generator=g).to(dtype)
    else:
        x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    return sampler.sample(gmm.as_model(proc, "epsilon"), x, backend=backend, **sample_kw)


def _close_f32(cpp32, torch32, precise):
    precise = precise.double()
    err = (cpp32.double() - precise).abs().max().item()
    torch_err = (torch32.double() - precise).abs().max().item()
    floor = STEPS * torch.finfo(torch.float32).eps * precise.abs().max().item()
    assert err <= max(2 * torch_err, floor), (err, torch_err, floor)


@pytest.mark.parametrize("info,options", _cases())
def test_cpp_matches_torch(info, options):
    noisy = _noisy(info, options)
    if noisy:
        # generator mode: both backends add the same torch.randn noise
        def kw(dtype):
            return {"generator": torch.Generator().manual_seed(7)}
    else:
        def kw(dtype):
            return {"seed": 0}
    t64 = _run(info, options, torch.float64, "torch", **kw(torch.float64))
    c64 = _run(info, options, torch.float64, "cpp", **kw(torch.float64))
    torch.testing.assert_close(c64, t64, rtol=1e-10, atol=1e-10)
    if noisy:
        precise = _run(info, options, torch.float32, "torch", compute_dtype=torch.float64,
                       **kw(torch.float32))
        _close_f32(_run(info, options, torch.float32, "cpp", **kw(torch.float32)),
                   _run(info, options, torch.float32, "torch", **kw(torch.float32)), precise)
    else:
        _close_f32(_run(info, options, torch.float32, "cpp", seed=0),
                   _run(info, options, torch.float32, "torch", seed=0), t64)


@pytest.mark.parametrize("info,options", [c for c in _cases() if _noisy(*c.values)])
def test_cpp_philox_noise_matches_torch(info, options):
    """Seeded (in-kernel Philox) noise: the same samples up to the normals' 1e-6."""
    t = _run(info, options, torch.float64, "torch", seed=[5, 2 ** 64 - 1, 9])
    c = _run(info, options, torch.float64, "cpp", seed=[5, 2 ** 64 - 1, 9])
    torch.testing.assert_close(c, t, rtol=0, atol=1e-5 * max(1.0, t.abs().max().item()))
    other = _run(info, options, torch.float64, "cpp", seed=[6, 1, 9])
    if _draws(info, options):           # the seeds reach the result
        assert not torch.equal(c, other)
    else:                               # and only through the noise
        assert torch.equal(c, other)
