"""Plans: a solver compiled to model evaluations and fused linear updates.

Every supported solver step is, after the model call,

    x_next = sum_k c_k * buf_k + c_z * z        aux = sum_k a_k * buf_k   (optional)

A :class:`Plan` is the ordered list of :class:`Eval` (call the model on a buffer) and
:class:`Update` (one fused update) ops with every coefficient a float64 number computed on
the host. Solvers never emit ops by hand: they write their math with :class:`Lin` (linear
combinations of buffer slots) through a :class:`PlanBuilder`, which folds the process scale
s(sigma) and the model parameterization into the coefficients and checks that no op reads a
buffer that has since been overwritten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import parameterization as param
from .fused_update import K_MAX  # the most buffers one fused update reads (defined there once)

__all__ = ["K_MAX", "Custom", "Eval", "GuidanceRescale", "Lin", "Plan", "PlanBuilder", "Update"]


class Lin:
    """A linear combination of buffer versions: {(slot, version): coefficient}."""

    __slots__ = ("terms",)

    def __init__(self, terms=None):
        self.terms: dict[tuple[str, int], float] = dict(terms or {})

    def __add__(self, other: Lin) -> Lin:
        if not isinstance(other, Lin):
            return NotImplemented
        t = dict(self.terms)
        for k, v in other.terms.items():
            t[k] = t.get(k, 0.0) + v
        return Lin(t)

    def __sub__(self, other: Lin) -> Lin:
        return self + (-1.0) * other

    def __mul__(self, c: float) -> Lin:
        c = float(c)
        return Lin({k: c * v for k, v in self.terms.items()})

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> Lin:
        return self * (1.0 / float(c))

    def __neg__(self) -> Lin:
        return self * -1.0

    def __repr__(self) -> str:
        return " + ".join(f"{v:.6g}*{s}@{ver}" for (s, ver), v in self.terms.items()) or "0"


#: The largest float32: a plan coefficient beyond it overflows the kernels' float32
#: arithmetic (every state dtype but float64 computes in float32).
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Eval:
    """Call the model on buffer ``src`` at noise level ``sigma``; bind the output to ``dst``."""

    src: str
    dst: str
    sigma: float
    t: float        # the model's time value at sigma (process convention)
    s: float        # the process scale at sigma
    step: int       # index of the schedule step this evaluation belongs to
    # Classifier-free guidance: when set, the model is called once on the doubled batch
    # cat([x, x]) and the halves out[:B] (unconditional) and out[B:] (conditional) are bound to
    # the slots ``dst + "/u"`` and ``dst + "/c"``; the guidance scale is already folded into
    # the coefficients of the updates that read them.
    guidance: float | None = None


@dataclass
class Update:
    """dst = sum_k coefs[k] * bufs[k] + noise * z ;  aux_dst = sum_k aux_coefs[k] * bufs[k]."""

    dst: str
    bufs: list[str]
    coefs: np.ndarray                      # float64 [K]
    noise: float = 0.0                     # c_z
    noise_index: int = -1                  # Philox step counter of this draw (-1: no draw)
    aux_dst: str | None = None
    aux_coefs: np.ndarray | None = None    # float64 [K]
    step: int = 0
    kind: str = "update"                   # a label for debugging and stats
    # The noise level of the state written to dst and its scale: dst = scale * x_hat at sigma
    # (inpainting re-noises the known region to exactly this level).
    sigma: float = math.nan
    scale: float = math.nan
    # Inpainting (set by pyengine.runtime.transforms.inpaint): the blend's base coefficients
    # over ``bufs`` (float64 [K]); the executor passes the mask with them.
    mask_coefs: np.ndarray | None = None


class Custom:
    """A plan op whose numbers depend on the data, so no coefficient table can hold them.

    A custom op declares what it reads and writes (buffer names) and the plan step it belongs
    to; its tensor code lives in the executor (:mod:`pyengine.runtime.custom`), found by the
    op's class. ``writes_state`` says whether it writes the sampler state outside the fused
    updates (inpainting cannot blend such a write); ``draws`` whether it draws noise."""

    reads: tuple = ()
    writes: tuple = ()
    step: int = 0
    writes_state: bool = False
    draws: bool = False


class GuidanceRescale(Custom):
    """The guidance rescale of Lin et al. 2024 (eq. 16) on a guided model output:

        cfg = (1 - w) u + w c,   dst = phi * cfg * std(c) / std(cfg) + (1 - phi) * cfg

    with per-sample standard deviations over all non-batch dims (diffusers'
    ``rescale_noise_cfg`` on the raw model output). One extra pass over the output."""

    def __init__(self, src: str, dst: str, w: float, phi: float, step: int):
        self.src, self.dst, self.w, self.phi, self.step = src, dst, float(w), float(phi), step
        self.reads, self.writes = (src + "/u", src + "/c"), (dst,)

    def __repr__(self) -> str:
        return (f"GuidanceRescale({self.dst} = rescale({self.src}/u, {self.src}/c, "
                f"w={self.w:.6g}, phi={self.phi:.6g}))")


@dataclass
class Plan:
    """The compiled solver: ops, the grid it walks, and bookkeeping."""

    solver: str
    sigmas: np.ndarray
    ops: list = field(default_factory=list)
    n_noise: int = 0                       # number of noise draws
    output: str = "x"                      # slot holding the result
    guidance_scale: float | None = None    # classifier-free guidance folded into the plan

    @property
    def nfe(self) -> int:
        return sum(isinstance(op, Eval) for op in self.ops)

    @property
    def updates(self) -> list[Update]:
        return [op for op in self.ops if isinstance(op, Update)]

    def describe(self) -> str:
        lines = [f"Plan({self.solver}, steps={len(self.sigmas) - 1}, nfe={self.nfe})"]
        for op in self.ops:
            if isinstance(op, Custom):
                lines.append(f"  custom {op!r}")
            elif isinstance(op, Eval):
                if op.guidance is not None:
                    lines.append(f"  eval   {op.dst}/u, {op.dst}/c = model(cat[{op.src}, "
                                 f"{op.src}], sigma={op.sigma:.6g}, t={op.t:.6g})  "
                                 f"[cfg w={op.guidance:.6g}]")
                else:
                    lines.append(f"  eval   {op.dst} = model({op.src}, sigma={op.sigma:.6g}, "
                                 f"t={op.t:.6g})")
            else:
                terms = " + ".join(f"{c:.6g}*{b}" for c, b in zip(op.coefs, op.bufs))
                z = f" + {op.noise:.6g}*z[{op.noise_index}]" if op.noise_index >= 0 else ""
                aux = ""
                if op.aux_dst is not None:
                    aux = "; " + op.aux_dst + " = " + " + ".join(
                        f"{c:.6g}*{b}" for c, b in zip(op.aux_coefs, op.bufs))
                lines.append(f"  update {op.dst} = {terms}{z}{aux}")
        return "\n".join(lines)


class PlanBuilder:
    """What solvers write plans with.

    The state lives in buffer ``"x"`` in the process's own space (x = s * x_hat). Solvers think
    in the scaled state x_hat = x / s and noise level sigma, where every process looks alike:

    * ``xhat(slot, sigma)``       the Lin x_hat of a buffer holding a state at sigma,
    * ``evaluate(slot, sigma)``   emits a model call and returns (D, eps): the denoised
      estimate x0_hat and the noise estimate, both Lins (x_hat = D + sigma * eps),
    * ``assign(dst, xhat, sigma, ...)`` emits one fused update writing s(sigma) * xhat into dst.
    """

    def __init__(self, process, sigmas, prediction: str, solver: str = "?", timesteps=None,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0):
        self.process = process
        guidance_rescale = float(guidance_rescale or 0.0)
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        if guidance_rescale and guidance_scale is None:
            raise ValueError("guidance_rescale needs guidance_scale")
        self.guidance_rescale = guidance_rescale
        if guidance_scale is not None:
            guidance_scale = float(guidance_scale)
            if not math.isfinite(guidance_scale):
                raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
        self.guidance_scale = guidance_scale
        # Optional explicit model times at the grid's levels (diffusers' own float32 timesteps,
        # for parity); other levels use the process's model_time(sigma).
        self._times: dict[float, float] = {}
        if timesteps is not None:
            ts = np.asarray(timesteps, dtype=np.float64).reshape(-1)
            sg = np.asarray(sigmas, dtype=np.float64)
            if ts.size not in (sg.size, sg.size - 1):
                raise ValueError(f"timesteps has {ts.size} entries for {sg.size} sigmas "
                                 f"(give one per level, or one per level but the last)")
            self._times = {float(a): float(t) for a, t in zip(sg, ts)}
        self.prediction = param.check_prediction(prediction)
        self.sigmas = np.asarray(sigmas, dtype=np.float64)
        self.plan = Plan(solver=solver, sigmas=self.sigmas, guidance_scale=guidance_scale)
        self._version: dict[str, int] = {"x": 0}
        self.step = 0

    # -- grid helpers ----------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return len(self.sigmas) - 1

    def s(self, sigma: float) -> float:
        if math.isinf(sigma):
            self._pure_noise(sigma)
            return 0.0
        return float(self.process.s_of_sigma(float(sigma)))

    def _pure_noise(self, sigma: float) -> None:
        """sigma = inf (pure noise) exists on the rectified-flow process only: t = 1, s = 0,
        s * sigma = 1 (a flow model's state at t = 1 is the noise itself)."""
        if getattr(self.process, "name", None) != "flow" or sigma < 0:
            raise ValueError(f"noise level sigma={sigma} (pure noise) is supported on the "
                             f"rectified-flow process only, not on {self.process!r}")

    def time_of(self, sigma: float) -> float:
        """The model's time value at ``sigma``."""
        t = self._times.get(float(sigma))
        if t is None and math.isinf(sigma):
            self._pure_noise(sigma)
            return float(getattr(self.process, "time_scale", 1.0))
        return float(self.process.model_time(float(sigma))) if t is None else t

    @staticmethod
    def lam(sigma: float) -> float:
        """Half-log-SNR lambda = -log sigma (inf at sigma 0)."""
        return math.inf if sigma == 0 else -math.log(sigma)

    # -- slots -----------------------------------------------------------------------------
    def ref(self, slot: str) -> Lin:
        if slot not in self._version:
            raise KeyError(f"plan bug: buffer {slot!r} read before it was written")
        return Lin({(slot, self._version[slot]): 1.0})

    def xhat(self, slot: str, sigma: float) -> Lin:
        return self.ref(slot) / self.s(sigma)

    # -- ops -------------------------------------------------------------------------------
    def evaluate(self, slot: str, sigma: float, dst: str = "out",
                 t: float | None = None) -> tuple[Lin, Lin]:
        """Call the model on the state in ``slot`` at ``sigma``; return (D, eps) as Lins.

        The output overwrites buffer ``dst``: give outputs kept alive distinct names. With
        guidance w the halves go to ``dst/u``, ``dst/c`` and the output Lin is
        (1 - w) dst/u + w dst/c (why this is exact: docs/solvers.md). ``t``: the model time
        of this call where it is not ``time_of(sigma)`` (PNDM's rounded midpoint timesteps)."""
        sigma = float(sigma)
        if not sigma >= 0:
            raise ValueError(f"cannot evaluate the model at sigma={sigma}")
        s = self.s(sigma)
        x = self.ref(slot)
        w = self.guidance_scale
        self.plan.ops.append(Eval(src=slot, dst=dst, sigma=sigma,
                                  t=self.time_of(sigma) if t is None else float(t), s=s,
                                  step=self.step, guidance=w))
        if w is None:
            self._version[dst] = self._version.get(dst, -1) + 1
            out = self.ref(dst)
        else:
            for half in ("/u", "/c"):
                self._version[dst + half] = self._version.get(dst + half, -1) + 1
            if self.guidance_rescale:
                self.custom(GuidanceRescale(dst, dst, w, self.guidance_rescale, self.step),
                            reads=[dst + "/u", dst + "/c"], writes=[dst])
                out = self.ref(dst)
            else:
                out = self.ref(dst + "/u") * (1.0 - w) + self.ref(dst + "/c") * w
        alpha, sd = s, (1.0 if math.isinf(sigma) else s * sigma)
        (dx, do), (ex, eo) = param.affine(self.prediction, alpha, sd)
        return x * dx + out * do, x * ex + out * eo

    def assign(self, dst: str, xhat: Lin, sigma: float, *, noise: float = 0.0,
               noisy: bool = False, aux: tuple[str, Lin] | None = None, kind: str = "update",
               scale: float | None = None) -> Lin:
        """Emit ``dst = s(sigma) * (xhat + noise * z)``; returns the Lin of the new buffer.

        ``noisy`` marks a noise draw even when ``noise`` is 0 (diffusers draws noise on such
        steps; the generator mode has to draw in step). ``aux=(slot, lin)`` also writes a
        second output (no scaling) from the same buffers. ``scale`` overrides s(sigma).
        """
        s = self.s(sigma) if scale is None else float(scale)
        terms = {k: v * s for k, v in xhat.terms.items() if v != 0.0}
        aux_terms = {}
        if aux is not None:
            aux_terms = {k: v for k, v in aux[1].terms.items() if v != 0.0}
        keys = list(dict.fromkeys(list(terms) + list(aux_terms)))
        for slot, ver in keys:
            if self._version.get(slot) != ver:
                raise RuntimeError(f"plan bug: buffer {slot!r} version {ver} was overwritten "
                                   f"(now {self._version.get(slot)}) before this update")
        if len(keys) > K_MAX:
            raise RuntimeError(f"plan bug: update reads {len(keys)} buffers > K_MAX={K_MAX}")
        if not keys:
            raise RuntimeError("plan bug: update reads no buffer")
        bufs = [k[0] for k in keys]
        coefs = np.array([terms.get(k, 0.0) for k in keys], dtype=np.float64)
        if not np.all(np.isfinite(coefs)):
            raise FloatingPointError(f"non-finite coefficient in {kind} at step {self.step}: "
                                     f"{coefs}")
        if not math.isfinite(float(noise) * s):
            raise FloatingPointError(f"non-finite noise coefficient in {kind} at step "
                                     f"{self.step}: {float(noise) * s}")
        if np.abs(coefs).max(initial=0.0) > _F32_MAX or abs(float(noise) * s) > _F32_MAX:
            # the kernels compute in float32 for every state but float64: inf from here on
            raise FloatingPointError(f"coefficient beyond float32's range ({_F32_MAX:.3g}) "
                                     f"in {kind} at step {self.step}: {coefs}, noise "
                                     f"{float(noise) * s:.3g}")
        draw = noisy or noise != 0.0
        idx = -1
        if draw:
            idx = self.plan.n_noise
            self.plan.n_noise += 1
        op = Update(dst=dst, bufs=bufs, coefs=coefs, noise=float(noise) * s, noise_index=idx,
                    step=self.step, kind=kind, sigma=float(sigma), scale=s)
        if aux is not None:
            op.aux_dst = aux[0]
            op.aux_coefs = np.array([aux_terms.get(k, 0.0) for k in keys], dtype=np.float64)
            if not np.all(np.isfinite(op.aux_coefs)):
                raise FloatingPointError(f"non-finite aux coefficient in {kind}: {op.aux_coefs}")
        self.plan.ops.append(op)
        self._version[dst] = self._version.get(dst, -1) + 1
        if aux is not None:
            if aux[0] == dst:
                raise RuntimeError("plan bug: aux output aliases the main output")
            self._version[aux[0]] = self._version.get(aux[0], -1) + 1
        return self.ref(dst)

    def custom(self, op: Custom, reads: list[str], writes: list[str]) -> None:
        """Append a :class:`Custom` op that reads and writes the named buffers (where a
        coefficient depends on the data: the Langevin step size, the guidance rescale)."""
        if not isinstance(op, Custom):
            raise TypeError(f"plan bug: custom ops derive from pyengine.plan.Custom, got "
                            f"{type(op).__name__}")
        op.reads, op.writes = tuple(reads), tuple(writes)
        for slot in reads:
            self.ref(slot)
        for slot in writes:
            self._version[slot] = self._version.get(slot, -1) + 1
        self.plan.ops.append(op)

    def next_noise_index(self) -> int:
        """Reserve one noise draw number (for custom ops that draw noise)."""
        idx = self.plan.n_noise
        self.plan.n_noise += 1
        return idx

    def finish(self, output: str = "x") -> Plan:
        self.plan.output = output
        if output not in self._version:
            raise RuntimeError(f"plan bug: output buffer {output!r} never written")
        return self.plan
