"""Benchmark helpers inside the package: the project's one timer, the per-step solver table
(``pyengine bench``, ``pyengine demo``) and the runner of the source checkout's kernel
benchmark (bench/bench_fused_update.py)."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["Timer", "solver_bench", "solver_bench_table", "kernel_bench_script",
           "run_kernel_bench"]


class Timer:
    """(median, p10, p90) in microseconds of repeated calls of ``fn``, after ``warmup`` calls:
    at least ``min_reps`` calls and ``min_seconds`` of timing, at most ``max_reps`` calls.
    On CUDA each call is timed with events; ``setup()`` runs untimed before each call."""

    def __init__(self, device: str = "cpu", min_reps: int = 5, min_seconds: float = 0.2,
                 warmup: int = 1, max_reps: int = 1000):
        self.cuda = str(device).startswith("cuda")
        self.min_reps, self.min_seconds = min_reps, min_seconds
        self.warmup, self.max_reps = warmup, max_reps

    def sync(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize()

    def __call__(self, fn, setup=None) -> tuple[float, float, float]:
        for _ in range(self.warmup):
            if setup:
                setup()
            fn()
        self.sync()
        times = []
        start = time.perf_counter()
        while len(times) < self.max_reps and (len(times) < self.min_reps
                                              or time.perf_counter() - start < self.min_seconds):
            if setup:
                setup()
            self.sync()
            if self.cuda:
                import torch
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        q = np.percentile(times, [10, 50, 90])
        return float(q[1]), float(q[0]), float(q[2])


def _fmt_t(t):
    return f"{t[0]:.0f} ({t[1]:.0f}-{t[2]:.0f})" if t[0] >= 10 else \
        f"{t[0]:.1f} ({t[1]:.1f}-{t[2]:.1f})"


def solver_bench(names, shape, steps: int, dtype, backend: str, min_seconds: float,
                 progress=None):
    """(copy GB/s, rows): each solver's whole plan per step on ``backend`` and on the torch
    reference, with a model that costs nothing (it returns a fixed tensor), so the time is the
    solver's: its fused updates, noise and the runtime's bookkeeping. ``progress(1)`` after
    each solver."""
    import torch

    from . import processes
    from .plan import Custom
    from .sampler import Sampler

    numel = math.prod(shape)
    esize = torch.tensor([], dtype=dtype).element_size()
    # The roofline: a copy of one state-sized buffer (read + write), timed in this run. At
    # the default 4x4x64x64 the buffers sit in cache, so this is the cache's bandwidth.
    src = torch.randn(shape).to(dtype)
    dst = torch.empty_like(src)
    t_copy = Timer(min_seconds=min(min_seconds, 0.2))(lambda: dst.copy_(src))
    copy_bw = 2 * numel * esize / (t_copy[0] * 1e-6) / 1e9
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=g).to(dtype)
    const = (0.1 * torch.randn(shape, generator=g)).to(dtype)

    def model(x, t):
        return const

    timer = Timer(min_seconds=min_seconds)
    proc = processes.named("vp")
    rows = []
    for name in names:
        s = Sampler(proc, solver=name, steps=steps, prediction="epsilon")
        nbytes = sum((len(op.bufs) + 1 + (op.aux_dst is not None)) * numel * esize
                     for op in s.plan.updates)
        fused = timer(lambda s=s: s.sample(model, noise, seed=0, backend=backend))
        ref = timer(lambda s=s: s.sample(model, noise, seed=0, backend="torch"))
        per = tuple(v / steps for v in fused)
        gbs = nbytes / steps / (per[0] * 1e-6) / 1e9
        custom = any(isinstance(op, Custom) for op in s.plan.ops)
        rows.append({"solver": name + (" *" if custom else ""), "nfe": s.nfe,
                     "per": per, "ref": tuple(v / steps for v in ref), "gbs": gbs,
                     "pct": 100 * gbs / copy_bw})
        if progress is not None:
            progress(1)
    return copy_bw, rows


def solver_bench_table(rows, shape, dtype, steps, backend, copy_bw) -> str:
    head = (f"| solver | NFE | {backend} us/step (p10-p90) | GB/s | % copy | torch us/step "
            f"| speedup |")
    caption = (f"Per-step time of each solver's plan, {steps} steps on "
               f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} states, with a "
               f"model that costs nothing; GB/s counts the bytes the fused updates must move; "
               f"% copy divides it by the bandwidth of copying one such state, measured in this "
               f"run: {copy_bw:.1f} GB/s. Speedup: the torch reference backend's time over "
               f"{backend}'s, same run.")
    lines = [caption, "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['nfe']} | {_fmt_t(r['per'])} | {r['gbs']:.1f} | "
                     f"{r['pct']:.0f}% | {_fmt_t(r['ref'])} | {r['ref'][0] / r['per'][0]:.1f}x |")
    if any(r["solver"].endswith(" *") for r in rows):
        lines += ["", ("*: the plan has a custom op (the Langevin corrector) whose bytes are "
                       "not counted in GB/s.")]
    return "\n".join(lines)


def kernel_bench_script() -> Path | None:
    """bench/bench_fused_update.py of a source checkout, if this package lives in one."""
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_fused_update.py"
    return path if path.is_file() else None


def run_kernel_bench(threads: int, full: bool = False, backend: str | None = None,
                     say=None) -> str:
    """The fused-update kernel benchmark of a source checkout, run as its own process; its
    final markdown report. ``say(text)`` is told the command first."""
    script = kernel_bench_script()
    if script is None:
        raise FileNotFoundError("bench/bench_fused_update.py is not here (a source checkout "
                                "has it)")
    cmd = [sys.executable, str(script), "--threads", str(threads)]
    cmd += [] if full else ["--quick"]
    if backend:
        cmd += ["--backend", backend]
    try:
        import diffusers  # noqa: F401
    except ImportError:
        cmd.append("--skip-diffusers")
    if say is not None:
        say(f"\nkernel benchmark: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    report = proc.stdout
    if "# fused update benchmark" in report:        # the final report, not the live rows
        report = report[report.index("# fused update benchmark"):]
    return report
