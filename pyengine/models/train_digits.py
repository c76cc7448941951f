"""Train the built-in digits denoiser (``pyengine/models/digits.pt``) from scratch.

    nice python -m pyengine.models.train_digits            # ~5 min on one CPU thread

Data: the 1797 8x8 digits that scikit-learn ships (``sklearn.datasets.load_digits``, no
download; scikit-learn is needed only here), pixels 0..16 mapped to [-1, 1].

Objective: EDM (Karras et al. 2022, Table 1): log sigma ~ N(P_mean, P_std^2), loss
lambda(sigma) ||D(x + sigma n; sigma) - x||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2
and D the preconditioned network of :mod:`pyengine.models.digits` (sd = the data's std):
:func:`pyengine.training.denoising_loss` with prediction "sample", weighting "edm" and
sigma sampling "lognormal" (:func:`denoiser_loss`).
Adam with a linear warm-up and cosine decay; the saved weights are an exponential moving
average of the trained ones.

The bundle also carries a small MLP digit classifier (trained here on 1497 digits, accuracy
measured on the 300 held out) and the reference statistics :func:`digits.quality` scores
samples against, so the tests need neither scikit-learn nor the data.

Reproducibility: everything is seeded (``--seed``, default 0) and runs with
``torch.use_deterministic_algorithms(True)`` on a fixed number of threads (``--threads``,
default 1), so the same command on the same machine and torch build gives the same weights
bit for bit (their sha256, printed and kept in ``meta["weights_sha256"]``; the file also
records the training time, which differs); other CPUs, thread counts or torch versions give
equivalent, not identical, weights.

The committed file: the defaults (1200 steps of 128, seed 0), 347k parameters, 1.5 MB,
final loss 0.3285 (the running average of the weighted loss), weights sha256
c5fb211fc620cd77..., reproduced by two runs (354 s and 663 s on one thread of a shared
2-core AMD EPYC, torch 2.13.0+cpu).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import torch

from ..processes import EDM
from ..training import denoising_loss
from .digits import (
    WEIGHTS,
    DigitsClassifier,
    DigitsDenoiser,
    DigitsUNet,
    frechet_distance,
    from_pixels,
    to_pixels,
)

# EDM's training distribution of noise levels and the sampling range (Karras 2022, Table 1).
P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
HELD_OUT = 300            # digits the classifier is not trained on (its accuracy, fd_real)


def load_data():
    """(x [1797, 1, 8, 8] in [-1, 1], labels [1797]) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("train_digits needs scikit-learn: pip install scikit-learn")
    d = load_digits()
    return from_pixels(torch.from_numpy(d.data)), torch.from_numpy(d.target).long()


def denoiser_loss(model, process: EDM, x0, generator: torch.Generator) -> torch.Tensor:
    """The EDM objective of one batch; draws sigma [B] then the noise from ``generator``."""
    return denoising_loss(model, process, x0, prediction="sample", weighting="edm",
                          sigma_sampling="lognormal", generator=generator,
                          sampling_options={"p_mean": P_MEAN, "p_std": P_STD})


def train_denoiser(x, *, steps, batch, lr, ch, emb, ema_decay, seed, log_every, quiet):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sigma_data = float(x.std())
    net = DigitsUNet(ch=ch, emb=emb)
    model = DigitsDenoiser(net, sigma_data)
    process = EDM(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=sigma_data)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    n = x.shape[0]
    perm, pos = torch.randperm(n, generator=g), 0
    running, t0 = None, time.perf_counter()
    for step in range(steps):
        # lr: linear warm-up over the first 5%, then cosine to 0
        f = (step + 1) / warmup if step < warmup else \
            0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * f
        # batch: epochs of a seeded permutation
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        x0 = x[perm[pos:pos + batch]]
        pos += batch
        loss = denoiser_loss(model, process, x0, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k, v in net.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(ema_decay).add_(v, alpha=1 - ema_decay)
                else:
                    ema[k].copy_(v)
        lv = float(loss.detach())
        running = lv if running is None else 0.98 * running + 0.02 * lv
        if not quiet and ((step + 1) % log_every == 0 or step + 1 == steps):
            el = time.perf_counter() - t0
            print(f"step {step + 1:5d}/{steps}  loss {running:.4f}  lr {lr * f:.2e}  "
                  f"{el:6.1f} s", flush=True)
    return ema, sigma_data, running, time.perf_counter() - t0


def train_classifier(x, y, *, seed, epochs=60, batch=64):
    """An MLP on 1497 digits; returns (classifier, held-out accuracy, held-out indices)."""
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    perm = torch.randperm(x.shape[0], generator=g)
    test, train = perm[:HELD_OUT], perm[HELD_OUT:]
    pix = to_pixels(x).reshape(-1, 64)
    clf = DigitsClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        order = train[torch.randperm(train.numel(), generator=g)]
        for i in range(0, order.numel(), batch):
            idx = order[i:i + batch]
            loss = torch.nn.functional.cross_entropy(clf(pix[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(pix[test]).argmax(1) == y[test]).float().mean())
    return clf, acc, test


@torch.no_grad()
def reference_stats(clf, x, test, seed):
    """Feature statistics of all digits, and the scores of two yardsticks at n = 64, 128 and
    256 samples: real held-out digits (``fd_real_n``: the floor at that sample count; the
    estimate's bias grows as n shrinks) and a Gaussian with the data's pixel mean and
    covariance (``fd_gauss_n``: what matching second moments alone scores)."""
    pix = to_pixels(x).reshape(-1, 64)
    f = clf.features(pix).to(torch.float64)
    mu = f.mean(0)
    cov = (f - mu).T @ (f - mu) / (f.shape[0] - 1)

    def fd_conf(p):
        h = clf.features(p).to(torch.float64)
        m = h.mean(0)
        c = (h - m).T @ (h - m) / (h.shape[0] - 1)
        conf = float(torch.softmax(clf.head(h.float()), 1).max(1).values.mean())
        return frechet_distance(m, c, mu, cov), conf

    g = torch.Generator().manual_seed(seed + 2)
    p64 = pix.to(torch.float64)
    pm = p64.mean(0)
    pc = (p64 - pm).T @ (p64 - pm) / (p64.shape[0] - 1)
    lam, U = torch.linalg.eigh(pc)
    z = torch.randn(256, 64, generator=g, dtype=torch.float64)
    gauss = (pm + (z * lam.clamp_min(0).sqrt()) @ U.T).clamp(0, 1).float()
    ref = {"feat_mean": mu, "feat_cov": cov, "pixel_mean": pm,
           "confidence_real": fd_conf(pix[test])[1], "confidence_gauss": fd_conf(gauss)[1]}
    for n in (64, 128, 256):
        ref[f"fd_real_{n}"] = fd_conf(pix[test[:n]])[0]
        ref[f"fd_gauss_{n}"] = fd_conf(gauss[:n])[0]
    return ref


def weights_digest(state: dict) -> str:
    """sha256 of the weights' names and bytes: equal digests mean bitwise-equal weights
    (the file itself also records the training time, which differs between runs)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyengine.models.train_digits",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps (default 1200)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--ch", type=int, default=32, help="U-Net channels at 8x8 (default 32)")
    p.add_argument("--emb", type=int, default=128, help="embedding width (default 128)")
    p.add_argument("--ema", type=float, default=0.997, help="EMA decay per step (default 0.997)")
    p.add_argument("--classifier-epochs", type=int, default=60,
                   help="epochs of the scoring classifier (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1; bitwise reproducible for a fixed count)")
    p.add_argument("--out", type=Path, default=WEIGHTS, help=f"output file (default {WEIGHTS})")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(a)
    finally:                         # leave a calling process (a test) as it was
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(a) -> int:
    x, y = load_data()
    clf, acc, test = train_classifier(x, y, seed=a.seed, epochs=a.classifier_epochs)
    if not a.quiet:
        print(f"classifier: held-out accuracy {acc:.3f} on {HELD_OUT} digits", flush=True)
    ema, sigma_data, loss, seconds = train_denoiser(
        x, steps=a.steps, batch=a.batch, lr=a.lr, ch=a.ch, emb=a.emb, ema_decay=a.ema,
        seed=a.seed, log_every=a.log_every, quiet=a.quiet)
    ref = reference_stats(clf, x, test, a.seed)
    bundle = {
        "config": {"ch": a.ch, "emb": a.emb, "sigma_data": sigma_data,
                   "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX},
        "model": {k: v.contiguous() for k, v in ema.items()},
        "classifier": clf.state_dict(),
        "reference": ref,
        "meta": {"seed": a.seed, "steps": a.steps, "batch": a.batch, "lr": a.lr,
                 "ema": a.ema, "threads": a.threads, "final_loss": loss,
                 "train_seconds": seconds, "classifier_accuracy": acc,
                 "torch": str(torch.__version__),
                 "objective": "EDM preconditioning, x0 (denoiser) output, "
                              f"log sigma ~ N({P_MEAN}, {P_STD}^2)"},
    }
    digest = weights_digest(bundle["model"])
    bundle["meta"]["weights_sha256"] = digest
    torch.save(bundle, a.out)
    n_params = sum(v.numel() for v in ema.values())
    if not a.quiet:
        print(f"wrote {a.out}: {n_params} parameters, {a.out.stat().st_size / 1e6:.2f} MB, "
              f"weights sha256 {digest[:16]}; final loss {loss:.4f}; {seconds:.0f} s; "
              f"fd at 256 samples: real digits {ref['fd_real_256']:.2f}, Gaussian "
              f"{ref['fd_gauss_256']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
