"""Sharded sampling: two real processes under torchrun with gloo on loopback give bitwise the
samples of one process (stochastic solver, Gaussian-mixture model, Philox noise keyed by the
global sample index)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import pyengine as pe
from pyengine.distributed import (
    INIT_NOISE_DRAW,
    initial_noise,
    sample_indices,
    sample_seeds,
    sample_sharded,
    shard_range,
)
from pyengine.models import GaussianMixture
from pyengine.noise import philox_normal, seeds_tensor

N, DIM, SEED, BATCH = 11, 3, 7, 4
SOLVER, STEPS = "euler_ancestral", 8


def _setup():
    proc = pe.processes.EDM()
    model = GaussianMixture.random(d=DIM, M=4, seed=0).as_model(proc, "sample")
    return pe.Sampler(proc, SOLVER, STEPS, prediction="sample"), model


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    import pyengine as pe
    from pyengine.distributed import main, sample_sharded
    from pyengine.models import GaussianMixture

    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    proc = pe.processes.EDM()
    model = GaussianMixture.random(d={dim}, M=4, seed=0).as_model(proc, "sample")
    sampler = pe.Sampler(proc, "{solver}", {steps}, prediction="sample")
    kw = dict(batch_size={batch}, dtype=torch.float64)
    res = {{
        "rank0": sample_sharded(sampler, model, {n}, ({dim},), {seed}, dist_backend="gloo", **kw),
        "all": sample_sharded(sampler, model, {n}, ({dim},), {seed}, gather="all", **kw),
        "none": sample_sharded(sampler, model, {n}, ({dim},), {seed}, gather="none", **kw),
        "world": dist.get_world_size(), "rank": dist.get_rank(),
        "backend": dist.get_backend(),
    }}
    torch.save(res, f"{{out_dir}}/rank{{dist.get_rank()}}.pt")
    # The module entry point, in the same process group.
    rc = main(["-n", "{n}", "--dim", "{dim}", "--solver", "{solver}", "--steps", "{steps}",
               "--seed", "{seed}", "--batch-size", "{batch}", "--dtype", "float64",
               "--out", f"{{out_dir}}/cli.pt", "--quiet"])
    dist.destroy_process_group()
    sys.exit(rc)
""").format(n=N, dim=DIM, seed=SEED, batch=BATCH, solver=SOLVER, steps=STEPS)


def test_two_ranks_gloo_bitwise_equal_to_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script),
           str(tmp_path)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)        # torchrun and the two ranks it started
        out, _ = p.communicate()
        pytest.fail(f"torchrun did not finish in 120 s:\n{out[-3000:]}")
    assert p.returncode == 0, out[-3000:]

    sampler, model = _setup()
    ref = sample_indices(sampler, model, range(N), (DIM,), SEED, batch_size=BATCH,
                         dtype=torch.float64)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["backend"] == "gloo"
    assert torch.equal(r0["rank0"], ref) and r1["rank0"] is None
    assert torch.equal(r0["all"], ref) and torch.equal(r1["all"], ref)
    # rank 0 ran the global batches [0, 4), rank 1 [4, 8) and [8, 11)
    assert torch.equal(r0["none"], ref[:4]) and torch.equal(r1["none"], ref[4:])
    cli = torch.load(tmp_path / "cli.pt")
    assert torch.equal(cli["samples"], ref) and cli["world_size"] == 2
    # the solver is stochastic: another seed gives other samples
    other = sample_indices(sampler, model, range(N), (DIM,), SEED + 1, batch_size=BATCH,
                           dtype=torch.float64)
    assert not torch.equal(other, ref)


def test_shard_range_covers_every_index_once_in_whole_batches():
    for n in (1, 5, 11, 64):
        for w in (1, 2, 3, 8):
            for b in (None, 1, 4, 7):
                parts = [shard_range(n, r, w, b) for r in range(w)]
                assert [i for p in parts for i in p] == list(range(n))
                bb = b or -(-n // w)
                for p in parts:
                    assert len(p) == 0 or p.start % bb == 0
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 2, 2)
    with pytest.raises(ValueError, match="batch_size"):
        shard_range(10, 0, 2, 0)


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    sampler, model = _setup()
    x = sample_sharded(sampler, model, 6, (DIM,), SEED, batch_size=4, dtype=torch.float64)
    assert torch.equal(x, sample_indices(sampler, model, range(6), (DIM,), SEED, batch_size=4,
                                         dtype=torch.float64))


def test_noise_and_seeds_depend_only_on_the_global_index():
    z = initial_noise(SEED, range(9), (2, 3))
    assert z.shape == (9, 2, 3) and z.dtype == torch.float32
    assert torch.equal(initial_noise(SEED, [4, 7], (2, 3)), z[[4, 7]])
    seeds = sample_seeds(SEED, [4, 7])
    assert seeds == [pe.noise.sample_seed(SEED, 4), pe.noise.sample_seed(SEED, 7)]
    # A reserved draw number, distinct from the plan's draws 0, 1, ...
    assert not torch.equal(z.view(9, 6), philox_normal(seeds_tensor(SEED, 9), 0, 6))
    assert INIT_NOISE_DRAW == 2 ** 32 - 1


def test_batch_size_invariance_with_a_batch_invariant_model():
    """With a model whose output per sample ignores its batch (elementwise), any batch size
    gives the same bits: the noise and the seeds follow the global index."""
    def eps_model(x, t):
        tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return x / (1.0 + x * x) + 1e-4 * tt * x

    sampler = pe.Sampler(pe.processes.VP.discrete("linear"), "dpmpp_2m_sde", 6)
    ref = sample_indices(sampler, eps_model, range(10), (2, 5), SEED)
    for b in (1, 3, 4):
        assert torch.equal(sample_indices(sampler, eps_model, range(10), (2, 5), SEED,
                                          batch_size=b), ref)


def test_per_sample_args_follow_the_global_index(monkeypatch):
    # a conditional model: each sample's label shifts its output; the rows of per_sample_args
    # are taken by global index, so a sample gets its own label whatever batch it is in
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    sampler, base = _setup()
    labels = torch.arange(7, dtype=torch.float64) * 0.3

    def model(x, t, label):
        assert label.shape[0] == x.shape[0]
        return base(x, t) + label.view(-1, 1)

    whole = sample_indices(sampler, model, range(7), (DIM,), SEED, dtype=torch.float64,
                           per_sample_args={"label": labels})
    parts = sample_indices(sampler, model, range(7), (DIM,), SEED, batch_size=3,
                           dtype=torch.float64, per_sample_args={"label": labels})
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-12)
    one = sample_indices(sampler, model, [5], (DIM,), SEED, dtype=torch.float64,
                         per_sample_args={"label": labels})
    torch.testing.assert_close(one[0], whole[5], rtol=0, atol=1e-12)
    x = sample_sharded(sampler, model, 7, (DIM,), SEED, batch_size=3, dtype=torch.float64,
                       per_sample_args={"label": labels})
    assert torch.equal(x, parts)
    with pytest.raises(ValueError, match="per_sample_args\\['label'\\]"):
        sample_indices(sampler, model, range(9), (DIM,), SEED, per_sample_args={"label": labels})
    with pytest.raises(ValueError, match="both"):
        sample_indices(sampler, model, range(3), (DIM,), SEED, extra_args={"label": labels},
                       per_sample_args={"label": labels})
