"""Quick checks on a real GPU, for benchmarks/run_on_device.sh (stages a, b and d).

    python benchmarks/device_checks.py variants   # (a) every kernel variant, tiny inputs
    python benchmarks/device_checks.py ftz        # (b) flush-to-zero and subnormal probes
    python benchmarks/device_checks.py torch      # (d) torch: requires grad, a side stream
    python benchmarks/device_checks.py one_each   # (e) one launch per family, for sanitizers

Each stage prints one summary line ("stage X: ...") and exits non-zero on a disagreement,
so that a timeout later in the run still leaves this evidence in the log.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import gpuloss as gl
from gpuloss import _api
from gpuloss._call import NONNEG, SIGN, UNIT
from gpuloss._examples import default_rules
from gpuloss.backends import cuda as _cuda_backend
from gpuloss.backends import numpy as _numpy_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from agreement import assert_agree, device_view  # noqa: E402 - the tests' definition of agreeing

SMALL = {name: (37,) for name, fn in gl.LOSSES.items() if fn.family == "elementwise"}
# a K per row layout (the small layout at each of its threads per row) and one read twice
# options that turn each compile-time switch on (gpuloss.losses: kernel_switches)
SWITCH_OPTIONS = {"GL_FOCAL": {"focal_gamma": 2.0}, "GL_Z_LOSS": {"z_loss": 1e-3},
                  "GL_SOFTCAP": {"softcap": 2.0},  # (below the logits' spread: it caps)
                  "GL_TEACHER_LOGITS": {"target_logits": True}}


def switch_variants(loss) -> list[dict]:
    """The options of every switch combination of `loss` (one dict per functor variant)."""
    switches = list(gl.LOSSES[loss].kernel_switches)
    return [{k: v for bit, name in enumerate(switches) if mask >> bit & 1
             for k, v in SWITCH_OPTIONS[name].items()} for mask in range(1 << len(switches))]


def ks_for_layouts(loss, pred_dtype, labels) -> list[int]:
    """A K for each row layout of `loss` at `pred_dtype` and target kind: the small layout,
    the warp and block layouts full, and a row read twice."""
    functor = gl.LOSSES[loss].functor(0)
    ks = [10]  # (one instantiation serves every small K; the tests cover its threads per row)
    shift = _cuda_backend.row_shift(pred_dtype)
    for threads, cache in _cuda_backend.row_configs(pred_dtype, labels, functor)[1:]:
        ks.append(threads * cache - shift if cache else ks[-1] + 1)
    return ks


class Recording:
    """A runtime (CuPy's, or the tests' emulator) that notes every kernel name it launches."""

    def __init__(self, runtime):
        self.inner = runtime
        self.xp = runtime.xp
        self.names: set[str] = set()

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def kernel(self, name, x):
        self.names.add(name)
        return self.inner.kernel(name, x)


def _inputs(loss, dtype, target_dtype, K=None, labels=True, rng=None):
    rng = rng or np.random.default_rng(0)
    if loss in SMALL:  # values in the loss's declared domains
        shape = SMALL[loss]
        pred_rule, target_rule = default_rules(gl.LOSSES[loss])
        p = {UNIT: rng.uniform(0.05, 0.95, shape), NONNEG: rng.uniform(0.1, 3, shape)}.get(
            pred_rule, rng.standard_normal(shape))
        if target_rule == SIGN:
            y = np.where(rng.random(shape) < 0.5, -1, 1)
        elif target_rule == NONNEG:
            y = rng.poisson(2.0, shape)
        else:
            y = rng.uniform(0, 1, shape) if target_rule == UNIT else rng.standard_normal(shape)
            if np.dtype(target_dtype).kind in "biu":  # 0/1 targets
                y = y > 0.5
        return p.astype(dtype), y.astype(target_dtype)
    z = rng.standard_normal((5, K))
    if loss == "cce":
        z = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    if labels:
        return z.astype(dtype), rng.integers(0, K, 5).astype(target_dtype)
    t = rng.uniform(0, 1, (5, K))
    return z.astype(dtype), (t / t.sum(1, keepdims=True)).astype(target_dtype)


def variants(runtime=None) -> int:
    """Launch every kernel variant on tiny inputs through the backend's launch code and
    compare with NumPy. `runtime` defaults to CuPy's (the tests pass the emulator's)."""
    if runtime is None:
        import cupy as cp

        runtime = _cuda_backend.CupyRuntime()
        start = time.perf_counter()
        for group in _cuda_backend.kernel_groups():  # compile each module once, timed
            _cuda_backend._cupy_module(group, cp.cuda.Device().id)
        compiled = f", all modules compiled in {time.perf_counter() - start:.1f} s"
    else:
        compiled = " (emulated)"
    rt = Recording(runtime)
    xp = rt.xp
    bad = []
    cases = []
    for loss in SMALL:
        for opts in switch_variants(loss):
            for p in _cuda_backend.PRED_DTYPES:
                for t in _cuda_backend.target_dtypes(p):
                    cases.append((loss, p, t, None, True, opts))  # (hinge: booleans are -1/+1)
    for loss in (n for n, fn in gl.LOSSES.items() if fn.family == "categorical"):
        fn = gl.LOSSES[loss]
        for opts in switch_variants(loss):
            for p in _cuda_backend.PRED_DTYPES:
                for t in _cuda_backend.LABEL_DTYPES if fn.class_indices else ():
                    ks = ks_for_layouts(loss, p, True)  # int32 labels: the same instantiation,
                    ks = ks if t == np.int64 else ks[:1]  # read through a flag: once
                    cases += [(loss, p, t, K, True, opts) for K in ks]
                if fn.probability_targets:
                    cases += [(loss, p, t, K, False, opts)
                              for t in _cuda_backend.probability_target_dtypes(p)
                              for K in ks_for_layouts(loss, p, False)]
    for p in _cuda_backend.PRED_DTYPES:  # the weight checks, every stored dtype
        cases.append(("mse", p, p, None, True, {"sample_weight": np.ones(37, p)}))
    for p, t in zip(_cuda_backend.PRED_DTYPES, np.roll(_cuda_backend.PRED_DTYPES, 1)):
        cases.append(("cce_with_logits", p, t, 10, False, {}))  # targets checked as stored
    for loss, p, t, K, labels, opts in cases:
        pred, target = _inputs(loss, p, t, K, labels)
        try:
            call = _api.prepare(loss, xp.asarray(pred), xp.asarray(target),
                                {k: xp.asarray(v) if isinstance(v, np.ndarray) else v
                                 for k, v in opts.items()},
                                want_value=True, want_grad=True)
            value, grad = _cuda_backend.compute(call, rt)
            p_dev, t_dev, o_dev = device_view(pred, target, opts)
            want = gl.LOSSES[loss].value_and_grad(p_dev, t_dev, **o_dev)
            assert_agree(rt.to_host(value), want[0], p, "value")
            assert_agree(rt.to_host(grad), want[1], p, "grad")
        except Exception as exc:  # noqa: BLE001 - every failing variant is reported
            bad.append(f"{loss} {np.dtype(p)} {np.dtype(t)} K={K}: {type(exc).__name__} "
                       f"{str(exc)[:200]}")
    bad += _in_place_and_sum_parts(rt)
    missing = sorted(set(_cuda_backend.all_kernel_names()) - rt.names)
    for line in bad:
        print("  FAIL", line)
    for name in missing:
        print("  NOT LAUNCHED", name)
    print(f"stage a: {len(rt.names)}/{len(_cuda_backend.all_kernel_names())} kernel variants "
          f"launched, {len(bad)} disagreements{compiled}")
    return 1 if bad or missing else 0


def _in_place_and_sum_parts(rt) -> list[str]:
    """The gradient written over pred (grad_out = pred, linear cross-entropy's chunks) is bit
    for bit the one written to a new buffer, in every row layout of float32 cce_with_logits
    with all of its switches; and parts with reduction "sum" give NumPy's [sum, D]."""
    xp = rt.xp
    bad = []
    opts = {"focal_gamma": 2.0, "z_loss": 1e-3, "softcap": 2.0, "reduction": "sum"}
    for labels in (True, False):
        for K in ks_for_layouts("cce_with_logits", np.float32, labels):
            pred, target = _inputs("cce_with_logits", np.float32,
                                   np.int64 if labels else np.float32, K, labels)
            pred = pred * np.float32(4)
            try:
                results = []
                for in_place in (False, True):
                    z = xp.asarray(pred.copy())  # (the emulator's asarray is no copy)
                    call = _api.prepare("cce_with_logits", z, xp.asarray(target), opts,
                                        want_value=True, want_grad=True, parts=True,
                                        grad_out=z if in_place else None)
                    value, grad = _cuda_backend.compute(call, rt)
                    results.append((rt.to_host(value), rt.to_host(grad)))
                    assert not in_place or grad is z, "grad_out = pred was not written"
                (v0, g0), (v1, g1) = results
                assert v0.tobytes() == v1.tobytes() and g0.tobytes() == g1.tobytes(), \
                    "in place differs from a new buffer"
                want = _numpy_backend.compute(_api.prepare(
                    "cce_with_logits", pred, target, opts, want_value=True, want_grad=True,
                    parts=True))
                np.testing.assert_allclose(v0, want[0], rtol=1e-5)
                assert_agree(g0, want[1], np.float32, "sum-parts grad")
            except Exception as exc:  # noqa: BLE001 - every failing case is reported
                bad.append(f"in place / sum parts K={K} labels={labels}: "
                           f"{type(exc).__name__} {str(exc)[:200]}")
    return bad


def ftz() -> int:
    """What flush-to-zero does on this device, and that validation does not depend on it."""
    import cupy as cp

    facts, bad = [], 0
    g = gl.mse.grad(cp.asarray(np.array([1e-40], np.float32)), cp.zeros(1, cp.float32))
    facts.append(f"mse grad at 1e-40 (float32) = {float(g[0]):.3g} (README: 0)")
    bad += float(g[0]) != 0.0
    cast = cp.asarray(np.array([1e-40], np.float32)).astype(cp.float64)
    facts.append(f"CuPy float32->float64 cast of 1e-40 = {float(cast[0]):.3g}")
    for loss, pred in (("bce", [0.5, -1e-40]), ("cce", [[0.5, -1e-40]])):
        p = cp.asarray(np.array(pred, np.float32))
        t = cp.asarray(np.array([0.0, 1.0])) if loss == "bce" else cp.asarray(np.array([0]))
        try:
            gl.LOSSES[loss](p, t)
            facts.append(f"{loss} accepted a pred of -1e-40 (WRONG)")
            bad += 1
        except ValueError:
            facts.append(f"{loss} rejects a pred of -1e-40")
    w = cp.asarray(np.array([1.0, -1e-40], np.float32))
    try:
        gl.mse(cp.zeros(2, cp.float32), cp.zeros(2, cp.float32), sample_weight=w)
        facts.append("sample_weight of -1e-40 accepted (WRONG)")
        bad += 1
    except ValueError:
        facts.append("sample_weight of -1e-40 rejected")
    z = cp.asarray(np.array([[1.0, np.nan, 0.25]], np.float32))
    v = float(gl.cce_with_logits(z, cp.asarray(np.array([0]))))
    facts.append(f"cce_with_logits of [1, nan, 0.25] = {v}")
    bad += not np.isnan(v)
    print("stage b: " + "; ".join(facts) + f" -> {bad} problems")
    return 1 if bad else 0


def torch_checks() -> int:
    import torch

    if not torch.cuda.is_available():
        print("stage d: torch has no CUDA; skipped")
        return 0
    rng = np.random.default_rng(1)
    z = torch.tensor(rng.standard_normal((64, 10)), device="cuda", dtype=torch.float32,
                     requires_grad=True)
    t = torch.tensor(rng.integers(0, 10, 64), device="cuda")
    facts, bad = [], 0
    try:
        v, g = gl.cce_with_logits.value_and_grad(z, t)
        ref = torch.nn.functional.cross_entropy(z, t)
        err = abs(float(v) - float(ref)) / abs(float(ref))
        facts.append(f"requires-grad tensor ok (rel. diff {err:.1e})")
        bad += err > 1e-5
    except Exception as exc:  # noqa: BLE001
        facts.append(f"requires-grad tensor FAILED: {type(exc).__name__} {exc}")
        bad += 1
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        zz = z.detach().clone()
        v2 = gl.cce_with_logits(zz, t, validate=False)
        out = float(v2.clone())
    stream.synchronize()
    facts.append(f"side stream value {out:.6g} vs {float(v):.6g}")
    bad += not np.isclose(out, float(v), rtol=1e-6)
    print("stage d: " + "; ".join(facts) + f" -> {bad} problems")
    return 1 if bad else 0


def one_each() -> int:
    """One small launch of each kernel family (for compute-sanitizer racecheck/memcheck)."""
    import cupy as cp

    rng = np.random.default_rng(2)
    p = cp.asarray(rng.uniform(0.1, 0.9, 3000).astype(np.float32))
    gl.bce.value_and_grad(p, p, sample_weight=cp.ones(3000, cp.float32))  # check, pass (finishing its own sum)
    for K in (10, 300, 9000):  # lanes per row, a block per row, a row read twice
        z = cp.asarray(rng.standard_normal((40, K)).astype(np.float32))
        gl.cce_with_logits.value_and_grad(z, cp.asarray(rng.integers(0, K, 40)))
    cp.cuda.Device().synchronize()
    print("stage e: one launch of each kernel family done")
    return 0


if __name__ == "__main__":
    stage = sys.argv[1] if len(sys.argv) > 1 else "variants"
    stages = {"variants": variants, "ftz": ftz, "torch": torch_checks, "one_each": one_each}
    sys.exit(stages[stage]())
