"""Benchmark of the fused update: the native kernel vs the same update as unfused torch ops vs
diffusers' ``scheduler.step``, all measured in one run (these machines are noisy), with the
device's copy bandwidth (a large tensor copy, timed in the same run) as the roofline.

    python bench/bench_fused_update.py                       # CPU: the cpp backend
    python bench/bench_fused_update.py --device cuda         # GPU: the cuda backend
    python bench/bench_fused_update.py --out bench/results/  # also write the markdown table
    python bench/bench_fused_update.py --compare none        # without the second backend

A second backend is timed beside the default one on the same inputs (``--compare``; default:
numba on CPU, triton on CUDA), with the ratio of its median to the default backend's; calls
it cannot run (numba: no bfloat16) show "-".

Updates are the real ones: each row takes one Update op from pyengine's own plan of that
solver (20 steps, a middle step) with its K buffers, coefficients, aux output and noise draw:
DDIM and Euler (K=2), Heun's predictor (K=2) and corrector (K=3), DPM-Solver++(2M) (K=3 plus
the x0 history as aux), and an SDE step with noise (Euler ancestral: K=2 + Philox noise).

* fused: ``backend.fused_update`` (the direct call) into preallocated outputs;
* unfused torch: the torch reference backend (one torch op per term, float32 arithmetic),
  with the noise drawn by ``torch.randn`` (what a torch loop does; pyengine's Philox in torch
  ops would be far slower);
* diffusers: ``scheduler.step`` of the matching scheduler at the same point of a 20-step
  schedule, its internal state rewound before each call.

GB/s counts the bytes the update must move (K reads and 1 or 2 writes in the storage dtype);
% copy divides by the copy bandwidth; the speedups are diffusers' and unfused torch's time
over the fused time. Timings: median and the 10th-90th percentile range of repeated calls.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import pyengine as pe  # noqa: E402
from pyengine.benchmark import Timer as _ProjectTimer  # noqa: E402
from pyengine import backends  # noqa: E402
from pyengine.backends import dispatch, torch_ref  # noqa: E402
from pyengine.noise import seeds_tensor  # noqa: E402
from reference import fused_update_reference  # noqa: E402

SHAPES = [(1, 4, 64, 64), (16, 4, 128, 128), (64, 16, 64, 64)]
DTYPES = [torch.float32, torch.bfloat16]
STEPS, AT = 20, 10                     # plan length and the step whose update is timed

# (label, pyengine solver, which update of step AT, diffusers scheduler class name)
UPDATES = [
    ("DDIM", "ddim", 0, "DDIMScheduler"),
    ("Euler", "euler", 0, "EulerDiscreteScheduler"),
    ("Heun stage 1", "heun", 0, "HeunDiscreteScheduler"),
    ("Heun stage 2", "heun", 1, "HeunDiscreteScheduler"),
    ("DPM-Solver++(2M)", "dpmpp_2m", 0, "DPMSolverMultistepScheduler"),
    ("SDE (Euler ancestral)", "euler_ancestral", 0, "EulerAncestralDiscreteScheduler"),
]


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------


class Timer(_ProjectTimer):
    """The project's one timer (:class:`pyengine.benchmark.Timer`) with this benchmark's
    settings: 3 warm-up calls, at most 2000 timed calls."""

    def __init__(self, device: str, min_reps: int, min_seconds: float):
        super().__init__(device, min_reps=min_reps, min_seconds=min_seconds, warmup=3,
                         max_reps=2000)


def copy_bandwidth(timer: Timer, device: str) -> tuple[float, dict]:
    """GB/s of a large copy (read + write), far beyond the last-level cache: the best of
    torch's copy_ and, on CPU, numpy's (glibc memcpy, whose non-temporal stores skip the
    read-for-ownership that torch's plain stores pay)."""
    n = (256 << 20) // 4 if device == "cuda" else (128 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    each = {"torch copy_": timer(lambda: dst.copy_(src))[0]}
    if device == "cpu":
        a, b = src.numpy(), dst.numpy()
        each["numpy copyto"] = timer(lambda: np.copyto(b, a))[0]
    gbs = {k: 2 * n * 4 / (t * 1e-6) / 1e9 for k, t in each.items()}
    return max(gbs.values()), gbs


# ---------------------------------------------------------------------------------------
# the updates
# ---------------------------------------------------------------------------------------


def plan_update(solver: str, which: int):
    proc = pe.processes.VP.discrete("scaled_linear")
    plan = pe.Sampler(proc, solver=solver, steps=STEPS).plan
    ups = [op for op in plan.updates if op.step == AT]
    return ups[which]


def diffusers_step(cls_name: str, which: int, shape, dtype, device, gen):
    """A zero-argument callable running scheduler.step once at step AT, and its setup."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()

    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
               beta_schedule="scaled_linear")
    sch = getattr(diffusers, cls_name)(**cfg)
    sch.set_timesteps(STEPS, device=device)
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device, dtype)
    out = torch.randn(shape, generator=gen, dtype=torch.float32).to(device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    kw = {"generator": g} if cls_name == "EulerAncestralDiscreteScheduler" else {}
    ts = sch.timesteps
    if cls_name == "HeunDiscreteScheduler":
        idx = 2 * AT + which            # Heun's timesteps repeat: two entries per step
        for i in range(idx):            # walk the state up to the stage to time
            sch.step(out, ts[i], x)
        saved = dict(sch.__dict__)

        def setup():
            sch.__dict__.update(saved)
        return (lambda: sch.step(out, ts[idx], x, **kw)), setup
    for i in range(AT):                 # history for the multistep solvers
        sch.step(out, ts[i], x, **kw)
    saved_index = getattr(sch, "_step_index", None)

    def setup():
        if saved_index is not None:
            sch._step_index = saved_index
    return (lambda: sch.step(out, ts[AT], x, **kw)), setup


def run(args):
    device = args.device
    be = backends.get(device=device) if not args.backend else backends.get(args.backend)
    extras = compared_backends(args, be.name)
    print(header([n for n, _ in extras], be.name))
    torch.manual_seed(0)
    timer = Timer(device, args.min_reps, args.min_seconds)
    copy_bw, copies = copy_bandwidth(timer, device)
    print("copy bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in copies.items()))
    rows = []
    overhead = call_overhead(timer, be, device)
    for label, solver, which, cls_name in UPDATES:
        op = plan_update(solver, which)
        for shape in SHAPES:
            for dtype in DTYPES:
                if args.quick and shape != SHAPES[1]:
                    continue
                rows.append(bench_one(timer, be, device, label, op, cls_name, which, shape,
                                      dtype, copy_bw, args.skip_diffusers, extras))
                print(fmt_row(rows[-1]), flush=True)
    return (copy_bw, copies), rows, overhead, be.name


def compared_backends(args, main_name):
    """[(name, module)] of the --compare backends that can run on this device."""
    names = args.compare if args.compare is not None else \
        {"cpu": "numba", "cuda": "triton"}[args.device]
    out = []
    for name in [n for n in names.split(",") if n and n != "none" and n != main_name]:
        why = dispatch.unavailable_reason(name, args.device)
        if why is not None:
            print(f"not comparing {name}: {why}")
            continue
        out.append((name, dispatch.resolve(dispatch.REGISTRY[name])))
    return out


def bench_one(timer, be, device, label, op, cls_name, which, shape, dtype, copy_bw,
              skip_diffusers, extras=()):
    gen = torch.Generator().manual_seed(1)
    bufs = [torch.randn(shape, generator=gen).to(device, dtype) for _ in op.bufs]
    out = torch.empty(shape, device=device, dtype=dtype)
    aux = torch.empty_like(out) if op.aux_dst is not None else None
    noisy = op.noise_index >= 0
    seeds = seeds_tensor(0, shape[0]).to(device) if noisy else None
    nc = op.noise if noisy else 0.0

    def fused():
        be.fused_update(out, bufs, op.coefs, nc, seeds, op.noise_index, aux, op.aux_coefs)

    # correctness first: against the float64 reference fed the same-noise stream
    fused()
    z = None
    if noisy:
        z = torch.empty(shape, device=device)
        be.fused_update(z, [torch.zeros_like(z)], [0.0], 1.0, seeds, op.noise_index)
    want, _ = fused_update_reference([b.double() for b in bufs], op.coefs, nc, seeds,
                                     op.noise_index, noise=z)
    rel = ((out.double() - want).abs().max() / want.abs().max()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), f"{label} {shape}: error {rel}"

    def unfused():
        noise = torch.randn(shape, device=device, dtype=torch.float32) if noisy else None
        torch_ref.fused_update(out, bufs, op.coefs, nc, seeds, op.noise_index, aux,
                               op.aux_coefs, noise=noise)

    t_fused = timer(fused)
    t_extra = {}
    for name, other in extras:
        if dispatch.reasons(name, dispatch.Call.of(out, bufs, aux)):
            t_extra[name] = None                     # e.g. numba and bfloat16
            continue

        def fused_other(other=other):
            other.fused_update(out, bufs, op.coefs, nc, seeds, op.noise_index, aux,
                               op.aux_coefs)
        fused_other()
        rel_o = ((out.double() - want).abs().max() / want.abs().max()).item()
        assert rel_o < (1e-5 if dtype == torch.float32 else 1e-2), f"{name} {label}: {rel_o}"
        t_extra[name] = timer(fused_other)
    t_unfused = timer(unfused)
    t_diff = None
    if not skip_diffusers:
        step, setup = diffusers_step(cls_name, which, shape, dtype, device, gen)
        t_diff = timer(step, setup)
    esize = torch.tensor([], dtype=dtype).element_size()
    nbytes = (len(bufs) + 1 + (aux is not None)) * out.numel() * esize
    gbs = nbytes / (t_fused[0] * 1e-6) / 1e9
    return dict(update=f"{label} (K={len(bufs)}{', aux' if aux is not None else ''}"
                       f"{', noise' if noisy else ''})",
                shape=shape, dtype=str(dtype).replace("torch.", ""), fused=t_fused,
                unfused=t_unfused, diffusers=t_diff, gbs=gbs, pct=100 * gbs / copy_bw,
                extra=t_extra)


def call_overhead(timer, be, device):
    """us per call at a tiny size: the direct call (validated, and trusted as the executor's
    steady state runs it), the torch.library op, the torch backend."""
    from pyengine import ops

    x = torch.randn(1, 4, 8, 8, device=device)
    e = torch.randn_like(x)
    out = torch.empty_like(x)
    coefs = np.array([0.9, 0.1])
    res = {}
    res["direct"] = timer(lambda: be.fused_update(out, [x, e], coefs))[0]
    if "trusted" in inspect.signature(be.fused_update).parameters:
        res["direct, trusted"] = timer(lambda: be.fused_update(out, [x, e], coefs,
                                                               trusted=True))[0]
    res["torch.ops"] = timer(lambda: ops.fused_update(out, [x, e], coefs))[0]
    res["torch backend"] = timer(lambda: torch_ref.fused_update(out, [x, e], coefs))[0]
    return res


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------

HEADER = ("| update | shape | dtype | fused us (p10-p90) | GB/s | % copy | unfused torch us "
          "| diffusers us | vs diffusers | vs unfused |")


def header(extras=(), main="fused"):
    """HEADER plus, per compared backend, its time and its time over the default's."""
    return HEADER + "".join(f" {n} us (p10-p90) | {n} / {main} |" for n in extras)


def _t(t):
    return f"{t[0]:.0f} ({t[1]:.0f}-{t[2]:.0f})" if t[0] >= 10 else \
        f"{t[0]:.1f} ({t[1]:.1f}-{t[2]:.1f})"


def fmt_row(r):
    d = r["diffusers"]
    return (f"| {r['update']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | "
            f"{_t(r['fused'])} | {r['gbs']:.1f} | {r['pct']:.0f}% | {_t(r['unfused'])} | "
            f"{_t(d) if d else '-'} | {(d[0] / r['fused'][0]) if d else float('nan'):.1f}x | "
            f"{r['unfused'][0] / r['fused'][0]:.1f}x |"
            + "".join(f" {_t(t)} | {t[0] / r['fused'][0]:.2f} |" if t else " - | - |"
                      for t in r.get("extra", {}).values()))


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(args, copy, rows, overhead, be_name):
    from pyengine.fused_update import native as _native

    name = device_name(args.device)
    isa = _native._C.cpu_isa() if _native._C is not None and args.device == "cpu" else "-"
    lines = [
        f"# fused update benchmark: {name}, {datetime.date.today().isoformat()}",
        "",
        f"- device: {name} ({args.device}; {os.cpu_count()} logical CPUs), backend "
        f"`{be_name}`" + (f", CPU kernel build `{isa}`" if args.device == "cpu" else ""),
        f"- threads: {torch.get_num_threads()} (torch and the kernel alike"
        + ("; the machine is shared, and a second thread that must wait for a busy core "
           "costs a scheduler slice" if args.device == "cpu" and args.threads == 1 else "")
        + ")",
        f"- pyengine {pe.__version__}, torch {torch.__version__}, numpy {np.__version__}"
        + _diffusers_version(),
        f"- copy bandwidth (a {'256' if args.device == 'cuda' else '128'} MiB float32 copy, "
        f"read + write; the best of "
        + ", ".join(f"{k} {v:.1f}" for k, v in copy[1].items()) + f"): **{copy[0]:.1f} GB/s**",
        f"- call overhead at 1x4x8x8 (us): direct {overhead['direct']:.1f}"
        + (f" (trusted: {overhead['direct, trusted']:.1f})" if "direct, trusted" in overhead
           else "") + f", torch.ops "
        f"{overhead['torch.ops']:.1f}, torch backend {overhead['torch backend']:.1f}",
        f"- command: `python bench/bench_fused_update.py {' '.join(sys.argv[1:])}`",
    ] + ([
        f"- compared: {', '.join(rows[0]['extra'])} on the same inputs, same threads; "
        f"`<name> / {be_name}` is its median over the default backend's (above 1: slower); "
        f"'-' where it cannot run the call (numba: float32/float64 only)",
    ] if rows and rows[0].get("extra") else []) + [
        "",
        "fused: the backend's direct call into preallocated outputs; unfused torch: the torch "
        "reference backend (one op per term) with torch.randn noise; diffusers: "
        "`scheduler.step` at the same step of a 20-step schedule. GB/s: the bytes the update "
        "must move (K reads, 1 or 2 writes) over the fused median; % copy: of the copy "
        "bandwidth above; vs: the other implementation's median over the fused median. "
        "Times: median (10th-90th percentile) in us.",
        "",
        header(rows[0].get("extra", {}) if rows else (), be_name),
        "|" + "---|" * (header(rows[0].get("extra", {}) if rows else ()).count("|") - 1),
    ]
    lines += [fmt_row(r) for r in rows]
    return "\n".join(lines) + "\n"


def _diffusers_version():
    try:
        import diffusers
        return f", diffusers {diffusers.__version__}"
    except ImportError:
        return ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default=None, help="force a backend (default: the best)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and kernel threads on CPU (default 1: the machine is shared)")
    p.add_argument("--min-reps", type=int, default=15)
    p.add_argument("--min-seconds", type=float, default=0.3)
    p.add_argument("--quick", action="store_true", help="only the 16x4x128x128 latents")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--out", default=None, help="folder for the markdown table")
    p.add_argument("--compare", default=None,
                   help="backends timed beside the default one, comma-separated, or 'none' "
                        "(default: numba on cpu, triton on cuda)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    copy_bw, rows, overhead, be_name = run(args)
    text = report(args, copy_bw, rows, overhead, be_name)
    print()
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in device_name(args.device)).strip("-")
        path = out / f"fused_update_{args.device}_{slug}_{datetime.date.today().isoformat()}.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
