"""Every solver in the registry, end to end through every other backend, against torch.

The pattern of tests/test_cpp_solvers.py (which covers the cpp backend), extended to the
numba backend on CPU and to the cuda and triton backends on a GPU (skipped without one;
the Triton interpreter runs a few solvers in tests/test_triton_fused_update.py). Solvers come
from pe.list_solvers() and each one's configurations, so a new solver is covered without
editing this file.

Data: an exact Gaussian-mixture denoiser as an epsilon model on the VP process, 8 steps.
Tolerances as in tests/test_cpp_solvers.py: float64 states agree to float64 rounding; float32
states obey the kernel rule (error against a more precise torch run at most twice the float32
torch run's, or one float32 rounding of the state per step). With Philox seeds the normals
of two implementations differ by up to 1e-6, so those runs agree to that times the scale.
"""

from __future__ import annotations

import pytest
import torch

import pyengine as pe
from pyengine.backends import dispatch
from pyengine.models import GaussianMixture
from pyengine.plan import Eval, Update

D, B, STEPS = 16, 3, 8
CUDA = torch.cuda.is_available()


def _backends():
    out = [pytest.param("numba", "cpu", id="numba")]
    for name in ("cuda", "triton"):
        out.append(pytest.param(name, "cuda", id=name,
                                marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device")))
    return out


def _sampler(info, options):
    return pe.Sampler(pe.processes.VP.discrete("linear"), solver=info.name, steps=STEPS,
                      **options)


def _cases():
    out = []
    for info in pe.list_solvers():
        configs = [(label, dict(opts)) for label, opts, _, _ in info.configurations()]
        if "eta" in info.options and not info.stochastic:
            configs.append((f"{info.name}[eta=1]", {"eta": 1.0}))
        if "s_churn" in info.options:
            configs.append((f"{info.name}[s_churn=2]", {"s_churn": 2.0}))
        for label, opts in configs:
            try:
                _sampler(info, opts)
            except ValueError:               # an option value this solver refuses
                continue
            out.append(pytest.param(info, opts, id=label))
    return out


def _noisy(info, options):
    """Draws noise: a plan update with a noise term, or a stochastic custom op."""
    for op in _sampler(info, options).plan.ops:
        if isinstance(op, Update):
            if op.noise_index >= 0 and op.noise != 0.0:
                return True
        elif not isinstance(op, Eval) and info.stochastic:
            return True
    return False


def _run(info, options, dtype, backend, device="cpu", **sample_kw):
    proc = pe.processes.VP.discrete("linear")
    gmm = GaussianMixture.random(d=D, M=4, seed=0)
    sampler = pe.Sampler(proc, solver=info.name, steps=STEPS, **options)
    g = torch.Generator().manual_seed(3)
    if info.family == "inversion":
        x = gmm.sample(B, generator=g).to(dtype)
    else:
        x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    cpu_model = gmm.as_model(proc, "epsilon")

    def model(x, t):                          # the mixture lives on the CPU
        return cpu_model(x.cpu(), t.cpu()).to(x.device)

    return sampler.sample(model, x.to(device), backend=backend, **sample_kw).cpu()


def _close_f32(got32, torch32, precise):
    precise = precise.double()
    err = (got32.double() - precise).abs().max().item()
    torch_err = (torch32.double() - precise).abs().max().item()
    floor = STEPS * torch.finfo(torch.float32).eps * precise.abs().max().item()
    assert err <= max(2 * torch_err, floor), (err, torch_err, floor)


def _skip_unavailable(backend, device):
    why = dispatch.unavailable_reason(backend, device)
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("info,options", _cases())
def test_backend_matches_torch(backend, device, info, options):
    _skip_unavailable(backend, device)
    noisy = _noisy(info, options)

    def kw():
        return {"generator": torch.Generator().manual_seed(7)} if noisy else {"seed": 0}

    t64 = _run(info, options, torch.float64, "torch", device, **kw())
    b64 = _run(info, options, torch.float64, backend, device, **kw())
    torch.testing.assert_close(b64, t64, rtol=1e-10, atol=1e-10)
    if noisy:
        precise = _run(info, options, torch.float32, "torch", device,
                       compute_dtype=torch.float64, **kw())
        _close_f32(_run(info, options, torch.float32, backend, device, **kw()),
                   _run(info, options, torch.float32, "torch", device, **kw()), precise)
    else:
        _close_f32(_run(info, options, torch.float32, backend, device, seed=0),
                   _run(info, options, torch.float32, "torch", device, seed=0), t64)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("info,options", [c for c in _cases() if _noisy(*c.values)])
def test_backend_philox_noise_matches_torch(backend, device, info, options):
    """Seeded (in-kernel Philox) noise: the same samples up to the normals' 1e-6."""
    _skip_unavailable(backend, device)
    t = _run(info, options, torch.float64, "torch", device, seed=[5, 2 ** 64 - 1, 9])
    c = _run(info, options, torch.float64, backend, device, seed=[5, 2 ** 64 - 1, 9])
    torch.testing.assert_close(c, t, rtol=0, atol=1e-5 * max(1.0, t.abs().max().item()))
    assert not torch.equal(t, _run(info, options, torch.float64, backend, device,
                                   seed=[6, 1, 9]))
