"""pyengine.plots: the measurements behind the plots, the dependency-free PNG writer, and the
matplotlib figures (skipped when matplotlib is not installed)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine import plots

KERNEL_HEAD = ("| update | shape | dtype | fused us (p10-p90) | GB/s | % copy | unfused torch us "
               "| diffusers us | vs diffusers | vs unfused |")
BENCH_MD = f"""# fused update benchmark: some CPU

{KERNEL_HEAD}
|---|---|---|---|---|---|---|---|---|---|
| DDIM (K=2) | 16x4x128x128 | float32 | 310 (300-330) | 12.9 | 80% | 900 (880-950) \
| 2100 (2000-2300) | 6.8x | 2.9x |
| Euler (K=2) | 16x4x128x128 | float32 | 305 (298-320) | 13.1 | 81% | 880 (870-900) \
| 1500 (1450-1600) | 4.9x | 2.9x |

| solver | NFE | cpp us/step (p10-p90) | GB/s | % copy | torch us/step | speedup |
|---|---|---|---|---|---|---|
| euler | 10 | 95 (80-922) | 8.3 | 81% | 1003 (191-1044) | 10.5x |
| heun | 19 | 186 (153-1003) | 9.3 | 90% | 1281 (1247-2128) | 6.9x |
"""


def read_png(path):
    """(width, height, color type, pixel rows) of a PNG written with filter 0 on every row."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        crc = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    ch = 3 if color == 2 else 1
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + w * ch)
    assert (rows[:, 0] == 0).all()
    return w, h, color, rows[:, 1:].reshape(h, w, ch).squeeze(-1) if ch == 1 else \
        rows[:, 1:].reshape(h, w, ch)


# ---------------------------------------------------------------------------------------
# no matplotlib needed
# ---------------------------------------------------------------------------------------


def test_image_grid_png_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(7, 1, 8, 8, generator=g)
    path = plots.save_image_grid(imgs, tmp_path / "g.png", nrow=3, scale=2)
    w, h, color, px = read_png(path)
    assert color == 0 and (w, h) == (2 * (3 * 9 + 1), 2 * (3 * 9 + 1))
    # tile 4 (row 1, column 1), top-left pixel, repeated 2x2
    want = int(float(imgs[4, 0, 0, 0]) * 255 + 0.5)
    y0 = x0 = 2 * (1 + 9)
    assert (px[y0:y0 + 2, x0:x0 + 2] == want).all()
    rgb = plots.save_png(np.full((5, 4, 3), 200, dtype=np.uint8), tmp_path / "c.png")
    assert read_png(rgb)[:3] == (4, 5, 2)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        plots.image_grid(torch.rand(2, 2, 4, 4))


def test_fit_order():
    n = np.array([8, 16, 32, 64])
    assert plots.fit_order(n, 3.0 * n ** -2.0) == pytest.approx(2.0)
    assert plots.fit_order(n, [1.0, 0.5, 0.0, float("nan")]) == pytest.approx(1.0)
    assert np.isnan(plots.fit_order([8], [1.0]))


def test_parse_markdown_tables():
    tables = plots.parse_markdown_tables(BENCH_MD)
    assert [len(t[1]) for t in tables] == [2, 2]
    assert tables[1][0][:3] == ["solver", "NFE", "cpp us/step (p10-p90)"]
    assert tables[1][1][1] == ["heun", "19", "186 (153-1003)", "9.3", "90%", "1281 (1247-2128)",
                               "6.9x"]


def _featured(stochastic):
    return [i.name for i in pe.solvers.registry.featured() if i.stochastic == stochastic]


def test_error_vs_nfe_measures_the_declared_orders():
    names = _featured(False)
    assert len(names) >= 2
    res = plots.gmm_error_vs_nfe(names, nfes=(16, 32, 64))
    assert sorted(res) == sorted(names)
    for name, pts in res.items():
        order = plots.fit_order([p[0] for p in pts], [p[1] for p in pts])
        assert abs(order - pe.solvers.get(name).order) < 0.35, (name, pts)


# ---------------------------------------------------------------------------------------
# matplotlib figures
# ---------------------------------------------------------------------------------------


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def _is_png(path, min_size=2000):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_size


def test_plots_write_pngs(mpl, tmp_path):
    import matplotlib.image

    det, sto = _featured(False)[:2], _featured(True)[:1]
    res = plots.gmm_error_vs_nfe(det, nfes=(8, 16, 32))
    p1 = plots.plot_error_vs_nfe(res, tmp_path / "err.png")
    data, samples = plots.gmm_scatter(det[:1] + sto, nfe=6, n=200)
    assert data.shape == (200, 2) and all(v.shape == (200, 2) for v in samples.values())
    p2 = plots.plot_scatter(data, samples, tmp_path / "scatter.png")
    g = torch.Generator().manual_seed(0)
    grid = {(s, n): torch.rand(16, 8, 8, generator=g) for s in det for n in (5, 10)}
    p3 = plots.plot_digits_grid(grid, tmp_path / "digits.png")
    p4 = plots.plot_bench(BENCH_MD, tmp_path / "bench.png")
    for p in (p1, p2, p3, p4):
        assert _is_png(p), p
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 300
    with pytest.raises(ValueError, match="no markdown table"):
        plots.plot_bench("no table here", tmp_path / "x.png")
