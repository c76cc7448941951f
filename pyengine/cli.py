"""The ``pyengine`` command line: ``demo``, ``info`` and ``solvers``.

``pyengine demo`` is the main job on the built-in Gaussian mixture: every deterministic solver
in the registry at a few NFE budgets, measured against the exact PF-ODE endpoint, with the
time per step; stochastic solvers are scored by how well their samples match the data's
moments. ``pyengine info`` shows the install (versions, backends, native module) and the
solvers; ``pyengine solvers --markdown`` prints the registry table the README carries.

Exit codes: 0 success, 1 runtime error, 2 usage error.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

__all__ = ["main"]


class CLIError(Exception):
    """A user error found after parsing (unknown solver name, ...): exit code 2."""


# ---------------------------------------------------------------------------------------
# solvers / info
# ---------------------------------------------------------------------------------------


def _short(summary: str) -> str:
    """The method and its source: a summary's text before the formula (first ': ')."""
    return summary.split(": ", 1)[0]


def _variants_text(info) -> str:
    """'label (order)' for each configuration with its own order, labels without the solver's
    name (``unipc_bh1_p2_c`` -> ``bh1_p2_c``); '' for a solver with a single configuration."""
    if not info.variants:
        return ""
    out = []
    for label, _, order, _ in info.configurations():
        short = label[len(info.name):] if label.startswith(info.name) else label
        short = short.strip("_[]") or "default"
        out.append(f"{short} ({order})")
    return ", ".join(out)


def solvers_table(markdown: bool = True, full: bool = False) -> str:
    """The registry as a table: name, order, NFE per step, stochastic, family, description
    (method and source, or the whole update formula with ``full``), configurations."""
    from .solvers import list_solvers

    head = ("solver", "order", "NFE/step", "stochastic", "family", "method",
            "configurations (order)")
    rows = []
    for info in list_solvers():
        text = info.summary if full else _short(info.summary)
        row = [info.name, str(info.order), str(info.nfe_per_step),
               "yes" if info.stochastic else "no", info.family, text, _variants_text(info)]
        if markdown:
            row = [c.replace("|", "\\|") for c in row]
            row[0] = f"`{row[0]}`"
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join([fmt.format(*head)] + [fmt.format(*r).rstrip() for r in rows])


def cmd_solvers(args) -> int:
    print(solvers_table(markdown=args.markdown, full=args.full))
    return 0


def cmd_info(args) -> int:
    import numpy
    import scipy
    import torch

    from . import __version__, backends

    print(f"pyengine {__version__}")
    cuda = torch.version.cuda or "none (CPU build)"
    print(f"torch {torch.__version__} (CUDA {cuda}; device available: "
          f"{'cuda' if torch.cuda.is_available() else 'cpu only'}), numpy {numpy.__version__}, "
          f"scipy {scipy.__version__}")
    try:
        from . import _C  # noqa: F401
        native = "built"
    except ImportError as e:
        native = f"not built ({e})"
    print(f"native module pyengine._C: {native}")
    print(f"backends available: {', '.join(backends.available())}")
    explain = getattr(backends, "explain", None)
    if explain is not None:
        for name, why in explain().items():
            print(f"  {name}: {'runs on cpu' if why is None else why}")
    forced = os.environ.get("PYENGINE_BACKEND")
    status = 0
    try:
        chosen = backends.get()
        name = getattr(chosen, "name", str(chosen))
        why = f"forced by PYENGINE_BACKEND={forced}" if forced else "highest priority available"
        print(f"default backend: {name} ({why})")
    except ValueError as e:
        print(f"default backend: error: {e}")
        status = 1
    print()
    print(solvers_table(markdown=False))
    return status


# ---------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------


def _steps_for_nfe(process, name, nfe, schedule):
    """The step count whose plan makes the number of model calls closest to ``nfe``."""
    from .sampler import Sampler
    from .solvers import get

    per = get(name).nfe_per_step
    guess = max(1, round(nfe / per))
    best = None
    for steps in sorted({max(1, guess - 1), guess, guess + 1}):
        s = Sampler(process, solver=name, steps=steps, schedule=schedule)
        key = (abs(s.nfe - nfe), s.nfe > nfe)
        if best is None or key < best[0]:
            best = (key, steps, s.nfe)
    return best[1], best[2]


def _moments(x):
    import torch
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    m = x.mean(0)
    c = (x - m).T @ (x - m) / (x.shape[0] - 1)
    return m, c


def _moment_error(x, mean, cov):
    m, c = _moments(x)
    return max(float((m - mean).abs().max()), float((c - cov).abs().max()))


def _fmt_err(e):
    return f"{e:.1e}" if math.isfinite(e) else "diverged"


def cmd_demo(args) -> int:
    import torch

    from . import processes
    from .models import GaussianMixture
    from .sampler import Sampler
    from .solvers import get, list_solvers

    torch.set_num_threads(args.threads)
    if args.solvers:
        names = [n.strip() for n in args.solvers.split(",") if n.strip()]
        for n in names:
            try:
                get(n)
            except ValueError as e:
                raise CLIError(str(e)) from None
        infos = [get(n) for n in names]
    else:
        infos = list_solvers()
    skipped = [i.name for i in infos if i.family == "inversion"]
    det = [i for i in infos if not i.stochastic and i.family != "inversion"]
    sto = [i for i in infos if i.stochastic]

    gmm = GaussianMixture.random(d=args.dim, M=4, seed=args.seed)
    if args.process == "vp":
        proc = processes.VP.discrete("linear")
        prediction, proc_text = "epsilon", "VP discrete (linear betas, 1000 steps), epsilon model"
    else:
        proc = processes.EDM()
        prediction, proc_text = "sample", "EDM, x0 (denoiser) model"
    model = gmm.as_model(proc, prediction)
    schedule = "karras"
    nfes = args.nfe

    from . import backends
    try:
        backend = backends.get(args.backend).name
    except ValueError as e:
        raise CLIError(str(e)) from None

    print(f"pyengine demo: Gaussian mixture, d={args.dim}, 4 components; {proc_text}; "
          f"{schedule} schedule from sigma {proc.sigma_max:.4g} to 0; float64; {backend} "
          f"backend, {args.threads} thread(s)")

    # Exact PF-ODE endpoint of the noise, from the first level of the grid to sigma 0.
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.batch, args.dim, generator=g, dtype=torch.float64)
    sigma0 = proc.sigma_max
    x_hat0 = noise * (float(proc.prior_std(sigma0)) / float(proc.s_of_sigma(sigma0)))
    t0 = time.perf_counter()
    exact = gmm.ode_endpoint(x_hat0, sigma0, 0.0)
    print(f"exact endpoint: scipy DOP853, rtol 1e-10, {time.perf_counter() - t0:.1f} s")

    def run(info, nfe, x, seed=0):
        steps, actual = _steps_for_nfe(proc, info.name, nfe, schedule)
        s = Sampler(proc, solver=info.name, steps=steps, schedule=schedule,
                    prediction=prediction, backend=backend)
        s.sample(model, x[:1], seed=seed)                       # warm-up
        t = time.perf_counter()
        out = s.sample(model, x, seed=seed)
        return out, actual, (time.perf_counter() - t) / steps

    header = ["solver", "order"] + [f"NFE {n}" for n in nfes] + ["ms/step"]
    sep = "|" + "---|" * len(header)
    note_nfe = False
    if det:
        print()
        print(f"Deterministic solvers: max |x - x_exact| over {args.batch} samples "
              f"(exact PF-ODE endpoint at sigma 0); ms/step at NFE {nfes[-1]}, batch "
              f"{args.batch}.")
        print()
        print("| " + " | ".join(header) + " |")
        print(sep)
        for info in det:
            cells, per_step = [], float("nan")
            for nfe in nfes:
                out, actual, per_step = run(info, nfe, noise)
                err = float((out - exact).abs().max())
                cell = _fmt_err(err)
                if actual != nfe:
                    cell += f" @{actual}"
                    note_nfe = True
                cells.append(cell)
            print(f"| {info.name} | {info.order} | " + " | ".join(cells)
                  + f" | {1e3 * per_step:.2f} |", flush=True)
    if sto:
        n = args.samples
        gd = torch.Generator().manual_seed(args.seed + 1)
        mean = (gmm.weights[:, None] * gmm.means).sum(0)
        second = (gmm.weights[:, None, None]
                  * (gmm.covs + gmm.means[:, :, None] * gmm.means[:, None, :])).sum(0)
        cov = second - mean[:, None] * mean[None, :]
        floor = _moment_error(gmm.sample(n, generator=gd), mean, cov)
        big = torch.randn(n, args.dim, generator=gd, dtype=torch.float64)
        print()
        print(f"Stochastic solvers: max error of the mean and covariance of {n} samples "
              f"against the data's exact moments; {n} exact data samples score {floor:.1e} "
              f"(the Monte-Carlo floor). ms/step at NFE {nfes[-1]}, batch {n}.")
        print()
        print("| " + " | ".join(header) + " |")
        print(sep)
        for info in sto:
            cells, per_step = [], float("nan")
            for nfe in nfes:
                out, actual, per_step = run(info, nfe, big, seed=args.seed)
                cell = _fmt_err(_moment_error(out, mean, cov))
                if actual != nfe:
                    cell += f" @{actual}"
                    note_nfe = True
                cells.append(cell)
            print(f"| {info.name} | {info.order} | " + " | ".join(cells)
                  + f" | {1e3 * per_step:.2f} |", flush=True)
    print()
    if note_nfe:
        print("@n: the step count closest to the NFE budget makes n model calls (e.g. Heun's "
              "last step to sigma 0 is a single Euler call).")
    if skipped:
        print(f"Not shown: {', '.join(skipped)} (inversion: data to noise).")
    return 0


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyengine",
        description="pyengine: a compiled sampling engine for diffusion models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="solver x NFE table on the built-in Gaussian mixture",
                       description="Every solver of the registry on the exact Gaussian "
                                   "mixture: error against the exact PF-ODE endpoint and "
                                   "time per step.")
    d.add_argument("--nfe", type=_positive_int, nargs="+", default=[10, 20, 40],
                   help="model-evaluation budgets, one column each (default: 10 20 40)")
    d.add_argument("--solvers", default="",
                   help="comma-separated solver names (default: every registered solver)")
    d.add_argument("--process", choices=("vp", "edm"), default="vp",
                   help="forward process: VP discrete with an epsilon model, or EDM with a "
                        "denoiser (default: vp)")
    d.add_argument("--dim", type=_positive_int, default=16, help="data dimension (default 16)")
    d.add_argument("--batch", type=_positive_int, default=8,
                   help="samples measured against the exact endpoint (default 8)")
    d.add_argument("--samples", type=_positive_int, default=512,
                   help="samples per stochastic solver for the moment error (default 512)")
    d.add_argument("--seed", type=int, default=0, help="seed of the mixture and noise")
    d.add_argument("--backend", default=None,
                   help="fused-update backend (default: $PYENGINE_BACKEND, else the best "
                        "available; see `pyengine info`)")
    d.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads (default 1: these tensors are tiny, so more threads "
                        "only add overhead)")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="versions, backends, native module and solvers")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("solvers", help="the solver registry as a table")
    s.add_argument("--markdown", action="store_true", help="print a markdown table")
    s.add_argument("--full", action="store_true",
                   help="describe each solver by its whole update formula")
    s.set_defaults(func=cmd_solvers)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # --help (0) or a usage error (2, message printed)
        return int(e.code or 0)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"pyengine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as e:
        print(f"pyengine {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
