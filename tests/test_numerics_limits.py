"""The numerical limits of the catalogue on both paths: the emulated CUDA path (device mode:
flush-to-zero and FMA, as CuPy compiles) and the NumPy path, against formulas in float64 or
mpmath. One section per defect class of the issue "The CUDA path, second round"; each test
failed before its fix.
"""

from __future__ import annotations

import ml_dtypes
import mpmath
import numpy as np
import pytest
from kernel_host import emulated_compute

import gpuloss as gl

BF16 = np.dtype(ml_dtypes.bfloat16)
FLT_MIN = float(np.finfo(np.float32).tiny)
FLT_MAX = float(np.finfo(np.float32).max)
PATHS = ("emulated", "numpy")


def run(path, loss, entry, pred, target, **opts):
    """One entry point of `loss` on the emulated device or on NumPy."""
    if path == "emulated":
        return emulated_compute(loss, entry, pred, target, **opts)
    fn = gl.LOSSES[loss]
    return {"call": fn, "grad": fn.grad, "value_and_grad": fn.value_and_grad}[entry](
        pred, target, **opts)


def f64(x):
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------------------------------------
# 1. class weights keep their range: scaled by 1e39 or 1e-39 they change nothing in a mean
#    over class indices (and scale a sum exactly)

LABEL_CASES = [
    ("cce_with_logits", {}),
    ("cce_with_logits", {"focal_gamma": 2.0}),
    ("cce_with_logits", {"label_smoothing": 0.2}),
    ("cce_with_logits", {"z_loss": 1e-3}),
    ("nll", {}),
    ("cce", {}),
    ("multiclass_hinge", {}),
]


def _label_inputs(loss, dtype):
    rng = np.random.default_rng(7)
    z = rng.standard_normal((6, 5))
    if loss == "nll":
        z = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    if loss == "cce":
        z = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return z.astype(dtype), np.array([0, 1, 2, 3, 4, 1])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1e39, 1e-39])
@pytest.mark.parametrize(("loss", "opts"), LABEL_CASES)
def test_class_weights_keep_their_range(path, dtype, scale, loss, opts):
    z, t = _label_inputs(loss, dtype)
    cw = np.array([1.0, 2.0, 0.5, 3.0, 1.5])
    want_v, want_g = run("numpy", loss, "value_and_grad", z, t, class_weight=cw, **opts)
    got_v, got_g = run(path, loss, "value_and_grad", z, t, class_weight=cw * scale, **opts)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(f64(got_v), f64(want_v), rtol=rtol)
    np.testing.assert_allclose(f64(got_g), f64(want_g), rtol=rtol, atol=rtol * 1e-3)
    # a sum scales exactly with the weights (float64: the scaled sum is representable)
    if dtype == np.float64:
        s = run(path, loss, "call", z, t, class_weight=cw * scale, reduction="sum", **opts)
        base = run("numpy", loss, "call", z, t, class_weight=cw, reduction="sum", **opts)
        np.testing.assert_allclose(float(s), float(base) * scale, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_class_weights_in_range_are_left_alone(path):
    """A small weight beside a large one (both float32 numbers) is not pushed below float32's
    range by a rescaling."""
    z, t = _label_inputs("cce_with_logits", np.float32)
    cw = np.array([1e21, 1e-20, 1.0, 1.0, 1.0])
    per = run(path, "cce_with_logits", "call", z, t, class_weight=cw, reduction="none")
    base = gl.cce_with_logits(z, t, reduction="none")
    np.testing.assert_allclose(f64(per), f64(base) * cw[t], rtol=1e-5)


@pytest.mark.parametrize("scale", [1e30, 1e39, 1e-39])
def test_streaming_sums_keep_the_class_weights_scale(scale):
    """Partial states (StreamingLoss) carry the weights' own scale, whatever the rescaling."""
    z, t = _label_inputs("cce_with_logits", np.float32)
    cw = np.array([1.0, 2.0, 0.5, 3.0, 1.5])
    for reduction in ("sum", "mean"):
        s = gl.StreamingLoss("cce_with_logits", reduction=reduction, class_weight=cw * scale)
        got = s.update(z[:3], t[:3]).update(z[3:], t[3:]).compute()
        want = gl.cce_with_logits(z.astype(np.float64), t, class_weight=cw * scale,
                                  reduction=reduction)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [1e39, 1e-39])
def test_class_weights_keep_their_range_with_probability_targets(path, scale):
    """A mean over probability targets scales with the class weights: huge weights give a
    huge (float64) loss and a gradient scaled alike, tiny ones a tiny loss, not 0 or NaN."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((4, 3))
    t = rng.dirichlet(np.ones(3), 4)
    cw = np.array([1.0, 2.0, 0.5])
    base_v, base_g = gl.cce_with_logits.value_and_grad(z, t, class_weight=cw)
    v, g = run(path, "cce_with_logits", "value_and_grad", z, t, class_weight=cw * scale)
    np.testing.assert_allclose(float(v), float(base_v) * scale, rtol=1e-12)
    np.testing.assert_allclose(g, base_g * scale, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# 2. a row that counts for nothing adds exactly 0, even where its z-loss overflows


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("focal", [0.0, 2.0])
@pytest.mark.parametrize("how", ["sample_weight", "ignore_index"])
@pytest.mark.parametrize("z_loss", [1.0, 2e38])
def test_zero_weight_rows_add_nothing_under_z_loss(path, focal, how, z_loss):
    z = np.array([[3e38, 0.0, -3e38], [1.0, 2.0, 3.0]], np.float32)
    t = np.array([0, 1])
    opts = {"z_loss": z_loss, "focal_gamma": focal}
    opts.update({"sample_weight": np.array([0.0, 1.0])} if how == "sample_weight"
                else {"ignore_index": 0})
    v, g = run(path, "cce_with_logits", "value_and_grad", z, t, **opts)
    want_v, want_g = gl.cce_with_logits.value_and_grad(z[1:], t[1:], z_loss=z_loss,
                                                       focal_gamma=focal)
    assert np.array_equal(g[0], np.zeros(3, np.float32)), g
    if z_loss < 1e38:  # (2e38: the counted row's gradient overflows float32, differently)
        np.testing.assert_allclose(g[1], want_g[0], rtol=1e-5)
        np.testing.assert_allclose(float(v), float(want_v), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. branches decided on the inputs: normal inputs whose difference is subnormal (0 under
#    flush-to-zero) keep the gradient's sign

A, B = np.float32(1.5 * FLT_MIN), np.float32(FLT_MIN)  # both normal; A - B is subnormal


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("loss", "opts", "want"), [
    ("mae", {}, [0.5, -0.5]),
    ("pinball", {"quantile": 0.25}, [0.375, -0.125]),
    ("smooth_l1", {"beta": 1e-37}, [0.5 * float(A - B) / np.float32(1e-37),
                                    -0.5 * float(A - B) / np.float32(1e-37)]),
])
def test_subnormal_differences_keep_the_gradient(path, loss, opts, want):
    p, y = np.array([A, B]), np.array([B, A])
    g = run(path, loss, "grad", p, y, **opts)
    np.testing.assert_allclose(f64(g), want, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_multiclass_hinge_margin_zero_with_a_subnormal_lead(path):
    z = np.array([[A, B]], np.float32)  # the runner-up beats the label by a subnormal amount
    g = run(path, "multiclass_hinge", "grad", z, np.array([1]), margin=0.0)
    assert np.array_equal(g, np.array([[1.0, -1.0]], np.float32)), g


# ---------------------------------------------------------------------------------------------
# 4. unsigned class indices

UNSIGNED_LOSSES = [("cce_with_logits", {}), ("nll", {}), ("multiclass_hinge", {}),
                   ("cce", {}), ("cce_with_logits", {"ignore_index": 2})]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize(("loss", "opts"), UNSIGNED_LOSSES)
def test_unsigned_labels_work(path, dtype, loss, opts):
    z, _ = _label_inputs(loss, np.float64)
    t = np.array([0, 1, 2, 3, 4, 2])
    want = gl.LOSSES[loss].value_and_grad(z, t, **opts)
    got = run(path, loss, "value_and_grad", z, t.astype(dtype), **opts)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("label", [2**63, 2**64 - 1])
@pytest.mark.parametrize("validate", [True, False])
def test_unsigned_labels_beyond_int64_are_refused(path, label, validate):
    z = np.zeros((2, 3))
    t = np.array([1, label], np.uint64)
    with pytest.raises(ValueError, match="target"):
        run(path, "cce_with_logits", "call", z, t, ignore_index=-1, validate=validate)


# ---------------------------------------------------------------------------------------------
# 5. parameters at and beyond the dtype's range


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("delta", [1e39, np.inf])
def test_huber_delta_beyond_float32_is_half_the_squared_error(path, delta):
    p = np.array([np.inf, -np.inf, 3.0, 1e20], np.float32)
    y = np.zeros(4, np.float32)
    v, g = run(path, "huber", "value_and_grad", p, y, delta=delta, reduction="none")
    assert np.array_equal(v, np.array([np.inf, np.inf, 4.5, np.inf], np.float32)), v  # 5e39
    # the slope: d inside delta, and delta (the dtype's largest value) beyond it
    assert np.array_equal(g, np.array([FLT_MAX, -FLT_MAX, 3.0, 1e20], np.float32)), g


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("beta", [1e30, 1e39, np.inf])
def test_smooth_l1_huge_beta(path, beta):
    p = np.array([np.inf, -np.inf, 30.0], np.float32)
    y = np.zeros(3, np.float32)
    v, g = run(path, "smooth_l1", "value_and_grad", p, y, beta=beta, reduction="none")
    b = float(np.float32(min(beta, FLT_MAX)))  # beyond float32: its largest value
    assert v[0] == np.inf and v[1] == np.inf, v
    assert g[0] == 1 and g[1] == -1, g
    np.testing.assert_allclose(v[2], 450 / b, rtol=1e-6)
    np.testing.assert_allclose(g[2], 30 / b, rtol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-39, np.inf])
def test_temperature_that_would_flush_or_overflow_is_refused(path, temperature):
    z = np.array([[1.0, 2.0]], np.float32)
    t = np.array([[0.3, 0.7]], np.float32)
    with pytest.raises(ValueError, match="temperature"):
        run(path, "kl_div_with_logits", "call", z, t, temperature=temperature)


# ---------------------------------------------------------------------------------------------
# 6. distillation: relative error independent of the temperature (mpmath reference)


def _kl_mp(z, zt, T):
    """T^2 KL(softmax(zt / T) || softmax(z / T)) per row and its gradient, in 50 digits."""
    mpmath.mp.dps = 50
    losses, grads = [], []
    for zr, tr in zip(z.tolist(), zt.tolist()):
        zs = [mpmath.mpf(v) / T for v in zr]
        ts = [mpmath.mpf(v) / T for v in tr]
        lq = [v - mpmath.log(mpmath.fsum(mpmath.exp(u) for u in zs)) for v in zs]
        lt = [v - mpmath.log(mpmath.fsum(mpmath.exp(u) for u in ts)) for v in ts]
        t = [mpmath.exp(v) for v in lt]
        losses.append(T * T * mpmath.fsum(a * (b - c) for a, b, c in zip(t, lt, lq)))
        grads.append([T * (mpmath.exp(a) - b) for a, b in zip(lq, t)])
    return np.array(losses, float), np.array(grads, float)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [1e-3, 0.5, 1.0, 4.0, 20.0, 100.0, 1e4, 1e6])
def test_distillation_error_does_not_grow_with_temperature(path, dtype, T):
    rng = np.random.default_rng(11)
    z = (rng.standard_normal((8, 12)) * 3).astype(dtype)
    zt = (rng.standard_normal((8, 12)) * 3).astype(dtype)
    want_l, want_g = _kl_mp(z.astype(np.float64), zt.astype(np.float64), T)
    per, g = (run(path, "kl_div_with_logits", e, z, zt, temperature=T, target_logits=True,
                  reduction="none") for e in ("call", "grad"))
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(f64(per), want_l, rtol=rtol)
    err = np.abs(f64(g) - want_g).max(axis=1) / np.abs(want_g).max(axis=1)
    assert err.max() <= rtol, err


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gamma", [1e-50, 1e-38])
def test_focal_gamma_that_is_zero_in_float32_is_plain_cross_entropy(path, gamma):
    """A gamma that rounds or flushes to 0 in the compute type turns the focal switch on but
    must compute plain cross-entropy there, not exp(-inf * 0) = NaN where 1 - q underflows."""
    z = np.array([[100.0, 0.0, 0.0], [1.0, 2.0, 3.0]], np.float32)
    y = np.array([0, 2])
    got = run(path, "cce_with_logits", "value_and_grad", z, y, focal_gamma=gamma)
    want = run("numpy", "cce_with_logits", "value_and_grad", z, y)
    np.testing.assert_allclose(f64(got[0]), f64(want[0]), rtol=1e-6)
    np.testing.assert_allclose(f64(got[1]), f64(want[1]), rtol=1e-6, atol=1e-12)


@pytest.mark.xfail(strict=True, reason="known defect: in float32, a teacher sure of one class "
                   "(t = 1 - 1.6e-7) puts d = u - sum(t u) for that class at the rounding of "
                   "the sum (both paths, about 3e-5 relative); the fix is d = u - sum(t u) / "
                   "sum(t) in float64 on both paths, to try")
@pytest.mark.parametrize("path", PATHS)
def test_distillation_with_a_sure_teacher_in_float32(path):
    """Found by the emulated edge families: T = 1e-3, the second row's teacher puts all but
    1.6e-7 of its mass on one class. The exact loss is 8.0507774e-11."""
    z = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    zt = np.array([[0.0, -1.0], [-0.015625, 0.0]], np.float32)
    want, _ = _kl_mp(z.astype(np.float64), zt.astype(np.float64), 1e-3)
    got = run(path, "kl_div_with_logits", "call", z, zt, temperature=1e-3, target_logits=True)
    np.testing.assert_allclose(f64(got), want.mean(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 7. the CPU path keeps the digits of dominated rows


@pytest.mark.parametrize("path", PATHS)
def test_dominated_row_keeps_its_tiny_loss(path):
    v, g = run(path, "cce_with_logits", "value_and_grad", np.array([[50.0, 0.0]]), np.array([0]))
    tiny = float(np.log1p(np.exp(-50.0)))
    np.testing.assert_allclose(float(v), tiny, rtol=1e-14)
    np.testing.assert_allclose(g, [[-tiny, tiny]], rtol=1e-12)
    # probability targets: the same row as a one-hot target
    v, g = run(path, "cce_with_logits", "value_and_grad", np.array([[50.0, 0.0]]),
               np.array([[1.0, 0.0]]))
    np.testing.assert_allclose(float(v), tiny, rtol=1e-14)
    np.testing.assert_allclose(g, [[-tiny, tiny]], rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_dominated_distillation_row(path):
    z, zt = np.array([[50.0, 0.0]]), np.array([[40.0, 0.0]])
    want, _ = _kl_mp(z, zt, 1.0)
    v = run(path, "kl_div_with_logits", "call", z, zt, target_logits=True)
    np.testing.assert_allclose(float(v), want[0], rtol=1e-12)
    # a teacher's probabilities, as given (t_0 rounds to 1): KL of exactly these numbers
    t = np.array([[1.0, np.exp(-40.0)]])
    mpmath.mp.dps = 50
    lq = [mpmath.mpf(v) - mpmath.log(mpmath.exp(50) + 1) for v in (50, 0)]
    want = float(mpmath.fsum(mpmath.mpf(a) * (mpmath.log(a) - b)
                             for a, b in zip(t[0].tolist(), lq)))
    v = run(path, "kl_div_with_logits", "call", z, t)
    np.testing.assert_allclose(float(v), want, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# 8. the documented limits


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("score", [-np.inf, np.inf, 2.0])
def test_multiclass_hinge_single_class_is_zero(path, dtype, score):
    v, g = run(path, "multiclass_hinge", "value_and_grad", np.array([[score]], dtype),
               np.array([0]), reduction="sum")
    assert float(v) == 0 and np.array_equal(g, np.zeros((1, 1), dtype)), (v, g)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gamma", [50.0, 1e4, 1e10, 1e30, 1e38, 3.4e38, 1e39, 1e300])
def test_binary_focal_gradient_is_finite_for_every_gamma(path, dtype, gamma):
    z = np.array([-200, -80, -30, -3, -1e-3, 0, 1e-3, 0.5, 4, 30, 80, 200], dtype)
    for y in (0.0, 1.0, 0.5, 0.9, 1e-3):
        v, g = run(path, "bce_with_logits", "value_and_grad", z, np.full(z.shape, y, dtype),
                   focal_gamma=gamma, reduction="none")
        assert np.all(np.isfinite(v)) and np.all(np.isfinite(g)), (y, v, g)


# ---------------------------------------------------------------------------------------------
# 9. 16-bit weights and targets are validated on their bits, before any cast

NEG_SUB_BF16 = np.array([-1e-39], np.float32).astype(BF16)[0]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("loss", "which"), [
    ("bce", "target"), ("bce_with_logits", "target"), ("mse", "sample_weight"),
    ("bce_with_logits", "pos_weight"), ("cce_with_logits", "class_weight"),
    ("cce_with_logits", "target"), ("kl_div_with_logits", "target"),
])
@pytest.mark.parametrize("pred_dtype", [np.float32, np.float64])
def test_bfloat16_negative_subnormals_are_refused(path, loss, which, pred_dtype):
    assert float(NEG_SUB_BF16) < 0
    categorical = loss.startswith(("cce", "kl"))
    shape = (2, 3) if categorical else (3,)
    pred = np.full(shape, 0.25, pred_dtype)
    target = np.full(shape, 0.25, np.float32)
    if categorical and which == "class_weight":
        target = np.array([0, 1])
    opts = {}
    if which == "target":
        target = target.astype(BF16)
        target.reshape(-1)[1] = NEG_SUB_BF16
    else:
        w = np.ones(3, np.float32).astype(BF16)
        w[1] = NEG_SUB_BF16
        opts[which] = w
    with pytest.raises(ValueError, match=which):
        run(path, loss, "call", pred, target, **opts)
