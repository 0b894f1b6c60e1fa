"""Concurrency and memory: many threads get single-threaded bits; no full-size temporaries."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest
from conftest import make_inputs
from reference import ALL, CATEGORICAL

import gpuloss as gl


def _mixed_calls(seed, count):
    """A reproducible list of (loss, entry point, arguments)."""
    rng = np.random.default_rng(seed)
    calls = []
    for i in range(count):
        loss = ALL[i % len(ALL)]
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 6)))
        pred, target = make_inputs(loss, rng, shape, dtype=[np.float32, np.float64][i % 2])
        opts = {"reduction": ["mean", "sum", "none"][i % 3]}
        if i % 4 == 0:
            opts["sample_weight"] = rng.uniform(0, 2, shape[0] if loss in CATEGORICAL else shape)
        calls.append((loss, ["__call__", "grad", "value_and_grad"][i % 3], pred, target, opts))
    return calls


def _run(call):
    loss, entry, pred, target, opts = call
    fn = gl.LOSSES[loss]
    out = getattr(fn, entry)(pred, target, **opts)
    out = out if isinstance(out, tuple) else (out,)
    return b"".join(np.asarray(o).tobytes() for o in out)


def test_eight_threads_times_a_thousand_calls_match_one_thread():
    calls = _mixed_calls(0, 1000)
    # include a few calls big enough to use the block thread pool from many threads at once
    rng = np.random.default_rng(1)
    for loss in ALL:
        pred, target = make_inputs(loss, rng, (70000, 4), dtype=np.float32)
        calls.append((loss, "value_and_grad", pred, target, {}))
    expected = [_run(c) for c in calls]
    results = [[None] * len(calls) for _ in range(8)]
    errors = []

    def worker(t):
        try:
            order = np.random.default_rng(t).permutation(len(calls))
            for i in order:
                results[t][i] = _run(calls[i])
        except Exception as exc:  # reported below; a thread must not die silently
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t in range(8):
        diffs = [i for i in range(len(calls)) if results[t][i] != expected[i]]
        assert not diffs, f"thread {t} differs from one thread at calls {diffs[:5]}"


@pytest.mark.parametrize("loss", ["mse", "bce_with_logits", "cce_with_logits"])
def test_peak_memory_is_inputs_plus_gradient(loss):
    """Peak traced memory of value_and_grad stays within 1.1x (inputs + gradient)."""
    n = 1 << 26 if loss != "cce_with_logits" else 1 << 26
    rng = np.random.default_rng(2)
    if loss == "cce_with_logits":
        pred = rng.standard_normal((n // 64, 64), dtype=np.float32)
        target = rng.integers(0, 64, n // 64)
    else:
        pred = rng.standard_normal(n, dtype=np.float32)
        target = rng.random(n, dtype=np.float32)
    fn = gl.LOSSES[loss]
    fn.value_and_grad(pred[:1000], target[:1000])  # imports, thread pool, first-call setup
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        value, grad = fn.value_and_grad(pred, target)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    inputs = pred.nbytes + target.nbytes
    extra = peak - before  # what the call allocated, the gradient included
    assert extra <= 0.1 * (inputs + grad.nbytes) + grad.nbytes, (extra, grad.nbytes)


# ---------------------------------------------------------------------------------------------
# device faults: clear errors from the CUDA backend (driven by the CPU emulator)


@pytest.fixture(scope="module")
def host_lib():
    import kernel_host

    # the shared build (cached per run): the faulty runtime raises before any launch, so a
    # build of its own, a minute of g++, bought nothing
    return kernel_host.build(kernel_host.cache_dir())


def _faulty_runtime(host_lib, exc):
    import kernel_host

    class Faulty(kernel_host.EmulatorRuntime):
        def kernel(self, name, x):
            raise exc

    return Faulty(host_lib)


def _cupy_errors():
    pytest.importorskip("cupy")
    from cupy.cuda import compiler, memory, runtime

    return {
        "oom": (memory.OutOfMemoryError(1 << 34, 1 << 30, 0), MemoryError,
                r"Out of GPU memory in gpuloss.mse.*17,179,869,184 bytes.*StreamingLoss"),
        "nvrtc": (OSError("libnvrtc.so.12: cannot open shared object file"), RuntimeError,
                  r"could not compile its CUDA kernels with NVRTC.*nvidia-cuda-nvrtc"),
        "compile": (compiler.CompileException("error: expected ';'", "src", "k", {}),
                    RuntimeError, r"could not compile its CUDA kernels"),
        "cache": (PermissionError(13, "Permission denied", "/readonly/kernel_cache"),
                  RuntimeError, r"kernel cache.*CUPY_CACHE_DIR"),
        "gone": (runtime.CUDARuntimeError(100), RuntimeError,
                 r"CUDA device failed in gpuloss.mse.*no CUDA-capable device.*NumPy inputs"),
    }


@pytest.mark.parametrize("fault", ["oom", "nvrtc", "compile", "cache", "gone"])
def test_device_faults_give_clear_errors_and_numpy_keeps_working(host_lib, fault):
    from gpuloss import _api
    from gpuloss.backends import cuda as _cuda_backend

    exc, kind, pattern = _cupy_errors()[fault]
    call = _api.prepare("mse", np.zeros(8), np.zeros(8), {}, want_value=True, want_grad=True)
    with pytest.raises(kind, match=pattern):
        _cuda_backend.compute(call, _faulty_runtime(host_lib, exc))
    assert float(gl.mse(np.ones(8), np.zeros(8))) == 1.0  # CPU inputs are unaffected


def test_other_device_errors_pass_through_unchanged(host_lib):
    from gpuloss import _api
    from gpuloss.backends import cuda as _cuda_backend

    call = _api.prepare("mse", np.zeros(8), np.zeros(8), {}, want_value=True, want_grad=True)
    with pytest.raises(KeyError, match="something else"):
        _cuda_backend.compute(call, _faulty_runtime(host_lib, KeyError("something else")))
