"""The elementwise catalogue (CATALOGUE.md): each loss against its peer to 1e-12 in float64,
for every option and reduction; the edges of each formula; the hinge losses' labels; the
options' checks. (The float64 reference, finite differences, dtypes, blocks, namespaces, the
fuzz generator and the emulated CUDA kernels cover these losses through reference.CATALOGUE.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_inputs, require, torch_value_and_grad

import gpuloss as gl

REDUCTIONS = ("mean", "sum", "none")
SHAPE = (40, 7)


def _assert_peer(ours, theirs, atol=0.0):
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-12, atol=atol)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-12, atol=1e-300 + atol)


# ---------------------------------------------------------------------------------------------
# PyTorch's own losses


TORCH_CASES = [
    ("mae", {}, lambda F, x, y, r: F.l1_loss(x, y, reduction=r)),
    ("huber", {}, lambda F, x, y, r: F.huber_loss(x, y, reduction=r)),
    ("huber", {"delta": 0.3}, lambda F, x, y, r: F.huber_loss(x, y, reduction=r, delta=0.3)),
    ("huber", {"delta": 4.0}, lambda F, x, y, r: F.huber_loss(x, y, reduction=r, delta=4.0)),
    ("smooth_l1", {}, lambda F, x, y, r: F.smooth_l1_loss(x, y, reduction=r)),
    ("smooth_l1", {"beta": 0.3},
     lambda F, x, y, r: F.smooth_l1_loss(x, y, reduction=r, beta=0.3)),
    ("smooth_l1", {"beta": 0.0},
     lambda F, x, y, r: F.smooth_l1_loss(x, y, reduction=r, beta=0.0)),
    ("poisson_nll", {}, lambda F, x, y, r: F.poisson_nll_loss(x, y, reduction=r)),
    ("poisson_nll", {"full": True},
     lambda F, x, y, r: F.poisson_nll_loss(x, y, full=True, reduction=r)),
    ("poisson_nll", {"log_input": False},
     lambda F, x, y, r: F.poisson_nll_loss(x, y, log_input=False, reduction=r)),
    ("poisson_nll", {"log_input": False, "full": True, "eps": 1e-3},
     lambda F, x, y, r: F.poisson_nll_loss(x, y, log_input=False, full=True, eps=1e-3,
                                           reduction=r)),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("loss", "opts", "peer"), TORCH_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in TORCH_CASES])
def test_matches_pytorch(loss, opts, peer, reduction):
    torch = require("torch")
    rng = np.random.default_rng(10)
    pred, target = make_inputs(loss, rng, SHAPE)
    ours = gl.LOSSES[loss].value_and_grad(pred, target, reduction=reduction, **opts)
    theirs = torch_value_and_grad(
        torch, lambda x, y: peer(torch.nn.functional, x, y, reduction), pred, target)
    _assert_peer(ours, theirs)


# ---------------------------------------------------------------------------------------------
# scikit-learn (with sample weights), and the optax / Keras formulas


@pytest.mark.parametrize("weighted", [False, True])
def test_mae_and_pinball_match_scikit_learn(weighted):
    metrics = require("sklearn.metrics")
    rng = np.random.default_rng(11)
    y, p = rng.standard_normal(500), rng.standard_normal(500)
    w = rng.uniform(0, 2, 500) if weighted else None
    np.testing.assert_allclose(gl.mae(p, y, sample_weight=w),
                               metrics.mean_absolute_error(y, p, sample_weight=w), rtol=1e-12)
    for q in (0.1, 0.5, 0.93):
        np.testing.assert_allclose(
            gl.pinball(p, y, quantile=q, sample_weight=w),
            metrics.mean_pinball_loss(y, p, alpha=q, sample_weight=w), rtol=1e-12)


FORMULA_CASES = [
    # optax.log_cosh: logaddexp(d, -d) - log 2 (it cancels near d = 0: compared with atol)
    ("log_cosh", {}, lambda t, x, y: torch_logaddexp(t, x - y) - math.log(2.0)),
    # optax.hinge_loss(scores, targets) = max(0, 1 - scores * targets)
    ("hinge", {}, lambda t, x, y: t.clamp(1 - x * y, min=0)),
    # keras SquaredHinge: square(maximum(1 - y_true * y_pred, 0))
    ("squared_hinge", {}, lambda t, x, y: t.clamp(1 - y * x, min=0) ** 2),
    # sklearn's pinball, written as keras/optax users write it: max(q r, (q - 1) r)
    ("pinball", {"quantile": 0.2},
     lambda t, x, y: t.maximum(0.2 * (y - x), (0.2 - 1) * (y - x))),
]


def torch_logaddexp(t, d):
    return t.logaddexp(d, -d)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("loss", "opts", "formula"), FORMULA_CASES,
                         ids=[c[0] for c in FORMULA_CASES])
def test_matches_the_peers_formula(loss, opts, formula, reduction):
    torch = require("torch")
    rng = np.random.default_rng(12)
    pred, target = make_inputs(loss, rng, SHAPE)
    w = rng.uniform(0.1, 2, SHAPE)

    def peer(x, y):
        per = formula(torch, x, y) * torch.tensor(w)
        return {"mean": per.sum() / w.sum(), "sum": per.sum(), "none": per}[reduction]

    ours = gl.LOSSES[loss].value_and_grad(pred, target, reduction=reduction, sample_weight=w,
                                          **opts)
    theirs = torch_value_and_grad(torch, peer, pred, target)
    # optax's log-cosh form has an absolute error of ~1e-16 near d = 0 (ours does not)
    _assert_peer(ours, theirs, atol=1e-15 if loss == "log_cosh" else 0.0)


# ---------------------------------------------------------------------------------------------
# the edges of each formula


def test_boundaries_take_the_documented_side():
    one = np.array([1.0])
    # huber at |d| = delta: both pieces give delta^2/2; the gradient is delta
    v, g = gl.huber.value_and_grad(np.array([2.0, -2.0]), np.zeros(2), delta=2.0,
                                   reduction="none")
    assert v.tolist() == [2.0, 2.0] and g.tolist() == [2.0, -2.0]
    # smooth_l1 at |d| = beta: the linear piece, gradient sign(d)
    v, g = gl.smooth_l1.value_and_grad(np.array([0.5, -0.5]), np.zeros(2), beta=0.5,
                                       reduction="none")
    assert v.tolist() == [0.25, 0.25] and g.tolist() == [1.0, -1.0]
    # exact predictions: no pull
    for loss in ("mae", "huber", "smooth_l1", "log_cosh", "pinball"):
        v, g = gl.LOSSES[loss].value_and_grad(one, one, reduction="none")
        assert v.tolist() == [0.0] and g.tolist() == [0.0], loss
    assert gl.smooth_l1.grad(one, one, beta=0.0).tolist() == [0.0]
    # hinge at the margin (y p = 1): nothing to pay, nothing to pull
    for loss in ("hinge", "squared_hinge"):
        v, g = gl.LOSSES[loss].value_and_grad(np.array([1.0, -1.0]), np.array([1.0, -1.0]),
                                              reduction="none")
        assert v.tolist() == [0.0, 0.0] and g.tolist() == [0.0, 0.0], loss
    # pinball: under-prediction costs q, over-prediction 1 - q
    v, g = gl.pinball.value_and_grad(np.array([0.0, 2.0]), np.ones(2), quantile=0.9,
                                     reduction="none")
    np.testing.assert_allclose(v, [0.9, 0.1], rtol=1e-15)
    np.testing.assert_allclose(g, [-0.9, 0.1], rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_cosh_is_accurate_from_tiny_to_huge(dtype):
    d = np.array([1e-30, 1e-8, 1e-3, 0.5, 1.0, 1.0001, 3.0, 40.0, 1e4, 3e38], dtype)
    v, g = gl.log_cosh.value_and_grad(d, np.zeros_like(d), reduction="none")
    x = d.astype(np.float64)
    s = np.minimum(x, 1) ** 2  # the Taylor series of log cosh, exact to float64 for |d| < 0.1
    series = s * (1 / 2 - s * (1 / 12 - s * (1 / 45 - s * (17 / 2520 - s * 31 / 14175))))
    want = np.where(x < 0.1, series, np.log(np.cosh(np.minimum(x, 700))))
    want = np.where(x > 700, x - np.log(2.0), want)
    want = want.astype(dtype)  # what the dtype can hold (5e-61 is 0 in float32)
    tol = 8 * np.finfo(dtype).eps
    np.testing.assert_allclose(v, want, rtol=tol, atol=0)  # relative, even for 1e-30
    np.testing.assert_allclose(g, np.tanh(x), rtol=tol, atol=0)
    assert np.all(np.isfinite(v))


@pytest.mark.parametrize("loss", ["mae", "huber", "smooth_l1", "log_cosh", "poisson_nll",
                                  "hinge", "squared_hinge", "pinball"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_propagates_to_loss_and_gradient(loss, dtype):
    pred = np.array([np.nan, 0.5], dtype)
    target = np.array([1.0, 1.0])
    v, g = gl.LOSSES[loss].value_and_grad(pred, target, reduction="none")
    assert np.isnan(v[0]) and np.isnan(g[0]) and np.isfinite(v[1]) and np.isfinite(g[1])
    assert np.isnan(gl.LOSSES[loss](pred, target))


def test_poisson_saturates_like_pytorch():
    torch = require("torch")
    z = np.array([-800.0, -30.0, 0.0, 30.0, 700.0])
    y = np.array([0.0, 3.0, 1.0, 0.0, 2.0])
    ours = gl.poisson_nll.value_and_grad(z, y, reduction="none")
    theirs = torch_value_and_grad(
        torch, lambda x, t: torch.nn.functional.poisson_nll_loss(x, t, reduction="none"), z, y)
    _assert_peer(ours, theirs)


# ---------------------------------------------------------------------------------------------
# the hinge losses' labels


@pytest.mark.parametrize("loss", ["hinge", "squared_hinge"])
def test_hinge_labels_booleans_and_refusals(loss):
    fn = gl.LOSSES[loss]
    s = np.array([2.0, 0.3, -0.4, -3.0])
    signs = np.array([1.0, -1.0, 1.0, -1.0])
    want = fn.value_and_grad(s, signs)
    for target in (signs > 0, signs.astype(np.int8), signs.astype(np.float32)):
        got = fn.value_and_grad(s, target)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    with pytest.raises(ValueError, match=r"labels in \{-1, \+1\}.*found 0.*2 \* y - 1"):
        fn(s, (signs > 0).astype(np.float64))  # 0/1 labels
    with pytest.raises(ValueError, match="found 0.5"):
        fn(s, np.array([1.0, 0.5, -1.0, 1.0]))
    # NaN labels propagate, they are not refused
    assert np.isnan(fn(s, np.array([1.0, np.nan, -1.0, 1.0])))
    # validate=False computes the formula on whatever it gets
    v = fn(s, np.zeros(4), validate=False, reduction="none")
    assert np.all(v == 1.0)


def test_hinge_refusals_on_every_namespace(xp):
    s = xp.asarray(np.array([2.0, 0.3]))
    with pytest.raises(ValueError, match=r"labels in \{-1, \+1\}"):
        gl.hinge(s, xp.asarray(np.array([1.0, 0.0])))
    got = gl.hinge(s, xp.asarray(np.array([True, False])))
    assert float(got) == pytest.approx(float(gl.hinge(np.array([2.0, 0.3]),
                                                      np.array([1.0, -1.0]))), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# options and domains


@pytest.mark.parametrize(("loss", "name", "bad", "error"), [
    ("huber", "delta", 0.0, ValueError), ("huber", "delta", -1.0, ValueError),
    ("huber", "delta", math.nan, ValueError), ("huber", "delta", "1", TypeError),
    ("smooth_l1", "beta", -0.1, ValueError), ("smooth_l1", "beta", math.nan, ValueError),
    ("pinball", "quantile", 0.0, ValueError), ("pinball", "quantile", 1.0, ValueError),
    ("poisson_nll", "log_input", 1, TypeError), ("poisson_nll", "full", "yes", TypeError),
    ("poisson_nll", "eps", -1e-3, ValueError),
])
def test_bad_options_name_themselves(loss, name, bad, error):
    with pytest.raises(error, match=name):
        gl.LOSSES[loss](np.ones(3), np.ones(3), **{name: bad})


def test_poisson_domains():
    with pytest.raises(ValueError, match="poisson_nll needs target >= 0"):
        gl.poisson_nll(np.zeros(2), np.array([1.0, -1.0]))
    gl.poisson_nll(np.array([-1.0, 2.0]), np.ones(2))  # log-rates may be negative
    with pytest.raises(ValueError, match="poisson_nll needs pred >= 0"):
        gl.poisson_nll(np.array([-1.0, 2.0]), np.ones(2), log_input=False)
    # the checks read the values as stored: a negative subnormal is negative
    with pytest.raises(ValueError, match="target >= 0"):
        gl.poisson_nll(np.zeros(1, np.float32), np.array([-1e-45], np.float32))


def test_options_reach_streaming_dask_and_the_cli(tmp_path):
    rng = np.random.default_rng(13)
    pred, target = make_inputs("poisson_nll", rng, (300,))
    opts = {"log_input": False, "full": True, "eps": 1e-4}
    want = gl.poisson_nll(pred, target, **opts)
    stream = gl.StreamingLoss("poisson_nll", **opts)
    for i in range(0, 300, 70):
        stream.update(pred[i:i + 70], target[i:i + 70])
    np.testing.assert_allclose(stream.compute(), want, rtol=1e-12)
    da = require("dask.array")
    got = gl.poisson_nll(da.from_array(pred, chunks=70), da.from_array(target, chunks=70),
                         **opts)
    np.testing.assert_allclose(got.compute(), want, rtol=1e-12)
    from gpuloss import _cli

    np.save(tmp_path / "p.npy", pred)
    np.save(tmp_path / "y.npy", target)
    import contextlib
    import io
    import json

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = _cli.main(["score", "poisson_nll", str(tmp_path / "p.npy"),
                          str(tmp_path / "y.npy"), "--no-log-input", "--full", "--eps", "1e-4",
                          "--json", "--device", "cpu"])
    assert code == 0
    np.testing.assert_allclose(json.loads(out.getvalue())["loss"], want, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# what the demo and the benchmarks run, from each declaration


@pytest.mark.parametrize("name", list(gl.LOSSES))
def test_benchmark_inputs_and_naive_baselines_fit_each_declaration(name):
    """The inputs both benchmarks make (the GPU one's with NumPy standing in for CuPy) lie in
    the loss's domain, and its naive baseline computes the same loss and gradient."""
    from gpuloss import _bench_gpu
    from gpuloss._examples import example_inputs

    fn = gl.LOSSES[name]
    shape = (64, 10) if fn.family == "categorical" else (640,)
    (p, y), = _bench_gpu.make_inputs(np, fn, shape, np.float64, 1)
    assert _bench_gpu.floor_bytes(fn, shape, np.float32) > 0
    value, grad = fn.value_and_grad(p, y)  # validates the domain
    naive_value, naive_grad = fn.naive(np, p, y)
    np.testing.assert_allclose(naive_value, value, rtol=1e-12)
    np.testing.assert_allclose(naive_grad, grad, rtol=1e-10, atol=1e-15)
    p32, y32 = example_inputs(fn, np.random.default_rng(0), n=500, rows=50, classes=8)
    assert p32.dtype == np.float32
    fn.value_and_grad(p32, y32)


# ---------------------------------------------------------------------------------------------
# bce_with_logits' focal options (the sigmoid focal loss)


def _torchvision_focal(torch, x, y, gamma, alpha, pos_weight=None):
    """torchvision.ops.sigmoid_focal_loss as written there (optax's and Keras'
    BinaryFocalCrossentropy(from_logits=True) are the same formula), with the cross-entropy
    written with softplus (and our pos_weight): torch's own binary_cross_entropy_with_logits
    takes log(1 + e^-|z|) without log1p, 1e-12 off at small losses."""
    F = torch.nn.functional
    p = torch.sigmoid(x)
    c = 1.0 if pos_weight is None else pos_weight
    ce = (1 - y) * F.softplus(x) + c * y * F.softplus(-x)
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("pos_weight", [False, True])
def test_focal_bce_matches_torchvision(reduction, gamma, alpha, pos_weight):
    torch = require("torch")
    rng = np.random.default_rng(13)
    pred, target = make_inputs("bce_with_logits", rng, SHAPE)
    target[:20] = np.round(target[:20])  # hard and soft targets
    w = rng.uniform(0.1, 2, SHAPE)
    pw = rng.uniform(0.5, 2, SHAPE[-1]) if pos_weight else None

    def peer(x, y):
        per = _torchvision_focal(torch, x, y, gamma, alpha,
                                 None if pw is None else torch.tensor(pw)) * torch.tensor(w)
        return {"mean": per.sum() / w.sum(), "sum": per.sum(), "none": per}[reduction]

    ours = gl.bce_with_logits.value_and_grad(pred, target, reduction=reduction, sample_weight=w,
                                             pos_weight=pw, focal_gamma=gamma, focal_alpha=alpha)
    _assert_peer(ours, torch_value_and_grad(torch, peer, pred, target))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_bce_is_finite_at_saturation_where_autograd_is_not(dtype, gamma):
    """Loss and gradient finite for every finite logit (torch's autograd of the formula
    gives NaN gradients there for gamma < 1), and equal to the float64 limit."""
    z = np.array([-3e38, -1e4, -800, -90, -40, -17, 17, 40, 90, 800, 1e4, 3e38], dtype)
    for y in (0.0, 1.0, 0.3):
        t = np.full(z.shape, y, dtype)
        v, g = gl.bce_with_logits.value_and_grad(z, t, focal_gamma=gamma, focal_alpha=0.25,
                                                 reduction="none")
        assert np.isfinite(v).all() and np.isfinite(g).all(), (y, v, g)
        # far from the target side, the loss is alpha_t |z| (1 - p_t = 1): at y = 0, z > 0
        if y == 0.0:
            big = z > 40
            np.testing.assert_allclose(v[big], 0.75 * z[big].astype(np.float64), rtol=1e-6)
            np.testing.assert_allclose(g[big], 0.75, rtol=1e-6)
        # on the target side, the loss and gradient vanish (for gamma > 0 faster than CE)
        if y == 1.0:
            assert (v[z > 40] >= 0).all() and (np.abs(g[z > 40]) <= 1e-17).all()


def test_focal_defaults_give_the_cross_entropy_bit_for_bit():
    rng = np.random.default_rng(14)
    z, y = make_inputs("bce_with_logits", rng, (300,))
    plain = gl.bce_with_logits.value_and_grad(z, y, reduction="none")
    for opts in ({"focal_gamma": 0.0}, {"focal_alpha": None},
                 {"focal_gamma": 0, "focal_alpha": None}):
        got = gl.bce_with_logits.value_and_grad(z, y, reduction="none", **opts)
        assert got[0].tobytes() == plain[0].tobytes() and got[1].tobytes() == plain[1].tobytes()
    # alpha = 0.5 halves the loss, gamma alone changes it
    half = gl.bce_with_logits(z, y, focal_alpha=0.5, reduction="none")
    np.testing.assert_allclose(half, plain[0] / 2, rtol=1e-15)
    assert not np.allclose(gl.bce_with_logits(z, y, focal_gamma=2.0, reduction="none"), plain[0])


@pytest.mark.parametrize(("name", "value", "error"), [
    ("focal_gamma", -0.5, ValueError), ("focal_gamma", float("nan"), ValueError),
    ("focal_gamma", "2", TypeError), ("focal_alpha", 1.5, ValueError),
    ("focal_alpha", -0.1, ValueError), ("focal_alpha", True, TypeError)])
def test_focal_options_are_checked(name, value, error):
    with pytest.raises(error, match=name):
        gl.bce_with_logits(np.zeros(3), np.ones(3), **{name: value})


@pytest.mark.parametrize("beta", [6.3e-45, 1e-40, 1e-300])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_smooth_l1_with_a_tiny_beta_is_l1_minus_half_beta(beta, dtype):
    """Outside beta the loss is |d| - beta/2 and the gradient sign(d), however small beta
    is: a subnormal beta multiplied in and divided back out lost the loss's digits (1.6 for
    1.5 at beta = 6.3e-45 in float32, found by a random property run)."""
    d = np.array([1.5, -0.75, 3.0], dtype)
    want = np.abs(d.astype(np.float64)) - np.float64(dtype(beta)) / 2
    for fn in ("numpy", "generic"):
        p = d if fn == "numpy" else require("array_api_strict").asarray(d)
        v, g = gl.smooth_l1.value_and_grad(p, np.zeros_like(d) if fn == "numpy" else
                                           require("array_api_strict").zeros_like(p),
                                           reduction="none", beta=beta)
        np.testing.assert_allclose(np.asarray(v, np.float64), want,
                                   rtol=1e-6 if dtype == np.float32 else 1e-15)
        np.testing.assert_array_equal(np.asarray(g, np.float64), np.sign(d))
