"""The dispatcher: the chosen backend per device and dtype, forcing, and errors that list
every backend with its reasons. No timing: the measured ranking is exercised through a
ranking file written by the test itself."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from pyengine import backends
from pyengine.backends import dispatch
from pyengine.backends.dispatch import Call
from pyengine.fused_update import native

HAS_NUMBA = dispatch.REGISTRY["numba"].unavailable_reason("cpu") is None
HAS_CPP = native._C is not None


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.delenv("PYENGINE_BACKEND", raising=False)
    monkeypatch.setenv("PYENGINE_RANKING_FILE", str(tmp_path / "ranking.json"))
    dispatch._ORDER_CACHE.clear()
    yield
    dispatch._ORDER_CACHE.clear()


def _call(dtype, device="cpu", K=3):
    return Call.typical(device, dtype, K=K)


def test_every_backend_is_registered_with_the_priorities():
    assert set(backends.names()) == {"torch", "cpp", "cuda", "numba", "triton"}
    assert backends.priority("cpu") == ("cpp", "numba", "torch")
    assert backends.priority("cuda") == ("cuda", "triton", "torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_choice_per_dtype(dtype, monkeypatch):
    want = "cpp" if HAS_CPP else ("numba" if HAS_NUMBA and dtype in (torch.float32,
                                                                    torch.float64) else "torch")
    assert backends.select(_call(dtype)).name == want
    assert backends.get(dtype=dtype).name == want
    # without the extension: numba for float32/float64, torch for the half types
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "IMPORT_ERROR", "pyengine._C is not built (test)")
    half = dtype in (torch.float16, torch.bfloat16)
    assert backends.select(_call(dtype)).name == ("numba" if HAS_NUMBA and not half else "torch")


def test_a_concrete_call_picks_per_dtype(monkeypatch):
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "IMPORT_ERROR", "pyengine._C is not built (test)")
    x32, xh = torch.randn(2, 5), torch.randn(2, 5).to(torch.bfloat16)
    assert backends.select(Call.of(x32, [x32])).name == ("numba" if HAS_NUMBA else "torch")
    assert backends.select(Call.of(xh, [xh])).name == "torch"
    out = torch.empty_like(xh)
    backends.fused_update(out, [xh], np.array([2.0]))
    assert torch.equal(out, (2 * xh.float()).to(torch.bfloat16))


def test_too_many_buffers_go_to_torch():
    assert backends.select(_call(torch.float32, K=9)).name == "torch"
    assert any("at most 8" in w for w in backends.reasons("cpp", _call(torch.float32, K=9)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_cuda_without_a_gpu_lists_every_reason():
    with pytest.raises(ValueError) as e:
        backends.select(_call(torch.float32, "cuda"))
    msg = str(e.value)
    assert "no backend can run this call (cuda" in msg
    for name in ("torch", "cpp", "cuda", "numba", "triton"):
        assert f"\n  {name}: " in msg
    assert "not cuda" in msg and "no CUDA device" in msg


def test_impossible_dtype_raises_with_every_backends_reasons():
    with pytest.raises(ValueError) as e:
        backends.select(_call(torch.int32))
    msg = str(e.value)
    for name in backends.names():
        line = next(ln for ln in msg.splitlines() if ln.startswith(f"  {name}: "))
        assert "int32" in line, line


@pytest.mark.parametrize("name", ["torch", "cpp", "numba"])
def test_forcing_by_argument_and_environment(name, monkeypatch):
    if dispatch.unavailable_reason(name, "cpu") is not None:
        pytest.skip(dispatch.unavailable_reason(name, "cpu"))
    assert backends.get(name).name == name
    assert backends.get(name, device="cpu").name == name
    monkeypatch.setenv("PYENGINE_BACKEND", name)
    assert backends.get().name == name
    assert backends.select(_call(torch.float32)).name == name


def test_forcing_what_cannot_run_says_why(monkeypatch):
    if HAS_NUMBA:
        with pytest.raises(ValueError, match="backend 'numba' cannot run: float32/float64 only"):
            backends.select(_call(torch.bfloat16), "numba")
    with pytest.raises(ValueError, match="backend 'triton' cannot run"):
        backends.get("triton", device="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.get("tpu")
    monkeypatch.setenv("PYENGINE_BACKEND", "nope")
    with pytest.raises(ValueError, match="got 'nope'"):
        backends.get()


def test_forced_backend_runs_through_the_sampler(monkeypatch):
    import pyengine as pe
    from pyengine.models import GaussianMixture
    proc = pe.processes.VP.discrete("linear")
    gmm = GaussianMixture.random(d=8, M=2, seed=0)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = pe.Sampler(proc, solver="euler", steps=4).sample(gmm.as_model(proc, "epsilon"), x,
                                                            backend="torch")
    if HAS_NUMBA:
        monkeypatch.setenv("PYENGINE_BACKEND", "numba")
        got = pe.Sampler(proc, solver="euler", steps=4).sample(gmm.as_model(proc, "epsilon"), x)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_a_cached_ranking_reorders_and_a_missing_one_does_not(tmp_path):
    assert dispatch.order("cpu") == ("cpp", "numba", "torch")
    path = tmp_path / "ranking.json"
    path.write_text(json.dumps({dispatch.device_name("cpu"): {"order": ["torch", "numba"]}}))
    dispatch._ORDER_CACHE.clear()
    assert dispatch.order("cpu") == ("torch", "numba", "cpp")
    assert backends.select(_call(torch.float32)).name == "torch"
    path.write_text("not json")
    dispatch._ORDER_CACHE.clear()
    with pytest.warns(RuntimeWarning, match="ranking file"):
        assert dispatch.order("cpu") == ("cpp", "numba", "torch")


@pytest.mark.parametrize("content", [
    [], ["torch"], "torch", 3, {"DEVICE": ["torch", "numba"]}, {"DEVICE": {"order": "torch"}},
    {"DEVICE": {"order": [1, 2]}}, {"DEVICE": {"order": None}}, {"DEVICE": {"seconds": {}}},
    {"DEVICE": None}], ids=lambda c: type(c).__name__ + str(len(str(c))))
def test_a_malformed_ranking_file_is_ignored_with_one_warning(tmp_path, content):
    """Issue 13 #10: valid JSON of the wrong structure broke every sample() with a TypeError
    or AttributeError that did not name the file; the entry is ignored, with one warning
    naming the file, and sampling works."""
    import warnings

    import pyengine as pe
    from pyengine.models import GaussianMixture

    path = tmp_path / "ranking.json"
    dev = dispatch.device_name("cpu")
    if isinstance(content, dict):
        content = {dev: v for v in content.values()}
    path.write_text(json.dumps(content))
    dispatch._ORDER_CACHE.clear()
    dispatch._WARNED.clear()
    with pytest.warns(RuntimeWarning, match=re.escape(str(path))) as rec:
        assert dispatch.order("cpu") == ("cpp", "numba", "torch")
    assert len(rec) == 1
    proc = pe.processes.VP.discrete("linear")
    gmm = GaussianMixture.random(d=4, M=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # warned once already: not again
        dispatch._ORDER_CACHE.clear()
        dispatch.order("cpu")
        x = pe.Sampler(proc, solver="ddim", steps=3).sample(gmm.as_model(proc, "epsilon"),
                                                            torch.randn(2, 4), seed=0)
    assert torch.isfinite(x).all()


def test_rank_writes_the_ranking_file(tmp_path):
    times = dispatch.rank("cpu", Call.typical("cpu", K=2, shape=(4, 256)), reps=2)
    names = [n for n, _ in times]
    assert "torch" in names and all(t > 0 for _, t in times)
    data = json.loads((tmp_path / "ranking.json").read_text())
    assert data[dispatch.device_name("cpu")]["order"] == names
    assert dispatch.order("cpu")[: len(names)] == tuple(names)


def test_explain_and_available():
    reasons = backends.explain("cpu")
    assert set(reasons) == set(backends.names())
    assert reasons["torch"] is None and "not cpu" in reasons["cuda"]
    assert "CUDA" in reasons["triton"]
    assert "torch" in backends.available()
    assert ("numba" in backends.available()) == HAS_NUMBA


def test_import_does_not_load_numba_or_triton():
    import subprocess
    import sys
    code = ("import sys, pyengine, pyengine.backends as b; b.get('torch'); "
            "print('numba' in sys.modules, 'triton' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.stdout.split() == ["False", "False"], r.stdout + r.stderr


def test_info_shows_every_backend_and_the_choice(capsys, monkeypatch, tmp_path):
    from pyengine import cli
    monkeypatch.setenv("PYENGINE_RANK", "1")
    monkeypatch.setattr(dispatch, "rank", lambda dev: [("torch", 1e-3)])   # no timing here
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "devices: cpu:" in out and "measured on cpu: torch 1000 us" in out
    for name in backends.names():
        assert f"\n  {name} " in out
    chosen = backends.select(Call.typical("cpu")).name
    assert f"chosen for a typical call (cpu, float32, K=3, [4, 4, 64, 64]): {chosen}" in out
