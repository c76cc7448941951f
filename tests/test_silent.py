"""Valid but unusual inputs that gave a silently wrong result (or a needless refusal), each
compared with an independent run of the same inputs: ``Sampler.sample`` on the same backend
where the modes must agree bit for bit (issue 13, "no silent wrong result"). Random data and
odd sizes; every case failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine.models import GaussianMixture

PROC = pe.processes.VP.discrete("linear")
SHAPE = (3, 5, 7)
BACKEND = "cpp"


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def model(x, t, label=None, scale=1.0, ctx=None):
    tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    out = torch.tanh(x) * 0.3 * scale + 1e-3 * tt * x
    if label is not None:
        out = out + 0.05 * label.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    if ctx is not None:
        out = out + 0.01 * sum(float(c.sum()) for c in ctx)
    return out


def _sampler(solver="dpmpp_2m", **kw):
    return pe.Sampler(PROC, solver, steps=5, **kw)


def _ref(smp, noise, seed, **kw):
    return smp.sample(model, noise, seed=seed, backend=BACKEND, **kw)


# -- compiled loops: tensor extra_args live in static buffers shared by the cache entry -----

def test_compiled_extra_args_of_one_call_do_not_leak_into_the_next():
    # fn(noise, extra_args=b) then fn(noise): the second call ran with b (off by 2..12)
    smp = _sampler(guidance_scale=2.0)
    a, b = torch.rand(6), torch.rand(6) + 1
    noise = _rand(SHAPE, 1)
    fn = smp.compile(model, SHAPE, backend=BACKEND, extra_args={"label": a},
                     cache=pe.runtime.GraphCache(1))
    assert torch.equal(fn(noise, seed=4, extra_args={"label": b}),
                       _ref(smp, noise, 4, extra_args={"label": b}))
    assert torch.equal(fn(noise, seed=4), _ref(smp, noise, 4, extra_args={"label": a}))


def test_compiled_loops_sharing_a_cache_entry_keep_their_own_extra_args():
    # two loops of one model/shape/structure share the static buffers: the second ran with
    # the first one's conditioning
    smp = _sampler()
    cache = pe.runtime.GraphCache(2)
    a, b = torch.rand(3), torch.rand(3) - 2
    noise = _rand(SHAPE, 2)
    fa = smp.compile(model, SHAPE, backend=BACKEND, extra_args={"label": a}, cache=cache)
    fb = smp.compile(model, SHAPE, backend=BACKEND, extra_args={"label": b}, cache=cache)
    assert torch.equal(fa(noise, seed=1), _ref(smp, noise, 1, extra_args={"label": a}))
    assert torch.equal(fb(noise, seed=1), _ref(smp, noise, 1, extra_args={"label": b}))
    assert torch.equal(fa(noise, seed=1), _ref(smp, noise, 1, extra_args={"label": a}))
    # the caller's tensor written in place is read again, as sample() reads it
    a.mul_(-3)
    assert torch.equal(fa(noise, seed=1), _ref(smp, noise, 1, extra_args={"label": a}))


def test_compiled_non_tensor_extra_args_with_a_summarized_repr_get_their_own_loop():
    # a list holding a large tensor has a summarized repr: a second loop with other values
    # shared the first one's baked list
    smp = _sampler()
    cache = pe.runtime.GraphCache(2)
    c1 = [torch.rand(40, 41)]
    c2 = [c1[0].clone()]
    c2[0][17, 23] += 5.0
    noise = _rand(SHAPE, 3)
    f1 = smp.compile(model, SHAPE, backend=BACKEND, extra_args={"ctx": c1}, cache=cache)
    f1(noise, seed=2)
    f2 = smp.compile(model, SHAPE, backend=BACKEND, extra_args={"ctx": c2}, cache=cache)
    assert torch.equal(f2(noise, seed=2), _ref(smp, noise, 2, extra_args={"ctx": c2}))
    assert torch.equal(f1(noise, seed=2, extra_args={"ctx": c1}),
                       _ref(smp, noise, 2, extra_args={"ctx": c1}))
    with pytest.raises(ValueError, match=r"extra_args\['ctx'\] differs"):
        f1(noise, seed=2, extra_args={"ctx": c2})


# -- the request scheduler's per-request model arguments ------------------------------------

@pytest.mark.parametrize("first", ["tensor", "float"])
def test_scheduler_one_argument_as_rows_in_one_request_and_a_value_in_another(first):
    # was KeyError (value first) or torch.cat's TypeError (tensor first) in step()
    smp = _sampler()
    n1, n2 = _rand((2, 5, 7), 4), _rand(SHAPE, 5)
    rows = {"scale": torch.rand(2, 1, 1) + 0.5}
    value = {"scale": float(np.random.default_rng(0).uniform(0.5, 2))}
    args = [rows, value] if first == "tensor" else [value, rows]
    sch = pe.RequestScheduler(model, backend=BACKEND)
    reqs = [sch.submit(smp, n, seed=i, extra_args=a) for i, (n, a) in
            enumerate(zip([n1, n2] if first == "tensor" else [n2, n1], args))]
    sch.run()
    for i, (r, a) in enumerate(zip(reqs, args)):
        noise = n1 if (a is rows) else n2
        assert torch.equal(r.result, _ref(smp, noise, i, extra_args=a))


def test_scheduler_takes_zero_dim_tensor_arguments_as_sample_does():
    # a 0-d tensor (one value for the call) was refused: "must have the request's model batch
    # size"; requests with different values get separate model calls
    smp = _sampler()
    s1, s2 = torch.tensor(0.75), torch.tensor(1.5)
    n1, n2 = _rand(SHAPE, 6), _rand((2, 5, 7), 7)
    sch = pe.RequestScheduler(model, backend=BACKEND)
    r1 = sch.submit(smp, n1, seed=1, extra_args={"scale": s1})
    r2 = sch.submit(smp, n2, seed=2, extra_args={"scale": s2})
    sch.run()
    assert torch.equal(r1.result, _ref(smp, n1, 1, extra_args={"scale": s1}))
    assert torch.equal(r2.result, _ref(smp, n2, 2, extra_args={"scale": s2}))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_scheduler_model_of_another_dtype_in_split_calls(out_dtype):
    # requests in separate model calls (different non-tensor arguments, a guided one beside
    # unguided ones) have their output rows copied into a float32 buffer: index_copy_'s dtype
    # error for a float16 / bfloat16 / float64 model output before
    def m(x, t, label=None, scale=1.0):
        return model(x, t, label=label, scale=scale).to(out_dtype)

    guided = _sampler(guidance_scale=3.0)
    anc = pe.Sampler(PROC, "euler_ancestral", steps=4)
    n1, n2 = _rand(SHAPE, 8), _rand((2, 5, 7), 9)
    a1 = {"label": torch.rand(6), "scale": 1.0}
    a2 = {"label": torch.rand(2), "scale": 0.5}
    sch = pe.RequestScheduler(m, backend=BACKEND)
    r1 = sch.submit(guided, n1, seed=1, extra_args=a1)
    sch.step()
    r2 = sch.submit(anc, n2, seed=2, extra_args=a2)
    sch.run()
    assert torch.equal(r1.result, guided.sample(m, n1, seed=1, backend=BACKEND, extra_args=a1))
    assert torch.equal(r2.result, anc.sample(m, n2, seed=2, backend=BACKEND, extra_args=a2))


def test_mixture_flow_model_at_t_one_is_the_limit():
    # t = 1 (sigma = inf) of a flow model: the state is pure noise, D is the data mean;
    # the value there is the limit of the values below it, in a batch with other times
    proc = pe.processes.named("flow")
    gmm = GaussianMixture.random(d=6, M=3, seed=4)
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mean = (gmm.weights[:, None] * gmm.means).sum(0) / gmm.weights.sum()
    for pred in ("flow", "epsilon", "sample", "v"):
        model = gmm.as_model(proc, pred)
        at_one = model(x, torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64))
        near = model(x, torch.full((3,), 1.0 - 1e-10, dtype=torch.float64))
        assert torch.isfinite(at_one).all()
        torch.testing.assert_close(at_one[[0, 2]], near[[0, 2]], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(at_one[1], model(x[1:2], 0.5)[0], rtol=0, atol=0)
    torch.testing.assert_close(gmm.as_model(proc, "flow")(x, 1.0), x - mean)
