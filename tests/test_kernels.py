"""The CUDA code, checked on a machine without a GPU (DESIGN §9):

- compile: every kernel instantiation compiles with NVRTC for sm_80 and sm_90, without
  spills and at its occupancy bar (ptxas's report, tests/kernel_resources.py);
- execute: kernels/gpuloss_math.cuh, compiled with g++, against float64 references;
- execute: every kernel of kernels/gpuloss_kernels.cu, compiled with g++ and run by the CPU
  emulator through the backend's own launch code, against the NumPy backend.

A changed operator or constant anywhere in kernels/ makes one of these fail.
"""

from __future__ import annotations

import ctypes
import json
import zipfile

import numpy as np
import pytest
from agreement import assert_within_one_bfloat16_rounding
from conftest import make_inputs, require
from reference import ALL, CATEGORICAL, ELEMENTWISE, LABELED, target_kinds
from test_losses import REDUCTIONS, _cases, _options

import gpuloss as gl
from gpuloss import _api
from gpuloss.backends import cuda as _cuda_backend


@pytest.fixture(scope="session")
def host_lib():
    import kernel_host

    return kernel_host.build(kernel_host.cache_dir())  # device mode, shared with test_emulated


@pytest.fixture
def runtime(host_lib):
    import kernel_host

    return kernel_host.EmulatorRuntime(host_lib)


# ---------------------------------------------------------------------------------------------
# NVRTC


def _check_rows(rows):
    spilling = [(r["kernel"], r["registers"], r["spill_stores"], r["spill_loads"])
                for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"{len(spilling)} instantiations spill: {spilling[:10]}"
    below = [(r["kernel"], r["registers"], r["occupancy"]) for r in rows
             if r["occupancy"] < r["bar"]]
    assert not below, f"{len(below)} instantiations below their occupancy bar: {below[:10]}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_without_spills_at_their_occupancy_bar(arch):
    """The instantiations compile with NVRTC under CuPy's options, and ptxas's report says:
    no spill stores or loads, and resident warps per SM at the bars (elementwise kernels half
    the SM, row kernels on 4- and 2-byte data a quarter). A sample of one instantiation per
    kernel, functor variant and dtype (every one with GPULOSS_FULL_SWEEPS=1, the nightly run);
    the sample's report must equal the committed table's rows (the next test checks the
    table holds every instantiation of this source at the bars)."""
    require("cupy")
    import kernel_resources

    names = _cuda_backend.all_kernel_names()
    assert len(names) == len(set(names)) > 100
    chosen = names if kernel_resources.full_sweeps() else kernel_resources.sample(names)
    assert len(chosen) >= 100
    result = kernel_resources.compiled(arch, names=chosen)
    assert result["ok"], result["log"][-5000:]
    assert not result["missing"], result["missing"][:5]
    assert "warning" not in result["log"].lower(), result["log"][-5000:]
    rows = kernel_resources.table({arch: result}, _cuda_backend.BLOCK_THREADS)
    assert len(rows) == len(chosen)
    _check_rows(rows)
    committed = json.loads(kernel_resources.table_path().read_text())
    if committed["source_sha256"] == kernel_resources.source_digest():
        table = {r["kernel"]: r for r in committed["kernels"] if r["arch"] == arch}
        fields = ("registers", "spill_stores", "spill_loads", "stack_frame", "shared")
        differ = [(r["kernel"], [(f, r[f], table[r["kernel"]][f]) for f in fields
                                 if r[f] != table[r["kernel"]][f]]) for r in rows]
        differ = [d for d in differ if d[1]]
        assert not differ, f"the committed table disagrees with ptxas: {differ[:5]}"


def test_the_committed_resource_table_covers_every_instantiation_of_this_source():
    """benchmarks/results/kernel-resources-nvrtc<version>.json, written by the full compile
    (`python tests/kernel_resources.py`), is of the current kernels and every instantiation in
    it, for sm_80 and sm_90, is free of spills and at its occupancy bar."""
    require("cupy")
    import kernel_resources

    path = kernel_resources.table_path()
    assert path.exists(), f"no {path.name}: run python tests/kernel_resources.py"
    committed = json.loads(path.read_text())
    assert committed.get("source_sha256") == kernel_resources.source_digest(), (
        "the kernels changed since the resource table was written: run python "
        "tests/kernel_resources.py (every instantiation, minutes) and commit the table")
    names = set(_cuda_backend.all_kernel_names())
    for arch in kernel_resources.ARCHS:
        rows = [r for r in committed["kernels"] if r["arch"] == arch]
        assert {r["kernel"] for r in rows} == names and len(rows) == len(names), arch
        _check_rows(rows)


def test_resource_report_parsing_and_occupancy():
    """ptxas's report lines as NVRTC logs them, and the occupancy calculator's rules."""
    import kernel_resources

    log = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kPf\n"
        "ptxas         .     24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 72 registers, used 1 barriers, 260 bytes smem\n"
        "ptxas info    : Compiling entry function '_Z1gPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1gPf\n"
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 0 barriers\n")
    got = kernel_resources.parse_log(log)
    assert got["_Z1kPf"] == kernel_resources.Resources(72, 8, 12, 24, 260)
    assert got["_Z1gPf"] == kernel_resources.Resources(40, 0, 0, 0, 0)
    R = kernel_resources.Resources
    # 64 registers x 256 threads: 4 blocks of 8 warps (half of 64 warps); 65 registers round
    # up to 72 per thread (256 per warp), 3 blocks; 128: 2 blocks; 255: 1 block
    for regs, blocks in ((32, 8), (64, 4), (65, 3), (128, 2), (129, 1), (255, 1)):
        assert R(regs, 0, 0, 0, 0).blocks_per_sm("sm_90", 256) == blocks, regs
    assert R(64, 0, 0, 0, 0).occupancy("sm_90", 256) == 0.5
    # shared memory binds: 100 KB per block leaves room for 2 on sm_90, 1 on sm_80
    assert R(32, 0, 0, 0, 100 * 1024).blocks_per_sm("sm_90", 256) == 2
    assert R(32, 0, 0, 0, 100 * 1024).blocks_per_sm("sm_80", 256) == 1
    assert kernel_resources.kind("gpuloss_rows<GlNll, 1, 0, 4, double, int>") == "rows_f64"
    assert kernel_resources.kind("gpuloss_rows<GlCceLogits<1>, 1, 0, 4, float, int>") == "rows"
    assert kernel_resources.kind("gpuloss_elementwise<GlMse, double, double>") == "elementwise"


def test_design_card_reduction_kernel_code_compiles_with_nvrtc():
    """The cupy.ReductionKernel baseline of the GPU benchmark: its preamble and the calls its
    map expression makes (with a pointer standing in for the raw CArray output) compile with
    NVRTC under CuPy's options, for float and double."""
    from gpuloss import _bench_gpu

    nvrtc = require("cupy").cuda.nvrtc
    probe = """
    template <typename T>
    __global__ void gl_card_probe(const T* p, const T* y, T* g, double* out) {
        out[0] = gl_card_mse(p[0], y[0], 0.5, g, 0) + gl_card_bce(p[1], y[1], 0.5, g, 1) +
                 gl_card_bce_with_logits(p[2], y[2], 0.5, g, 2);
    }
    """
    prog = nvrtc.createProgram(_bench_gpu.card_preamble() + probe, "card.cu", [], [])
    names = ["gl_card_probe<float>", "gl_card_probe<double>"]
    for name in names:
        nvrtc.addNameExpression(prog, name)
    try:
        nvrtc.compileProgram(prog, ["-arch=sm_90", *_cuda_backend.OPTIONS, "-ftz=true"])
    except Exception as exc:  # the log says why
        pytest.fail(f"{exc}\n{nvrtc.getProgramLog(prog)}")
    assert all(nvrtc.getLoweredName(prog, n) for n in names)
    assert "warning" not in nvrtc.getProgramLog(prog).lower()


# ---------------------------------------------------------------------------------------------
# the math header, on the host


def _fn(lib, name, dtype):
    return getattr(lib, f"{name}_{'f32' if dtype == np.float32 else 'f64'}")


def _p(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _scalar(dtype, v):
    return (ctypes.c_float if dtype == np.float32 else ctypes.c_double)(v)


TOL = {np.float32: dict(rtol=3e-6, atol=1e-6), np.float64: dict(rtol=1e-14, atol=1e-15)}


def _grid(dtype, kind):
    big = float(np.finfo(dtype).max) / 4
    if kind == "logits":
        z = np.array([0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 17.0, -17.0, 40.0, -40.0,
                      1e4, -1e4, big, -big])
    else:
        z = np.array([0.0, 1.0, 1e-12, 1 - 1e-7, 0.5, 0.25, 0.999, 0.001, 1e-3, 0.9])
    y = np.array([0.0, 1.0, 0.3, 0.75])
    zz, yy = np.meshgrid(z, y)
    return zz.ravel().astype(dtype), yy.ravel().astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_math_mse(host_lib, dtype):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(200).astype(dtype)
    y = rng.standard_normal(200).astype(dtype)
    loss, grad = np.empty_like(p), np.empty_like(p)
    _fn(host_lib, "gl_mse", dtype)(_p(p), _p(y), ctypes.c_longlong(p.size), _p(loss), _p(grad))
    p64, y64 = p.astype(np.float64), y.astype(np.float64)
    np.testing.assert_allclose(loss, (p64 - y64) ** 2, **TOL[dtype])
    np.testing.assert_allclose(grad, 2 * (p64 - y64), **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_math_bce(host_lib, dtype):
    p, y = _grid(dtype, "probs")
    eps = float(np.finfo(dtype).eps)
    lo, hi = dtype(eps), dtype(1) - dtype(eps)
    loss, grad = np.empty_like(p), np.empty_like(p)
    _fn(host_lib, "gl_bce", dtype)(_p(p), _p(y), ctypes.c_longlong(p.size), _scalar(dtype, lo),
                                   _scalar(dtype, hi), _p(loss), _p(grad))
    pc = np.clip(p.astype(np.float64), float(lo), float(hi))
    y64 = y.astype(np.float64)
    want_l = -(y64 * np.log(pc) + (1 - y64) * np.log1p(-pc))
    want_g = -y64 / pc + (1 - y64) / (1 - pc)
    np.testing.assert_allclose(loss, want_l, rtol=TOL[dtype]["rtol"] * 10, atol=1e-7)
    np.testing.assert_allclose(grad, want_g, rtol=TOL[dtype]["rtol"] * 10, atol=1e-6)


@pytest.mark.parametrize("pos_weight", [1.0, 2.5, 0.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_math_bce_with_logits(host_lib, dtype, pos_weight):
    z, y = _grid(dtype, "logits")
    c = np.full_like(z, pos_weight)
    loss, grad = np.empty_like(z), np.empty_like(z)
    _fn(host_lib, "gl_bce_logits", dtype)(_p(z), _p(y), _p(c), ctypes.c_longlong(z.size),
                                          _p(loss), _p(grad))
    z64, y64 = z.astype(np.float64), y.astype(np.float64)
    want_l = (1 - y64) * np.logaddexp(0, z64) + pos_weight * y64 * np.logaddexp(0, -z64)
    sig, sig_neg = np.exp(-np.logaddexp(0, -z64)), np.exp(-np.logaddexp(0, z64))
    want_g = (1 - y64) * sig - pos_weight * y64 * sig_neg
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, want_l, **TOL[dtype])
    np.testing.assert_allclose(grad, want_g, **TOL[dtype])
    # no cancellation: tiny gradients far out in the tails keep their relative accuracy
    tail = (np.abs(z64) > 10) & (np.abs(z64) < 50) & ((y64 == 0) | (y64 == 1))
    tail &= want_g != 0
    np.testing.assert_allclose(grad[tail], want_g[tail], rtol=TOL[dtype]["rtol"] * 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_math_smoothing_and_unit_check(host_lib, dtype):
    y = np.array([0.0, 1.0, 0.4], dtype)
    out = np.empty_like(y)
    _fn(host_lib, "gl_smooth_binary", dtype)(_p(y), ctypes.c_longlong(3), _scalar(dtype, 0.2),
                                             _p(out))
    np.testing.assert_allclose(out, y.astype(np.float64) * 0.8 + 0.1, **TOL[dtype])
    x = np.array([-1e-30, 0.0, 0.5, 1.0, 1.0 + 1e-6, np.nan, np.inf, -np.inf], dtype)
    flags = np.empty(x.size, np.int32)
    _fn(host_lib, "gl_outside_unit", dtype)(_p(x), ctypes.c_longlong(x.size), _p(flags))
    assert flags.tolist() == [1, 0, 0, 0, 1, 0, 1, 1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_math_domain_checks_at_the_bit_boundaries(host_lib, dtype):
    """gl_outside_unit and gl_bad_weight on the neighbours of every boundary, and on NaN of
    every kind (float is judged on its bits: -ftz=true would flush the comparisons)."""
    f = np.finfo(dtype)
    nans = {np.float32: [0x7F800001, 0x7FC00000, 0xFFC00000, 0x7FFFFFFF],
            np.float64: [0x7FF0000000000001, 0x7FF8000000000000, 0xFFF8000000000000]}[dtype]
    nan = np.array(nans, {np.float32: np.uint32, np.float64: np.uint64}[dtype]).view(dtype)
    x = np.concatenate([np.array([
        0.0, -0.0, f.smallest_subnormal, -f.smallest_subnormal, f.tiny, -f.tiny,
        f.smallest_subnormal * 3, -f.smallest_subnormal * 3,
        np.nextafter(dtype(1), dtype(0)), 1.0, np.nextafter(dtype(1), dtype(2)), 0.5, -0.5,
        f.max, -f.max, np.inf, -np.inf], dtype), nan])
    with np.errstate(invalid="ignore"):
        want_outside = ~np.isnan(x) & ((x < 0) | (x > 1))
        want_bad = np.isnan(x) | np.isinf(x) | (x < 0)
    for fn, want in (("gl_outside_unit", want_outside), ("gl_bad_weight", want_bad)):
        flags = np.empty(x.size, np.int32)
        _fn(host_lib, fn, dtype)(_p(x), ctypes.c_longlong(x.size), _p(flags))
        assert flags.astype(bool).tolist() == want.tolist(), (fn, x[flags != want])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_math_logsumexp_push_and_merge(host_lib, dtype):
    rng = np.random.default_rng(1)
    z = (5 * rng.standard_normal((20, 9))).astype(dtype)
    z[3] = [1e30 if dtype == np.float64 else 1e30, 0, -1e30, 0, 0, 0, 0, 0, 0]
    z[4] = -np.inf
    z[4, 5] = 2.0
    z[5] = -np.inf  # the whole row: log-sum-exp is -inf
    z[6, 2] = np.nan
    for split in (0, 4, 9):
        out = np.empty(20, dtype)
        _fn(host_lib, "gl_lse_rows", dtype)(_p(z), ctypes.c_longlong(20), ctypes.c_longlong(9),
                                            ctypes.c_longlong(split), _p(out))
        z64 = z.astype(np.float64)
        with np.errstate(all="ignore"):
            m = z64.max(1)
            shift = np.where(np.isfinite(m), m, 0.0)
            want = shift + np.log(np.exp(z64 - shift[:, None]).sum(1))
        want[5] = -np.inf
        ok = np.isfinite(want)
        np.testing.assert_allclose(out[ok], want[ok], **TOL[dtype])
        assert out[5] == -np.inf and np.isnan(out[6])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_math_cross_entropy_terms(host_lib, dtype):
    rng = np.random.default_rng(2)
    z = rng.standard_normal(12).astype(dtype)
    c = rng.uniform(0, 1, 12).astype(dtype)
    c[3] = 0
    z64, c64 = z.astype(np.float64), c.astype(np.float64)
    m = float(z64.max())
    rest = float(np.exp(z64 - m).sum() - 1)
    lse = m + np.log1p(rest)
    loss, grad = np.empty_like(z), np.empty_like(z)
    _fn(host_lib, "gl_xent", dtype)(_p(z), _p(c), ctypes.c_longlong(12), _scalar(dtype, m),
                                    _scalar(dtype, rest), _scalar(dtype, c64.sum()), _p(loss),
                                    _p(grad))
    np.testing.assert_allclose(loss, c64 * (lse - z64), **TOL[dtype])
    np.testing.assert_allclose(grad, np.exp(z64 - lse) * c64.sum() - c64, **TOL[dtype])
    # label coefficients: (1 - s) cw[y] [k == y] + s / K cw_k
    is_label = np.zeros(12, np.int32)
    is_label[5] = 1
    out = np.empty_like(z)
    _fn(host_lib, "gl_label_coef", dtype)(_p(is_label), _p(c), ctypes.c_longlong(12),
                                          _scalar(dtype, 1.7), _scalar(dtype, 0.1),
                                          _scalar(dtype, 1 / 12), _p(out))
    want = 0.1 / 12 * c64
    want[5] += 0.9 * 1.7
    np.testing.assert_allclose(out, want, **TOL[dtype])
    # cce on probabilities, clipped
    p = np.array([0.0, 1e-3, 0.5, 1.0, 0.2], dtype)
    cc = np.array([1.0, 0.5, 2.0, 1.0, 0.0], dtype)
    lo, hi = 1e-4, 1 - 1e-4
    loss, grad = np.empty_like(p), np.empty_like(p)
    _fn(host_lib, "gl_cce_term", dtype)(_p(p), _p(cc), ctypes.c_longlong(5),
                                        _scalar(dtype, lo), _scalar(dtype, hi), _p(loss),
                                        _p(grad))
    pc = np.clip(p.astype(np.float64), dtype(lo), dtype(hi))
    np.testing.assert_allclose(loss, -cc * np.log(pc), **TOL[dtype])
    np.testing.assert_allclose(grad, -cc / pc, **TOL[dtype])


def test_half_conversions_match_numpy_bit_for_bit(host_lib):
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(halves.size, np.float32)
    host_lib.gl_half_to_float_n(_p(halves), ctypes.c_longlong(halves.size), _p(out))
    want = halves.view(np.float16).astype(np.float32)
    same = (out.view(np.uint32) == want.view(np.uint32)) | (np.isnan(out) & np.isnan(want))
    assert same.all(), halves[~same][:10]
    rng = np.random.default_rng(3)
    edges = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, np.inf, -np.inf,
                      np.nan, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-26, 6.1e-5,
                      6.097555e-5, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 2.0**-14, 2.0**-14 * 0.75],
                     np.float32)
    f = np.concatenate([edges, rng.standard_normal(20000).astype(np.float32) * 1000,
                        (rng.standard_normal(20000) * 1e-5).astype(np.float32),
                        want[np.isfinite(want)] * np.float32(1.0001)])
    h = np.empty(f.size, np.uint16)
    host_lib.gl_float_to_half_n(_p(f), ctypes.c_longlong(f.size), _p(h))
    with np.errstate(over="ignore"):
        want_h = f.astype(np.float16)
    same = h == want_h.view(np.uint16)  # bit for bit, the quiet NaN's payload included
    assert same.all(), (f[~same][:10], h[~same][:10], want_h.view(np.uint16)[~same][:10])


def test_bfloat16_conversions_match_ml_dtypes_bit_for_bit(host_lib):
    """All 65,536 bfloat16 patterns widen exactly; narrowing rounds as ml_dtypes does at every
    pattern, at every midpoint between neighbours (ties to even) and one float32 ulp either
    side of it, across overflow, subnormals and NaN (the quiet NaN of the sign)."""
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(patterns.size, np.float32)
    host_lib.gl_bf16_to_float_n(_p(patterns), ctypes.c_longlong(patterns.size), _p(out))
    want = patterns.view(bf16).astype(np.float32)
    assert (out.view(np.uint32) == want.view(np.uint32)).all()  # NaN payloads included

    bits = patterns.astype(np.uint32) << 16  # every pattern, as float32 bits
    mid = bits + 0x8000  # halfway to the next pattern up (in magnitude)
    rng = np.random.default_rng(6)
    f = np.concatenate([bits, mid, mid - 1, mid + 1, bits + 1, bits + 0xFFFF,
                        rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)])
    f = f.astype(np.uint32).view(np.float32)
    got = np.empty(f.size, np.uint16)
    host_lib.gl_float_to_bf16_n(_p(f), ctypes.c_longlong(f.size), _p(got))
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and overflow are the point
        want_b = f.astype(bf16).view(np.uint16)
    same = got == want_b
    assert same.all(), (f[~same][:10], got[~same][:10], want_b[~same][:10])


# ---------------------------------------------------------------------------------------------
# the kernels themselves, run by the CPU emulator through the backend's launch code


def _emulated(runtime, loss, pred, target, *, want_value=True, want_grad=True, **options):
    call = _api.prepare(loss, pred, target, options, want_value=want_value, want_grad=want_grad)
    return _cuda_backend.compute(call, runtime)


def _poisson_terms(pred, target, reduction, opts) -> float:
    """The size of the two terms poisson_nll subtracts, reduced as the loss is: the scale of
    its rounding error (the loss itself may be near zero)."""
    p, y = pred.astype(np.float64), np.asarray(target, np.float64)
    if opts.get("log_input", True):
        terms = np.exp(p) + np.abs(y * p)
    else:
        terms = np.abs(p) + np.abs(y * np.log(p + opts.get("eps", 1e-8)))
    w = np.broadcast_to(np.asarray(opts.get("sample_weight", 1.0)), terms.shape)
    if reduction == "none":
        return float(np.max(w * terms))
    total = float(np.sum(w * terms))
    return total if reduction == "sum" else total / float(np.sum(w))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("loss", "shape", "labels"), list(_cases()))
def test_kernels_match_numpy_backend_every_option(runtime, loss, shape, labels, reduction):
    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        pred, target = make_inputs(loss, rng, shape, dtype=dtype, labels=labels)
        for opts in _options(loss, rng, shape, labels):
            want_v, want_g = gl.LOSSES[loss].value_and_grad(
                pred, target, reduction=reduction, **opts
            )
            v, g = _emulated(runtime, loss, pred, target, reduction=reduction, **opts)
            rtol = 1e-12 if dtype == np.float64 else 2e-6
            # float32 gradient components that are differences (softmax * sum - c) are judged
            # against the gradient's scale, as float32 rounding of either term would be
            atol = rtol * float(np.abs(want_g).max())
            # poisson_nll's loss is a difference, exp(p) - y p, that crosses zero: a one-ulp
            # difference between two exp implementations is judged against the terms' size
            vtol = 1e-12
            if loss == "poisson_nll" and dtype == np.float32:
                vtol = rtol * _poisson_terms(pred, target, reduction, opts)
            np.testing.assert_allclose(v, want_v, rtol=rtol, atol=vtol, err_msg=str(opts))
            np.testing.assert_allclose(g, want_g, rtol=rtol, atol=atol, err_msg=str(opts))
            assert g.dtype == dtype and np.asarray(v).dtype == dtype


@pytest.mark.parametrize("loss", ALL)
def test_kernels_float16_and_mixed_target_dtypes(runtime, loss):
    rng = np.random.default_rng(5)
    pred, target = make_inputs(loss, rng, (40, 6), dtype=np.float16)
    targets = [target]
    if loss in ("hinge", "squared_hinge"):  # labels -1/+1: as int32, or as booleans
        targets += [target.astype(np.float16), target > 0, target.astype(np.int32)]
    elif loss in ELEMENTWISE:
        targets += [target.astype(np.float16), (target > 0.5), (target > 0.5).astype(np.int32)]
    elif gl.LOSSES[loss].class_indices:
        targets += [target.astype(np.int32)]
    else:  # probability targets only: stored in another float type
        targets += [target.astype(np.float16), target.astype(np.float32)]
    for t in targets:
        want_v, want_g = gl.LOSSES[loss].value_and_grad(pred, t)
        v, g = _emulated(runtime, loss, pred, t)
        assert g.dtype == np.float16
        np.testing.assert_allclose(np.float64(v), np.float64(want_v), rtol=2e-3)
        np.testing.assert_allclose(g.astype(np.float64), want_g.astype(np.float64), rtol=2e-3,
                                   atol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", ALL)
def test_kernels_bfloat16(runtime, loss, reduction):
    """bfloat16 pred (and targets: bfloat16 beside it, or another type) on the emulated
    device: loss and gradient in bfloat16, each within one bfloat16 rounding of the NumPy
    backend's (which computes in float32 and rounds once, as the kernels do; the two float32
    results may differ in their last bits, so a rounding may go the other way)."""
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(7)
    pred, target = make_inputs(loss, rng, (40, 6))
    pred = pred.astype(bf16)
    targets = [target]
    if target.dtype.kind == "f":
        targets += [target.astype(bf16)]
    for t in targets:
        want_v, want_g = gl.LOSSES[loss].value_and_grad(pred, t, reduction=reduction)
        v, g = _emulated(runtime, loss, pred, t, reduction=reduction)
        assert g.dtype == bf16 and np.asarray(v).dtype == bf16, t.dtype
        for got, want in ((v, want_v), (g, want_g)):
            assert_within_one_bfloat16_rounding(got, want, t.dtype)


@pytest.mark.parametrize("loss", ALL)
def test_kernels_span_many_blocks_and_rows(runtime, loss):
    """More data than the (small) emulated grid: grid-stride loops, several partials."""
    rng = np.random.default_rng(6)
    shape = (1500, 3) if loss in ELEMENTWISE else (700, 5)
    pred, target = make_inputs(loss, rng, shape)
    w = rng.uniform(0, 2, shape[0] if loss in CATEGORICAL else shape)
    for reduction in REDUCTIONS:
        want = gl.LOSSES[loss].value_and_grad(pred, target, reduction=reduction, sample_weight=w)
        got = _emulated(runtime, loss, pred, target, reduction=reduction, sample_weight=w)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("K", [3, 10, 30, 60, 100, 1000, 5000, 9000])
@pytest.mark.parametrize("loss", CATEGORICAL)
def test_row_kernel_variants_by_class_count(runtime, loss, K):
    """Each row configuration (warp or block per row, cached or read twice) is exercised."""
    rng = np.random.default_rng(7)
    rows = 4  # with the emulator's 3 blocks, one step has rows past the end (dead rows)
    pred, target = make_inputs(loss, rng, (rows, K))
    for labels in target_kinds(loss):
        if not labels:
            t = rng.uniform(0, 1, (rows, K))
            target = t / t.sum(1, keepdims=True)
        opts = {"class_weight": rng.uniform(0.5, 1.5, K)} if loss in LABELED else {}
        if loss == "cce_with_logits":
            opts["label_smoothing"] = 0.05
        want = gl.LOSSES[loss].value_and_grad(pred, target, **opts)
        got = _emulated(runtime, loss, pred, target, **opts)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-11)
        scale = float(np.abs(want[1]).max())  # smoothed components are differences
        np.testing.assert_allclose(got[1], want[1], rtol=1e-11, atol=1e-12 * scale)
        # loss only (no gradient pointer) and gradient only (no partial sums) give the same
        value_only, none = _emulated(runtime, loss, pred, target, want_grad=False, **opts)
        assert none is None
        np.testing.assert_allclose(value_only, want[0], rtol=1e-11)
        _, grad_only = _emulated(runtime, loss, pred, target, want_value=False, **opts)
        np.testing.assert_allclose(grad_only, want[1], rtol=1e-11, atol=1e-12 * scale)
    for labels in target_kinds(loss):
        functor = gl.LOSSES[loss].functor(0)
        threads, cache = _cuda_backend.row_config(K, pred.dtype, labels, functor)
        assert any(f", {int(labels)}, {threads}, {cache}," in name for name in runtime.launches)
        # the threads per row at launch: K fits their cache, and half as many would not
        rt = _cuda_backend.row_threads(K, pred.dtype, labels, functor)
        assert rt in (*_cuda_backend.SMALL_ROW_THREADS, 32, 256)
        assert not cache or K <= rt * cache and (rt == 4 or threads or K > rt // 2 * cache)


@pytest.mark.parametrize("loss", CATEGORICAL)
def test_kernels_class_axis_1(runtime, loss):
    rng = np.random.default_rng(8)
    for labels in target_kinds(loss):
        pred, target = make_inputs(loss, rng, (5, 4, 3), labels=labels, axis=1)
        want = gl.LOSSES[loss].value_and_grad(pred, target, axis=1)
        got = _emulated(runtime, loss, pred, target, axis=1)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12)


def test_kernels_edges(runtime):
    z = np.array([[1e30, 0.0, -1e30], [1e4, -1e4, 0.0], [-1e30, -1e30, -1e30]])
    t = np.array([0, 1, 2])
    want = gl.cce_with_logits.value_and_grad(z, t, reduction="none")
    got = _emulated(runtime, "cce_with_logits", z, t, reduction="none")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
    p = np.array([0.0, 1.0, 0.0, 1.0], np.float32)
    y = np.array([0.0, 1.0, 1.0, 0.0])
    for loss in ("bce", "bce_with_logits"):
        want = gl.LOSSES[loss].value_and_grad(p, y, reduction="none")
        got = _emulated(runtime, loss, p, y, reduction="none")
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    # empty input, mean over nothing, NaN propagation
    v, g = _emulated(runtime, "mse", np.zeros(0), np.zeros(0))
    assert np.isnan(v) and g.shape == (0,)
    v, g = _emulated(runtime, "cce_with_logits", np.zeros((2, 3)), np.array([-1, -1]),
                     ignore_index=-1)
    assert np.isnan(v) and not g.any()
    nan_p = np.array([0.5, np.nan, 0.2])
    assert np.isnan(_emulated(runtime, "mse", nan_p, np.zeros(3))[0])


def test_kernels_raise_the_same_errors(runtime):
    with pytest.raises(ValueError, match=r"pred must hold probabilities in \[0, 1\]; found "
                                         r"values in \[-0.5, 0.7\]"):
        _emulated(runtime, "bce", np.array([0.2, -0.5, 0.7]), np.zeros(3))
    with pytest.raises(ValueError, match="target must hold targets"):
        _emulated(runtime, "bce_with_logits", np.zeros(3), np.array([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 7\]"):
        _emulated(runtime, "cce_with_logits", np.zeros((3, 4)), np.array([0, 7, 1]))
    with pytest.raises(ValueError, match="sample_weight must be non-negative"):
        _emulated(runtime, "mse", np.zeros(3), np.zeros(3), sample_weight=np.array([1, -1, 1.0]))
    with pytest.raises(ValueError, match="pos_weight must be non-negative"):
        _emulated(runtime, "bce_with_logits", np.zeros(3), np.zeros(3),
                  pos_weight=np.array([1, np.nan, 1.0]))
    with pytest.raises(ValueError, match="target must hold probabilities"):
        _emulated(runtime, "cce", np.full((2, 3), 0.3), np.full((2, 3), 1.5))
    # the boundaries: K itself and -1 are out of range
    for loss in LABELED:
        for bad in (4, -1):
            with pytest.raises(ValueError, match="class indices"):
                _emulated(runtime, loss, np.full((3, 4), 0.25), np.array([0, bad, 3]))
    # validate=False: NaN for the bad labels, no error, no out-of-bounds read
    for loss in LABELED:
        per, grad = _emulated(runtime, loss, np.full((4, 4), 0.25), np.array([0, 7, 4, -1]),
                              reduction="none", validate=False,
                              class_weight=np.ones(4))
        assert np.isnan(per[1:]).all() and np.isfinite(per[0])
        assert np.isnan(grad[1:]).any(axis=1).all() and np.isfinite(grad[0]).all()


@pytest.mark.parametrize("loss", ALL)
def test_one_kernel_launch_per_value_and_grad(runtime, loss):
    rng = np.random.default_rng(9)
    shape = (4096,) if loss in ELEMENTWISE else (64, 64)
    pred, target = make_inputs(loss, rng, shape)
    runtime.reset_counts()
    _emulated(runtime, loss, pred, target)
    assert len(runtime.launches) == 1, runtime.launches  # the pass finishes its own sum
    assert len(runtime.host_reads) == 1  # the flags, with the value


def test_kernel_sources_ship_in_the_wheel(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
         str(tmp_path), str(root)],
        capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0 and "No module named" in done.stderr:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(root)],
            capture_output=True, text=True, timeout=300,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = next(tmp_path.glob("gpuloss-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpuloss/kernels/gpuloss_math.cuh" in names
    assert "gpuloss/kernels/gpuloss_kernels.cu" in names


def test_kernel_sources_found_from_this_install():
    folder = _cuda_backend.kernel_dir()
    assert (folder / "gpuloss_math.cuh").is_file()
    assert "gl_bce_logits" in _cuda_backend.kernel_source()
    assert '#include "gpuloss_math.cuh"' not in _cuda_backend.kernel_source()


# the catalogue's edges on the device: every branch of every functor, NaN and infinities
_EDGE_VALUES = [0.0, -0.0, 1e-30, 0.3, 0.999, 1.0, 1.0001, 2.0, 2.5, 40.0, 1e30, np.inf,
                -np.inf, np.nan]
_CATALOGUE_EDGES = {
    "mae": [{}], "huber": [{}, {"delta": 2.0}], "smooth_l1": [{}, {"beta": 0.0}, {"beta": 2.0}],
    "log_cosh": [{}], "pinball": [{}, {"quantile": 0.9}],
    "poisson_nll": [{}, {"full": True}], "hinge": [{}], "squared_hinge": [{}],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", list(_CATALOGUE_EDGES))
def test_catalogue_edges_on_the_device_match_numpy(runtime, loss, dtype):
    """Boundaries (|d| = delta, beta, 1; margins of exactly 1; r = 0), huge and infinite
    values and NaN, through the emulated kernels and the NumPy backend: the same numbers, NaN
    and infinities in the same places."""
    values = np.array(_EDGE_VALUES)
    pred = np.concatenate([values, -values]).astype(dtype)
    if loss in ("hinge", "squared_hinge"):
        target = np.tile([1.0, -1.0], pred.size // 2)
    elif loss == "poisson_nll":
        target = np.tile([0.0, 1.0, 3.0, 7.0], pred.size // 4 + 1)[: pred.size]
    else:
        target = np.zeros(pred.size)
    for opts in _CATALOGUE_EDGES[loss]:
        want_v, want_g = gl.LOSSES[loss].value_and_grad(pred, target, reduction="none", **opts)
        v, g = _emulated(runtime, loss, pred, target, reduction="none", **opts)
        _assert_same_edges(v, want_v, 4e-6 if dtype == np.float32 else 1e-13, opts)
        _assert_same_edges(g, want_g, 4e-6 if dtype == np.float32 else 1e-13, opts)


def _assert_same_edges(got, want, rtol, opts, scale=0.0):
    """NaN and infinities in the same places, the finite values close (to rtol, or to
    rtol * scale for components that are differences of larger terms)."""
    assert np.array_equal(np.isnan(got), np.isnan(want)), (opts, got, want)
    assert np.array_equal(np.isinf(got), np.isinf(want)), (opts, got, want)
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=rtol,
                               atol=max(1e-30, rtol * scale), err_msg=str(opts))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_focal_bce_on_the_device_matches_numpy_at_saturation(runtime, dtype):
    """The sigmoid focal term through the emulated kernel and the NumPy backend: saturated
    and moderate logits, hard and soft targets, gamma in {0, 0.5, 2}, with and without
    alpha and label smoothing; both finite everywhere and equal."""
    z = np.array([-1e30, -800.0, -90.0, -30.0, -3.0, -1e-30, 0.0, 0.7, 20.0, 90.0, 800.0])
    pred = np.repeat(z, 3).astype(dtype)
    target = np.tile([0.0, 1.0, 0.3], z.size).astype(dtype)
    for gamma in (0.0, 0.5, 2.0):
        for opts in ({}, {"focal_alpha": 0.25}, {"focal_alpha": 1.0, "label_smoothing": 0.1}):
            opts = {"focal_gamma": gamma, **opts}
            want_v, want_g = gl.bce_with_logits.value_and_grad(pred, target, reduction="none",
                                                                **opts)
            v, g = _emulated(runtime, "bce_with_logits", pred, target, reduction="none", **opts)
            for got, want in ((v, want_v), (g, want_g)):
                assert np.isfinite(want).all() and np.isfinite(got).all(), opts
                np.testing.assert_allclose(got, want, rtol=4e-6 if dtype == np.float32 else
                                           1e-13, atol=1e-37, err_msg=str(opts))


_ROW_EDGES = [  # (loss, pred, target, options): saturated rows, ties, masks, NaN
    ("cce_with_logits", [[1e4, 0, -1e4], [0, 0, 0], [-np.inf, 1, 2], [3, 3, 3]], [0, 1, 2, 2],
     [{"focal_gamma": 0.5}, {"focal_gamma": 2.0, "z_loss": 1e-3},
      {"focal_gamma": 1.0, "label_smoothing": 0.1}, {"z_loss": 0.1, "ignore_index": 1}]),
    ("kl_div_with_logits", [[1e4, 0, -1e4], [0, 0, 0], [-np.inf, 1, 2], [3, 3, 3]],
     [[-1e4, 0, 1e4], [1, 2, 3], [0, 0, 0], [3, 3, 3]],
     [{"target_logits": True}, {"target_logits": True, "temperature": 0.5},
      {"target_logits": True, "temperature": 4.0}]),
    ("multiclass_hinge", [[1, 2, 2], [2, 1, 0], [0, 0.5, 0.5], [np.nan, 0, 1], [-np.inf, 0, 0],
                          [5, 5, 5]], [0, 0, 2, 1, 0, 1],
     [{}, {"margin": 0.0}, {"margin": 3.0, "ignore_index": 2}]),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("loss", "pred", "target", "option_sets"), _ROW_EDGES,
                         ids=[c[0] for c in _ROW_EDGES])
def test_new_row_functors_at_their_edges_match_numpy(runtime, loss, pred, target, option_sets,
                                                     dtype):
    pred = np.array(pred, dtype)
    target = np.array(target, dtype if np.asarray(target).ndim == 2 else np.int64)
    for opts in option_sets:
        want_v, want_g = gl.LOSSES[loss].value_and_grad(pred, target, reduction="none", **opts)
        v, g = _emulated(runtime, loss, pred, target, reduction="none", **opts)
        rtol = 4e-6 if dtype == np.float32 else 1e-12
        _assert_same_edges(v, want_v, rtol, opts)
        # gradient components that are differences (q - t) are judged at the row's scale
        finite = want_g[np.isfinite(want_g)]
        _assert_same_edges(g, want_g, rtol, opts,
                           scale=float(np.abs(finite).max()) if finite.size else 0.0)


SWITCHED = {  # loss -> (options turning each switch on, in the declaration's order)
    "bce_with_logits": ({"focal_gamma": 2.0},),
    "cce_with_logits": ({"focal_gamma": 2.0}, {"z_loss": 1e-3}, {"softcap": 2.0}),
    "kl_div_with_logits": ({"target_logits": True},),
}


@pytest.mark.parametrize("loss", sorted(SWITCHED))
def test_options_select_compile_time_switches(runtime, loss):
    """Each combination of a loss's switched options launches its own functor variant (the
    GL_* bits the declaration names, defined with those values in the kernel source), and
    every variant agrees with the NumPy backend: many rows of few classes (several staged
    tiles per block, the last one partial) and rows of a warp."""
    fn = gl.LOSSES[loss]
    source = _cuda_backend.kernel_source()
    names = list(fn.kernel_switches)
    assert len(names) == len(SWITCHED[loss])
    for bit, name in enumerate(names):
        assert f"#define {name} {1 << bit}\n" in source
    rng = np.random.default_rng(11)
    shapes = [(3001,)] if fn.family == "elementwise" else [(700, 10), (9, 300)]
    for mask in range(1 << len(names)):
        opts = {}
        for bit, on in enumerate(SWITCHED[loss]):
            if mask >> bit & 1:
                opts.update(on)
        for shape in shapes:
            labels = loss == "cce_with_logits" and len(shape) == 2 and shape[1] == 10
            pred, target = make_inputs(loss, rng, shape, labels=labels)
            if opts.get("target_logits"):
                target = rng.standard_normal(shape)
            runtime.launches.clear()
            got = _emulated(runtime, loss, pred, target, **opts)
            want = fn.value_and_grad(pred, target, **opts)
            assert any(f"{fn.kernel}<{mask}>" in n for n in runtime.launches), runtime.launches
            np.testing.assert_allclose(got[0], want[0], rtol=1e-11)
            scale = float(np.abs(want[1]).max())
            np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-13 * scale)
