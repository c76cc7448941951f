"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
of Diffusion Models", Algorithms 2-3, B(h) variants), data prediction, in x_hat = x / s:

    UniP-p  x_hat_{i+1} = e^{-h} x_hat_i^c - (e^{-h} - 1) m_i - B(h) sum_{k<p} rho_k D_k / r_k
    UniC-p  x_hat_i^c   = e^{-h'} x_hat_{i-1}^c - (e^{-h'} - 1) m_{i-1}
                          - B(h') (sum_{k<p} rho_k D'_k / r'_k + rho_p (m_i - m_{i-1}))

with m_j = D(x_hat_j; sigma_j), lambda = -log sigma, h = lambda_{i+1} - lambda_i,
r_k = (lambda_{i-k} - lambda_i) / h, D_k = m_{i-k} - m_i (the corrector the same one step
back: h' = lambda_i - lambda_{i-1}, r'_k = (lambda_{i-1-k} - lambda_{i-1}) / h',
D'_k = m_{i-1-k} - m_{i-1}), B(h) = -h (bh1) or e^{-h} - 1 (bh2). The rho solve
R(r) rho = b with R_{mk} = r_k^m (r_p = 1) and b_k = k! (-h) phi_{k+1}(-h) / B(h); the
predictor uses rho = 1/2 at p = 2 and the first p - 1 equations otherwise, the corrector
rho = 1/2 at p = 1.

The step semantics are those of diffusers' ``UniPCMultistepScheduler`` (predict_x0=True):
the corrector at step i refines x_hat_i with the model output m_i already evaluated at the
predicted state (no extra model call), the predictor then starts from the corrected state;
the order warms up as min(order, i + 1) and, with ``lower_order_final``, falls as
min(order, N - i) over the final steps (diffusers applies this whatever the step count);
``disable_corrector`` lists the step indices whose predictor output is not corrected
(diffusers' option: the corrector that would use m_{j+1} to refine the output of step j).
No corrector follows the final step. A step to sigma = 0 is the order-1 limit x_hat = m_i:
the higher-order UniP terms divide by r_k -> 0 there (diffusers returns inf on such a step
when lower_order_final=False).
"""

from __future__ import annotations

import math

import numpy as np

from ..plan import Lin
from .registry import register

_BH = ("bh1", "bh2")


def _g(hh: float, k: int) -> float:
    """g_k(hh) = (e^hh - sum_{j<=k} hh^j / j!) / hh^k = sum_{j>=1} hh^j / (j+k)!.

    diffusers builds g_k by the recurrence g_k = g_{k-1} / hh - 1/k!, which cancels
    catastrophically for small |hh|; the series is used there instead."""
    if abs(hh) < 1.0:
        term, acc = 1.0 / math.factorial(k), 0.0
        for j in range(1, 40):
            term *= hh / (j + k)
            acc += term
            if abs(term) < 1e-18 * abs(acc):
                break
        return acc
    acc = math.expm1(hh) - hh
    fact = 1.0
    for j in range(2, k + 1):
        fact *= j
        acc -= hh ** j / fact
    return acc / hh ** k


def unipc_weights(lam_s: float, lam_t: float, lam_hist, variant: str, corrector: bool):
    """Coefficients of one UniP (corrector=False) or UniC (corrector=True) update of order
    p = len(lam_hist) + 1 from lambda_s to lambda_t, in x_hat space.

    ``lam_hist`` holds lambda of the older model outputs m_{-1}, m_{-2}, ... (most recent
    first). Returns (c_x, c_0, c_hist, c_new): x_hat_t = c_x x_hat_s + c_0 m_0
    + sum_k c_hist[k] m_{-(k+1)} + c_new m_t, where m_t (corrector only) is the model output
    at the predicted point; c_new is 0 for the predictor.
    """
    h = lam_t - lam_s
    hh = -h
    p = len(lam_hist) + 1
    h_phi_1 = math.expm1(hh)
    B = hh if variant == "bh1" else math.expm1(hh)
    r = np.array([(lk - lam_s) / h for lk in lam_hist] + [1.0])
    g = np.array([_g(hh, k) * math.factorial(k) / B for k in range(1, p + 1)])
    R = np.vander(r, p, increasing=True).T            # R[m, k] = r_k^m
    if corrector:
        rho = np.array([0.5]) if p == 1 else np.linalg.solve(R, g)
    elif p == 1:
        rho = np.zeros(0)
    elif p == 2:
        rho = np.array([0.5])
    else:
        rho = np.linalg.solve(R[:-1, :-1], g[:-1])
    c_x = math.exp(hh)
    c_0 = -h_phi_1
    # sum_k rho_k (m_{-k} - m_0) / r_k over the history terms
    c_hist = [-B * rho[k] / r[k] for k in range(p - 1)]
    c_0 += B * sum(rho[k] / r[k] for k in range(p - 1))
    c_new = 0.0
    if corrector:
        c_new = -B * rho[p - 1]
        c_0 += B * rho[p - 1]
    return c_x, c_0, c_hist, c_new


def _variants():
    out = []
    for variant in _BH:
        for order in (1, 2, 3):
            for corr in (True, False):
                ordr = _MEASURED[(variant, order, corr)]
                label = f"unipc_{variant}_p{order}{'_c' if corr else ''}"
                out.append((label, dict(variant=variant, order=order, corrector=corr,
                                        lower_order_final=False), ordr, 1))
    return tuple(out)


# Orders of the variants (lower_order_final=False): fitted log-error slopes, EDM process,
# exponential grids with no step to 0, float64, 24..192 steps, tests/test_order.py's mixture.
# With sigma 2 -> 0.2, where the warm-up steps already see a nonlinear denoiser (bh1 / bh2):
#   p1 1.00 / 1.00   p1+C 2.01 / 2.00   p2 2.00 / 1.98   p2+C 3.02 / 2.99
#   p3 2.02 / 2.04   p3+C 2.95 / 3.12 (last doublings 2.97 / 3.05)
# UniC raises the order by one, but the warm-up caps it: the first step is UniP-1 (local
# error O(h^2), so UniP-3 alone is order 2) and the first correction UniC-1 (local O(h^3), so
# UniPC-3 is order 3). Starting at sigma 10 (test_order's window) the warm-up runs where the
# denoiser is nearly affine and those terms take over late: p3 2.86 (last doubling 2.10),
# p3+C 3.53-3.59 (last 3.80-3.92; bh2 still 3.99 at 768 steps). With lower_order_final=True
# (the default) the last step is UniP-1 without correction: order 2 whatever the order option.
_MEASURED = {
    ("bh1", 1, False): 1, ("bh1", 1, True): 2, ("bh1", 2, False): 2, ("bh1", 2, True): 3,
    ("bh1", 3, False): 2, ("bh1", 3, True): 3,
    ("bh2", 1, False): 1, ("bh2", 1, True): 2, ("bh2", 2, False): 2, ("bh2", 2, True): 3,
    ("bh2", 3, False): 2, ("bh2", 3, True): 3,
}


@register(
    "unipc", order=2, nfe_per_step=1, stochastic=False, family="unipc", featured=True,
    summary="UniPC (Zhao 2023 Alg. 2-3), data prediction: UniP-p x_hat' = e^{-h} x_hat^c "
            "- (e^{-h}-1) m_0 - B(h) sum rho_k D_k/r_k, refined by UniC-p with the next model "
            "output (no extra NFE); diffusers UniPCMultistepScheduler semantics",
    options=("order", "variant", "corrector", "disable_corrector", "lower_order_final"),
    variants=_variants(), defaults=dict(order=2, variant="bh2", corrector=True,
                                        disable_corrector=(), lower_order_final=True))
def unipc(b, order, variant, corrector, disable_corrector, lower_order_final):
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order!r}")
    if variant not in _BH:
        raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
    try:
        disabled = {int(j) for j in disable_corrector}
    except TypeError:
        raise ValueError(f"disable_corrector must be a sequence of step indices, got "
                         f"{disable_corrector!r}") from None
    sig = b.sigmas
    n = b.n_steps
    lam = [b.lam(s) for s in sig]
    # Predictor order per step (diffusers' step(): warm-up, then lower_order_final).
    p = [min(order, i + 1, (n - i) if lower_order_final else order) for i in range(n)]
    if sig[n] == 0:
        p[n - 1] = 1
    use_c = [i > 0 and bool(corrector) and (i - 1) not in disabled for i in range(n)]
    # Which model outputs are read after their own step (they go to the history ring).
    needed = [False] * n
    for j in range(n):
        for k in range(1, p[j]):
            needed[j - k] = True
        if use_c[j]:
            for k in range(1, p[j - 1] + 1):
                needed[j - k] = True
    # Model outputs m_j (x0 estimates) that later steps read live in a ring of `order` slots.
    # The state alternates between slots x and x1, so that the (corrected) state a predictor
    # starts from survives it: the next corrector starts from there too. The last step writes x.
    ring = [f"m{k}" for k in range(order)]
    m: dict[int, Lin] = {}
    stored: set[int] = set()
    pred, last = "x", None

    def hist(i, count, start):
        """m_{i-start}, m_{i-start-1}, ... (count of them)."""
        return [m[i - start - k] for k in range(count)]

    for i in range(n):
        b.step = i
        D, _ = b.evaluate(pred, sig[i], dst="out")
        m[i] = D
        cur = pred
        if use_c[i]:
            # UniC: refine x_i from the corrected x_{i-1} with m_i (no extra model call).
            pc = p[i - 1]
            cx, c0, ch, cn = unipc_weights(lam[i - 1], lam[i],
                                           [lam[i - 1 - k] for k in range(1, pc)], variant, True)
            lin = cx * b.xhat(last, sig[i - 1]) + c0 * m[i - 1] + cn * D
            for c, mk in zip(ch, hist(i, pc - 1, 2)):
                lin = lin + c * mk
            aux = None
            if needed[i]:
                aux = (ring[i % order], D)
            b.assign(last, lin, sig[i], aux=aux, kind="unic")
            if aux is not None:
                m[i] = b.ref(aux[0])
                stored.add(i)
            cur = last
        # UniP from the (corrected) state.
        dst = "x" if i == n - 1 else ("x1" if cur == "x" else "x")
        aux = None
        if needed[i] and i not in stored:
            aux = (ring[i % order], m[i])
        if sig[i + 1] == 0:
            lin = m[i]
        else:
            cx, c0, ch, _ = unipc_weights(lam[i], lam[i + 1],
                                          [lam[i - k] for k in range(1, p[i])], variant, False)
            lin = cx * b.xhat(cur, sig[i]) + c0 * m[i]
            for c, mk in zip(ch, hist(i, p[i] - 1, 1)):
                lin = lin + c * mk
        b.assign(dst, lin, sig[i + 1], aux=aux, kind="unip")
        if aux is not None:
            m[i] = b.ref(aux[0])
            stored.add(i)
        last, pred = cur, dst
