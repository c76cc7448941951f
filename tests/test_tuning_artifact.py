"""The tuned-plan file: bitwise round trips, validation of malformed files, the process /
prediction / model checks of Sampler.from_tuned, and a tuned plan through every mode."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine.models import GaussianMixture
from pyengine.plan import Eval, Update
from pyengine.tuning.artifact import (describe_process, load_plan, model_fingerprint,
                                      plans_equal, process_mismatch, save_plan)

D = 11
GMM = GaussianMixture.random(d=D, M=3, seed=5)
PROC = pe.processes.EDM()
MODEL = GMM.as_model(PROC, "sample")


def _perturbed(plan, seed):
    """A stand-in for a tuned plan: every coefficient moved by a random relative amount, every
    model time moved off its level (decoupled evaluation times), a -0.0 kept somewhere."""
    g = np.random.default_rng(seed)
    ops = []
    for op in plan.ops:
        if isinstance(op, Update):
            c = op.coefs * (1.0 + 0.03 * g.standard_normal(op.coefs.size))
            aux = None if op.aux_coefs is None else \
                op.aux_coefs * (1.0 + 0.03 * g.standard_normal(op.aux_coefs.size))
            op = dataclasses.replace(op, coefs=c, aux_coefs=aux)
        elif isinstance(op, Eval):
            k = float(np.exp(0.05 * g.standard_normal()))
            op = dataclasses.replace(op, sigma=op.sigma * k, t=op.t * k)
        ops.append(op)
    return dataclasses.replace(plan, ops=ops, solver=f"tuned:{plan.solver}")


def _prov(process=PROC, prediction="sample", **kw):
    return {"process": process, "prediction": prediction, "base_solver": "dpmpp_2m",
            "teacher": {"solver": "dpmpp_3m_corrected", "steps": 200}, "losses": [0.5, 0.25],
            "seed": 3, **kw}


def _noise(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def tuned_2m():
    s = pe.Sampler(PROC, solver="dpmpp_2m", steps=5, prediction="sample", to_zero=False)
    return _perturbed(s.plan, 1)


def test_round_trip_bitwise(tmp_path, tuned_2m):
    path = save_plan(tuned_2m, tmp_path / "p.json", provenance=_prov())
    f = load_plan(path)
    assert plans_equal(f.plan, tuned_2m)
    # field by field, bit for bit
    for a, b in zip(f.plan.ops, tuned_2m.ops):
        assert type(a) is type(b)
        for name, va in vars(a).items():
            vb = getattr(b, name)
            if isinstance(vb, np.ndarray):
                assert va.dtype == np.float64 and va.tobytes() == vb.tobytes(), name
            elif isinstance(vb, float):
                assert np.float64(va).tobytes() == np.float64(vb).tobytes(), name
            else:
                assert va == vb, name
    assert f.plan.sigmas.tobytes() == tuned_2m.sigmas.tobytes()
    assert f.provenance["nfe"] == tuned_2m.nfe == 5
    assert f.provenance["process"] == describe_process(PROC)
    assert f.provenance["losses"] == [0.5, 0.25]
    # sampling bitwise equal: the in-memory plan and the file's
    mem = pe.Sampler.from_tuned(pe.tuning.TunedPlanFile(tuned_2m, _prov(process=describe_process(
        PROC))), PROC)
    disk = pe.Sampler.from_tuned(path, PROC)
    x = _noise(6, 2)
    a, b = mem.sample(MODEL, x, seed=1), disk.sample(MODEL, x, seed=1)
    assert torch.equal(a, b)
    # the tuned plan differs from its base (the test can fail)
    base = pe.Sampler(PROC, solver="dpmpp_2m", steps=5, prediction="sample", to_zero=False)
    assert not torch.equal(a, base.sample(MODEL, x, seed=1))


def test_nonfinite_and_signed_zero(tmp_path):
    s = pe.Sampler(pe.processes.named("vp"), solver="euler_ancestral", steps=4)
    plan = s.plan
    u = plan.updates[0]
    ops = list(plan.ops)
    i = ops.index(u)
    ops[i] = dataclasses.replace(u, sigma=float("nan"), scale=float("inf"),
                                 coefs=np.concatenate([[-0.0], u.coefs[1:]]))
    plan = dataclasses.replace(plan, ops=ops)
    path = save_plan(plan, tmp_path / "nf.json", provenance=_prov(pe.processes.named("vp"),
                                                                  "epsilon",
                                                                  losses=[float("inf")]))
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text          # standard JSON
    assert json.loads(text)["provenance"]["losses"] == ["inf"]
    f = load_plan(path)
    v = f.plan.ops[i]
    assert np.isnan(v.sigma) and v.scale == float("inf")
    assert np.signbit(v.coefs[0]) and v.coefs[0] == 0.0
    assert plans_equal(f.plan, plan) and plan.n_noise > 0


def test_custom_op_refused(tmp_path):
    s = pe.Sampler(pe.processes.named("vp"), solver="pc_langevin", steps=3)
    with pytest.raises(ValueError, match="custom op .*LangevinCorrector"):
        save_plan(s.plan, tmp_path / "c.json", provenance=_prov(s.process, "epsilon"))
    assert not (tmp_path / "c.json").exists()


def test_save_needs_process_and_prediction(tmp_path, tuned_2m):
    with pytest.raises(ValueError, match="'process'"):
        save_plan(tuned_2m, tmp_path / "a.json", provenance={"prediction": "sample"})
    with pytest.raises(ValueError, match="prediction"):
        save_plan(tuned_2m, tmp_path / "a.json", provenance=_prov(prediction="eps-ish"))
    with pytest.raises(ValueError, match="nfe=4 disagrees"):
        save_plan(tuned_2m, tmp_path / "a.json", provenance=_prov(nfe=4))


def _corrupt(tmp_path, tuned, edit):
    path = save_plan(tuned, tmp_path / "m.json", provenance=_prov())
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["plan"]["ops"][1].pop("coefs"), "plan.ops[1].coefs"),
    (lambda d: d["plan"]["ops"][1].__setitem__("coefs", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]),
     "plan.ops[1].coefs"),
    (lambda d: d["plan"]["ops"][0].__setitem__("t", "soon"), "plan.ops[0].t"),
    (lambda d: d["plan"]["ops"][0].__setitem__("op", "jump"), "plan.ops[0].op"),
    (lambda d: d["plan"]["ops"][0].__setitem__("src", "ghost"), "plan.ops[0]"),
    (lambda d: d["plan"]["ops"][1].__setitem__("noise_index", 3), "plan.ops[1].noise_index"),
    (lambda d: d["plan"].__setitem__("sigmas", [1.0, 2.0, 0.5]), "plan.sigmas"),
    (lambda d: d["plan"].__setitem__("output", "nowhere"), "plan.output"),
    (lambda d: d.__setitem__("version", 99), "version"),
    (lambda d: d.__setitem__("format", "something"), "format"),
    (lambda d: d["provenance"].pop("prediction"), "provenance.prediction"),
    (lambda d: d["provenance"].__setitem__("process", "edm"), "provenance.process"),
])
def test_malformed_refused(tmp_path, tuned_2m, edit, field):
    path = _corrupt(tmp_path, tuned_2m, edit)
    with pytest.raises(ValueError) as e:
        load_plan(path)
    msg = str(e.value)
    assert str(path) in msg and repr(field) in msg, msg


def test_not_json_and_missing(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_plan(p)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_plan(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError):
        pe.Sampler.from_tuned(str(tmp_path / "nope.json"), PROC)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_plan(tmp_path)
    with pytest.raises(TypeError, match="path must be a file path"):
        load_plan(None)


def test_process_description_and_mismatch():
    for name in pe.processes.NAMED:
        a, b = pe.processes.named(name), pe.processes.named(name)
        d = describe_process(a)
        assert json.loads(json.dumps(d)) == d
        assert process_mismatch(d, b) is None, name
    d = describe_process(pe.processes.EDM())
    assert "sigma_data 0.5 (plan) vs 0.7 (given)" in process_mismatch(
        d, pe.processes.EDM(sigma_data=0.7))
    assert "VPDiscrete" in process_mismatch(d, pe.processes.named("vp"))
    lin = describe_process(pe.processes.named("vp"))
    assert "betas" in process_mismatch(lin, pe.processes.named("vp_scaled_linear"))
    assert "shift" in process_mismatch(describe_process(pe.processes.RectifiedFlow(shift=3.0)),
                                       pe.processes.RectifiedFlow())


def test_from_tuned_refuses_mismatch(tmp_path, tuned_2m):
    path = save_plan(tuned_2m, tmp_path / "p.json", provenance=_prov())
    with pytest.raises(ValueError, match=r"p\.json.*process EDM, the given process is VPDiscrete"):
        pe.Sampler.from_tuned(path, pe.processes.named("vp"))
    with pytest.raises(ValueError, match="sigma_max 80.0 \\(plan\\) vs 60.0 \\(given\\)"):
        pe.Sampler.from_tuned(path, pe.processes.EDM(sigma_max=60.0))
    with pytest.raises(ValueError, match="prediction='sample' model, the given prediction is "
                                         "'epsilon'"):
        pe.Sampler.from_tuned(path, PROC, prediction="epsilon")
    s = pe.Sampler.from_tuned(path, PROC, prediction="sample")
    assert s.prediction == "sample" and s.nfe == 5 and s.schedule == "tuned"


def test_model_fingerprint_warning(tmp_path, tuned_2m):
    net = torch.nn.Linear(D, D).double()
    other = torch.nn.Linear(D, D).double()
    fp = model_fingerprint(net)
    assert fp.startswith("sha256:") and fp == model_fingerprint(net)
    assert fp != model_fingerprint(other)
    assert model_fingerprint(MODEL) is None
    path = save_plan(tuned_2m, tmp_path / "p.json", provenance=_prov(model_fingerprint=fp))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pe.Sampler.from_tuned(path, PROC, model=net)
    with pytest.warns(UserWarning, match="fingerprint"):
        pe.Sampler.from_tuned(path, PROC, model=other)


def _modes(smp, model, noise, **kw):
    """(sample, compile, request scheduler) results of one sampler."""
    ref = smp.sample(model, noise, seed=4, **kw)
    fn = smp.compile(model, tuple(noise.shape), noise.dtype, cache=pe.runtime.GraphCache(1), **kw)
    comp = fn(noise, seed=4)
    sch = pe.RequestScheduler(model, max_batch=16, dtype=noise.dtype)
    r = sch.submit(smp, noise, seed=4, **kw)
    sch.run()
    return ref, comp, r.result


def test_every_mode_bitwise(tmp_path, tuned_2m):
    path = save_plan(tuned_2m, tmp_path / "p.json", provenance=_prov())
    smp = pe.Sampler.from_tuned(path, PROC)
    x = _noise(5, 7)
    ref, comp, sch = _modes(smp, MODEL, x)
    assert torch.equal(comp, ref) and torch.equal(sch, ref)
    # inpainting
    init = GMM.sample(5, generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(5, D, generator=torch.Generator().manual_seed(2)) > 0.5).double()
    ref, comp, sch = _modes(smp, MODEL, x, init=init, mask=mask)
    assert torch.equal(comp, ref) and torch.equal(sch, ref)
    assert not torch.equal(ref, smp.sample(MODEL, x, seed=4))


def test_img2img_single_step_suffix(tmp_path):
    base = pe.Sampler(PROC, solver="heun", steps=6, prediction="sample")
    # the untouched heun plan loaded as a tuned plan: its suffix is the plan the registry
    # builds over the truncated grid, so img2img agrees with the registry sampler bitwise
    path = save_plan(base.plan, tmp_path / "h.json", provenance=_prov(base_solver="heun"))
    smp = pe.Sampler.from_tuned(path, PROC)
    x = _noise(4, 3)
    init = GMM.sample(4, generator=torch.Generator().manual_seed(9))
    for strength in (0.5, 0.7, 1.0):
        a = smp.sample(MODEL, x, init=init, strength=strength)
        b = base.sample(MODEL, x, init=init, strength=strength)
        assert torch.equal(a, b), strength
    # a perturbed (tuned) heun plan: every mode agrees on img2img
    tuned = _perturbed(base.plan, 4)
    smp = pe.Sampler.from_tuned(
        save_plan(tuned, tmp_path / "t.json", provenance=_prov(base_solver="heun")), PROC)
    ref, comp, sch = _modes(smp, MODEL, x, init=init, strength=0.6)
    assert torch.equal(comp, ref) and torch.equal(sch, ref)
    assert not torch.equal(ref, base.sample(MODEL, x, init=init, strength=0.6))
    assert smp.plan_for(smp.start_index(0.6)).nfe < smp.nfe


def test_img2img_multistep_refused(tmp_path, tuned_2m):
    smp = pe.Sampler.from_tuned(save_plan(tuned_2m, tmp_path / "p.json", provenance=_prov()),
                                PROC)
    x = _noise(3, 1)
    with pytest.raises(ValueError, match="multistep history"):
        smp.sample(MODEL, x, init=x * 0.1, strength=0.6)
    # strength 1 is the whole plan
    a = smp.sample(MODEL, x, init=x * 0.1, strength=1.0)
    assert torch.isfinite(a).all()


def test_guidance_fixed(tmp_path):
    gmm_u = GaussianMixture.random(d=D, M=2, seed=8)
    mu, mc = gmm_u.as_model(PROC, "sample"), MODEL

    def model(x, t, half):
        return torch.where(half.view(-1, 1) > 0, mc(x, t), mu(x, t))

    base = pe.Sampler(PROC, solver="dpmpp_2m", steps=4, prediction="sample",
                      guidance_scale=2.5)
    tuned = _perturbed(base.plan, 6)
    smp = pe.Sampler.from_tuned(save_plan(tuned, tmp_path / "g.json", provenance=_prov()), PROC)
    assert smp.guidance_scale == 2.5
    x = _noise(3, 2)
    extra = {"half": torch.tensor([0, 0, 0, 1, 1, 1])}
    ref = smp.sample(model, x, extra_args=extra)
    fn = smp.compile(model, (3, D), torch.float64, extra_args=extra,
                     cache=pe.runtime.GraphCache(1))
    assert torch.equal(fn(x, seed=0), ref)
    with pytest.raises(ValueError, match="guidance_scale=2.5.*guidance_scale=4"):
        smp.sample(model, x, extra_args=extra, guidance_scale=4.0)
    with pytest.raises(ValueError, match="no guidance"):
        smp.sample(MODEL, x, guidance_scale=None)


def test_schedule_only_plan_rebuilds_for_img2img(tmp_path):
    """A schedule-only plan (the base solver over a fitted grid, here a multistep one) is
    rebuilt over the truncated grid for img2img, exactly as a sampler on that grid."""
    grid = np.array([80.0, 9.0, 2.5, 0.9, 0.2, 0.002])
    fixed = pe.Sampler(PROC, "dpmpp_2m", sigmas=grid, prediction="sample")
    path = save_plan(fixed.plan, tmp_path / "s.json", provenance=_prov(base_solver="dpmpp_2m"))
    smp = pe.Sampler.from_tuned(path, PROC)
    x = _noise(4, 8)
    init = GMM.sample(4, generator=torch.Generator().manual_seed(3))
    a = smp.sample(MODEL, x, init=init, strength=0.6)
    assert torch.equal(a, fixed.sample(MODEL, x, init=init, strength=0.6))
    ref, comp, sch = _modes(smp, MODEL, x, init=init, strength=0.6)
    assert torch.equal(comp, ref) and torch.equal(sch, ref) and torch.equal(ref, a)
    assert torch.equal(smp.sample(MODEL, x), fixed.sample(MODEL, x))


class _MyProcess(pe.processes.EDM):
    """A user process: described by its class and scalar attributes."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k


def test_user_process_description():
    d = describe_process(_MyProcess(2.0))
    assert d["class"] == "_MyProcess" and d["k"] == 2.0
    assert process_mismatch(d, _MyProcess(2.0)) is None
    assert "k 2.0 (plan) vs 3.0 (given)" in process_mismatch(d, _MyProcess(3.0))
    assert "_MyProcess" in process_mismatch(d, pe.processes.EDM())
