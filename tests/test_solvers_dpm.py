"""DPM-Solver family (pyengine/solvers/dpm.py) against independent float64 statements of the
published updates.

The references below are plain torch float64 code in DPM-Solver notation (alpha_t, sigma_t,
lambda_t of a VP process, state x_t = alpha_t x0 + sigma_t eps), written from Lu et al. 2022
(DPM-Solver, arXiv:2206.00927) and Lu et al. 2022 (DPM-Solver++, arXiv:2211.01095); they never
touch the PlanBuilder. The model is a nonlinear toy eps-predictor, so a wrong coefficient on any
model output shows. Every test compares the state after every step at 1e-12 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine.solvers import registry
from pyengine.solvers.dpm import diffusers_order_list

F64 = torch.float64
PROC = pe.processes.VP.continuous()
DIM = 13          # prime-sized states
BATCH = 3
TOL = 1e-12


# ---------------------------------------------------------------------------------------
# the toy model and the DPM-notation reference
# ---------------------------------------------------------------------------------------


class Toy:
    """eps(x, t) = tanh(w x + b) (1/2 + t/2) + c x cos(3 t): nonlinear in x and in t."""

    def __init__(self, seed: int = 0, t_scale: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.w = 0.5 + torch.rand(DIM, generator=g, dtype=F64)
        self.b = 0.3 * torch.randn(DIM, generator=g, dtype=F64)
        self.c = 0.2 * torch.randn(DIM, generator=g, dtype=F64)
        self.t_scale = t_scale

    def __call__(self, x, t):
        tt = torch.as_tensor(t, dtype=F64).reshape(-1, 1) / self.t_scale
        return torch.tanh(self.w * x + self.b) * (0.5 + 0.5 * tt) + self.c * x * torch.cos(3 * tt)


def vp(sg: float):
    """(alpha_t, sigma_t, lambda_t) at pyengine noise level sg = sigma_t / alpha_t (VP)."""
    a = 1.0 / math.sqrt(1.0 + sg * sg)
    lam = math.inf if sg == 0 else math.log(a / (a * sg))
    return a, a * sg, lam


def level(lam: float) -> float:
    """The noise level sigma_t / alpha_t at half-log-SNR lam (the inverse of lambda_t)."""
    return math.exp(-lam)


class Ref:
    """Model calls in DPM notation: eps_theta(x_t, t) and x0_theta(x_t, t)."""

    def __init__(self, model, prediction: str = "epsilon", process=PROC):
        self.model, self.prediction, self.process = model, prediction, process

    def eps(self, x, sg):
        t = torch.full((x.shape[0],), float(self.process.model_time(sg)), dtype=F64)
        out = self.model(x, t)
        if self.prediction == "epsilon":
            return out
        a, s, _ = vp(sg)                       # v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1
        return s * x + a * out

    def x0(self, x, sg):
        a, s, _ = vp(sg)
        return (x - s * self.eps(x, sg)) / a


def ref_dpm_solver(f: Ref, x, sig, order):
    """Lu 2022a: DPM-Solver-1 (eq. 3.7), -2 (Alg. 1, r1 = 1/2), -3 (Alg. 2, r1 = 1/3,
    r2 = 2/3); the step to sigma 0 takes x0_theta (first order there)."""
    xs = [x]
    for s_, t_ in zip(sig[:-1], sig[1:]):
        a_s, s_s, l_s = vp(s_)
        a_t, s_t, l_t = vp(t_)
        e0 = f.eps(x, s_)
        if t_ == 0:
            x = (x - s_s * e0) / a_s
            xs.append(x)
            continue
        h = l_t - l_s
        if order == 1:
            x = (a_t / a_s) * x - s_t * (math.exp(h) - 1) * e0
        elif order == 2:
            r1 = 0.5
            g1 = level(l_s + r1 * h)
            a1, s1, _ = vp(g1)
            u = (a1 / a_s) * x - s1 * (math.exp(r1 * h) - 1) * e0
            x = ((a_t / a_s) * x - s_t * (math.exp(h) - 1) * e0
                 - s_t / (2 * r1) * (math.exp(h) - 1) * (f.eps(u, g1) - e0))
        else:
            r1, r2 = 1 / 3, 2 / 3
            g1, g2 = level(l_s + r1 * h), level(l_s + r2 * h)
            a1, s1, _ = vp(g1)
            a2, s2, _ = vp(g2)
            u1 = (a1 / a_s) * x - s1 * (math.exp(r1 * h) - 1) * e0
            d1 = f.eps(u1, g1) - e0
            u2 = ((a2 / a_s) * x - s2 * (math.exp(r2 * h) - 1) * e0
                  - s2 * r2 / r1 * ((math.exp(r2 * h) - 1) / (r2 * h) - 1) * d1)
            d2 = f.eps(u2, g2) - e0
            x = ((a_t / a_s) * x - s_t * (math.exp(h) - 1) * e0
                 - s_t / r2 * ((math.exp(h) - 1) / h - 1) * d2)
        xs.append(x)
    return xs


def ref_dpmpp_2s(f: Ref, x, sig, r=0.5):
    """Lu 2022b Alg. 1 (DPM-Solver++(2S)); x0_theta on the step to sigma 0."""
    xs = [x]
    for s_, t_ in zip(sig[:-1], sig[1:]):
        a_s, s_s, l_s = vp(s_)
        a_t, s_t, l_t = vp(t_)
        x0 = f.x0(x, s_)
        if t_ == 0:
            x = x0
        else:
            h = l_t - l_s
            g1 = level(l_s + r * h)
            a1, s1, _ = vp(g1)
            u = (s1 / s_s) * x - a1 * (math.exp(-r * h) - 1) * x0
            Dm = (1 - 1 / (2 * r)) * x0 + 1 / (2 * r) * f.x0(u, g1)
            x = (s_t / s_s) * x - a_t * (math.exp(-h) - 1) * Dm
        xs.append(x)
    return xs


def ref_multistep(f: Ref, x, sig, *, max_order, solver_type="midpoint", lower_order_final=True,
                  algorithm="dpmsolver++", d2_weight=1.0, eta=0.0, s_noise=1.0, noise=None,
                  first_2s=False):
    """Multistep DPM-Solver(++) in DPM notation: Lu 2022b Alg. 2 (2M), the 3M update with
    D2 = d2_weight (D1_0 - D1_1)/(r0 + r1), the SDE 2M update with eta, and the
    noise-prediction multistep (Lu 2022a). ``noise(i)`` gives step i's standard normal draw;
    ``first_2s`` makes a first-order first step DPM-Solver++(2S) instead."""
    pp = algorithm == "dpmsolver++"
    n = len(sig) - 1
    xs, ms, lams = [x], [], []
    for i in range(n):
        s_, t_ = sig[i], sig[i + 1]
        a_s, s_s, l_s = vp(s_)
        a_t, s_t, l_t = vp(t_)
        e0 = f.eps(x, s_)
        x0 = (x - s_s * e0) / a_s
        z = noise(i) if noise is not None else None
        if t_ == 0:
            x = x0
            xs.append(x)
            continue
        h = l_t - l_s
        m0 = x0 if pp else e0
        k = min(max_order, len(ms) + 1)
        if lower_order_final and i == n - 1:
            k = 1
        elif lower_order_final and i == n - 2:
            k = min(k, 2)
        if k >= 2:
            r0 = (l_s - lams[-1]) / h
            D1_0 = (m0 - ms[-1]) / r0
        if k == 3:
            r1 = (lams[-1] - lams[-2]) / h
            D1_1 = (ms[-1] - ms[-2]) / r1
            D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
            D2 = d2_weight * (D1_0 - D1_1) / (r0 + r1)
        if first_2s and i == 0 and k == 1:
            xn = ref_dpmpp_2s(f, x, [s_, t_])[-1]
        elif pp and eta > 0:
            # SDE-DPM-Solver++(2M): k-diffusion sample_dpmpp_2m_sde / diffusers sde-dpmsolver++
            he = (1 + eta) * h
            xn = (s_t / s_s) * math.exp(-eta * h) * x + a_t * (1 - math.exp(-he)) * m0
            if k == 2 and solver_type == "midpoint":
                xn = xn + 0.5 * a_t * (1 - math.exp(-he)) * D1_0
            elif k == 2:
                xn = xn + a_t * ((1 - math.exp(-he)) / (-he) + 1) * D1_0
            xn = xn + s_t * math.sqrt(1 - math.exp(-2 * eta * h)) * s_noise * z
        elif pp:
            xn = (s_t / s_s) * x - a_t * (math.exp(-h) - 1) * m0
            if k == 2 and solver_type == "midpoint":
                xn = xn - 0.5 * a_t * (math.exp(-h) - 1) * D1_0
            elif k == 2:
                xn = xn + a_t * ((math.exp(-h) - 1) / h + 1) * D1_0
            elif k == 3:
                xn = (xn + a_t * ((math.exp(-h) - 1) / h + 1) * D1
                      - a_t * ((math.exp(-h) - 1 + h) / h ** 2 - 0.5) * D2)
        else:
            xn = (a_t / a_s) * x - s_t * (math.exp(h) - 1) * m0
            if k == 2 and solver_type == "midpoint":
                xn = xn - 0.5 * s_t * (math.exp(h) - 1) * D1_0
            elif k == 2:
                xn = xn - s_t * ((math.exp(h) - 1) / h - 1) * D1_0
            elif k == 3:
                xn = (xn - s_t * ((math.exp(h) - 1) / h - 1) * D1
                      - s_t * ((math.exp(h) - 1 - h) / h ** 2 - 0.5) * D2)
        ms.append(m0)
        lams.append(l_s)
        x = xn
        xs.append(x)
    return xs


def ref_singlestep_blocks(f: Ref, x, sig, orders, algorithm="dpmsolver++",
                          solver_type="midpoint"):
    """diffusers' singlestep semantics: a block of order k spans k grid intervals; order-1 steps
    save the block's start state; the order-k step redoes the update from that state with the
    block's k model outputs (at its grid points), Lu 2022a/b singlestep forms."""
    pp = algorithm == "dpmsolver++"
    outs, start = [], None
    for i, k in enumerate(orders):
        s_, t_ = sig[i], sig[i + 1]
        a_i, s_i, _ = vp(s_)
        e = f.eps(x, s_)
        outs.append((x - s_i * e) / a_i if pp else e)
        if k == 1:
            start = x
        if t_ == 0:
            x = outs[-1] if pp else (x - s_i * e) / a_i
            continue
        a_t, s_t, l_t = vp(t_)
        a_b, s_b, l_b = vp(sig[i - k + 1])
        h = l_t - l_b
        if pp:
            xn = (s_t / s_b) * start - a_t * (math.exp(-h) - 1) * outs[-k]
        else:
            xn = (a_t / a_b) * start - s_t * (math.exp(h) - 1) * outs[-k]
        if k == 2:
            r0 = (vp(sig[i])[2] - l_b) / h
            D1 = (outs[-1] - outs[-2]) / r0
            if pp and solver_type == "midpoint":
                xn = xn - 0.5 * a_t * (math.exp(-h) - 1) * D1
            elif pp:
                xn = xn + a_t * ((math.exp(-h) - 1) / h + 1) * D1
            elif solver_type == "midpoint":
                xn = xn - 0.5 * s_t * (math.exp(h) - 1) * D1
            else:
                xn = xn - s_t * ((math.exp(h) - 1) / h - 1) * D1
        elif k == 3:
            r0 = (vp(sig[i])[2] - l_b) / h
            r1 = (vp(sig[i - 1])[2] - l_b) / h
            m0, m1, m2 = outs[-1], outs[-2], outs[-3]
            D1_0, D1_1 = (m1 - m2) / r1, (m0 - m2) / r0
            D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
            D2 = 2 * (D1_1 - D1_0) / (r0 - r1)
            if pp:
                phi2 = (math.exp(-h) - 1) / h + 1
                if solver_type == "midpoint":
                    xn = xn + a_t * phi2 * D1_1
                else:
                    xn = (xn + a_t * phi2 * D1
                          - a_t * ((math.exp(-h) - 1 + h) / h ** 2 - 0.5) * D2)
            else:
                psi2 = (math.exp(h) - 1) / h - 1
                if solver_type == "midpoint":
                    xn = xn - s_t * psi2 * D1_1
                else:
                    xn = xn - s_t * psi2 * D1 - s_t * ((math.exp(h) - 1 - h) / h ** 2 - 0.5) * D2
        x = xn
    return x


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def grid(n: int, to_zero: bool) -> np.ndarray:
    """n steps from 60 to 0.02 (then 0 when to_zero), Karras-spaced: uneven steps in lambda,
    so every r != 1 path is exercised."""
    return pe.schedules.karras(n if to_zero else n + 1, 0.02, 60.0, append_zero=to_zero)


def start(seed: int = 1, batch: int = BATCH):
    return torch.randn(batch, DIM, dtype=F64, generator=torch.Generator().manual_seed(seed))


def run_steps(solver, sig, x, model, prediction="epsilon", **kw):
    """The state at every grid level (captured at each step's first model call) and the end."""
    sample_kw = {k: kw.pop(k) for k in ("seed", "generator") if k in kw}
    sp = pe.Sampler(PROC, solver, sigmas=sig, prediction=prediction, init_noise_scale=1.0, **kw)
    states = {}

    def cb(i, sigma, slots):
        states.setdefault(i, slots["x"].clone())

    out = sp.sample(model, x, callback=cb, backend="torch", **sample_kw)
    return [states[i] for i in range(len(sig) - 1)] + [out]


def assert_rel(got, want, tol=TOL, what=""):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def assert_steps(got, want, tol=TOL):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rel(g, w, tol, what=f"state {i}")


# ---------------------------------------------------------------------------------------
# each solver against its published formula
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("to_zero", [False, True])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_singlestep_matches_paper(order, to_zero):
    model = Toy(0)
    sig, x = grid(5, to_zero), start()
    got = run_steps(f"dpm_solver_{order}", sig, x, model)
    assert_steps(got, ref_dpm_solver(Ref(model), x, sig, order))


def test_dpm_solver_with_v_prediction_model():
    # The same solver on a v-predicting model: only the boundary conversion changes.
    model = Toy(3)
    sig, x = grid(4, True), start(4)
    got = run_steps("dpm_solver_3", sig, x, model, prediction="v")
    assert_steps(got, ref_dpm_solver(Ref(model, "v"), x, sig, 3))


@pytest.mark.parametrize("to_zero", [False, True])
def test_dpmpp_2s_matches_paper(to_zero):
    model = Toy(1)
    sig, x = grid(5, to_zero), start(2)
    assert_steps(run_steps("dpmpp_2s", sig, x, model), ref_dpmpp_2s(Ref(model), x, sig))


@pytest.mark.parametrize("to_zero", [False, True])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_matches_paper(solver_type, lower_order_final, to_zero):
    model = Toy(2)
    sig, x = grid(6, to_zero), start(3)
    got = run_steps("dpmpp_2m", sig, x, model, solver_type=solver_type,
                    lower_order_final=lower_order_final)
    want = ref_multistep(Ref(model), x, sig, max_order=2, solver_type=solver_type,
                         lower_order_final=lower_order_final)
    assert_steps(got, want)


@pytest.mark.parametrize("to_zero", [False, True])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("solver,weight", [("dpmpp_3m", 1.0), ("dpmpp_3m_corrected", 2.0)])
def test_dpmpp_3m_matches_published_update(solver, weight, lower_order_final, to_zero):
    model = Toy(4)
    sig, x = grid(7, to_zero), start(5)
    got = run_steps(solver, sig, x, model, lower_order_final=lower_order_final)
    want = ref_multistep(Ref(model), x, sig, max_order=3, lower_order_final=lower_order_final,
                         d2_weight=weight, first_2s=solver == "dpmpp_3m_corrected")
    assert_steps(got, want)


@pytest.mark.parametrize("solver", ["dpmpp_3m", "dpmpp_3m_corrected"])
def test_dpmpp_3m_heun_warmup_with_v_model(solver):
    model = Toy(5)
    sig, x = grid(6, True), start(6)
    got = run_steps(solver, sig, x, model, prediction="v", solver_type="heun",
                    lower_order_final=False)
    want = ref_multistep(Ref(model, "v"), x, sig, max_order=3, solver_type="heun",
                         lower_order_final=False,
                         d2_weight=2.0 if solver.endswith("corrected") else 1.0,
                         first_2s=solver.endswith("corrected"))
    assert_steps(got, want)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpm_multistep_matches_reference(algorithm, solver_order, solver_type):
    model = Toy(6)
    sig, x = grid(6, algorithm == "dpmsolver++"), start(7)
    got = run_steps("dpm_multistep", sig, x, model, order=solver_order,
                    algorithm=algorithm, solver_type=solver_type)
    want = ref_multistep(Ref(model), x, sig, max_order=solver_order, solver_type=solver_type,
                         algorithm=algorithm)
    assert_steps(got, want)


# ---------------------------------------------------------------------------------------
# SDE-DPM-Solver++(2M): formula, noise marking, determinism, batch invariance
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("to_zero", [False, True])
@pytest.mark.parametrize("eta,s_noise,solver_type", [(1.0, 1.0, "midpoint"),
                                                     (0.5, 0.8, "heun")])
def test_dpmpp_2m_sde_matches_formula_generator_mode(eta, s_noise, solver_type, to_zero):
    model = Toy(7)
    sig, x = grid(5, to_zero), start(8)
    got = run_steps("dpmpp_2m_sde", sig, x, model, eta=eta, s_noise=s_noise,
                    solver_type=solver_type, generator=torch.Generator().manual_seed(42))
    g = torch.Generator().manual_seed(42)
    # diffusers draws in every step(), the step to 0 included: the same sequence of draws.
    want = ref_multistep(Ref(model), x, sig, max_order=2, solver_type=solver_type, eta=eta,
                         s_noise=s_noise,
                         noise=lambda i: torch.randn(x.shape, generator=g, dtype=F64))
    assert_steps(got, want)


def test_dpmpp_2m_sde_marks_every_step_noisy():
    for to_zero in (False, True):
        plan = pe.build_plan(PROC, "dpmpp_2m_sde", grid(5, to_zero), "epsilon")
        assert [u.noise_index for u in plan.updates] == list(range(plan.n_noise))
        assert plan.n_noise == len(plan.sigmas) - 1
        # the step to sigma 0 draws (as diffusers' step() does) but adds nothing
        assert (plan.updates[-1].noise == 0.0) == to_zero


def test_dpmpp_2m_sde_philox_matches_formula():
    model = Toy(8)
    sig, x = grid(5, True), start(9)
    seeds = [3, 2 ** 40 + 17, 99]
    got = run_steps("dpmpp_2m_sde", sig, x, model, seed=seeds)
    st = pe.noise.seeds_tensor(seeds, BATCH)

    def philox(i):
        # The torch backend's definition: float32 Box-Muller, draw number = step here.
        return pe.noise.philox_normal(st, i, DIM, dtype=torch.float32).to(F64)

    want = ref_multistep(Ref(model), x, sig, max_order=2, eta=1.0, noise=philox)
    assert_steps(got, want)


def test_dpmpp_2m_sde_deterministic_and_batch_invariant():
    model = Toy(9)
    sp = pe.Sampler(PROC, "dpmpp_2m_sde", sigmas=grid(6, True), prediction="epsilon",
                    init_noise_scale=1.0)
    x = start(10, batch=5)
    seeds = [11, 2 ** 40 + 3, 7, 123456789, 2 ** 63 + 5]
    a = sp.sample(model, x, seed=seeds)
    assert torch.equal(a, sp.sample(model, x, seed=seeds))
    for j in (0, 3, 4):
        alone = sp.sample(model, x[j:j + 1], seed=[seeds[j]])
        assert torch.equal(alone[0], a[j])
    # reordering the batch moves each sample's result with it
    perm = [4, 2, 0, 3, 1]
    b = sp.sample(model, x[perm], seed=[seeds[p] for p in perm])
    assert torch.equal(b, a[perm])
    # an int seed S gives sample i the key (S, i), whatever the batch
    c = sp.sample(model, x, seed=9)
    assert not torch.allclose(c, a)
    alone = sp.sample(model, x[2:3], seed=[pe.noise.sample_seed(9, 2)])
    assert torch.equal(alone[0], c[2])


def test_dpmpp_2m_sde_eta0_is_dpmpp_2m():
    sig = grid(6, True)
    p0 = pe.build_plan(PROC, "dpmpp_2m_sde", sig, "epsilon", eta=0.0)
    p1 = pe.build_plan(PROC, "dpmpp_2m", sig, "epsilon")
    assert len(p0.updates) == len(p1.updates) and p0.n_noise == 0
    for u0, u1 in zip(p0.updates, p1.updates):
        assert u0.bufs == u1.bufs and u0.noise == 0.0
        np.testing.assert_allclose(u0.coefs, u1.coefs, rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------
# 3M: the published and the corrected update differ only in the weight of D2
# ---------------------------------------------------------------------------------------


def test_3m_and_corrected_differ_only_in_d2_weight():
    proc = pe.processes.EDM()
    sig = pe.schedules.karras(8, 0.02, 60.0, append_zero=False)
    n = len(sig) - 1
    kw = dict(lower_order_final=False)
    a = pe.build_plan(proc, "dpmpp_3m", sig, "sample", **kw)
    c = pe.build_plan(proc, "dpmpp_3m_corrected", sig, "sample", **kw)
    # the corrected plan's first step is DPM-Solver++(2S): one more model call, then the same
    assert a.nfe == n and c.nfe == n + 1
    assert [u.step for u in c.updates] == [0] + list(range(n))
    assert [(o.src, o.sigma) for o in a.ops if isinstance(o, pe.plan.Eval)][1:] == \
        [(o.src, o.sigma) for o in c.ops if isinstance(o, pe.plan.Eval)][2:]
    lam = -np.log(sig)
    for i, (ua, uc) in enumerate(zip(a.updates[1:], c.updates[2:]), start=1):
        assert ua.bufs == uc.bufs and ua.aux_dst == uc.aux_dst
        if ua.aux_coefs is not None:
            np.testing.assert_array_equal(ua.aux_coefs, uc.aux_coefs)
        diff = dict(zip(uc.bufs, uc.coefs - ua.coefs))
        if i < 2:                       # the second-order warm-up step is identical
            assert all(v == 0 for v in diff.values())
            continue
        # the extra -phi3 D2 with D2 = (D0/r0 - D_-1 (1/r0 + 1/r1) + D_-2/r1) / (r0 + r1)
        h = lam[i + 1] - lam[i]
        r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
        phi3 = (math.exp(-h) - 1 + h) / h ** 2 - 0.5
        k = -phi3 / (r0 + r1)
        want = {"out": k / r0, f"d{(i - 1) % 3}": -k * (1 / r0 + 1 / r1),
                f"d{(i - 2) % 3}": k / r1}
        assert set(b for b, v in diff.items() if v != 0) == set(want)
        for b, v in want.items():
            assert diff[b] == pytest.approx(v, rel=1e-12)


# ---------------------------------------------------------------------------------------
# dpm_singlestep: diffusers' DPMSolverSinglestepScheduler semantics
# ---------------------------------------------------------------------------------------


def test_diffusers_order_list_rules():
    assert diffusers_order_list(6, 2, True, False) == [1, 2, 1, 2, 1, 1]
    assert diffusers_order_list(7, 2, True, False) == [1, 2, 1, 2, 1, 2, 1]
    assert diffusers_order_list(6, 2, False, False) == [1, 2, 1, 2, 1, 2]
    assert diffusers_order_list(6, 2, False, True) == [1, 2, 1, 2, 1, 1]     # forced on
    assert diffusers_order_list(6, 3, True, False) == [1, 2, 3, 1, 2, 1]
    assert diffusers_order_list(7, 3, True, False) == [1, 2, 3, 1, 2, 3, 1]
    assert diffusers_order_list(8, 3, True, True) == [1, 2, 3, 1, 2, 3, 1, 1]
    assert diffusers_order_list(8, 3, False, False) == [1, 2, 3, 1, 2, 3, 1, 2]  # forced on
    assert diffusers_order_list(9, 3, False, False) == [1, 2, 3] * 3
    assert diffusers_order_list(4, 1, True, True) == [1] * 4
    assert diffusers_order_list(1, 3, True, False) == [1]
    with pytest.raises(ValueError):
        diffusers_order_list(5, 4, True, False)


@pytest.mark.parametrize("n", [5, 6, 7])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("algorithm,solver_type,to_zero", [
    ("dpmsolver++", "midpoint", True), ("dpmsolver++", "heun", False),
    ("dpmsolver", "midpoint", False), ("dpmsolver", "heun", True)])
def test_dpm_singlestep_matches_reference(n, solver_order, algorithm, solver_type, to_zero):
    model = Toy(10)
    sig, x = grid(n, to_zero), start(11)
    orders = diffusers_order_list(n, solver_order, True, to_zero)
    got = run_steps("dpm_singlestep", sig, x, model, order=solver_order,
                    algorithm=algorithm, solver_type=solver_type)[-1]
    want = ref_singlestep_blocks(Ref(model), x, sig, orders, algorithm, solver_type)
    assert_rel(got, want)


def test_dpm_singlestep_explicit_order_list():
    model = Toy(11)
    sig, x = grid(7, False), start(12)
    orders = [1, 2, 1, 2, 3, 1, 1]
    got = run_steps("dpm_singlestep", sig, x, model, order_list=orders)[-1]
    assert_rel(got, ref_singlestep_blocks(Ref(model), x, sig, orders))
    # a leading order the run has no outputs for is lowered, as the scheduler does
    got = run_steps("dpm_singlestep", sig, x, model, order_list=[2, 3, 1, 2, 3, 1, 2])[-1]
    assert_rel(got, ref_singlestep_blocks(Ref(model), x, sig, [1, 2, 1, 2, 3, 1, 2]))
    for bad in ([1, 2, 2, 1, 1, 1, 1], [1, 2, 1, 3, 1, 1, 1], [1, 2, 3], [1, 4, 1, 1, 1, 1, 1]):
        with pytest.raises(ValueError):
            pe.build_plan(PROC, "dpm_singlestep", sig, "epsilon", order_list=bad)


def test_dpm_singlestep_one_model_call_per_step():
    for so in (1, 2, 3):
        plan = pe.build_plan(PROC, "dpm_singlestep", grid(8, True), "epsilon", order=so)
        assert plan.nfe == 8


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("solver_order,algorithm,final", [
    (2, "dpmsolver++", "zero"), (3, "dpmsolver++", "sigma_min"), (3, "dpmsolver", "sigma_min")])
def test_dpm_singlestep_matches_diffusers_scheduler(solver_order, algorithm, final):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverSinglestepScheduler(
        solver_order=solver_order, algorithm_type=algorithm, final_sigmas_type=final,
        lower_order_final=True)
    sched.set_timesteps(8)
    sig = sched.sigmas.double().numpy()
    assert sched.order_list == diffusers_order_list(8, solver_order, True, final == "zero")
    model = Toy(12, t_scale=1000.0)
    x = start(13)
    y = x.clone()
    for t in sched.timesteps:
        y = sched.step(model(y, t), t, y).prev_sample
    sp = pe.Sampler(pe.processes.VP.discrete("linear"), "dpm_singlestep", sigmas=sig,
                    timesteps=sched.timesteps.numpy(), prediction="epsilon", init_noise_scale=1.0,
                    order=solver_order, algorithm=algorithm,
                    order_list=list(sched.order_list))
    # the scheduler's coefficients are float32: agreement to float32 rounding
    assert_rel(sp.sample(model, x), y, tol=1e-5)


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------

DPM_SOLVERS = ["dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_2m",
               "dpmpp_3m", "dpmpp_3m_corrected", "dpmpp_2m_sde", "dpm_singlestep",
               "dpm_multistep"]


@pytest.mark.parametrize("name", DPM_SOLVERS)
def test_registered_and_nfe_honest(name):
    info = registry.get(name)
    assert "Lu 2022" in info.summary and "=" in info.summary     # cites and states the update
    extra = 1 if name == "dpmpp_3m_corrected" else 0     # its 2S first step, once per run
    plan = pe.build_plan(PROC, name, grid(6, False), "epsilon")
    assert plan.nfe == 6 * info.nfe_per_step + extra
    for label, opts, order, nfe in info.configurations():
        plan = pe.build_plan(PROC, name, grid(6, False), "epsilon", **opts)
        assert plan.nfe == 6 * nfe + extra, label


def test_bad_options_raise():
    sig = grid(4, True)
    with pytest.raises(ValueError):
        pe.build_plan(PROC, "dpmpp_2m", sig, "epsilon", solver_type="bogus")
    with pytest.raises(ValueError):
        pe.build_plan(PROC, "dpm_singlestep", sig, "epsilon", algorithm="sde-dpmsolver")
    with pytest.raises(ValueError):
        pe.build_plan(PROC, "dpm_multistep", sig, "epsilon", order=4)
    with pytest.raises(ValueError):
        pe.build_plan(PROC, "dpmpp_2m_sde", sig, "epsilon", eta=-1.0)
