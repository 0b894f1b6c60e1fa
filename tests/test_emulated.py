"""The CUDA path on the emulated device (tests/cuda_emulator.h, device mode: flush-to-zero and
fused multiply-add as CuPy compiles), against the NumPy backend.

- the fuzz generator of test_fuzz.py drives the backend's own launch code through
  `kernel_host.emulated_compute`: every disagreement with the NumPy backend is a bug on one
  side (GPULOSS_EMULATED_FUZZ_EXAMPLES sets the count, default 2,000, fixed seed);
- the known defects of the CUDA path, each as a test that failed before its fix;
- the twin itself: its floating-point modes, the argument-width and launch-bound checks, and
  ThreadSanitizer / AddressSanitizer+UBSan runs of one kernel of each family.
"""

from __future__ import annotations

import ctypes
import os

import array_api_strict
import ml_dtypes
import numpy as np
import pytest
from agreement import assert_agree, device_view
from hypothesis import HealthCheck, given, settings
from kernel_host import emulated_compute
from test_fuzz import _run, cases, edge_cases

import gpuloss as gl
from gpuloss.backends import cuda as _cuda_backend

EXAMPLES = int(os.environ.get("GPULOSS_EMULATED_FUZZ_EXAMPLES", "2000"))
BF16 = np.dtype(ml_dtypes.bfloat16)


def _outcome(fn):
    try:
        return "result", fn()
    except (TypeError, ValueError) as exc:
        return "error", exc


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None,
    # fixed examples in CI (reproducible); GPULOSS_HYPOTHESIS_RANDOM=1 explores new ones
    derandomize=os.environ.get("GPULOSS_HYPOTHESIS_RANDOM") != "1",
    suppress_health_check=list(HealthCheck))


def _agrees_with_numpy(loss, entry, pred, target, opts):
    kind, got = _outcome(lambda: emulated_compute(loss, entry, pred, target, **opts))
    want_kind, want = _outcome(lambda: _run(loss, entry, pred, target, opts))
    assert kind == want_kind, (kind, got, want)
    if kind == "error":
        assert type(got) is type(want), (got, want)
        return
    # the same call on the inputs as the device sees them (flush-to-zero for float32)
    p, t, o = device_view(pred, target, opts)
    want = _run(loss, entry, p, t, o)
    got = {"call": (got, None), "grad": (None, got), "value_and_grad": got}[entry]
    for name, g, w in zip(("value", "grad"), got, want):  # noqa: B007
        assert (g is None) == (w is None)
        if w is not None:
            assert_agree(g, w, pred.dtype, f"{loss} {entry} {name} {opts}")


@FUZZ_SETTINGS
@given(cases())
def test_emulated_fuzz_agrees_with_numpy(case):
    _agrees_with_numpy(*case)


@settings(max_examples=int(os.environ.get("GPULOSS_EMULATED_EDGE_EXAMPLES", "400")),
          deadline=None, database=None,
          derandomize=os.environ.get("GPULOSS_HYPOTHESIS_RANDOM") != "1",
          suppress_health_check=list(HealthCheck))
@given(edge_cases())
def test_emulated_edge_families_agree_with_numpy(case):
    """The numerical edge families (test_fuzz.edge_cases), drawn on purpose."""
    _agrees_with_numpy(*case)


def _in_bfloat16(case):
    """The case with a float pred (and a float target of the same dtype) in bfloat16."""
    loss, entry, pred, target, opts = case
    if pred.dtype.kind == "f":
        if target.dtype == pred.dtype:
            target = target.astype(np.float32).astype(BF16)
        pred = pred.astype(np.float32).astype(BF16)
    return loss, entry, pred, target, opts


@FUZZ_SETTINGS
@given(cases().map(_in_bfloat16))
def test_emulated_fuzz_agrees_with_numpy_in_bfloat16(case):
    """The same generator, its float predictions stored in bfloat16 (the 16-bit pattern
    the kernels read and write; flush-to-zero as float32)."""
    _agrees_with_numpy(*case)


# ---------------------------------------------------------------------------------------------
# the known defects of the CUDA path (issue "The CUDA path agrees with the NumPy path"), each
# reproduced on the emulated device; NumPy is the other side of every comparison

NEG_SUB = np.float32(-1e-40)  # a negative float32 subnormal: -ftz=true compares it as -0


def _both(loss, entry, pred, target, **opts):
    """(emulated, NumPy) results of one entry point, each as (value, grad) with None for
    what the entry point does not return; both must succeed."""
    got = emulated_compute(loss, entry, pred, target, **opts)
    got = {"call": (got, None), "grad": (None, got), "value_and_grad": got}[entry]
    return got, _run(loss, entry, pred, target, opts)


@pytest.mark.parametrize(("loss", "pred", "target", "opts", "names"), [
    ("bce", np.array([0.5, NEG_SUB], np.float32), np.array([0.0, 1.0]), {}, "pred"),
    ("cce", np.array([[0.5, NEG_SUB]], np.float32), np.array([0]), {}, "pred"),
    ("bce_with_logits", np.zeros(2, np.float32), np.array([0.5, -1e-40]), {}, "target"),
    ("bce", np.full(2, 0.5, np.float32), np.array([0.5, -1e-40], np.float32), {}, "target"),
    ("cce_with_logits", np.zeros((1, 2), np.float32), np.array([[1.0, -1e-40]]), {}, "target"),
    ("mse", np.zeros(2, np.float32), np.zeros(2), {"sample_weight": np.array([1, NEG_SUB])},
     "sample_weight"),
    ("bce_with_logits", np.zeros(2, np.float32), np.zeros(2),
     {"pos_weight": np.array([1, NEG_SUB])}, "pos_weight"),
    ("cce_with_logits", np.zeros((1, 2), np.float32), np.array([0]),
     {"class_weight": np.array([1, NEG_SUB])}, "class_weight"),
])
def test_defect_1_validation_does_not_depend_on_flush_to_zero(loss, pred, target, opts, names):
    """A negative subnormal is outside the domain on every path, whatever -ftz=true does to
    float32 comparisons and conversions (checked on the stored bits, before any cast)."""
    for run in (lambda: emulated_compute(loss, "call", pred, target, **opts),
                lambda: gl.LOSSES[loss](pred, target, **opts)):
        with pytest.raises(ValueError, match=names):
            run()


def test_defect_1_float32_results_flush_on_the_device_only():
    """Decided: float32 kernels keep CuPy's flush-to-zero (README, "Numerics on the GPU"). The
    twin shows it in device mode; IEEE mode and NumPy keep the subnormal."""
    p, y = np.array([1e-40], np.float32), np.zeros(1, np.float32)
    assert emulated_compute("mse", "grad", p, y)[0] == 0  # the subnormal input counts as 0
    ieee = emulated_compute("mse", "grad", p, y, mode="ieee")
    np.testing.assert_array_equal(ieee, gl.mse.grad(p, y))
    assert ieee[0] != 0
    # bce_with_logits at z = -100: sigmoid(-100) = 3.7e-44 is a float32 subnormal
    z, t = np.array([-100.0], np.float32), np.zeros(1, np.float32)
    got = emulated_compute("bce_with_logits", "value_and_grad", z, t, reduction="sum")
    assert got[0] == 0 and got[1][0] == 0
    assert gl.bce_with_logits(z, t, reduction="sum") > 0
    # float64 is never flushed
    z64 = z.astype(np.float64)
    np.testing.assert_allclose(emulated_compute("bce_with_logits", "grad", z64, t),
                               gl.bce_with_logits.grad(z64, t), rtol=1e-12)


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
@pytest.mark.parametrize("loss", ["cce", "cce_with_logits"])
def test_defect_2_class_weight_is_validated(loss, bad):
    pred, target = np.full((2, 3), 0.25), np.array([0, 1])
    for run in (lambda: emulated_compute(loss, "call", pred, target,
                                         class_weight=np.array([1.0, bad, 1.0])),
                lambda: gl.LOSSES[loss](pred, target, class_weight=np.array([1.0, bad, 1.0]))):
        with pytest.raises(ValueError, match="class_weight must be non-negative"):
            run()


@pytest.mark.parametrize(("loss", "pred", "target", "opts"), [
    ("mse", np.zeros((0, 3)), np.zeros((0, 3)), {"sample_weight": np.array([1.0, -1.0, 1.0])}),
    ("bce_with_logits", np.zeros((0, 3)), np.zeros((0, 3)),
     {"pos_weight": np.array([1.0, np.nan, 1.0])}),
    ("cce_with_logits", np.zeros((0, 3)), np.zeros(0, np.int64),
     {"class_weight": np.array([1.0, -2.0, 1.0])}),
    ("cce", np.zeros((0, 3)), np.zeros((0, 3)), {"sample_weight": np.array([-1.0])}),
])
def test_defect_3_weights_are_validated_on_empty_data(loss, pred, target, opts):
    for run in (lambda: emulated_compute(loss, "value_and_grad", pred, target, **opts),
                lambda: gl.LOSSES[loss].value_and_grad(pred, target, **opts)):
        with pytest.raises(ValueError, match="must be non-negative"):
            run()


@pytest.mark.parametrize("loss", ["cce", "cce_with_logits"])
def test_defect_4_no_classes_with_class_weight(loss):
    pred, target, cw = np.zeros((2, 0)), np.array([0, 0]), np.zeros(0)
    for run in (lambda: emulated_compute(loss, "call", pred, target, class_weight=cw),
                lambda: gl.LOSSES[loss](pred, target, class_weight=cw)):
        with pytest.raises(ValueError, match="class indices"):
            run()
    for opts in ({"validate": False}, {"ignore_index": 0}):
        got, want = _both(loss, "value_and_grad", pred, target, class_weight=cw, **opts)
        assert np.isnan(got[0]) and np.isnan(want[0])
        assert got[1].shape == want[1].shape == (2, 0)


def _routes(v, dtype):
    """Every place a value is validated: (loss, pred, target, options) with `v` in it."""
    a = np.array([0.5, v], dtype)
    half = np.full(2, 0.5, np.float32)
    return [
        ("bce", a, np.array([0.5, 0.5]), {}),                        # pred, in the pass
        ("cce", np.array([[1.0, v]], dtype), np.array([0]), {}),      # pred, row kernel
        ("bce", half, a, {}),                                         # target, as stored
        ("bce_with_logits", half, a, {}),
        ("cce_with_logits", np.zeros((1, 2), np.float32), a.reshape(1, 2), {}),  # cast first
        ("cce", np.full((1, 2), 0.5, dtype), a.reshape(1, 2), {}),   # same dtype: in the pass
    ]


def _weight_routes(v, dtype):
    w = np.array([1.0, v], dtype)
    return [
        ("mse", np.zeros(2, np.float32), np.zeros(2), {"sample_weight": w}),
        ("bce_with_logits", np.zeros(2, np.float64), np.zeros(2), {"pos_weight": w}),
        ("cce_with_logits", np.zeros((3, 2), np.float32), np.array([0, 1, 0]),
         {"class_weight": w}),
        ("cce", np.full((2, 2), 0.5), np.full((2, 2), 0.5), {"sample_weight": w}),
    ]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_validation_route_at_the_boundaries(dtype):
    """Each value on each route is accepted or rejected the same way by the emulated CUDA
    path and the NumPy backend, and as the rules say (judged as stored, FTZ or not)."""
    f = np.finfo(dtype)
    sub, up = f.smallest_subnormal, np.nextafter(dtype(1), dtype(2))
    cases = [(v, True, _routes) for v in (0.0, -0.0, 1.0, sub, np.nan)]
    cases += [(v, False, _routes) for v in (-sub, up, np.inf, -np.inf)]
    cases += [(v, True, _weight_routes) for v in (0.0, -0.0, sub, f.max)]
    cases += [(v, False, _weight_routes) for v in (-sub, np.inf, -np.inf, np.nan)]
    for v, ok, routes in cases:
        for loss, pred, target, opts in routes(v, dtype):
            for run in (lambda: emulated_compute(loss, "call", pred, target, **opts),
                        lambda: gl.LOSSES[loss](pred, target, **opts)):
                if ok:
                    run()
                else:
                    with pytest.raises(ValueError, match="must"):
                        run()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K", [3, 40, 300, 9000])  # 4 lanes, a warp, a block, read twice
def test_defect_5_a_nan_logit_makes_its_row_nan(dtype, K):
    z = np.tile(np.linspace(-1, 1, K), (3, 1)).astype(dtype)
    z[0, 1] = np.nan  # alone in its lane for every row layout
    z[1, 2] = np.inf  # +inf: inf - inf in the max-shifted form
    t = np.array([0, 0, 0])
    for entry in ("call", "value_and_grad"):
        for reduction in ("none", "mean"):
            got, want = _both("cce_with_logits", entry, z, t, reduction=reduction,
                              label_smoothing=0.1)
            for g, w in zip(got, want):
                if w is not None:
                    assert_agree(g, w, dtype)
    per, grad = emulated_compute("cce_with_logits", "value_and_grad", z, t, reduction="none")
    assert np.isnan(per[:2]).all() and np.isfinite(per[2])
    assert np.isnan(grad[:2]).all() and np.isfinite(grad[2]).all()


@pytest.mark.parametrize("loss", ["mse", "bce_with_logits", "cce_with_logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_defect_6_huge_and_tiny_weights_do_not_overflow(loss, reduction):
    rng = np.random.default_rng(0)
    if loss == "cce_with_logits":
        pred = (30 * rng.standard_normal((6, 4))).astype(np.float32)
        target, shape = rng.integers(0, 4, 6), (6,)
    else:
        pred = np.array([1e5, -3e4, 7.0, 0.5, -2.0, 9e3], np.float32)
        target, shape = np.array([0.0, 1.0, 1.0, 0.0, 0.5, 1.0]), (6,)
    for scale in (1e30, 1e-30):
        w = rng.uniform(0.5, 2.0, shape) * scale
        got, want = _both(loss, "value_and_grad", pred, target, sample_weight=w,
                          reduction=reduction)
        assert_agree(got[0], want[0], np.float32, f"{scale} value")
        assert_agree(got[1], want[1], np.float32, f"{scale} grad")
        if reduction == "mean":
            assert np.isfinite(got[0]) and np.isfinite(got[1]).all()


@pytest.mark.parametrize("loss", ["cce", "cce_with_logits"])
def test_defect_7_invalid_labels_without_validation(loss):
    """Documented: a label outside [0, K) with validate=False gives that row a NaN loss and an
    all-NaN gradient row, on every backend; other rows are untouched."""
    pred = np.full((4, 3), 1 / 3)
    target = np.array([0, 3, -1, 2])
    for opts in ({}, {"class_weight": np.array([1.0, 2.0, 0.5])}, {"reduction": "none"}):
        got, want = _both(loss, "value_and_grad", pred, target, validate=False, **opts)
        assert_agree(got[1], want[1], np.float64)
        assert np.isnan(got[1][1:3]).all() and np.isfinite(got[1][[0, 3]]).all()
        assert_agree(got[0], want[0], np.float64)
    strict = array_api_strict.asarray(pred), array_api_strict.asarray(target)
    grad = np.asarray(gl.LOSSES[loss].grad(*strict, validate=False))
    assert np.isnan(grad[1:3]).all() and np.isfinite(grad[[0, 3]]).all()


@pytest.mark.parametrize("name", ["sample_weight", "pos_weight", "class_weight"])
def test_defect_8_infinite_weights_raise_everywhere(name):
    loss = "cce_with_logits" if name == "class_weight" else "bce_with_logits"
    pred = np.zeros((2, 3))
    target = np.array([0, 1]) if name == "class_weight" else np.zeros((2, 3))
    w = np.array([1.0, np.inf, 1.0])
    runs = [lambda: emulated_compute(loss, "call", pred, target, **{name: w}),
            lambda: gl.LOSSES[loss](pred, target, **{name: w}),
            lambda: gl.LOSSES[loss](array_api_strict.asarray(pred),
                                    array_api_strict.asarray(target),
                                    **{name: array_api_strict.asarray(w)})]
    for run in runs:
        with pytest.raises(ValueError, match=rf"{name} must be non-negative and not NaN or "
                                             r"infinite; found values in \[1, inf\]"):
            run()


def test_defect_8_ignore_index_beyond_int64_is_a_clear_error():
    for ignore in (2**63, -(2**63) - 1, 2**70):
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            emulated_compute("cce_with_logits", "call", np.zeros((2, 3)), np.array([0, 1]),
                             ignore_index=ignore)
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            gl.cce_with_logits(np.zeros((2, 3)), np.array([0, 1]), ignore_index=ignore)
    # the extremes of int64 themselves are fine
    v = gl.cce_with_logits(np.zeros((2, 3)), np.array([0, 1]), ignore_index=2**63 - 1)
    assert np.isclose(v, np.log(3))


def test_defect_10_every_kernel_declares_the_launch_size():
    import kernel_host

    bounds = kernel_host.launch_bounds()
    assert set(bounds) == {"gpuloss_elementwise", "gpuloss_check", "gpuloss_rows"}
    assert set(bounds.values()) == {_cuda_backend.BLOCK_THREADS}
    source = _cuda_backend.kernel_source()
    assert f"#define GL_BLOCK_THREADS {_cuda_backend.BLOCK_THREADS}" in source
    # a kernel without a bound is refused when the emulator is built
    with pytest.raises(RuntimeError, match="declares no __launch_bounds__"):
        kernel_host.launch_bounds(source.replace(
            "__launch_bounds__(GL_BLOCK_THREADS, GL_ELEMENTWISE_MIN_BLOCKS)\ngpuloss_check(",
            "gpuloss_check("))


# ---------------------------------------------------------------------------------------------
# what one call costs on a device: kernel launches, other CuPy kernels, host reads (issue 25)


def _counted(rt, loss, pred, target, *, want_value=True, want_grad=True, parts=False, **opts):
    from gpuloss import _api

    call = _api.prepare(loss, pred, target, opts, want_value=want_value, want_grad=want_grad,
                        parts=parts)
    rt.reset_counts()
    value, grad = _cuda_backend.compute(call, rt)
    return value, grad, list(rt.launches), list(rt.device_ops), list(rt.host_reads)


def _common_calls():
    rng = np.random.default_rng(25)
    p = rng.standard_normal(1000).astype(np.float32)  # 4 blocks' worth: the 3 of the cap
    z = rng.standard_normal((300, 10)).astype(np.float32)
    return [("mse", p, rng.standard_normal(1000).astype(np.float32)),
            ("cce_with_logits", z, rng.integers(0, 10, 300).astype(np.int64))]


@pytest.mark.parametrize("want_grad", [True, False])
@pytest.mark.parametrize("case", range(2))
def test_common_call_is_one_launch_and_one_host_read(device_runtime, case, want_grad):
    """No options, float32, mean: one kernel (the last block adds the partials and writes the
    value), no other CuPy kernel, and one transfer that brings the flags with the value."""
    loss, pred, target = _common_calls()[case]
    value, grad, launches, ops, reads = _counted(device_runtime, loss, pred, target,
                                                 want_grad=want_grad)
    assert len(launches) == 1 and launches[0].startswith(("gpuloss_elementwise<",
                                                          "gpuloss_rows<")), launches
    assert ops == []
    assert len(reads) == 1 and reads[0].dtype == np.int32 and reads[0].nbytes == 24
    assert reads[0][_cuda_backend.STATE_FLAGS] == 0
    assert reads[0][:1].view(np.float32)[0] == value  # the value came in the same read
    assert value.shape == () and value.dtype == np.float32 and (grad is None) != want_grad
    want = gl.LOSSES[loss].value_and_grad(pred, target)
    assert_agree(value, want[0], np.float32)
    if want_grad:
        assert_agree(grad, want[1], np.float32)


@pytest.mark.parametrize("case", range(2))
def test_without_validation_nothing_is_read_back(device_runtime, case):
    loss, pred, target = _common_calls()[case]
    for want_value, want_grad in ((True, True), (True, False), (False, True)):
        value, _, launches, ops, reads = _counted(
            device_runtime, loss, pred, target, want_value=want_value, want_grad=want_grad,
            validate=False)
        assert len(launches) == 1 and ops == [] and reads == [], (launches, ops, reads)
        if want_value:  # a device array, filled by the launch
            assert_agree(value, gl.LOSSES[loss](pred, target), np.float32)


@pytest.mark.parametrize("case", range(2))
def test_grad_and_none_read_only_the_flags(device_runtime, case):
    loss, pred, target = _common_calls()[case]
    for opts in ({"reduction": "none"}, {}):
        value, _, launches, ops, reads = _counted(device_runtime, loss, pred, target,
                                                  want_value=bool(opts), **opts)
        assert len(launches) == 1 and ops == [] and len(reads) == 1, (launches, ops, reads)
        assert (value is None) != bool(opts)


@pytest.mark.parametrize("case", range(2))
def test_streaming_parts_are_one_launch(device_runtime, case):
    """parts=True (StreamingLoss, dask): [Σ l, denominator] in float64 from the same launch."""
    loss, pred, target = _common_calls()[case]
    value, _, launches, ops, reads = _counted(device_runtime, loss, pred, target,
                                              want_grad=False, parts=True)
    assert len(launches) == 1 and ops == [] and len(reads) == 1
    assert value.dtype == np.float64 and value.shape == (2,)
    assert value[1] == pred.shape[0] if loss != "mse" else value[1] == pred.size
    assert_agree(np.float32(value[0] / value[1]), gl.LOSSES[loss](pred, target), np.float32)


@pytest.mark.parametrize("case", range(2))
def test_the_sum_does_not_depend_on_which_block_finishes_last(device_runtime, case):
    loss, pred, target = _common_calls()[case]
    for opts in ({}, {"reduction": "sum"}, {"parts": True, "want_grad": False}):
        first = _counted(device_runtime, loss, pred, target, **opts)[:2]
        with device_runtime.blocks_reversed():
            again = _counted(device_runtime, loss, pred, target, **opts)[:2]
        for a, b in zip(first, again):
            assert (a is None and b is None) or a.tobytes() == b.tobytes()


def test_options_that_add_work_before_the_pass(device_runtime):
    """Documented costs (gpuloss/backends/cuda.py): a sample-weighted mean validates the weights
    (gpuloss_check) and sums them on the device (the gradient's 1/D, needed before the pass);
    still one host read, after everything."""
    loss, pred, target = _common_calls()[0]
    w = np.linspace(0.5, 2.0, pred.size)
    value, _, launches, ops, reads = _counted(device_runtime, loss, pred, target,
                                              sample_weight=w)
    assert [n.split("<")[0] for n in launches] == ["gpuloss_check", "gpuloss_elementwise"]
    assert ops == ["sum"] and len(reads) == 1
    assert_agree(value, gl.mse(pred, target, sample_weight=w), np.float32)


def test_validation_errors_raise_before_returning(device_runtime):
    loss, pred, target = _common_calls()[1]
    target = target.copy()
    target[7] = 10
    with pytest.raises(ValueError, match="class indices"):
        _counted(device_runtime, loss, pred, target)
    assert len(device_runtime.launches) == 1 and len(device_runtime.host_reads) >= 1


# ---------------------------------------------------------------------------------------------
# the twin itself


@pytest.fixture(scope="module")
def device_runtime():
    import kernel_host

    return kernel_host._runtime("device")


def test_twin_refuses_a_block_larger_than_the_launch_bound(device_runtime):
    name = _cuda_backend.check_name(True, np.float64)
    a, flags = np.zeros(1), np.zeros(1, np.int32)
    args = (a, np.int64(1), np.int32(0), np.int32(4), flags)
    device_runtime.kernel(name, None)((1,), (256,), args)
    with pytest.raises(RuntimeError, match="exceeds its __launch_bounds__"):
        device_runtime.kernel(name, None)((1,), (512,), args)


def test_twin_checks_argument_widths_against_the_c_signature(device_runtime):
    import kernel_host

    name = _cuda_backend.check_name(True, np.float64)
    a, flags = np.zeros(1), np.zeros(1, np.int32)
    good = [a, np.int64(1), np.int32(0), np.int32(4), flags]
    sig = device_runtime.signature(name)
    assert sig == [("p", 8), ("i", 8), ("i", 4), ("i", 4), ("p", 8)]
    for j, wrong in ((1, np.int32(1)), (3, np.float32(1)), (2, 0), (0, np.uint64(0)),
                     (2, np.int64(1))):
        args = list(good)
        args[j] = wrong
        if j == 0:  # a null where an array is passed is fine; a scalar of 4 bytes is not
            args[j] = np.int32(0)
        with pytest.raises(kernel_host.ArgumentMismatch, match=f"argument {j}"):
            device_runtime.kernel(name, None)((1,), (256,), tuple(args))
    with pytest.raises(kernel_host.ArgumentMismatch, match="4 arguments for 5"):
        device_runtime.kernel(name, None)((1,), (256,), tuple(good[:4]))


def test_twin_modes_flush_and_contract():
    import kernel_host

    folder = kernel_host.cache_dir()
    device, ieee = kernel_host.build(folder, "device"), kernel_host.build(folder, "ieee")
    a = b = ctypes.c_float(1 + 2.0**-12)
    c = ctypes.c_float(-1.0)
    for lib in (device, ieee):
        lib.gl_emu_fma_probe.restype = ctypes.c_float
    exact = 2.0**-11 + 2.0**-24  # (1 + 2^-12)^2 - 1, what one rounding (an FMA) gives
    assert device.gl_emu_fma_probe(a, b, c) == np.float32(exact)
    assert ieee.gl_emu_fma_probe(a, b, c) == np.float32(2.0**-11)  # the product rounded first


def _sanitizer_run(kind, source=None):
    import kernel_host

    exe = kernel_host.sanitizer_program(kernel_host.cache_dir(), kind, source)
    return kernel_host.run_sanitized(exe, kind)


@pytest.mark.parametrize("kind", ["thread", "address"])
def test_twin_kernels_run_clean_under_sanitizers(kind):
    done = _sanitizer_run(kind)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr[-4000:]


def test_twin_thread_sanitizer_catches_a_deleted_barrier():
    """Delete the barrier between the warps' writes of their sums and thread 0's reads of
    them (gl_block_sum): ThreadSanitizer must report the race."""
    source = _cuda_backend.kernel_source()
    marker = "    if (lane == 0) warp_sums[warp] = v;\n    __syncthreads();\n"
    assert source.count(marker) == 1
    done = _sanitizer_run("thread", source.replace(marker, "    if (lane == 0) "
                                                           "warp_sums[warp] = v;\n"))
    assert done.returncode != 0
    assert "ThreadSanitizer: data race" in done.stderr, done.stderr[-3000:]


def test_device_script_launches_every_kernel_variant(capsys):
    """Stage (a) of benchmarks/run_on_device.sh, here on the emulator: every instantiation is
    launched on tiny inputs and agrees with NumPy, so the device run checks them all."""
    import importlib.util
    from pathlib import Path

    import kernel_host

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "device_checks.py"
    spec = importlib.util.spec_from_file_location("device_checks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.variants(kernel_host._runtime("device")) == 0, capsys.readouterr().out
    total = len(_cuda_backend.all_kernel_names())
    assert f"stage a: {total}/{total} kernel variants launched, 0 disagreements" in \
        capsys.readouterr().out
