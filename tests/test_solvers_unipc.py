"""Multistep solvers UniPC and iPNDM against independent float64 statements of their published
formulas, with the exact Gaussian-mixture denoiser as a nonlinear model; UniPC also against
diffusers' UniPCMultistepScheduler stepped in float64.

The references work in the process's own space with DPM-Solver notation (alpha_t = s,
sigma_t = s sigma), as the UniPC paper writes Algorithms 2-3, or in (x_hat, sigma) for iPNDM;
neither goes through the PlanBuilder.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine.models import GaussianMixture
from pyengine.plan import Eval, Update

GMM = GaussianMixture.random(d=12, M=3, seed=7)
B = 3


def _noise():
    return torch.randn(B, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _close(a, b, tol=1e-12):
    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"


PROCS = {"edm": (pe.processes.EDM(), "sample"),
         "vp": (pe.processes.VP.continuous(), "epsilon"),
         "flow": (pe.processes.RectifiedFlow(), "v")}
GRIDS = {"karras_to_zero": pe.schedules.karras(9, 0.02, 60.0),
         "exponential_sigma_min": pe.schedules.exponential(9, 0.05, 40.0, append_zero=False)}


# ---------------------------------------------------------------------------------------
# UniPC: Zhao et al. 2023, Algorithms 2-3 (B(h) forms), data prediction
# ---------------------------------------------------------------------------------------

def _b_vector(hh: float, p: int, B_h: float) -> torch.Tensor:
    """b_k = k! phi_{k+1}-type coefficients of UniPC: h_phi_k recursion of the paper's code,
    h_phi_1 = e^hh - 1, then (h_phi / hh - 1/k!)."""
    out = []
    hphi = math.expm1(hh) / hh - 1.0
    fact = 1
    for k in range(1, p + 1):
        out.append(hphi * fact / B_h)
        fact *= k + 1
        hphi = hphi / hh - 1.0 / fact
    return torch.tensor(out, dtype=torch.float64)


def _uni_update(x, alpha_t, sd_s, sd_t, lam, s_idx, t_lam, ms, p, variant, m_new=None):
    """One UniP (m_new None) or UniC update of order p from level index s_idx.

    x_t = (sigma_t/sigma_s) x - alpha_t (e^-h - 1) m_s - alpha_t B(h) (sum_k rho_k D1_k
    [+ rho_p (m_new - m_s)]) with D1_k = (m_{s-k} - m_s) / r_k, r_k = (lam_{s-k} - lam_s)/h."""
    h = t_lam - lam[s_idx]
    hh = -h
    B_h = hh if variant == "bh1" else math.expm1(hh)
    r = [(lam[s_idx - k] - lam[s_idx]) / h for k in range(1, p)] + [1.0]
    R = torch.tensor([[rk ** m for rk in r] for m in range(p)], dtype=torch.float64)
    b = _b_vector(hh, p, B_h)
    m_s = ms[s_idx]
    D1 = [(ms[s_idx - k] - m_s) / r[k - 1] for k in range(1, p)]
    if m_new is None:
        if p == 1:
            rho = []
        elif p == 2:
            rho = [0.5]
        else:
            rho = torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        res = sum((rk * d for rk, d in zip(rho, D1)), torch.zeros_like(x))
    else:
        rho = [0.5] if p == 1 else torch.linalg.solve(R, b).tolist()
        res = sum((rk * d for rk, d in zip(rho[:-1], D1)), torch.zeros_like(x))
        res = res + rho[-1] * (m_new - m_s)
    return (sd_t / sd_s) * x - alpha_t * math.expm1(hh) * m_s - alpha_t * B_h * res


def unipc_reference(proc, sig, x, *, order=2, variant="bh2", corrector=True,
                    disable_corrector=(), lower_order_final=True):
    """diffusers' step() semantics around the paper's UniP/UniC updates, in process space."""
    n = len(sig) - 1
    alpha = [float(proc.s_of_sigma(s)) for s in sig]
    sd = [a * s for a, s in zip(alpha, sig)]
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alpha, sd)]
    ms, last, prev_p = [], None, None
    for i in range(n):
        m = GMM.denoise(x / alpha[i], sig[i])                  # x0 prediction at x_i
        if corrector and i > 0 and (i - 1) not in disable_corrector:
            x = _uni_update(last, alpha[i], sd[i - 1], sd[i], lam, i - 1, lam[i], ms, prev_p,
                            variant, m_new=m)
        ms.append(m)
        p = min(order, i + 1)
        if lower_order_final:
            p = min(p, n - i)
        last = x
        if sig[i + 1] == 0:
            x = alpha[i + 1] * m                                # h = inf: x_0 = m
            p = 1
        else:
            x = _uni_update(x, alpha[i + 1], sd[i], sd[i + 1], lam, i, lam[i + 1], ms, p,
                            variant)
        prev_p = p
    return x


UNIPC_CASES = [
    dict(order=1), dict(order=2), dict(order=3),
    dict(order=1, variant="bh1"), dict(order=2, variant="bh1"), dict(order=3, variant="bh1"),
    dict(order=3, corrector=False), dict(order=2, variant="bh1", corrector=False),
    dict(order=3, lower_order_final=False), dict(order=2, lower_order_final=False),
    dict(order=3, disable_corrector=(0, 3, 4)), dict(order=2, variant="bh1",
                                                     disable_corrector=(1,)),
]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("proc_name", PROCS)
@pytest.mark.parametrize("opts", UNIPC_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                    o.items()))
def test_unipc_formula(opts, proc_name, grid):
    proc, pred = PROCS[proc_name]
    sig = GRIDS[grid]
    sp = pe.Sampler(proc, "unipc", sigmas=sig, prediction=pred, **opts)
    out = sp.sample(GMM.as_model(proc, pred), _noise())
    ref = unipc_reference(proc, sig, _noise() * sp.init_noise_scale, **opts)
    _close(out, ref)


def test_unipc_plan_shape():
    """One model call per step, none after the last update; a corrector on every step but
    the first and the disabled ones; never more than K_MAX buffers read."""
    sig = pe.schedules.karras(10, 0.02, 60.0)
    plan = pe.build_plan(pe.processes.EDM(), "unipc", sig, "epsilon", order=3,
                         disable_corrector=[2, 5])
    assert plan.nfe == 10
    assert isinstance(plan.ops[-1], Update) and isinstance(plan.ops[0], Eval)
    kinds = [op.kind for op in plan.ops if isinstance(op, Update)]
    assert kinds.count("unic") == 10 - 1 - 2 and kinds.count("unip") == 10
    assert max(len(op.bufs) for op in plan.updates) <= pe.plan.K_MAX
    assert plan.output == "x"


def test_unipc_step_to_zero_is_the_denoised_estimate():
    """On a step to sigma 0 the UniP update is x_0 = m (the limit h -> inf of order 1)."""
    proc = pe.processes.VP.continuous()
    sig = np.array([10.0, 1.0, 0.0])
    plan = pe.build_plan(proc, "unipc", sig, "sample", order=3, lower_order_final=False)
    last = plan.updates[-1]
    assert last.bufs == ["out"] and last.coefs.tolist() == [1.0]


@pytest.mark.parametrize("bad,match", [(dict(order=4), "order"), (dict(order=0), "order"),
                                       (dict(variant="bh3"), "variant"),
                                       (dict(disable_corrector=3), "disable_corrector")])
def test_unipc_rejects_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        pe.build_plan(pe.processes.EDM(), "unipc", pe.schedules.karras(5, 0.1, 10.0), **bad)


# ---------------------------------------------------------------------------------------
# UniPC against diffusers' scheduler, stepped in float64
# ---------------------------------------------------------------------------------------

def _nonlinear(x, t):
    """A model nonlinear in x and t (float64); t is diffusers' 0-dim or pyengine's [B] tensor."""
    tt = torch.as_tensor(t).to(torch.float64).reshape(-1)[0] / 1000.0
    return torch.tanh(1.3 * x + 0.3) * (0.5 + tt) + 0.2 * torch.sin(3.0 * x) * tt + 0.1 * x


DIFFUSERS_CASES = [
    (dict(), 8), (dict(solver_order=3), 8), (dict(solver_order=1), 6),
    (dict(solver_order=3, prediction_type="v_prediction", disable_corrector=[0, 3]), 9),
    (dict(solver_order=3, prediction_type="sample", lower_order_final=False,
          final_sigmas_type="sigma_min"), 7),
    (dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"), 8),
    (dict(solver_order=3, use_karras_sigmas=True), 6),
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("cfg,steps", DIFFUSERS_CASES, ids=lambda c: str(c))
def test_unipc_matches_diffusers_in_float64(cfg, steps):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.UniPCMultistepScheduler(**cfg)
    sch.set_timesteps(steps)
    # diffusers keeps its sigmas in float32; a float64 copy makes its whole step() float64,
    # so the two agree to rounding instead of to float32's 1e-7.
    sch.sigmas = sch.sigmas.to(torch.float64)
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x0 * sch.init_noise_sigma
    for t in sch.timesteps:
        x = sch.step(_nonlinear(x, t), t, x).prev_sample
    pred = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}[
        cfg.get("prediction_type", "epsilon")]
    sp = pe.Sampler(pe.processes.VP.discrete("linear"), "unipc",
                    sigmas=sch.sigmas.numpy().astype(np.float64),
                    timesteps=sch.timesteps.numpy().astype(np.float64), prediction=pred,
                    init_noise_scale=1.0, order=cfg.get("solver_order", 2),
                    variant=cfg.get("solver_type", "bh2"),
                    lower_order_final=cfg.get("lower_order_final", True),
                    disable_corrector=cfg.get("disable_corrector", ()))
    _close(sp.sample(_nonlinear, x0), x, tol=1e-12)


# ---------------------------------------------------------------------------------------
# iPNDM: Zhang & Chen 2023 (DEIS), fixed Adams-Bashforth weights in (x_hat, sigma)
# ---------------------------------------------------------------------------------------

AB = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12],
      4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def ipndm_reference(proc, sig, x, order):
    x_hat = x / float(proc.s_of_sigma(sig[0]))
    hist = []
    for i in range(len(sig) - 1):
        d = (x_hat - GMM.denoise(x_hat, sig[i])) / sig[i]
        hist.insert(0, d)
        q = min(order, i + 1)
        x_hat = x_hat + (sig[i + 1] - sig[i]) * sum(a * e for a, e in zip(AB[q], hist))
    return x_hat * float(proc.s_of_sigma(sig[-1]))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("proc_name", PROCS)
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_formula(order, proc_name, grid):
    proc, pred = PROCS[proc_name]
    sig = GRIDS[grid]
    sp = pe.Sampler(proc, "ipndm", sigmas=sig, prediction=pred, order=order)
    out = sp.sample(GMM.as_model(proc, pred), _noise())
    ref = ipndm_reference(proc, sig, _noise() * sp.init_noise_scale, order)
    _close(out, ref)


def test_ipndm_plan_reads_at_most_order_plus_one_buffers():
    plan = pe.build_plan(pe.processes.EDM(), "ipndm", pe.schedules.karras(12, 0.02, 60.0),
                         "epsilon", order=4)
    assert plan.nfe == 12
    # x, the model output and three history buffers
    assert max(len(op.bufs) for op in plan.updates) == 5


@pytest.mark.parametrize("order", [0, 5, True])
def test_ipndm_rejects_bad_order(order):
    with pytest.raises(ValueError, match="order"):
        pe.build_plan(pe.processes.EDM(), "ipndm", pe.schedules.karras(5, 0.1, 10.0),
                      order=order)
