"""The CPU backend with 1 and 2 threads, on a quiet machine and beside a busy process.

Every configuration (threads x load) runs in a fresh process, so no thread pool, cache or
allocator state carries over from another one. Each child times, with the ``cpp`` backend:

* the fused step alone: DDIM-like (K=2, no noise) at 16x4x128x128, Euler-ancestral-like
  (K=2 + Philox noise) at 1x4x64x64 and 16x4x128x128 (median of repeated calls);
* 50-step loops of a deterministic (``ddim``) and a stochastic (``euler_ancestral``) solver
  with a zero-cost model, ``pe.Sampler(...).sample(lambda x, t: torch.zeros_like(x), noise)``
  with prediction='epsilon', at the same sizes (median of a few loops, in ms per step), and
  the same loops with a model that returns one preallocated tensor (no torch op at all: the
  sampler's own work per step, which runs no torch op either);
* torch alone: ``torch.zeros_like(x)`` and ``x * 0.5``, the tensor ops such a loop runs
  outside the kernel (torch's own intra-op pool, at the same thread count).

Every configuration runs ``--rounds`` times in rotated order, and each case keeps its best
median: on a shared machine other work only ever slows a measurement down.

"busy" starts one competing process that spins on the CPU for a bounded time (it stops by
itself after ``--busy-seconds``, and is ended as soon as the child is done) on this machine
only. The table shows ms per step and the 2-thread / 1-thread ratio of each load.

    python bench/bench_cpu_threads.py                      # table to stdout
    python bench/bench_cpu_threads.py --out bench/results  # and a dated markdown file there
    python bench/bench_cpu_threads.py --pythonpath DIR      # another pyengine build (e.g. a
                                                            # checkout of an earlier commit)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CASES = [  # (name, kind, shape)
    ("step DDIM 16x4x128x128", "step_det", (16, 4, 128, 128)),
    ("step Euler-a 1x4x64x64", "step_noise", (1, 4, 64, 64)),
    ("step Euler-a 16x4x128x128", "step_noise", (16, 4, 128, 128)),
    ("loop ddim 1x4x64x64", "loop:ddim", (1, 4, 64, 64)),
    ("loop ddim 16x4x128x128", "loop:ddim", (16, 4, 128, 128)),
    ("loop euler_ancestral 1x4x64x64", "loop:euler_ancestral", (1, 4, 64, 64)),
    ("loop euler_ancestral 16x4x128x128", "loop:euler_ancestral", (16, 4, 128, 128)),
    # the sampler's own work per step: the model returns one preallocated tensor (no torch op)
    ("loop ddim 1x4x64x64, model output preallocated", "loop0:ddim", (1, 4, 64, 64)),
    ("loop ddim 16x4x128x128, model output preallocated", "loop0:ddim", (16, 4, 128, 128)),
    ("loop euler_ancestral 1x4x64x64, model output preallocated", "loop0:euler_ancestral",
     (1, 4, 64, 64)),
    ("loop euler_ancestral 16x4x128x128, model output preallocated", "loop0:euler_ancestral",
     (16, 4, 128, 128)),
    # torch's own share of such a loop (its intra-op pool, not the kernel): what the zero
    # model and a sampler's tensor ops cost per step
    ("torch only: zeros_like + x * s, 1x4x64x64", "torch_ops", (1, 4, 64, 64)),
    ("torch only: zeros_like + x * s, 16x4x128x128", "torch_ops", (16, 4, 128, 128)),
]

BUSY_LOOP = ("import time, sys\n"
             "end = time.monotonic() + float(sys.argv[1])\n"
             "x = 0\n"
             "while time.monotonic() < end:\n"
             "    for _ in range(10000):\n"
             "        x += 1\n")


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _cpp_update():
    """The fused update on the cpp backend, for this build or an older one."""
    try:
        from pyengine.fused_update import fused_update as fu

        def update(*args):
            return fu(*args, backend="cpp")
    except ImportError:                       # builds before the fused_update package
        from pyengine.backends import cpp

        def update(*args):
            return cpp.fused_update(*args)
    return update


def _timed(run, seconds: float, least: int, most: int) -> float:
    """Median seconds of ``run()`` after one warm-up call: at least ``least`` calls, more
    while ``seconds`` last, at most ``most``."""
    run()
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < least or (time.perf_counter() < t_end and len(times) < most):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return _median(times)


def child(threads: int, budget_s: float) -> dict:
    """Runs in a fresh process: the timings of every case at ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    import pyengine as pe
    from pyengine.noise import seeds_tensor

    update = _cpp_update()

    proc = pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    num_train_timesteps=1000)
    zero_model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    per_case = budget_s / len(CASES)
    res = {}
    for name, kind, shape in CASES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g)
        if kind == "torch_ops":
            def run():
                torch.zeros_like(x)
                return x * 0.5
            res[name] = 1e3 * _timed(run, per_case, 5, 2000)
        elif kind.startswith("step"):
            e = torch.randn(shape, generator=g)
            out = torch.empty(shape)
            seeds = seeds_tensor(1, shape[0])
            if kind == "step_det":
                def run():
                    update(out, [x, e], [0.9, 0.1])
            else:
                def run():
                    update(out, [x, e], [0.9, 0.1], 0.3, seeds, 5)
            res[name] = 1e3 * _timed(run, per_case, 5, 2000)
        else:
            solver = kind.split(":")[1]
            sampler = pe.Sampler(proc, solver=solver, steps=50, prediction="epsilon",
                                 backend="cpp")
            model = zero_model
            if kind.startswith("loop0"):
                const = torch.zeros_like(x)
                model = lambda x, t: const      # noqa: E731
            res[name] = 1e3 * _timed(lambda: sampler.sample(model, x, seed=0), per_case, 3,
                                     200) / 50
    return res


SWEEP = [1 << k for k in range(12, 23)]


def sweep_child(threads: int, budget_s: float) -> dict:
    """The fused step (K=2, float32, one sample) at each size of SWEEP, without and with
    noise: the measurement behind the kernel's parallel thresholds."""
    import torch

    torch.set_num_threads(threads)
    from pyengine.noise import seeds_tensor

    update = _cpp_update()

    seeds = seeds_tensor(1, 1)
    res = {}
    per = budget_s / (2 * len(SWEEP))
    for n in SWEEP:
        x, e, out = torch.randn(1, n), torch.randn(1, n), torch.empty(1, n)
        for noisy in (False, True):
            args = (out, [x, e], [0.9, 0.1]) + ((0.3, seeds, 5) if noisy else ())
            res[f"{n}:{int(noisy)}"] = 1e6 * _timed(lambda: update(*args), per, 5, 5000)
    return res


def sweep(budget_s: float, rounds: int, pythonpath: str | None) -> str:
    env, flags = child_env(pythonpath)
    best = {}
    for r in range(rounds):
        for threads in ((1, 2) if r % 2 == 0 else (2, 1)):
            out = subprocess.run([sys.executable, *flags, __file__, "--sweep-child", str(threads),
                                  "--budget", str(budget_s)], env=env, capture_output=True,
                                 text=True, timeout=budget_s + 300)
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            b = best.setdefault(threads, res)
            for k, v in res.items():
                b[k] = min(b[k], v)
    lines = ["| elements | 1 thread us | 2 threads us | 2/1 | with noise: 1 thread us | "
             "2 threads us | 2/1 |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in SWEEP:
        a, b = best[1][f"{n}:0"], best[2][f"{n}:0"]
        c, d = best[1][f"{n}:1"], best[2][f"{n}:1"]
        lines.append(f"| 2^{n.bit_length() - 1} | {a:.1f} | {b:.1f} | {b / a:.2f} | {c:.1f} | "
                     f"{d:.1f} | {d / c:.2f} |")
    return "\n".join(lines)


def run_config(threads: int, busy: bool, budget_s: float, pythonpath: str | None) -> dict:
    env, flags = child_env(pythonpath)
    env.pop("OMP_NUM_THREADS", None)
    hog = None
    if busy:
        # bounded: it ends by itself after the child's budget plus a margin
        hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(budget_s + 60)])
        time.sleep(0.3)
    try:
        out = subprocess.run([sys.executable, *flags, __file__, "--child", str(threads),
                              "--budget", str(budget_s)],
                             env=env, capture_output=True, text=True, timeout=budget_s + 300)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if out.returncode != 0:
        raise RuntimeError(f"child (threads={threads}, busy={busy}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_env(pythonpath: str | None):
    """(environment, interpreter flags) of a child that imports pyengine from ``pythonpath``
    when given: with -S, so that no .pth file (an editable install's import hook) comes before
    it, and this interpreter's site-packages after it."""
    env = dict(os.environ)
    if not pythonpath:
        return env, []
    import site
    env["PYTHONPATH"] = os.pathsep.join([pythonpath, *site.getsitepackages()])
    return env, ["-S"]


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def table(results: dict) -> str:
    lines = ["| case | 1 thread quiet | 2 threads quiet | 2/1 quiet | 1 thread busy | "
             "2 threads busy | 2/1 busy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, _, _ in CASES:
        q1, q2 = results[(1, False)][name], results[(2, False)][name]
        b1, b2 = results[(1, True)][name], results[(2, True)][name]
        lines.append(f"| {name} | {q1:.3f} | {q2:.3f} | {q2 / q1:.2f} | {b1:.3f} | {b2:.3f} | "
                     f"{b2 / b1:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--sweep-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--sweep", action="store_true",
                    help="also time the step alone over sizes 2^12..2^22 (the parallel "
                         "thresholds), quiet")
    ap.add_argument("--budget", type=float, default=6.0,
                    help="seconds of timing per configuration and round (default 6)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds over the four configurations; the best median is kept "
                         "(default 3)")
    ap.add_argument("--out", type=Path, help="folder for a dated markdown copy of the table")
    ap.add_argument("--label", default="", help="a name for this build in the table's title")
    ap.add_argument("--pythonpath", help="run the children against pyengine from this folder")
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.budget)))
        return
    if args.sweep_child is not None:
        print(json.dumps(sweep_child(args.sweep_child, args.budget)))
        return
    import torch

    load0 = os.getloadavg()[0]
    results = {}
    configs = [(1, False), (2, False), (1, True), (2, True)]
    for r in range(args.rounds):
        # rounds in rotated order; each case keeps its best median over the rounds (other
        # work on a shared machine only ever slows a measurement down)
        for threads, busy in configs[r % 4:] + configs[:r % 4]:
            res = run_config(threads, busy, args.budget, args.pythonpath)
            best = results.setdefault((threads, busy), res)
            for k, v in res.items():
                best[k] = min(best[k], v)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"CPU fused update and 50-step loops (zero-cost model), ms per step, median; "
            f"{args.label + '; ' if args.label else ''}cpp backend; {machine()}; "
            f"torch {torch.__version__}; {when}. Each configuration in a fresh process, "
            f"{args.rounds} rounds in rotated order, the best median of each case kept; "
            f"'busy': one other process spinning on a CPU. 1-min load average {load0:.1f} "
            f"before, {os.getloadavg()[0]:.1f} after (the shared machine is never idle).")
    text = head + "\n\n" + table(results) + "\n"
    if args.sweep:
        text += ("\nThe step alone (K=2, float32, one sample, median us; the kernel runs two "
                 "threads where its thresholds and timings say so):\n\n"
                 + sweep(args.budget, args.rounds, args.pythonpath) + "\n")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = "" if not args.label else "_" + "".join(c if c.isalnum() else "-"
                                                      for c in args.label)
        path = args.out / f"cpu_threads{tag}_{datetime.date.today().isoformat()}.md"
        path.write_text(text)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
