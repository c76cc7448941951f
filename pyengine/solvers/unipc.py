"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
of Diffusion Models", Algorithms 2-3, B(h) variants), data prediction, in x_hat = x / s:

    UniP-p  x_hat_{i+1} = e^{-h} x_hat_i^c - (e^{-h} - 1) m_i - B(h) sum_{k<p} rho_k D_k / r_k
    UniC-p  x_hat_i^c   = e^{-h'} x_hat_{i-1}^c - (e^{-h'} - 1) m_{i-1}
                          - B(h') (sum_{k<p} rho_k D'_k / r'_k + rho_p (m_i - m_{i-1}))

with m_j = D(x_hat_j; sigma_j), h = lambda_{i+1} - lambda_i, r_k = (lambda_{i-k} - lambda_i)/h,
D_k = m_{i-k} - m_i, B(h) = -h (bh1) or e^{-h} - 1 (bh2), rho from R(r) rho = b (the
corrector likewise one step back). Step semantics of diffusers' UniPCMultistepScheduler
(predict_x0=True); full notation, semantics and measured orders: docs/solvers.md.
"""

from __future__ import annotations

import math

import numpy as np

from ..plan import Lin
from .registry import register

_BH = ("bh1", "bh2")


def _g(hh: float, k: int) -> float:
    """g_k(hh) = (e^hh - sum_{j<=k} hh^j / j!) / hh^k = sum_{j>=1} hh^j / (j+k)!; the series
    for |hh| < 1, where diffusers' recurrence g_k = g_{k-1} / hh - 1/k! cancels."""
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
    """(c_x, c_0, c_hist, c_new) of one UniP / UniC (``corrector``) update of order
    p = len(lam_hist) + 1: x_hat_t = c_x x_hat_s + c_0 m_0 + sum_k c_hist[k] m_{-(k+1)}
    + c_new m_t, ``lam_hist`` the lambdas of m_{-1}, m_{-2}, ...; c_new = 0 for UniP."""
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


# Measured orders of the variants (lower_order_final=False; slopes in docs/solvers.md): UniC
# adds one, but the UniP-1 / UniC-1 warm-up caps UniP-3 at 2 and UniPC-3 at 3.
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
        if any(isinstance(j, bool) or float(j) != int(j) for j in disable_corrector):
            raise TypeError
    except (TypeError, ValueError, OverflowError):
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
