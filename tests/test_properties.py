"""Property tests (hypothesis): random shapes, dtypes, values and options."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference import ALL, CATEGORICAL, reference

import gpuloss as gl

# Fixed examples in the normal run, so that CI is reproducible; GPULOSS_HYPOTHESIS_RANDOM=1
# explores new ones (as done with many seeds while developing).
SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    derandomize=os.environ.get("GPULOSS_HYPOTHESIS_RANDOM") != "1",
                    suppress_health_check=[HealthCheck.too_slow])


def _distribution(raw, axis):
    """Rows of raw scaled to sum to 1; uniform where raw is all (nearly) zero, so that every
    target is a distribution (KL >= 0 holds only then)."""
    total = raw.sum(axis=axis, keepdims=True)
    uniform = np.full_like(raw, 1 / max(raw.shape[axis], 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 1e-6, raw / total, uniform)


@st.composite
def problems(draw, loss):
    """A valid (pred, target, options) for `loss`, with every option drawn at random."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6))
    opts = {}
    if loss == "mse":
        el = st.floats(-1e3, 1e3)
        pred = draw(hnp.arrays(dtype, shape, elements=el))
        target = draw(hnp.arrays(np.float64, shape, elements=el))
    elif loss in ("mae", "huber", "smooth_l1", "log_cosh", "pinball"):
        el = st.floats(-1e3, 1e3)
        pred = draw(hnp.arrays(dtype, shape, elements=el))
        target = draw(hnp.arrays(np.float64, shape, elements=el))
        option = {"huber": ("delta", st.floats(0.01, 10)), "smooth_l1": ("beta", st.floats(0, 10)),
                  "pinball": ("quantile", st.floats(0.01, 0.99))}.get(loss)
        if option and draw(st.booleans()):
            opts[option[0]] = draw(option[1])
    elif loss == "poisson_nll":
        opts["log_input"] = draw(st.booleans())
        rates = st.floats(-20, 20) if opts["log_input"] else st.floats(0, 100)
        pred = draw(hnp.arrays(dtype, shape, elements=rates))
        target = draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 50)))
        opts["full"] = draw(st.booleans())
        if draw(st.booleans()):
            opts["eps"] = draw(st.floats(0, 1e-3))
    elif loss in ("hinge", "squared_hinge"):
        pred = draw(hnp.arrays(dtype, shape, elements=st.floats(-100, 100)))
        target = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([-1.0, 1.0])))
    elif loss == "bce":
        pred = draw(hnp.arrays(dtype, shape, elements=st.floats(0.001, 0.999)))
        target = draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1)))
    elif loss == "bce_with_logits":
        pred = draw(hnp.arrays(dtype, shape, elements=st.floats(-50, 50)))
        target = draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1)))
        if draw(st.booleans()):
            opts["pos_weight"] = draw(hnp.arrays(np.float64, shape[-1:],
                                                 elements=st.floats(0, 4)))
        if draw(st.booleans()):
            opts["label_smoothing"] = draw(st.floats(0, 1))
        if draw(st.booleans()):
            opts["focal_gamma"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
        if draw(st.booleans()):
            opts["focal_alpha"] = draw(st.floats(0, 1))
    else:
        axis = draw(st.integers(-len(shape), len(shape) - 1))
        K = shape[axis]
        sample_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
        opts["axis"] = axis
        if loss == "cce":
            raw = draw(hnp.arrays(np.float64, shape, elements=st.floats(0.01, 1)))
            pred = (raw / raw.sum(axis=axis, keepdims=True)).astype(dtype)
        elif loss in ("nll", "kl_div"):  # log-probabilities: a log-softmax
            z = draw(hnp.arrays(np.float64, shape, elements=st.floats(-30, 30)))
            m = z.max(axis=axis, keepdims=True)
            pred = (z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))).astype(dtype)
        else:
            pred = draw(hnp.arrays(dtype, shape, elements=st.floats(-30, 30)))
        if loss == "kl_div":
            raw = draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1)))
            target = _distribution(raw, axis)
            if draw(st.booleans()):
                opts["log_target"] = True
                with np.errstate(divide="ignore"):
                    target = np.log(target)
        elif loss == "kl_div_with_logits":
            if draw(st.booleans()):
                opts["target_logits"] = True
                target = draw(hnp.arrays(np.float64, shape, elements=st.floats(-30, 30)))
            else:
                raw = draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1)))
                target = _distribution(raw, axis)
            if draw(st.booleans()):
                opts["temperature"] = draw(st.floats(0.1, 10))
        elif loss == "multiclass_hinge" or draw(st.booleans()):
            target = draw(hnp.arrays(np.int64, sample_shape, elements=st.integers(0, K - 1)))
            if draw(st.booleans()):
                opts["ignore_index"] = draw(st.integers(0, K - 1))
        else:
            raw = draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1)))
            target = _distribution(raw, axis)
        if "class_weight" in gl.LOSSES[loss].options and draw(st.booleans()):
            opts["class_weight"] = draw(hnp.arrays(np.float64, (K,),
                                                   elements=st.floats(0.1, 3)))
        if loss == "cce_with_logits":
            if draw(st.booleans()):
                opts["label_smoothing"] = draw(st.floats(0, 1))
            if draw(st.booleans()):
                opts["focal_gamma"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
            if draw(st.booleans()):
                opts["z_loss"] = draw(st.floats(0, 0.1))
        if loss == "multiclass_hinge" and draw(st.booleans()):
            opts["margin"] = draw(st.floats(0, 5))
        shape = sample_shape
    if target.dtype.kind == "f":
        target = target.astype(dtype)  # targets in pred's dtype: the reference sees what we see
    if draw(st.booleans()):
        wshape = draw(st.sampled_from([shape, shape[-1:] if shape else (), ()]))
        opts["sample_weight"] = draw(hnp.arrays(np.float64, wshape, elements=st.floats(0, 3)))
    return pred, target, opts


def _rtol(pred):
    return 1e-10 if pred.dtype == np.float64 else 2e-5


@pytest.mark.parametrize("loss", ALL)
def test_matches_reference(loss):
    @SETTINGS
    @given(problems(loss), st.sampled_from(["mean", "sum", "none"]))
    def check(problem, reduction):
        pred, target, opts = problem
        got = gl.LOSSES[loss](pred, target, reduction=reduction, **opts)
        want = reference(loss, pred, target, reduction=reduction, **opts)
        finite = np.abs(np.asarray(want)[np.isfinite(want)])
        scale = float(finite.max()) if finite.size else 0.0
        if loss in ("kl_div", "kl_div_with_logits"):
            # KL = cross-entropy - entropy: near 0 it is a difference of terms of order 1-10,
            # whose rounding (and the float32 target's, which sums to 1 +- an ulp) is absolute
            scale = max(scale, 10.0)
        # NaN where the reference is NaN (a mean over zero weight), close elsewhere
        np.testing.assert_allclose(got, want, rtol=_rtol(pred), atol=_rtol(pred) * scale + 1e-12)

    check()


@pytest.mark.parametrize("loss", ALL)
def test_reductions_and_entry_points_are_consistent(loss):
    @SETTINGS
    @given(problems(loss))
    def check(problem):
        pred, target, opts = problem
        fn = gl.LOSSES[loss]
        per = fn(pred, target, reduction="none", **opts)
        total = fn(pred, target, reduction="sum", **opts)
        np.testing.assert_allclose(np.sum(per, dtype=np.float64), total, rtol=1e-5, atol=1e-6)
        if loss != "poisson_nll":  # without log(y!) it is negative where y > e
            assert np.all(per >= -1e-6), "every other loss is non-negative"
        for reduction in ("mean", "sum", "none"):
            v, g = fn.value_and_grad(pred, target, reduction=reduction, **opts)
            assert np.array_equal(v, fn(pred, target, reduction=reduction, **opts), equal_nan=True)
            assert np.array_equal(g, fn.grad(pred, target, reduction=reduction, **opts),
                                  equal_nan=True)
            assert g.shape == pred.shape and g.dtype == pred.dtype
        # the mean's gradient is the sum's gradient over the same denominator
        mean = float(fn(pred, target, **opts))
        if np.isfinite(mean) and mean != 0:
            denom = float(total) / mean
            np.testing.assert_allclose(
                fn.grad(pred, target, **opts) * denom,
                fn.grad(pred, target, reduction="sum", **opts),
                rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(fn.grad(pred, target,
                                                   reduction="sum", **opts)).max())),
            )

    check()


@pytest.mark.parametrize("loss", CATEGORICAL + ("bce_with_logits",))
def test_generic_backend_agrees_with_numpy(loss):
    xp = pytest.importorskip("array_api_strict")

    @SETTINGS
    @given(problems(loss))
    def check(problem):
        pred, target, opts = problem
        fn = gl.LOSSES[loss]
        xopts = {k: (xp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in opts.items()}
        want_v = fn(pred, target, **opts)
        v = fn(xp.asarray(pred), xp.asarray(target), **xopts)
        np.testing.assert_allclose(np.from_dlpack(v), want_v, rtol=_rtol(pred), atol=1e-7)
        # gradients in float64: in float32 a component p (sum c - c_k) - c_k (1 - p) that is a
        # small difference of O(1) terms differs between any two implementations by ~1e-8
        p64 = pred.astype(np.float64)
        want_g = fn.grad(p64, target, **opts)
        g = fn.grad(xp.asarray(p64), xp.asarray(target), **xopts)
        scale = float(np.abs(want_g).max()) if want_g.size else 0.0
        np.testing.assert_allclose(np.from_dlpack(g), want_g, rtol=1e-10, atol=1e-12 + 1e-10 * scale)

    check()
