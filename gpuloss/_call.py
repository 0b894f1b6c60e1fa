"""What the backends see of a call: the checked `Call`, the domain rules, the kernels that
exist, and the errors that need the data to be raised.

This module imports nothing of gpuloss, so that every backend can import it (and only it)
without an import circle: the checks that need no data live in `gpuloss._api`, the losses'
declarations in `gpuloss.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ELEMENTWISE = "elementwise"  # one loss per element (mse, huber, bce, ...)
CATEGORICAL = "categorical"  # one loss per sample over a class axis (cce, ...)

# Domain rules a backend checks on the values as stored (validate=True); NaN always passes,
# it propagates instead of raising.
UNIT = "unit"  # in [0, 1]
NONNEG = "nonneg"  # >= 0 (-0 included)
SIGN = "sign"  # exactly -1 or +1
RULES = (UNIT, NONNEG, SIGN)


@dataclass(frozen=True)
class Call:
    """One checked call, as the backends see it.

    `family` says how to lay the data out; `kernel` names the loss's functor in
    kernels/gpuloss_math.cuh and `kernel_params` its scalar parameters (as float64, in the
    functor's order); `options` holds the loss's own checked scalar options by name (what the
    NumPy and array-API formulas read). `pred_rule`/`target_rule` are the domain rules to check
    when `validate`. `axis` is non-negative and only meaningful for the categorical family;
    `labels` says that a categorical target holds class indices; `eps` is the clipping bound
    of bce/cce (None otherwise). With `parts` (reduction "mean", or "sum") the value is the
    float64 pair [Σ w·l, Σ of the mean's weights], the state that streaming and Dask add up;
    the gradient is the mean's with "mean" and that of Σ w·l with "sum" (a chunk of a larger
    mean, which the caller divides by the whole denominator: linear cross-entropy's chunks).
    `grad_out`, where given, is the buffer the gradient is written to (pred's shape and dtype,
    C-contiguous); it may be pred itself: the gradient then replaces the values it is computed
    from (linear cross-entropy's chunk of logits). A backend that cannot write in place
    ignores it and returns a new array.
    """

    loss: str
    pred: Any
    target: Any
    reduction: str
    family: str = ELEMENTWISE
    kernel: str = ""
    kernel_params: tuple[float, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    pred_rule: str | None = None
    target_rule: str | None = None
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
    grad_out: Any = None  # where to write the gradient (may be pred itself)

    def with_arrays(self, convert) -> Call:
        """This call with `convert` applied to every array it holds (absent ones stay None):
        how a backend views another library's arrays as its own."""
        copy = self._shallow_copy()
        for f in ("pred", "target", "sample_weight", "pos_weight", "class_weight", "grad_out"):
            x = getattr(self, f)
            if x is not None:
                object.__setattr__(copy, f, convert(x))
        return copy

    def with_data(self, pred, target) -> Call:
        """This call on other pred and target arrays of the same library, device, dtype and
        shape (the checks `gpuloss._api.prepare` made hold for them too)."""
        copy = self._shallow_copy()
        object.__setattr__(copy, "pred", pred)
        object.__setattr__(copy, "target", target)
        return copy

    def _shallow_copy(self) -> Call:
        """A copy holding the same objects: what copy.copy makes, without its __reduce_ex__
        (2 us of a 10 us call; dataclasses.replace re-runs __init__, slower still)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        return copy

    @property
    def categorical(self) -> bool:
        return self.family == CATEGORICAL

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one loss per sample: pred's shape, without the class axis if categorical."""
        shape = tuple(self.pred.shape)
        if self.categorical:
            return shape[: self.axis] + shape[self.axis + 1 :]
        return shape


# ---------------------------------------------------------------------------------------------
# the kernels every declared loss needs, so that the CUDA backend can compile them all


_KERNELS: dict[str, dict] = {}  # functor -> {"family", "bool_targets", "labels",
# "probabilities", "cache_registers"}


def declare_kernel(functor: str, family: str, *, bool_targets: bool = True,
                   labels: bool = True, probabilities: bool = True,
                   cache_registers: int | None = None) -> None:
    """Record that a loss computes with `functor` (called by each loss's declaration).
    `bool_targets` is False where boolean targets are converted before the kernel (the
    hinge losses' -1/+1 labels), `labels` False for a categorical loss that takes no class
    indices (kl_div), `probabilities` False for one that takes only class indices
    (multiclass_hinge): no kernel is built for those. `cache_registers` overrides the row
    kernel's register cache (gpuloss.backends.cuda.CACHE_REGISTERS) where ptxas would spill."""
    _KERNELS[functor] = {"family": family, "bool_targets": bool_targets, "labels": labels,
                         "probabilities": probabilities, "cache_registers": cache_registers}


def declared_kernels(family: str) -> list[str]:
    """The functors of `family`, in the order the losses were declared."""
    return [f for f, d in _KERNELS.items() if d["family"] == family]


def takes_bool_targets(functor: str) -> bool:
    return _KERNELS[functor]["bool_targets"]


def takes_labels(functor: str) -> bool:
    return _KERNELS[functor]["labels"]


def takes_probabilities(functor: str) -> bool:
    return _KERNELS[functor]["probabilities"]


def cache_registers(functor: str) -> int | None:
    return _KERNELS[functor]["cache_registers"]


# ---------------------------------------------------------------------------------------------
# data-dependent errors, raised by the backends


# Each message is a template with {lo} and {hi} left to fill: the eager backends format the
# values they read, the JAX checks under a trace hand the template to checkify.


def domain_message(call: Call, name: str, rule: str) -> str:
    """The error for `name` (pred or target) breaking `rule`; {lo} and {hi} are its range (for
    SIGN, {lo} is one value that is neither -1 nor +1)."""
    if rule == UNIT:
        what = "probabilities" if name == "pred" or call.categorical else "targets"
        return f"{name} must hold {what} in [0, 1]; found values in [{{lo}}, {{hi}}]."
    if rule == NONNEG:
        return f"{call.loss} needs {name} >= 0; found values in [{{lo}}, {{hi}}]."
    # SIGN: lo is one offending value (a range says nothing here: 0 lies inside [-1, 1])
    return (
        f"{call.loss} needs {name} labels in {{{{-1, +1}}}} (or a boolean array); found {{lo}}. "
        f"Convert 0/1 labels with 2 * y - 1 (or pass them as booleans)."
    )


def raise_domain(call: Call, name: str, rule: str, lo: float, hi: float):
    raise ValueError(domain_message(call, name, rule).format(lo=f"{lo:.6g}", hi=f"{hi:.6g}"))


def labels_message(num_classes, ignore_index) -> str:
    """The error for class indices out of range; {lo} and {hi} are the counted labels' range."""
    ignored = "" if ignore_index is None else f" (or ignore_index={ignore_index})"
    if num_classes == 0:
        return (
            f"target holds class indices in [{{lo}}, {{hi}}], but pred has no classes (its "
            f"class axis has length 0), so no class index is valid{ignored}."
        )
    return (
        f"target holds class indices in [{{lo}}, {{hi}}], outside [0, {num_classes - 1}]"
        f"{ignored} for pred with {num_classes} classes."
    )


def raise_bad_labels(lo, hi, num_classes, ignore_index):
    msg = labels_message(num_classes, ignore_index).format(lo=lo, hi=hi)
    if ignore_index is None and int(lo) == -100:  # PyTorch's default ignore_index
        msg += (" Labels of -100 mark samples to skip in PyTorch (its default ignore_index): "
                "pass ignore_index=-100.")
    raise ValueError(msg)


INT64_MAX = 2**63 - 1


def check_labels_fit_int64(hi: int):
    """Class indices are int64 inside gpuloss: an unsigned label beyond that is refused (cast,
    it would wrap to a negative number, which ignore_index=-1 would silently skip)."""
    if hi > INT64_MAX:
        msg = (f"target holds the class index {hi}, which does not fit in int64 (class indices "
               f"are at most {INT64_MAX}).")
        raise ValueError(msg)


def weights_message(name) -> str:
    return (
        f"{name} must be non-negative and not NaN or infinite; found values in "
        f"[{{lo}}, {{hi}}]."
    )


def raise_bad_weights(name, lo, hi):
    raise ValueError(weights_message(name).format(lo=f"{lo:.6g}", hi=f"{hi:.6g}"))


def weights_ok(lo: float, hi: float) -> bool:
    """The weights' rule (as scikit-learn's): every weight finite and >= 0 (NaN fails)."""
    return lo >= 0 and hi < float("inf")
