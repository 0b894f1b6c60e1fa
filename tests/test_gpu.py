"""GPU tests (pytest -m gpu): the CUDA backend against the NumPy backend, on a real device.

Skipped cleanly without a GPU; GPULOSS_REQUIRE_GPU=1 turns a missing GPU into a failure
(tests/conftest.py). The bar: float32 within 1e-6 relative, float64 within 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest
from agreement import assert_within_one_bfloat16_rounding
from conftest import make_inputs
from reference import ALL, CATEGORICAL, ELEMENTWISE, LABELED
from test_losses import REDUCTIONS, _cases, _options

import gpuloss as gl

pytestmark = pytest.mark.gpu
RTOL = {np.float16: 2e-3, np.float32: 1e-6, np.float64: 1e-12}


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def _to_gpu(cp, opts):
    return {k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in opts.items()}


def _close(got, want, dtype, scale=None):
    rtol = RTOL[dtype]
    atol = rtol * (float(np.abs(want).max()) if scale is None else scale) if np.size(want) else 0
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("loss", "shape", "labels"), list(_cases()))
def test_gpu_matches_numpy_every_option(cp, loss, shape, labels, reduction, dtype):
    rng = np.random.default_rng(0)
    pred, target = make_inputs(loss, rng, shape, dtype=dtype, labels=labels)
    for opts in _options(loss, rng, shape, labels):
        want_v, want_g = gl.LOSSES[loss].value_and_grad(pred, target, reduction=reduction, **opts)
        v, g = gl.LOSSES[loss].value_and_grad(
            cp.asarray(pred), cp.asarray(target), reduction=reduction, **_to_gpu(cp, opts)
        )
        assert isinstance(v, cp.ndarray) and isinstance(g, cp.ndarray)
        assert g.dtype == dtype and g.shape == pred.shape and v.dtype == dtype
        _close(v.get(), want_v, dtype, scale=float(np.abs(np.float64(want_v)).max()) or 1.0)
        _close(g.get(), want_g, dtype)
        # the three entry points agree bit for bit
        assert bool((gl.LOSSES[loss].grad(cp.asarray(pred), cp.asarray(target),
                     reduction=reduction, **_to_gpu(cp, opts)) == g).all())


@pytest.mark.parametrize("loss", ALL)
def test_gpu_large_inputs_many_blocks_bit_identical(cp, loss):
    rng = np.random.default_rng(1)
    shape = (1 << 22,) if loss in ELEMENTWISE else (1 << 16, 37)
    pred, target = make_inputs(loss, rng, shape, dtype=np.float32)
    p, t = cp.asarray(pred), cp.asarray(target)
    first = gl.LOSSES[loss].value_and_grad(p, t)
    for _ in range(3):
        again = gl.LOSSES[loss].value_and_grad(p, t)
        assert first[0].get().tobytes() == again[0].get().tobytes()
        assert bool((first[1] == again[1]).all())
    want = gl.LOSSES[loss].value_and_grad(pred, target)
    _close(first[0].get(), want[0], np.float32)
    _close(first[1].get(), want[1], np.float32)


@pytest.mark.parametrize("K", [3, 10, 30, 60, 100, 1000, 5000, 9000, 40000])
@pytest.mark.parametrize("loss", CATEGORICAL)
def test_gpu_row_kernels_by_class_count(cp, loss, K):
    rng = np.random.default_rng(2)
    pred, target = make_inputs(loss, rng, (33, K))
    opts = {"class_weight": rng.uniform(0.5, 1.5, K)} if loss in LABELED else {}
    if loss == "cce_with_logits":
        opts["label_smoothing"] = 0.05
    want = gl.LOSSES[loss].value_and_grad(pred, target, **opts)
    got = gl.LOSSES[loss].value_and_grad(cp.asarray(pred), cp.asarray(target),
                                         **_to_gpu(cp, opts))
    _close(got[0].get(), want[0], np.float64)
    _close(got[1].get(), want[1], np.float64)


def test_gpu_non_contiguous_and_axis_1(cp):
    rng = np.random.default_rng(3)
    pred, target = make_inputs("cce_with_logits", rng, (6, 5, 4), labels=True, axis=1)
    want = gl.cce_with_logits.value_and_grad(pred, target, axis=1)
    got = gl.cce_with_logits.value_and_grad(cp.asarray(pred), cp.asarray(target), axis=1)
    _close(got[0].get(), want[0], np.float64)
    _close(got[1].get(), want[1], np.float64)
    big = cp.asarray(rng.standard_normal((64, 64)))
    y = cp.asarray(rng.standard_normal((64, 64)))
    v, g = gl.mse.value_and_grad(big[::2, ::3], y[::2, ::3])
    wv, wg = gl.mse.value_and_grad(big.get()[::2, ::3], y.get()[::2, ::3])
    _close(v.get(), wv, np.float64)
    _close(g.get(), wg, np.float64)


def test_gpu_errors_and_validate_false(cp):
    with pytest.raises(ValueError, match="pred must hold probabilities"):
        gl.bce(cp.asarray([0.2, 1.5]), cp.asarray([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 9\]"):
        gl.cce_with_logits(cp.zeros((2, 3)), cp.asarray([0, 9]))
    per = gl.cce_with_logits(cp.zeros((2, 3)), cp.asarray([0, 9]), reduction="none",
                             validate=False)
    assert bool(cp.isnan(per[1])) and bool(cp.isfinite(per[0]))


def test_gpu_inputs_unmodified_and_outputs_on_the_same_device(cp):
    rng = np.random.default_rng(4)
    pred, target = make_inputs("bce_with_logits", rng, (1000,), dtype=np.float32)
    p, t = cp.asarray(pred), cp.asarray(target)
    v, g = gl.bce_with_logits.value_and_grad(p, t)
    assert bool((p.get() == pred).all()) and bool((t.get() == target).all())
    assert v.device == p.device and g.device == p.device


def test_gpu_more_than_2_31_elements(cp):
    n = (1 << 31) + 7
    free, _ = cp.cuda.runtime.memGetInfo()
    if free < 3 * 4 * n + (1 << 30):
        pytest.skip("needs about 27 GB of free GPU memory")
    p = cp.full(n, 0.5, cp.float32)
    y = cp.zeros(n, cp.float32)
    v, g = gl.mse.value_and_grad(p, y)
    assert float(v) == pytest.approx(0.25, rel=1e-7)
    assert float(g[-1]) == pytest.approx(1.0 / n, rel=1e-6)
    del p, y, g
    cp.get_default_memory_pool().free_all_blocks()  # 27 GB back for the tests after this one


@pytest.mark.parametrize("loss", ELEMENTWISE)
def test_design_card_reduction_kernel_matches_the_fused_kernels(cp, loss):
    """The benchmark's cupy.ReductionKernel baseline computes the same numbers."""
    from gpuloss._bench_gpu import card_value_and_grad

    rng = np.random.default_rng(10)
    for dtype in (np.float32, np.float64):
        pred, target = make_inputs(loss, rng, (1 << 16,), dtype=dtype)
        p, t = cp.asarray(pred), cp.asarray(target.astype(dtype))
        v, g = card_value_and_grad(cp, loss)(p, t)
        want_v, want_g = gl.LOSSES[loss].value_and_grad(p, t)
        _close(v.get(), want_v.get(), dtype)
        _close(g.get(), want_g.get(), dtype)


def test_torch_cuda_through_dlpack(cp):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    rng = np.random.default_rng(5)
    pred, target = make_inputs("cce_with_logits", rng, (256, 10), dtype=np.float32)
    z = torch.tensor(pred, device="cuda")
    t = torch.tensor(target, device="cuda")
    v, g = gl.cce_with_logits.value_and_grad(z, t)
    assert isinstance(v, torch.Tensor) and v.device.type == "cuda" and g.device.type == "cuda"
    zz = z.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(zz, t)
    ref.backward()
    assert abs(v.item() - ref.item()) <= 1e-6 * abs(ref.item())
    torch.testing.assert_close(g, zz.grad, rtol=1e-5, atol=1e-7)
    # the input is viewed, not copied
    assert cp.from_dlpack(z).data.ptr == z.data_ptr()


def _jax_and_its_gpu():
    jax = pytest.importorskip("jax")
    try:
        return jax, jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX without a GPU")


def test_jax_cuda_through_dlpack(cp):
    jax, gpu = _jax_and_its_gpu()
    rng = np.random.default_rng(6)
    pred, target = make_inputs("bce_with_logits", rng, (512,), dtype=np.float32)
    z = jax.device_put(pred, gpu)
    y = jax.device_put(target.astype(np.float32), gpu)
    v, g = gl.bce_with_logits.value_and_grad(z, y)
    assert type(v).__module__.startswith("jax") and type(g).__module__.startswith("jax")
    want = gl.bce_with_logits.value_and_grad(pred, target.astype(np.float32))
    _close(np.asarray(v), want[0], np.float32)
    _close(np.asarray(g), want[1], np.float32)


@pytest.mark.parametrize("loss", ALL)
def test_gpu_bfloat16_cupy_arrays(cp, loss):
    from gpuloss.backends import cuda

    if not cuda.cupy_has_bfloat16():
        pytest.skip("this CuPy has no bfloat16 (CuPy 14 and ml_dtypes have it)")
    bf16 = cuda.BF16
    rng = np.random.default_rng(11)
    pred, target = make_inputs(loss, rng, (4096, 33))
    pred = pred.astype(bf16)
    if target.dtype.kind == "f":
        target = target.astype(bf16)
    for reduction in ("mean", "none"):
        want_v, want_g = gl.LOSSES[loss].value_and_grad(pred, target, reduction=reduction)
        v, g = gl.LOSSES[loss].value_and_grad(cp.asarray(pred), cp.asarray(target),
                                              reduction=reduction)
        assert g.dtype == bf16 and v.dtype == bf16
        assert_within_one_bfloat16_rounding(v.get(), want_v)
        assert_within_one_bfloat16_rounding(g.get(), want_g)


@pytest.mark.parametrize("loss", ALL)
def test_torch_cuda_bfloat16_training_step(cp, loss):
    """A bfloat16 CUDA tensor that requires grad: loss.backward() through the kernels (the
    tensors go to CuPy as int16 views), within one bfloat16 rounding of the CPU path."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    from gpuloss.backends import cuda

    if not cuda.cupy_has_bfloat16():
        pytest.skip("this CuPy has no bfloat16 (CuPy 14 and ml_dtypes have it)")
    rng = np.random.default_rng(12)
    pred, target = make_inputs(loss, rng, (512, 17))
    x = torch.tensor(pred.astype(np.float32)).to(device="cuda", dtype=torch.bfloat16)
    x.requires_grad_()
    t = torch.tensor(target).cuda()
    if t.is_floating_point():
        t = t.to(torch.bfloat16)
    out = gl.LOSSES[loss](x, t)
    out.backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert x.grad.device.type == "cuda"
    want_v, want_g = gl.LOSSES[loss].value_and_grad(x.detach().cpu(), t.cpu())
    assert_within_one_bfloat16_rounding(out.detach().float().cpu().numpy(), want_v.float().numpy())
    assert_within_one_bfloat16_rounding(x.grad.float().cpu().numpy(), want_g.float().numpy())


def test_jax_cuda_bfloat16(cp):
    jax, gpu = _jax_and_its_gpu()
    from gpuloss.backends import cuda

    if not cuda.cupy_has_bfloat16():
        pytest.skip("this CuPy has no bfloat16 (CuPy 14 and ml_dtypes have it)")
    rng = np.random.default_rng(13)
    pred, target = make_inputs("cce_with_logits", rng, (1024, 50))
    z = jax.device_put(pred.astype(cuda.BF16), gpu)
    v, g = gl.cce_with_logits.value_and_grad(z, jax.device_put(target, gpu))
    assert str(g.dtype) == "bfloat16"
    want_v, want_g = gl.cce_with_logits.value_and_grad(pred.astype(cuda.BF16), target)
    assert_within_one_bfloat16_rounding(np.asarray(v), want_v)
    assert_within_one_bfloat16_rounding(np.asarray(g), want_g)


# ---------------------------------------------------------------------------------------------
# hardening on the GPU: threads, streams, memory, the fuzz generator


def test_gpu_threads_and_streams_match_one_thread(cp):
    import threading

    rng = np.random.default_rng(7)
    cases = []
    for i in range(40):
        loss = ALL[i % len(ALL)]
        pred, target = make_inputs(loss, rng, (int(rng.integers(1, 5000)), 7), dtype=np.float32)
        cases.append((loss, cp.asarray(pred), cp.asarray(target)))
    want = [tuple(a.get().tobytes() for a in gl.LOSSES[l].value_and_grad(p, t))
            for l, p, t in cases]
    errors, got = [], [[None] * len(cases) for _ in range(8)]

    def worker(k):
        try:
            with cp.cuda.Stream(non_blocking=True) as stream:  # each thread on its own stream
                for i in np.random.default_rng(k).permutation(len(cases)):
                    loss, p, t = cases[i]
                    v, g = gl.LOSSES[loss].value_and_grad(p, t)
                    stream.synchronize()
                    got[k][i] = (v.get().tobytes(), g.get().tobytes())
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert all(got[k] == want for k in range(8))


@pytest.mark.parametrize("loss", ["mse", "bce_with_logits", "cce_with_logits"])
def test_gpu_peak_memory_is_inputs_plus_gradient(cp, loss):
    n = 1 << 26
    rng = cp.random.default_rng(8)
    if loss == "cce_with_logits":
        pred = rng.standard_normal((n // 64, 64), dtype=cp.float32)
        target = rng.integers(0, 64, n // 64)
    else:
        pred = rng.standard_normal(n, dtype=cp.float32)
        target = rng.random(n, dtype=cp.float32)
    gl.LOSSES[loss].value_and_grad(pred[:1000], target[:1000])  # compile first
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()  # what the pool holds: the inputs
    value, grad = gl.LOSSES[loss].value_and_grad(pred, target)
    cp.cuda.Device().synchronize()
    extra = pool.total_bytes() - before  # everything the call allocated (freed blocks stay)
    assert extra <= grad.nbytes + (4 << 20), (extra, grad.nbytes)


def test_gpu_fuzz_generator_agrees_with_numpy(cp):
    """The CPU fuzz generator's cases, on CuPy: the same outcome as the NumPy backend on the
    inputs as the device sees them (tests/agreement.py: float32 flush-to-zero).
    GPULOSS_GPU_FUZZ_EXAMPLES sets the count (default 2,000)."""
    import os

    from agreement import assert_agree, device_view
    from hypothesis import HealthCheck, given, settings
    from test_fuzz import _run, cases

    def to_gpu(x):
        return cp.asarray(x) if isinstance(x, np.ndarray) and x.dtype != object else x

    examples = int(os.environ.get("GPULOSS_GPU_FUZZ_EXAMPLES", "2000"))

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def check(case):
        loss, entry, pred, target, opts = case
        if pred.dtype == object or target.dtype == object:
            return
        gpu_args = (to_gpu(pred), to_gpu(target), {k: to_gpu(v) for k, v in opts.items()})
        try:
            _run(loss, entry, pred, target, opts)
        except (TypeError, ValueError) as exc:
            with pytest.raises(type(exc)):
                _run(loss, entry, *gpu_args)
            return
        got = _run(loss, entry, *gpu_args)
        want = _run(loss, entry, *device_view(pred, target, opts))
        for name, w, g in zip(("value", "grad"), want, got):
            if w is not None:
                assert_agree(g.get(), w, pred.dtype, f"{loss} {entry} {name} {opts}")

    check()


def test_torch_cuda_tensor_that_requires_grad(cp):
    """torch refuses to export a tensor that requires grad through DLPack: the backend
    detaches it first (a view, no copy)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    rng = np.random.default_rng(8)
    pred, target = make_inputs("cce_with_logits", rng, (64, 10), dtype=np.float32)
    z = torch.tensor(pred, device="cuda", requires_grad=True)
    t = torch.tensor(target, device="cuda")
    v, g = gl.cce_with_logits.value_and_grad(z, t)
    want = gl.cce_with_logits.value_and_grad(pred, target)
    _close(v.cpu().numpy(), want[0], np.float32)
    _close(g.cpu().numpy(), want[1], np.float32)
    assert z.grad is None  # nothing was attached to autograd behind the caller's back


def test_torch_cuda_runs_on_torchs_current_stream(cp):
    """With validate=False nothing synchronises the host: the kernels must run on torch's
    current stream, so that work queued after the call on that stream sees the results and
    torch's allocator never reuses an input under a running kernel."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    rng = np.random.default_rng(9)
    pred, target = make_inputs("bce_with_logits", rng, (1 << 22,), dtype=np.float32)
    want = gl.bce_with_logits.value_and_grad(pred, target.astype(np.float32))
    stream = torch.cuda.Stream()
    seen = []
    real_compute = _cuda_backend_compute()

    def spy(call, runtime=None):
        seen.append(cp.cuda.get_current_stream().ptr)
        return real_compute(call, runtime)

    import gpuloss.backends.cuda as cb

    cb.compute = spy
    try:
        with torch.cuda.stream(stream):
            z = torch.tensor(pred, device="cuda")
            y = torch.tensor(target.astype(np.float32), device="cuda")
            v, g = gl.bce_with_logits.value_and_grad(z, y, validate=False)
            del z, y  # the caching allocator may hand this memory out again at once
            junk = torch.full((1 << 23,), float("nan"), device="cuda")
            v2, g2 = v.clone(), g.clone()
        stream.synchronize()
    finally:
        cb.compute = real_compute
    assert seen == [stream.cuda_stream]
    del junk
    _close(v2.cpu().numpy(), want[0], np.float32)
    _close(g2.cpu().numpy(), want[1], np.float32)


def _cuda_backend_compute():
    import gpuloss.backends.cuda as cb

    return cb.compute


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [{}, {"reduction": "none"},
                                     {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0,
                                      "ignore_index": 1}])
def test_gpu_linear_cross_entropy_on_cupy_matches_numpy(cp, options, dtype):
    """cuBLAS GEMMs, the row kernel writing the gradient over the chunk's logits (issue 27)."""
    rng = np.random.default_rng(27)
    h = rng.normal(size=(300, 64)).astype(dtype)
    W = (rng.normal(size=(1000, 64)) / 8).astype(dtype)
    b = rng.normal(size=1000).astype(dtype)
    t = rng.integers(0, 1000, 300)
    want_v, want_g = gl.linear_cross_entropy.value_and_grad(h, W, t, bias=b, **options)
    v, g = gl.linear_cross_entropy.value_and_grad(cp.asarray(h), cp.asarray(W), cp.asarray(t),
                                                  bias=cp.asarray(b), chunk_mb=0.1, **options)
    assert isinstance(v, cp.ndarray) and all(isinstance(x, cp.ndarray) for x in g)
    _close(cp.asnumpy(v), want_v, dtype)
    for got, want in zip(g, want_g):
        _close(cp.asnumpy(got), want, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_linear_cross_entropy_torch_cuda_backward(cp, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    tdt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(512, 128, device="cuda", generator=gen).to(tdt)
    W = (torch.randn(4000, 128, device="cuda", generator=gen) / 8).to(tdt)
    t = torch.randint(0, 4000, (512,), device="cuda", generator=gen)
    grads = []
    for fn in ("gpuloss", "reference"):
        ht, Wt = h.clone().requires_grad_(), W.clone().requires_grad_()
        if fn == "gpuloss":
            loss = gl.linear_cross_entropy(ht, Wt, t, chunk_mb=0.5)
        else:  # float32 logits from the same 16-bit inputs
            loss = F.cross_entropy(ht.float() @ Wt.float().T, t)
        loss.backward()
        grads.append((loss.float(), ht.grad.float(), Wt.grad.float()))
    tol = 1e-5 if dtype == "float32" else 2e-2
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("deterministic", [False, True])
def test_distributed_on_nccl_with_one_rank_matches_one_device(cp, tmp_path, deterministic):
    """gpuloss.distributed on CUDA tensors over nccl (a group of one rank: one GPU is lent at a
    time): the exchanges run on the device and the numbers are the single-device ones."""
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    import gpuloss.distributed as gld

    if not dist.is_nccl_available():
        pytest.skip("this PyTorch has no nccl")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        rng = np.random.default_rng(0)
        z = rng.standard_normal((256, 5000)).astype(np.float32) * 3
        t = rng.integers(0, 5000, 256)
        zt = torch.tensor(z, device="cuda", requires_grad=True)
        loss = gld.cce_with_logits(zt, torch.tensor(t, device="cuda"), label_smoothing=0.1,
                                   z_loss=1e-3, deterministic=deterministic, block=1000)
        loss.backward()
        want, grad = gl.cce_with_logits.value_and_grad(z.astype(np.float64), t,
                                                       label_smoothing=0.1, z_loss=1e-3)
        _close(float(loss), want, np.float32)
        _close(zt.grad.cpu().numpy(), grad, np.float32)
        h = torch.randn(300, 64, device="cuda", requires_grad=True)
        W = torch.randn(5000, 64, device="cuda", requires_grad=True)
        y = torch.randint(0, 5000, (300,), device="cuda")
        lin = gld.linear_cross_entropy(h, W, y, deterministic=deterministic, block=1000,
                                       chunk_mb=1)
        lin.backward()
        ref, (dh, dw) = gl.linear_cross_entropy.value_and_grad(
            h.detach().double().cpu().numpy(), W.detach().double().cpu().numpy(),
            y.cpu().numpy())
        np.testing.assert_allclose(float(lin), ref, rtol=1e-3)
        for got, want_g in ((h.grad, dh), (W.grad, dw)):  # (float32 GEMMs: TF32 may be on)
            np.testing.assert_allclose(got.cpu().double().numpy(), want_g, rtol=1e-3,
                                       atol=1e-3 * float(np.abs(want_g).max()))
    finally:
        dist.destroy_process_group()
