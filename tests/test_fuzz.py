"""Fuzzing every loss and entry point with random shapes, dtypes, values and options.

Every outcome must be either a result that agrees with the float64 reference, or a TypeError /
ValueError whose message names the argument at fault. No other exception, no warning (the test
run turns warnings into errors), no modified input. GPULOSS_FUZZ_EXAMPLES sets the number of
cases (default 10,000 in all).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import ALL, CATEGORICAL, reference

import gpuloss as gl

EXAMPLES = int(os.environ.get("GPULOSS_FUZZ_EXAMPLES", "10000"))
ENTRY_POINTS = ("call", "grad", "value_and_grad")
ARG_NAMES = ("pred", "target", "sample_weight", "pos_weight", "class_weight", "ignore_index",
             "label_smoothing", "axis", "eps", "reduction", "validate", "class indices",
             "keyword argument", "delta", "beta", "quantile", "log_input", "full",
             "focal_gamma", "focal_alpha", "z_loss", "temperature", "target_logits", "margin",
             "softcap")
# the catalogue's own options: valid values and a few that must be refused
CATALOGUE_OPTIONS = {
    "huber": {"delta": [1.0, 0.5, 3.0, 1e-3, 0.0, -1.0, np.nan, np.inf, 1e39, "x"]},
    "smooth_l1": {"beta": [1.0, 0.0, 0.5, 3.0, -1.0, np.nan, np.inf, 1e39, 1e-37]},
    "pinball": {"quantile": [0.5, 0.1, 0.9, 0.0, 1.0, -0.5, np.nan]},
    "poisson_nll": {"log_input": [True, False, 1, None], "full": [False, True, "yes"],
                    "eps": [1e-8, 0.0, 1e-3, -1.0, np.nan]},
    "bce_with_logits": {"focal_gamma": [0.0, 0.5, 2.0, 1e-3, -1.0, np.nan, "x"],
                        "focal_alpha": [None, 0.25, 0.0, 1.0, 1.5, np.nan]},
    "cce_with_logits": {"focal_gamma": [0.0, 0.5, 2.0, -1.0, np.nan],
                        "z_loss": [0.0, 1e-4, 0.1, -1.0, np.inf],
                        "softcap": [None, 30.0, 1e-3, 1e39, 0.0, -1.0, 1e-40, np.nan, np.inf]},
    "kl_div_with_logits": {"temperature": [1.0, 0.5, 4.0, 1e-3, 1e3, 0.0, -1.0, np.nan, 1e-40,
                                           np.inf],
                           "target_logits": [False, True, 1]},
    "multiclass_hinge": {"margin": [1.0, 0.0, 2.5, -1.0, np.nan]},
}
DTYPES = ("bool", "int8", "int32", "int64", "uint8", "float16", "float32", "float64",
          "complex64", "object")
# FLT_MIN and 1.5 FLT_MIN: normal float32 numbers whose difference is subnormal (0 under
# flush-to-zero); 1e30: logits whose z-loss (lse^2) overflows float32
FLT_MIN = float(np.finfo(np.float32).tiny)
VALUES = (0.0, 1.0, 0.5, 0.25, -0.5, 1.5, 2.0, -3.0, 7.0, 1e30, -1e30, 1e-40, -1e-40, 5e-324,
          np.nan, np.inf, -np.inf, 0.999, 1e-7, FLT_MIN, 1.5 * FLT_MIN, -FLT_MIN)
LABEL_DTYPES = ("int32", "int64", "uint8", "uint64")  # unsigned: a -1 wraps to 2^64 - 1


@st.composite
def arrays(draw, shape, dtype=None, values=VALUES):
    dtype = dtype or draw(st.sampled_from(DTYPES))
    size = int(np.prod(shape))
    raw = np.array(draw(st.lists(st.sampled_from(values), min_size=size, max_size=size)),
                   dtype=np.float64).reshape(shape)
    if dtype == "object":
        return raw.astype(object)
    if dtype == "bool":
        return raw > 0.5
    with np.errstate(all="ignore"):
        if np.dtype(dtype).kind in "iu":
            return np.nan_to_num(raw, posinf=5, neginf=-5).clip(-5, 5).astype(dtype)
        return raw.astype(dtype)


@st.composite
def cases(draw):
    loss = draw(st.sampled_from(ALL))
    entry = draw(st.sampled_from(ENTRY_POINTS))
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 3), min_size=ndim, max_size=ndim)))
    well_formed = draw(st.integers(0, 3)) > 0  # mostly valid dtypes and shapes
    pred_dtype = draw(st.sampled_from(("float16", "float32", "float64"))) if well_formed else None
    pred = draw(arrays(shape, pred_dtype))
    opts = {}
    axis = -1
    if loss in CATEGORICAL and ndim and draw(st.booleans()):
        axis = draw(st.integers(-ndim - 1, ndim))
        opts["axis"] = axis
    if loss in CATEGORICAL and ndim and -ndim <= axis < ndim:
        K = shape[axis]
        sample_shape = shape[: axis % ndim] + shape[axis % ndim + 1 :]
        if draw(st.booleans()):
            tdtype = draw(st.sampled_from(LABEL_DTYPES)) if well_formed else None
            labels = np.array(draw(st.lists(st.integers(-2, K + 1), min_size=int(np.prod(
                sample_shape)), max_size=int(np.prod(sample_shape)))), dtype=np.int64)
            target = labels.reshape(sample_shape).astype(tdtype or "int64")
            if not well_formed:
                target = draw(arrays(sample_shape))
            if draw(st.booleans()):
                opts["ignore_index"] = draw(st.sampled_from([-100, -1, 0, 1, 1.5, None]))
        else:
            target = draw(arrays(shape, "float64" if well_formed else None,
                                 values=(0.0, 1.0, 0.5, 0.25, 1.5, -0.5, np.nan)))
        if draw(st.booleans()):
            cw_shape = (K,) if well_formed else draw(st.sampled_from([(K,), (K + 1,), ()]))
            opts["class_weight"] = draw(arrays(cw_shape, "float64", values=(1.0, 0.5, 2.0, 0.0,
                                                                           -1.0, np.nan)))
            # extreme class weights: beyond float32's range at either end
            opts["class_weight"] = opts["class_weight"] * draw(st.sampled_from([1.0, 1e39,
                                                                                1e-39]))
        wshape_pool = [sample_shape, sample_shape[-1:], (), (7,)]
    else:
        target = draw(arrays(shape if well_formed else draw(st.sampled_from([shape, (5,)])),
                             None))
        if well_formed and draw(st.booleans()):  # mostly valid labels and counts
            if loss in ("hinge", "squared_hinge"):
                target = draw(arrays(shape, draw(st.sampled_from(("float64", "float32",
                                                                  "bool", "int64"))),
                                     values=(-1.0, 1.0, 1.0, -1.0, np.nan, 0.0)))
            elif loss == "poisson_nll":
                target = draw(arrays(shape, "float64", values=(0.0, 1.0, 2.0, 3.0, 7.0, 0.5,
                                                               1e30, np.nan, -1.0)))
        wshape_pool = [shape, shape[-1:], (), (7,)]
    if draw(st.booleans()):
        opts["sample_weight"] = draw(arrays(draw(st.sampled_from(wshape_pool)),
                                            draw(st.sampled_from(("float64", "float32",
                                                                  "int64", "complex64"))),
                                            values=(1.0, 0.5, 2.0, 0.0, -1.0, np.nan, 1e30)))
    if loss == "bce_with_logits" and draw(st.booleans()):
        opts["pos_weight"] = draw(arrays(draw(st.sampled_from([shape[-1:], (), (7,)])),
                                         "float64", values=(1.0, 2.0, 0.0, -1.0, np.nan)))
    if loss in ("bce_with_logits", "cce_with_logits") and draw(st.booleans()):
        opts["label_smoothing"] = draw(st.sampled_from([0.0, 0.1, 1.0, -0.1, 1.5, np.nan, "x"]))
    if loss in ("bce", "cce") and draw(st.booleans()):
        opts["eps"] = draw(st.sampled_from([None, 1e-7, 1e-3, 0.0, 0.5, -1.0, np.nan]))
    for name, values in CATALOGUE_OPTIONS.get(loss, {}).items():
        if draw(st.booleans()):
            opts[name] = draw(st.sampled_from(values))
    if draw(st.booleans()):
        opts["reduction"] = draw(st.sampled_from(["mean", "sum", "none", "avg", None, 3]))
    if draw(st.integers(0, 4)) == 0:
        opts["validate"] = draw(st.sampled_from([False, True, 1]))
    if draw(st.integers(0, 20)) == 0:
        opts["not_an_option"] = 1
    return loss, entry, pred, target, opts


@st.composite
def edge_cases(draw):
    """The numerical edge families of the CUDA path, drawn on purpose (the generic generator
    meets them too rarely): normal float32 inputs whose difference is subnormal, extreme
    temperatures, huge delta/beta, extreme class weights with z-loss and zero-weight rows,
    unsigned labels. Returns a case as `cases` does."""
    family = draw(st.sampled_from(["subnormal", "temperature", "limit", "class", "hinge"]))
    entry = draw(st.sampled_from(ENTRY_POINTS))
    n = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(("float32", "float64")))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    pair = st.sampled_from([(1.5 * FLT_MIN, FLT_MIN), (FLT_MIN, 1.5 * FLT_MIN),
                            (-FLT_MIN, -1.5 * FLT_MIN), (1.0, 0.5), (FLT_MIN, FLT_MIN)])
    logits = st.floats(-30, 30, allow_nan=False, width=32)
    if family in ("subnormal", "hinge"):
        # the gradients that are decisions (a sign, a side, a margin, d / beta): a value that
        # is the subnormal difference itself (the loss, mse's 2d) is flushed on the device and
        # may add up to a normal number on the CPU: flush-to-zero, documented
        entry = "grad"
    if family == "subnormal":
        loss = draw(st.sampled_from(["mae", "pinball", "smooth_l1"]))
        p, y = zip(*draw(st.lists(pair, min_size=n, max_size=n)))
        opts = {"smooth_l1": {"beta": draw(st.sampled_from([1e-37, 1e-30, 1.0]))},
                "pinball": {"quantile": 0.25}}.get(loss, {})
        return loss, entry, np.array(p, dtype), np.array(y, dtype), {**opts,
                                                                     "reduction": reduction}
    if family == "hinge":
        rows = draw(st.lists(pair, min_size=n, max_size=n))
        z = np.array(rows, dtype)
        t = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
        return "multiclass_hinge", entry, z, t, {"margin": 0.0, "reduction": reduction}
    if family == "temperature":
        K = draw(st.integers(1, 5))
        z = np.array(draw(st.lists(logits, min_size=n * K, max_size=n * K)), dtype)
        v = np.array(draw(st.lists(logits, min_size=n * K, max_size=n * K)), dtype)
        temp = draw(st.sampled_from([1e-3, 0.5, 20.0, 1e3, 1e4, 1e6, 1e-40]))
        return "kl_div_with_logits", entry, z.reshape(n, K), v.reshape(n, K), {
            "temperature": temp, "target_logits": True, "reduction": reduction}
    if family == "limit":
        loss = draw(st.sampled_from(["huber", "smooth_l1"]))
        # (a small d over a beta near the dtype's largest value is subnormal: flushed on the
        # device, as any subnormal intermediate; the limits are at infinite and huge d)
        vals = st.sampled_from([np.inf, -np.inf, 1e30, -1e30, 0.0])
        p = np.array(draw(st.lists(vals, min_size=n, max_size=n)), dtype)
        name = "delta" if loss == "huber" else "beta"
        return loss, entry, p, np.zeros(n, dtype), {
            name: draw(st.sampled_from([1e39, np.inf, 1e300])), "reduction": reduction}
    K = draw(st.integers(1, 4))  # "class"
    z = np.array(draw(st.lists(st.sampled_from([0.0, 1.0, -2.0, 1e30, -1e30, 5.0]),
                               min_size=n * K, max_size=n * K)), dtype).reshape(n, K)
    t = np.array(draw(st.lists(st.integers(0, K - 1), min_size=n, max_size=n)))
    t = t.astype(draw(st.sampled_from(LABEL_DTYPES)))
    cw = np.array(draw(st.lists(st.sampled_from([1.0, 2.0, 0.5, 0.0]), min_size=K,
                                max_size=K))) * draw(st.sampled_from([1.0, 1e39, 1e-39]))
    sw = np.array(draw(st.lists(st.sampled_from([1.0, 0.0, 2.0]), min_size=n, max_size=n)))
    loss = draw(st.sampled_from(["cce_with_logits", "nll", "multiclass_hinge"]))
    opts = {"class_weight": cw, "sample_weight": sw, "reduction": reduction}
    if loss == "cce_with_logits":
        opts.update(z_loss=draw(st.sampled_from([0.0, 1e-4])),
                    focal_gamma=draw(st.sampled_from([0.0, 2.0])),
                    label_smoothing=draw(st.sampled_from([0.0, 0.1])),
                    softcap=draw(st.sampled_from([None, 5.0])))
    return loss, entry, z, t, opts


def _run(loss, entry, pred, target, opts):
    fn = gl.LOSSES[loss]
    if entry == "call":
        return fn(pred, target, **opts), None
    if entry == "grad":
        return None, fn.grad(pred, target, **opts)
    return fn.value_and_grad(pred, target, **opts)


def _valid_domain(loss, pred, target, opts):
    """True when validate=True would accept these values (so the reference applies)."""
    p = pred.astype(np.float64)
    ok = True
    for key in ("sample_weight", "pos_weight", "class_weight"):
        w = opts.get(key)
        if w is not None and w.size:
            ok &= bool(np.all(w.astype(np.float64) >= 0))
    if loss in ("bce", "cce"):
        ok &= not bool(np.any((p < 0) | (p > 1)))
    if loss in ("bce", "bce_with_logits"):
        t = target.astype(np.float64)
        ok &= not bool(np.any((t < 0) | (t > 1)))
    if loss == "poisson_nll":
        ok &= not bool(np.any(target.astype(np.float64) < 0))
        if not opts.get("log_input", True):
            ok &= not bool(np.any(p < 0))
    if loss in ("hinge", "squared_hinge") and target.dtype != bool:
        t = target.astype(np.float64)
        ok &= bool(np.all((t == 1) | (t == -1) | np.isnan(t)))
    if loss in CATEGORICAL:
        if target.dtype.kind == "f":
            if opts.get("target_logits") is not True:  # logits are not range-checked
                ok &= not bool(np.any((target < 0) | (target > 1)))
        else:
            K = pred.shape[opts.get("axis", -1)]
            counted = target != opts.get("ignore_index", object())
            ok &= not bool(np.any(((target < 0) | (target >= K)) & counted))
    return ok


def _compare(got, want, dtype):
    got = np.asarray(got, np.float64)
    with np.errstate(all="ignore"):
        want = np.asarray(want, np.float64).astype(dtype).astype(np.float64)  # what fits
    rtol = {"float16": 5e-3, "float32": 1e-4, "float64": 1e-9}[np.dtype(dtype).name]
    finite = np.isfinite(want) & np.isfinite(got)
    scale = float(np.abs(want[finite]).max()) if finite.any() else 0.0
    if np.dtype(dtype) == np.float16:
        scale = max(scale, 1.0)  # float16 computes in float32 but stores in float16
    np.testing.assert_allclose(got[finite], want[finite], rtol=rtol, atol=rtol * scale)
    # infinities and NaN where the reference has them (a float32 overflow may add inf)
    assert np.array_equal(np.isnan(want) & ~np.isinf(got), np.isnan(got) & ~np.isinf(want))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(cases())
def test_fuzz_every_loss_and_entry_point(case):
    loss, entry, pred, target, opts = case
    inputs = [pred, target, *[v for v in opts.values() if isinstance(v, np.ndarray)]]
    copies = [a.copy() for a in inputs]
    try:
        value, grad = _run(loss, entry, pred, target, opts)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        assert any(name in message for name in ARG_NAMES), message
        outcome = "error"
    else:
        outcome = "result"
    for before, after in zip(copies, inputs):
        assert before.shape == after.shape and before.tobytes() == after.tobytes(), \
            "an input was modified"
    if outcome == "error":
        return
    # a result: inputs were well-formed; check it against the reference where it applies
    assert pred.dtype.kind == "f"
    if grad is not None:
        assert grad.shape == pred.shape and grad.dtype == pred.dtype
    validate = opts.get("validate", True)
    if validate and not _valid_domain(loss, pred, target, opts):
        pytest.fail("validate=True accepted out-of-domain values")
    if value is not None and _valid_domain(loss, pred, target, opts):
        kw = {k: v for k, v in opts.items() if k not in ("validate",)}
        with np.errstate(all="ignore"):
            want = reference(loss, pred, target, **kw)
        _compare(value, want, pred.dtype)
