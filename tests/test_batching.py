"""Continuous batching (pe.RequestScheduler): requests at different steps of their own plans
share one model call per iteration and fused updates with per-sample coefficient rows; each
result must equal running that request alone, bit for bit on the same backend."""

import pytest
import torch

import pyengine as pe
from pyengine.models import GaussianMixture

PROC = pe.processes.VP.discrete("linear")
SHAPE = (3, 5)


def model(x, t):
    return torch.tanh(x) * 0.3 + 1e-3 * t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) * x


def _noise(b, seed, dtype=torch.float32):
    return torch.randn((b,) + SHAPE, dtype=dtype, generator=torch.Generator().manual_seed(seed))


MIX = [("ddim", 6, 1), ("dpmpp_2m", 9, 2), ("heun", 4, 1), ("unipc", 7, 1), ("dpmpp_3m", 5, 2),
       ("ddim", 6, 1), ("euler_ancestral", 5, 1), ("ddpm", 6, 1), ("dpmpp_2m_sde", 7, 2),
       ("dpm_singlestep", 6, 1), ("ipndm", 5, 1), ("dpm_2", 4, 1)]


@pytest.mark.parametrize("backend", ["torch", "cpp", "numba"])
def test_mixed_requests_equal_running_alone(backend):
    if backend not in pe.backends.available():
        pytest.skip(f"{backend} unavailable")
    sch = pe.RequestScheduler(model, max_batch=7, backend=backend)
    reqs = []
    for i, (solver, n, b) in enumerate(MIX):
        smp = pe.Sampler(PROC, solver=solver, steps=n)
        x = _noise(b, i)
        reqs.append((smp, x, i, sch.submit(smp, x, seed=i)))
    done = sch.run()
    assert sorted(r.id for r in done) == sorted(r.id for *_, r in reqs)
    assert sch.model_calls <= sch.iterations
    for smp, x, i, r in reqs:
        assert r.done and r.evaluations == r.plan.nfe
        ref = smp.sample(model, x, seed=i, backend=backend)
        assert torch.equal(r.result, ref), (smp.solver, (r.result - ref).abs().max().item())


def test_one_model_call_and_one_fused_update_per_iteration():
    # Requests of one solver joining at different times (so at different steps, drawing noise
    # at different draw numbers): every iteration is one model call and one fused update.
    sch = pe.RequestScheduler(model, backend="torch")
    smp = pe.Sampler(PROC, solver="euler_ancestral", steps=6)
    reqs, calls = [], []
    for i in range(4):
        x = _noise(1, 10 + i)
        reqs.append((x, sch.submit(smp, x, seed=[1000 + i])))
        mc, fu = sch.model_calls, sch.fused_updates
        sch.step()
        calls.append((sch.model_calls - mc, sch.fused_updates - fu))
    while sch.active:
        mc, fu = sch.model_calls, sch.fused_updates
        sch.step()
        calls.append((sch.model_calls - mc, sch.fused_updates - fu))
    # the first iteration has no update due (evaluate first), the last no model call
    assert calls[0] == (1, 0) and calls[-1] == (0, 1)
    assert all(c == (1, 1) for c in calls[1:-1]), calls
    for x, r in reqs:
        assert torch.equal(r.result, smp.sample(model, x, seed=r.seeds, backend="torch"))


def test_per_sample_times_reach_the_model():
    seen = []

    def recording(x, t):
        seen.append(t.clone())
        return model(x, t)

    a = pe.Sampler(PROC, solver="ddim", steps=5)
    b = pe.Sampler(PROC, solver="ddim", steps=8)
    sch = pe.RequestScheduler(recording, backend="torch")
    sch.submit(a, _noise(1, 0))
    sch.submit(b, _noise(2, 1))
    sch.step()
    t = seen[0]
    ta = a.plan.ops[0].t
    tb = b.plan.ops[0].t
    assert t.shape == (3,) and t.dtype == torch.float32
    assert torch.equal(t, torch.tensor([ta, tb, tb], dtype=torch.float32)) and ta == tb
    sch.step()
    ea = [op for op in a.plan.ops if isinstance(op, pe.plan.Eval)][1].t
    eb = [op for op in b.plan.ops if isinstance(op, pe.plan.Eval)][1].t
    assert ea != eb
    assert torch.equal(seen[1], torch.tensor([ea, eb, eb], dtype=torch.float32))


def test_per_sample_img2img_strength():
    smp = pe.Sampler(PROC, solver="dpmpp_2m", steps=10)
    sch = pe.RequestScheduler(model, backend="torch")
    init = torch.tanh(_noise(3, 5))
    reqs = []
    for i, s in enumerate((1.0, 0.7, 0.35)):
        x = _noise(1, 20 + i)
        reqs.append((x, s, i, sch.submit(smp, x, seed=i, init=init[i:i + 1], strength=s)))
    sch.run()
    for x, s, i, r in reqs:
        ref = smp.sample(model, x, seed=i, init=init[i:i + 1], strength=s, backend="torch")
        assert torch.equal(r.result, ref)
        assert r.plan.nfe == len(smp.sigmas) - 1 - smp.start_index(s)


def test_capacity_extra_args_float64_denoiser():
    gmm = GaussianMixture.random(d=15, M=3, seed=1)
    edm = pe.processes.EDM()

    def den(xh, sigma, label):
        return gmm.denoise(xh.reshape(xh.shape[0], -1), sigma).reshape(xh.shape) + \
            0.01 * label.view(-1, 1, 1).to(xh.dtype)

    D = pe.Denoiser(den)
    sch = pe.RequestScheduler(D, dtype=torch.float64, max_batch=3, backend="torch")
    reqs = []
    for i, (solver, n, b) in enumerate([("heun", 5, 2), ("dpmpp_2m", 7, 1), ("euler", 4, 2),
                                         ("dpmpp_2s", 3, 1)]):
        smp = pe.Sampler(edm, solver=solver, steps=n, prediction="sample")
        x = _noise(b, 40 + i, torch.float64)
        label = torch.arange(b) + 3 * i
        reqs.append((smp, x, label, sch.submit(smp, x, seed=i, extra_args={"label": label})))
    peak = 0
    while sch.pending or sch.active:
        sch.step()
        peak = max(peak, sch.batch)
    assert peak <= 3
    for i, (smp, x, label, r) in enumerate(reqs):
        ref = smp.sample(D, x, seed=i, extra_args={"label": label}, backend="torch")
        assert torch.allclose(r.result, ref, rtol=1e-12, atol=1e-12)


def test_submission_errors():
    sch = pe.RequestScheduler(model, max_batch=2)
    smp = pe.Sampler(PROC, solver="ddim", steps=3)
    with pytest.raises(ValueError, match="custom op"):
        sch.submit(pe.Sampler(pe.processes.VE(), solver="pc_langevin", steps=3), _noise(1, 0))
    with pytest.raises(ValueError, match="max_batch"):
        sch.submit(smp, _noise(3, 0))
    sch.submit(smp, _noise(1, 0))
    with pytest.raises(ValueError, match="sample shape"):
        sch.submit(smp, torch.randn(1, 4))
    with pytest.raises(ValueError, match="seed"):
        sch.submit(smp, _noise(1, 0), seed=-3)
    with pytest.raises(ValueError, match="extra_args"):
        sch.submit(smp, _noise(1, 0), extra_args={"label": torch.zeros(2)})
    with pytest.raises(ValueError, match="max_batch"):
        pe.RequestScheduler(model, max_batch=0)
    with pytest.raises(TypeError, match="model"):
        pe.RequestScheduler(3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_requests():
    sch = pe.RequestScheduler(model, device="cuda", max_batch=7)
    reqs = []
    for i, (solver, n, b) in enumerate(MIX):
        smp = pe.Sampler(PROC, solver=solver, steps=n)
        x = _noise(b, i).cuda()
        reqs.append((smp, x, i, sch.submit(smp, x, seed=i)))
    sch.run()
    for smp, x, i, r in reqs:
        ref = smp.sample(model, x, seed=i)
        assert torch.equal(r.result, ref), (smp.solver, (r.result - ref).abs().max().item())


def test_guided_and_inpainting_requests_equal_running_alone():
    # Guidance doubles a request's rows in the shared model call (its own 2b-row
    # conditioning); inpainting blends its rows with its own mask. Mixed with plain requests,
    # each result equals Sampler.sample with the same arguments, bit for bit.
    def cond_model(x, t, label):
        return model(x, t) + 0.05 * label.view(-1, 1, 1).to(x.dtype)

    sch = pe.RequestScheduler(cond_model, max_batch=16, backend="torch")
    cases = []
    for i, (solver, n, b, w, inp) in enumerate([("dpmpp_2m", 6, 2, 3.0, False),
                                                ("ddim", 5, 1, None, False),
                                                ("heun", 3, 1, 1.5, False),
                                                ("euler_ancestral", 6, 2, None, True),
                                                ("unipc", 5, 1, 2.0, True)]):
        smp = pe.Sampler(PROC, solver=solver, steps=n, guidance_scale=w)
        x = _noise(b, 40 + i)
        rows = 2 * b if w is not None else b
        label = torch.arange(rows, dtype=torch.float32) + i
        kw = {}
        if inp:
            init = _noise(b, 90 + i)
            mask = (torch.rand((b, 1, SHAPE[1]), generator=torch.Generator().manual_seed(i))
                    > 0.5).float()
            kw = {"init": init, "mask": mask, "strength": 0.8}
        r = sch.submit(smp, x, seed=i, extra_args={"label": label}, **kw)
        cases.append((smp, x, i, label, kw, r))
    sch.run()
    for smp, x, i, label, kw, r in cases:
        ref = smp.sample(cond_model, x, seed=i, extra_args={"label": label}, backend="torch",
                         **kw)
        assert torch.equal(r.result, ref), (smp.solver, (r.result - ref).abs().max().item())


def test_model_error_leaves_the_scheduler_unchanged():
    # Issue 13 #1: a failed iteration must not apply its updates twice on retry.
    calls = {"n": 0}

    def flaky(x, t):
        calls["n"] += 1
        if calls["n"] in (3, 4, 7):
            raise RuntimeError("transient model failure")
        return model(x, t)

    sch = pe.RequestScheduler(flaky, backend="torch")
    reqs = []
    for i, solver in enumerate(["dpmpp_2m", "euler_ancestral", "heun"]):
        smp = pe.Sampler(PROC, solver=solver, steps=5)
        x = _noise(1, 60 + i)
        reqs.append((smp, x, i, sch.submit(smp, x, seed=i)))
    failures = 0
    while sch.pending or sch.active:
        try:
            sch.step()
        except RuntimeError:
            failures += 1
    assert failures == 3
    for smp, x, i, r in reqs:
        ref = smp.sample(model, x, seed=i, backend="torch")
        assert torch.equal(r.result, ref), smp.solver


def test_non_tensor_extra_args_are_not_shared_across_requests():
    # Issue 13 #2: requests whose non-tensor extra_args differ get separate model calls.
    def scaled(x, t, scale):
        return model(x, t) * scale

    sch = pe.RequestScheduler(scaled, backend="torch")
    smp = pe.Sampler(PROC, solver="ddim", steps=4)
    xs = [_noise(1, 70 + i) for i in range(3)]
    rs = [sch.submit(smp, x, seed=i, extra_args={"scale": s})
          for i, (x, s) in enumerate(zip(xs, (1.0, 0.5, 1.0)))]
    sch.run()
    for i, (x, s, r) in enumerate(zip(xs, (1.0, 0.5, 1.0), rs)):
        ref = smp.sample(scaled, x, seed=i, extra_args={"scale": s}, backend="torch")
        assert torch.equal(r.result, ref)
    assert sch.model_calls == 2 * smp.nfe          # two groups, one call each per evaluation


def test_rejected_submit_changes_nothing():
    # Issue 13 #3: a rejected submission (bad seed) must not fix the sample shape.
    sch = pe.RequestScheduler(model, backend="torch")
    smp = pe.Sampler(PROC, solver="ddim", steps=3)
    with pytest.raises(ValueError, match="seed"):
        sch.submit(smp, torch.randn(1, 4), seed=-1)
    with pytest.raises(ValueError, match="seed"):
        sch.submit(smp, torch.randn(1, 4), seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        sch.submit(smp, torch.randn(2, 4), seed=[1])
    assert sch.sample_shape is None and not sch.pending
    r = sch.submit(smp, _noise(1, 0))               # another shape is still welcome
    sch.run()
    assert r.done
