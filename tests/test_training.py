"""The training objectives (pyengine.training): targets against float64 statements, the exact
denoiser's loss on Gaussian data against its closed form, EDM's unit-weight identity, the
moments of the sigma samplers, a tiny model trained with the loss, and train_digits' loss
against the formula it had before."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyengine import parameterization as pz
from pyengine import processes as P
from pyengine import training as T

PREDICTIONS = ("epsilon", "sample", "v", "flow", "score")
F64 = torch.float64


def _log_uniform_sigmas(process, n, g):
    lo, hi = math.log(process.sigma_min), math.log(process.sigma_max)
    return torch.exp(lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64))


def _independent_target(p, x0, eps, alpha, sd):
    """The targets as each prediction kind defines them."""
    return {"epsilon": eps, "sample": x0, "v": alpha * eps - sd * x0, "flow": eps - x0,
            "score": -eps / sd}[p]


@pytest.mark.parametrize("name", list(P.NAMED))
def test_targets_invert_the_parameterization(name):
    """x = s (x0 + sigma eps); every target equals its definition, and the parameterization's
    denoised / noise estimates of it give back x0 and eps to 1e-12."""
    process = P.named(name)
    g = torch.Generator().manual_seed(hash(name) % 2**31)
    B, d = 7, 13
    x0, eps = torch.randn(B, d, generator=g, dtype=F64), torch.randn(B, d, generator=g, dtype=F64)
    sigma = _log_uniform_sigmas(process, B, g)
    s = torch.as_tensor(process.s_of_sigma(sigma.numpy()), dtype=F64)[:, None]
    x = T.noisy(process, x0, sigma, eps)
    torch.testing.assert_close(x, s * (x0 + sigma[:, None] * eps), rtol=1e-13, atol=1e-13)
    alpha, sd = s, s * sigma[:, None]
    for p in PREDICTIONS:
        tgt = T.target(process, p, x0, eps, sigma)
        torch.testing.assert_close(tgt, _independent_target(p, x0, eps, alpha, sd),
                                   rtol=1e-13, atol=1e-13)
        for b in range(B):
            (dx, do), (ex, eo) = pz.affine(p, float(alpha[b]), float(sd[b]))
            # what 1e-12 means next to the terms that cancel
            scale = max(1.0, float((dx * x[b]).abs().max()), float((ex * x[b]).abs().max()))
            assert float((dx * x[b] + do * tgt[b] - x0[b]).abs().max()) < 1e-12 * scale, (p, b)
            assert float((ex * x[b] + eo * tgt[b] - eps[b]).abs().max()) < 1e-12 * scale, (p, b)


def _posterior(z, sigma, v):
    """x0 ~ N(0, v I), z = x0 + sigma eps: E[x0 | z] and Var[x0 | z] (per element)."""
    return v * z / (v + sigma ** 2), v * sigma ** 2 / (v + sigma ** 2)


@pytest.mark.parametrize("name", ["vp", "vp_continuous", "sub_vp", "ve", "edm", "flow_shift3"])
def test_exact_denoiser_gives_the_closed_form_minimum(name):
    """On N(0, v I) data the posterior-mean model's loss is E_sigma[lambda(sigma) Var(x0 | x)]
    per element (Var = v sigma^2 / (v + sigma^2)); shifting the model by delta adds
    E[w delta^2]. EDM weighting with sigma_data^2 = v makes the minimum exactly 1."""
    process = P.named(name)
    g = torch.Generator().manual_seed(17)
    v = 0.37
    B, d = 1024, 31
    x0 = math.sqrt(v) * torch.randn(B, d, generator=g, dtype=F64)
    eps = torch.randn(B, d, generator=g, dtype=F64)
    sigma = T.sample_sigmas(process, B, generator=g, dtype=F64)
    sg = sigma[:, None]
    s = torch.as_tensor(process.s_of_sigma(sigma.numpy()), dtype=F64)[:, None]
    alpha, sd = s, s * sg
    t_expected = torch.as_tensor(process.model_time(sigma.numpy()), dtype=F64)
    # the per-element posterior variance of each target: target = c_x0 x0 + c_eps eps and
    # eps = (z - x0) / sigma, so Var(target | x) = (c_x0 - c_eps / sigma)^2 Var(x0 | x)
    coef = {"epsilon": (0.0, 1.0), "sample": (1.0, 0.0), "v": (-sd, alpha), "flow": (-1.0, 1.0),
            "score": (0.0, -1.0 / sd)}
    var0 = _posterior(0.0, sg, v)[1]
    lam = {"edm": (sg ** 2 + v) / (sg ** 2 * v), "min_snr": (1.0 / sg ** 2).clamp(max=5.0),
           "epsilon": 1.0 / sg ** 2}

    for p in PREDICTIONS:
        c_x0, c_eps = coef[p]
        per_elem = (c_x0 - c_eps / sg) ** 2 * var0          # [B, 1]: "none" weighting

        def exact(x, t, p=p, c_x0=c_x0, c_eps=c_eps, shift=None):
            torch.testing.assert_close(t, t_expected, rtol=1e-12, atol=0)
            z = x / s
            m = _posterior(z, sg, v)[0]
            out = c_x0 * m + c_eps * (z - m) / sg
            return out if shift is None else out + shift

        for weighting in ("none", "edm", "min_snr", "epsilon"):
            # the x0-space weight of this weighting times Var(target) / g^2 = Var(x0 | x)
            e = per_elem if weighting == "none" else lam[weighting] * var0
            loss = T.denoising_loss(exact, process, x0, prediction=p, weighting=weighting,
                                    sigma=sigma, eps=eps, sigma_data=math.sqrt(v))
            expected = float(e.mean())
            # the squared errors are chi-square(1) elements scaled by e: std of the mean
            std = math.sqrt(2.0 * d * float((e ** 2).sum())) / (B * d)
            assert abs(float(loss) - expected) < 5 * std, (p, weighting, float(loss), expected)
            if weighting == "edm":
                assert abs(expected - 1.0) < 1e-12
            # a shift by 0.3 sqrt(e / w) raises the loss by about 0.09 E[e]
            w = T.loss_weight(process, p, sigma, weighting, sigma_data=math.sqrt(v))[:, None]
            shift = 0.3 * (e / w).sqrt()

            def shifted(x, t, shift=shift, fn=exact):
                return fn(x, t, shift=shift)

            worse = T.denoising_loss(shifted, process, x0, prediction=p, weighting=weighting,
                                     sigma=sigma, eps=eps, sigma_data=math.sqrt(v))
            assert float(worse - loss) > 0.5 * 0.09 * expected, (p, weighting)


def test_edm_weighting_gives_the_preconditioned_network_unit_weight():
    """lambda(sigma) c_out(sigma)^2 = 1 (EDM eq. 8), so the x0-loss of D = c_skip x + c_out F
    is the plain MSE of F against (x0 - c_skip x) / c_out; and the weighting is the same
    x0-space weight whatever the model predicts (each kind's output of the same D)."""
    g = torch.Generator().manual_seed(3)
    sd_data = 0.61
    process = P.EDM(sigma_data=sd_data)
    sigma = T.sample_sigmas(process, 257, method="lognormal", generator=g, dtype=F64)
    w = T.loss_weight(process, "sample", sigma, "edm")
    c_skip, c_out, c_in = pz.edm_scalings(sigma, sd_data)
    assert float((w * c_out ** 2 - 1).abs().max()) < 1e-12

    x0 = sd_data * torch.randn(257, 3, 5, generator=g, dtype=F64)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    W = torch.randn(5, 5, generator=g, dtype=F64)

    def F(x_in, sig):
        return torch.tanh(x_in @ W) * (1 + sig.log()[:, None, None] / 4)

    col = (lambda c: c[:, None, None])  # noqa: E731

    def D(x, sig):
        return col(c_skip) * x + col(c_out) * F(col(c_in) * x, sig)

    x = x0 + col(sigma) * eps
    f_target = (x0 - col(c_skip) * x) / col(c_out)
    plain = float(((F(col(c_in) * x, sigma) - f_target) ** 2).mean())
    loss = T.denoising_loss(D, process, x0, prediction="sample", weighting="edm", sigma=sigma,
                            eps=eps)
    assert abs(float(loss) - plain) < 1e-12 * plain
    assert float(T.denoising_loss(pz.Denoiser(D), process, x0, prediction="x0",
                                  weighting="edm", sigma=sigma, eps=eps)) == float(loss)
    for p in PREDICTIONS:
        def model(x, t, p=p):
            return pz.output_from_denoised(p, x, D(x, t), 1.0, col(t))
        lp = T.denoising_loss(model, process, x0, prediction=p, weighting="edm", sigma=sigma,
                              eps=eps)
        assert abs(float(lp) - plain) < 1e-10 * plain, p


def test_denoiser_models_see_the_scaled_state():
    """A Denoiser is called as D(x / s, sigma) (VP: s < 1), with the same loss as the model
    (x, t) -> D(x / s(t), sigma(t)); reduction="none" gives the per-sample means."""
    process = P.VP.continuous()
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(11, 2, 3, generator=g, dtype=F64)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    sigma = T.sample_sigmas(process, 11, generator=g, dtype=F64)

    def D(x_hat, sig):
        return torch.tanh(x_hat) / (1 + sig[:, None, None])

    def plain(x, t):
        sig = torch.as_tensor(process.sigma_of_t(t.numpy()), dtype=F64)
        s = torch.as_tensor(process.s_of_t(t.numpy()), dtype=F64)
        return D(x / s[:, None, None], sig)

    kw = dict(prediction="sample", weighting="edm", sigma=sigma, eps=eps, sigma_data=0.8)
    a = T.denoising_loss(pz.Denoiser(D), process, x0, reduction="none", **kw)
    b = T.denoising_loss(plain, process, x0, reduction="none", **kw)
    assert a.shape == (11,)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
    torch.testing.assert_close(a.mean(), T.denoising_loss(pz.Denoiser(D), process, x0, **kw),
                               rtol=1e-14, atol=0)


def test_sigma_sampling_moments():
    g = torch.Generator().manual_seed(11)
    n = 200_003
    # log-normal: log sigma ~ N(p_mean, p_std^2)
    p_mean, p_std = -0.7, 1.7
    ls = T.sample_sigmas(P.EDM(), n, method="lognormal", generator=g, dtype=F64,
                         p_mean=p_mean, p_std=p_std).log()
    assert abs(float(ls.mean()) - p_mean) < 5 * p_std / math.sqrt(n)
    assert abs(float(ls.std()) - p_std) < 5 * p_std / math.sqrt(2 * n)
    # the default float32 draw is what EDM training computes
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert torch.equal(T.sample_sigmas(P.EDM(), 9, method="lognormal", generator=g1),
                       (-1.2 + 1.2 * torch.randn(9, generator=g2)).exp())
    # logit-normal on the flow process: logit of the normalized time ~ N(m, s^2)
    flow = P.RectifiedFlow(t_min=0.01, t_max=0.98)
    t = torch.as_tensor(flow.t_of_sigma(T.sample_sigmas(flow, n, method="logit_normal",
                                                       generator=g, dtype=F64,
                                                       logit_mean=0.3, logit_std=0.8).numpy()))
    u = (t - 0.01) / 0.97
    lu = (u / (1 - u)).log()
    assert abs(float(lu.mean()) - 0.3) < 5 * 0.8 / math.sqrt(n)
    assert abs(float(lu.std()) - 0.8) < 5 * 0.8 / math.sqrt(2 * n)
    # uniform: t uniform over the process's own trained range; discrete VP: every timestep
    for name in ("vp_continuous", "sub_vp", "ve", "edm", "flow"):
        process = P.named(name)
        lo = float(process.t_of_sigma(process.sigma_min))
        hi = float(process.t_of_sigma(process.sigma_max))
        tt = torch.as_tensor(process.t_of_sigma(
            T.sample_sigmas(process, n, generator=g, dtype=F64).numpy()))
        u = (tt - lo) / (hi - lo)
        assert float(u.min()) >= -1e-9 and float(u.max()) <= 1 + 1e-9, name
        assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n), name
        assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n), name
    vp = P.VP.discrete("linear", num_train_timesteps=37)
    k = torch.as_tensor(vp.t_of_sigma(T.sample_sigmas(vp, 5000, generator=g, dtype=F64).numpy()))
    assert torch.equal(k, k.round()) and set(k.long().tolist()) == set(range(37))
    assert abs(float(k.mean()) - 18) < 5 * math.sqrt((37 ** 2 - 1) / 12 / 5000)


def test_a_tiny_model_learns_a_two_point_mixture():
    """Flow matching (flow process, velocity target, logit-normal t) on x0 in {-1, +1}: 300
    Adam steps close most of the gap between the initial loss and the exact model's."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    process = P.RectifiedFlow()
    net = torch.nn.Sequential(torch.nn.Linear(2, 48), torch.nn.SiLU(), torch.nn.Linear(48, 48),
                              torch.nn.SiLU(), torch.nn.Linear(48, 1))

    def model(x, t):
        return net(torch.cat([x, t[:, None]], dim=1))

    def batch(n):
        return torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)

    # a held-out batch with its noise levels and noise fixed
    x_ev = batch(4096)
    s_ev = T.sample_sigmas(process, 4096, method="logit_normal", generator=g)
    e_ev = torch.randn(x_ev.shape, generator=g)

    def held_out(m):
        with torch.no_grad():
            return float(T.denoising_loss(m, process, x_ev, prediction="flow", sigma=s_ev,
                                          eps=e_ev))

    def exact(x, t):   # E[eps - x0 | x]: the posterior of +-1 is tanh(z / sigma^2)
        sig = t / (1 - t)
        z = x * (1 + sig[:, None])
        m = torch.tanh(z / sig[:, None] ** 2)
        return (z - m) / sig[:, None] - m

    before, floor = held_out(model), held_out(exact)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        loss = T.denoising_loss(model, process, batch(256), prediction="flow",
                                sigma_sampling="logit_normal", generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out(model)
    assert floor < after < before
    assert after - floor < 0.2 * (before - floor), (before, after, floor)


def test_bad_arguments_name_themselves():
    process = P.EDM()
    x0 = torch.randn(3, 4)
    sig = torch.ones(3)
    with pytest.raises(ValueError, match="prediction"):
        T.target(process, "noise", x0, x0, sig)
    with pytest.raises(ValueError, match="prediction"):
        T.denoising_loss(lambda x, t: x, process, x0, prediction="eps_x0")
    with pytest.raises(ValueError, match="weighting"):
        T.loss_weight(process, "epsilon", sig, "snr_plus")
    with pytest.raises(ValueError, match="weighting"):
        T.denoising_loss(lambda x, t: x, process, x0, prediction="v", weighting="karras")
    with pytest.raises(ValueError, match="sigma_sampling"):
        T.denoising_loss(lambda x, t: x, process, x0, prediction="v", sigma_sampling="log")
    with pytest.raises(ValueError, match="method"):
        T.sample_sigmas(process, 4, method="normal")
    with pytest.raises(ValueError, match="n must"):
        T.sample_sigmas(process, 0)
    with pytest.raises(ValueError, match="sigma must"):
        T.denoising_loss(lambda x, t: x, process, x0, prediction="v", sigma=torch.ones(2))
    with pytest.raises(ValueError, match="prediction must be 'sample'"):
        T.denoising_loss(pz.Denoiser(lambda x, s: x), process, x0, prediction="epsilon")
    # aliases of the parameterization are accepted for both
    w = T.loss_weight(process, "x0", sig * 2, "eps")
    torch.testing.assert_close(w, T.loss_weight(process, "sample", sig * 2, "snr"))


def test_train_digits_loss_is_the_formula_it_replaced():
    """train_digits.denoiser_loss draws sigma then the noise from the generator and computes
    lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2 bitwise as the loop did before (so the
    committed weights' digest stays reproducible), gradients included."""
    from pyengine.models import digits as dg
    from pyengine.models import train_digits as td

    torch.manual_seed(4)
    net = dg.DigitsUNet(ch=8, emb=16)
    for prm in net.parameters():   # the zero-initialised output layers made nonzero
        prm.data.add_(0.05 * torch.randn(prm.shape))
    sigma_data = 0.5713
    model = dg.DigitsDenoiser(net, sigma_data)
    x0 = torch.rand(19, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1

    g_old = torch.Generator().manual_seed(9)
    sigma = (td.P_MEAN + td.P_STD * torch.randn(19, generator=g_old)).exp()
    noisy = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g_old)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    old = (weight[:, None, None, None] * (model(noisy, sigma) - x0) ** 2).mean()
    old_grads = torch.autograd.grad(old, list(net.parameters()))

    g_new = torch.Generator().manual_seed(9)
    process = P.EDM(sigma_min=td.SIGMA_MIN, sigma_max=td.SIGMA_MAX, sigma_data=sigma_data)
    new = td.denoiser_loss(model, process, x0, g_new)
    assert abs(float(new.detach()) - float(old.detach())) <= 1e-6 * float(old.detach())
    new_grads = torch.autograd.grad(new, list(net.parameters()))
    assert torch.equal(new, old)
    assert all(torch.equal(a, b) for a, b in zip(old_grads, new_grads))
    assert torch.equal(g_old.get_state(), g_new.get_state())   # the same draws consumed
    assert np.isfinite(float(new.detach())) and float(new.detach()) > 0
