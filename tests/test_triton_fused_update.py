"""The Triton fused update (kernels/fused_update.py, backend "triton") under the interpreter.

TRITON_INTERPRET must be set before triton is imported, and it must not leak into the other
test modules (the compiled-kernel tests in tests/test_triton_cuda.py need the real compiler).
So in a normal pytest run this module holds one test that re-runs this same file in a child
pytest with TRITON_INTERPRET=1; in that child the real tests below run on small CPU tensors
(float32/float64: the interpreter has no bfloat16).

Tolerance (STYLE habit 5): the kernel's error against the float64 reference is at most twice
plain torch's own error at the same dtype, or one rounding of the result where torch is
exact. Noisy updates feed the kernel's normals (out = 0 x + 1 z, from the kernel itself) to
the reference; the words are checked bit for bit against pyengine.noise and the C++ header.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

if not INTERPRETED:
    def test_under_the_triton_interpreter():
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-x", str(Path(__file__))], env=env, capture_output=True, text=True,
                           cwd=Path(__file__).parent.parent, timeout=600, check=False)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout

    @pytest.mark.parametrize("f64,noise_mode,aux_mode,coef_table,mask_mode", [
        (False, 1, 1, False, 0), (True, 2, 2, True, 0), (False, 1, 1, False, 1)],
        ids=["f32-philox-aux", "f64-tables", "f32-philox-aux-mask"])
    def test_compiles_for_sm90_without_a_gpu(f64, noise_mode, aux_mode, coef_table, mask_mode):
        """The interpreter is lenient (it ran a kernel the compiler rejected: a global that was
        not a tl.constexpr); compiling to PTX and a cubin for sm_90 (Triton's bundled ptxas)
        needs no GPU. With 16-byte aligned pointers the loads and stores are 128-bit."""
        triton = pytest.importorskip("triton")
        tl = pytest.importorskip("triton.language")
        from triton.backends.compiler import GPUTarget

        from kernels.fused_update import fused_update_kernel as fn

        names = fn.arg_names
        sig = {}
        for n in names:
            if n in ("CT", "ACT", "MCT", "NCT"):
                sig[n] = "*fp64"
            elif n in ("SEEDS", "STEP"):
                sig[n] = "*i64"
            elif n == "MASK":
                sig[n] = "*bf16"                     # a mask in another dtype than the data
            elif n in ("OUT", "AUX", "NOISE") or (n[0] == "X" and n[1:].isdigit()):
                sig[n] = "*fp64" if f64 else "*bf16" if n == "X1" else "*fp32"
            elif n == "NC" or (n[0] in "CAM" and n[1:].isdigit()):
                sig[n] = "fp32"
            elif n in ("cs", "acs", "mcs", "ncs", "sts", "N", "SIZE_BUCKET"):
                sig[n] = "i64"
            else:
                sig[n] = "constexpr"
        const = {"K": 3, "COEF_TABLE": coef_table, "AUX_MODE": aux_mode,
                 "NOISE_MODE": noise_mode, "NC_TABLE": f64, "MASK_MODE": mask_mode,
                 "BLOCK_Q": 256, "CDT": tl.float64 if f64 else tl.float32}
        attrs = {(names.index(n),): [["tt.divisibility", 16]]
                 for n in names if sig[n].startswith("*") or n == "N"}
        src = triton.compiler.ASTSource(
            fn=fn, signature=sig, attrs=attrs,
            constexprs={(names.index(k),): v for k, v in const.items()})
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": 4, "enable_fp_fusion": True})
        except RuntimeError as e:               # no ptxas in this triton install
            if "ptxas" in str(e):
                pytest.skip(str(e))
            raise
        ptx = k.asm["ptx"]
        assert "cubin" in k.asm and ("st.global.v2.b64" if f64 else "st.global.v4") in ptx
        if noise_mode == 1:
            assert "mul.hi.u32" in ptx
else:
    pytest.importorskip("triton")
    from reference import fused_update_reference

    import pyengine as pe
    from pyengine.backends import _native, cpp, torch_ref
    from pyengine.backends import triton_backend as tb
    from pyengine.backends.dispatch import Call
    from pyengine.models import GaussianMixture
    from pyengine.noise import philox4x32, philox_normal, sample_seed, seeds_tensor

    DTYPES = [torch.float32, torch.float64]

    def _bufs(K, shape, dtype, g):
        return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
                for _ in range(K)]

    def _coef(kind, B, K, g):
        if kind == "per_step":
            return torch.randn(K, generator=g, dtype=torch.float64).numpy()
        return torch.randn(B, K, generator=g, dtype=torch.float64)

    def _scale(bufs, coef, nc=0.0, noise=None):
        if bufs[0].numel() == 0:
            return 0.0
        c = torch.as_tensor(coef, dtype=torch.float64).abs()
        c = c.max(0).values if c.dim() == 2 else c
        s = sum(float(c[k]) * b.double().abs().max().item() for k, b in enumerate(bufs))
        if noise is not None:
            ncm = nc.abs().max().item() if isinstance(nc, torch.Tensor) else abs(nc)
            s += ncm * noise.double().abs().max().item()
        return s

    def kernel_normals(seeds, step, shape):
        x = torch.zeros(shape)
        z = torch.empty(shape)
        tb.fused_update(z, [x], np.array([0.0]), 1.0, seeds, step)
        return z

    def check(bufs, coef, nc=0.0, seeds=None, step=-1, aux_coef=None, noise=None,
              out_alias=None, fn=None):
        """Run triton and torch on the same inputs; triton's error <= 2x torch's."""
        fn = fn or tb.fused_update
        ref_in = [b.clone() for b in bufs]
        shape, dtype = bufs[0].shape, bufs[0].dtype
        ref_noise = noise
        if noise is None and (isinstance(nc, torch.Tensor) or nc != 0.0):
            ref_noise = kernel_normals(seeds, step, shape)
        ref, ref_aux = fused_update_reference(ref_in, coef, nc, seeds, step, aux_coef,
                                              ref_noise)
        t_out = torch.empty(shape, dtype=dtype)
        t_aux = torch.empty(shape, dtype=dtype) if aux_coef is not None else None
        torch_ref.fused_update(t_out, [b.clone() for b in ref_in], coef, nc, seeds, step,
                               t_aux, aux_coef, noise=ref_noise)
        out = bufs[out_alias] if out_alias is not None else torch.empty(shape, dtype=dtype)
        aux = torch.empty(shape, dtype=dtype) if aux_coef is not None else None
        res = fn(out, bufs, coef, nc, seeds, step, aux, aux_coef, noise=noise)
        assert res is out and out.dtype == dtype and out.shape == shape
        eps = torch.finfo(dtype).eps
        for got, want, mine, coefs in ((out, ref, t_out, coef), (aux, ref_aux, t_aux, aux_coef)):
            if got is None:
                continue
            scale = _scale(ref_in, coefs, nc if got is out else 0.0,
                           ref_noise if got is out else None)
            err = (got.double() - want).abs().max().item() if got.numel() else 0.0
            torch_err = (mine.double() - want).abs().max().item() if got.numel() else 0.0
            assert err <= max(2 * torch_err, eps * scale), (err, torch_err, eps * scale)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("K", range(1, tb.K_MAX + 1))
    @pytest.mark.parametrize("kind", ["per_step", "per_sample"])
    def test_k_dtype_sweep(dtype, K, kind):
        """Prime per-sample size (131), Philox noise with per-sample c_z, an aux output."""
        g = torch.Generator().manual_seed(100 * K + DTYPES.index(dtype))
        B, shape = 3, (3, 131)
        nc = torch.rand(B, generator=g, dtype=torch.float64)
        check(_bufs(K, shape, dtype, g), _coef(kind, B, K, g), nc, seeds_tensor(7, B), K,
              _coef(kind, B, K, g))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(1, 7), (2, 3, 5, 7), (2, 1031), (0, 5), (3, 0)],
                             ids=lambda s: "x".join(map(str, s)))
    def test_shapes(dtype, shape):
        """Batch 1, primes, several programs per sample (block 64 quads), empty tensors."""
        g = torch.Generator().manual_seed(sum(shape))
        check(_bufs(3, shape, dtype, g), _coef("per_step", shape[0], 3, g), 0.37,
              seeds_tensor(3, shape[0]), 11)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("noise_kind", ["none", "philox", "tensor"])
    @pytest.mark.parametrize("nc_kind", ["scalar", "per_sample"])
    def test_noise_aux_combinations(dtype, noise_kind, nc_kind):
        g = torch.Generator().manual_seed(17)
        B, K, shape = 4, 3, (4, 2, 5, 7)
        bufs = _bufs(K, shape, dtype, g)
        coef, aux_coef = _coef("per_sample", B, K, g), _coef("per_step", B, K, g)
        if noise_kind == "none":
            check(bufs, coef, 0.0, None, -1, aux_coef)
            return
        nc = torch.rand(B, generator=g, dtype=torch.float64) if nc_kind == "per_sample" \
            else 0.8
        noise = torch.randn(shape, generator=g, dtype=dtype) if noise_kind == "tensor" else None
        check(bufs, coef, nc, seeds_tensor(5, B), 3, aux_coef, noise)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("alias", [0, 2])
    def test_output_aliases_an_input(dtype, alias):
        g = torch.Generator().manual_seed(alias)
        check(_bufs(3, (3, 517), dtype, g), _coef("per_sample", 3, 3, g), 0.5,
              seeds_tensor(1, 3), 2, _coef("per_step", 3, 3, g), out_alias=alias)

    def test_non_contiguous_and_mixed_dtypes():
        g = torch.Generator().manual_seed(6)
        a = torch.randn(3, 40, generator=g, dtype=torch.float64)
        b = torch.randn(40, 3, generator=g).t()
        out = torch.empty(3, 80)[:, ::2]
        tb.fused_update(out, [a, b], np.array([0.3, -1.1]))
        torch.testing.assert_close(out, 0.3 * a.float() + -1.1 * b, rtol=0, atol=1e-6)

    def test_step_and_seeds_are_read_from_memory():
        """A step given as a tensor (what a captured graph rewrites) gives that draw."""
        seeds = seeds_tensor(9, 2)
        step = torch.tensor([5], dtype=torch.int64)
        x = torch.zeros(2, 37)
        z = torch.empty_like(x)
        tb.fused_update(z, [x], np.array([0.0]), 1.0, seeds, step)
        assert torch.equal(z, kernel_normals(seeds, 5, (2, 37)))
        step.fill_(6)
        seeds.copy_(seeds_tensor(10, 2))
        tb.fused_update(z, [x], np.array([0.0]), 1.0, seeds, step)
        assert torch.equal(z, kernel_normals(seeds_tensor(10, 2), 6, (2, 37)))

    @pytest.mark.parametrize("seed,step,q0", [(0, 0, 0), (2 ** 64 - 1, 2 ** 32 - 1, 7),
                                              (sample_seed(5, 2), 9, 2 ** 32 - 70),
                                              (0xDEADBEEFCAFEF00D, 123456, 2 ** 40 + 3)])
    def test_philox_words_bit_exact(seed, step, q0):
        nq = 301
        got = tb.philox_words(seed, step, nq, q0=q0)
        q = torch.arange(q0, q0 + nq, dtype=torch.int64)
        want = philox4x32(q & 0xFFFFFFFF, q >> 32, torch.full_like(q, step),
                          torch.zeros_like(q), torch.tensor(seed & 0xFFFFFFFF),
                          torch.tensor(seed >> 32))
        assert torch.equal(got, torch.stack(want, dim=1))
        if _native._C is not None:
            assert torch.equal(got, cpp.philox_words(seed, step, nq, q0=q0))

    def test_kernel_normals_match_torch_and_cpp():
        seeds = seeds_tensor([0, 1, 2 ** 64 - 1, sample_seed(77, 3)], 4)
        for step, numel in ((0, 1), (5, 3), (2 ** 32 - 1, 1031)):
            z = kernel_normals(seeds, step, (4, numel))
            torch.testing.assert_close(z, philox_normal(seeds, step, numel), rtol=0, atol=1e-6)
            if _native._C is not None:
                torch.testing.assert_close(z, cpp.philox_normal(seeds, step, numel), rtol=0,
                                           atol=1e-6)

    def test_triton_op_matches_the_direct_call():
        """torch.ops.pyengine.triton_fused_update (the torch.compile boundary), eagerly."""
        g = torch.Generator().manual_seed(12)
        bufs = _bufs(3, (4, 2, 33), torch.float32, g)
        check(bufs, _coef("per_sample", 4, 3, g), 0.4, seeds_tensor(2, 4), 1,
              _coef("per_step", 4, 3, g), fn=tb.fused_update_op)

    def test_interpreter_path_is_reported():
        assert tb.unavailable_reason("cpu") is None
        x = torch.zeros(2, 3, dtype=torch.bfloat16)
        why = tb.reasons_unsupported(Call.of(x, [x]))
        assert any("bfloat16" in w and "interpreter" in w for w in why)

    @pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "ddpm"])
    def test_solvers_end_to_end(name):
        """A few solvers through the interpreted kernel match the torch backend (every
        solver runs through the compiled kernel in tests/test_triton_cuda.py)."""
        known = {i.name for i in pe.list_solvers()}
        if name not in known:
            pytest.skip(f"{name} is not registered")
        proc = pe.processes.VP.discrete("linear")
        gmm = GaussianMixture.random(d=16, M=4, seed=0)
        x = torch.randn(3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        model = gmm.as_model(proc, "epsilon")
        runs = [pe.Sampler(proc, solver=name, steps=6).sample(model, x, backend=be,
                                                              seed=[5, 2 ** 64 - 1, 9])
                for be in ("torch", "triton")]
        torch.testing.assert_close(runs[1], runs[0], rtol=0,
                                   atol=1e-5 * max(1.0, runs[0].abs().max().item()))
