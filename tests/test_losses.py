"""Every loss, option and reduction against the float64 reference, on every namespace here;
gradients against central finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_inputs, to_numpy, to_xp
from reference import (
    ALL,
    CATEGORICAL,
    ELEMENTWISE,
    LABELED,
    numeric_grad,
    reference,
    target_kinds,
)

import gpuloss as gl

REDUCTIONS = ("mean", "sum", "none")
RTOL = {np.float16: 2e-3, np.float32: 2e-5, np.float64: 1e-11}


_CATALOGUE_OPTIONS = {
    "huber": [{"delta": 0.5}, {"delta": 2.5, "sample_weight": 0.5}],
    "smooth_l1": [{"beta": 0.5}, {"beta": 0.0}, {"beta": 2.0}],
    "poisson_nll": [{"log_input": False}, {"full": True},
                    {"log_input": False, "full": True, "eps": 1e-3}],
    "pinball": [{"quantile": 0.1}, {"quantile": 0.9}],
}


def _options(loss, rng, shape, labels=True, axis=-1):
    """A few option sets that exercise every option the loss accepts."""
    sets = [{}]
    if loss in ELEMENTWISE:
        sets.append({"sample_weight": rng.uniform(0, 2, shape)})
        sets.append({"sample_weight": rng.uniform(0, 2, shape[-1:])})  # broadcast
    if loss == "bce_with_logits":
        sets.append({"pos_weight": rng.uniform(0.5, 3, shape[-1:])})
        sets.append({"label_smoothing": 0.1, "pos_weight": 2.0, "sample_weight": 0.5})
        sets.append({"focal_gamma": 2.0})
        sets.append({"focal_gamma": 0.5, "focal_alpha": 0.25, "pos_weight": 2.0})
        sets.append({"focal_alpha": 0.75, "label_smoothing": 0.1,
                     "sample_weight": rng.uniform(0, 2, shape)})
    if loss in ("bce", "cce"):
        sets.append({"eps": 1e-3})
    sets += _CATALOGUE_OPTIONS.get(loss, [])
    if loss in CATEGORICAL:
        K = shape[axis]
        sample_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
        sets.append({"class_weight": rng.uniform(0.2, 2, K)})
        sets.append({"sample_weight": rng.uniform(0, 2, sample_shape)})
        if labels:
            sets.append({"ignore_index": 1, "class_weight": rng.uniform(0.2, 2, K)})
    if loss == "cce_with_logits":
        sets.append({"label_smoothing": 0.2})
        sets.append({"label_smoothing": 0.1, "class_weight": rng.uniform(0.2, 2, shape[axis])})
    sample_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    if loss == "cce_with_logits":
        sets.append({"focal_gamma": 2.0})
        sets.append({"focal_gamma": 0.5, "label_smoothing": 0.1,
                     "class_weight": rng.uniform(0.2, 2, shape[axis])})
        sets.append({"z_loss": 1e-2, "class_weight": rng.uniform(0.2, 2, shape[axis])})
        sets.append({"z_loss": 0.1, "focal_gamma": 1.0,
                     "sample_weight": rng.uniform(0, 2, sample_shape),
                     **({"ignore_index": 0} if labels else {})})
    if loss == "kl_div":
        sets.append({"log_target": True, "sample_weight": rng.uniform(0, 2, sample_shape)})
    if loss == "kl_div_with_logits":
        sets.append({"temperature": 2.5})
        sets.append({"temperature": 0.5, "target_logits": True,
                     "sample_weight": rng.uniform(0, 2, sample_shape)})
    if loss == "multiclass_hinge":
        sets.append({"margin": 0.0})
        sets.append({"margin": 2.5, "ignore_index": 2})
    # only the options the loss takes (kl_div has no class weights)
    return [o for o in sets if set(o) <= set(gl.LOSSES[loss].options)]


def _cases():
    for loss in ALL:
        if loss in ELEMENTWISE:
            yield loss, (7, 5), True
        else:
            for labels in target_kinds(loss):
                yield loss, (9, 4), labels


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("loss", "shape", "labels"), list(_cases()))
def test_matches_reference_every_option(loss, shape, labels, reduction):
    rng = np.random.default_rng(0)
    pred, target = make_inputs(loss, rng, shape, labels=labels)
    fn = gl.LOSSES[loss]
    for opts in _options(loss, rng, shape, labels):
        got = fn(pred, target, reduction=reduction, **opts)
        want = reference(loss, pred, target, reduction=reduction, **opts)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=str(opts))
        assert got.dtype == pred.dtype


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("loss", "shape", "labels"), list(_cases()))
def test_gradient_matches_finite_differences(loss, shape, labels, reduction):
    rng = np.random.default_rng(1)
    pred, target = make_inputs(loss, rng, shape, labels=labels)
    fn = gl.LOSSES[loss]
    for opts in _options(loss, rng, shape, labels):
        if loss == "bce" and "eps" in opts:
            continue  # clipping at 1e-3 is a kink; FD across it is meaningless
        grad = fn.grad(pred, target, reduction=reduction, **opts)
        numeric = numeric_grad(lambda p: fn(p, target, reduction=reduction, **opts), pred)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8, err_msg=str(opts))


@pytest.mark.parametrize("loss", ALL)
def test_entry_points_agree_bit_for_bit(loss):
    rng = np.random.default_rng(2)
    pred, target = make_inputs(loss, rng, (300, 7))
    fn = gl.LOSSES[loss]
    value, grad = fn.value_and_grad(pred, target)
    assert np.array_equal(value, fn(pred, target))
    assert np.array_equal(grad, fn.grad(pred, target))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("loss", ALL)
def test_dtypes_value_and_grad(loss, dtype):
    """float16/32/64 agree with the float64 computation on the same (rounded) inputs, and
    come back in the prediction's dtype."""
    rng = np.random.default_rng(3)
    pred, target = make_inputs(loss, rng, (50, 6), dtype=dtype)
    fn = gl.LOSSES[loss]
    value, grad = fn.value_and_grad(pred, target)
    value64, grad64 = fn.value_and_grad(pred.astype(np.float64), target)
    assert value.dtype == dtype and grad.dtype == dtype and grad.shape == pred.shape
    np.testing.assert_allclose(value, value64, rtol=RTOL[dtype])
    scale = np.abs(grad64).max()
    np.testing.assert_allclose(grad, grad64, rtol=RTOL[dtype], atol=RTOL[dtype] * scale)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", ALL)
def test_many_blocks_and_threads(loss, reduction, monkeypatch):
    """Inputs spanning many blocks (and threads) give the single-block result."""
    from gpuloss.backends import numpy as _numpy_backend

    rng = np.random.default_rng(4)
    shape = (3000, 37)
    pred, target = make_inputs(loss, rng, shape)
    opts = {"sample_weight": rng.uniform(0, 1, shape[0] if loss in CATEGORICAL else shape[-1])}
    if loss in CATEGORICAL:
        opts = {"sample_weight": rng.uniform(0, 1, shape[0])}
    fn = gl.LOSSES[loss]
    whole = fn.value_and_grad(pred, target, reduction=reduction, **opts)
    monkeypatch.setattr(_numpy_backend, "BLOCK", 1000)
    monkeypatch.setattr(_numpy_backend, "ROW_BLOCK", 1000)
    monkeypatch.setenv("GPULOSS_NUM_THREADS", "3")
    blocked = fn.value_and_grad(pred, target, reduction=reduction, **opts)
    np.testing.assert_allclose(blocked[0], whole[0], rtol=1e-12)
    np.testing.assert_allclose(blocked[1], whole[1], rtol=1e-12, atol=1e-300)
    want = reference(loss, pred, target, reduction=reduction, **opts)
    np.testing.assert_allclose(blocked[0], want, rtol=1e-11)


@pytest.mark.parametrize(("loss", "labels"), [(loss, labels) for loss in CATEGORICAL
                                               for labels in target_kinds(loss)])
def test_class_axis_1_on_3d_input(loss, labels):
    rng = np.random.default_rng(5)
    pred, target = make_inputs(loss, rng, (6, 5, 4), labels=labels, axis=1)
    fn = gl.LOSSES[loss]
    for reduction in REDUCTIONS:
        value, grad = fn.value_and_grad(pred, target, axis=1, reduction=reduction)
        np.testing.assert_allclose(
            value, reference(loss, pred, target, axis=1, reduction=reduction), rtol=1e-12
        )
        numeric = numeric_grad(lambda p: fn(p, target, axis=1, reduction=reduction), pred)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    # the same numbers as with the class axis moved last
    moved = np.moveaxis(pred, 1, -1)
    t2 = target if labels else np.moveaxis(target, 1, -1)
    v2, g2 = fn.value_and_grad(moved, t2)
    np.testing.assert_allclose(fn(pred, target, axis=1), v2, rtol=1e-13)
    np.testing.assert_allclose(np.moveaxis(fn.grad(pred, target, axis=1), 1, -1), g2, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# other array-API namespaces (array-api-strict, PyTorch CPU) through the generic backend


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("loss", "shape", "labels"), list(_cases()))
def test_every_namespace_matches_numpy(xp, loss, shape, labels, reduction):
    rng = np.random.default_rng(6)
    for dtype in (np.float32, np.float64):
        pred, target = make_inputs(loss, rng, shape, dtype=dtype, labels=labels)
        fn = gl.LOSSES[loss]
        for opts in _options(loss, rng, shape, labels):
            want_v, want_g = fn.value_and_grad(pred, target, reduction=reduction, **opts)
            xopts = {
                k: (to_xp(xp, np.asarray(v)) if isinstance(v, np.ndarray) else v)
                for k, v in opts.items()
            }
            v, g = fn.value_and_grad(
                to_xp(xp, pred), to_xp(xp, target), reduction=reduction, **xopts
            )
            assert type(v) is type(to_xp(xp, pred)), "results come back in the caller's library"
            assert type(g) is type(to_xp(xp, pred))
            rtol = 1e-12 if dtype == np.float64 else 2e-5
            np.testing.assert_allclose(to_numpy(v), want_v, rtol=rtol, atol=1e-7, err_msg=str(opts))
            np.testing.assert_allclose(to_numpy(g), want_g, rtol=rtol, atol=1e-7, err_msg=str(opts))
            assert to_numpy(g).dtype == dtype
