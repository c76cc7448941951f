"""Bad arguments of the public API: each raises before any kernel runs, with the exception
type stated and a message that names the argument as the caller passed it (issue 13 items 9
and 12). One case per argument; the inputs are random and of odd sizes where that matters."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyengine as pe
import pyengine.ops
from pyengine import fused_update as FU
from pyengine import noise as N
from pyengine import sampling as K
from pyengine import schedules as S

NAN = float("nan")
RNG = np.random.default_rng(13)
B, C = 3, 5                                   # odd sizes


def _x():
    return torch.randn(B, C)


def _eps(x, t, **kw):
    return 0.1 * x


def _den(x, sigma, **kw):
    return 0.5 * x


def _vp():
    return pe.processes.VP.discrete("linear")


def _edm():
    return pe.processes.EDM()


def _ddim():
    return pe.Sampler(_vp(), "ddim", steps=3)


def _meta(shape=(B, C)):
    return torch.empty(shape, device="meta")


def _sigmas():
    return K.get_sigmas_karras(3, 0.1, 10.0)


def _fu(**kw):
    out, b0, b1 = torch.empty(B, C), _x(), _x()
    args = dict(out=out, bufs=[b0, b1], coef=[float(RNG.normal()), 1.0])
    args.update(kw)
    return args


def _seeds():
    return torch.arange(B, dtype=torch.int64)


def _gmm():
    from pyengine.models.gmm import GaussianMixture
    return GaussianMixture


def _twice(**kw):
    """A second call of one sampler (its program validated by the first) with ``kw``."""
    smp, x = _ddim(), _x()
    smp.sample(_eps, x)
    return smp.sample(_eps, x, **kw)


def _fused_scheduler_step(model_output):
    diffusers = pytest.importorskip("diffusers")
    from pyengine.integrations.diffusers import fused_class
    sch = fused_class(diffusers.DDIMScheduler)()
    sch.set_timesteps(4)
    sample = torch.randn(2, 3, 4, 4)
    return sch.step(model_output(sample), sch.timesteps[0], sample)


# (id, call, exception type, regex the message must match: the argument's name)
CASES = [
    # -- Sampler -------------------------------------------------------------------------
    ("solver-list", lambda: pe.Sampler(_vp(), ["ddim"], steps=3), ValueError, r"^solver must"),
    ("schedule_options-unknown", lambda: pe.Sampler(_vp(), "ddim", steps=3,
                                                     schedule_options={"bogus": 1}),
     ValueError, r"schedule_options"),
    ("schedule_options-list", lambda: pe.Sampler(_vp(), "ddim", steps=3, schedule_options=[1]),
     ValueError, r"schedule_options must be a dict"),
    ("guidance_scale-str", lambda: pe.Sampler(_vp(), "ddim", steps=3, guidance_scale="7"),
     ValueError, r"guidance_scale must be"),
    ("backend-unknown", lambda: pe.Sampler(_vp(), "ddim", steps=3, backend="bogus"),
     ValueError, r"backend must be"),
    ("to_zero-str", lambda: pe.Sampler(_vp(), "ddim", steps=3, to_zero="no"), ValueError,
     r"to_zero must be"),
    ("build_plan-eta-huge", lambda: pe.build_plan(_edm(), "dpm_fast", [80.0, 3.0, 0.2, 0.0],
                                                  "sample", eta=1e300),
     ValueError, r"eta=1e\+300"),
    ("s_noise-huge", lambda: pe.Sampler(_edm(), "euler_ancestral", steps=3, prediction="sample",
                                        s_noise=1e300), ValueError, r"s_noise=1e\+300"),
    ("invert-eta-huge", lambda: pe.invert(_edm(), _den, _x(), "dpm_fast", 3, prediction="sample",
                                          eta=1e300), ValueError, r"eta=1e\+300"),
    ("order_list-nan", lambda: pe.build_plan(_edm(), "dpm_singlestep", [80.0, 3.0, 0.2, 0.0],
                                             "sample", order_list=NAN),
     ValueError, r"order_list"),
    ("disable_corrector-str", lambda: pe.build_plan(_edm(), "unipc", [80.0, 3.0, 0.2, 0.0],
                                                    "sample", disable_corrector="x"),
     ValueError, r"disable_corrector"),
    ("build_plan-process-str", lambda: pe.build_plan("edm", "euler", [3.0, 1.0, 0.0]),
     TypeError, r"process must be"),
    ("dpm_fast-nfe-huge", lambda: pe.build_plan(_edm(), "dpm_fast", [80.0, 3.0, 0.2, 0.0],
                                                "sample", nfe=10 ** 9),
     ValueError, r"nfe must be an integer in \[0, 30000\]"),
    ("lcm_boundary-timestep_scaling-huge", lambda: pe.build_plan(
        _edm(), "lcm_boundary", [80.0, 3.0, 0.0], "sample", timestep_scaling=1e300),
     ValueError, r"timestep_scaling must be"),
    ("plan_for-start", lambda: _ddim().plan_for(1.5), ValueError, r"start must be"),
    ("plan_for-start-beyond", lambda: _ddim().plan_for(3), ValueError, r"start must be"),
    # -- Sampler.sample ------------------------------------------------------------------
    ("seed-float-array", lambda: pe.Sampler(_edm(), "euler_ancestral", steps=3,
                                            prediction="sample").sample(
        _den, _x(), seed=np.array([1.5] * B)), ValueError, r"seed must be"),
    ("model-None", lambda: _ddim().sample(None, _x()), TypeError, r"model must be callable"),
    ("callback-str", lambda: _ddim().sample(_eps, _x(), callback="cb"), TypeError,
     r"callback must be callable"),
    ("extra_args-int-key", lambda: _ddim().sample(_eps, _x(), extra_args={1: 2}), TypeError,
     r"extra_args must have string keys"),
    ("compute_dtype-f16-second-call", lambda: _twice(compute_dtype=torch.float16),
     ValueError, r"compute_dtype must be"),
    ("compute_dtype-str-second-call", lambda: _twice(compute_dtype="float32"),
     ValueError, r"compute_dtype must be"),
    ("guidance_scale-str-call", lambda: _ddim().sample(_eps, _x(), guidance_scale="7"),
     ValueError, r"guidance_scale must be"),
    ("noise-meta", lambda: _ddim().sample(_eps, _meta()), ValueError, r"noise is a tensor on "
     r"the meta device"),
    ("init-int", lambda: _ddim().sample(_eps, _x(), init=torch.ones(B, C, dtype=torch.int64)),
     ValueError, r"init must be a floating tensor"),
    ("init-meta", lambda: _ddim().sample(_eps, _x(), init=_meta()), ValueError,
     r"init is a tensor on the meta device"),
    ("strength-str", lambda: _ddim().sample(_eps, _x(), init=_x(), strength="0.5"),
     ValueError, r"strength must be"),
    ("mask-meta", lambda: _ddim().sample(_eps, _x(), init=_x(), mask=_meta()), ValueError,
     r"mask is a tensor on the meta device"),
    # -- Sampler.compile and the compiled loop -------------------------------------------
    ("shape-float", lambda: _ddim().compile(_eps, (2.5, C)), ValueError, r"shape must be"),
    ("shape-str", lambda: _ddim().compile(_eps, "2,3"), ValueError, r"shape must be"),
    ("device-unknown", lambda: _ddim().compile(_eps, (B, C), device="bogus"), ValueError,
     r"device must be"),
    ("warmup-negative", lambda: _ddim().compile(_eps, (B, C), warmup=-1), ValueError,
     r"warmup must be"),
    ("cache-str", lambda: _ddim().compile(_eps, (B, C), cache="x")(_x()), ValueError,
     r"cache must be"),
    ("compile-mask-meta", lambda: _ddim().compile(_eps, (B, C), init=_x(), mask=_meta()),
     ValueError, r"mask is a tensor on the meta device"),
    ("compiled-extra_args-list", lambda: _ddim().compile(_eps, (B, C))(_x(), extra_args=[1]),
     TypeError, r"extra_args must be a dict"),
    # -- schedules -----------------------------------------------------------------------
    ("karras-n-None", lambda: S.karras(None, 0.1, 10.0), ValueError, r"n \(number of steps\)"),
    ("karras-n-huge", lambda: S.karras(10 ** 12, 0.1, 10.0), ValueError,
     r"n \(number of steps\) must be at most"),
    ("karras-sigma_min-str", lambda: S.karras(5, "0.1", 10.0), ValueError, r"sigma_min must"),
    ("polyexponential-rho-nan", lambda: S.polyexponential(5, 0.1, 10.0, rho=NAN), ValueError,
     r"rho must be"),
    ("get_sigmas-process-None", lambda: S.get_sigmas("karras", None, 5), ValueError,
     r"process must be"),
    ("linear_quadratic-threshold", lambda: S.linear_quadratic(
        S.model_sampling_for(_vp()), 5, threshold_noise=2.0), ValueError, r"threshold_noise"),
    ("flip-first-negative", lambda: S.flip([3.0, 2.0, 1.0, 0.0], first=-1.0), ValueError,
     r"first \(the level"),
    ("loglinear_interp-zero-level", lambda: S.loglinear_interp([10.0, 1.0, 0.0], 5),
     ValueError, r"levels must"),
    ("ModelSampling-discrete-empty", lambda: S.ModelSampling.discrete([]), ValueError,
     r"sigmas_table must"),
    ("percent_to_sigma-nan", lambda: S.model_sampling_for(_edm()).percent_to_sigma(NAN),
     ValueError, r"percent must be"),
    # -- processes -----------------------------------------------------------------------
    ("EDM-sigma_data-0", lambda: pe.processes.EDM(sigma_data=0.0), ValueError,
     r"sigma_data must be"),
    ("VP-num_train_timesteps-huge", lambda: pe.processes.VP.discrete(
        "linear", num_train_timesteps=10 ** 12), ValueError, r"num_train_timesteps must be"),
    ("VP-continuous-t_min", lambda: pe.processes.VP.continuous(t_min=-1.0), ValueError,
     r"t_min must"),
    ("RectifiedFlow-shift-nan", lambda: pe.processes.RectifiedFlow(shift=NAN), ValueError,
     r"shift must be"),
    # -- RequestScheduler ----------------------------------------------------------------
    ("scheduler-device", lambda: pe.RequestScheduler(_eps, device="bogus"), ValueError,
     r"device must be"),
    ("scheduler-compute_dtype", lambda: pe.RequestScheduler(_eps, compute_dtype=torch.float16),
     ValueError, r"compute_dtype must be"),
    ("submit-sampler-None", lambda: pe.RequestScheduler(_eps).submit(None, _x()), TypeError,
     r"sampler must be a pe.Sampler"),
    ("submit-noise-meta", lambda: pe.RequestScheduler(_eps).submit(_ddim(), _meta()),
     ValueError, r"noise is a tensor on the meta device"),
    # -- the fused update ----------------------------------------------------------------
    ("fused_update-coef-nan", lambda: FU.fused_update(**_fu(coef=[NAN, 1.0])), ValueError,
     r"coef must be finite"),
    ("fused_update-noise_coef-nan", lambda: FU.fused_update(
        **_fu(noise_coef=NAN, seeds=_seeds(), step=0)), ValueError, r"noise_coef must be"),
    ("fused_update-step-2**63", lambda: FU.fused_update(
        **_fu(noise_coef=1.0, seeds=_seeds(), step=2 ** 63)), ValueError, r"step must fit"),
    ("fused_update-bufs-int", lambda: FU.fused_update(
        **_fu(bufs=[_x(), torch.ones(B, C, dtype=torch.int64)])), ValueError, r"bufs\[1\]"),
    ("cpp-step-float", lambda: pe.backends.get("cpp").fused_update(
        **_fu(noise_coef=1.0, seeds=_seeds(), step=1.5)), ValueError,
     r"step must be an int"),
    ("ops-coef-str", lambda: pyengine.ops.fused_update(**_fu(coef="ab")), ValueError,
     r"^coef must be"),
    ("ops-out-None", lambda: pyengine.ops.fused_update(**_fu(out=None)), ValueError,
     r"^out must be a tensor"),
    ("ops-step-float", lambda: pyengine.ops.fused_update(
        **_fu(noise_coef=1.0, seeds=_seeds(), step=1.5)), ValueError, r"step must be an int"),
    ("ops-coef-nan", lambda: pyengine.ops.fused_update(**_fu(coef=[1.0, NAN])), ValueError,
     r"coef must be finite"),
    ("ops-noise_coef-str", lambda: pyengine.ops.fused_update(**_fu(noise_coef="a")),
     ValueError, r"noise_coef must be"),
    # -- log_likelihood ------------------------------------------------------------------
    ("likelihood-data-nan", lambda: pe.log_likelihood(
        _edm(), _den, torch.full((B, C), NAN), prediction="sample"), ValueError,
     r"data must be finite"),
    ("likelihood-data-meta", lambda: pe.log_likelihood(_edm(), _den, _meta(),
                                                       prediction="sample"),
     ValueError, r"data is a tensor on the meta device"),
    ("likelihood-data_var", lambda: pe.log_likelihood(_edm(), _den, _x().double(),
                                                      prediction="sample", data_var=-1.0),
     ValueError, r"data_var must be"),
    ("likelihood-rtol", lambda: pe.log_likelihood(_edm(), _den, _x().double(),
                                                  prediction="sample", rtol=-1.0),
     ValueError, r"rtol must be"),
    ("likelihood-atol-str", lambda: pe.log_likelihood(_edm(), _den, _x().double(),
                                                      prediction="sample", atol="1"),
     ValueError, r"atol must be"),
    ("likelihood-dtype", lambda: pe.log_likelihood(_edm(), _den, _x().double(),
                                                   prediction="sample", dtype=torch.int64),
     ValueError, r"dtype must be"),
    ("likelihood-probes-shape", lambda: pe.log_likelihood(
        _edm(), _den, _x().double(), prediction="sample", divergence="hutchinson",
        probes=torch.randn(2, C + 2)), ValueError, r"probes must be"),
    ("likelihood-sigma_min-str", lambda: pe.log_likelihood(
        _edm(), _den, _x().double(), prediction="sample", sigma_min="1"), ValueError,
     r"sigma_min must be"),
    # -- inversion -----------------------------------------------------------------------
    ("invert-init_noise_scale", lambda: pe.invert(_edm(), _den, _x(), "euler", 3,
                                                  prediction="sample", init_noise_scale=NAN),
     ValueError, r"init_noise_scale must be"),
    ("invert-timesteps-nan", lambda: pe.invert(_edm(), _den, _x(), "euler", prediction="sample",
                                               sigmas=[0.1, 1.0, 10.0],
                                               timesteps=[NAN, 1.0, 2.0]),
     ValueError, r"timesteps must be finite"),
    ("invert-steps-huge", lambda: pe.invert(_edm(), _den, _x(), "euler", 10 ** 12,
                                            prediction="sample"),
     ValueError, r"steps must be"),
    ("Inverter-schedule_options-list", lambda: pe.Inverter(_edm(), "euler", 3,
                                                           prediction="sample",
                                                           schedule_options=[1]),
     ValueError, r"schedule_options must be a dict"),
    # -- k-diffusion / ComfyUI functions -------------------------------------------------
    ("sample_dpm_fast-n-huge", lambda: K.sample_dpm_fast(_den, _x(), 0.1, 10.0, 10 ** 14,
                                                         disable=True),
     ValueError, r"n \(model evaluations\) must be at most"),
    ("BrownianTree-seed-str", lambda: (pytest.importorskip("torchsde"),
                                       K.BrownianTreeNoiseSampler(_x(), 0.1, 10.0, seed="a")),
     ValueError, r"seed must be an int"),
    ("get_sigmas_vp-n-0", lambda: K.get_sigmas_vp(0), ValueError, r"n \(number of steps\)"),
    ("get_sigmas_vp-eps_s", lambda: K.get_sigmas_vp(4, eps_s=2.0), ValueError, r"eps_s must"),
    ("get_sigmas_karras-device", lambda: K.get_sigmas_karras(4, 0.1, 10.0, device="bogus"),
     ValueError, r"device must be"),
    ("get_ancestral_step-str", lambda: K.get_ancestral_step("2", 1.0), ValueError,
     r"sigma_from must be"),
    ("append_zero-0d", lambda: K.append_zero(torch.tensor(1.0)), ValueError,
     r"append_zero takes a 1-D tensor"),
    ("sample_euler-sigmas-2d", lambda: K.sample_euler(_den, _x(), _sigmas()[None],
                                                      disable=True),
     ValueError, r"sigmas must be a 1-D"),
    ("sample_euler-sigmas-meta", lambda: K.sample_euler(_den, _x(), _sigmas().to("meta"),
                                                        disable=True),
     ValueError, r"sigmas is a tensor on the meta device"),
    ("sample_euler-x-0d", lambda: K.sample_euler(_den, torch.tensor(1.0), _sigmas(),
                                                 disable=True),
     ValueError, r"x must be a tensor \[B"),
    ("sample_euler-s_tmin-str", lambda: K.sample_euler(_den, _x(), _sigmas(), s_tmin="a",
                                                       disable=True),
     ValueError, r"s_tmin must be"),
    ("sample_euler-callback-str", lambda: K.sample_euler(_den, _x(), _sigmas(), callback="a",
                                                         disable=True),
     TypeError, r"callback must be callable"),
    ("noise_sampler-returns-None", lambda: K.sample_euler_ancestral(
        _den, _x(), _sigmas(), noise_sampler=lambda a, b: None, disable=True), ValueError,
     r"noise_sampler\(sigma, sigma_next\) must return"),
    ("noise_sampler-wrong-shape", lambda: K.sample_euler_ancestral(
        _den, _x(), _sigmas(), noise_sampler=lambda a, b: torch.randn(7), disable=True),
     ValueError, r"noise_sampler\(sigma, sigma_next\) must return"),
    ("sample_ipndm-max_order-str", lambda: K.sample_ipndm(_den, _x(), _sigmas(),
                                                          max_order="2", disable=True),
     ValueError, r"max_order must be"),
    ("comfy_sigmas-model_sampling", lambda: K.comfy_sigmas("karras", None, 4), ValueError,
     r"model_sampling must be"),
    ("comfy_default_noise_sampler-seed", lambda: K.comfy_default_noise_sampler(_x(), seed=1.5),
     ValueError, r"seed must be"),
    # -- other modules -------------------------------------------------------------------
    ("gmm-random-d-0", lambda: _gmm().random(d=0), ValueError, r"^d must be"),
    ("gmm-sample-n-float", lambda: _gmm().random(d=3, M=2).sample(1.5), ValueError,
     r"^n must be"),
    ("gmm-denoise-sigma-nan", lambda: _gmm().random(d=C, M=2).denoise(_x(), NAN), ValueError,
     r"sigma must be"),
    ("gmm-means-nan", lambda: _gmm()(torch.full((2, C), NAN), torch.ones(2)), ValueError,
     r"means must be finite"),
    ("gmm-as_model-process", lambda: _gmm().random(d=C, M=2).as_model("edm"), TypeError,
     r"process must be"),
    ("denoising_loss-x0-0d", lambda: pe.denoising_loss(_den, _edm(), torch.tensor(1.0),
                                                       prediction="sample"),
     ValueError, r"x0 must be a tensor"),
    ("philox_normal-seeds-float", lambda: N.philox_normal(torch.zeros(B), 0, C), ValueError,
     r"seeds must be an integer"),
    ("philox_normal-numel", lambda: N.philox_normal(_seeds(), 0, -1), ValueError,
     r"numel must be"),
    ("backends.get-device", lambda: pe.backends.get(None, device="bogus"), ValueError,
     r"device must be"),
    ("FusedScheduler-model_output-shape", lambda: _fused_scheduler_step(
        lambda s: torch.randn(1, *s.shape[1:])), ValueError, r"model output must be"),
    ("FusedScheduler-model_output-meta", lambda: _fused_scheduler_step(
        lambda s: torch.empty(s.shape, device="meta")), ValueError, r"model output must be"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_schedule_takes_0d_tensor_levels():
    """k-diffusion passes a model's sigma_min / sigma_max buffers (0-d tensors): the same
    grid as the floats."""
    lo, hi = float(RNG.uniform(0.01, 0.1)), float(RNG.uniform(5.0, 50.0))
    want = S.karras(7, lo, hi)
    got = S.karras(7, torch.tensor(lo, dtype=torch.float64), torch.tensor(hi,
                                                                            dtype=torch.float64))
    np.testing.assert_array_equal(got, want)
    assert torch.equal(K.get_sigmas_karras(7, torch.tensor(lo, dtype=torch.float64),
                                           torch.tensor(hi, dtype=torch.float64)),
                       K.get_sigmas_karras(7, lo, hi))


def test_to_d_takes_a_number():
    """to_d with sigma a Python number equals the [B] tensor form."""
    x, d = _x(), _x()
    s = float(RNG.uniform(0.5, 3.0))
    torch.testing.assert_close(K.to_d(x, s, d), K.to_d(x, torch.full((B,), s), d))


def test_rejected_submit_leaves_scheduler_unchanged():
    """A refused submit (bad sampler) leaves nothing behind: a later valid request of any
    shape is taken."""
    sch = pe.RequestScheduler(_eps)
    with pytest.raises(TypeError, match="sampler"):
        sch.submit("ddim", torch.randn(2, 7))
    sch.submit(_ddim(), torch.randn(1, C))
    assert sch.sample_shape == (C,)


def test_cli_bad_device_is_a_usage_error(tmp_path):
    """`pyengine sample --device bogus`: exit code 2 and the option named, before sampling."""
    r = subprocess.run([sys.executable, "-m", "pyengine", "sample", "gmm", "-n", "2",
                        "--device", "bogus", "-o", str(tmp_path / "x.npy")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--device" in r.stderr and "bogus" in r.stderr
    assert not (tmp_path / "x.npy").exists()


def test_clip_bounds_beyond_float32_clamp_nothing():
    """clip_x0 with clip_sample_range / sample_max_value beyond float32's range is the
    unclipped run (torch refused to convert the bound at run time before)."""
    proc, x = _vp(), _x() * 5
    for kw in ({"clip_sample_range": 1e300}, {"thresholding": True, "sample_max_value": 1e300}):
        inf_kw = {k: (math.inf if v == 1e300 else v) for k, v in kw.items()}
        got = pe.Sampler(proc, "clip_x0", steps=3, **kw).sample(_eps, x)
        want = pe.Sampler(proc, "clip_x0", steps=3, **inf_kw).sample(_eps, x)
        assert torch.equal(got, want)


def test_valid_inputs_still_run():
    """The checks take every valid form: numpy and 0-d tensor scalars (a 0-d tensor
    sigma_min in schedule_options and a numpy array of per-sample seeds were refused before),
    bool masks, float64 model outputs, numpy integer seeds."""
    proc = _vp()
    lo = torch.tensor(float(RNG.uniform(0.05, 0.2)), dtype=torch.float64)
    smp = pe.Sampler(proc, "ddim", steps=np.int64(3), guidance_rescale=0, to_zero=np.bool_(True),
                     eta=torch.tensor(0.0), schedule_options={"sigma_min": lo})
    assert smp.sigmas[-2] == pytest.approx(float(lo))
    x = _x()
    a = smp.sample(_eps, x, seed=np.int64(2))
    b = smp.sample(lambda xx, t: _eps(xx, t).double(), x, seed=2)
    ea = pe.Sampler(_edm(), "euler_ancestral", steps=3, prediction="sample")
    seeds = RNG.integers(0, 2 ** 32, B)
    torch.testing.assert_close(ea.sample(_den, x, seed=seeds),       # numpy per-sample seeds
                               ea.sample(_den, x, seed=seeds.tolist()), rtol=0, atol=0)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b)
    m = torch.rand(B, C) > 0.5
    out = smp.sample(_eps, x, init=_x(), mask=m, strength=np.float32(0.7))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert math.isfinite(S.karras(np.int64(4), np.float32(0.1), 10)[0])
