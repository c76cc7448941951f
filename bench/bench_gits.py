"""The schedule-only baseline (GITS, pyengine.tuning.gits) against fixed Karras grids on an exact
Gaussian mixture: held-out endpoint error by NFE, VP and EDM.

    python bench/bench_gits.py [--dim 64] [--out bench/results/gits_mixture.md]

Mixture GaussianMixture.random(d, M=4, seed=0); the process's Karras grid from sigma_max to
sigma_min without the final step to 0; float64; 64 training noises (the teacher run and the
dynamic programming) and 64 held-out noises; the error of a sample is its RMS distance to the
exact PF-ODE endpoint of its noise (scipy DOP853, rtol 1e-10). "best fixed" is the best of
the solvers at that NFE on the Karras grid; "GITS" and "GITS-c" are each solver on the grid
of gits_schedule (weight "none" and "contraction"), the best solver shown.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import pyengine as pe
from pyengine.models import GaussianMixture
from pyengine.tuning.gits import dp_path, step_costs, teacher_trajectory

SOLVERS = ("dpmpp_2m", "unipc", "ipndm")
NFES = (3, 4, 5, 6, 8, 10)


def run(proc_name: str, d: int, fine: int = 200):
    proc = pe.processes.named(proc_name)
    pred = "sample" if proc_name == "edm" else "epsilon"
    gmm = GaussianMixture.random(d=d, M=4, seed=0)
    model = gmm.as_model(proc, pred)
    g = torch.Generator().manual_seed(1)
    train = torch.randn(64, d, generator=g, dtype=torch.float64)
    test = torch.randn(64, d, generator=g, dtype=torch.float64)
    ref = pe.Sampler(proc, "dpmpp_2m", steps=5, prediction=pred, to_zero=False)
    sig0, sig1 = float(ref.sigmas[0]), float(ref.sigmas[-1])
    x_hat0 = test * ref.init_noise_scale / float(proc.s_of_sigma(sig0))
    exact = gmm.ode_endpoint(x_hat0, sig0, sig1) * float(proc.s_of_sigma(sig1))
    t0 = time.perf_counter()
    traj = teacher_trajectory(ref, model, train, fine_steps=fine)
    costs = {w: step_costs(traj, weight=w) for w in ("none", "contraction")}
    fit_s = time.perf_counter() - t0
    teacher = teacher_trajectory(ref, model, test, fine_steps=fine).x_hat[-1] * \
        float(proc.s_of_sigma(sig1))

    def score(x):
        e = (x - exact).pow(2).mean(dim=1).sqrt()
        return float(e.median()), float(e.quantile(0.9))

    rows = {}
    for nfe in NFES:
        fixed = {s: score(pe.Sampler(proc, s, steps=nfe, prediction=pred, to_zero=False)
                          .sample(model, test)) for s in SOLVERS}
        rows.setdefault("best fixed", []).append(min(((v, k) for k, v in fixed.items())))
        for w, label in (("none", "GITS"), ("contraction", "GITS-c")):
            grid = traj.sigmas[dp_path(costs[w], nfe)[0]]
            res = {s: score(pe.Sampler(proc, s, sigmas=grid, prediction=pred,
                                       init_noise_scale=ref.init_noise_scale)
                            .sample(model, test)) for s in SOLVERS}
            rows.setdefault(label, []).append(min(((v, k) for k, v in res.items())))
    return rows, score(teacher), fit_s, sig0, sig1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    machine = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        machine = f"{name}, {os.cpu_count()} CPUs"
    except (OSError, StopIteration):
        pass
    lines = [f"# GITS (schedule-only) vs fixed Karras grids, exact mixture d={args.dim}", "",
             f"`python bench/bench_gits.py --dim {args.dim}`; {machine}, torch "
             f"{torch.__version__}, one thread. Median (90th percentile) RMS endpoint error "
             f"on 64 held-out noises; the solver that scored it in brackets.", ""]
    for name in ("edm", "vp"):
        rows, teach, fit_s, s0, s1 = run(name, args.dim)
        lines += [f"## {name}: Karras {s0:.4g} -> {s1:.4g}, no final step to 0", "",
                  f"teacher (dpmpp_3m_corrected, 200 log-uniform steps) error "
                  f"{teach[0]:.1e} ({teach[1]:.1e}); teacher run and costs on 64 training "
                  f"noises {fit_s:.1f} s", "",
                  "| plan | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
                  "|" + "---|" * (len(NFES) + 1)]
        for label, cells in rows.items():
            lines.append(f"| {label} | " + " | ".join(
                f"{m:.3f} ({q:.3f}) [{s}]" for (m, q), s in cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
