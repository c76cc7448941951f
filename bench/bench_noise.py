"""What the in-kernel noise costs: a stochastic step against a deterministic one, on the CPU.

At 16x4x128x128 float32 on one thread, each timed in one run (ratios from the same run; the
machines are noisy):

* cpp deterministic step: out = a x + b e (K=2, the fused update, no noise)
* cpp stochastic step: the same plus c z with z the kernel's own Philox normals
* the normals alone: pyengine.backends.cpp.philox_normal
* diffusers-style torch: x * a + e * b, and the same plus torch.randn(...) * c (the noise drawn
  by torch's generator into a fresh tensor, then added), and torch.randn alone

The table gives median milliseconds and the stochastic / deterministic ratio of each side.
``--before DIR`` also runs the same measurements against another pyengine build (a folder to
put first on PYTHONPATH, e.g. an install of an earlier commit), each build in a fresh process.

    python bench/bench_noise.py [--out bench/results] [--before /path/to/old/site]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_threads import child_env, machine  # noqa: E402  (one copy of each)

SHAPE = (16, 4, 128, 128)


def _median_ms(fn, budget_s):
    fn()
    times, end = [], time.perf_counter() + budget_s
    while len(times) < 7 or (time.perf_counter() < end and len(times) < 500):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def child(budget_s: float) -> dict:
    import torch

    torch.set_num_threads(1)
    from pyengine.backends import cpp
    from pyengine.noise import seeds_tensor

    try:
        from pyengine.fused_update import fused_update as _fu

        def update(*args):
            return _fu(*args, backend="cpp")
    except ImportError:                       # builds before the fused_update package
        def update(*args):
            return cpp.fused_update(*args)

    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    out = torch.empty(SHAPE)
    seeds = seeds_tensor(1, SHAPE[0])
    numel = x[0].numel()
    a, b, c = 0.9, 0.1, 0.3
    step = [0]

    def cpp_stoch():
        step[0] += 1
        update(out, [x, e], [a, b], c, seeds, step[0])

    cases = {
        "cpp deterministic": lambda: update(out, [x, e], [a, b]),
        "cpp stochastic": cpp_stoch,
        "cpp normals alone": lambda: cpp.philox_normal(seeds, 3, numel),
        "torch deterministic": lambda: x * a + e * b,
        "torch stochastic": lambda: x * a + e * b + torch.randn(SHAPE, generator=g) * c,
        "torch randn alone": lambda: torch.randn(SHAPE, generator=g),
    }
    per = budget_s / len(cases)
    res = {}
    for _ in range(2):                  # interleaved rounds, the better median of each kept
        for k, fn in cases.items():
            t = _median_ms(fn, per / 2)
            res[k] = min(res.get(k, t), t)
    return res


def run_child(budget_s: float, pythonpath: str | None) -> dict:
    env, flags = child_env(pythonpath)
    out = subprocess.run([sys.executable, *flags, __file__, "--child", "--budget",
                          str(budget_s)], env=env, capture_output=True, text=True,
                         timeout=budget_s + 300)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({pythonpath or 'this build'}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rows(label: str, r: dict) -> list[str]:
    cd, cs, tdet, ts = (r["cpp deterministic"], r["cpp stochastic"], r["torch deterministic"],
                        r["torch stochastic"])
    return [f"| {label} | {cd:.3f} | {cs:.3f} | **{cs / cd:.2f}** | {r['cpp normals alone']:.3f} "
            f"| {tdet:.3f} | {ts:.3f} | {ts / tdet:.2f} | {r['torch randn alone']:.3f} | "
            f"{cs / ts:.2f} |"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=10.0, help="seconds per build (default 10)")
    ap.add_argument("--before", help="another pyengine build (PYTHONPATH folder) to compare")
    ap.add_argument("--before-label", default="before")
    ap.add_argument("--out", type=Path, help="folder for a dated markdown copy of the table")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.budget)))
        return
    import torch

    load0 = os.getloadavg()[0]
    results = []
    if args.before:
        results.append((args.before_label, run_child(args.budget, args.before)))
    results.append(("this build", run_child(args.budget, None)))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"Noise cost of a fused step, {'x'.join(map(str, SHAPE))} float32, one thread, "
            f"median ms; {machine()}; torch {torch.__version__}; {when}. Each build in a fresh "
            f"process; torch side diffusers-style (x * a + e * b [+ torch.randn(...) * c]). "
            f"1-min load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after.")
    lines = ["| build | cpp det | cpp stoch | cpp stoch/det | cpp normals alone | torch det | "
             "torch stoch | torch stoch/det | torch.randn alone | cpp stoch / torch stoch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results:
        lines += rows(label, r)
    text = head + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"noise_cpu_{datetime.date.today().isoformat()}.md"
        path.write_text(text)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
