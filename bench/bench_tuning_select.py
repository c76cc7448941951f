"""Choosing the 5-NFE fit settings of bench_tuning.py without the held-out noises.

    .venv/bin/python bench/bench_tuning_select.py --process vp --base ipndm,unipc \\
        --train 128,512 --optimizer adam,lbfgs

A selection set of noises from the training distribution (seed 3, ``--select`` noises; the
bench's training noises are seed 2 and its held-out noises seed 1, never used here) with
exact PF-ODE endpoints. Every combination of the settings is fitted on training noises of
seed 2 (teacher endpoints, as the bench) and scored on the selection set: median and 90th
percentile of the per-sample RMS error of the fully tuned and the schedule-only plans, and
their ratios to the best fixed 10-NFE solver there (the bench's two targets). One JSON line
per fit goes to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

import pyengine as pe
from pyengine.models import GaussianMixture
from pyengine.tuning import DEFAULT_TEACHER
from pyengine.tuning.fit import teacher_sigmas
from pyengine.tuning.mixture import mixture_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tuning import FIXED, PROCESSES, SCHEDULES, errors  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--process", default="edm,vp")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--base", default="ipndm")
    ap.add_argument("--train", default="128")
    ap.add_argument("--lr", default="0.02")
    ap.add_argument("--iters", default="300")
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--patience", type=int, default=8)
    ap.add_argument("--batch", default="128")
    ap.add_argument("--seed", default="0", help="pe.tune's seed (split, minibatches)")
    ap.add_argument("--trim", default="0", help="pe.tune's trim")
    ap.add_argument("--starts", default="1", help="pe.tune's schedule_starts")
    ap.add_argument("--alternate", default="0", help="pe.tune's alternate")
    ap.add_argument("--select", type=int, default=256)
    ap.add_argument("--no-schedule-only", action="store_true",
                    help="skip the schedule-only fits")
    ap.add_argument("--out", default=None, help="append one JSON line per fit here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    grid = list(itertools.product(
        args.base.split(","), [int(v) for v in args.train.split(",")],
        [float(v) for v in args.lr.split(",")],
        [int(v) for v in args.iters.split(",")], args.optimizer.split(","),
        [int(v) for v in args.batch.split(",")], [int(v) for v in args.seed.split(",")],
        [float(v) for v in args.trim.split(",")], [int(v) for v in args.starts.split(",")],
        [int(v) for v in args.alternate.split(",")]))
    n_max = max(g[1] for g in grid)
    for name in args.process.split(","):
        pred = PROCESSES[name]
        proc = pe.processes.named(name)
        gmm = GaussianMixture.random(d=64, M=4, seed=0)
        model = mixture_model(gmm, proc, pred)
        sel = torch.randn(args.select, 64, generator=torch.Generator().manual_seed(3),
                          dtype=torch.float64)
        train_all = torch.randn(n_max, 64, generator=torch.Generator().manual_seed(2),
                                dtype=torch.float64)
        ref = pe.Sampler(proc, solver="dpmpp_2m", steps=5, prediction=pred)
        sig0 = float(ref.sigmas[0])
        exact = gmm.ode_endpoint(
            sel * (float(proc.prior_std(sig0)) / float(proc.s_of_sigma(sig0))), sig0, 0.0)
        t_name, t_steps, t_opts = DEFAULT_TEACHER
        ts = pe.Sampler(proc, solver=t_name, prediction=pred, init_noise_scale=1.0,
                        sigmas=teacher_sigmas(ref.sigmas, proc, t_steps), **t_opts)
        with torch.no_grad():
            teacher_all = ts.sample(model, train_all * ref.init_noise_scale)
        rows = {}
        for solver, opts in FIXED:
            for sch in SCHEDULES:
                s = pe.Sampler(proc, solver=solver, steps=10, schedule=sch, prediction=pred,
                               **opts)
                if s.nfe == 10:
                    with torch.no_grad():
                        rows[f"{solver}/{sch}"] = errors(s.sample(model, sel), exact)
        best = min(rows, key=lambda k: rows[k][0])
        f10 = rows[best]
        print(f"[{name}] selection set: {args.select} noises (seed 3); best fixed 10-NFE "
              f"{best} {f10[0]:.4f} / {f10[1]:.4f}", flush=True)
        for base, n, lr, iters, opt, bs, seed, trim, starts, alt in grid:
            smp = pe.Sampler(proc, solver=base, steps=args.nfe, schedule="karras",
                             prediction=pred)
            kw = dict(teacher=teacher_all[:n], progress=False, seed=seed, iters=iters, lr=lr,
                      optimizer=opt, patience=args.patience, batch_size=bs, trim=trim,
                      schedule_starts=starts, alternate=alt)
            t0 = time.perf_counter()
            full = pe.tune(smp, model, train_all[:n], **kw)
            t_full = time.perf_counter() - t0
            e_f = errors(full.sampler().sample(model, sel), exact)
            e_s = (math.nan, math.nan)
            if not args.no_schedule_only:
                sched = pe.tune(smp, model, train_all[:n], times=False, coefficients=False,
                                **kw)
                e_s = errors(sched.sampler().sample(model, sel), exact)
            rec = {"process": name, "nfe": args.nfe, "base": base, "train": n,
                   "lr": lr, "iters": iters, "optimizer": opt,
                   "patience": args.patience, "batch": bs, "seed": seed, "trim": trim,
                   "starts": starts, "alternate": alt, "full": e_f,
                   "schedule": e_s,
                   "fixed10": {"best": best, "error": f10}, "fit_seconds": t_full,
                   "iters_run": full.provenance["fitted"]["iters"],
                   "grid": full.provenance["fitted"]["gradient_grid"]}
            print(f"[{name}] {base} n={n} lr={lr:g} it={iters} {opt} b={bs} s={seed} "
                  f"trim={trim:g} starts={starts} alt={alt}: full "
                  f"{e_f[0]:.4f} / {e_f[1]:.4f} (x fixed10 {e_f[0] / f10[0]:.2f} / "
                  f"{e_f[1] / f10[1]:.2f}); sched {e_s[0]:.4f} / {e_s[1]:.4f} (full/sched "
                  f"{e_f[0] / e_s[0]:.2f} / {e_f[1] / e_s[1]:.2f}); {t_full:.0f} s, "
                  f"{rec['iters_run']} it, {rec['grid']}", flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
