"""Tuned plans on the exact Gaussian mixture: endpoint error vs the exact PF-ODE endpoint.

    .venv/bin/python bench/bench_tuning.py                      # EDM and VP, NFE 3..10
    .venv/bin/python bench/bench_tuning.py --process edm --nfe 5 --quick
    .venv/bin/python bench/bench_tuning.py --digits             # the digits model's fit cost

The mixture is the project's test mixture at d = 64 (``GaussianMixture.random(d=64, M=4,
seed=0)``, the demo's), on the EDM process (x0 model) and the DDPM VP process (epsilon
model), Karras grids from sigma_max to 0 (the Sampler's default). Per NFE:

* fixed solvers: dpmpp_2m, unipc, ipndm, dpm_multistep (order 3), dpmpp_3m over the karras,
  time_uniform and logsnr schedules; the best (lowest median) is reported;
* schedule-tuned: ``pe.tune(..., times=False, coefficients=False)`` (Nelder-Mead on the
  schedule only) of the base solver (``--base``, default ipndm);
* fully tuned: ``pe.tune(...)`` (schedule, then evaluation times and coefficients).

Both fits use the same training noise (``--train``, a quarter of it for validation) and the
same teacher endpoints (``pe.tuning.DEFAULT_TEACHER``, computed once per process: the grids
of every NFE share their ends); errors are measured on ``--test`` held-out noises against the
exact endpoint (scipy DOP853, rtol 1e-10). Error of a sample: RMS over its 64 elements
(``||x - x_exact|| / 8``); the tables give the median and the 90th percentile over samples.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pyengine as pe
from pyengine.models import GaussianMixture
from pyengine.tuning import DEFAULT_TEACHER
from pyengine.tuning.fit import teacher_sigmas
from pyengine.tuning.mixture import mixture_model

FIXED = [("dpmpp_2m", {}), ("unipc", {}), ("ipndm", {}), ("dpm_multistep", {"order": 3}),
         ("dpmpp_3m", {})]
SCHEDULES = ["karras", "time_uniform", "logsnr"]
PROCESSES = {"edm": "sample", "vp": "epsilon"}


def machine() -> str:
    try:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_cpu_threads import machine as m
        return m()
    except Exception:                                   # noqa: BLE001 - a label only
        return platform.processor() or platform.machine()


def errors(out, exact):
    e = (out - exact).reshape(out.shape[0], -1).norm(dim=1) / math.sqrt(exact[0].numel())
    return float(e.median()), float(e.quantile(0.9))


def problem(name: str, base: str):
    """(prediction, process, base solver, mixture, model) of process ``name``; ``base`` is
    one solver name or ``process=solver,...``."""
    pred = PROCESSES[name]
    proc = pe.processes.named(name)
    base_name = dict(v.split("=") for v in base.split(",")).get(name) if "=" in base else base
    gmm = GaussianMixture.random(d=64, M=4, seed=0)
    return pred, proc, base_name, gmm, mixture_model(gmm, proc, pred)


def run_process(name: str, nfes, args) -> dict:
    pred, proc, base_name, gmm, model = problem(name, args.base)
    test = torch.randn(args.test, 64, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    train = torch.randn(args.train, 64, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
    ref = pe.Sampler(proc, solver="dpmpp_2m", steps=5, prediction=pred)
    sig0 = float(ref.sigmas[0])
    t0 = time.perf_counter()
    x_hat0 = test * (float(proc.prior_std(sig0)) / float(proc.s_of_sigma(sig0)))
    exact = gmm.ode_endpoint(x_hat0, sig0, 0.0)
    res = {"process": name, "prediction": pred, "exact_seconds": time.perf_counter() - t0,
           "fixed": {}, "tuned": {}, "select": args.select,
           "fit_settings": f"{args.train} training noises (a quarter for validation), base "
                           f"{base_name}, "
                           + (f"Adam lr {args.lr}" if args.optimizer == "adam" else
                              "L-BFGS (strong Wolfe line search, full training set)")
                           + f", up to {args.iters} iterations"
                           + (f", trim {args.trim}" if args.trim else "")
                           + (f", {args.starts} Nelder-Mead starts" if args.starts > 1 else "")
                           + (f", up to {args.alternate} alternation rounds"
                              if args.alternate else "")}
    print(f"[{name}] exact endpoints of {args.test} test noises: "
          f"{res['exact_seconds']:.1f} s", flush=True)

    # teacher: once per process (every NFE's Karras grid has the same ends)
    t_name, t_steps, t_opts = DEFAULT_TEACHER
    ts = pe.Sampler(proc, solver=t_name, prediction=pred, init_noise_scale=1.0,
                    sigmas=teacher_sigmas(ref.sigmas, proc, t_steps), **t_opts)
    t0 = time.perf_counter()
    with torch.no_grad():
        teacher = ts.sample(model, train * ref.init_noise_scale)
    res["teacher_seconds"] = time.perf_counter() - t0
    sel = None
    if args.restarts > 1:          # a second validation set: seed 3, teacher endpoints
        sel_noise = torch.randn(args.select, 64, generator=torch.Generator().manual_seed(3),
                                dtype=torch.float64)
        with torch.no_grad():
            sel = (sel_noise, ts.sample(model, sel_noise * ref.init_noise_scale))
    with torch.no_grad():
        res["teacher_error"] = errors(ts.sample(model, test * ref.init_noise_scale), exact)
    res["teacher"] = f"{t_name}, {t_steps} steps, log-uniform grid"
    print(f"[{name}] teacher {res['teacher']}: {res['teacher_seconds']:.1f} s for "
          f"{args.train}; its own error on the test noises: median "
          f"{res['teacher_error'][0]:.2e}, p90 {res['teacher_error'][1]:.2e}", flush=True)

    for nfe in nfes:
        rows = {}
        for solver, opts in FIXED:
            for sch in SCHEDULES:
                s = pe.Sampler(proc, solver=solver, steps=nfe, schedule=sch, prediction=pred,
                               **opts)
                if s.nfe != nfe:
                    continue
                with torch.no_grad():
                    rows[f"{solver}/{sch}"] = errors(s.sample(model, test), exact)
        best = min(rows, key=lambda k: rows[k][0])
        res["fixed"][nfe] = {"best": best, "best_error": rows[best], "all": rows}
        base = pe.Sampler(proc, solver=base_name, steps=nfe, schedule="karras", prediction=pred)
        base_err = errors(base.sample(model, test), exact)
        kw = dict(teacher=teacher, progress=False, iters=args.iters, lr=args.lr,
                  optimizer=args.optimizer, trim=args.trim, schedule_starts=args.starts,
                  alternate=args.alternate)
        sched, sched_sel = fit_select(base, model, train, sel, dict(kw, times=False,
                                      coefficients=False), args.restarts)
        full, full_sel = fit_select(base, model, train, sel, kw, args.restarts)
        e_s = errors(sched.sampler().sample(model, test), exact)
        e_f = errors(full.sampler().sample(model, test), exact)
        res["tuned"][nfe] = {
            "base": base_name, "base_error": base_err,
            "selection": {"schedule": sched_sel, "full": full_sel}, "schedule_error": e_s,
            "full_error": e_f,
            "schedule_seconds": sum(sched_sel["seconds"]) if sched_sel else
            sched.provenance["fit_seconds"],
            "full_seconds": sum(full_sel["seconds"]) if full_sel else
            full.provenance["fit_seconds"],
            "fitted": full.provenance["fitted"], "losses": full.provenance["losses"],
            "schedule_sigmas": [float(v) for v in sched.plan.sigmas],
            "full_sigmas": [float(v) for v in full.plan.sigmas]}
        print(f"[{name}] NFE {nfe}: best fixed {best} {rows[best][0]:.4f} / "
              f"{rows[best][1]:.4f}; {base_name} karras {base_err[0]:.4f}; schedule-tuned "
              f"{e_s[0]:.4f} / {e_s[1]:.4f} ({sched.provenance['fit_seconds']:.1f} s); fully "
              f"tuned {e_f[0]:.4f} / {e_f[1]:.4f} ({full.provenance['fit_seconds']:.1f} s, "
              f"grid {full.provenance['fitted']['gradient_grid']}, "
              f"{full.provenance['fitted']['iters']} iters)", flush=True)
        if nfe == 5:
            res["timing"] = sampling_time(base, full, model, test)
    return res


def fit_select(base, model, train, sel, kw, restarts: int):
    """pe.tune with seeds 0 .. restarts-1; the fit of the lowest 90th-percentile error on the
    selection set ``sel`` (noise, teacher endpoints: never the held-out noises) wins."""
    if restarts <= 1:
        return pe.tune(base, model, train, seed=0, **kw), None
    fits, scores = [], []
    for seed in range(restarts):
        t = pe.tune(base, model, train, seed=seed, **kw)
        with torch.no_grad():
            scores.append(errors(t.sampler().sample(model, sel[0]), sel[1]))
        fits.append(t)
    i = min(range(restarts), key=lambda k: scores[k][1])
    return fits[i], {"scores": scores, "chosen_seed": i,
                     "seconds": [f.provenance["fit_seconds"] for f in fits]}


def sampling_time(base, tuned, model, test, repeats: int = 30) -> dict:
    """Median seconds of Sampler.sample with the base and the tuned plan (interleaved)."""
    ts = tuned.sampler()
    tb, tt = [], []
    for _ in range(3):
        base.sample(model, test)
        ts.sample(model, test)
    for _ in range(repeats):
        t0 = time.perf_counter()
        base.sample(model, test)
        tb.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ts.sample(model, test)
        tt.append(time.perf_counter() - t0)
    return {"base_ms": 1e3 * float(np.median(tb)), "tuned_ms": 1e3 * float(np.median(tt)),
            "base_iqr_ms": 1e3 * float(np.subtract(*np.percentile(tb, [75, 25]))),
            "tuned_iqr_ms": 1e3 * float(np.subtract(*np.percentile(tt, [75, 25]))),
            "batch": int(test.shape[0])}


def run_digits(args) -> dict:
    """Fit cost and peak memory of tuning the digits model (NFE 5, feature loss)."""
    from pyengine.models.digits import _classifier, load_digits_model, quality

    process, model, pred = load_digits_model()
    clf, _ = _classifier()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = pe.Sampler(process, solver="ipndm", steps=5, prediction=pred)
    noise = torch.randn(args.digits_train, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    t0 = time.perf_counter()
    def feature(x):            # the classifier's features of the pixels, differentiable
        return clf.features(((x.reshape(-1, 64).to(torch.float32) + 1.0) * 0.5).clamp(0, 1))

    tuned = pe.tune(s, model, noise, feature=feature,
                    dtype=torch.float32, iters=args.iters, batch_size=args.batch,
                    progress=False, seed=0)
    fit_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    held = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        fd_base = quality(s.sample(model, held))["fd"]
        fd_tuned = quality(tuned.sampler().sample(model, held))["fd"]
    return {"fit_seconds": fit_s, "maxrss_before_mib": rss0 / 1024,
            "maxrss_after_mib": rss1 / 1024, "train": args.digits_train, "batch": args.batch,
            "iters": tuned.provenance["fitted"]["iters"],
            "losses": tuned.provenance["losses"], "fd_base_256": fd_base,
            "fd_tuned_256": fd_tuned, "teacher": tuned.provenance["teacher"]}


def fmt(e) -> str:
    return f"{e[0]:.4f} / {e[1]:.4f}"


def markdown(out: dict) -> str:
    """The results as the markdown page of bench/results/."""
    lines = [f"# Tuned plans on the exact Gaussian mixture ({out['machine']})", "",
             f"`bench/bench_tuning.py` (torch {out['torch']}, {out['threads']} thread). "
             "Error of a sample: RMS over its 64 elements of x - x_exact (exact PF-ODE "
             "endpoint, DOP853 rtol 1e-10); each cell: median / 90th percentile over the "
             "held-out noises. Mixture `GaussianMixture.random(d=64, M=4, seed=0)`; Karras "
             "grid sigma_max -> 0 for the base solver.", ""]
    for r in out.get("results", []):
        nfes = sorted(r["tuned"], key=int)
        t = r["tuned"][nfes[0]]
        lines += [f"## {r['process'].upper()} process, {r['prediction']} model", "",
                  f"Teacher {r['teacher']}: {r['teacher_seconds']:.1f} s for the training "
                  f"noises; its own error on the held-out noises "
                  f"{r['teacher_error'][0]:.1e} / {r['teacher_error'][1]:.1e}. "
                  f"Tuned base solver: {t['base']} (karras).", "",
                  "| NFE | best fixed solver | its error | base (karras) | schedule-tuned | "
                  "fully tuned | fit s (schedule / full) | full grid |",
                  "|---|---|---|---|---|---|---|---|"]
        for n in nfes:
            f, t = r["fixed"][n], r["tuned"][n]
            lines.append(f"| {n} | {f['best']} | {fmt(f['best_error'])} | "
                         f"{fmt(t['base_error'])} | {fmt(t['schedule_error'])} | "
                         f"{fmt(t['full_error'])} | {t['schedule_seconds']:.1f} / "
                         f"{t['full_seconds']:.1f} | {t['fitted']['gradient_grid']} |")
        f10 = r["fixed"].get("10") or r["fixed"].get(10)
        t5 = r["tuned"].get("5") or r["tuned"].get(5)
        if f10 and t5:
            a = t5["full_error"][0] / f10["best_error"][0]
            b = t5["full_error"][0] / t5["schedule_error"][0]
            a90 = t5["full_error"][1] / f10["best_error"][1]
            b90 = t5["full_error"][1] / t5["schedule_error"][1]
            lines += ["", f"Targets (median): fully tuned 5-NFE / best fixed 10-NFE = {a:.2f} "
                      f"(target <= 0.5: {'met' if a <= 0.5 else 'MISSED'}); fully tuned "
                      f"5-NFE / schedule-tuned 5-NFE = {b:.2f} (target <= 0.67: "
                      f"{'met' if b <= 2 / 3 else 'MISSED'}). The same ratios at the 90th "
                      f"percentile: {a90:.2f} and {b90:.2f}."]
        sel = [(n, r["tuned"][n].get("selection")) for n in nfes]
        if all(v and v.get("full") for _, v in sel):
            lines += ["", f"Fits: {r.get('fit_settings', '')}; each fitted with pe.tune seeds "
                      f"0..{len(sel[0][1]['full']['scores']) - 1}, the lowest 90th percentile "
                      f"on {r.get('select', '')} selection noises (seed 3, teacher endpoints; "
                      "not the held-out noises) kept; fit s: all restarts. Chosen seed by NFE "
                      "(schedule-tuned / fully tuned): " + ", ".join(
                          f"{n}: {v['schedule']['chosen_seed']} / {v['full']['chosen_seed']}"
                          for n, v in sel) + "."]
        if "timing" in r:
            tm = r["timing"]
            lines += ["", f"Sampling time at NFE 5 (Sampler.sample, batch {tm['batch']}, "
                      f"median of 30, interleaved): base {tm['base_ms']:.2f} ms (IQR "
                      f"{tm['base_iqr_ms']:.2f}), tuned {tm['tuned_ms']:.2f} ms (IQR "
                      f"{tm['tuned_iqr_ms']:.2f})."]
        lines.append("")
    dg = out.get("digits")
    if dg:
        lo = dg["losses"]
        lines += ["## The digits model: cost of a fit", "",
                  f"`--digits`: ipndm at NFE 5 (Karras), the classifier-feature loss, "
                  f"{dg['train']} noises (a quarter for validation), batch {dg['batch']}, "
                  f"{dg['iters']} Adam iterations per grid, float32 state, teacher "
                  f"{dg['teacher']['solver']} {dg['teacher']['steps']} steps. Fit "
                  f"{dg['fit_seconds']:.0f} s (teacher included); peak resident memory of the "
                  f"process {dg['maxrss_after_mib']:.0f} MiB ({dg['maxrss_before_mib']:.0f} "
                  f"MiB before the fit). Feature loss (val) base {lo['base']['val']:.3f}, "
                  f"schedule {lo['schedule']['val']:.3f}, tuned {lo['tuned']['val']:.3f}. "
                  f"Frechet distance of 256 held-out samples (seed 99): base "
                  f"{dg['fd_base_256']:.2f}, tuned {dg['fd_tuned_256']:.2f} (one run; the "
                  f"issue's digits table by NFE: bench/bench_tuning_digits.py).", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--process", default="edm,vp")
    ap.add_argument("--nfe", default="3,4,5,6,8,10")
    ap.add_argument("--base", default="ipndm",
                    help="the tuned base solver, or one per process: edm=unipc,vp=ipndm")
    ap.add_argument("--train", type=int, default=128)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--trim", type=float, default=0.0, help="pe.tune's trim")
    ap.add_argument("--starts", type=int, default=1, help="pe.tune's schedule_starts")
    ap.add_argument("--alternate", type=int, default=0, help="pe.tune's alternate")
    ap.add_argument("--restarts", type=int, default=1,
                    help="fit with pe.tune seeds 0..R-1 and keep the lowest 90th percentile "
                         "on --select noises of seed 3 (teacher endpoints)")
    ap.add_argument("--select", type=int, default=256)
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--markdown", default=None, help="write the markdown page here")
    ap.add_argument("--from-json", default=None, help="render --markdown from this file")
    ap.add_argument("--digits", action="store_true", help="the digits fit cost instead")
    ap.add_argument("--digits-train", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.from_json:
        Path(args.markdown).write_text(markdown(json.loads(Path(args.from_json).read_text())))
        return
    out = {"machine": machine(), "torch": torch.__version__, "threads": args.threads}
    if args.digits:
        out["digits"] = run_digits(args)
        print(json.dumps(out["digits"], indent=1))
    else:
        nfes = [int(v) for v in args.nfe.split(",")]
        out["results"] = [run_process(p, nfes, args) for p in args.process.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.markdown and "results" in out:
        Path(args.markdown).write_text(markdown(json.loads(json.dumps(out))))


if __name__ == "__main__":
    main()
