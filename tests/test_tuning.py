"""Tuned plans (issue 15): the tunable plan, its consistency condition, the differentiable
walk and the fit, on small exact Gaussian mixtures."""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine.models import GaussianMixture
from pyengine.plan import Eval, Update
from pyengine.runtime import run_plan
from pyengine.tuning import TunablePlan, consistency_systems
from pyengine.tuning.difwalk import walk
from pyengine.tuning.mixture import mixture_model

BASES = [("dpmpp_2m", {}), ("unipc", {}), ("ipndm", {}), ("dpm_multistep", {"order": 3}),
         ("heun", {}), ("dpmpp_3m", {})]


@functools.lru_cache(maxsize=None)
def _gmm(d=8, M=3, seed=5):
    return GaussianMixture.random(d=d, M=M, seed=seed)


def _shifted_model():
    """(mixture, EDM process, a conditional denoiser: the mixture's plus the ``shift``
    argument, per row)."""
    gmm = _gmm()
    proc = pe.processes.named("edm")
    base = mixture_model(gmm, proc, "sample")

    def model(x, t, shift):
        return base(x, t) + shift
    return gmm, proc, model


def _bits(a) -> bytes:
    return np.asarray(a, dtype=np.float64).tobytes()


def _assert_plans_bitwise(a, b):
    assert len(a.ops) == len(b.ops)
    assert _bits(a.sigmas) == _bits(b.sigmas)
    for p, q in zip(a.ops, b.ops):
        assert type(p) is type(q)
        if isinstance(p, Eval):
            assert (p.src, p.dst, p.step, p.guidance) == (q.src, q.dst, q.step, q.guidance)
            assert _bits([p.sigma, p.t, p.s]) == _bits([q.sigma, q.t, q.s])
        else:
            assert (p.dst, p.bufs, p.aux_dst, p.noise_index, p.kind) == \
                (q.dst, q.bufs, q.aux_dst, q.noise_index, q.kind)
            assert _bits(p.coefs) == _bits(q.coefs)
            assert (p.aux_coefs is None) == (q.aux_coefs is None)
            if p.aux_coefs is not None:
                assert _bits(p.aux_coefs) == _bits(q.aux_coefs)


def _randomize(tp: TunablePlan, g: np.random.Generator, times: bool = True):
    tp.set_schedule(0.4 * g.standard_normal(tp.theta.size))
    tp.z = torch.from_numpy(0.3 * g.standard_normal(tp.n_coef) + 0.05)
    if times:
        tp.phi = torch.from_numpy(g.standard_normal(tp.n_times))


# ---------------------------------------------------------------------------------------
# the zero plan is the base plan
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,opts", BASES, ids=[b[0] for b in BASES])
@pytest.mark.parametrize("proc_name,pred", [("vp", "epsilon"), ("edm", "sample"),
                                            ("flow", "flow")])
def test_zero_plan_is_the_base_plan_bitwise(name, opts, proc_name, pred):
    proc = pe.processes.named(proc_name)
    s = pe.Sampler(proc, solver=name, steps=5, prediction=pred, **opts)
    tp = TunablePlan(s)
    _assert_plans_bitwise(tp.to_plan(), s.plan)
    # a schedule moved and moved back is the base plan again
    tp.set_schedule(np.full(tp.theta.size, 0.3))
    assert not np.array_equal(tp.plan.sigmas, s.sigmas)
    tp.set_schedule(np.zeros(tp.theta.size))
    exported = tp.to_plan()
    _assert_plans_bitwise(exported, s.plan)
    gmm = _gmm()
    model = gmm.as_model(proc, pred)
    x = torch.randn(3, gmm.d, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3)) * s.init_noise_scale
    for backend in ("torch", None):
        a = run_plan(s.plan, model, x, backend=backend)
        b = run_plan(exported, model, x, backend=backend)
        assert torch.equal(a, b)


def test_zero_plan_with_guidance_is_the_base_plan():
    proc = pe.processes.named("vp")
    s = pe.Sampler(proc, solver="unipc", steps=4, prediction="epsilon", guidance_scale=3.5)
    _assert_plans_bitwise(TunablePlan(s).to_plan(), s.plan)


# ---------------------------------------------------------------------------------------
# the consistency condition
# ---------------------------------------------------------------------------------------


def _constant_denoiser(process, prediction, c):
    """model(x, t) whose denoiser is the constant c, in the prediction kind of the process."""
    def model(x, t):
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        sig = torch.from_numpy(np.asarray(process.sigma_of_model_time(tt.numpy()),
                                          dtype=np.float64).reshape(-1, 1))
        s = torch.from_numpy(np.asarray(process.s_of_sigma(sig.numpy()),
                                        dtype=np.float64).reshape(-1, 1))
        cc = c.repeat(x.shape[0] // c.shape[0], 1)
        return pe.parameterization.output_from_denoised(prediction, x, cc, s, s * sig)
    return model


@pytest.mark.parametrize("name,opts", BASES, ids=[b[0] for b in BASES])
@pytest.mark.parametrize("proc_name,pred,to_zero", [("vp", "epsilon", True),
                                                    ("edm", "sample", False),
                                                    ("vp_cosine", "v", True),
                                                    ("flow", "sample", True)])
def test_random_corrections_keep_the_exact_solution(name, opts, proc_name, pred, to_zero):
    """A model whose denoiser is a constant c: the PF-ODE solution is s (c + sigma k); the
    tuned plan with random schedule, corrections (and, where the model output does not
    depend on the time, time shifts) reproduces it to 1e-12."""
    proc = pe.processes.named(proc_name)
    g = np.random.default_rng(zlib.crc32(f"{name} {proc_name}".encode()))
    s = pe.Sampler(proc, solver=name, steps=6, prediction=pred, to_zero=to_zero, **opts)
    tp = TunablePlan(s)
    _randomize(tp, g, times=pred == "sample")
    assert tp.n_coef == 0 or bool((tp.z != 0).all())
    plan = tp.to_plan()
    if tp.n_coef:
        assert any(not np.array_equal(u.coefs, v.coefs)
                   for u, v in zip(plan.updates, tp.plan.updates))
    # Rounding: each update's error is about 1e-16 of its largest terms sum |c_b v_b|
    # relative to its result, and later updates carry it on: the product of those ratios
    # bounds the growth (ipndm's eps differences on the cosine VP grid: 3e5; measured error
    # 7e-11 there, below 3e-13 elsewhere). A correction outside the null space errs by O(z).
    amp = 1.0
    for (A, target, res), op in zip(consistency_systems(plan, proc, pred), plan.updates):
        assert res < 1e-12
        amp *= float(np.abs(A).sum(0) @ np.abs(op.coefs)) / float(np.abs(target).sum())
    d = 7
    c = torch.from_numpy(g.standard_normal((1, d)))
    k = torch.from_numpy(g.standard_normal((5, d)))
    sig0, sig1 = float(plan.sigmas[0]), float(plan.sigmas[-1])
    x0 = float(proc.s_of_sigma(sig0)) * (c + sig0 * k)
    exact = float(proc.s_of_sigma(sig1)) * (c + sig1 * k)
    model = _constant_denoiser(proc, pred, c)
    out = run_plan(plan, model, x0, backend="torch")
    err = float((out - exact).abs().max()) / float(exact.abs().max())
    assert err < max(1e-12, 1e-14 * amp), (err, amp)
    # a base solver that is not consistent (ComfyUI's deis quadrature) keeps those updates
    # as they are; the registry's exponential integrators and multistep methods all are


def test_updates_that_are_not_consistent_are_left_alone():
    proc = pe.processes.named("edm")
    s = pe.Sampler(proc, solver="deis", steps=5, prediction="epsilon")
    tp = TunablePlan(s)
    bad = [j for j, r in enumerate(tp.residuals) if r > 1e-9]
    assert bad, "deis's quadrature weights were expected to miss the condition"
    for j in bad:
        assert tp._bases[j].shape[1] == 0


# ---------------------------------------------------------------------------------------
# the differentiable walk
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,opts", BASES[:4], ids=[b[0] for b in BASES[:4]])
def test_difwalk_matches_sample(name, opts):
    gmm = _gmm()
    proc = pe.processes.named("vp")
    s = pe.Sampler(proc, solver=name, steps=5, prediction="epsilon", backend="torch", **opts)
    model = mixture_model(gmm, proc, "epsilon")
    noise = torch.randn(4, gmm.d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = s.sample(model, noise)
    tp = TunablePlan(s)
    out = walk(tp.plan, model, noise * s.init_noise_scale, coefs=tp.coefficients(),
               times=tp.times())
    assert float((out - ref).abs().max()) <= 1e-13 * max(1.0, float(ref.abs().max()))
    # with corrections: the walk of the tables = the executor on the exported plan
    _randomize(tp, np.random.default_rng(0))
    tp.z = tp.z * 0.1
    tp.phi = tp.phi * 0.3
    a = walk(tp.plan, model, noise * s.init_noise_scale, coefs=tp.coefficients(),
             times=tp.times())
    b = run_plan(tp.to_plan(), model, noise * s.init_noise_scale, backend="torch")
    assert float((a - b).abs().max()) <= 1e-12 * max(1.0, float(b.abs().max()))


def test_difwalk_guidance_and_gradients():
    """Guidance doubles the batch (conditioning with 2B rows); the gradients of the endpoint
    in the time and coefficient parameters match central differences."""
    gmm, proc, model = _shifted_model()
    B = 3
    shift = torch.cat([torch.zeros(B, gmm.d), 0.1 * torch.ones(B, gmm.d)]).double()
    s = pe.Sampler(proc, solver="unipc", steps=4, prediction="sample", guidance_scale=2.0,
                   backend="torch")
    noise = torch.randn(B, gmm.d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = s.sample(model, noise, extra_args={"shift": shift})
    tp = TunablePlan(s)
    x0 = noise * s.init_noise_scale
    out = walk(tp.plan, model, x0, extra_args={"shift": shift})
    assert float((out - ref).abs().max()) <= 1e-13 * max(1.0, float(ref.abs().max()))
    g = np.random.default_rng(1)
    phi = torch.from_numpy(0.2 * g.standard_normal(tp.n_times)).requires_grad_(True)
    z = torch.from_numpy(0.05 * g.standard_normal(tp.n_coef)).requires_grad_(True)
    w = torch.from_numpy(g.standard_normal((B, gmm.d)))

    def f(phi, z):
        return (walk(tp.plan, model, x0, coefs=tp.coefficients(z), times=tp.times(phi),
                     extra_args={"shift": shift}) * w).sum()

    f(phi, z).backward()
    h = 1e-6
    for p, grad in ((phi, phi.grad), (z, z.grad)):
        for i in range(0, p.numel(), 2):
            e = torch.zeros_like(p)
            e[i] = h
            with torch.no_grad():
                up = f(phi + e, z) if p is phi else f(phi, z + e)
                dn = f(phi - e, z) if p is phi else f(phi, z - e)
            fd = float(up - dn) / (2 * h)
            assert abs(fd - float(grad[i])) <= 1e-5 * max(1.0, abs(fd)), (i, fd, float(grad[i]))


# ---------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------


def test_refusals_name_the_reason():
    proc = pe.processes.named("vp")
    with pytest.raises(ValueError, match="draws noise"):
        TunablePlan(pe.Sampler(proc, solver="euler_ancestral", steps=4))
    with pytest.raises(ValueError, match="custom ops"):
        TunablePlan(pe.Sampler(proc, solver="dpmpp_2m", steps=4, guidance_scale=3.0,
                               guidance_rescale=0.7))
    with pytest.raises(ValueError, match="inversion"):
        TunablePlan(pe.Sampler(proc, solver="ddim_inverse", steps=4))
    with pytest.raises(ValueError, match="time_fraction"):
        TunablePlan(pe.Sampler(proc, solver="dpmpp_2m", steps=4), time_fraction=0.9)
    s = pe.Sampler(proc, solver="dpmpp_2m", steps=4)
    model = _gmm().as_model(proc, "epsilon")
    noise = torch.randn(8, 8, dtype=torch.float64)
    for kw, word in ((dict(val_fraction=1.5), "val_fraction"), (dict(optimizer="sgd"), "optimizer"),
                     (dict(iters=-1), "iters"), (dict(teacher=("heun", 1)), "teacher"),
                     (dict(teacher=torch.zeros(3, 8)), "teacher")):
        with pytest.raises(ValueError, match=word):
            pe.tune(s, model, noise, progress=False, **kw)
    with pytest.raises(ValueError, match="noise"):
        pe.tune(s, model, noise[:1], progress=False)
    with pytest.raises(ValueError, match="draws noise"):
        pe.tune(pe.Sampler(proc, solver="dpmpp_2m_sde", steps=4), model, noise, progress=False)


# ---------------------------------------------------------------------------------------
# the fit
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _fit_problem():
    """(sampler, model, training noise, held-out noise, exact held-out endpoints)."""
    gmm = _gmm(d=12, M=3, seed=2)
    proc = pe.processes.named("edm")
    s = pe.Sampler(proc, solver="ipndm", steps=4, prediction="sample")
    model = mixture_model(gmm, proc, "sample")
    g = torch.Generator().manual_seed(11)
    train = torch.randn(40, gmm.d, dtype=torch.float64, generator=g)
    test = torch.randn(24, gmm.d, dtype=torch.float64, generator=g)
    x0 = test * s.init_noise_scale
    exact = gmm.ode_endpoint(x0, float(s.sigmas[0]), 0.0)
    return s, model, train, test, exact


def _held_out_error(plan, model, test, exact, s):
    out = run_plan(plan, model, test * s.init_noise_scale)
    return float(((out - exact).norm(dim=1) / math.sqrt(exact.shape[1])).median())


def test_fitted_plan_beats_base_and_schedule_only():
    s, model, train, test, exact = _fit_problem()
    kw = dict(teacher=("unipc", 48), progress=False, seed=0, schedule_evals=80)
    sched = pe.tune(s, model, train, times=False, coefficients=False, **kw)
    full = pe.tune(s, model, train, iters=120, **kw)
    e_base = _held_out_error(s.plan, model, test, exact, s)
    e_sched = _held_out_error(sched.plan, model, test, exact, s)
    e_full = _held_out_error(full.plan, model, test, exact, s)
    assert e_full <= 0.7 * e_base, (e_base, e_sched, e_full)
    assert e_full <= 0.7 * e_sched, (e_base, e_sched, e_full)
    # the exported plan: the base op structure, the tuned sampler samples it
    assert [type(op) for op in full.plan.ops] == [type(op) for op in s.plan.ops]
    assert full.plan.nfe == s.nfe == full.provenance["nfe"]
    prov = full.provenance
    assert prov["base_solver"] == "ipndm" and prov["prediction"] == "sample"
    assert prov["losses"]["tuned"]["val"] < prov["losses"]["base"]["val"]
    x = test[:5]
    assert torch.equal(full.sampler().sample(model, x),
                       run_plan(full.plan, model, x * s.init_noise_scale))


def test_fit_is_deterministic_given_the_seed():
    s, model, train, _, _ = _fit_problem()
    kw = dict(teacher=("unipc", 24), progress=False, schedule_evals=20, iters=15,
              eval_every=5)
    a = pe.tune(s, model, train, seed=3, **kw)
    b = pe.tune(s, model, train, seed=3, **kw)
    _assert_plans_bitwise(a.plan, b.plan)
    assert a.provenance["losses"] == b.provenance["losses"]
    c = pe.tune(s, model, train, seed=4, **kw)
    assert c.provenance["n_val"] == a.provenance["n_val"]
    assert not all(np.array_equal(u.coefs, v.coefs) for u, v in zip(a.plan.updates,
                                                                      c.plan.updates)) or \
        not np.array_equal(a.plan.sigmas, c.plan.sigmas)


def test_coefficient_coordinates_name_one_buffer_on_every_grid():
    # coordinate i of an update's z moves the coefficient of one fixed non-pivot buffer
    # (and the two pivot buffers' to keep the consistency condition), on every grid
    proc = pe.processes.named("edm")
    tp = TunablePlan(pe.Sampler(proc, solver="ipndm", steps=6, prediction="sample"))
    assert max(b.shape[1] for b in tp._bases) >= 2
    g = np.random.default_rng(0)
    for _ in range(4):
        tp.set_schedule(g.normal(0.0, 0.5, tp.theta.size))
        for basis, piv, (A, _, _) in zip(tp._bases, tp._pivots, consistency_systems(
                tp.plan, proc, "sample")):
            if not basis.shape[1]:
                continue
            B = basis.numpy()
            free = [i for i in range(B.shape[0]) if i not in piv]
            assert np.count_nonzero(B[free], axis=0).tolist() == [1] * B.shape[1]
            assert np.all(np.argmax(np.abs(B[free]), axis=0) == np.arange(B.shape[1]))
            assert np.abs(A @ B).max() <= 1e-12 * max(1.0, np.abs(A).max() * np.abs(B).max())


def test_trim_leaves_the_largest_distances_out_of_every_loss():
    s, model, train, _, _ = _fit_problem()
    teacher = pe.Sampler(s.process, solver="unipc", steps=24,
                         prediction="sample").sample(model, train)
    gen = torch.Generator().manual_seed(0)                # pe.tune's split for seed 0
    perm = torch.randperm(train.shape[0], generator=gen)
    n_val = round(train.shape[0] * 0.25)
    train_idx = perm[n_val:].sort().values
    bad = teacher.clone()
    bad[train_idx[[2, 9]]] += 50.0                       # two training endpoints far off
    kw = dict(progress=False, seed=0, times=False, coefficients=False, schedule=False)
    clean = pe.tune(s, model, train, teacher=teacher, **kw).provenance["losses"]["base"]
    plain = pe.tune(s, model, train, teacher=bad, **kw).provenance["losses"]["base"]
    trimmed = pe.tune(s, model, train, teacher=bad, trim=0.1, **kw).provenance["losses"]
    assert plain["train"] > clean["train"] + 1.0          # each adds 50 / 30 to the mean
    assert trimmed["base"]["train"] <= clean["train"] + 1e-12
    assert trimmed["base"]["val"] <= clean["val"] + 1e-12
    # an independent statement of the trimmed loss: mean of the smallest 90% of distances
    out = run_plan(s.plan, model, train * s.init_noise_scale)
    d = ((out - bad).pow(2).mean(1)).sqrt()[train_idx].sort().values
    want = float(d[:math.ceil(d.numel() * 0.9)].mean())
    assert abs(trimmed["base"]["train"] - want) <= 1e-9 * want
    for bad_trim in (-0.1, 0.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="trim"):
            pe.tune(s, model, train, trim=bad_trim, **kw)


def test_schedule_starts_and_alternation_never_lose_on_validation():
    # more Nelder-Mead starts (the first is the single-start run) and alternation rounds
    # (kept only when better) can only lower the validation loss the fit chooses by
    s, model, train, _, _ = _fit_problem()
    kw = dict(teacher=("unipc", 24), progress=False, seed=1, schedule_evals=30, iters=12,
              eval_every=4, optimizer="lbfgs")
    one = pe.tune(s, model, train, **kw)
    more = pe.tune(s, model, train, schedule_starts=3, **kw)
    alt = pe.tune(s, model, train, schedule_starts=3, alternate=2, **kw)
    v1, v3, va = (t.provenance["losses"]["tuned"]["val"] for t in (one, more, alt))
    assert v3 <= v1 + 1e-12 and va <= v3 + 1e-12, (v1, v3, va)
    assert more.provenance["fitted"]["schedule_evals"] > one.provenance["fitted"][
        "schedule_evals"]
    rounds = alt.provenance["fitted"]["alternation"]
    assert 1 <= len(rounds) <= 2
    kept = [r for r in rounds if r["val"] < v3]
    assert (va < v3) == bool(kept)
    for name in ("schedule_starts", "alternate"):
        with pytest.raises(ValueError, match=name):
            pe.tune(s, model, train, **{**kw, name: -1})


def test_denoiser_models_fit_without_time_shifts():
    gmm = _gmm()
    proc = pe.processes.named("vp")
    s = pe.Sampler(proc, solver="dpmpp_2m", steps=3, prediction="sample")
    noise = torch.randn(8, gmm.d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="times=False"):
        t = pe.tune(s, pe.Denoiser(gmm.as_denoiser()), noise, teacher=("unipc", 16),
                    progress=False, schedule=False, iters=5, eval_every=5)
    assert not t.provenance["fitted"]["times"]
    assert all(op.t == b.t for op, b in zip(t.plan.ops, s.plan.ops) if isinstance(op, Eval))
    assert isinstance(t.plan.ops[-1], Update)


def test_fit_with_guidance_and_lbfgs():
    """A guided plan with per-sample conditioning (2N rows, sliced per minibatch) fits with
    L-BFGS; the tuned plan keeps the guidance and lowers the validation loss."""
    gmm, proc, model = _shifted_model()
    N = 12
    g = torch.Generator().manual_seed(4)
    shift = 0.05 * torch.randn(N, gmm.d, dtype=torch.float64, generator=g)
    shift = torch.cat([torch.zeros_like(shift), shift])          # unconditional rows first
    noise = torch.randn(N, gmm.d, dtype=torch.float64, generator=g)
    s = pe.Sampler(proc, solver="unipc", steps=4, prediction="sample", guidance_scale=1.5)
    t = pe.tune(s, model, noise, extra_args={"shift": shift}, teacher=("unipc", 24),
                optimizer="lbfgs", iters=3, eval_every=1, batch_size=5, schedule=False,
                progress=False)
    assert t.plan.guidance_scale == 1.5
    assert all(op.guidance == 1.5 for op in t.plan.ops if isinstance(op, Eval))
    lo = t.provenance["losses"]
    assert lo["tuned"]["val"] < 0.9 * lo["base"]["val"], lo
    x = noise[:3] * s.init_noise_scale
    ex = {"shift": torch.cat([shift[:3], shift[N:N + 3]])}
    a = walk(t.plan, model, x, extra_args=ex)
    b = run_plan(t.plan, model, x, extra_args=ex, backend="torch")
    assert float((a - b).abs().max()) <= 1e-12 * max(1.0, float(b.abs().max()))


def test_theta_for_inverts_sigmas_for_and_gits_start():
    proc = pe.processes.named("vp")
    g = np.random.default_rng(7)
    for free_end in (True, False):
        s = pe.Sampler(proc, solver="unipc", steps=6)
        tp = TunablePlan(s, free_end=free_end)
        grid = tp.sigmas_for(0.5 * g.standard_normal(tp.theta.size))
        again = tp.sigmas_for(tp.theta_for(grid))
        np.testing.assert_allclose(again, grid, rtol=1e-13, atol=0)
        with pytest.raises(ValueError, match="sigmas"):
            tp.theta_for(grid[::-1])
    _, model, train, _, _ = _fit_problem()
    s = pe.Sampler(pe.processes.named("edm"), solver="ipndm", steps=6, prediction="sample")
    t = pe.tune(s, model, train, schedule="gits", times=False, coefficients=False,
                teacher=("unipc", 24), progress=False)
    assert t.provenance["fitted"]["schedule"] == "gits"
    gits = t.provenance["fitted"]["gits_sigmas"]
    assert t.provenance["losses"]["schedule"].get("kept", True)
    np.testing.assert_allclose(t.plan.sigmas, gits, rtol=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        pe.tune(s, model, train, schedule="dp", progress=False)


def test_registry_solvers_keep_the_exact_solution_of_a_constant_denoiser():
    """Every deterministic registry configuration maps the constant-denoiser solution to
    itself, update by update, but the three ComfyUI ports known not to (quadrature weights
    of deis and ipndm_v order 4; unipc_comfy's last step x = (x + D) / 2)."""
    known = {"deis", "ipndm_v", "unipc_comfy"}
    checked = 0
    for info in pe.list_solvers():
        for label, opts, _, _ in info.configurations():
            s = pe.Sampler(pe.processes.named("vp"), solver=info.name, steps=6, **opts)
            try:
                tp = TunablePlan(s)
            except ValueError:
                continue                    # stochastic, custom ops, inversion
            checked += 1
            worst = max(tp.residuals)
            if info.name not in known:
                assert worst < 1e-12, (label, worst)
    assert checked >= 30


@pytest.mark.parametrize("proc_name,pred", [("vp", "epsilon"), ("edm", "sample"),
                                            ("flow", "sample")])
def test_random_schedules_keep_the_op_structure(proc_name, pred):
    """The plan of any schedule has the base plan's ops and buffer lists (a coefficient that
    is 0 on the base grid and a rounding residue on another does not add a buffer)."""
    proc = pe.processes.named(proc_name)
    g = np.random.default_rng(zlib.crc32(proc_name.encode()))
    for name, opts in BASES:
        s = pe.Sampler(proc, solver=name, steps=6, prediction=pred, **opts)
        tp = TunablePlan(s)
        n = tp.n_coef
        for _ in range(15):
            tp.set_schedule(0.6 * g.standard_normal(tp.theta.size))
            assert tp.n_coef == n
            assert [len(u.bufs) for u in tp.plan.updates] == [len(u.bufs) for u in s.plan.updates]


def test_digits_table_bench_quick_smoke(tmp_path):
    """bench/bench_tuning_digits.py --quick: one NFE of every kind of row, finite scores, a
    loadable fitted plan, and the page re-rendered from its JSON is the same page."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_tuning_digits.py"
    spec = importlib.util.spec_from_file_location("bench_tuning_digits", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    js, md, md2 = tmp_path / "d.json", tmp_path / "d.md", tmp_path / "d2.md"
    res = mod.main(["--quick", "--json", str(js), "--markdown", str(md),
                    "--plans-dir", str(tmp_path / "plans")])
    size = str(res["eval_sizes"][0])
    nfe = next(iter(res["tuned"]))
    for kind in ("fixed", "gits", "tuned"):
        row = res[kind][nfe]
        assert math.isfinite(row[size]) and row[size] > 0.0, (kind, row)
    best = res["fixed"][nfe]
    assert best[size] == min(v[size] for v in best["all"].values())
    t = res["tuned"][nfe]
    assert t["losses"]["tuned"]["val"] <= t["losses"]["base"]["val"]
    assert t["fit_seconds"] > 0 and t["maxrss_mib"] > 0
    loaded = pe.load_plan(t["plan"])
    assert loaded.plan.nfe == int(nfe) and loaded.provenance["loss"] == "feature"
    page = md.read_text()
    assert f"| {nfe} | {best['best']} |" in page
    mod.main(["--from-json", str(js), "--markdown", str(md2)])
    assert md2.read_text() == page


def test_digits_table_bench_seeds_quick(tmp_path):
    """bench/bench_tuning_digits.py --quick --seeds: every row measured on each seed, the FD of
    a prefix equal to the FD of the smaller draw, the aggregate the mean / spread of the seeds'
    values, the best row the lowest mean, the page re-rendered from its JSON the same page, and
    a second run with --reuse taking the kept seeds."""
    import importlib.util
    from pathlib import Path

    from pyengine.models.digits import load_digits_model, quality

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_tuning_digits.py"
    spec = importlib.util.spec_from_file_location("bench_tuning_digits_seeds", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    js, md, md2 = tmp_path / "d.json", tmp_path / "d.md", tmp_path / "d2.md"
    argv = ["--quick", "--seeds", "3,1", "--json", str(js), "--markdown", str(md),
            "--plans-dir", str(tmp_path / "plans")]
    res = mod.main(argv)
    big, small = res["sizes"]
    assert res["seeds"] == [1, 3] and int(big) > int(small)
    rows = res["rows"]
    for kind in ("teacher", "fixed", "gits", "tuned"):
        for by in rows[kind].values():
            for cell in by.values():
                vals = cell[big]["values"]
                assert len(vals) == 2 and all(math.isfinite(v) and v > 0 for v in vals)
                assert cell[big]["mean"] == pytest.approx(sum(vals) / 2, rel=1e-12)
                assert cell[big]["sd"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5,
                                                        rel=1e-9)
    (_, te_by), = rows["teacher"].items()
    (_, te), = te_by.items()
    assert te["tdist"]["max"] == 0.0                       # the teacher is the reference
    nfe, fixed = next(iter(rows["fixed"].items()))
    best = res["best"]["fixed"][nfe]
    assert fixed[best][big]["mean"] == min(c[big]["mean"] for c in fixed.values())
    # the small cell is the FD of the smaller draw of the same seed
    process, model, pred = load_digits_model()
    solver, sch = best.split("/")
    s = pe.Sampler(process, solver=solver, steps=int(nfe), schedule=sch, prediction=pred)
    z = torch.randn(int(small), *model.sample_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fd = quality(s.sample(model, z))["fd"]
    assert fixed[best][small]["values"][1] == pytest.approx(fd, rel=1e-4)
    page = md.read_text()
    assert f"| {nfe} | {best} |" in page and "Per seed" in page
    mod.main(["--from-json", str(js), "--markdown", str(md2)])
    assert md2.read_text() == page
    again = mod.main(argv + ["--reuse"])
    assert all(v.get("reused") for v in again["per_seed"].values())
    assert again["rows"] == rows
