"""The delegation layer: argument checks, option defaults and routing to a backend.

Everything a backend receives has been checked here, except what needs the data itself
(probabilities in [0, 1], labels in range, non-negative weights): backends check that inside
their one pass and raise with the helpers at the end of this module.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _dispatch

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = ("float16", "float32", "float64")


@dataclass(frozen=True)
class Call:
    """One checked call, as the backends see it.

    `axis` is non-negative and only meaningful for cce*; `labels` says that a cce* target
    holds class indices; `eps` is resolved to a number for bce/cce and None otherwise.
    With `parts` (always with reduction "mean") the value is the float64 pair
    [Σ w·l, Σ of the mean's weights], the state that streaming and Dask add up.
    """

    loss: str
    pred: Any
    target: Any
    reduction: str
    sample_weight: Any = None
    pos_weight: Any = None
    class_weight: Any = None
    ignore_index: int | None = None
    label_smoothing: float = 0.0
    axis: int = -1
    eps: float | None = None
    validate: bool = True
    labels: bool = False
    want_value: bool = True
    want_grad: bool = False
    parts: bool = False  # return [Σ w·l, the mean's denominator] (float64) as the value

    def with_arrays(self, convert) -> Call:
        """This call with `convert` applied to every array it holds (absent ones stay None):
        how a backend views another library's arrays as its own."""
        fields = ("pred", "target", "sample_weight", "pos_weight", "class_weight")
        return dataclasses.replace(
            self, **{f: None if getattr(self, f) is None else convert(getattr(self, f))
                     for f in fields})

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one loss per sample: pred's shape, without the class axis for cce*."""
        shape = tuple(self.pred.shape)
        if self.loss.startswith("cce"):
            return shape[: self.axis] + shape[self.axis + 1 :]
        return shape


# ---------------------------------------------------------------------------------------------
# dtype helpers, valid for NumPy dtypes and for any array-API namespace


def dtype_kind(xp, dtype) -> str:
    """One of 'bool', 'int', 'float', 'complex', 'other'."""
    if isinstance(dtype, np.dtype):
        return {"b": "bool", "i": "int", "u": "int", "f": "float", "c": "complex"}.get(
            dtype.kind, "other"
        )
    for kind, name in (
        ("bool", "bool"),
        ("integral", "int"),
        ("real floating", "float"),
        ("complex floating", "complex"),
    ):
        try:
            if xp.isdtype(dtype, kind):
                return name
        except (TypeError, ValueError):
            break
    return "other"


def dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]  # torch.float32, array_api_strict.float32 -> float32


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_pred(pred, xp, loss):
    kind = dtype_kind(xp, pred.dtype)
    if kind != "float" or dtype_name(pred.dtype) not in _FLOAT_DTYPES:
        msg = (
            f"Expected pred to have a real floating dtype (float16, float32 or float64), "
            f"got {dtype_name(pred.dtype)}."
        )
        raise TypeError(msg)
    if loss.startswith("cce") and pred.ndim < 1:
        msg = f"{loss} needs pred with a class axis (ndim >= 1), got a 0-d array."
        raise ValueError(msg)


def _check_real(x, name, xp):
    kind = dtype_kind(xp, x.dtype)
    if kind not in ("bool", "int", "float"):
        msg = f"Expected {name} to have a real numeric dtype, got {dtype_name(x.dtype)}."
        raise TypeError(msg)


def _check_broadcastable(x, name, shape, what):
    xs = _shape(x)
    ok = len(xs) <= len(shape) and all(
        a == 1 or a == b for a, b in zip(reversed(xs), reversed(shape))
    )
    if not ok:
        msg = f"{name} with shape {xs} does not broadcast to {what} {shape}."
        raise ValueError(msg)


def _check_reduction(reduction):
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        msg = f"reduction must be one of 'mean', 'sum', 'none'; got {reduction!r}."
        raise ValueError(msg)


def _check_axis(axis, ndim):
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        msg = f"axis must be an integer, got {type(axis).__name__} {axis!r}."
        raise TypeError(msg)
    if not -ndim <= axis < ndim:
        msg = f"axis {axis} is out of range for pred with {ndim} dimension(s)."
        raise ValueError(msg)
    return int(axis) % ndim


def _check_number(value, name, lo, hi, closed):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a real number, got {type(value).__name__} {value!r}."
        raise TypeError(msg)
    value = float(value)
    inside = (lo <= value <= hi) if closed else (lo < value < hi)
    if not inside:
        interval = f"[{lo}, {hi}]" if closed else f"({lo}, {hi})"
        msg = f"{name} must lie in {interval}; got {value!r}."
        raise ValueError(msg)
    return value


def _check_ignore_index(ignore_index):
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        msg = (
            f"ignore_index must be an integer or None, got "
            f"{type(ignore_index).__name__} {ignore_index!r}."
        )
        raise TypeError(msg)
    ignore_index = int(ignore_index)
    if not -(2**63) <= ignore_index < 2**63:  # class indices are at most int64
        msg = f"ignore_index must fit in int64 (as class indices do), got {ignore_index}."
        raise ValueError(msg)
    return ignore_index


def prepare(loss, pred, target, options, *, want_value, want_grad, parts=False) -> Call:
    """Check every argument that can be checked without reading the data."""
    pred = _dispatch.as_array(pred, "pred")
    xp_pred = None if isinstance(pred, np.ndarray) else _dispatch.array_namespace(pred, {})
    arrays = {"target": target}
    for key in ("sample_weight", "pos_weight", "class_weight"):
        if options.get(key) is not None:
            arrays[key] = options[key]
    arrays = {k: _dispatch.as_array(v, k, like=pred, xp=xp_pred) for k, v in arrays.items()}
    xp = _dispatch.array_namespace(pred, arrays)

    _check_pred(pred, xp, loss)
    target = arrays["target"]
    _check_real(target, "target", xp)
    reduction = options.get("reduction", "mean")
    _check_reduction(reduction)
    validate = options.get("validate", True)
    if not isinstance(validate, bool):
        msg = f"validate must be True or False, got {validate!r}."
        raise TypeError(msg)

    shape = _shape(pred)
    fields: dict[str, Any] = {}
    if loss.startswith("cce"):
        axis = _check_axis(options.get("axis", -1), len(shape))
        sample_shape = shape[:axis] + shape[axis + 1 :]
        kind = dtype_kind(xp, target.dtype)
        if kind == "int":
            if _shape(target) != sample_shape:
                msg = (
                    f"Shape mismatch: integer (class index) target must have pred's shape "
                    f"without axis {axis}, i.e. {sample_shape}; got target shape "
                    f"{_shape(target)} for pred shape {shape}."
                )
                raise ValueError(msg)
            fields["labels"] = True
        elif kind == "float":
            if _shape(target) != shape:
                hint = (
                    " (class indices need an integer dtype)"
                    if _shape(target) == sample_shape
                    else ""
                )
                msg = (
                    f"Shape mismatch: pred has shape {shape}, target has shape "
                    f"{_shape(target)}; probability targets must match pred{hint}."
                )
                raise ValueError(msg)
        else:
            msg = (
                f"Expected target to hold class indices (integer dtype) or probabilities "
                f"(floating dtype), got {dtype_name(target.dtype)}."
            )
            raise TypeError(msg)
        fields["axis"] = axis
        ignore_index = _check_ignore_index(options.get("ignore_index"))
        if ignore_index is not None and not fields.get("labels"):
            msg = (
                "ignore_index applies only to integer (class index) targets; "
                f"target has dtype {dtype_name(target.dtype)}."
            )
            raise ValueError(msg)
        fields["ignore_index"] = ignore_index
        class_weight = arrays.get("class_weight")
        if class_weight is not None:
            _check_real(class_weight, "class_weight", xp)
            if _shape(class_weight) != (shape[axis],):
                msg = (
                    f"class_weight must have shape ({shape[axis]},) (one weight per class), "
                    f"got {_shape(class_weight)}."
                )
                raise ValueError(msg)
            fields["class_weight"] = class_weight
    else:
        sample_shape = shape
        if _shape(target) != shape:
            msg = f"Shape mismatch: pred has shape {shape}, target has shape {_shape(target)}."
            raise ValueError(msg)

    sample_weight = arrays.get("sample_weight")
    if sample_weight is not None:
        _check_real(sample_weight, "sample_weight", xp)
        what = "the per-sample shape" if loss.startswith("cce") else "pred's shape"
        _check_broadcastable(sample_weight, "sample_weight", sample_shape, what)
        fields["sample_weight"] = sample_weight
    pos_weight = arrays.get("pos_weight")
    if pos_weight is not None:
        _check_real(pos_weight, "pos_weight", xp)
        _check_broadcastable(pos_weight, "pos_weight", shape, "pred's shape")
        fields["pos_weight"] = pos_weight
    if "label_smoothing" in options:
        fields["label_smoothing"] = _check_number(
            options["label_smoothing"], "label_smoothing", 0.0, 1.0, closed=True
        )
    if loss in ("bce", "cce"):
        eps = options.get("eps")
        if eps is None:
            eps = float(np.finfo(dtype_name(pred.dtype)).eps)
        fields["eps"] = _check_number(eps, "eps", 0.0, 0.5, closed=False)

    return Call(
        loss=loss,
        pred=pred,
        target=target,
        reduction="mean" if parts else reduction,
        validate=validate,
        want_value=want_value,
        want_grad=want_grad,
        parts=parts,
        **fields,
    )


# ---------------------------------------------------------------------------------------------
# data-dependent errors, raised by the backends


def raise_outside_unit_interval(name, what, lo, hi):
    msg = f"{name} must hold {what} in [0, 1]; found values in [{lo:.6g}, {hi:.6g}]."
    raise ValueError(msg)


def raise_bad_labels(lo, hi, num_classes, ignore_index):
    ignored = "" if ignore_index is None else f" (or ignore_index={ignore_index})"
    if num_classes == 0:
        msg = (
            f"target holds class indices in [{lo}, {hi}], but pred has no classes (its class "
            f"axis has length 0), so no class index is valid{ignored}."
        )
        raise ValueError(msg)
    msg = (
        f"target holds class indices in [{lo}, {hi}], outside [0, {num_classes - 1}]{ignored} "
        f"for pred with {num_classes} classes."
    )
    raise ValueError(msg)


def raise_bad_weights(name, lo, hi):
    msg = (
        f"{name} must be non-negative and not NaN or infinite; found values in "
        f"[{lo:.6g}, {hi:.6g}]."
    )
    raise ValueError(msg)


def weights_ok(lo: float, hi: float) -> bool:
    """The weights' rule (as scikit-learn's): every weight finite and >= 0 (NaN fails)."""
    return lo >= 0 and hi < float("inf")


# ---------------------------------------------------------------------------------------------
# the public loss objects


_COMMON = ("reduction", "sample_weight", "validate")


class Loss:
    """A loss function with three entry points: call, `.grad` and `.value_and_grad`.

    All three take the same arguments; `.value_and_grad` returns ``(loss, grad)`` from one
    pass over the data.
    """

    def __init__(self, name: str, options: tuple[str, ...], doc: str):
        self.name = name
        self.options = _COMMON + options
        self.__doc__ = doc
        self.__name__ = self.__qualname__ = name
        self.__module__ = "gpuloss"
        params = [
            inspect.Parameter("pred", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("target", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        ] + [
            inspect.Parameter(o, inspect.Parameter.KEYWORD_ONLY, default=_DEFAULTS[o])
            for o in self.options
        ]
        self.__signature__ = inspect.Signature(params)
        self.grad = self._entry_point("grad", want_value=False, want_grad=True)
        self.value_and_grad = self._entry_point("value_and_grad", want_value=True, want_grad=True)

    def __call__(self, pred, target, **options):
        return self._run(pred, target, options, want_value=True, want_grad=False)[0]

    def __repr__(self):
        return f"<gpuloss loss {self.name!r}>"

    def __reduce__(self):  # pickles by name, so partial states and workers share one object
        return (_by_name, (self.name,))

    def _entry_point(self, method, *, want_value, want_grad):
        def entry(pred, target, **options):
            value, grad = self._run(
                pred, target, options, want_value=want_value, want_grad=want_grad
            )
            return (value, grad) if want_value else grad

        what = "the loss and its gradient" if want_value else "the gradient"
        entry.__name__ = method
        entry.__qualname__ = f"{self.name}.{method}"
        entry.__module__ = "gpuloss"
        entry.__signature__ = self.__signature__
        entry.__doc__ = (
            f"Return {what} of :func:`gpuloss.{self.name}` with respect to pred.\n\n"
            f"Takes exactly the arguments of ``gpuloss.{self.name}``. The gradient has pred's "
            "shape, dtype, library and device, and is the derivative of exactly what the call "
            "returns (for reduction='none', of the sum of the returned array)."
        )
        return entry

    def prepare(self, pred, target, options, *, want_value, want_grad) -> Call:
        """The checked call of one entry point (an unknown option is a TypeError)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            msg = (
                f"{self.name}() got an unexpected keyword argument {unknown[0]!r}; "
                f"it accepts {', '.join(self.options)}."
            )
            raise TypeError(msg)
        return prepare(
            self.name, pred, target, options, want_value=want_value, want_grad=want_grad
        )

    def _run(self, pred, target, options, *, want_value, want_grad):
        call = self.prepare(pred, target, options, want_value=want_value, want_grad=want_grad)
        return _dispatch.backend_for(call.pred)(call)


_DEFAULTS = {
    "reduction": "mean",
    "sample_weight": None,
    "validate": True,
    "pos_weight": None,
    "class_weight": None,
    "ignore_index": None,
    "label_smoothing": 0.0,
    "axis": -1,
    "eps": None,
}


def _by_name(name):
    from . import LOSSES

    return LOSSES[name]
