"""The eager sampling loop against its floor, on the CPU (issue: "the loop at the kernel's
speed").

Per configuration, in one run and alternating (A B A B ...) so drifts hit both alike:

* loop: ``Sampler.sample`` with a zero-cost model (it returns one preallocated tensor) over
  50 steps, divided by the number of fused updates -> time per step;
* floor: ``torch.add(x, y, alpha=a, out=z)`` on preallocated tensors -- the same two reads
  and one write as a DDIM update, with nothing else around it;
* traffic floor: what the loads and stores of the solver's updates cost at torch's own speed.
  A multistep update reads 3-6 tensors and writes 2 (the state and its history), so it
  cannot reach the speed of a 2-read, 1-write add; and a store costs more than a load (the
  line is read for ownership, then written back). The cost of one load stream L and one
  store stream S are solved from ``torch.add`` (2 L + S) and ``Tensor.copy_`` (L + S),
  timed alternately in the same run; an update with r reads and w writes costs r L + w S;
* kernels alone: the plan's fused updates, in plan order with the plan's coefficients, on
  preallocated tensors through the backend's steady-state launcher (no walk, no model): the
  loop minus this is the host overhead of the walk.

Rows: 16x4x128x128 (bandwidth-bound: the loop's speed as a fraction of the floor's) and
1x4x64x64 (overhead-bound: the loop's host overhead per step over the floor, in us), for
every deterministic registry solver that reads at most three buffers per update, with one
torch thread. Prints a markdown table; ``--out DIR`` writes it there with the machine named.

    python bench/bench_loop.py --out bench/results
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys

import torch

import pyengine as pe
from pyengine.benchmark import Timer

SOLVERS = ["ddim", "euler", "dpmpp_2m", "unipc", "ipndm", "dpm_multistep[order=3]", "heun"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _solver(name: str):
    if "[" in name:
        base, opt = name[:-1].split("[")
        k, v = opt.split("=")
        return base, {k: int(v)}
    return name, {}


def measure(name: str, shape, steps: int, reps: int, backend: str):
    base, opts = _solver(name)
    smp = pe.Sampler(pe.processes.VP.discrete("linear"), solver=base, steps=steps, **opts)
    const = torch.randn(shape) * 0.1
    model = lambda x, t: const                      # noqa: E731 -- zero-cost model
    noise = torch.randn(shape)
    n_updates = len(smp.plan.updates)
    x, y, z = torch.randn(shape), torch.randn(shape), torch.empty(shape)
    smp.sample(model, noise, backend=backend)                      # warm-up
    for _ in range(3):
        torch.add(x, y, alpha=0.5, out=z)
        z.copy_(x)
    once = Timer("cpu", min_reps=1, min_seconds=0.0, warmup=0, max_reps=1)

    def floor_run():
        for _ in range(n_updates):
            torch.add(x, y, alpha=0.5, out=z)

    def copy_run():
        for _ in range(n_updates):
            z.copy_(x)

    be = pe.backends.get(backend)
    kmax = max(len(op.bufs) for op in smp.plan.updates)
    ins = [torch.randn(shape) for _ in range(kmax)]
    kout, kaux = torch.empty(shape), torch.empty(shape)
    lists = [(op.coefs.tolist(), None if op.aux_coefs is None else op.aux_coefs.tolist(),
              len(op.bufs)) for op in smp.plan.updates]
    launch = be.walk_launches() if hasattr(be, "walk_launches") else None

    def kernels_run():
        for coef, aux_coef, k in lists:
            aux = None if aux_coef is None else kaux
            if launch is None or not launch(kout, ins[:k], coef, 0.0, None, -1, aux, aux_coef):
                be.fused_update(kout, ins[:k], coef, 0.0, None, -1, aux, aux_coef,
                                trusted=True)

    kernels_run()
    loop, floor, copy, kern = [], [], [], []
    for _ in range(reps):                          # alternating, so drifts hit both alike
        loop.append(once(lambda: smp.sample(model, noise, backend=backend))[0] / n_updates)
        floor.append(once(floor_run)[0] / n_updates)
        copy.append(once(copy_run)[0] / n_updates)
        kern.append(once(kernels_run)[0] / n_updates)
    reads = sum(len(op.bufs) for op in smp.plan.updates) / n_updates
    writes = sum(1 + (op.aux_dst is not None) for op in smp.plan.updates) / n_updates
    return (statistics.median(loop) * 1e-6, statistics.median(floor) * 1e-6,
            statistics.median(copy) * 1e-6, statistics.median(kern) * 1e-6, n_updates, reads,
            writes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for the markdown table")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 solvers (CI smoke)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shapes = [(16, 4, 128, 128), (1, 4, 64, 64)]
    solvers = SOLVERS
    if args.quick:
        shapes, solvers, args.reps, args.steps = [(2, 4, 16, 16)], SOLVERS[:2], 2, 5
    lines = ["| solver | shape | updates | reads / writes per update | loop us/step | "
             "add floor us | traffic floor us | kernels alone us | speed vs add floor | "
             "speed vs traffic floor | overhead over add floor us | "
             "overhead over traffic floor us | host overhead (loop - kernels) us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        for name in solvers:
            lo, fl, cp, kn, n, r, w = measure(name, shape, args.steps, args.reps,
                                              args.backend)
            load = max(fl - cp, 0.0)                 # add = 2 L + S, copy = L + S
            store = max(cp - load, 0.0)
            traffic = r * load + w * store
            lines.append(f"| {name} | {'x'.join(map(str, shape))} | {n} | {r:.2f} / {w:.2f} | "
                         f"{lo * 1e6:.1f} | {fl * 1e6:.1f} | {traffic * 1e6:.1f} | "
                         f"{kn * 1e6:.1f} | {100 * fl / lo:.0f}% | {100 * traffic / lo:.0f}% | "
                         f"{(lo - fl) * 1e6:.1f} | {(lo - traffic) * 1e6:.1f} | "
                         f"{(lo - kn) * 1e6:.1f} |")
            print(lines[-1], flush=True)
    head = (f"# Eager sampling loop vs the preallocated torch.add floor\n\n"
            f"{_cpu_name()}, {os.cpu_count()} cores, 1 torch thread, torch {torch.__version__}, "
            f"backend {args.backend}, {args.steps} steps, zero-cost model, median of "
            f"{args.reps} alternating runs; {datetime.date.today().isoformat()}.\n"
            f"Command: `python bench/bench_loop.py --out bench/results`\n\n")
    table = head + "\n".join(lines) + "\n"
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "loop_cpu.md"), "w") as f:
            f.write(table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
