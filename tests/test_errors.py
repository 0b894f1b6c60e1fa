"""Every error of DESIGN §5: the right type, and a message naming the argument and showing
what came in. The same checks run for NumPy and for the generic namespaces."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require, to_xp
from reference import ALL, CATEGORICAL, ELEMENTWISE, LABELED, LABELS_ONLY

import gpuloss as gl


def _valid(loss):
    if loss in ("kl_div", "kl_div_with_logits"):  # probability targets only
        return np.full((4, 3), np.log(1 / 3)), np.full((4, 3), 1 / 3)
    if loss in CATEGORICAL:
        return np.full((4, 3), 1 / 3), np.array([0, 1, 2, 0])
    return np.full((4, 3), 0.5), np.full((4, 3), 0.5)


@pytest.mark.parametrize("loss", ALL)
@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64, object])
def test_non_floating_pred_is_a_type_error(loss, dtype):
    pred, target = _valid(loss)
    with pytest.raises(TypeError, match=r"pred .*real floating dtype.*got"):
        gl.LOSSES[loss](pred.astype(dtype), target)


@pytest.mark.parametrize("loss", ALL)
@pytest.mark.parametrize("bad", ["complex", "object", "str"])
def test_complex_object_or_string_target_is_a_type_error(loss, bad):
    pred, target = _valid(loss)
    target = {"complex": target.astype(np.complex128), "object": target.astype(object),
              "str": target.astype(str)}[bad]
    with pytest.raises(TypeError, match="target"):
        gl.LOSSES[loss](pred, target)


@pytest.mark.parametrize("loss", ALL)
def test_complex_weight_is_a_type_error(loss):
    pred, target = _valid(loss)
    with pytest.raises(TypeError, match="sample_weight"):
        gl.LOSSES[loss](pred, target, sample_weight=np.ones(3, np.complex64))


@pytest.mark.parametrize("loss", ELEMENTWISE)
def test_shape_mismatch_shows_both_shapes(loss):
    with pytest.raises(ValueError, match=r"pred has shape \(4, 3\), target has shape \(4,\)"):
        gl.LOSSES[loss](np.full((4, 3), 0.5), np.full(4, 0.5))


@pytest.mark.parametrize("loss", LABELED)
def test_cce_target_shapes(loss):
    pred = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"without axis 1, i.e. \(4,\); got target shape \(3,\)"):
        gl.LOSSES[loss](pred, np.array([0, 1, 2]))
    if loss in LABELS_ONLY:  # floating or boolean targets are refused whatever their shape
        for target in (np.array([0.0, 1.0, 2.0, 0.0]), np.array([True, False, True, True])):
            with pytest.raises(TypeError, match=f"{loss} needs class indices"):
                gl.LOSSES[loss](pred, target)
        return
    with pytest.raises(ValueError, match="class indices need an integer dtype"):
        gl.LOSSES[loss](pred, np.array([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(TypeError, match="class indices .* or probabilities"):
        gl.LOSSES[loss](pred, np.array([True, False, True, True]))


@pytest.mark.parametrize("loss", CATEGORICAL)
def test_bad_axis(loss):
    pred, target = _valid(loss)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        gl.LOSSES[loss](pred, target, axis=2)
    with pytest.raises(TypeError, match="axis must be an integer"):
        gl.LOSSES[loss](pred, target, axis=1.0)
    with pytest.raises(ValueError, match="0-d"):
        gl.LOSSES[loss](np.float64(0.5), np.int64(0))


@pytest.mark.parametrize("loss", ALL)
def test_bad_reduction(loss):
    pred, target = _valid(loss)
    with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none'; got 'avg'"):
        gl.LOSSES[loss](pred, target, reduction="avg")


@pytest.mark.parametrize("loss", ALL)
def test_weight_of_the_wrong_shape(loss):
    pred, target = _valid(loss)
    with pytest.raises(ValueError, match=r"sample_weight with shape \(5,\) does not broadcast"):
        gl.LOSSES[loss](pred, target, sample_weight=np.ones(5))


def test_pos_weight_and_class_weight_shapes():
    with pytest.raises(ValueError, match=r"pos_weight with shape \(2,\)"):
        gl.bce_with_logits(np.zeros((4, 3)), np.zeros((4, 3)), pos_weight=np.ones(2))
    with pytest.raises(ValueError, match=r"class_weight must have shape \(3,\).*got \(4,\)"):
        gl.cce_with_logits(np.zeros((4, 3)), np.zeros(4, int), class_weight=np.ones(4))


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize("loss", ["bce_with_logits", "cce_with_logits"])
def test_label_smoothing_outside_unit_interval(loss, value):
    pred, target = _valid(loss)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        gl.LOSSES[loss](pred, target, label_smoothing=value)


@pytest.mark.parametrize("value", [0.0, 0.5, -1e-3, 2.0])
@pytest.mark.parametrize("loss", ["bce", "cce"])
def test_eps_outside_open_interval(loss, value):
    pred, target = _valid(loss)
    with pytest.raises(ValueError, match=r"eps must lie in \(0.0, 0.5\)"):
        gl.LOSSES[loss](pred, target, eps=value)


@pytest.mark.parametrize("loss", ALL)
def test_options_a_loss_does_not_take(loss):
    pred, target = _valid(loss)
    bad = "pos_weight" if loss != "bce_with_logits" else "class_weight"
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{bad}'"):
        gl.LOSSES[loss](pred, target, **{bad: 1.0})


def test_ignore_index_needs_integer_targets():
    with pytest.raises(ValueError, match="ignore_index applies only to integer"):
        gl.cce_with_logits(np.zeros((2, 3)), np.full((2, 3), 1 / 3), ignore_index=0)
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        gl.cce_with_logits(np.zeros((2, 3)), np.zeros(2, int), ignore_index=1.5)


# ---------------------------------------------------------------------------------------------
# data-dependent errors (validate=True)


@pytest.mark.parametrize("bad", [-0.25, 1.5])
def test_bce_domain(bad):
    p = np.array([0.2, bad, 0.7])
    y = np.array([0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"pred must hold probabilities in \[0, 1\]; found"):
        gl.bce(p, y)
    with pytest.raises(ValueError, match=r"target must hold targets in \[0, 1\]"):
        gl.bce(y.clip(0.1, 0.9), p)
    with pytest.raises(ValueError, match=r"target must hold targets in \[0, 1\]"):
        gl.bce_with_logits.grad(np.zeros(3), p)
    # validate=False gives a number (or NaN), never an error
    gl.bce(p, y, validate=False)


def test_cce_domain():
    p = np.array([[0.5, 0.6, -0.1]])
    with pytest.raises(ValueError, match="pred must hold probabilities"):
        gl.cce(p, np.array([0]))
    with pytest.raises(ValueError, match="target must hold probabilities"):
        gl.cce_with_logits(np.zeros((1, 3)), np.array([[1.5, -0.5, 0.0]]))


@pytest.mark.parametrize("loss", LABELED)
def test_class_index_out_of_range(loss):
    pred, _ = _valid(loss)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\], outside \[0, 2\]"):
        gl.LOSSES[loss](pred, np.array([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"\(or ignore_index=-100\)"):
        gl.LOSSES[loss](pred, np.array([0, -1, -100, 0]), ignore_index=-100)
    # the ignored label itself is fine
    gl.LOSSES[loss](pred, np.array([0, -100, 2, 0]), ignore_index=-100)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
@pytest.mark.parametrize("loss", ALL)
def test_negative_or_nan_weights(loss, bad):
    pred, target = _valid(loss)
    w = np.ones(4 if loss in CATEGORICAL else 3)
    w[1] = bad
    with pytest.raises(ValueError, match="sample_weight must be non-negative and not NaN"):
        gl.LOSSES[loss](pred, target, sample_weight=w)
    if loss in LABELED:
        with pytest.raises(ValueError, match="class_weight must be non-negative"):
            gl.LOSSES[loss](pred, target, class_weight=np.array([1.0, bad, 1.0]))
    if loss == "bce_with_logits":
        with pytest.raises(ValueError, match="pos_weight must be non-negative"):
            gl.LOSSES[loss](pred, target, pos_weight=np.array([1.0, bad, 1.0]))


def test_the_same_errors_from_the_generic_backend(xp):
    p = to_xp(xp, np.array([0.2, 1.5, 0.7]))
    y = to_xp(xp, np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="pred must hold probabilities"):
        gl.bce(p, y)
    z = to_xp(xp, np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\]"):
        gl.cce_with_logits(z, to_xp(xp, np.array([0, 1, 5, 0])))
    with pytest.raises(ValueError, match="sample_weight must be non-negative"):
        gl.mse(p, y, sample_weight=to_xp(xp, np.array([1.0, -1.0, 1.0])))
    with pytest.raises(TypeError, match="pred"):
        gl.mse(to_xp(xp, np.array([1, 2, 3])), y)


# ---------------------------------------------------------------------------------------------
# libraries and devices


def test_arrays_from_different_libraries():
    torch = require("torch")
    with pytest.raises(TypeError, match="pred is a numpy array, target is a torch array"):
        gl.mse(np.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="different libraries"):
        gl.mse(torch.zeros(3), np.zeros(3))


def test_arrays_on_different_devices():
    torch = require("torch")
    with pytest.raises(ValueError, match="different devices.*meta"):
        gl.mse(torch.zeros(3), torch.zeros(3, device="meta"))


def test_masked_arrays_are_refused():
    with pytest.raises(TypeError, match="masked array"):
        gl.mse(np.ma.masked_array([1.0, 2.0], mask=[0, 1]), np.zeros(2))


# ---------------------------------------------------------------------------------------------
# names and degenerate inputs


def test_an_unknown_loss_name_lists_the_names_and_suggests_one():
    names = ", ".join(gl.LOSSES)
    with pytest.raises(KeyError, match=rf"No loss named 'crossentropy'; the losses are {names}\. "
                                       r"Did you mean 'cce_with_logits'\?"):
        gl.LOSSES["crossentropy"]
    with pytest.raises(KeyError, match="Did you mean 'bce_with_logits'"):
        gl.LOSSES["bce_logit"]
    with pytest.raises(KeyError, match=r"multiclass_hinge\.\"?$"):  # nothing close: no guess
        gl.LOSSES["qqqq"]
    assert gl.LOSSES.get("qqqq") is None and "mse" in gl.LOSSES


@pytest.mark.parametrize("loss", ALL)
def test_none_is_named_as_none(loss):
    pred, target = _valid(loss)
    with pytest.raises(TypeError, match="Expected pred to be an array or a number, got "
                                        "NoneType None"):
        gl.LOSSES[loss](None, target)
    with pytest.raises(TypeError, match="Expected target to be an array or a number, got "
                                        "NoneType None"):
        gl.LOSSES[loss](pred, None)


@pytest.mark.parametrize("loss", LABELED)
def test_no_classes_says_so(xp, loss):
    pred, target = to_xp(xp, np.zeros((2, 0))), to_xp(xp, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"pred has no classes \(its class axis has length "
                                         r"0\), so no class index is valid") as info:
        gl.LOSSES[loss](pred, target)
    assert "[0, -1]" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# messages that say what to do (issue "Fast at the batch sizes people train with", item 4)


@pytest.mark.parametrize("entry", ["call", "grad", "value_and_grad"])
def test_a_positional_option_says_options_are_keyword_only(entry):
    fn = gl.huber if entry == "call" else getattr(gl.huber, entry)
    with pytest.raises(TypeError, match=r"keyword-only: huber\(pred, target, delta=2.0\)"):
        fn(np.zeros(3), np.zeros(3), 2.0)


def test_weight_points_to_class_weight_and_sample_weight():
    with pytest.raises(TypeError, match="class_weight=.*sample_weight="):
        gl.cce_with_logits(np.zeros((2, 3)), np.array([0, 1]), weight=np.ones(3))


def test_labels_of_minus_100_get_a_hint_to_pass_ignore_index():
    with pytest.raises(ValueError, match="pass ignore_index=-100"):
        gl.cce_with_logits(np.zeros((2, 3)), np.array([1, -100]))
    # with the option given, no error and the sample is skipped
    assert float(gl.cce_with_logits(np.zeros((2, 3)), np.array([1, -100]), ignore_index=-100)) \
        == pytest.approx(np.log(3))


def test_cce_with_logits_documents_every_option():
    doc = gl.cce_with_logits.__doc__
    for name in gl.cce_with_logits.options:
        if name not in ("reduction", "sample_weight", "validate"):
            assert f"{name} :" in doc, name
