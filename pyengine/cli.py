"""The ``pyengine`` command line: ``sample``, ``tune``, ``demo``, ``bench``, ``info`` and
``solvers``.

Argument parsing and dispatch only; the work lives in the library: models named on the
command line in :mod:`pyengine.models.load`, the output file in :mod:`pyengine.output`, the
demo in :mod:`pyengine.demo`, the timings in :mod:`pyengine.benchmark`, tables, ASCII digits
and progress bars in :mod:`pyengine.render`. Solver, process and schedule names come from
their registries.

Progress bars (tqdm, on stderr, shown after half a second) are silenced by ``--quiet``.
Exit codes: 0 success, 1 runtime error, 2 usage error (bad option, unknown solver or model,
unwritable output).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import UsageError, as_device

__all__ = ["main", "build_parser"]

#: a user error found after parsing (unknown solver name, ...): exit code 2
CLIError = UsageError


def _say(args, *parts, **kw):
    """print unless --quiet."""
    if not getattr(args, "quiet", False):
        print(*parts, **kw)


def _solver_info(name: str):
    from .solvers import get
    try:
        return get(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _solver_names(text: str) -> list[str]:
    """--solvers 'a,b' -> the registered names (UsageError for an unknown one)."""
    return [_solver_info(n.strip()).name for n in text.split(",") if n.strip()]


def _backend_name(name):
    from . import backends
    try:
        return backends.get(name).name
    except ValueError as e:
        raise UsageError(str(e)) from None


def _schedule_name(name: str) -> str:
    from .schedules import SCHEDULES
    if name not in SCHEDULES:
        raise UsageError(f"unknown schedule {name!r}; known: {', '.join(sorted(SCHEDULES))}")
    return name


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------


def cmd_solvers(args) -> int:
    from .render import solvers_table
    print(solvers_table(markdown=args.markdown, full=args.full))
    return 0


def cmd_info(args) -> int:
    from .render import print_info
    return print_info()


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run
    return run(DemoConfig(
        nfe=tuple(args.nfe), solvers=tuple(_solver_names(args.solvers)), process=args.process,
        dim=args.dim, batch=args.batch, samples=args.samples, seed=args.seed,
        backend=args.backend, threads=args.threads, out=args.out,
        digits_nfe=tuple(args.digits_nfe), digits_samples=args.digits_samples,
        scatter_nfe=args.scatter_nfe, digits=not args.no_digits, plots=not args.no_plots,
        tuning=not args.no_tuning, tuning_nfe=tuple(args.tuning_nfe), quiet=args.quiet))


def cmd_sample(args) -> int:
    import torch

    from . import distributed
    from .models.load import load_model
    from .output import check_output, save_samples
    from .render import ascii_digits, counting, progress
    from .sampler import Sampler

    torch.set_num_threads(args.threads)
    if args.plan is not None:
        given = [f"--{k}" for k in ("solver", "steps", "schedule") if getattr(args, k) is not None]
        if given:
            raise UsageError(f"--plan fixes the solver, steps and schedule; drop "
                             f"{', '.join(given)}")
        plan_file = _load_plan_file(args.plan)
    info = _solver_info(args.solver or "dpmpp_2m")
    if info.family == "inversion":
        raise UsageError(f"solver {info.name!r} inverts data to noise; pick a sampling solver")
    schedule = _schedule_name(args.schedule or "karras")
    backend = _backend_name(args.backend) if args.backend else None
    kind = check_output(args.output)                  # before any sampling
    spec = load_model(args.model, process=args.process, prediction=args.prediction,
                      shape=args.shape, dim=args.dim, model_seed=args.model_seed)
    if kind == ".png" and spec.images is None:
        raise UsageError(f"a .png grid needs image samples; {spec.label} makes samples of shape "
                         f"{spec.shape}: write .pt or .npy")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    try:
        device = as_device(args.device, "--device")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    try:
        if args.plan is not None:
            sampler = Sampler.from_tuned(plan_file, spec.process, prediction=spec.prediction,
                                         backend=backend, model=spec.model)
            info = sampler.info
            schedule = f"tuned ({args.plan})"
        else:
            sampler = Sampler(spec.process, solver=info.name, steps=args.steps or 20,
                              schedule=schedule, prediction=spec.prediction, backend=backend)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model = spec.model
    if device.type != "cpu" and hasattr(model, "to"):
        model = model.to(device)

    created, rank, world = False, 0, 1
    if args.distributed:
        created = distributed.init_distributed()
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
    try:
        mine = distributed.shard_range(args.num, rank, world, args.batch)
        batches = len({i // args.batch for i in mine})
        t0 = time.perf_counter()
        with progress(sampler.nfe * batches, f"sampling ({info.name}, {sampler.nfe} NFE)",
                      args.quiet or rank != 0, unit="eval") as bar:
            counted = counting(model, bar)
            if args.distributed:
                x = distributed.sample_sharded(sampler, counted, args.num, spec.shape, args.seed,
                                               batch_size=args.batch, dtype=dtype, device=device,
                                               gather="rank0")
            else:
                x = distributed.sample_indices(sampler, counted, range(args.num), spec.shape,
                                               args.seed, batch_size=args.batch, dtype=dtype,
                                               device=device)
        seconds = time.perf_counter() - t0
    finally:
        if created:
            import torch.distributed as dist
            dist.destroy_process_group()
    if rank != 0:
        return 0
    x = x.detach().cpu()
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).sum())
        print(f"pyengine sample: warning: {bad} of {x.shape[0]} samples are not finite",
              file=sys.stderr)
    if kind is not None:
        save_samples(x, args.output, kind, spec.images)
    ranks = f" on {world} ranks" if world > 1 else ""
    _say(args, f"pyengine sample: {args.num} samples of shape {tuple(spec.shape)} from "
               f"{spec.label}; {info.name}, {sampler.steps} steps ({sampler.nfe} NFE), "
               f"{schedule} schedule, seed {args.seed}, {args.dtype}{ranks}: {seconds:.2f} s")
    if kind is not None:
        _say(args, f"wrote {args.output}")
    if args.model == "digits" and not args.quiet:
        from .models.digits import quality, to_pixels
        q = quality(x)
        print(f"digit classifier: mean confidence {q['confidence']:.3f}, samples per class "
              f"0-9 {q['classes']}" + (f", Frechet distance {q['fd']:.2f}" if args.num >= 128
                                       else ""))
        if kind is None:
            print(ascii_digits(to_pixels(x[:16])))
    elif kind is None and not args.quiet:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        print(f"mean {flat.mean():.4g}, std {flat.std():.4g}, min {flat.min():.4g}, "
              f"max {flat.max():.4g} (give --output FILE to keep them)")
    return 0


def _load_plan_file(path):
    """pe.load_plan, its errors as UsageError (exit 2)."""
    from .tuning.artifact import load_plan
    try:
        return load_plan(path)
    except FileNotFoundError:
        raise UsageError(f"--plan {path!r}: no such file (write one with `pyengine tune`)") \
            from None
    except (ValueError, OSError) as e:
        raise UsageError(f"--plan: {e}") from None


def _digits_features():
    """The bundled digit classifier's features of model-space samples, differentiable (the
    feature distance of ``pyengine tune digits --loss features``)."""
    from .models.digits import _classifier

    clf, _ = _classifier()

    def features(x):
        return clf.features(((x.reshape(x.shape[0], 64) + 1.0) * 0.5).clamp(0.0, 1.0))
    return features


def _tune_gits(args, spec, sampler, noise) -> str:
    """``--method gits``: the schedule-only baseline written as a plan file (the base solver
    over the GITS grid); returns the summary's words."""
    import datetime

    from .sampler import Sampler
    from .tuning.artifact import model_fingerprint, save_plan
    from .tuning.gits import TEACHER, gits_schedule

    if args.loss != "l2" or args.schedule_only:
        raise UsageError("--method gits fits the schedule by its own step cost; drop --loss "
                         "and --schedule-only")
    fine = max(100, 20 * sampler.steps)
    grid = gits_schedule(sampler, spec.model, noise, sampler.steps, fine_steps=fine)
    plan = Sampler(spec.process, sampler.solver, sigmas=grid, prediction=spec.prediction,
                   init_noise_scale=sampler.init_noise_scale).plan
    if plan.nfe != sampler.nfe:               # pragma: no cover - same steps, same calls
        raise RuntimeError(f"the GITS grid's plan makes {plan.nfe} model calls, not "
                           f"{sampler.nfe}")
    save_plan(plan, args.output, provenance={
        "process": spec.process, "prediction": spec.prediction, "nfe": plan.nfe,
        "base_solver": sampler.solver, "base_options": {}, "base_schedule": args.schedule,
        "init_noise_scale": sampler.init_noise_scale, "method": "gits",
        "model_fingerprint": model_fingerprint(spec.model),
        "teacher": {"solver": TEACHER, "steps": fine, "grid": "log-uniform"},
        "n_train": int(noise.shape[0]), "seed": int(args.seed),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return "GITS grid " + ", ".join(f"{v:.4g}" for v in grid)


def cmd_tune(args) -> int:
    import torch

    from .distributed import initial_noise
    from .models.load import load_model
    from .output import check_writable
    from .sampler import Sampler

    torch.set_num_threads(args.threads)
    info = _solver_info(args.solver)
    if info.family == "inversion" or info.stochastic:
        raise UsageError(f"solver {info.name!r} is not a deterministic sampling solver; tuning "
                         f"needs one (e.g. dpmpp_2m, unipc, ipndm)")
    schedule = _schedule_name(args.schedule)
    check_writable(args.output)                       # before any tuning
    spec = load_model(args.model, process=args.process, prediction=args.prediction,
                      shape=args.shape, dim=args.dim, model_seed=args.model_seed)
    if args.loss == "features" and args.model != "digits":
        raise UsageError("--loss features uses the digits classifier: only for the digits model")
    sampler = None
    for steps in range(1, args.nfe + 1):
        try:
            s = Sampler(spec.process, solver=info.name, steps=steps, schedule=schedule,
                        prediction=spec.prediction)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if s.nfe == args.nfe:
            sampler = s
            break
    if sampler is None:
        raise UsageError(f"no step count of {info.name} makes exactly --nfe {args.nfe} model "
                         f"calls")
    noise = initial_noise(args.seed, range(args.num), spec.shape, dtype=torch.float64)
    t0 = time.perf_counter()
    if args.method == "gits":
        summary = _tune_gits(args, spec, sampler, noise)
    else:
        try:
            from .tuning.fit import tune
        except ImportError as e:                  # pragma: no cover - a broken install
            raise UsageError(f"tuning is not available: {e}") from None
        feature = _digits_features() if args.loss == "features" else None
        result = tune(sampler, spec.model, noise, feature=feature, iters=args.iters,
                      times=not args.schedule_only, coefficients=not args.schedule_only,
                      batch_size=args.batch, seed=args.seed, progress=not args.quiet)
        result.save(args.output)
        losses = result.provenance.get("losses", {})

        def val(k):
            v = losses.get(k, {}).get("val") if isinstance(losses.get(k), dict) else None
            return f"{v:.4g}" if isinstance(v, float) else "-"
        summary = (f"{args.loss} loss: validation loss {val('base')} (base) -> "
                   f"{val('schedule')} (schedule) -> {val('tuned')} (tuned)")
    seconds = time.perf_counter() - t0
    _say(args, f"pyengine tune: {spec.label}, {info.name} at {sampler.nfe} NFE ({schedule} "
               f"start), {args.num} noises (seed {args.seed}), {summary} in {seconds:.1f} s")
    _say(args, f"wrote {args.output} (sample with: pyengine sample {args.model} --plan "
               f"{args.output})")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .benchmark import run_kernel_bench, solver_bench, solver_bench_table
    from .models.load import parse_shape
    from .output import atomic_write, check_writable
    from .render import progress
    from .solvers import list_solvers

    torch.set_num_threads(args.threads)
    infos = [_solver_info(n) for n in _solver_names(args.solvers)] if args.solvers \
        else list_solvers()
    names = [i.name for i in infos if i.family != "inversion"]
    backend = _backend_name(args.backend)
    shape = parse_shape(args.shape)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    if args.plot:
        from .plots import MATPLOTLIB_HINT, have_matplotlib
        if not have_matplotlib():
            raise UsageError(f"--plot needs matplotlib: {MATPLOTLIB_HINT}")
        check_writable(args.plot, "--plot")
    if args.output:
        check_writable(args.output)                   # before any timing
    texts = []
    if args.suite in ("all", "solvers") and names:
        with progress(len(names), "timing solvers", args.quiet, unit="solver") as bar:
            copy_bw, rows = solver_bench(names, shape, args.steps, dtype, backend,
                                         args.min_seconds, progress=bar.update)
        text = solver_bench_table(rows, shape, dtype, args.steps, backend, copy_bw)
        print(text, flush=True)
        texts.append(text)
    if args.suite in ("all", "kernel"):
        try:
            report = run_kernel_bench(args.threads, args.full, args.backend,
                                      say=lambda s: _say(args, s, flush=True))
        except FileNotFoundError as e:
            if args.suite == "kernel":
                raise UsageError(f"kernel benchmark: {e}") from None
            _say(args, f"\nkernel benchmark: {e}; skipped")
        else:
            print(report.rstrip(), flush=True)
            texts.append(report)
    if args.output:
        body = ("\n\n".join(texts) + "\n").encode()
        atomic_write(args.output, lambda f: f.write(body))
        _say(args, f"wrote {args.output}")
    if args.plot:
        from .plots import plot_bench
        plot_bench("\n\n".join(texts), args.plot, title=f"pyengine bench ({backend} backend)")
        _say(args, f"wrote {args.plot}")
    return 0


# ---------------------------------------------------------------------------------------
# argument types and the parser
# ---------------------------------------------------------------------------------------


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _seed(text):
    v = _nonneg_int(text)
    if v >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2^32), got {v}")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


_BACKEND_HELP = ("fused-update backend (default: $PYENGINE_BACKEND, else the best available; "
                 "see `pyengine info`)")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig
    from .parameterization import PREDICTIONS
    from .processes import NAMED as PROCESSES
    from .solvers.registry import MAX_STEPS, featured

    p = argparse.ArgumentParser(
        prog="pyengine",
        description="pyengine: a compiled sampling engine for diffusion models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # -- sample ------------------------------------------------------------------------
    sm = sub.add_parser(
        "sample", help="sample a built-in or user model to a file",
        description="Turn noise into samples. MODEL is 'digits' (the trained 8x8 digits "
                    "denoiser), 'gmm' (the exact Gaussian mixture) or an import path "
                    "'module:attr' naming a model(x, t), or a factory called with no "
                    "arguments that returns the model, (process, model) or (process, model, "
                    "prediction). Sample i uses the Philox seed (seed, i) for its initial noise "
                    "and every noise draw, so a sample does not depend on --num or --batch "
                    "(for models that treat samples independently) nor on --distributed.",
        epilog="examples: pyengine sample digits --solver heun --steps 10 -o digits.png | "
               "pyengine sample gmm --num 1000 -o x.npy | "
               "pyengine sample mypkg.models:make_unet --shape 3,32,32 -o x.pt")
    sm.add_argument("model", nargs="?", default="digits",
                    help="digits (default), gmm, or module:attr")
    sm.add_argument("--solver", default=None,
                    help="solver name (default dpmpp_2m; `pyengine solvers` lists them)")
    sm.add_argument("--steps", type=_positive_int, default=None,
                    help=f"solver steps, at most {MAX_STEPS} (default 20)")
    sm.add_argument("--plan", default=None, metavar="FILE",
                    help="sample with a tuned plan file (`pyengine tune` writes one) instead "
                         "of --solver/--steps/--schedule; refused unless it was tuned for the "
                         "model's process and prediction")
    sm.add_argument("--schedule", default=None,
                    help="noise schedule (default karras; known: "
                         + ", ".join(sorted(_schedules())) + ")")
    sm.add_argument("--seed", type=_seed, default=0,
                    help="seed in [0, 2^32): sample i uses the Philox key (seed, i) (default 0)")
    sm.add_argument("-n", "--num", "--num-samples", dest="num", type=_positive_int, default=16,
                    help="number of samples (default 16); write -n under torchrun, whose own "
                         "parser takes --num for its --numa-binding")
    sm.add_argument("--batch", type=_positive_int, default=64,
                    help="samples per model call (default 64)")
    sm.add_argument("--process", default=None, choices=list(PROCESSES),
                    help="forward process of gmm or a user model (default vp: "
                         + PROCESSES["vp"][0] + "); the digits model is EDM")
    sm.add_argument("--prediction", default=None,
                    help="what the model predicts: " + ", ".join(PREDICTIONS)
                         + " (default epsilon)")
    sm.add_argument("--shape", default=None,
                    help="shape of one sample, e.g. 3,32,32 (user models without a "
                         "sample_shape attribute)")
    sm.add_argument("--dim", type=_positive_int, default=2,
                    help="dimension of the gmm model (default 2)")
    sm.add_argument("--model-seed", type=_nonneg_int, default=0,
                    help="seed of the gmm model's random mixture (default 0)")
    sm.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="state dtype (default float32)")
    sm.add_argument("--device", default="cpu", help="torch device (default cpu)")
    sm.add_argument("--backend", default=None, help=_BACKEND_HELP)
    sm.add_argument("--output", "-o", default=None,
                    help="write the samples: .pt (torch.save of the tensor), .npy, or .png "
                         "(an image grid, for image models); checked before sampling, written "
                         "to a temporary file and renamed")
    sm.add_argument("--distributed", action="store_true",
                    help="shard the samples over torchrun's ranks "
                         "(pyengine.distributed.sample_sharded); rank 0 writes the output")
    sm.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    sm.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    sm.set_defaults(func=cmd_sample)

    # -- tune --------------------------------------------------------------------------
    tn = sub.add_parser(
        "tune", help="fit a plan to a model and write it to a file",
        description="Fit the schedule, the model-evaluation times and the coefficients of a "
                    "solver's plan at a fixed NFE to a model (pyengine.tuning.tune): teacher "
                    "endpoints from a high-accuracy run, a train / validation split of the "
                    "noise, the best validation loss kept. The file samples with `pyengine "
                    "sample MODEL --plan FILE` or pe.Sampler.from_tuned.",
        epilog="example: pyengine tune digits --nfe 5 -o digits-nfe5.json && "
               "pyengine sample digits --plan digits-nfe5.json")
    tn.add_argument("model", nargs="?", default="digits",
                    help="digits (default), gmm, or module:attr (as for sample)")
    tn.add_argument("--nfe", type=_positive_int, required=True,
                    help="model evaluations of the tuned plan")
    tn.add_argument("--output", "-o", required=True, help="the plan file to write (.json)")
    tn.add_argument("--solver", default="dpmpp_2m",
                    help="base solver, deterministic (default dpmpp_2m)")
    tn.add_argument("--schedule", default="karras",
                    help="the schedule the fit starts from (default karras)")
    tn.add_argument("-n", "--num", dest="num", type=_positive_int, default=256,
                    help="noises to fit on, a quarter held out for validation (default 256)")
    tn.add_argument("--seed", type=_seed, default=1,
                    help="seed of the noise (Philox keys (seed, i), as sample's) and of the "
                         "split (default 1; sample's default seed 0 stays out of the fit)")
    tn.add_argument("--iters", type=_nonneg_int, default=300,
                    help="gradient iterations at most (default 300; early stopping on the "
                         "validation loss)")
    tn.add_argument("--batch", type=_positive_int, default=128,
                    help="samples per walk (bounds memory; default 128)")
    tn.add_argument("--loss", choices=("l2", "features"), default="l2",
                    help="endpoint distance: l2 (default) or, for digits, the digit "
                         "classifier's features")
    tn.add_argument("--schedule-only", action="store_true",
                    help="fit the schedule alone (no evaluation times or coefficients)")
    tn.add_argument("--method", choices=("full", "gits"), default="full",
                    help="full: pyengine.tuning.tune (default); gits: the schedule-only "
                         "baseline, a grid chosen by dynamic programming over a fine teacher "
                         "run (pyengine.tuning.gits), written as the base solver's plan")
    tn.add_argument("--process", default=None, choices=list(PROCESSES),
                    help="forward process of gmm or a user model (as for sample)")
    tn.add_argument("--prediction", default=None, help="what the model predicts (as for sample)")
    tn.add_argument("--shape", default=None, help="shape of one sample (as for sample)")
    tn.add_argument("--dim", type=_positive_int, default=2, help="dimension of gmm (default 2)")
    tn.add_argument("--model-seed", type=_nonneg_int, default=0,
                    help="seed of the gmm model's mixture (default 0)")
    tn.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    tn.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    tn.set_defaults(func=cmd_tune)

    # -- demo --------------------------------------------------------------------------
    dc = DemoConfig()
    d = sub.add_parser("demo", help="solver tables, digits samples and plots",
                       description="Every solver of the registry on the exact Gaussian "
                                   "mixture (error against the exact PF-ODE endpoint, time per "
                                   "step); the trained digits model per solver and NFE; and, "
                                   "with matplotlib, the plots, written as PNG to --out.")
    d.add_argument("--nfe", type=_positive_int, nargs="+", default=list(dc.nfe),
                   help="model-evaluation budgets, one column each (default: "
                        + " ".join(map(str, dc.nfe)) + ")")
    d.add_argument("--solvers", default="",
                   help="comma-separated solver names (default: every registered solver; the "
                        "digits section then shows " + ", ".join(i.name for i in featured())
                        + ")")
    d.add_argument("--process", choices=list(PROCESSES), default=dc.process,
                   help="forward process: a discrete VP with an epsilon model, edm with a "
                        f"denoiser, ... (default: {dc.process})")
    d.add_argument("--dim", type=_positive_int, default=dc.dim,
                   help=f"data dimension (default {dc.dim})")
    d.add_argument("--batch", type=_positive_int, default=dc.batch,
                   help=f"samples measured against the exact endpoint (default {dc.batch})")
    d.add_argument("--samples", type=_positive_int, default=dc.samples,
                   help=f"samples per stochastic solver for the moment error (default "
                        f"{dc.samples})")
    d.add_argument("--seed", type=_nonneg_int, default=dc.seed,
                   help="seed of the mixture and noise")
    d.add_argument("--backend", default=None, help=_BACKEND_HELP)
    d.add_argument("--threads", type=_positive_int, default=dc.threads,
                   help="torch threads (default 1: these tensors are tiny, so more threads "
                        "only add overhead)")
    d.add_argument("--out", default=dc.out, help=f"folder for the PNGs (default ./{dc.out})")
    d.add_argument("--digits-nfe", type=_positive_int, nargs="+", default=list(dc.digits_nfe),
                   help="NFE budgets of the digits section (default: "
                        + " ".join(map(str, dc.digits_nfe)) + ")")
    d.add_argument("--digits-samples", type=_positive_int, default=dc.digits_samples,
                   help=f"digits samples per solver and NFE for the scores (default "
                        f"{dc.digits_samples})")
    d.add_argument("--scatter-nfe", type=_positive_int, default=dc.scatter_nfe,
                   help=f"NFE of the 2-D scatter plot (default {dc.scatter_nfe})")
    d.add_argument("--no-digits", action="store_true", help="skip the digits model")
    d.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    d.add_argument("--tuning-nfe", type=_positive_int, nargs="+", default=list(dc.tuning_nfe),
                   help="NFE budgets of the fixed vs tuned table on the mixture (default: "
                        + " ".join(map(str, dc.tuning_nfe)) + ")")
    d.add_argument("--no-tuning", action="store_true",
                   help="skip the GITS and tuned plans (the digits table's last rows, the "
                        "fixed vs tuned table and plot on the mixture)")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    # -- bench -------------------------------------------------------------------------
    b = sub.add_parser("bench", help="benchmark tables: per-step solver time, fused kernel",
                       description="Per-step time of every solver's plan on the fused backend "
                                   "against the torch reference, with a free model; then "
                                   "bench/bench_fused_update.py (fused kernel vs unfused torch "
                                   "vs diffusers) when run from a source checkout.")
    b.add_argument("--suite", choices=("all", "solvers", "kernel"), default="all",
                   help="which tables (default all)")
    b.add_argument("--solvers", default="", help="comma-separated solver names (default all)")
    b.add_argument("--shape", default="4,4,64,64",
                   help="state shape of the solver table (default 4,4,64,64)")
    b.add_argument("--steps", type=_positive_int, default=10,
                   help="steps of each timed plan (default 10)")
    b.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    b.add_argument("--backend", default=None, help=_BACKEND_HELP)
    b.add_argument("--min-seconds", type=_positive_float, default=0.2,
                   help="time spent per measurement (default 0.2)")
    b.add_argument("--full", action="store_true",
                   help="the kernel benchmark's every shape (default: its --quick mode)")
    b.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    b.add_argument("--output", "-o", default=None, help="write the tables to a markdown file")
    b.add_argument("--plot", default=None, help="write a bar chart PNG (needs matplotlib)")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="versions, backends, native module and solvers")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("solvers", help="the solver registry as a table")
    s.add_argument("--markdown", action="store_true", help="print a markdown table")
    s.add_argument("--full", action="store_true",
                   help="describe each solver by its whole update formula")
    s.set_defaults(func=cmd_solvers)
    return p


def _schedules():
    from .schedules import SCHEDULES
    return SCHEDULES


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # --help (0) or a usage error (2, message printed)
        return int(e.code or 0)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"pyengine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyengine {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:           # the model's or a library's error: say what, exit 1
        if os.environ.get("PYENGINE_DEBUG"):
            raise
        kind = "" if isinstance(e, (ValueError, RuntimeError, OSError)) else \
            f"{type(e).__name__}: "
        print(f"pyengine {args.command}: error: {kind}{e} (PYENGINE_DEBUG=1 shows the "
              f"traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
