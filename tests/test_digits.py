"""The trained digits model: its weights bundle, its contract as a pyengine model, and the
quality of its samples, scored by the digit classifier and data statistics in the bundle
(no scikit-learn, no data set at test time)."""

from __future__ import annotations

import pytest
import torch

import pyengine as pe
from pyengine.models import digits as dg
from pyengine.models.train_digits import weights_digest


@pytest.fixture(scope="module")
def loaded():
    return dg.load_digits_model()


@pytest.fixture(scope="module")
def samples(loaded):
    """128 samples, DPM-Solver++(2M), 10 steps, fixed noise and seeds."""
    process, model, prediction = loaded
    noise = torch.randn(128, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    s = pe.Sampler(process, solver="dpmpp_2m", steps=10, prediction=prediction)
    return s.sample(model, noise, seed=0)


def test_bundle_is_small_and_intact():
    assert dg.WEIGHTS.stat().st_size < 5e6
    ck = dg.load_checkpoint()
    assert set(ck) == {"config", "model", "classifier", "reference", "meta"}
    # the digest train_digits printed: equal digests mean bitwise-equal weights
    assert weights_digest(ck["model"]) == ck["meta"]["weights_sha256"]
    assert ck["meta"]["classifier_accuracy"] > 0.9


def test_loader_contract(loaded):
    process, model, prediction = loaded
    assert isinstance(process, pe.processes.EDM) and prediction == "sample"
    assert process.time_kind == "sigma" and model.sample_shape == (1, 8, 8)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.5, 2.0, 10.0])
    out = model(x, sigma)
    assert out.shape == x.shape and out.dtype == torch.float32
    # any layout with 64 elements per sample and float64 in, the same numbers out
    out64 = model(x.reshape(3, 64).double(), sigma.double())
    assert out64.shape == (3, 64) and out64.dtype == torch.float64
    torch.testing.assert_close(out64.float().reshape(3, 1, 8, 8), out)


def test_denoiser_recovers_a_noised_sample(loaded, samples):
    """D(x0 + sigma n; sigma) at sigma = 0.5 leaves well under half of the noise's squared
    error (measured: 0.23; 0.38 at sigma 0.2, 0.15 at sigma 1)."""
    _, model, _ = loaded
    x0 = samples[:32]
    noisy = x0 + 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    d = model(noisy, torch.full((32,), 0.5))
    assert (d - x0).pow(2).mean() < 0.4 * (noisy - x0).pow(2).mean()


def test_samples_look_like_digits(samples):
    ref = dg.load_checkpoint()["reference"]
    q = dg.quality(samples)
    # The classifier's features of 128 samples are closer to the digits' than those of a
    # Gaussian with the digits' pixel mean and covariance, by more than a factor of 2
    # (measured: samples 8.5, 128 held-out real digits 5.9, the Gaussian 30.1).
    assert q["fd"] < 0.5 * ref["fd_gauss_128"], q
    # confident digits (real 0.98, the Gaussian 0.88, uniform noise 0.51), every class drawn
    assert q["confidence"] > 0.9, q
    assert min(q["classes"]) >= 5, q
    assert q["pixel_mean_err"] < 0.15, q
    px = dg.to_pixels(samples)
    assert px.shape == (128, 8, 8) and 0.1 < float(px.mean()) < 0.5


def test_quality_score_rejects_non_digits():
    g = torch.Generator().manual_seed(0)
    ref = dg.load_checkpoint()["reference"]
    noise = dg.quality(torch.rand(128, 64, generator=g), pixels=True)
    assert noise["fd"] > 5 * ref["fd_gauss_128"] and noise["confidence"] < 0.7


def test_training_script_reproduces_bitwise(tmp_path):
    """Two short runs with the same seed give bitwise-equal weights (the full run is the
    same command with the default --steps; see the module docstring)."""
    pytest.importorskip("sklearn")
    from pyengine.models import train_digits

    digests = []
    for name in ("a.pt", "b.pt"):
        assert train_digits.main(["--steps", "3", "--batch", "16", "--classifier-epochs", "1",
                                  "--out", str(tmp_path / name), "--quiet"]) == 0
        ck = dg.load_checkpoint(tmp_path / name)
        digests.append(ck["meta"]["weights_sha256"])
        assert weights_digest(ck["model"]) == digests[-1]
    assert digests[0] == digests[1]
    process, model, prediction = dg.load_digits_model(tmp_path / "a.pt")
    assert model(torch.zeros(1, 1, 8, 8), torch.ones(1)).shape == (1, 1, 8, 8)
