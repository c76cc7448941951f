"""End-to-end sampling benchmark: pyengine against diffusers and torch.compile, every number
measured in one run on one device and reported as a ratio (DESIGN.md s.10).

    python bench/bench_sampling.py --device cuda --out bench/results/
    python bench/bench_sampling.py --device cpu --quick --out /tmp/r      # CI's smoke size
    python bench/bench_sampling.py --device cuda --sections 3             # one section

1. **One solver step** (DDIM, Euler, DPM-Solver++(2M), UniPC) at B = 1, 8, 64 latents
   4x128x128, float32 and bfloat16. pyengine: the Update ops between two model calls of the
   plan that ``from_diffusers(scheduler)`` builds, run by the executor's walker
   (``Walker.run_segment`` on the dispatcher's default backend, reusing its own outputs),
   with the coefficients the compiled loop reads from its device table, and beside it with
   the host coefficients the eager loop passes. diffusers: ``scheduler.step`` with its state
   rewound before each call. Both sides are first walked to step 10 of a 20-step schedule on
   the same random model outputs, and the step's results are compared (so the benchmark
   times the same step on the same state). GB/s counts the bytes the fused step must move
   ((K reads + 1 or 2 writes) * numel * itemsize per update); % copy divides by the copy
   bandwidth measured in the same run.
2. **A 50-step loop with a trivial model** (out = x / 2), latents B x 4 x 128 x 128 float32:
   pyengine's eager loop (``Sampler.sample``), its captured graph (``Sampler.compile``) and
   diffusers' loop (set_timesteps; for t: model, scheduler.step), per step, against the
   bandwidth floor: the bytes one step must move (the model's read and write, the update's
   reads and writes) over the copy bandwidth.
3. **End to end with the DDPM CIFAR-10 UNet** (google/ddpm-cifar10-32's configuration, random
   seeded weights), 50 DDIM steps, B = 1 and 64: (a) diffusers-style eager loop (UNet +
   DDIMScheduler.step), (b) ``torch.compile(unet, mode="reduce-overhead")`` with the diffusers
   scheduler, (c) pyengine's captured graph, (d) pyengine's eager loop; ms per batch and the
   speedup over (a).

``--quick`` shrinks everything to smoke-test sizes (latents 4x16x16, B = 1, 2, 3-step loops,
the UNet at B = 1 for 2 steps). On CPU there is no graph to capture: ``Sampler.compile`` runs
the eager loop there, and the table says so; torch.compile's reduce-overhead mode is CUDA
graphs, so (b) is not run on CPU. The markdown table is rewritten after every row, so a run
cut short by a timeout still leaves what it measured. Exit status 1 when a pyengine variant
failed or a float32 step disagreed with diffusers.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_fused_update as bfu  # noqa: E402  (Timer, copy bandwidth, device name)

import pyengine as pe  # noqa: E402
from pyengine import backends  # noqa: E402
from pyengine.noise import seeds_tensor  # noqa: E402
from pyengine.plan import Update  # noqa: E402
from pyengine.benchmark import Timer  # noqa: E402
from pyengine.runtime import DeviceTables, PhiloxDraws, Program, Walker  # noqa: E402

# -- what is benchmarked ------------------------------------------------------------------

#: Stable Diffusion's betas: the 4-channel latents of sections 1 and 2 are its latents.
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear")

#: (label, diffusers scheduler class, its config beyond the betas, pyengine solver). DDIM
#: without clip_sample: its clamp of x0_hat is a custom op (one extra pass) on both sides, and
#: this section times the fused linear step itself.
STEP_CASES = [
    ("DDIM", "DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False), "ddim"),
    ("Euler", "EulerDiscreteScheduler", {}, "euler"),
    ("DPM-Solver++(2M)", "DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
    ("UniPC", "UniPCMultistepScheduler", {}, "unipc"),
]
LOOP_CASES = [STEP_CASES[0], STEP_CASES[2]]
STEP_STEPS, STEP_AT = 20, 10        # section 1: a 20-step schedule, the step after 10 of them
STEP_TOL = 1e-5                     # float32 agreement of the two steps (max|a-b| / max|b|)

#: google/ddpm-cifar10-32, unet/config.json (diffusers UNet2DModel, 35.7M parameters): the
#: attention sits at 16x16, in the second down block and the third up block.
CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, act_fn="silu",
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1,
    time_embedding_type="positional", center_input_sample=False, dropout=0.0)
#: its scheduler_config.json (DDPM, linear betas), run here as DDIM without clip_sample.
CIFAR10_BETAS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                     beta_schedule="linear")


class Sizes:
    """Batch sizes, shapes, step counts and repeats for one run."""

    def __init__(self, device: str, quick: bool):
        cuda = device == "cuda"
        self.latent = (4, 16, 16) if quick else (4, 128, 128)
        self.step_batches = (1, 2) if quick else (1, 8, 64)
        self.loop_batches = (1, 2) if quick else (1, 8, 64)
        self.loop_steps = 3 if quick else 50
        # The UNet on CPU: about 0.5 s per B = 1 call on one core, so one batch size only.
        self.unet_batches = (1,) if quick or not cuda else (1, 64)
        self.unet_steps = 2 if quick else 50
        if cuda:
            self.timer = dict(min_reps=20, min_seconds=0.1)
            self.loop_reps, self.loop_warmup = 10, 2
            self.unet_reps, self.unet_warmup = 5, 1
        elif quick:
            self.timer = dict(min_reps=5, min_seconds=0.0)
            self.loop_reps, self.loop_warmup = 3, 1
            self.unet_reps, self.unet_warmup = 1, 0
        else:
            self.timer = dict(min_reps=15, min_seconds=0.2)
            self.loop_reps, self.loop_warmup = 5, 1
            self.unet_reps, self.unet_warmup = 3, 1


# -- environment ---------------------------------------------------------------------------


def load_diffusers(skip: bool):
    """(the diffusers module or None, why it is missing)."""
    if skip:
        return None, "--skip-diffusers"
    try:
        import diffusers
    except ImportError:
        return None, "diffusers not installed"
    diffusers.utils.logging.set_verbosity_error()
    return diffusers, None


def cache_bytes(device: str) -> int | None:
    """The last-level cache: the GPU's L2, or the CPU's largest cache level."""
    if device == "cuda":
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", None)
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * mult)
    return max(sizes) if sizes else None


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_runs(fn, device: str, warmup: int, reps: int) -> tuple[float, float, float]:
    """(median, p10, p90) in us of ``reps`` whole calls of fn (long ones: loops), with the
    project's one timer (:class:`pyengine.benchmark.Timer`: CUDA events on the GPU, which
    span the host's enqueueing too when the host is the bottleneck; perf_counter on the
    CPU)."""
    reps = max(1, reps)
    return Timer(device, min_reps=reps, min_seconds=0.0, warmup=warmup, max_reps=reps)(fn)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def short_error(exc: BaseException) -> str:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = line.replace("|", "/")
    return f"{type(exc).__name__}: {line[:140]}" if line else type(exc).__name__


# -- samplers ------------------------------------------------------------------------------


def make_scheduler(diffusers, case, betas):
    _, cls_name, extra, _ = case
    return getattr(diffusers, cls_name)(**betas, **extra)


def make_sampler(diffusers, case, steps: int, betas: dict):
    """(sampler, scheduler or None): ``from_diffusers(scheduler)`` when diffusers is here, so
    both sides walk the same grid; else pyengine's own sampler of the same solver on the
    same betas (leading spacing), whose updates read and write as many buffers."""
    if diffusers is not None:
        from pyengine.integrations.diffusers import from_diffusers

        sch = make_scheduler(diffusers, case, betas)
        return from_diffusers(sch, steps), sch
    proc = pe.processes.VP.discrete(betas["beta_schedule"], beta_start=betas["beta_start"],
                                    beta_end=betas["beta_end"],
                                    num_train_timesteps=betas["num_train_timesteps"])
    return pe.Sampler(proc, solver=case[3], steps=steps, schedule="leading"), None


def update_bytes(op: Update, numel: int, itemsize: int) -> int:
    """The bytes one fused update must move: K reads, 1 or 2 writes."""
    return (len(op.bufs) + 1 + (op.aux_dst is not None)) * numel * itemsize


def _snapshot(sch) -> dict:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(sch).items()}


def _restore(sch, saved: dict) -> None:
    for k, v in saved.items():
        setattr(sch, k, list(v) if isinstance(v, list) else v)


class StepCase:
    """One solver step, both implementations at the same point of the same run.

    ``pyengine()`` runs the fused update(s) of step ``at`` as the compiled loop issues them
    (coefficients read from the plan's device table, ``pyengine.runtime.DeviceTables``: what
    a captured graph replays) and returns the next state; ``pyengine_eager()`` issues them as
    ``Sampler.sample`` does (the plan's float64 host coefficients). ``diffusers()`` (with
    ``rewind()`` before it) runs ``scheduler.step`` and returns its ``prev_sample``, in the
    scheduler's space: ``to_pe`` times it is pyengine's state (s(sigma) for the Euler-type
    schedulers, which keep x / s; 1 otherwise). ``bytes`` is what the fused step moves; ``rw``
    its reads/writes per update."""

    def __init__(self, diffusers, case, shape, dtype, device, steps=STEP_STEPS, at=STEP_AT,
                 seed=0):
        sampler, scheduler = make_sampler(diffusers, case, steps, SD_BETAS)
        self.label, self.backend = case[0], backends.get(device=device, dtype=dtype)
        gen = torch.Generator().manual_seed(seed)

        def randn():
            return torch.randn(shape, generator=gen).to(device, dtype)

        plan = sampler.plan
        program = Program(plan)
        if program.prologue:
            raise NotImplementedError(f"bench: {case[0]} updates the state before its first "
                                      f"model call")
        segs = program.segments
        if not 0 <= at < len(segs):
            raise ValueError(f"step {at} is not in the {len(segs)}-call plan")
        be = self.backend
        seeds = seeds_tensor(seed, shape[0]).to(device) if plan.n_noise else None
        noise = randn()
        outs = [randn() for _ in range(at + 1)]      # the model outputs, one per call
        sch = ts = None
        if scheduler is not None:
            sch = copy.deepcopy(scheduler)
            sch.set_timesteps(steps, device=device)
            ts = sch.timesteps
            xd = noise * sch.init_noise_sigma
        # walk both to step `at`: same model outputs, each side's own update of the state
        # (pyengine: the executor's walker, segment by segment, as FusedScheduler does)
        walk = Walker(program, None, be, noise=PhiloxDraws(seeds), recycle=False)
        walk.start(noise * sampler.init_noise_scale)
        for i in range(at):
            walk.run_segment(i, output=outs[i])
            if sch is not None:
                sch.scale_model_input(xd, ts[i])
                xd = sch.step(outs[i], ts[i], xd).prev_sample
        ups = [ins[1] for ins in segs[at][1:]]
        self._at, self._out_at = at, outs[at]
        self.target = segs[at + 1][0][1].src if at + 1 < len(segs) else plan.output
        numel, isz = noise.numel(), noise.element_size()
        self.bytes = sum(update_bytes(op, numel, isz) for op in ups)
        self.rw = " + ".join(f"{len(op.bufs)}/{1 + (op.aux_dst is not None)}" for op in ups)
        self._slots, self._like = dict(walk.slots), noise
        # the compiled loop's numbers (device tables: what a captured graph replays) and the
        # eager ones (the plan's host floats), each walker reusing its own outputs
        self._walk_dev = Walker(program, None, be, noise=PhiloxDraws(seeds),
                                numbers=DeviceTables(plan, shape[0], device, dtype))
        self._walk_host = Walker(program, None, be, noise=PhiloxDraws(seeds))
        self.to_pe = 1.0
        if getattr(sampler, "state_space", "x") == "x_hat":
            sig = segs[at + 1][0][1].sigma if at + 1 < len(segs) else \
                float(sampler.sigmas[-1])
            self.to_pe = float(sampler.process.s_of_sigma(sig))
        self.diffusers = self.rewind = None
        if sch is not None:
            sch.scale_model_input(xd, ts[at])
            saved, out_at, t_at, x_at = _snapshot(sch), outs[at], ts[at], xd

            def rewind():
                _restore(sch, saved)

            def step():
                return sch.step(out_at, t_at, x_at).prev_sample

            self.diffusers, self.rewind = step, rewind

    def _run(self, walk) -> torch.Tensor:
        walk.restart(self._slots, self._like).run_segment(self._at, output=self._out_at)
        return walk.slots[self.target]

    def pyengine(self) -> torch.Tensor:
        return self._run(self._walk_dev)

    def pyengine_eager(self) -> torch.Tensor:
        return self._run(self._walk_host)

    def compare(self) -> float | None:
        """max |pyengine - diffusers| / max |diffusers| of the step, the larger of the two
        pyengine calls' (None without diffusers)."""
        if self.diffusers is None:
            return None
        self.rewind()
        ref = self.diffusers()
        ref = ref.double() * self.to_pe if self.to_pe != 1.0 else ref
        return max(rel_diff(self.pyengine(), ref), rel_diff(self.pyengine_eager(), ref))


# -- report --------------------------------------------------------------------------------


def fmt_us(t) -> str:
    return bfu._t(t) if isinstance(t, tuple) else str(t)


def fmt_ratio(num, den) -> str:
    if not (isinstance(num, (int, float)) and isinstance(den, (int, float))) or den <= 0:
        return "n/a"
    return f"{num / den:.2f}x"


class Report:
    """The markdown file, rewritten whole after every row."""

    def __init__(self, path: Path | None, header: list[str]):
        self.path, self.header, self.sections = path, header, {}

    def section(self, key: int, title: str, notes: list[str], columns: list[str]):
        self.sections[key] = dict(title=title, notes=list(notes), columns=columns, rows=[],
                                  after=[])
        self.write()
        return self.sections[key]

    def row(self, key: int, cells: list[str]):
        sec = self.sections[key]
        sec["rows"].append(cells)
        print("| " + " | ".join(cells) + " |", flush=True)
        self.write()

    def note(self, key: int, line: str):
        self.sections[key]["after"].append(line)
        print(line, flush=True)
        self.write()

    def text(self) -> str:
        lines = list(self.header)
        for key in sorted(self.sections):
            sec = self.sections[key]
            lines += ["", f"## {key}. {sec['title']}", ""] + sec["notes"] + [""]
            if sec["columns"]:
                lines.append("| " + " | ".join(sec["columns"]) + " |")
                lines.append("|" + "---|" * len(sec["columns"]))
                lines += ["| " + " | ".join(r) + " |" for r in sec["rows"]]
            if sec["after"]:
                lines += [""] + sec["after"]
        return "\n".join(lines) + "\n"

    def write(self):
        if self.path is not None:
            self.path.write_text(self.text())


# -- section 1: one solver step ------------------------------------------------------------


def section_steps(rep: Report, args, sizes: Sizes, diffusers, why_not, copy_bw, llc, timer):
    rep.section(1, "One solver step: pyengine's fused update vs diffusers' scheduler.step", [
        (f"Step {STEP_AT} of a {STEP_STEPS}-step schedule (Stable Diffusion's scaled-linear "
         f"betas), both sides walked there on the same random model outputs. pyengine: the "
         f"step's Update ops from `from_diffusers(scheduler).plan`, each one "
         f"`backend.fused_update` on the default backend into preallocated outputs, as the "
         f"compiled loop issues it (coefficients from the plan's device table, "
         f"`pyengine.runtime.DeviceTables`: what a captured graph replays); eager call: the "
         f"same with the plan's host coefficients, as `Sampler.sample` issues it. diffusers: "
         f"`scheduler.step` on the same state, history and model output (state rewound "
         f"before each call, untimed). r/w: buffers read / written per update (UniPC: "
         f"corrector + predictor). GB/s: the bytes the fused step must move over the pyengine "
         f"median; % copy: of the copy bandwidth above. diffusers / pyengine: the ratio of "
         f"medians (above 1: pyengine is faster). rel. diff: max|pyengine - diffusers| / "
         f"max|diffusers| of the step's result, the larger of the two pyengine calls' (float32 "
         f"must be <= {STEP_TOL:g}; in bfloat16 each side has rounded its own state for "
         f"{STEP_AT} steps, so the figure bounds that drift, not the step). Times: median "
         f"(10th-90th percentile) in us."),
        (f"Target: >= 90% of copy bandwidth where the step's bytes exceed the last-level "
         f"cache ({llc / 2**20:.0f} MiB)." if llc else "Target: >= 90% of copy bandwidth "
         "beyond the last-level cache (its size is unknown here)."),
    ], ["step", "latents", "dtype", "r/w", "pyengine us (p10-p90)", "GB/s", "% copy",
        "beyond LLC", "eager call us (p10-p90)", "diffusers us (p10-p90)",
        "diffusers / pyengine", "rel. diff"])
    failed = False
    beyond = []
    for case in STEP_CASES:
        for B in sizes.step_batches:
            for dtype in (torch.float32, torch.bfloat16):
                shape = (B,) + sizes.latent
                sc = StepCase(diffusers, case, shape, dtype, args.device)
                err = sc.compare()
                bad = err is not None and dtype == torch.float32 and not err <= STEP_TOL
                failed |= bad
                t_pe = timer(sc.pyengine)
                t_eager = timer(sc.pyengine_eager)
                gbs = sc.bytes / (t_pe[0] * 1e-6) / 1e9
                pct = 100 * gbs / copy_bw
                over = llc is not None and sc.bytes > llc
                if over:
                    beyond.append(pct)
                t_d = timer(sc.diffusers, sc.rewind) if sc.diffusers else f"n/a ({why_not})"
                rep.row(1, [
                    f"{case[0]} ({sc.backend.name})", "x".join(map(str, shape)),
                    str(dtype).replace("torch.", ""), sc.rw, fmt_us(t_pe), f"{gbs:.1f}",
                    f"{pct:.0f}%", "?" if llc is None else ("yes" if over else "no"),
                    fmt_us(t_eager), fmt_us(t_d),
                    fmt_ratio(t_d[0], t_pe[0]) if isinstance(t_d, tuple) else "n/a",
                    "n/a" if err is None else f"{err:.1e}" + (" MISMATCH" if bad else "")])
    if beyond:
        rep.note(1, f"Beyond the last-level cache: {min(beyond):.0f}% to {max(beyond):.0f}% "
                    f"of copy bandwidth over {len(beyond)} rows (target >= 90%: "
                    f"{'met' if min(beyond) >= 90 else 'not met'}).")
    else:
        rep.note(1, "No row exceeds the last-level cache at these sizes: the bandwidth "
                    "target does not apply (% copy here measures the cache).")
    return failed


# -- section 2: a loop with a trivial model ------------------------------------------------


def trivial_model(x, t):
    return x * 0.5


def diffusers_loop(sch, model, noise, steps, device, before_call=None):
    """diffusers' sampling loop, as pipelines write it."""
    sch.set_timesteps(steps, device=device)
    x = noise * sch.init_noise_sigma
    for t in sch.timesteps:
        if before_call is not None:
            before_call()
        out = model(sch.scale_model_input(x, t), t)
        x = sch.step(out, t, x).prev_sample
    return x


def compile_sampler(sampler, model, shape, dtype, device):
    """``Sampler.compile`` as a user calls it."""
    if not hasattr(sampler, "compile"):
        raise NotImplementedError("Sampler.compile is not in this pyengine")
    return sampler.compile(model, shape=shape, dtype=dtype, device=device)


def captured_label(fn, reasons: set) -> str:
    """'yes', or 'no' with the fallback reason recorded in ``reasons`` (noted once under the
    table). ``fn.captured`` is settled by the first call, where the capture happens, so this
    is read after the timed runs."""
    if getattr(fn, "captured", False):
        return "yes"
    reasons.add(str(getattr(fn, "fallback_reason", None) or "no reason given"))
    return "no (eager)"


def note_reasons(rep: Report, key: int, reasons: set) -> None:
    for why in sorted(reasons):
        rep.note(key, f"`Sampler.compile` ran the loop eagerly: {why}.")


def section_loops(rep: Report, args, sizes: Sizes, diffusers, why_not, copy_bw):
    steps = sizes.loop_steps
    rep.section(2, f"A {steps}-step loop with a trivial model", [
        (f"Model: out = x * 0.5 (one read, one write); latents B x "
         f"{'x'.join(map(str, sizes.latent))} float32, Stable Diffusion's betas. diffusers: "
         f"`set_timesteps`, then per timestep `scale_model_input`, the model, "
         f"`scheduler.step`. pyengine eager: `sampler.sample(model, noise, seed=0)` with "
         f"`sampler = from_diffusers(scheduler, {steps})`; graph: `sampler.compile(model, "
         f"shape=..., device=...)` then `fn(noise, seed=0)` (captured: whether the loop "
         f"replays as one CUDA graph). Per-step cost: a whole loop's median over {steps}, in "
         f"us (the loop's fixed costs included). Floor: the bytes one step must move (the "
         f"model's 2 passes and the update's reads and writes, averaged over the plan) over "
         f"the copy bandwidth. Speedups: diffusers' time over pyengine's. rel. diff: "
         f"max|a - b| / max|b| of the final states, eager vs diffusers and graph vs eager."),
        "Target: graph per-step cost <= 1.5 x floor + 2 us.",
    ], ["loop", "latents", "floor us/step", "diffusers us/step", "pyengine eager us/step",
        "pyengine graph us/step", "captured", "graph vs target", "speedup eager",
        "speedup graph", "rel. diff eager/diffusers", "rel. diff graph/eager"])
    failed = False
    reasons: set = set()
    for case in LOOP_CASES:
        for B in sizes.loop_batches:
            failed |= loop_row(rep, args.device, sizes, diffusers, why_not, copy_bw, case, B,
                               reasons)
    note_reasons(rep, 2, reasons)
    return failed


def attempt(res: dict, key: str, measure) -> bool:
    """res[key] = measure(), or the error it raised (printed in full); True on an error."""
    try:
        res[key] = measure()
        return False
    except Exception as exc:                                    # noqa: BLE001
        traceback.print_exc()
        res[key] = f"error: {short_error(exc)}"
        return True


def loop_row(rep: Report, dev, sizes: Sizes, diffusers, why_not, copy_bw, case, B,
             reasons: set) -> bool:
    """One row of section 2; True when a pyengine variant failed."""
    steps = sizes.loop_steps
    shape = (B,) + sizes.latent
    sampler, sch = make_sampler(diffusers, case, steps, SD_BETAS)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(B)).to(dev)
    numel, isz = noise.numel(), noise.element_size()
    total = sum(update_bytes(op, numel, isz) if isinstance(op, Update) else 2 * numel * isz
                for op in sampler.plan.ops)
    floor = total / steps / (copy_bw * 1e9) * 1e6
    res: dict[str, object] = {}
    outs: dict[str, torch.Tensor] = {}

    def per_step(key, run):
        def call():
            outs[key] = run()
        return time_runs(call, dev, sizes.loop_warmup, sizes.loop_reps)[0] / steps

    if sch is not None:
        res["diffusers"] = per_step(
            "diffusers", lambda: diffusers_loop(sch, trivial_model, noise, steps, dev))
    else:
        res["diffusers"] = f"n/a ({why_not})"
    failed = attempt(res, "eager", lambda: per_step(
        "eager", lambda: sampler.sample(trivial_model, noise, seed=0)))
    fns = []

    def graph():
        fns.append(compile_sampler(sampler, trivial_model, shape, torch.float32, dev))
        return per_step("graph", lambda: fns[0](noise, seed=0))
    failed |= attempt(res, "graph", graph)
    captured = captured_label(fns[0], reasons) if "graph" in outs else "n/a"
    d, e, g = res["diffusers"], res["eager"], res["graph"]
    target = 1.5 * floor + 2.0
    verdict = "n/a"
    if isinstance(g, float):
        verdict = "n/a (cpu)" if dev == "cpu" else \
            f"{g / target:.2f} of target ({'met' if g <= target else 'not met'})"
    rep.row(2, [
        f"{case[0]} ({steps} steps)", "x".join(map(str, shape)), f"{floor:.2f}",
        *(f"{v:.1f}" if isinstance(v, float) else str(v) for v in (d, e, g)),
        captured, verdict, fmt_ratio(d, e), fmt_ratio(d, g),
        f"{rel_diff(outs['eager'], outs['diffusers']):.1e}"
        if "eager" in outs and "diffusers" in outs else "n/a",
        f"{rel_diff(outs['graph'], outs['eager']):.1e}"
        if "graph" in outs and "eager" in outs else "n/a"])
    return failed


# -- section 3: end to end with a UNet -----------------------------------------------------


UNET_COLUMNS = ["B", "(a) diffusers eager ms", "(b) torch.compile ms", "(c) pyengine graph ms",
                "(d) pyengine eager ms", "(b) speedup", "(c) speedup", "(d) speedup",
                "(c) vs (b)", "captured", "rel. diff (c)/(a)", "rel. diff (b)/(a)"]


def section_unet(rep: Report, args, sizes: Sizes, diffusers, why_not):
    dev, steps = args.device, sizes.unet_steps
    notes = [
        ("Model: diffusers `UNet2DModel` in google/ddpm-cifar10-32's configuration "
         "(sample_size 32, 3 -> 3 channels, block_out_channels (128, 256, 256, 256), "
         "layers_per_block 2, down (Down, AttnDown, Down, Down), up (Up, Up, AttnUp, Up), one "
         "attention head, norm_eps 1e-6, positional time embedding with freq_shift 1), random "
         "weights from torch.manual_seed(0), float32, no_grad. Scheduler: DDIMScheduler with "
         f"the model's linear betas (1e-4 to 0.02), clip_sample=False, {steps} steps, eta 0."),
        ("(a) diffusers-style eager loop: set_timesteps; per t: unet(x, t), scheduler.step. "
         "(b) the same loop with `torch.compile(unet, mode=\"reduce-overhead\", "
         "dynamic=False)` (CUDA graphs under the compiled UNet; its first loop, compilation "
         "and recording, is not timed: see below). (c) `from_diffusers(scheduler, "
         "steps).compile(unet, shape=...)` then `fn(noise, seed=0)`. (d) "
         "`sampler.sample(unet, noise, seed=0)`. Times: ms per batch (one whole run), median; "
         "speedup: (a)'s time over the variant's; (c) vs (b): (b)'s time over (c)'s."),
        "Target: (c) >= 2x (a) at B = 1, and ahead of (b).",
    ]
    title = f"End to end: DDPM CIFAR-10 UNet, {steps} DDIM steps"
    if diffusers is None:
        why = f"Skipped: {why_not} (the UNet and the reference loop come from diffusers)."
        rep.section(3, title, [*notes, why], [])
        return False
    rep.section(3, title, notes, UNET_COLUMNS)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**CIFAR10_UNET).to(dev).eval().requires_grad_(False)
    failed = False
    compile_notes: list[str] = []
    reasons: set = set()
    with torch.no_grad():
        for B in sizes.unet_batches:
            failed |= unet_row(rep, dev, sizes, diffusers, unet, B, reasons, compile_notes)
    note_reasons(rep, 3, reasons)
    if compile_notes:
        rep.note(3, "torch.compile's first loop (compilation and graph recording), not in "
                    "the table: " + "; ".join(compile_notes) + ".")
    return failed


def unet_row(rep: Report, dev, sizes: Sizes, diffusers, unet, B, reasons: set,
             compile_notes: list) -> bool:
    """One row of section 3, rewritten as each variant finishes; True when a pyengine
    variant failed."""
    from pyengine.integrations.diffusers import from_diffusers

    steps = sizes.unet_steps
    shape = (B, 3, 32, 32)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(B)).to(dev)
    sch = diffusers.DDIMScheduler(**CIFAR10_BETAS, clip_sample=False)
    sampler = from_diffusers(sch, steps)
    res: dict[str, object] = {}
    outs: dict[str, torch.Tensor] = {}
    fns = []

    def model(x, t):
        return unet(x, t, return_dict=False)[0]

    def timed(key, run, warmup=sizes.unet_warmup):
        def call():
            outs[key] = run()
        return time_runs(call, dev, warmup, sizes.unet_reps)[0]

    def emit(final=False):
        a = res.get("a")
        cells = [str(B)]
        for k in "abcd":
            v = res.get(k, "n/a" if final else "pending")
            cells.append(f"{v / 1e3:.2f}" if isinstance(v, float) else str(v))
        cells += [fmt_ratio(a, res.get(k)) for k in "bcd"]
        cells += [fmt_ratio(res.get("b"), res.get("c")),
                  captured_label(fns[0], reasons) if "c" in outs else "n/a"]
        cells += [f"{rel_diff(outs[k], outs['a']):.1e}" if k in outs and "a" in outs
                  else "n/a" for k in "cb"]
        rows = rep.sections[3]["rows"]
        if rows and rows[-1][0] == str(B):
            rows[-1] = cells
            rep.write()
            if final:
                print("| " + " | ".join(cells) + " |", flush=True)
        else:
            rep.row(3, cells)

    def graph():
        fns.append(compile_sampler(sampler, unet, shape, torch.float32, dev))
        return timed("c", lambda: fns[0](noise, seed=0))

    def compiled_loop():
        torch._dynamo.reset()
        compiled = torch.compile(unet, mode="reduce-overhead", dynamic=False)
        mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)

        def cmodel(x, t):
            return compiled(x, t, return_dict=False)[0]

        def run():
            return diffusers_loop(sch, cmodel, noise, steps, dev, mark)
        t0 = time.perf_counter()
        run()
        sync(dev)
        compile_notes.append(f"B = {B}: {time.perf_counter() - t0:.1f} s")
        return timed("b", run, warmup=2)

    model(noise, torch.tensor(999, device=dev))                  # first-call costs, untimed
    sync(dev)
    res["a"] = timed("a", lambda: diffusers_loop(sch, model, noise, steps, dev))
    emit()
    failed = attempt(res, "d", lambda: timed("d", lambda: sampler.sample(unet, noise, seed=0)))
    emit()
    failed |= attempt(res, "c", graph)
    emit()
    if dev != "cuda":
        res["b"] = "n/a (cpu: reduce-overhead is CUDA graphs)"
    elif attempt(res, "b", compiled_loop):
        res["b"] = res["b"].replace("error:", "failed:", 1)     # reported, not a pyengine error
    emit(final=True)
    return failed


# -- main ----------------------------------------------------------------------------------


def header(args, name: str, diffusers, why_not, copy, llc) -> list[str]:
    dev = args.device
    names = {str(dt).replace("torch.", ""): backends.get(device=dev, dtype=dt).name
             for dt in (torch.float32, torch.bfloat16)}
    cuda = f" (CUDA {torch.version.cuda})" if dev == "cuda" else ""
    return [
        f"# sampling benchmark: {name}, {datetime.date.today().isoformat()}",
        "",
        f"- device: {name} ({dev}" + (f"; {os.cpu_count()} logical CPUs, "
                                      f"{torch.get_num_threads()} torch threads"
                                      if dev == "cpu" else "") + ")",
        "- pyengine backends (dispatcher's default): "
        + ", ".join(f"{k} `{v}`" for k, v in names.items()),
        f"- pyengine {pe.__version__}, torch {torch.__version__}{cuda}, numpy "
        f"{np.__version__}, diffusers "
        + (diffusers.__version__ if diffusers is not None else f"n/a ({why_not})"),
        f"- copy bandwidth ({'256' if dev == 'cuda' else '128'} MiB float32 copy, read + "
        "write; best of " + ", ".join(f"{k} {v:.1f}" for k, v in copy[1].items())
        + f"): **{copy[0]:.1f} GB/s**",
        "- last-level cache: " + (f"{llc / 2**20:.0f} MiB" if llc else "unknown"),
        f"- command: `python bench/bench_sampling.py {' '.join(sys.argv[1:])}`"
        + (" (--quick: smoke-test sizes, not a measurement)" if args.quick else ""),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="folder for the markdown table")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (CI)")
    p.add_argument("--skip-diffusers", action="store_true",
                   help="no diffusers columns, no UNet section")
    p.add_argument("--sections", default="1,2,3", help="comma-separated subset of 1,2,3")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and kernel threads on CPU (default 1: the machine is shared)")
    args = p.parse_args(argv)
    try:
        sections = sorted({int(s) for s in args.sections.split(",") if s.strip()})
    except ValueError:
        p.error(f"--sections takes numbers from 1,2,3, got {args.sections!r}")
    if not sections or not set(sections) <= {1, 2, 3}:
        p.error(f"--sections takes numbers from 1,2,3, got {args.sections!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    diffusers, why_not = load_diffusers(args.skip_diffusers)
    sizes = Sizes(args.device, args.quick)
    timer = bfu.Timer(args.device, **sizes.timer)
    copy = bfu.copy_bandwidth(timer, args.device)
    llc = cache_bytes(args.device)
    name = bfu.device_name(args.device)
    path = None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"sampling_{slug(name)}_{datetime.date.today().isoformat()}.md"
    rep = Report(path, header(args, name, diffusers, why_not, copy, llc))
    print("\n".join(rep.header), flush=True)
    rep.write()

    failed = False
    if 1 in sections:
        failed |= section_steps(rep, args, sizes, diffusers, why_not, copy[0], llc, timer)
    if 2 in sections:
        failed |= section_loops(rep, args, sizes, diffusers, why_not, copy[0])
    if 3 in sections:
        failed |= section_unet(rep, args, sizes, diffusers, why_not)
    rep.write()
    if path is not None:
        print(f"wrote {path}")
    if failed:
        print("bench_sampling: a pyengine variant failed or disagreed with diffusers "
              "(see the table)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
