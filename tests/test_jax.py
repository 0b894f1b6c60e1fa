"""JAX: every loss under jax.jit, jax.grad, jax.value_and_grad and jax.vmap (a custom_jvp on
the jax.numpy formulas), eager JAX arrays on the NumPy backend, validation under a trace,
float32 sums without x64."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from conftest import each_at_least_once, make_inputs, require
from reference import ELEMENTWISE
from test_losses import _cases, _options

import gpuloss as gl
from gpuloss.backends import generic

jax = require("jax")
jnp = jax.numpy
checkify = pytest.importorskip("jax.experimental.checkify")

REDUCTIONS = ("mean", "sum", "none")


CASES = list(_cases())  # every loss and target kind, as in test_losses
IDS = [f"{loss}-{'labels' if labels else 'probs'}" for loss, _, labels in CASES]


def _jax_options(opts):
    return {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in opts.items()}


def _inputs(loss, shape, labels, dtype, seed=0):
    rng = np.random.default_rng(seed)
    pred, target = make_inputs(loss, rng, shape, dtype=dtype, labels=labels)
    if loss not in ELEMENTWISE and not labels:
        target = target.astype(dtype)
    return pred, target, _options(loss, rng, shape, labels)


def _close(got, want, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-300)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(("loss", "shape", "labels"), CASES, ids=IDS)
@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
def test_traced_calls_agree_with_numpy(loss, shape, labels, x64):
    """jit(loss), jit(grad(loss)), jit(loss.value_and_grad) for every option set and every
    reduction = the NumPy backend (float64 to 1e-12; float32, with float32 sums, to 2e-5).
    Each trace is a compile: the default run pairs each option set with one reduction in
    turn (every reduction appears); GPULOSS_FULL_SWEEPS=1 runs every pair."""
    dtype, rtol = (np.float64, 1e-12) if x64 else (np.float32, 2e-5)
    fn = gl.LOSSES[loss]
    with jax.enable_x64(x64):
        pred, target, option_sets = _inputs(loss, shape, labels, dtype)
        P, T = jnp.asarray(pred), jnp.asarray(target)
        for opts, reduction in each_at_least_once(option_sets, list(REDUCTIONS), int(x64)):
            jopts = _jax_options(opts)
            want_v, want_g = fn.value_and_grad(pred, target, reduction=reduction, **opts)

            def value(p, t, jopts=jopts, reduction=reduction):
                return fn(p, t, reduction=reduction, validate=False, **jopts)

            v = jax.jit(value)(P, T)
            g = jax.jit(jax.grad(lambda p, t, f=value: jnp.sum(f(p, t))))(P, T)
            vg_v, vg_g = jax.jit(lambda p, t, jopts=jopts, reduction=reduction:
                                 fn.value_and_grad(p, t, reduction=reduction,
                                                   validate=False, **jopts))(P, T)
            what = f"{loss} {opts} {reduction}"
            assert v.dtype == pred.dtype and g.dtype == pred.dtype, what
            assert v.shape == np.shape(want_v) and g.shape == pred.shape, what
            for got, want in ((v, want_v), (g, want_g), (vg_v, want_v), (vg_g, want_g)):
                _close(got, want, rtol)


def test_the_sampled_sweep_keeps_every_option_set_and_reduction():
    import conftest

    for n in range(1, 6):
        first = list(range(n))
        pairs = each_at_least_once(first, list(REDUCTIONS), 1)
        assert {a for a, _ in pairs} == set(first) and {b for _, b in pairs} == set(REDUCTIONS)
        assert len(pairs) == (n * 3 if conftest.FULL_SWEEPS else max(n, 3))


@pytest.mark.parametrize(("loss", "shape", "labels"), CASES, ids=IDS)
def test_check_grads_in_float64(loss, shape, labels):
    """jax.test_util.check_grads in forward and reverse mode (the custom_jvp's tangent and
    its transpose) against finite differences, for the mean and for reduction 'none'."""
    from jax.test_util import check_grads

    fn = gl.LOSSES[loss]
    with jax.enable_x64(True):
        pred, target, _ = _inputs(loss, shape, labels, np.float64, seed=3)
        T = jnp.asarray(target)
        for reduction in ("mean", "none"):
            check_grads(lambda p, r=reduction: fn(jnp.asarray(p), T, reduction=r),
                        (jnp.asarray(pred),),
                        order=1, modes=("fwd", "rev"), eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("loss", "shape", "labels"), CASES, ids=IDS)
def test_second_derivatives_in_float64(loss, shape, labels):
    """Forward mode makes jax.hessian and order-2 check_grads work: JAX differentiates the
    gradient formula inside the custom_jvp's rule."""
    from jax.test_util import check_grads

    fn = gl.LOSSES[loss]
    with jax.enable_x64(True):
        pred, target, _ = _inputs(loss, shape, labels, np.float64, seed=4)
        T = jnp.asarray(target)
        check_grads(lambda p: fn(jnp.asarray(p), T), (jnp.asarray(pred),),
                    order=2, modes=("fwd", "rev"), eps=1e-5, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("loss", "shape", "labels"), CASES, ids=IDS)
def test_vmap_is_a_loop(loss, shape, labels):
    """vmap over a batch axis of pred, target and weights = one call per batch member."""
    fn = gl.LOSSES[loss]
    batches = [_inputs(loss, shape, labels, np.float32, seed=s) for s in range(3)]
    preds = jnp.stack([jnp.asarray(b[0]) for b in batches])
    targets = jnp.stack([jnp.asarray(b[1]) for b in batches])
    sample_shape = shape if loss in ELEMENTWISE else shape[:-1]
    weights = np.random.default_rng(9).uniform(0, 2, (3, *sample_shape)).astype(np.float32)

    def value(p, t, w):
        return fn(p, t, sample_weight=w, validate=False)

    v = jax.vmap(value)(preds, targets, jnp.asarray(weights))
    g = jax.vmap(jax.grad(value))(preds, targets, jnp.asarray(weights))
    for i, (pred, target, _) in enumerate(batches):
        want_v, want_g = fn.value_and_grad(pred, target, sample_weight=weights[i])
        _close(v[i], want_v, 2e-5)
        _close(g[i], want_g, 2e-5)


@pytest.mark.parametrize(("loss", "shape", "labels"), CASES, ids=IDS)
def test_eager_jax_arrays_take_the_numpy_backend(loss, shape, labels):
    """Concrete JAX CPU arrays: the NumPy backend's bits, results as JAX arrays, eager
    validation as for NumPy, and eager jax.grad = .grad."""
    fn = gl.LOSSES[loss]
    pred, target, _ = _inputs(loss, shape, labels, np.float32)
    P, T = jnp.asarray(pred), jnp.asarray(target)
    v, g = fn.value_and_grad(P, T)
    want_v, want_g = fn.value_and_grad(pred, target)
    assert isinstance(v, jax.Array) and isinstance(g, jax.Array)
    np.testing.assert_array_equal(np.asarray(v), want_v)
    np.testing.assert_array_equal(np.asarray(g), want_g)
    _close(jax.grad(lambda p: fn(p, T))(P), want_g, 2e-5)


def test_large_gradient_comes_back_without_a_copy_and_stays_intact():
    """A JAX result is the NumPy backend's (64-byte aligned) buffer itself; later calls never
    reuse it while the JAX array lives."""
    z = np.random.default_rng(0).standard_normal((4096, 128)).astype(np.float32)
    t = np.random.default_rng(1).integers(0, 128, 4096)
    g1 = gl.cce_with_logits.grad(jnp.asarray(z), jnp.asarray(t))
    kept = np.array(g1)
    assert g1.unsafe_buffer_pointer() % 64 == 0
    for scale in (2.0, 3.0):
        g2 = gl.cce_with_logits.grad(jnp.asarray(z * scale), jnp.asarray(t))
        assert g2.unsafe_buffer_pointer() != g1.unsafe_buffer_pointer()
    np.testing.assert_array_equal(np.asarray(g1), kept)


def test_targets_and_weights_get_no_gradient():
    z = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3)))
    y = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (6, 3)))
    w = jnp.ones(6)
    dy, dw = jax.grad(lambda y, w: gl.cce_with_logits(z, y, sample_weight=w), (0, 1))(y, w)
    assert not np.any(np.asarray(dy)) and not np.any(np.asarray(dw))


def test_bfloat16_under_jit_and_eager():
    z = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    t = np.random.default_rng(1).integers(0, 8, 64)
    Zb = jnp.asarray(z).astype(jnp.bfloat16)
    eager = gl.cce_with_logits.value_and_grad(Zb, jnp.asarray(t))
    traced = jax.jit(lambda p: gl.cce_with_logits.value_and_grad(p, jnp.asarray(t),
                                                                 validate=False))(Zb)
    want = gl.cce_with_logits.value_and_grad(np.asarray(Zb).astype(np.float32), t)
    for got in (eager, traced):
        assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
        for a, b in zip(got, want):  # within one bfloat16 rounding of the float32 result
            _close(np.asarray(a).astype(np.float32), b, 2**-7)


# ---------------------------------------------------------------------------------------------
# validation and errors under tracing


def test_validate_under_eager_grad_and_vmap_raises_the_eager_error():
    p = jnp.asarray([0.5, 1.5, 0.2])
    y = jnp.asarray([0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"pred must hold probabilities in \[0, 1\]"):
        jax.grad(lambda p: gl.bce(p, y))(p)
    with pytest.raises(ValueError, match=r"sample_weight must be non-negative"):
        jax.vmap(lambda p, w: gl.bce(p, y, sample_weight=w))(
            jnp.stack([p / 2, p / 2]), jnp.asarray([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]))


def test_validate_under_jit_reports_through_checkify():
    z = jnp.zeros((4, 3))
    bad = jnp.asarray([0, 1, 7, 2])

    def f(z, t):
        return gl.cce_with_logits(z, t)

    err, value = checkify.checkify(jax.jit(f))(z, bad)
    assert "target holds class indices in [0, 7], outside [0, 2]" in err.get()
    err, value = checkify.checkify(jax.jit(f))(z, jnp.asarray([0, 1, 2, 2]))
    assert err.get() is None
    assert float(value) == pytest.approx(math.log(3))
    # without checkify the checks cannot raise inside jit: skipped, as JAX's own are, and
    # the bad label's row is NaN (never an index error)
    assert math.isnan(float(jax.jit(f)(z, bad)))


def test_signs_under_checkify():
    def f(p, y):
        return gl.hinge(p, y)

    err, _ = checkify.checkify(jax.jit(f))(jnp.ones(3), jnp.asarray([1.0, 0.0, -1.0]))
    assert "hinge needs target labels in {-1, +1}" in err.get() and "found 0" in err.get()


def test_traced_and_concrete_arrays_mix_without_a_device_error():
    """A concrete pred closed over in jit with a traced target (and the other way round):
    no 'device None' error, the right number."""
    z = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    t = np.asarray([0, 1, 2, 1, 0])
    Z, T = jnp.asarray(z), jnp.asarray(t)
    want = float(gl.cce_with_logits(z, t))
    assert float(jax.jit(lambda t: gl.cce_with_logits(Z, t, validate=False))(T)) == (
        pytest.approx(want, rel=1e-6))
    assert float(jax.jit(lambda z: gl.cce_with_logits(z, T, validate=False))(Z)) == (
        pytest.approx(want, rel=1e-6))


def test_shape_errors_under_jit_name_the_argument():
    with pytest.raises(ValueError, match=r"Shape mismatch: pred has shape \(3,\), target"):
        jax.jit(lambda p, y: gl.mse(p, y))(jnp.ones(3), jnp.ones(4))


def test_no_warnings_without_x64():
    """No float64-truncation warnings from any entry point, eager or traced."""
    z = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    t = jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gl.cce_with_logits.value_and_grad(z, t)
        jax.jit(jax.value_and_grad(lambda z: gl.cce_with_logits(z, t, validate=False)))(z)
        jax.grad(lambda z: gl.cce_with_logits(z, t, sample_weight=jnp.ones(8)))(z)


# ---------------------------------------------------------------------------------------------
# float32 sums (JAX without x64)


@pytest.mark.parametrize("kind", ["uniform", "exponential", "constant", "signed"])
def test_float32_totals_are_accurate_at_ten_million(kind):
    """The float32 total (blocked, then pairwise with two-sum compensation) is within 1e-6 of
    the exact sum at 10^7 elements, jitted."""
    rng = np.random.default_rng(0)
    n = 10**7
    x = {"uniform": lambda: rng.random(n),
         "exponential": lambda: rng.exponential(size=n),
         "constant": lambda: np.full(n, 0.1),
         "signed": lambda: rng.standard_normal(n) + 0.5}[kind]().astype(np.float32)
    exact = math.fsum(x.astype(np.float64))
    total = jax.jit(lambda a: generic._total(jnp, a, jnp.float32))(jnp.asarray(x))
    assert total.dtype == jnp.float32
    assert abs(float(total) - exact) <= 1e-6 * abs(exact)


def test_float32_total_keeps_what_plain_pairwise_addition_loses():
    """The two-sum terms carry what rounding drops: blocks of 1 and of 2^-24 (each below
    half an ulp of the running sum) add up to the exact total."""
    blocks = np.zeros((64, generic._BLOCK), np.float32)
    blocks[0, 0] = 1.0
    blocks[1:, 0] = 2.0**-24
    exact = 1.0 + 63 * 2.0**-24
    total = float(jax.jit(lambda a: generic._total(jnp, a, jnp.float32))(
        jnp.asarray(blocks.reshape(-1))))
    assert total == pytest.approx(exact, rel=2**-24)
    assert total != 1.0


@pytest.mark.parametrize(("loss", "option", "value"), [
    ("cce_with_logits", "label_smoothing", 0.1), ("huber", "delta", 2.0),
    ("nll", "ignore_index", 1), ("poisson_nll", "log_input", True), ("cce_with_logits", "axis", 1)])
def test_a_traced_option_is_named_with_what_to_do(loss, option, value):
    """Options fix the computation: traced, they get an error that says so and what to do,
    not a 'must be a real number, got DynamicJaxprTracer'."""
    pred, target, _ = _inputs(loss, (6, 4), True, np.float32)

    def f(v):
        return gl.LOSSES[loss](jnp.asarray(pred), jnp.asarray(target), **{option: v})

    with pytest.raises(TypeError, match=f"{option} must be a Python value, got a traced JAX "
                                        r"value.*static_argnames"):
        jax.jit(f)(value)
