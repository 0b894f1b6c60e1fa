"""The delegation layer: the Loss objects' machinery, argument checks that need no data, option
defaults and routing to a backend.

Every loss is declared once, in `gpuloss.losses`, as a `Loss` with its family, its options
(`Option`: default, check, doc) and its kernel functor; everything here reads those
declarations. What needs the data itself (probabilities in [0, 1], labels in range,
non-negative weights) is checked by the backends inside their one pass, with the errors of
`gpuloss._call`.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from . import _call, _dispatch, _jax, _torch
from ._call import CATEGORICAL, Call

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")  # bfloat16: float32 compute


# ---------------------------------------------------------------------------------------------
# dtype helpers, valid for NumPy dtypes and for any array-API namespace


# (type, dtype) -> kind, and -> name: a dtype's .name costs microseconds. The type comes first
# so that dtypes of different libraries are never compared (array-api-strict warns)
_KINDS: dict = {}
_NAMES: dict = {}


def dtype_kind(xp, dtype) -> str:
    """One of 'bool', 'int', 'float', 'complex', 'other'."""
    key = (type(dtype), dtype)
    try:
        return _KINDS[key]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype (not cached)
        pass
    kind = _dtype_kind(xp, dtype)
    if isinstance(dtype, np.dtype) or array_api_compat.is_torch_namespace(xp):
        _KINDS[key] = kind  # these libraries' dtypes mean one thing whatever the namespace
    return kind


def _dtype_kind(xp, dtype) -> str:
    if isinstance(dtype, np.dtype):
        if dtype.name == "bfloat16":  # ml_dtypes' bfloat16 (kind 'V' to NumPy)
            return "float"
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
    key = (type(dtype), dtype)
    try:
        return _NAMES[key]
    except (KeyError, TypeError):
        name = str(dtype).rsplit(".", 1)[-1]  # torch.float32, array_api_strict.float32 -> float32
    try:
        _NAMES[key] = name
    except TypeError:
        pass
    return name


def _shape(x) -> tuple[int, ...]:
    if type(x) is np.ndarray:
        return x.shape  # already Python ints
    return tuple(int(d) for d in x.shape)


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_pred(pred, xp, loss: Loss):
    kind = dtype_kind(xp, pred.dtype)
    if kind != "float" or dtype_name(pred.dtype) not in _FLOAT_DTYPES:
        msg = (
            f"Expected pred to have a real floating dtype (float16, bfloat16, float32 or "
            f"float64), "
            f"got {dtype_name(pred.dtype)}."
        )
        raise TypeError(msg)
    _check_class_axis_exists(loss, pred.ndim)


def _check_class_axis_exists(loss, ndim):
    if loss.family == CATEGORICAL and ndim < 1:
        msg = f"{loss.name} needs pred with a class axis (ndim >= 1), got a 0-d array."
        raise ValueError(msg)


def _check_validate(validate):
    if not isinstance(validate, bool):
        msg = f"validate must be True or False, got {validate!r}."
        raise TypeError(msg)


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
        raise TypeError(_traced_option_message("axis", axis) or msg)
    if not -ndim <= axis < ndim:
        msg = f"axis {axis} is out of range for pred with {ndim} dimension(s)."
        raise ValueError(msg)
    return int(axis) % ndim


def _traced_option_message(name, value):
    """The error for an option that arrives as a JAX tracer (None for anything else): an
    option fixes the computation, so it has to be known when jax.jit traces."""
    if not _jax.is_traced(value):
        return None
    return (f"{name} must be a Python value, got a traced JAX value: inside jax.jit an option "
            f"has to be known when tracing. Close over it, or mark it static "
            f"(jax.jit(f, static_argnames=...)).")


def _check_number(value, name, lo, hi, closed, hi_closed=None):
    """A real number in the interval from lo to hi (closed at each finite end as asked; an
    infinite end is open unless hi_closed says otherwise)."""
    hi_closed = (closed and math.isfinite(hi)) if hi_closed is None else hi_closed
    closed = closed and math.isfinite(lo)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a real number, got {type(value).__name__} {value!r}."
        raise TypeError(_traced_option_message(name, value) or msg)
    value = float(value)
    above = value >= lo if closed else value > lo
    below = value <= hi if hi_closed else value < hi
    if not (above and below):  # NaN fails both
        interval = f"{'[' if closed else '('}{lo}, {hi}{']' if hi_closed else ')'}"
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
        raise TypeError(_traced_option_message("ignore_index", ignore_index) or msg)
    ignore_index = int(ignore_index)
    if not -(2**63) <= ignore_index < 2**63:  # class indices are at most int64
        msg = f"ignore_index must fit in int64 (as class indices do), got {ignore_index}."
        raise ValueError(msg)
    return ignore_index


# ---------------------------------------------------------------------------------------------
# options: what a loss accepts, declared once


@dataclass(frozen=True)
class Option:
    """One keyword option of a loss: its default, how it is checked, what it means.

    `kind` says how the option travels: "number" and "bool" are the loss's own scalars (the
    functor's parameters); "array" options are arrays broadcast like pred (pos_weight) or one
    per class (class_weight); the others are the structural options the families share.
    `check(value, pred_dtype_name)` returns the checked value or raises, naming the option.
    """

    name: str
    default: Any
    kind: str
    doc: str
    check: Callable[[Any, str], Any] | None = None


def number(name, default, doc, lo=-math.inf, hi=math.inf, *, closed=True, hi_closed=None):
    """A real-number option in the interval from lo to hi."""
    return Option(name, default, "number", doc,
                  lambda v, _: _check_number(v, name, lo, hi, closed, hi_closed))


def optional_number(name, doc, lo=-math.inf, hi=math.inf, *, closed=True):
    """A real-number option in the interval from lo to hi, or None (the default: not used)."""
    return Option(name, None, "number", doc,
                  lambda v, _: None if v is None else _check_number(v, name, lo, hi, closed))


def flag(name, default, doc):
    """A True/False option."""

    def check(value, _):
        if not isinstance(value, (bool, np.bool_)):
            msg = f"{name} must be True or False, got {value!r}."
            raise TypeError(_traced_option_message(name, value) or msg)
        return bool(value)

    return Option(name, default, "bool", doc, check)


def _finfo(dtype_name_):
    if dtype_name_ == "bfloat16":
        import ml_dtypes

        return ml_dtypes.finfo(ml_dtypes.bfloat16)
    return np.finfo(dtype_name_)


def _clip_eps(value, dtype):
    if value is None:
        value = float(_finfo(dtype).eps)
    return _check_number(value, "eps", 0.0, 0.5, closed=False)


REDUCTION = Option("reduction", "mean", "choice", "mean (default), sum, or none")
SAMPLE_WEIGHT = Option("sample_weight", None, "array", "non-negative weights")
VALIDATE = Option("validate", True, "bool", "check the values' domain")
POS_WEIGHT = Option("pos_weight", None, "array", "weight of the positive term")
CLASS_WEIGHT = Option("class_weight", None, "array", "one weight per class, shape (K,)")
IGNORE_INDEX = Option("ignore_index", None, "int", "with class indices: a label to skip")
AXIS = Option("axis", -1, "int", "the class axis (default -1)")
LABEL_SMOOTHING = Option(
    "label_smoothing", 0.0, "number", "in [0, 1]",
    lambda v, _: _check_number(v, "label_smoothing", 0.0, 1.0, closed=True))
CLIP_EPS = Option("eps", None, "number", "clip probabilities to [eps, 1 - eps]", _clip_eps)
COMMON = (REDUCTION, SAMPLE_WEIGHT, VALIDATE)
_STRUCTURAL = ("reduction", "sample_weight", "validate", "pos_weight", "class_weight",
               "ignore_index", "axis")


def prepare(loss: Loss | str, pred, target, options, *, want_value, want_grad, parts=False,
            grad_out=None) -> Call:
    """Check every argument that can be checked without reading the data. `loss` is a Loss
    or the name of one. `parts` and `grad_out`: see `gpuloss._call.Call`.

    These checks read only the arrays' library, device, dtype and shape and the options: a
    training loop repeats one signature, whose checked call is remembered (without its
    arrays) and handed out again with the new arrays."""
    if isinstance(loss, str):
        loss = _BY_NAME[loss]
    key = _signature(loss, pred, target, options, want_value, want_grad, parts, grad_out)
    if key is not None:
        checked = _PREPARED.get(key)
        if checked is not None:
            return checked.with_data(pred, target)
    call = _prepare(loss, pred, target, options, want_value=want_value, want_grad=want_grad,
                    parts=parts, grad_out=grad_out)
    # (only a call that took pred and target as they came: not lists, not the hinge losses'
    # boolean targets turned into -1/+1)
    if key is not None and call.pred is pred and call.target is target:
        if len(_PREPARED) >= 512:  # (bounded: a loop over many shapes starts afresh)
            _PREPARED.clear()
        _PREPARED[key] = call.with_data(None, None)
    return call


_PREPARED: dict = {}  # signature -> its checked call, arrays left out
_SCALARS = (int, float, bool, str, type(None))


def _signature(loss, pred, target, options, want_value, want_grad, parts, grad_out):
    """What `prepare`'s checks depend on, for NumPy arrays and plain torch tensors with scalar
    options only (an array option is checked against the data's shape); None otherwise."""
    kind = type(pred)
    if type(target) is not kind or grad_out is not None:
        return None
    if kind is np.ndarray:
        device = None
    elif _torch.is_plain_tensor(pred):
        device = (pred.device, target.device)  # (a target elsewhere is refused, every time)
    else:
        return None
    values = tuple(options.values()) if options else ()
    for value in values:
        if type(value) not in _SCALARS:
            return None
    return (loss.name, kind, device, pred.dtype, pred.shape, target.dtype, target.shape,
            want_value, want_grad, parts, tuple(options) if options else (), values,
            tuple(map(type, values)))


def _prepare(loss, pred, target, options, *, want_value, want_grad, parts, grad_out):
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
    _check_validate(validate)

    shape = _shape(pred)
    fields: dict[str, Any] = {}
    if loss.family == CATEGORICAL:
        sample_shape = _check_categorical(loss, shape, target, arrays, options, xp, fields)
    else:
        sample_shape = shape
        if _shape(target) != shape:
            msg = f"Shape mismatch: pred has shape {shape}, target has shape {_shape(target)}."
            raise ValueError(msg)
        if loss.target_rule == _call.SIGN and dtype_kind(xp, target.dtype) == "bool":
            target = xp.astype(target, xp.int8) * 2 - 1  # False -> -1, True -> +1

    sample_weight = arrays.get("sample_weight")
    if sample_weight is not None:
        _check_real(sample_weight, "sample_weight", xp)
        what = "the per-sample shape" if loss.family == CATEGORICAL else "pred's shape"
        _check_broadcastable(sample_weight, "sample_weight", sample_shape, what)
        fields["sample_weight"] = sample_weight
    pos_weight = arrays.get("pos_weight")
    if pos_weight is not None:
        _check_real(pos_weight, "pos_weight", xp)
        _check_broadcastable(pos_weight, "pos_weight", shape, "pred's shape")
        fields["pos_weight"] = pos_weight

    checked, kernel_params, pred_rule, target_rule, functor = _checked_options(
        loss, options, dtype_name(pred.dtype), fields)
    if "eps" in checked and loss.clips:
        fields["eps"] = checked["eps"]
    if "label_smoothing" in checked:
        fields["label_smoothing"] = checked["label_smoothing"]
    return Call(
        loss=loss.name,
        pred=pred,
        target=target,
        reduction="mean" if parts and reduction != "sum" else reduction,
        family=loss.family,
        kernel=functor,
        kernel_params=kernel_params,
        options=checked,
        pred_rule=pred_rule,
        target_rule=target_rule,
        validate=validate,
        want_value=want_value,
        want_grad=want_grad,
        parts=parts,
        grad_out=grad_out,
        **fields,
    )


def check_scalar_options(loss, options, ndim: int, pred_dtype: str) -> None:
    """The checks `prepare` makes on the scalar options alone (no arrays): for the PyTorch
    operator path, whose schema would otherwise convert a wrong type (ignore_index=True
    becoming 1) instead of refusing it."""
    _check_reduction(options.get("reduction", "mean"))
    _check_validate(options.get("validate", True))
    _check_class_axis_exists(loss, ndim)
    if loss.family == CATEGORICAL:
        _check_axis(options.get("axis", -1), ndim)
        _check_ignore_index(options.get("ignore_index"))
    _checked_options(loss, options, pred_dtype, {})  # the loss's own, as `prepare` checks them


def _checked_options(loss, options, pred_dtype, fields):
    """(the loss's own scalar options checked by their declaration (and eps, label_smoothing),
    its kernel parameters, pred's and target's domain rules, the functor variant). Remembered
    per loss and option values (with their types: True is not 1 here), since training loops
    repeat one call."""
    own = loss.own_checks
    values = tuple(options.get(opt.name, opt.default) for opt in own)
    key = (pred_dtype, fields.get("labels"), fields.get("axis"), fields.get("ignore_index"),
           values, tuple(map(type, values)))
    try:
        return loss.checked_cache[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable value (an array, a JAX tracer): check it, keep nothing
        key = None
    checked = {opt.name: opt.check(value, pred_dtype) for opt, value in zip(own, values)}
    for name in ("axis", "ignore_index"):
        if name in fields and name in loss.options:
            checked[name] = fields[name]
    pred_rule = loss.pred_rule(checked) if callable(loss.pred_rule) else loss.pred_rule
    target_rule = loss.target_rule(checked) if callable(loss.target_rule) else loss.target_rule
    if loss.family == CATEGORICAL:  # the declared rule is for probability targets, UNIT unless
        # a callable says otherwise (kl_div's log-probability targets have none)
        if fields.get("labels"):
            target_rule = None
        elif not callable(loss.target_rule) and target_rule is None:
            target_rule = _call.UNIT
    result = (checked, tuple(float(v) for v in loss.kernel_params(checked)), pred_rule,
              target_rule, loss.functor_for(checked, pred_dtype))
    if key is not None and len(loss.checked_cache) < 256:  # bounded: option sweeps stay small
        loss.checked_cache[key] = result
    return result


def _check_categorical(loss, shape, target, arrays, options, xp, fields):
    """The class axis, the target's kind (class indices or probabilities), ignore_index and
    class_weight of a categorical loss; returns the per-sample shape."""
    axis = _check_axis(options.get("axis", -1), len(shape))
    sample_shape = shape[:axis] + shape[axis + 1 :]
    kind = dtype_kind(xp, target.dtype)
    if kind == "int" and not loss.class_indices:
        msg = (
            f"{loss.name} needs probability targets (a floating array of pred's shape), got "
            f"target of dtype {dtype_name(target.dtype)}."
        )
        raise TypeError(msg)
    if kind in ("float", "bool") and not loss.probability_targets:
        msg = (
            f"{loss.name} needs class indices (an integer array of pred's shape without the "
            f"class axis), got target of dtype {dtype_name(target.dtype)}."
        )
        raise TypeError(msg)
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
    return sample_shape


# ---------------------------------------------------------------------------------------------
# the public loss objects

_FLT_TINY = float(np.finfo(np.float32).tiny)  # what a float kernel sees as nonzero
_BY_NAME: dict[str, Loss] = {}  # every declared loss, for unpickling by name


class Loss:
    """A loss function with three entry points: call, `.grad` and `.value_and_grad`.

    All three take the same arguments; `.value_and_grad` returns ``(loss, grad)`` from one
    pass over the data.

    A declaration (see `gpuloss.losses`) gives the loss's `family` (ELEMENTWISE or
    CATEGORICAL), its `kernel` functor in kernels/gpuloss_math.cuh, its own `options` (after
    the common reduction, sample_weight, validate), its domain rules (`pred_rule` may depend
    on the options), and `kernel_params`, the functor's scalar parameters from the checked
    options (default: the "number" and "bool" options in order). `kernel_switches` names the
    functor's compile-time switches (the GL_* bits of its template argument) with, for each,
    when the checked options turn it on: a call compiles and runs only the code of the options
    it uses (focal and z-loss are not in plain cross-entropy's kernel). `cache_registers`
    shrinks the row kernel's register cache for a functor that would spill with the default.

    `naive(p, y)` is the loss and gradient written straight from the formula with whole-array
    NumPy, as a user would (mean reduction, default options): the benchmarks' baseline.
    `torch_peer(F, x, y)` is PyTorch's loss it matches (`F` = torch.nn.functional; mean,
    default options), or None when PyTorch has none: the benchmarks' other contender.
    `aliases` are the names other libraries give it (``"l1_loss"`` for mae).
    `class_indices=False` makes a categorical loss refuse integer targets,
    `probability_targets=False` floating ones;
    `log_probabilities=True` says that pred holds log-probabilities (for the examples the demo
    and the benchmarks make).
    """

    def __init__(self, name: str, *, family: str, kernel: str, options: tuple = (),
                 doc: str, pred_rule=None, target_rule=None, kernel_params=None,
                 kernel_switches=None, cache_registers=None, naive=None, torch_peer=None,
                 aliases=(), class_indices=True,
                 probability_targets=True, log_probabilities=False):
        self.name = name
        self.family = family
        self.kernel = kernel
        self.kernel_switches = dict(kernel_switches or {})  # GL_* name -> predicate, bit by bit
        self.declared = COMMON + tuple(options)
        self.options = tuple(o.name for o in self.declared)
        self.option_set = frozenset(self.options)
        self.pred_rule = pred_rule
        self.target_rule = target_rule
        self.clips = any(o is CLIP_EPS for o in options)
        self.own_checks = tuple(o for o in self.declared
                                if o.check is not None and o.name not in _STRUCTURAL)
        self.checked_cache: dict = {}  # see _checked_options
        own = [o.name for o in options if o.kind in ("number", "bool")]
        self.kernel_params = kernel_params or (lambda o: tuple(float(o[k]) for k in own))
        self.naive = naive
        self.torch_peer = torch_peer
        self.aliases = tuple(aliases)  # what other libraries call it, for a KeyError's hint
        self.class_indices = class_indices  # categorical: integer targets allowed
        self.probability_targets = probability_targets  # categorical: floating targets allowed
        self.log_probabilities = log_probabilities  # pred holds log-probabilities (nll, kl_div)
        self.__doc__ = doc
        self.__name__ = self.__qualname__ = name
        self.__module__ = "gpuloss"
        params = [
            inspect.Parameter("pred", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("target", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        ] + [
            inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default)
            for o in self.declared
        ]
        self.__signature__ = inspect.Signature(params)
        self.grad = self._entry_point("grad", want_value=False, want_grad=True)
        self.value_and_grad = self._entry_point("value_and_grad", want_value=True, want_grad=True)
        for variant in range(1 << len(self.kernel_switches)):  # every switch combination
            _call.declare_kernel(self.functor(variant), family,
                                 bool_targets=target_rule != _call.SIGN,
                                 labels=class_indices, probabilities=probability_targets,
                                 cache_registers=cache_registers)
        _BY_NAME[name] = self

    def __call__(self, pred, target, *positional, **options):
        if positional:
            self._refuse_positional(positional)
        return self._run(pred, target, options, want_value=True, want_grad=False)[0]

    def _refuse_positional(self, positional):
        own = [o for o in self.declared if o.kind == "number"]
        value = positional[0] if isinstance(positional[0], (int, float)) else "..."
        example = f"{own[0].name}={value}" if own else "reduction='sum'"
        msg = (f"{self.name}() got {len(positional)} option(s) by position; options are "
               f"keyword-only: {self.name}(pred, target, {example}).")
        raise TypeError(msg)

    def __repr__(self):
        return f"<gpuloss loss {self.name!r}>"

    def functor(self, switches: int) -> str:
        """The functor's name with its compile-time switches (a bit mask), e.g.
        ``GlCceLogits<2>`` for z-loss without focal; a functor without switches is its name."""
        return f"{self.kernel}<{switches}>" if self.kernel_switches else self.kernel

    def functor_for(self, checked: dict, pred_dtype: str) -> str:
        """The functor variant the checked options need. A switch's predicate gets the options
        and `nonzero`, which says whether a number is nonzero as the kernel computes with it:
        in float (float32 and 16-bit data) a value below float32's smallest normal number is 0
        on the device (rounded, or flushed), and its code must not be switched on for it."""
        if pred_dtype == "float64":
            def nonzero(v):
                return v != 0
        else:
            def nonzero(v):
                return abs(v) >= _FLT_TINY

        bits = sum(1 << i for i, on in enumerate(self.kernel_switches.values())
                   if on(checked, nonzero))
        return self.functor(bits)

    def __reduce__(self):  # pickles by name, so partial states and workers share one object
        return (_by_name, (self.name,))

    def _entry_point(self, method, *, want_value, want_grad):
        def entry(pred, target, *positional, **options):
            if positional:
                self._refuse_positional(positional)
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

    def prepare(self, pred, target, options, *, want_value, want_grad, parts=False) -> Call:
        """The checked call of one entry point (an unknown option is a TypeError)."""
        unknown = sorted(options.keys() - self.option_set) if options else ()
        if unknown:
            msg = (
                f"{self.name}() got an unexpected keyword argument {unknown[0]!r}; "
                f"it accepts {', '.join(self.options)}."
            )
            if unknown[0] == "weight":  # PyTorch's name
                msg += (" PyTorch's weight= is class_weight= here (one weight per class); "
                        "weights per sample or element are sample_weight=.")
            raise TypeError(msg)
        return prepare(
            self, pred, target, options, want_value=want_value, want_grad=want_grad, parts=parts
        )

    def _run(self, pred, target, options, *, want_value, want_grad):
        if _torch.is_tensor(pred):  # autograd, torch.compile, torch.func: gpuloss._torch
            return _torch.run(self, pred, target, options, want_value=want_value,
                              want_grad=want_grad, compute=_compute,
                              compute_graph=_dispatch.graph_on_torch_cpu)
        call = self.prepare(pred, target, options, want_value=want_value, want_grad=want_grad)
        return _dispatch.route(call, rerun=run)(call)


def _compute(call):
    """The checked call, computed by the backend for its arrays."""
    return _dispatch.route(call, rerun=run)(call)


def run(name, pred, target, options, *, want_value, want_grad, parts=False):
    """Check and compute one call of the loss `name` (what Dask runs on each chunk)."""
    call = _BY_NAME[name].prepare(pred, target, options, want_value=want_value,
                                  want_grad=want_grad, parts=parts)
    return _dispatch.route(call, rerun=run)(call)


def _by_name(name):
    return _BY_NAME[name]


_torch.bind(_BY_NAME, run, check_scalar_options)  # (the dict fills as losses are declared)


def declared_aliases() -> dict[str, str]:
    """Every declared loss's other names, mapped to its name."""
    return {alias: loss.name for loss in _BY_NAME.values() for alias in loss.aliases}
