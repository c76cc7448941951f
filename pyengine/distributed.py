"""Sharded sampling over torch.distributed ranks, bitwise the same as one process.

N samples are numbered by a global index i = 0..N-1. Sample i gets

* its initial noise from Philox keyed by its own seed ``sample_seed(seed, i)`` at the draw
  number ``INIT_NOISE_DRAW`` = 2^32 - 1 (plans number their draws from 0 up, so the two never
  meet): :func:`initial_noise`;
* the same per-sample seed for every noise draw of the plan (``Sampler.sample`` with
  ``seed=[sample_seed(seed, i) for i in batch]``).

The index range is cut into global batches [k b, (k + 1) b) of ``batch_size`` b, and rank r
of W takes the contiguous run of batches k in [K r / W, K (r + 1) / W) (K = ceil(N / b)), so
its samples are a contiguous slice of the indices and gathering in rank order is gathering in
index order. Every batch holds the same samples, noise and seeds whatever the world size, so
the gathered result is bitwise the one a single process gives with the same ``batch_size``,
for any deterministic model. Across different batch sizes the Philox noise is still the same
bits; the result then matches bitwise when the model's output for a sample does not depend on
the batch around it (elementwise models; a matmul over the batch can differ in the last bit).

Launch under torchrun (``python -m torch.distributed.run --nproc_per_node=W -m
pyengine.distributed ...``): the process group is initialized from its environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with gloo on CPU and NCCL when CUDA is there. Without
those variables and without an initialized group, the call runs as a single process.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from . import backends
from .noise import philox_normal, sample_seed, seeds_tensor
from .sampler import Sampler

__all__ = [
    "INIT_NOISE_DRAW",
    "init_distributed",
    "initial_noise",
    "main",
    "sample_indices",
    "sample_seeds",
    "sample_sharded",
    "shard_range",
]

#: Philox draw number of the initial noise: the largest counter word, never a plan's draw.
INIT_NOISE_DRAW = 0xFFFFFFFF


def initial_noise(seed: int, indices, shape, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard-normal initial noise [len(indices), *shape] of the given global indices:
    Philox normals keyed by ``sample_seed(seed, i)`` at draw ``INIT_NOISE_DRAW``."""
    seeds = sample_seeds(seed, indices)
    z = philox_normal(seeds_tensor(seeds, len(seeds)), INIT_NOISE_DRAW, math.prod(shape),
                      device=device, dtype=torch.float32)
    return z.view(len(seeds), *shape).to(dtype)


def sample_seeds(seed: int, indices) -> list[int]:
    """The per-sample seeds ``sample_seed(seed, i)`` of the global indices (uint64 ints)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return [sample_seed(seed, int(i)) for i in indices]


def shard_range(num_samples: int, rank: int, world_size: int,
                batch_size: int | None = None) -> range:
    """The global indices rank ``rank`` of ``world_size`` samples: whole global batches of
    ``batch_size`` (default ceil(N / W): one batch per rank), a contiguous run of them."""
    n, w = int(num_samples), int(world_size)
    if n < 1 or w < 1 or not 0 <= rank < w:
        raise ValueError(f"need num_samples >= 1, world_size >= 1, 0 <= rank < world_size; "
                         f"got {num_samples}, {world_size}, {rank}")
    b = _batch(batch_size, n, w)
    k = -(-n // b)
    lo, hi = (k * rank) // w, (k * (rank + 1)) // w
    return range(min(lo * b, n), min(hi * b, n))


def _batch(batch_size, n, w) -> int:
    if batch_size is None:
        return -(-n // w)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _per_sample(per_sample_args, n: int, where: str) -> dict:
    """``per_sample_args`` checked: tensors whose first dimension holds one row per global
    index (at least ``n`` rows)."""
    if per_sample_args is None:
        return {}
    if not isinstance(per_sample_args, dict):
        raise TypeError(f"{where}: per_sample_args must be a dict of tensors, got "
                        f"{type(per_sample_args).__name__}")
    for k, v in per_sample_args.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor) or v.dim() == 0 or \
                v.shape[0] < n:
            got = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else \
                type(v).__name__
            raise ValueError(f"{where}: per_sample_args[{k!r}] must be a tensor with a row per "
                             f"global sample index (>= {n} rows), got {got}")
    return per_sample_args


def sample_indices(sampler: Sampler, model, indices, shape, seed: int = 0, *,
                   batch_size: int | None = None, dtype=torch.float32, device=None,
                   extra_args: dict | None = None, per_sample_args: dict | None = None,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Samples of the given global indices [len(indices), *shape], in global batches of
    ``batch_size`` (indices i with the same i // batch_size run together; default: all at
    once), with the noise of :func:`initial_noise` and per-sample Philox seeds.

    ``extra_args`` go to the model as they are with every batch; ``per_sample_args`` are
    tensors with a row per global index (class labels, prompt embeddings): each batch's
    model call gets the rows of its indices (``v[indices]``), merged into ``extra_args``."""
    idx = [int(i) for i in indices]
    per = _per_sample(per_sample_args, max(idx) + 1 if idx else 0, "sample_indices")
    both = set(per) & set(extra_args or {})
    if both:
        raise ValueError(f"sample_indices: {sorted(both)[0]!r} is in both extra_args and "
                         f"per_sample_args")
    if not idx:
        return torch.empty(0, *shape, dtype=dtype, device=device)
    if batch_size is None:
        groups = [idx]
    else:
        _batch(batch_size, 1, 1)
        groups = []
        for i in idx:
            if groups and groups[-1][-1] // batch_size == i // batch_size:
                groups[-1].append(i)
            else:
                groups.append([i])
    # The default backend for the device (run_plan's default is the CPU one).
    be = sampler.backend or backends.get(None, device=device, dtype=dtype)
    outs = []
    for g in groups:
        noise = initial_noise(seed, g, shape, dtype=dtype, device=device)
        args = extra_args
        if per:
            rows = torch.tensor(g, dtype=torch.long)
            args = dict(extra_args or {})
            args.update({k: v[rows.to(v.device)] for k, v in per.items()})
        outs.append(sampler.sample(model, noise, seed=sample_seeds(seed, g), backend=be,
                                   extra_args=args, compute_dtype=compute_dtype))
    return torch.cat(outs)


def init_distributed(dist_backend: str | None = None) -> bool:
    """Initialize the default process group from torchrun's environment if it is not yet;
    True if this call initialized it, False if it already was or there is no torchrun
    environment (single process). ``dist_backend``: "gloo", "nccl" (default: NCCL when CUDA
    is available, else gloo)."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    if dist_backend is None:
        dist_backend = "nccl" if torch.cuda.is_available() else "gloo"
    if dist_backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=dist_backend, init_method="env://")
    return True


def sample_sharded(sampler: Sampler, model, num_samples: int, shape, seed: int = 0, *,
                   group=None, dist_backend: str | None = None, batch_size: int | None = None,
                   dtype=torch.float32, device=None, gather: str = "rank0",
                   extra_args: dict | None = None, per_sample_args: dict | None = None,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Sample ``num_samples`` states of ``shape`` across the ranks of ``group`` (default: the
    world, initialized from torchrun's environment if needed; a single process without one).

    Rank r runs the global indices ``shard_range(N, r, W, batch_size)`` (a contiguous slice
    of whole global batches) on ``device`` (default: cuda:LOCAL_RANK under NCCL, else cpu;
    the model must live there). ``gather``: "rank0" returns [N, *shape] on the group's first
    rank and None elsewhere, "all" returns it on every rank, "none" returns each rank's own
    slice. Bitwise the result of ``sample_indices(sampler, model, range(N), shape, seed,
    batch_size=batch_size)`` in one process when ``batch_size`` is given (see the module
    docstring for batch_size=None). ``extra_args`` / ``per_sample_args``: as
    :func:`sample_indices` (``per_sample_args`` tensors hold ``num_samples`` rows; each rank
    passes its indices' rows to the model).
    """
    import torch.distributed as dist

    if gather not in ("rank0", "all", "none"):
        raise ValueError(f"gather must be 'rank0', 'all' or 'none', got {gather!r}")
    shape = tuple(int(s) for s in shape)
    init_distributed(dist_backend)
    active = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if active else 0
    world = dist.get_world_size(group) if active else 1
    if device is None:
        if active and dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
    b = _batch(batch_size, int(num_samples), world)
    mine = shard_range(num_samples, rank, world, b)
    _per_sample(per_sample_args, int(num_samples), "sample_sharded")
    out = sample_indices(sampler, model, mine, shape, seed, batch_size=b, dtype=dtype,
                         device=device, extra_args=extra_args, per_sample_args=per_sample_args,
                         compute_dtype=compute_dtype)
    if gather == "none" or world == 1:
        return out
    # Object collectives pickle the shards (their sizes differ by up to a batch); the CPU copy
    # keeps NCCL's object path from needing the receiving rank's device.
    shard = out.cpu()
    if gather == "all":
        parts = [None] * world
        dist.all_gather_object(parts, shard, group=group)
        return torch.cat(parts).to(device)
    dst = dist.get_global_rank(group, 0) if group is not None else 0
    parts = [None] * world if rank == 0 else None
    dist.gather_object(shard, parts, dst=dst, group=group)
    return torch.cat(parts).to(device) if rank == 0 else None


# ---------------------------------------------------------------------------------------
# python -m pyengine.distributed
# ---------------------------------------------------------------------------------------


def _load_model(spec: str, process, prediction: str, dim: int, model_seed: int):
    """'gmm': the built-in Gaussian mixture (GaussianMixture.random(d=dim, M=4)); else
    'module:attr' (the model) or 'module:attr()' (a factory called with no arguments)."""
    if spec == "gmm":
        from .models import GaussianMixture
        return GaussianMixture.random(d=dim, M=4, seed=model_seed).as_model(process, prediction)
    import importlib

    call = spec.endswith("()")
    mod, _, attr = spec[:-2 if call else None].partition(":")
    if not mod or not attr:
        raise ValueError(f"--model must be 'gmm', 'module:attr' or 'module:attr()', got {spec!r}")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj() if call else obj


def _process(name: str):
    from . import processes
    table = {"edm": processes.EDM, "vp": lambda: processes.VP.discrete("linear"),
             "vp_scaled": lambda: processes.VP.discrete("scaled_linear", beta_start=0.00085,
                                                        beta_end=0.012),
             "flow": processes.RectifiedFlow}
    if name not in table:
        raise ValueError(f"--process must be one of {sorted(table)}, got {name!r}")
    return table[name]()


def main(argv=None) -> int:
    """``python -m pyengine.distributed``: sharded sampling under torchrun; rank 0 saves the
    gathered samples (torch.save of {"samples", "seed", "solver", "steps", ...}, or a .npy)."""
    p = argparse.ArgumentParser(prog="python -m pyengine.distributed",
                                description="Sample N states across torchrun ranks; the "
                                "result is bitwise that of one process with the same "
                                "--batch-size.")
    p.add_argument("--num-samples", "-n", type=int, required=True)
    p.add_argument("--shape", type=str, default=None,
                   help="per-sample shape, e.g. 3,32,32 (default: --dim for gmm)")
    p.add_argument("--model", default="gmm", help="gmm | module:attr | module:attr()")
    p.add_argument("--dim", type=int, default=2, help="dimension of the built-in mixture")
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--process", default="edm")
    p.add_argument("--prediction", default=None, help="default: sample for gmm on edm, "
                   "else epsilon")
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--schedule", default="karras")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--backend", default=None, help="pyengine kernel backend")
    p.add_argument("--dist-backend", default=None, choices=("gloo", "nccl"))
    p.add_argument("--out", default=None, help="output file (.pt or .npy), written by rank 0")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    import torch.distributed as dist

    try:
        proc = _process(args.process)
        prediction = args.prediction or ("sample" if args.model == "gmm" and
                                         args.process == "edm" else "epsilon")
        model = _load_model(args.model, proc, prediction, args.dim, args.model_seed)
        shape = (args.dim,) if args.shape is None else tuple(int(s) for s in
                                                             args.shape.split(","))
        sampler = Sampler(proc, args.solver, args.steps, schedule=args.schedule,
                          prediction=prediction, backend=args.backend)
    except (ValueError, ImportError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    created = init_distributed(args.dist_backend)
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        if hasattr(model, "to") and dist.is_initialized() and dist.get_backend() == "nccl":
            model = model.to(torch.device("cuda", torch.cuda.current_device()))
        x = sample_sharded(sampler, model, args.num_samples, shape, args.seed,
                           batch_size=args.batch_size, dtype=dtype)
        if rank == 0:
            x = x.cpu()
            if args.out:
                if args.out.endswith(".npy"):
                    import numpy as np
                    np.save(args.out, x.numpy())
                else:
                    torch.save({"samples": x, "seed": args.seed, "solver": args.solver,
                                "steps": args.steps, "schedule": args.schedule,
                                "process": args.process, "batch_size": args.batch_size,
                                "world_size": world}, args.out)
            if not args.quiet:
                where = f", saved to {args.out}" if args.out else ""
                print(f"{args.num_samples} samples of shape {shape} from {world} rank(s), "
                      f"{sampler!r}{where}")
    finally:
        if created:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
