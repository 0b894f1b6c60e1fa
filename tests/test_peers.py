"""Agreement with PyTorch's loss functions (values and autograd gradients) and with
scikit-learn's log_loss. In CI these peers are installed and the tests must run."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_inputs, require

import gpuloss as gl

torch = require("torch")
F = torch.nn.functional
REDUCTIONS = ("mean", "sum", "none")


def _torch_value_and_grad(fn, pred, *args, **kwargs):
    x = torch.tensor(pred, dtype=torch.float64, requires_grad=True)
    out = fn(x, *args, **kwargs)
    out.sum().backward()
    return out.detach().numpy(), x.grad.numpy()


def _t(a):
    return None if a is None else torch.as_tensor(np.asarray(a))


def _check(ours, theirs, rtol=1e-10):
    np.testing.assert_allclose(ours[0], theirs[0], rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_matches_torch(reduction):
    pred, target = make_inputs("mse", np.random.default_rng(0), (40, 3))
    ours = gl.mse.value_and_grad(pred, target, reduction=reduction)
    theirs = _torch_value_and_grad(F.mse_loss, pred, _t(target), reduction=reduction)
    _check(ours, theirs)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_matches_torch(reduction, weighted):
    rng = np.random.default_rng(1)
    pred, target = make_inputs("bce", rng, (40, 3))
    w = rng.uniform(0, 2, (3,)) if weighted else None
    if weighted and reduction == "mean":
        reduction = "sum"  # PyTorch's weighted mean divides by n; ours by the weights' sum
    ours = gl.bce.value_and_grad(pred, target, reduction=reduction, sample_weight=w)
    theirs = _torch_value_and_grad(
        F.binary_cross_entropy, pred, _t(target), weight=_t(w), reduction=reduction
    )
    _check(ours, theirs)


@pytest.mark.parametrize("options", [{}, {"pos_weight": True}, {"weight": True}, {"both": True}])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_with_logits_matches_torch(reduction, options):
    rng = np.random.default_rng(2)
    pred, target = make_inputs("bce_with_logits", rng, (40, 5))
    pw = rng.uniform(0.5, 3, (5,)) if {"pos_weight", "both"} & set(options) else None
    w = rng.uniform(0, 2, (40, 1)) if {"weight", "both"} & set(options) else None
    if w is not None and reduction == "mean":
        reduction = "sum"  # PyTorch's weighted mean divides by n
    ours = gl.bce_with_logits.value_and_grad(
        pred, target, reduction=reduction, pos_weight=pw, sample_weight=w
    )
    theirs = _torch_value_and_grad(
        F.binary_cross_entropy_with_logits,
        pred,
        _t(target),
        weight=_t(w),
        pos_weight=_t(pw),
        reduction=reduction,
    )
    _check(ours, theirs)


def test_bce_with_logits_unweighted_mean_divides_by_n_like_torch():
    rng = np.random.default_rng(3)
    pred, target = make_inputs("bce_with_logits", rng, (64,))
    ours = gl.bce_with_logits.value_and_grad(pred, target)
    theirs = _torch_value_and_grad(F.binary_cross_entropy_with_logits, pred, _t(target))
    _check(ours, theirs)


CE_OPTIONS = [
    {},
    {"class_weight": True},
    {"ignore_index": 2},
    {"ignore_index": 2, "class_weight": True},
    {"label_smoothing": 0.15},
    {"label_smoothing": 0.15, "class_weight": True},
    {"label_smoothing": 0.15, "class_weight": True, "ignore_index": 0},
]


@pytest.mark.parametrize("options", CE_OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cce_with_logits_labels_matches_torch_cross_entropy(reduction, options):
    rng = np.random.default_rng(4)
    pred, target = make_inputs("cce_with_logits", rng, (30, 6))
    cw = rng.uniform(0.2, 2, 6) if options.get("class_weight") else None
    ii = options.get("ignore_index")
    ls = options.get("label_smoothing", 0.0)
    ours = gl.cce_with_logits.value_and_grad(
        pred, target, reduction=reduction, class_weight=cw, ignore_index=ii, label_smoothing=ls
    )
    theirs = _torch_value_and_grad(
        F.cross_entropy,
        pred,
        _t(target),
        weight=_t(cw),
        ignore_index=-100 if ii is None else ii,
        label_smoothing=ls,
        reduction=reduction,
    )
    _check(ours, theirs)


@pytest.mark.parametrize("options", [{}, {"class_weight": True}, {"label_smoothing": 0.2}])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cce_with_logits_probability_targets_match_torch(reduction, options):
    rng = np.random.default_rng(5)
    pred, target = make_inputs("cce_with_logits", rng, (30, 6), labels=False)
    cw = rng.uniform(0.2, 2, 6) if options.get("class_weight") else None
    ls = options.get("label_smoothing", 0.0)
    ours = gl.cce_with_logits.value_and_grad(
        pred, target, reduction=reduction, class_weight=cw, label_smoothing=ls
    )
    theirs = _torch_value_and_grad(
        F.cross_entropy, pred, _t(target), weight=_t(cw), label_smoothing=ls, reduction=reduction
    )
    _check(ours, theirs)


@pytest.mark.parametrize("labels", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cce_with_logits_class_axis_1_on_3d_matches_torch(reduction, labels):
    rng = np.random.default_rng(6)
    pred, target = make_inputs("cce_with_logits", rng, (5, 4, 7), labels=labels, axis=1)
    cw = rng.uniform(0.2, 2, 4)
    ours = gl.cce_with_logits.value_and_grad(
        pred, target, axis=1, reduction=reduction, class_weight=cw
    )
    theirs = _torch_value_and_grad(
        F.cross_entropy, pred, _t(target), weight=_t(cw), reduction=reduction
    )
    _check(ours, theirs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cce_on_probabilities_matches_torch_nll_of_log(reduction):
    rng = np.random.default_rng(7)
    pred, target = make_inputs("cce", rng, (30, 6))
    cw = rng.uniform(0.2, 2, 6)
    ours = gl.cce.value_and_grad(pred, target, reduction=reduction, class_weight=cw)
    theirs = _torch_value_and_grad(
        lambda p: F.nll_loss(torch.log(p), _t(target), weight=_t(cw), reduction=reduction), pred
    )
    _check(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_tensors_in_torch_tensors_out(dtype):
    rng = np.random.default_rng(8)
    pred, target = make_inputs("cce_with_logits", rng, (20, 5))
    z = torch.tensor(pred, dtype=dtype)
    t = torch.tensor(target)
    value, grad = gl.cce_with_logits.value_and_grad(z, t)
    assert isinstance(value, torch.Tensor) and value.dtype == dtype and value.ndim == 0
    assert isinstance(grad, torch.Tensor) and grad.dtype == dtype and grad.shape == z.shape
    zz = z.clone().requires_grad_()
    ref = F.cross_entropy(zz, t)
    ref.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert abs(float(value) - ref.item()) <= tol * abs(ref.item())
    torch.testing.assert_close(grad, zz.grad, rtol=tol * 10, atol=tol)


# ---------------------------------------------------------------------------------------------
# scikit-learn


def test_bce_matches_sklearn_log_loss_with_sample_weight():
    metrics = require("sklearn.metrics")
    rng = np.random.default_rng(9)
    p = rng.uniform(0.01, 0.99, 200)
    y = rng.integers(0, 2, 200)
    w = rng.uniform(0, 3, 200)
    assert np.isclose(float(gl.bce(p, y)), metrics.log_loss(y, p), rtol=1e-12)
    assert np.isclose(
        float(gl.bce(p, y, sample_weight=w)), metrics.log_loss(y, p, sample_weight=w), rtol=1e-12
    )


def test_cce_matches_sklearn_log_loss_multiclass_with_sample_weight():
    metrics = require("sklearn.metrics")
    rng = np.random.default_rng(10)
    z = rng.standard_normal((150, 5))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = rng.integers(0, 5, 150)
    w = rng.uniform(0, 3, 150)
    labels = list(range(5))
    assert np.isclose(float(gl.cce(p, y)), metrics.log_loss(y, p, labels=labels), rtol=1e-12)
    assert np.isclose(
        float(gl.cce(p, y, sample_weight=w)),
        metrics.log_loss(y, p, sample_weight=w, labels=labels),
        rtol=1e-12,
    )
    # and the logits form gives the same number from the logits
    assert np.isclose(
        float(gl.cce_with_logits(z, y, sample_weight=w)),
        metrics.log_loss(y, p, sample_weight=w, labels=labels),
        rtol=1e-12,
    )


def test_mse_matches_sklearn_mean_squared_error_with_sample_weight():
    metrics = require("sklearn.metrics")
    rng = np.random.default_rng(11)
    p, y, w = rng.standard_normal(100), rng.standard_normal(100), rng.uniform(0, 2, 100)
    assert np.isclose(
        float(gl.mse(p, y, sample_weight=w)),
        metrics.mean_squared_error(y, p, sample_weight=w),
        rtol=1e-12,
    )
