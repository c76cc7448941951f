"""The device-resident runtime: Sampler.compile, its tables, the graph cache, the eager
fallback, and the absence of host reads in the loop. CUDA-graph capture itself runs in the
GPU tests at the end (skipped without a GPU); everything else runs on the CPU, where the
compiled loop is the same device-resident loop run eagerly."""

import warnings

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine import runtime
from pyengine.models import GaussianMixture

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

PROC = pe.processes.VP.discrete("linear")
SHAPE = (3, 4, 5, 7)


def model(x, t):
    """A nonlinear eps model whose output depends on t (so wrong times show)."""
    return torch.tanh(x) * 0.3 + 1e-3 * t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) * x


def _noise(shape=SHAPE, dtype=torch.float32, seed=0, device="cpu"):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.fixture
def cache():
    c = runtime.GraphCache(4)
    yield c
    c.clear()


SOLVERS = ["ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_3m",
           "dpmpp_2m_sde", "dpm_singlestep", "unipc", "ipndm", "dpm_solver_3"]


@pytest.mark.parametrize("backend", ["cpp", "torch", "numba"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_compiled_equals_sample_bitwise(solver, backend, cache):
    # The device-resident loop reads [B, K] coefficient tables and per-sample times; on the
    # same backend that gives the same bits as the eager walk with per-step coefficients.
    if backend not in pe.backends.available():
        pytest.skip(f"{backend} unavailable")
    smp = pe.Sampler(PROC, solver=solver, steps=7)
    x = _noise()
    fn = smp.compile(model, SHAPE, backend=backend, cache=cache)
    for seed in (5, [3, 1 << 40, 7]):
        ref = smp.sample(model, x, seed=seed, backend=backend)
        out = fn(x, seed=seed)
        assert torch.equal(out, ref), (solver, backend, (out - ref).abs().max().item())
    assert not fn.captured and "eagerly" in fn.fallback_reason


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_compiled_dtypes(dtype, cache):
    smp = pe.Sampler(PROC, solver="dpmpp_2m", steps=6)
    x = _noise(dtype=dtype)
    out = smp.compile(model, SHAPE, dtype=dtype, cache=cache)(x, seed=1)
    ref = smp.sample(model, x, seed=1)
    assert out.dtype == dtype
    if dtype == torch.float64:
        assert torch.equal(out, ref)
    else:   # the initial scaling rounds the scale to the storage dtype here, not in sample()
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        assert ((out.double() - ref.double()).abs().max() / ref.double().abs().max()) < tol


def test_denoiser_guidance_and_extra_args(cache):
    # EDM process with a pe.Denoiser (called as D(x/s, sigma)), classifier-free guidance on
    # the doubled batch with a tensor conditioning, and the guidance rescale custom op.
    gmm = GaussianMixture.random(d=12, M=3, seed=7)
    proc = pe.processes.VP.continuous()
    base = gmm.as_model(proc, "epsilon")

    def cond(x, t, context):
        return base(x, t) * (1.0 + 0.1 * torch.tanh(context)) + 0.05 * context * torch.sin(x)

    B = 3
    g = torch.Generator().manual_seed(2)
    ctx = torch.cat([torch.zeros(B, 1, dtype=torch.float64),
                     torch.randn(B, 1, dtype=torch.float64, generator=g)])
    x = torch.randn(B, 12, dtype=torch.float64, generator=g)
    for phi in (0.0, 0.7):
        smp = pe.Sampler(proc, solver="dpmpp_2m", steps=6, guidance_scale=4.0,
                         guidance_rescale=phi)
        fn = smp.compile(cond, (B, 12), torch.float64, extra_args={"context": ctx}, cache=cache)
        ref = smp.sample(cond, x, seed=3, extra_args={"context": ctx})
        assert torch.equal(fn(x, seed=3), ref)
        # new conditioning goes into the static buffer, no new loop
        ctx2 = ctx * 2.0
        n = len(cache)
        assert torch.equal(fn(x, seed=3, extra_args={"context": ctx2}),
                           smp.sample(cond, x, seed=3, extra_args={"context": ctx2}))
        assert len(cache) == n
    edm = pe.processes.EDM()
    den = pe.Denoiser(lambda xh, sigma: gmm.denoise(xh, sigma))
    smp = pe.Sampler(edm, solver="heun", steps=5, prediction="sample")
    ref = smp.sample(den, x, seed=0)
    out = smp.compile(den, (B, 12), torch.float64, cache=cache)(x, seed=0)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_custom_op_solver(cache):
    # pc_langevin: the corrector is a custom op (data-dependent step size) inside the loop
    smp = pe.Sampler(pe.processes.VE(), solver="pc_langevin", steps=5, n_corrector=2)
    x = _noise(dtype=torch.float64)
    assert torch.equal(smp.compile(model, SHAPE, torch.float64, cache=cache)(x, seed=9),
                       smp.sample(model, x, seed=9))


def test_schedule_rewrite_in_place(cache):
    # Same solver and step count, another schedule or guidance scale: one cache entry, the
    # same table storage, rewritten; results equal each sampler's own eager run.
    a = pe.Sampler(PROC, solver="dpmpp_2m", steps=8, schedule="karras")
    b = pe.Sampler(PROC, solver="dpmpp_2m", steps=8, schedule="time_uniform")
    assert not np.allclose(a.sigmas, b.sigmas)
    fa = a.compile(model, SHAPE, cache=cache)
    fb = b.compile(model, SHAPE, cache=cache)
    assert fa.key == fb.key
    x = _noise()
    ra = fa(x, seed=2)
    entry = cache.get(fa.key)
    ptr = entry.loop.tables.flat.data_ptr()
    rb = fb(x, seed=2)
    assert len(cache) == 1 and cache.get(fb.key) is entry
    assert entry.loop.tables.flat.data_ptr() == ptr
    assert torch.equal(ra, a.sample(model, x, seed=2))
    assert torch.equal(rb, b.sample(model, x, seed=2))
    assert torch.equal(fa(x, seed=2), ra)                       # and back
    # another step count is another structure: another entry
    c = pe.Sampler(PROC, solver="dpmpp_2m", steps=9)
    c.compile(model, SHAPE, cache=cache)(x, seed=2)
    assert len(cache) == 2
    # a tables object refuses a plan of another structure
    with pytest.raises(ValueError, match="structure"):
        entry.loop.tables.load(c.plan)


def test_new_noise_and_seeds_reuse_the_loop(cache):
    smp = pe.Sampler(PROC, solver="euler_ancestral", steps=6)
    fn = smp.compile(model, SHAPE, cache=cache)
    x1, x2 = _noise(seed=1), _noise(seed=2)
    r1 = fn(x1, seed=1)
    entry = cache.get(fn.key)
    r2 = fn(x2, seed=[4, 5, 6])
    assert cache.get(fn.key) is entry and len(cache) == 1
    assert torch.equal(r1, smp.sample(model, x1, seed=1))
    assert torch.equal(r2, smp.sample(model, x2, seed=[4, 5, 6]))
    assert not torch.equal(r1, fn(x1, seed=2))                  # the seed matters
    # the caller's noise is never written; results are fresh tensors
    x1c = x1.clone()
    r = fn(x1, seed=1)
    assert torch.equal(x1, x1c) and r.data_ptr() != fn(x1, seed=1).data_ptr()


def test_cache_eviction_releases():
    cache = runtime.GraphCache(2)
    smp = pe.Sampler(PROC, solver="ddim", steps=4)
    fns = [smp.compile(model, (b, 3), cache=cache) for b in (1, 2, 3)]
    outs = [fn(_noise((b, 3)), seed=0) for fn, b in zip(fns, (1, 2, 3))]
    assert len(cache) == 2 and fns[0].key not in cache
    e1 = cache.get(fns[1].key)
    # using the first again rebuilds it and evicts the least recently used (b=2 was touched
    # by the get above, so b=3 goes)
    assert torch.equal(fns[0](_noise((1, 3)), seed=0), outs[0])
    e0 = cache.get(fns[0].key)
    assert fns[2].key not in cache and cache.get(fns[1].key) is e1   # b=2 most recent now
    e3 = runtime.graph._Entry(None)
    cache.put(("x",), e3)
    assert e0.released and e0.loop is None and not e1.released and len(cache) == 2
    cache.resize(1)
    assert len(cache) == 1 and e1.released
    cache.clear()
    assert len(cache) == 0 and e3.released
    with pytest.raises(ValueError, match="maxsize"):
        cache.resize(0)


def test_capture_failure_falls_back_with_one_warning(monkeypatch, cache):
    # What happens when capture fails (a model that synchronizes, say): one warning naming the
    # reason, the same device-resident loop run eagerly, correct results, no second warning.
    monkeypatch.setattr(runtime.graph, "_graph_capable", lambda device: None)

    def fail(loop, warmup):
        loop.body()                   # the warm-up runs, then capturing fails
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runtime.graph, "_capture", fail)
    smp = pe.Sampler(PROC, solver="dpmpp_2m", steps=5)
    fn = smp.compile(model, SHAPE, cache=cache)
    assert fn.capture
    x = _noise()
    with pytest.warns(RuntimeWarning, match="could not be captured.*not permitted"):
        out = fn(x, seed=0)
    assert not fn.captured and "not permitted" in fn.fallback_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fn(x, seed=0), out)
    assert torch.equal(out, smp.sample(model, x, seed=0))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_no_host_reads_in_the_loop(monkeypatch, backend, cache):
    # Once built, a call reads nothing back from tensors: .item(), .tolist(), bool(), float(),
    # int() and .cpu()/.numpy() raise inside it (on CUDA that is what keeps the loop free of
    # host synchronization; the GPU test below checks it with the sync debug mode).
    smp = pe.Sampler(PROC, solver="dpmpp_2m_sde", steps=6, guidance_scale=3.0)
    fn = smp.compile(model, SHAPE, backend=backend, cache=cache).prepare()
    x = _noise()
    ref = smp.sample(model, x, seed=4, backend=backend)

    def forbid(*a, **k):
        raise AssertionError("host read of a tensor inside the compiled loop")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu",
                 "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbid)
    out = fn(x, seed=4)
    monkeypatch.undo()
    assert torch.equal(out, ref)


def test_errors_name_the_argument(cache):
    smp = pe.Sampler(PROC, solver="ddim", steps=3)
    fn = smp.compile(model, SHAPE, cache=cache)
    x = _noise()
    with pytest.raises(ValueError, match="noise has shape"):
        fn(x[:2])
    with pytest.raises(TypeError, match="noise"):
        fn(x.numpy())
    with pytest.raises(ValueError, match="seed"):
        fn(x, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        fn(x, seed=[1, 2])
    with pytest.raises(ValueError, match="extra_args"):
        fn(x, extra_args={"context": x})
    with pytest.raises(ValueError, match="capture=True"):
        smp.compile(model, SHAPE, capture=True)
    with pytest.raises(ValueError, match="shape"):
        smp.compile(model, (0, 3))
    with pytest.raises(ValueError, match="dtype"):
        smp.compile(model, SHAPE, dtype=torch.int32)
    with pytest.raises(ValueError, match="prediction='sample'"):
        smp.compile(pe.Denoiser(lambda x, s: x), SHAPE)
    with pytest.raises(ValueError, match="PYENGINE_BACKEND|backend"):
        smp.compile(model, SHAPE, backend="nope")


# -- on a GPU ----------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "heun", "dpmpp_2m_sde", "unipc"])
def test_cuda_graph_replay_matches_eager(solver):
    cache = runtime.GraphCache(4)
    smp = pe.Sampler(PROC, solver=solver, steps=8, guidance_scale=2.0)
    x = _noise(device="cuda")
    fn = smp.compile(model, SHAPE, device="cuda", cache=cache)
    out = fn(x, seed=3)
    assert fn.captured, fn.fallback_reason
    ref = smp.sample(model, x, seed=3)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6), (out - ref).abs().max().item()
    eager = smp.compile(model, SHAPE, device="cuda", capture=False, cache=cache)(x, seed=3)
    assert torch.equal(out, eager)
    # new noise and seeds replay the same graph
    x2 = _noise(seed=9, device="cuda")
    graph = cache.get(fn.key).graph
    assert torch.allclose(fn(x2, seed=11), smp.sample(model, x2, seed=11), rtol=1e-6, atol=1e-6)
    assert cache.get(fn.key).graph is graph
    cache.clear()


@needs_cuda
def test_cuda_no_sync_and_schedule_rewrite():
    cache = runtime.GraphCache(4)
    a = pe.Sampler(PROC, solver="dpmpp_2m", steps=10, schedule="karras")
    b = pe.Sampler(PROC, solver="dpmpp_2m", steps=10, schedule="time_uniform")
    fa, fb = (s.compile(model, SHAPE, device="cuda", cache=cache).prepare() for s in (a, b))
    x = _noise(device="cuda")
    graph = cache.get(fa.key).graph
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ra = fa(x, seed=1)
        rb = fb(x, seed=1)          # rewrites the table in place (pinned, asynchronous copy)
        ra2 = fa(x, seed=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.get(fb.key).graph is graph and len(cache) == 1
    assert torch.equal(ra, ra2)
    assert torch.allclose(rb, b.sample(model, x, seed=1), rtol=1e-6, atol=1e-6)
    cache.clear()


@needs_cuda
def test_cuda_uncapturable_model_falls_back():
    def syncing(x, t):
        if float(x.abs().max()) > 1e9:        # a host read: cannot be captured
            return x
        return model(x, t)

    cache = runtime.GraphCache(2)
    smp = pe.Sampler(PROC, solver="ddim", steps=4)
    fn = smp.compile(syncing, SHAPE, device="cuda", cache=cache)
    x = _noise(device="cuda")
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        out = fn(x, seed=0)
    assert not fn.captured and fn.fallback_reason
    assert torch.allclose(out, smp.sample(syncing, x, seed=0), rtol=1e-6, atol=1e-6)
    cache.clear()


@needs_cuda
def test_cuda_eviction_frees_memory():
    cache = runtime.GraphCache(1)
    smp = pe.Sampler(PROC, solver="ddim", steps=4)
    big = (8, 4, 64, 64)
    smp.compile(model, big, device="cuda", cache=cache)(_noise(big, device="cuda"))
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    smp.compile(model, (1, 3), device="cuda", cache=cache)(_noise((1, 3), device="cuda"))
    torch.cuda.synchronize()
    assert len(cache) == 1
    assert torch.cuda.memory_allocated() < held
    cache.clear()


# -- the eager walk's steady-state path (host numbers, the cpp launcher) --------------------

STEADY = ["ddim", "dpmpp_2m", "ipndm", "deis", "lms", "unipc", "heun", "euler_ancestral",
          "pndm_plms"]


@pytest.mark.parametrize("solver", STEADY)
def test_steady_walk_equals_general_walk(solver):
    """The steady-state walk (launch structs per tensor combination, aux copies shared as
    slots) gives bitwise the result of the general walk (a callback turns it off) and of the
    torch reference, over two calls (the second reuses the first's structs)."""
    smp = pe.Sampler(PROC, solver=solver, steps=9)
    noise = _noise((2, 3, 5, 7), seed=11)
    seen = []
    general = smp.sample(model, noise, seed=3, backend="cpp",
                         callback=lambda i, s, slots: seen.append(i))
    assert seen
    ref = smp.sample(model, noise, seed=3, backend="torch")
    for _ in range(2):
        fast = smp.sample(model, noise, seed=3, backend="cpp")
        assert torch.equal(fast, general)
        assert torch.equal(fast, ref)


def test_steady_walk_sees_a_swapped_model_output():
    """A model that returns the same tensor object each call but swaps its storage
    (``set_``): the launcher's cached struct must not read the old memory."""
    state = {"out": None, "old": []}

    def swapping(x, t):
        val = model(x, t)
        if state["out"] is None:
            state["out"] = val
        else:
            # same object, new storage; the old storage stays alive (and stale) in a view
            state["old"].append(state["out"].view_as(state["out"]))
            state["out"].set_(val.clone())
        return state["out"]

    smp = pe.Sampler(PROC, solver="ddim", steps=8)
    noise = _noise((2, 3, 4, 4), seed=5)
    got = smp.sample(swapping, noise, backend="cpp")
    want = smp.sample(model, noise, backend="torch")
    assert torch.equal(got, want)


def test_history_survives_a_model_that_rewrites_its_output_buffer():
    """A model that writes every output into one static buffer (what captured or compiled
    models do): the multistep history must not share that buffer's memory."""
    buf = {}

    def static(x, t):
        val = model(x, t)
        if "out" not in buf:
            buf["out"] = torch.empty_like(val)
        buf["out"].copy_(val)
        return buf["out"]

    for solver in ["ipndm", "deis", "dpmpp_2m", "unipc"]:
        smp = pe.Sampler(PROC, solver=solver, steps=8)
        noise = _noise((2, 3, 4, 4), seed=6)
        want = smp.sample(model, noise, backend="torch")
        for backend in ["cpp", "torch"]:
            buf.clear()
            assert torch.equal(smp.sample(static, noise, backend=backend), want), \
                (solver, backend)


def test_time_rows_reused_only_while_unmodified():
    """The [B] model-time rows are kept on the program between walks; a model that writes
    into its ``t`` must not change what the next evaluation or the next walk sees."""
    def scribbling(x, t):
        out = model(x, t.clone())
        t.zero_()
        return out

    smp = pe.Sampler(PROC, solver="dpmpp_2m", steps=6)
    noise = _noise((2, 3, 4, 4), seed=8)
    want = smp.sample(model, noise, backend="torch")
    for _ in range(2):
        assert torch.equal(smp.sample(scribbling, noise, backend="cpp"), want)
        assert torch.equal(smp.sample(model, noise, backend="cpp"), want)


def test_a_plan_without_updates_returns_a_copy():
    """The walk reads the caller's state without copying it; a plan whose output is that
    state (no update) still hands back a tensor of its own."""
    plan = pe.plan.Plan("none", np.array([1.0]), ops=[])
    x = _noise((2, 3), seed=2)
    for backend in ["cpp", "torch"]:
        out = runtime.run_plan(plan, model, x, backend=backend)
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


# -- the buffer pool of the eager walks ------------------------------------------------------


def test_pool_keeps_results_and_what_a_model_kept():
    """Tensors go back to the pool only when nothing else refers to them: the result the
    caller got, the input tensor a model kept from its last call of a walk, or a view it kept
    of one stay intact through later calls that reuse the pool. (Within a walk the model's
    inputs are the walk's own buffers and are reused after its call, as a captured graph's
    static inputs are: a model that stores its input must store a copy.)"""
    runtime.buffer_pool.clear()
    kept = {}

    def keeping(x, t):
        kept["x"], kept["x_copy"] = x, x.clone()
        kept["view"] = x[:1]
        kept["view_copy"] = kept["view"].clone()
        return model(x, t)

    smp = pe.Sampler(PROC, solver="dpmpp_2m", steps=6)
    noise = _noise((2, 3, 4, 4), seed=9)
    first = smp.sample(keeping, noise, backend="cpp")
    first_copy = first.clone()
    last = dict(kept)
    kept.clear()
    for _ in range(3):
        again = smp.sample(model, noise, backend="cpp")
        assert torch.equal(again, first_copy)
    assert torch.equal(first, first_copy)
    assert torch.equal(last["x"], last["x_copy"])
    assert torch.equal(last["view"], last["view_copy"])
    assert runtime.buffer_pool.nbytes > 0

    # only another tensor on the same memory (neither the tensor object nor a view of it)
    def viewing(x, t):
        kept["view"] = torch.empty(0, dtype=x.dtype).set_(x.untyped_storage(), 0, x.shape,
                                                          x.stride())
        kept["view_copy"] = kept["view"].clone()
        return model(x, t)

    smp.sample(viewing, noise, backend="cpp")
    last = dict(kept)
    for _ in range(3):
        smp.sample(model, noise, backend="cpp")
    assert torch.equal(last["view"], last["view_copy"])


def test_pool_gives_a_walk_its_own_tensors_again():
    """A repeated call takes its buffers from the pool: one new tensor only, for the one the
    caller kept (the previous result)."""
    runtime.buffer_pool.clear()
    smp = pe.Sampler(PROC, solver="dpmpp_2m", steps=6)
    noise = _noise((2, 3, 4, 4), seed=10)
    smp.sample(model, noise, backend="cpp")
    held = runtime.buffer_pool.nbytes
    assert held > 0
    made = []
    real = torch.empty_like

    def counting(*a, **k):
        made.append(1)
        return real(*a, **k)

    torch.empty_like = counting
    try:
        smp.sample(model, noise, backend="cpp")
    finally:
        torch.empty_like = real
    assert len(made) == 1
    assert runtime.buffer_pool.nbytes == held


def test_pool_reuses_and_bounds():
    pool = runtime.BufferPool(per_key=2, max_bytes=3 * 4 * 100)
    ts = [torch.empty(100) for _ in range(4)]
    ids = {id(t) for t in ts}
    pool.give(ts)
    assert pool.nbytes == 2 * 400                   # at most per_key of one layout
    got = pool.take(torch.empty(100))
    assert id(got) in ids
    assert pool.take(torch.empty(7)) is None         # another layout
    pool.give([torch.empty(50, dtype=torch.float64), torch.empty(60)])
    assert pool.nbytes <= 3 * 400                    # least recently used layouts dropped
    pool.clear()
    assert pool.nbytes == 0 and pool.take(torch.empty(100)) is None
    off = runtime.BufferPool(max_bytes=0)
    off.give([torch.empty(10)])
    assert off.nbytes == 0


def test_concurrent_samples_equal_sequential_ones():
    """Threads sampling with one sampler at once (shared program caches, the buffer pool,
    the launch structs) give what each call gives alone."""
    import threading

    smp = pe.Sampler(PROC, solver="dpmpp_2m", steps=8)
    noises = [_noise((2, 3, 4, 4), seed=20 + i) for i in range(6)]
    want = [smp.sample(model, n, backend="cpp") for n in noises]
    got = [None] * len(noises)

    def work(i):
        for _ in range(5):
            got[i] = smp.sample(model, noises[i], backend="cpp")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(noises))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_second_walk_takes_the_steady_path(monkeypatch):
    """After one walk validated a program's updates, the next walk of the same layout runs
    every update on the steady path (the validation key is written once, so the steady
    loop finds what apply() recorded)."""
    smp = pe.Sampler(PROC, solver="dpmpp_2m", steps=10)
    noise = _noise((2, 3, 4, 4), seed=12)
    smp.sample(model, noise, backend="cpp")
    general = []
    real = runtime.Walker.update
    monkeypatch.setattr(runtime.Walker, "update",
                        lambda self, op, i: (general.append(i), real(self, op, i)))
    smp.sample(model, noise, backend="cpp")
    assert general == []
