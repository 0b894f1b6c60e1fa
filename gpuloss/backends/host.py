"""CPU backend, compiled: the common calls on NumPy data in one pass of C++ (kernels/
gpuloss_host.cpp, built on first use by gpuloss._host_build).

It takes what a training loop calls most, float32 or float64 data with no weight arrays:
- every elementwise loss up to a few thousand elements (beyond, NumPy's SIMD ufuncs on
  every core are faster), through the CUDA kernels' own functors;
- cce_with_logits with class indices (int64 or int32), the class axis last, with or without
  ignore_index, and no class weights, label smoothing, z-loss, soft-capping or focal term.

`compute` returns None for any other call, and for a call whose data break a check (a label
out of range, a probability outside [0, 1]): the NumPy backend then computes it, or raises
its error with its message. Below a few microseconds of work the cost of a call is its
Python, so the checks here are a handful of attribute reads.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

from .. import _call, _host_build, _pool, _torch_build

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_LABELS = {np.dtype(np.int64): 0, np.dtype(np.int32): 1}
_RULES = {None: 0, _call.UNIT: 1, _call.NONNEG: 2, _call.SIGN: 3}  # GL_RULE_*
# Above these sizes the NumPy backend (SIMD ufuncs, blocks on every core) beats the one-thread
# C++ loop over the functors (benchmarks/results/small-batch-bars-amd-epyc-2core-2026-12-06.json:
# mse level at 2^16 elements (0.85-1.20x at 2^18 over runs), bce_with_logits 5x at 2^16, since a
# functor that calls libm's exp or log costs about 20 ns an element on the dev VM): the
# compiled path is for small calls
ELEMENTWISE_MAX = 1 << 14
LIBM_FUNCTORS = frozenset({"GlBce", "GlBceLogits<0>", "GlBceLogits<1>", "GlLogCosh",
                           "GlPoissonNll"})
LIBM_ELEMENTWISE_MAX = 1 << 10

_index: dict[str, int] = {}  # functor -> its row in the extension's table
_params: dict[tuple, bytes] = {}  # kernel parameters as the extension reads them


def compute(call: _call.Call):
    """(value, gradient) of the checked `call`, or None where the NumPy backend computes it."""
    mod = _host_build.module()
    if mod is None:
        return None
    p = call.pred
    dtype = p.dtype
    # (builtin dtypes are singletons: a byte-swapped float32 is another dtype, and NumPy's)
    if (dtype is not _F32 and dtype is not _F64) or p.size == 0 or not p.flags.aligned:
        return None
    if call.sample_weight is not None or call.pos_weight is not None:
        return None
    if call.categorical:
        return _cce_labels(mod, call)
    return _elementwise(mod, call)


def _contiguous(x):
    """x, or a C-contiguous copy: the results must not depend on the layout (the NumPy
    backend, which takes every layout, copies blocks the same way)."""
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _elementwise_limit(functor: str) -> int:
    return LIBM_ELEMENTWISE_MAX if functor in LIBM_FUNCTORS else ELEMENTWISE_MAX


def _rules(call) -> tuple[int, int]:
    """pred's and target's domain rules as the extension takes them (0: not checked)."""
    if not call.validate:
        return 0, 0
    return _RULES[call.pred_rule], _RULES[call.target_rule]


def _elementwise(mod, call):
    p, y = call.pred, call.target
    if p.size > _elementwise_limit(call.kernel):
        return None
    p = _contiguous(p)
    if y.dtype != p.dtype:  # targets in the compute dtype, as every backend takes them
        if y.dtype.kind not in "biuf":
            return None
        converted = y.astype(p.dtype)
        # a rule judges the values as stored, and the cast may round a value into the rule's
        # range (1 + 1e-12 to 1.0f): judged here on the original, the NumPy backend raises
        if call.validate and call.target_rule and not _obeys(call.target_rule, y, converted):
            return None
        y = converted
    y = _contiguous(y)
    if not y.flags.aligned:  # (the C++ reads whole values)
        return None
    index = _kernel_index(mod, call.kernel)
    if index is None:
        return None
    params = _kernel_params(call.kernel_params)
    n = p.size
    mean = call.reduction == "mean"
    grad = np.empty(p.shape, p.dtype) if call.want_grad else None
    per_elem = (np.empty(p.shape, p.dtype)
                if call.want_value and call.reduction == "none" else None)
    want_sum = call.want_value and call.reduction != "none"
    total = mod.elementwise(index, dtype_is_f64(p), p, y, grad, per_elem, n,
                            1.0 / n if mean else 1.0, params, *_rules(call), want_sum)
    if type(total) is int:  # a value outside the loss's domain: the NumPy backend raises
        return None
    return _value(call, total, float(n), per_elem), grad


def _kernel_index(mod, functor: str) -> int | None:
    """The functor's row in the extension's table (None: not compiled)."""
    if not _index:
        _index.update((name, i) for i, name in enumerate(mod.ELEMENTWISE))
    return _index.get(functor)


def _kernel_params(values: tuple) -> bytes:
    """A loss's kernel parameters as the extension reads them: four float64 values."""
    params = _params.get(values)
    if params is None:
        if len(_params) >= 256:  # (bounded: a schedule of option values stays small)
            _params.clear()
        padded = np.zeros(4, np.float64)
        padded[: len(values)] = values
        params = _params.setdefault(values, padded.tobytes())
    return params


def _obeys(rule, stored, converted) -> bool:
    if rule == _call.SIGN:
        return np.array_equal(stored, converted)  # exactly +-1 before and after
    lo = np.fmin.reduce(stored, axis=None)  # (NaN passes every rule: it propagates)
    hi = np.fmax.reduce(stored, axis=None)
    return not (lo < 0 or (rule == _call.UNIT and hi > 1))


def _cce_takes(call) -> bool:
    """Whether the row kernel computes the categorical `call`: cce_with_logits with class
    indices along the last axis, and none of the options it leaves to the NumPy backend."""
    return (call.labels and call.kernel.startswith("GlCceLogits<")
            and call.axis == call.pred.ndim - 1 and call.class_weight is None
            and not call.label_smoothing and not any(call.kernel_params)
            and call.options.get("softcap") is None)


def _cce_labels(mod, call):
    if not _cce_takes(call):
        return None
    p, y = call.pred, call.target
    label_code = _LABELS.get(y.dtype)
    if label_code is None:
        if y.dtype.kind not in "iu" or y.dtype.itemsize >= 8:  # (uint64: the NumPy backend)
            return None
        y, label_code = y.astype(np.int64), 0
    K = p.shape[-1]
    if K >= 1 << 31:  # (the row kernel's positions are 32-bit lanes)
        return None
    if call.grad_out is None:
        p = _contiguous(p)
    elif not p.flags.c_contiguous:
        return None
    y = _contiguous(y)
    if not y.flags.aligned:
        return None
    R = p.size // K
    grad = None
    if call.want_grad:
        grad = call.grad_out if call.grad_out is not None else _pool.empty(p.shape, p.dtype)
    per_sample = (np.empty(p.shape[:-1], p.dtype)
                  if call.want_value and call.reduction == "none" else None)
    want_sum = call.want_value and call.reduction != "none"
    # grad may be pred itself (linear cross-entropy's chunks): each row is read before its
    # gradient is written
    out = mod.cce_labels(dtype_is_f64(p), label_code, p, y, grad, per_sample, R, K,
                         call.ignore_index, call.validate, call.reduction == "mean", want_sum,
                         *_threads(p.size))
    if type(out) is int:  # a label out of range: the NumPy backend raises
        return None
    total, denom = out
    return _value(call, total, denom, per_sample), grad


# From this many values a row pass is split over threads (whole blocks of rows; the result does
# not depend on how many): below, waking a helper costs more than it saves
THREADS_FROM = 1 << 16
TORCH_THREADS_FROM = 1 << 20  # the same beside PyTorch's threads, without its team (_threads)


def _threads(n: int, torch_pool: bool = False) -> tuple[int, int]:
    """Threads for a pass over n values, and whether they are PyTorch's (1: the OpenMP team
    of the runtime loaded with torch). Below THREADS_FROM values one. Where torch is loaded
    and its team can be used (`_team_ready`), the team: torch.get_num_threads() threads
    (GPULOSS_NUM_THREADS may ask for fewer), on torch tensors and NumPy data alike. Its
    workers spin for a while after each of torch's operators, so they take our blocks at
    once, where a helper of our own pool would wait for the core one of them holds (256 x
    1000 interleaved with F.cross_entropy on the dev VM: 94 us on the team's two threads,
    187 on one, 353 on two of ours). Otherwise our pool, `gpuloss._pool.cpu_threads()`, but
    beside torch tensors (`torch_pool`) one thread below TORCH_THREADS_FROM values (a longer
    pass outlasts their spinning)."""
    if n < THREADS_FROM:
        return 1, 0
    env = os.environ.get("GPULOSS_NUM_THREADS")
    torch = sys.modules.get("torch")
    if torch is not None and _team_ready():
        team = torch.get_num_threads()  # (never more: each is a thread torch runs too)
        return (min(team, _pool.cpu_threads()) if env else team), 1
    if torch_pool and n < TORCH_THREADS_FROM and not env:
        return 1, 0
    return _pool.cpu_threads(), 0


_team_found = None  # whether the extension found torch's OpenMP runtime (asked once)


def _team_ready() -> bool:
    """Whether PyTorch's OpenMP team can take our blocks: its runtime was found (asked once,
    with torch loaded: a failed search costs tens of microseconds) and this process is not a
    fork of the one that imported gpuloss (there the parent's team may not exist)."""
    global _team_found
    if _pool.forked():
        return False
    if _team_found is None:
        mod = _host_build.module()
        _team_found = bool(mod is not None and mod.openmp_team())
    return _team_found


def dtype_is_f64(p) -> int:
    return 1 if p.dtype == _F64 else 0


def _value(call, total: float, denom: float, per_sample, dtype=None):
    """The value as the NumPy backend packages it (gpuloss.backends.numpy._finish): the sum,
    or the mean total / denom formed in float64 and rounded once to pred's dtype (NaN where
    nothing was counted: then every row weighed 0, and so is the total)."""
    if call.parts:
        return np.array([total, denom], dtype=_F64)
    if not call.want_value:
        return None
    if call.reduction == "none":
        return per_sample
    if call.reduction == "mean":
        total = total / denom if denom else math.nan
    return np.array(total, dtype=call.pred.dtype if dtype is None else dtype)


# ---------------------------------------------------------------------------------------------
# torch CPU tensors, through their addresses


_torch_codes: dict = {}  # torch dtype -> the extension's float or label code


def _torch_float_code(call) -> int | None:
    """pred's code (0: float32, 1: float64) where the compiled kernels can read and write the
    call's torch tensors as they are; None otherwise (weights, grad_out, a layout or dtype
    they do not take)."""
    torch = sys.modules["torch"]
    if not _torch_codes:
        _torch_codes.update({torch.float32: 0, torch.float64: 1, torch.int64: 0,
                             torch.int32: 1})
    p, y = call.pred, call.target
    f64 = _torch_codes.get(p.dtype) if p.is_floating_point() else None
    if (f64 is None or not (p.is_cpu and y.is_cpu) or call.sample_weight is not None
            or call.pos_weight is not None or call.grad_out is not None
            or not p.is_contiguous() or not y.is_contiguous() or p.numel() == 0
            or p.data_ptr() % p.element_size() or y.data_ptr() % y.element_size()
            or p.is_neg() or y.is_neg()):
        return None  # (a negative view's memory holds -x: torch's views of it say so)
    return f64


def _torch_label_code(call) -> int | None:
    """The labels' code (0: int64, 1: int32) where the row kernel takes the categorical call
    (`_cce_takes`); None otherwise."""
    y = call.target
    code = None if y.is_floating_point() else _torch_codes.get(y.dtype)
    if code is None or not _cce_takes(call) or call.pred.shape[-1] >= 1 << 31:
        return None
    return code


def compute_torch_graph(call: _call.Call):
    """The value of a categorical `call` on torch CPU tensors with its autograd node, from
    gpuloss's PyTorch operator (kernels/gpuloss_torch.cpp: the row pass of `compute_torch`,
    and a C++ node that keeps the gradient as gpuloss._torch's Python node does). None where
    the operator is not loaded (yet: gpuloss._torch_build builds it in the background) or
    does not take the call: a mean or a sum of `cce_with_logits` with class indices that
    `compute_torch` would take."""
    if not call.categorical or call.reduction == "none" or call.parts or not call.want_value:
        return None
    if _torch_build.unavailable():  # (building, failed or off: not the checks twice a call)
        return None
    if (_torch_float_code(call) is None or _torch_label_code(call) is None
            or _host_build.module() is None):  # (CPU tensors first: no build for CUDA's)
        return None
    op = _torch_build.operator()  # (only a call it takes starts its build)
    if op is None:
        return None
    threads, team = _threads(call.pred.numel(), torch_pool=True)
    # (None where the pass declined: a label out of range, no memory for its scratch)
    return op(call.pred, call.target, call.ignore_index, call.validate,
              call.reduction == "mean", threads, team)


def compute_torch(call: _call.Call):
    """`compute` for a call on torch CPU tensors, read and written through their addresses,
    its results allocated by torch: no NumPy views on the way in or out (a training step's
    loss). None where it does not take the call as it comes; gpuloss._dispatch then hands
    `compute` NumPy views of it (which copies a non-contiguous input, converts a target, ...)."""
    mod = _host_build.module()
    if mod is None:
        return None
    torch = sys.modules["torch"]
    f64 = _torch_float_code(call)
    if f64 is None:
        return None
    p, y = call.pred, call.target
    want_sum = call.want_value and call.reduction != "none"
    none = call.want_value and call.reduction == "none"
    if call.categorical:
        label_code = _torch_label_code(call)
        if label_code is None:
            return None
        K = p.shape[-1]
        grad = torch.empty(p.shape, dtype=p.dtype) if call.want_grad else None
        per = torch.empty(p.shape[:-1], dtype=p.dtype) if none else None
        out = mod.cce_labels(f64, label_code, p.data_ptr(), y.data_ptr(),
                             None if grad is None else grad.data_ptr(),
                             None if per is None else per.data_ptr(), p.numel() // K, K,
                             call.ignore_index, call.validate, call.reduction == "mean",
                             want_sum, *_threads(p.numel(), torch_pool=True))
        if type(out) is int:  # a label out of range: the NumPy backend raises
            return None
        total, denom = out
    else:
        n = p.numel()
        index = _kernel_index(mod, call.kernel)
        if y.dtype != p.dtype or index is None or n > _elementwise_limit(call.kernel):
            return None
        params = _kernel_params(call.kernel_params)
        grad = torch.empty(p.shape, dtype=p.dtype) if call.want_grad else None
        per = torch.empty(p.shape, dtype=p.dtype) if none else None
        total = mod.elementwise(
            index, f64, p.data_ptr(), y.data_ptr(), None if grad is None else grad.data_ptr(),
            None if per is None else per.data_ptr(), n,
            1.0 / n if call.reduction == "mean" else 1.0, params, *_rules(call), want_sum)
        if type(total) is int:  # a value outside the loss's domain: the NumPy backend raises
            return None
        denom = float(n)
    value = per if none else _value(call, total, denom, None,
                                    dtype=np.float64 if f64 else np.float32)
    if value is not None and not none:
        value = torch.from_numpy(value)
    return value, grad
