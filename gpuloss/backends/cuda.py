"""CUDA backend: the fused kernels of kernels/gpuloss_kernels.cu, launched through CuPy.

The common call (no options, any dtype, mean, sum or none) is one kernel launch: the
elementwise kernel, templated on the loss's functor, writes the gradient and one float64
partial per block, and the last block to finish adds the partials in a fixed order
(bit-identical run to run; no float atomics) and writes the value. Categorical losses run one
row kernel whose threads keep the row in registers (K up to 8192 in float32 with class
indices, see row_configs; larger rows are read twice),
finished the same way. Which functor a loss uses, its scalar parameters and its domain rules
come with the call (from the loss's declaration): nothing here names a loss. A call's
`grad_out` receives the gradient where it can (pred itself included: written in place, see
_grad_buffer); `parts` with reduction "sum" give [Σ w·l, D] and the gradient of the sum.

Per call: one zeroed int32 buffer (a memset, no kernel) holds the value, the error flags and
the count of blocks done. With validate=True the host reads it once, after the launch (the
flags and the value in one transfer; the only synchronisation), and raises before returning;
with validate=False nothing is read back. The value is a device view of that buffer. Options
add launches before the pass: gpuloss_check per weight array (validated as stored), a device
cast of a target or weight of another dtype, a copy of non-contiguous data (a class axis
other than the last), and CuPy reductions for a mean's denominator
that the gradient needs before the pass (a sample_weight's sum; with labels and class_weight,
sample_weight or ignore_index, the counted weights' sum) and for class weights' scale; none of
them waits on the host. CuPy is imported only when a CuPy (or CUDA DLPack) array arrives; the
source and the list of kernel instantiations are importable without it, for the CPU-side
checks.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import ml_dtypes
import numpy as np

from .. import _call

OPTIONS = ("-std=c++17",)
BLOCK_THREADS = 256  # = GL_BLOCK_THREADS, the kernels' __launch_bounds__
_F16, _F32, _F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
# bfloat16 is ml_dtypes' NumPy dtype: CuPy arrays have it from CuPy 14 on (with ml_dtypes
# installed); torch and JAX tensors reach it through their 16-bit integer views
BF16 = np.dtype(ml_dtypes.bfloat16)
_NULL = np.uint64(0)  # a null pointer argument for an absent optional array

# C types the kernels are instantiated for; other dtypes are cast first
C_TYPE = {
    _F16: "unsigned short",  # float16 travels as its bit pattern
    BF16: "gl_bf16",  # so does bfloat16, in a type of its own
    _F32: "float",
    _F64: "double",
    np.dtype(np.int32): "int",
    np.dtype(np.int64): "long long",
    np.dtype(np.bool_): "unsigned char",
    np.dtype(np.uint8): "unsigned char",
}
PRED_DTYPES = (_F16, BF16, _F32, _F64)
TARGET_DTYPES = (_F16, _F32, _F64, np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.bool_))
LABEL_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))  # read as they are (one instantiation:
# the row kernel reads int32 labels through its int64 pointer by a launch flag)
RULE_CODE = {None: 0, _call.UNIT: 1, _call.NONNEG: 2, _call.SIGN: 3}  # = GL_RULE_*
# The row kernel's layouts, (threads per row, values cached per thread): rows up to threads *
# cache are read once. Small rows share a warp (no idle lanes at K = 10) in one instantiation
# whose threads per row (4 to 32, SMALL_ROW_THREADS) are chosen at launch (template value 0)
# and which caches 4 values; large rows get a warp or a whole block, whose cache holds 32
# registers' worth of 4-byte values (CACHE_REGISTERS): 32 logits beside class indices, 16
# logits and 16 target values beside probabilities, half as many in float64 (the kernels then
# fit their registers without spilling; see benchmarks/results/kernel-resources-*.json).
# Beyond the cache the row is read twice (cache 0).
SMALL_ROW_THREADS = (4, 8, 16, 32)
SMALL_CACHE = 4
CACHE_REGISTERS = 32
# the kernels' GL_FLAG_* bits
FLAG_PRED, FLAG_TARGET, FLAG_SAMPLE_WEIGHT, FLAG_LABEL = 1, 2, 4, 8
FLAG_POS_WEIGHT, FLAG_CLASS_WEIGHT = 16, 32
# the int32 words of the per-call `state` buffer (= GL_STATE_*): the reduced value (16 bytes,
# at the start so that its view is aligned), the error flags, the count of blocks done
STATE_WORDS, STATE_VALUE_WORDS, STATE_FLAGS = 6, 4, 4
MEAN_PARTS = 2  # = GL_MEAN_PARTS: the value is [sum, denominator] in float64
SUM_PARTS = 3  # = GL_SUM_PARTS: the same value, and the gradient of the sum (not divided by D)
WEIGHT_FLAGS = {"sample_weight": FLAG_SAMPLE_WEIGHT, "pos_weight": FLAG_POS_WEIGHT,
                "class_weight": FLAG_CLASS_WEIGHT}


def kernel_dir() -> Path:
    """kernels/ inside the installed package (wheel) or beside it (source tree, editable)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "kernels", package.parent / "kernels"):
        if (candidate / "gpuloss_math.cuh").is_file():
            return candidate
    msg = f"gpuloss kernel sources not found next to {package}; the installation is incomplete."
    raise FileNotFoundError(msg)


@functools.cache
def kernel_source() -> str:
    """The one translation unit the kernels compile from: the math header, then the kernels."""
    folder = kernel_dir()
    header = (folder / "gpuloss_math.cuh").read_text()
    kernels = (folder / "gpuloss_kernels.cu").read_text()
    return kernels.replace('#include "gpuloss_math.cuh"', header.replace("#pragma once", ""))


def target_dtypes(pred_dtype) -> tuple:
    """The target dtypes the elementwise kernel reads as they are beside `pred_dtype`; others
    are converted on the device first. A bfloat16 target is read as such only beside a
    bfloat16 pred (the training case), which keeps the number of instantiations down."""
    return TARGET_DTYPES + ((BF16,) if np.dtype(pred_dtype) == BF16 else ())


def probability_target_dtypes(pred_dtype) -> tuple:
    """The dtypes the row kernel reads probability targets in beside `pred_dtype`: its own,
    and float32 beside a 16-bit pred, so that a wider target is not rounded to 16 bits
    (softmax − t cancels: t's rounding would show in the gradient)."""
    pred_dtype = np.dtype(pred_dtype)
    return (pred_dtype, _F32) if pred_dtype.itemsize == 2 else (pred_dtype,)


def compute_type(dtype) -> np.dtype:
    return _F64 if np.dtype(dtype) == _F64 else _F32


def elementwise_name(functor, pred_dtype, target_dtype) -> str:
    tp, ty = C_TYPE[np.dtype(pred_dtype)], C_TYPE[np.dtype(target_dtype)]
    return f"gpuloss_elementwise<{functor}, {tp}, {ty}>"


def check_name(weights: bool, dtype) -> str:
    return f"gpuloss_check<{int(weights)}, {C_TYPE[np.dtype(dtype)]}>"


def rows_name(functor, labels, config, pred_dtype, target_dtype) -> str:
    threads, cache = config
    tp = C_TYPE[np.dtype(pred_dtype)]
    tt = "long long" if labels else C_TYPE[np.dtype(target_dtype)]  # (int32 too: a flag)
    return f"gpuloss_rows<{functor}, {int(labels)}, {threads}, {cache}, {tp}, {tt}>"


def all_kernel_names() -> list[str]:
    """Every instantiation the backend can launch for the declared losses (the CPU tests
    compile each one)."""
    names = []
    for functor in _call.declared_kernels(_call.ELEMENTWISE):
        for p in PRED_DTYPES:
            for y in target_dtypes(p):
                if y != np.bool_ or _call.takes_bool_targets(functor):
                    names.append(elementwise_name(functor, p, y))
    names += [check_name(w, d) for w in (True, False) for d in PRED_DTYPES]
    for functor in _call.declared_kernels(_call.CATEGORICAL):
        labels = LABEL_DTYPES[-1:] if _call.takes_labels(functor) else ()
        for p in PRED_DTYPES:
            names += [rows_name(functor, True, config, p, t)
                      for config in row_configs(p, True, functor) for t in labels]
            if _call.takes_probabilities(functor):
                names += [rows_name(functor, False, config, p, t)
                          for config in row_configs(p, False, functor)
                          for t in probability_target_dtypes(p)]
    return names


def _template_args(name: str) -> tuple[str, list[str]]:
    template, args = name.split("<", 1)
    return template, [a.strip() for a in args.rstrip(">").split(",")]


def _c_types(args: list[str]) -> list[str]:
    """The template arguments that are data types (not numbers, not a loss's functor)."""
    return [a for a in args if not a.isdigit() and not a.startswith("Gl")]


def kernel_group(name: str) -> str:
    """The module a kernel is compiled in, so that one NVRTC run builds the variants a
    workload needs (about a second; CuPy's disk cache keeps it across processes) and a run
    over everything compiles each variant once: for the row kernels, one functor variant,
    target kind and data type with its row layouts; for the elementwise kernel, one loss and
    pred type with its target types; for the others, one data type."""
    template, args = _template_args(name)
    types = _c_types(args)
    if template == "gpuloss_rows":
        return f"{template}<{args[0]}, {args[1]}, {', '.join(types)}>"
    if template == "gpuloss_elementwise":
        return f"{template}<{args[0]}, {types[0]}>"
    return f"{template}<{types[0]}>"


def kernel_groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in all_kernel_names():
        groups.setdefault(kernel_group(name), []).append(name)
    return groups


def compute_is_float32(name: str) -> bool:
    """True for kernels whose data (their first type argument) computes in float: float16,
    bfloat16 and float32. Those flush subnormals on the device (CuPy compiles with -ftz=true); float64
    kernels never do."""
    _, args = _template_args(name)
    return _c_types(args)[0] != "double"


def row_configs(pred_dtype=_F32, labels: bool = True,
                functor: str | None = None) -> tuple[tuple[int, int], ...]:
    """The row kernel's layouts for `pred_dtype`, the target's kind and the loss's functor,
    smallest rows first: (template threads per row, values cached per thread), see
    CACHE_REGISTERS."""
    registers = (functor and _call.cache_registers(functor)) or CACHE_REGISTERS
    cache = registers // (1 if labels else 2) // (compute_type(pred_dtype).itemsize // 4)
    warp = ((32, cache),) if 32 * cache > SMALL_ROW_THREADS[-1] * SMALL_CACHE else ()
    return ((0, SMALL_CACHE), *warp, (256, cache), (256, 0))  # (no warp layout that small
    # rows already cover)


def row_config(K: int, pred_dtype=_F32, labels: bool = True,
               functor: str | None = None) -> tuple[int, int]:
    """The row kernel's (template threads per row, cache) for rows of K classes."""
    configs = row_configs(pred_dtype, labels, functor)
    threads, cache = configs[0]  # small rows: staged whole
    if K <= SMALL_ROW_THREADS[-1] * cache:
        return threads, cache
    shift = row_shift(pred_dtype)
    for threads, cache in configs[1:]:
        if cache and K + shift <= threads * cache:
            return threads, cache
    return configs[-1]


def row_shift(pred_dtype) -> int:
    """The most values a warp's or a block's row starts before its first 32-byte sector (the
    kernel's `shift`): that many fewer fit the register cache."""
    return 32 // np.dtype(pred_dtype).itemsize - 1


def row_threads(K: int, pred_dtype=_F32, labels: bool = True,
                functor: str | None = None) -> int:
    """The threads that share one row of K classes at launch."""
    threads, cache = row_config(K, pred_dtype, labels, functor)
    if threads:
        return threads
    return next(t for t in SMALL_ROW_THREADS if K <= t * cache)


# ---------------------------------------------------------------------------------------------
# launching


class CupyRuntime:
    """What the backend needs from the device: an array module, compiled kernels, the grid
    size cap, and a way to read a small array back. The test suite swaps in a CPU emulator
    that runs the same kernels compiled with g++, with NumPy arrays standing in."""

    def __init__(self):
        import cupy

        self.xp = cupy

    def device(self, x):
        return self.xp.cuda.Device(x.device.id)

    def kernel(self, name: str, x):
        return _cupy_kernel(name, x.device.id)

    def grid_cap(self, x) -> int:
        return _grid_cap(x.device.id)

    def to_host(self, x):
        return x.get()

    def astype(self, x, dtype):
        """A cast on the device (CuPy compiles it with -ftz=true, as every kernel)."""
        return x.astype(dtype)


@functools.cache
def _cupy_module(group: str, device_id: int):
    import cupy

    names = kernel_groups()[group]
    return cupy.RawModule(code=kernel_source(), options=OPTIONS, name_expressions=names)


def _cupy_kernel(name: str, device_id: int):
    return _cupy_module(kernel_group(name), device_id).get_function(name)


@functools.cache
def _grid_cap(device_id: int) -> int:
    import cupy

    sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
    return 8 * sms  # enough resident blocks to fill the card; fixed per device


@functools.cache
def _default_runtime():
    return CupyRuntime()


def _raw(x):
    """The array the kernels read: float16 and bfloat16 as their uint16 bits."""
    return x.view(np.uint16) if x.dtype in (_F16, BF16) else x


def _broadcast_pattern(cp, w, shape):
    """(weights, div, mod) with element i of `shape` using weights[(i // div) % mod].

    Works without a copy when the weight's non-unit axes are one contiguous run of the data's
    axes; other broadcasts are materialised once. `w` is already float64.
    """
    padded = (1,) * (len(shape) - w.ndim) + tuple(w.shape)
    axes = [i for i, s in enumerate(padded) if s != 1]
    if not axes:
        return cp.ascontiguousarray(w.reshape(1)), 1, 1
    first, last = axes[0], axes[-1]
    if all(padded[i] == shape[i] for i in range(first, last + 1)):
        div = math.prod(shape[last + 1 :])
        mod = math.prod(shape[first : last + 1])
        return cp.ascontiguousarray(w).reshape(-1), div, mod
    full = cp.ascontiguousarray(cp.broadcast_to(w, shape)).reshape(-1)
    return full, 1, full.size


def _device_sum(cp, x):
    """Σ x in float64 as a one-element device array, for a kernel to read (no host wait)."""
    return cp.sum(x, dtype=np.float64, keepdims=True).reshape(1)


def _blocks_for(rt, count: int, per_block: int, x) -> int:
    return max(1, min(-(-count // per_block), rt.grid_cap(x)))


def _check_stored(rt, call, a, weights: bool, bit: int, flags, rule=_call.UNIT):
    """Launch gpuloss_check on `a` as stored (before any conversion, which would flush float32
    subnormals on the device): weights, or values against `rule`; integer and boolean arrays
    are checked as float64 (exact)."""
    cp = rt.xp
    if a.size == 0:
        return
    if a.dtype not in PRED_DTYPES:
        a = a.astype(_F64)
    a = cp.ascontiguousarray(a).reshape(-1)
    rt.kernel(check_name(weights, a.dtype), call.pred)(
        (_blocks_for(rt, a.size, BLOCK_THREADS, call.pred),),
        (BLOCK_THREADS,),
        (_raw(a), np.int64(a.size), np.int32(0 if weights else RULE_CODE[rule]), np.int32(bit),
         flags),
    )


def _weights(rt, call, name, shape, flags):
    """The weight option `name` as float64 on the device, as (weights, div, mod) for `shape`
    (null when absent), validated as stored when asked."""
    w = getattr(call, name)
    if w is None:
        return _NULL, 1, 1
    w = rt.xp.asarray(w)
    if call.validate:
        _check_stored(rt, call, w, True, WEIGHT_FLAGS[name], flags)
    if w.dtype != _F64:
        w = rt.astype(w, _F64)  # float32 subnormals flush here on the device
    if shape is None:  # class_weight: one per class, as it is
        return rt.xp.ascontiguousarray(w), 1, w.size
    return _broadcast_pattern(rt.xp, w, shape)


def compute(call: _call.Call, runtime=None):
    rt = runtime or _default_runtime()
    try:
        with rt.device(call.pred):
            if call.categorical:
                return _categorical(rt, call)
            return _elementwise(rt, call)
    except (TypeError, ValueError):
        raise  # the caller's arguments or data: already explained
    except Exception as exc:
        explained = explain_device_error(exc, call)
        if explained is exc:
            raise
        raise explained from exc


def explain_device_error(exc: BaseException, call: _call.Call) -> BaseException:
    """A clear error for what went wrong on the device side, saying what is missing and what
    to do; other exceptions come back unchanged."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    where = f"gpuloss.{call.loss} on pred {tuple(call.pred.shape)} {call.pred.dtype}"
    if name == "OutOfMemoryError":
        return MemoryError(
            f"Out of GPU memory in {where}: {text} Score the data in chunks with "
            "gpuloss.StreamingLoss (or `gpuloss score --chunk-size ROWS`), or release CuPy's "
            "cached blocks with cupy.get_default_memory_pool().free_all_blocks()."
        )
    if name == "CompileException" or "nvrtc" in text.lower():
        return RuntimeError(
            f"gpuloss could not compile its CUDA kernels with NVRTC ({text}). Install the NVRTC "
            "library that matches CuPy (CUDA 12: pip install nvidia-cuda-nvrtc-cu12; CUDA 13: "
            "pip install nvidia-cuda-nvrtc) or a CUDA toolkit. NumPy inputs are not affected."
        )
    if isinstance(exc, OSError) and ("cache" in text.lower() or
                                     isinstance(exc, PermissionError)):
        import os

        folder = os.environ.get("CUPY_CACHE_DIR", "~/.cupy/kernel_cache")
        return RuntimeError(
            f"CuPy could not write its kernel cache in {folder} ({text}). Set CUPY_CACHE_DIR to "
            "a writable folder."
        )
    if name in ("CUDARuntimeError", "CUDADriverError"):
        return RuntimeError(
            f"The CUDA device failed in {where}: {text}. Check the GPU and its driver "
            "(nvidia-smi); NumPy inputs are not affected."
        )
    return exc


def _wants_sum(call) -> bool:
    return call.want_value and call.reduction != "none"


def _state(cp, call):
    """The call's zeroed int32 state buffer (a memset, no kernel), null when neither a flag nor
    a reduced value is wanted."""
    return cp.zeros(STATE_WORDS, np.int32) if call.validate or _wants_sum(call) else _NULL


def _flags(call, state):
    """The flag word of `state`, for gpuloss_check (null without validation)."""
    return state[STATE_FLAGS : STATE_FLAGS + 1] if call.validate else _NULL


def _partials(cp, call, nblocks):
    """One float64 partial per block, when a sum is wanted (null otherwise)."""
    return cp.empty(nblocks, np.float64) if _wants_sum(call) else _NULL


def _mean_code(call) -> np.int32:
    """The kernels' `mean`: 0 a sum, 1 a mean, MEAN_PARTS [sum, denominator] (a mean's
    gradient), SUM_PARTS the same value with the sum's gradient (parts with reduction "sum")."""
    if call.parts:
        return np.int32(SUM_PARTS if call.reduction == "sum" else MEAN_PARTS)
    return np.int32(call.reduction == "mean")


def _needs_denominator(call) -> bool:
    """A mean divides by it; a partial state ([sum, denominator]) reports it."""
    return call.reduction == "mean" or call.parts


def _address(x) -> int:
    """Where an array's data starts (CuPy: its device pointer; NumPy, the emulator's arrays)."""
    if isinstance(x, np.ndarray):
        return x.ctypes.data
    return int(x.data.ptr)


def _grad_buffer(cp, call, data, moved):
    """The caller's `grad_out` as the kernel's gradient buffer, or None where a new one is
    needed. `data` is the contiguous array the kernel reads the predictions from, `moved` turns
    grad_out into its layout (the class axis last). grad_out serves where that view is
    C-contiguous with pred's dtype and either shares no memory with `data` or is exactly it:
    the gradient then overwrites the predictions, which every kernel layout allows (each value
    is read by the thread that writes its gradient, before it writes it; see gpuloss_rows).
    Not in place where a validation error would show pred's range (read after the launch)."""
    out = call.grad_out
    if out is None or out.dtype != call.pred.dtype or tuple(out.shape) != tuple(call.pred.shape):
        return None
    view = moved(out)
    if not view.flags.c_contiguous:
        return None
    lo, hi = _address(view), _address(view) + view.nbytes
    d_lo, d_hi = _address(data), _address(data) + data.nbytes
    overlaps = lo < d_hi and d_lo < hi  # then only the very same memory serves
    if overlaps and ((lo, hi) != (d_lo, d_hi) or (call.validate and call.pred_rule)):
        return None
    return view


def _result(rt, call, state, per):
    """Read the flags and the reduced value in one transfer where validate=True (raising on a
    flagged error), and return the value: a device view of `state`, or `per` for "none"."""
    if call.validate:
        _raise_flags(rt.xp, call, int(rt.to_host(state)[STATE_FLAGS]))
    if call.reduction == "none":
        return per
    if not call.want_value:
        return None
    value = state[:STATE_VALUE_WORDS].view(_F64 if call.parts else call.pred.dtype)
    return value[:2] if call.parts else value[:1].reshape(())


def _params(call, count):
    """The functor's scalar parameters as `count` float64 kernel arguments (0 where unused)."""
    values = tuple(call.kernel_params) + (0.0,) * (count - len(call.kernel_params))
    if len(values) != count:
        msg = f"{call.loss} declares {len(call.kernel_params)} kernel parameters; at most {count}"
        raise ValueError(msg)
    return [np.float64(v) for v in values]


def _elementwise(rt, call):
    cp = rt.xp
    shape = tuple(call.pred.shape)
    n = math.prod(shape)
    cdt = compute_type(call.pred.dtype)
    state = _state(cp, call)
    flags = _flags(call, state)
    p = cp.ascontiguousarray(call.pred)
    y = call.target
    target_rule = RULE_CODE[call.target_rule] if call.validate else 0
    if y.dtype not in target_dtypes(call.pred.dtype):  # others: exact in the compute type,
        if target_rule:  # except 16-bit subnormals the device's cast flushes: checked first
            _check_stored(rt, call, y, False, FLAG_TARGET, flags, call.target_rule)
            target_rule = 0
        y = rt.astype(y, cdt)
    y = cp.ascontiguousarray(y)
    w, w_div, w_mod = _weights(rt, call, "sample_weight", shape, flags)
    pw, pw_div, pw_mod = _weights(rt, call, "pos_weight", shape, flags)
    denom, denom_dev = float(n), _NULL
    if call.sample_weight is not None and _needs_denominator(call):
        denom = float(n // max(w.size, 1)) if w.size else 0.0
        denom_dev = _device_sum(cp, w)
    pred_rule = RULE_CODE[call.pred_rule] if call.validate else 0
    grad = out = None
    if call.want_grad:  # grad_out where it serves (elementwise: thread i reads i, writes i)
        out = _grad_buffer(cp, call, p, lambda g: g)
        grad = cp.empty(shape, call.pred.dtype) if out is None else out
    per = cp.empty(shape, call.pred.dtype) if call.want_value and call.reduction == "none" \
        else None
    nblocks = _blocks_for(rt, n, BLOCK_THREADS, call.pred)
    partials = _partials(cp, call, nblocks)
    if n or _wants_sum(call):  # no data: one block still writes the empty sum
        rt.kernel(elementwise_name(call.kernel, p.dtype, y.dtype), call.pred)(
            (nblocks,),
            (BLOCK_THREADS,),
            (_raw(p), _raw(y), w, np.int64(w_div), np.int64(w_mod), pw, np.int64(pw_div),
             np.int64(pw_mod), np.int64(n), _mean_code(call),
             np.float64(denom), denom_dev, *_params(call, 4), np.int32(pred_rule),
             np.int32(target_rule),
             _raw(grad) if grad is not None else _NULL, _raw(per) if per is not None else _NULL,
             partials, state),
        )
    if out is not None:
        grad = call.grad_out  # written into: the caller's own array back
    return _result(rt, call, state, per), grad


def _categorical(rt, call):
    cp = rt.xp
    K = call.pred.shape[call.axis]
    z = cp.moveaxis(call.pred, call.axis, -1)
    sample_shape = tuple(z.shape[:-1])
    rows = math.prod(sample_shape)
    z = cp.ascontiguousarray(z)
    state = _state(cp, call)
    flags = _flags(call, state)
    check = 0
    if call.validate:
        check = FLAG_LABEL | (FLAG_PRED if call.pred_rule == _call.UNIT else 0)
    if call.labels:
        t = call.target
        if t.dtype not in LABEL_DTYPES:
            if t.dtype == np.uint64 and t.size:  # would wrap to negative: one host read
                _call.check_labels_fit_int64(int(rt.to_host(t.max())))
            t = t.astype(np.int64)
        t = cp.ascontiguousarray(t)
    else:
        t = cp.moveaxis(call.target, call.axis, -1)
        check_target = call.validate and call.target_rule == _call.UNIT
        if t.dtype not in probability_target_dtypes(z.dtype):
            # converted on the device (to float32 beside a 16-bit pred, float16 and bfloat16
            # exactly): checked as stored, beforehand
            if check_target:
                _check_stored(rt, call, t, False, FLAG_TARGET, flags)
            t = rt.astype(t, probability_target_dtypes(z.dtype)[-1])
        elif check_target:
            check |= FLAG_TARGET
        t = cp.ascontiguousarray(t)
    sw, sw_div, sw_mod = _weights(rt, call, "sample_weight", sample_shape, flags)
    cw, _, _ = _weights(rt, call, "class_weight", None, flags)
    denom, denom_dev = float(rows), _NULL
    if _needs_denominator(call):
        denom, denom_dev = _denominator(cp, call, t, K, sw, sw_div, sw_mod, cw, rows)
    cw_scale = cw_sum_dev = _NULL
    if call.class_weight is not None and cw.size:
        cw, cw_scale = _scaled_class_weights(cp, cw)
        if call.labels and call.label_smoothing:
            cw_sum_dev = _device_sum(cp, cw)
    grad_full = out = None
    if call.want_grad:  # grad_out where it serves, possibly z itself (in place)
        out = _grad_buffer(cp, call, z, lambda g: cp.moveaxis(g, call.axis, -1))
        grad_full = cp.empty(z.shape, call.pred.dtype) if out is None else out
    per = (
        cp.empty(sample_shape, call.pred.dtype)
        if call.want_value and call.reduction == "none"
        else None
    )
    config = row_config(K, z.dtype, call.labels, call.kernel)
    threads = row_threads(K, z.dtype, call.labels, call.kernel)
    per_block = BLOCK_THREADS // threads
    nblocks = _blocks_for(rt, rows, per_block, call.pred)
    partials = _partials(cp, call, nblocks)
    has_ignore = call.ignore_index is not None
    if rows or _wants_sum(call):  # no rows: one block still writes the empty sum
        rt.kernel(rows_name(call.kernel, call.labels, config, z.dtype, t.dtype), call.pred)(
            (nblocks,),
            (BLOCK_THREADS,),
            (_raw(z), _raw(t), np.int64(rows), np.int64(K), np.int32(threads),
             np.int32(call.labels and t.dtype == np.int32), sw, np.int64(sw_div),
             np.int64(sw_mod), cw, cw_scale, cw_sum_dev,
             np.int64(call.ignore_index if has_ignore else 0),
             np.int32(has_ignore), np.float64(call.label_smoothing),
             _mean_code(call), np.float64(denom), denom_dev,
             *_params(call, 3), np.int32(check),
             _raw(grad_full) if grad_full is not None else _NULL,
             _raw(per) if per is not None else _NULL, partials, state),
        )
    grad = None if grad_full is None else cp.moveaxis(grad_full, -1, call.axis)
    if out is not None:
        grad = call.grad_out  # written into: the caller's own array back
    return _result(rt, call, state, per), grad


def _scaled_class_weights(cp, cw):
    """(class weights / scale, scale) with the scale a one-element device array: their largest
    magnitude where it lies outside [1e-30, 1e30] (finite and > 0), else 1, as the CPU backend
    rescales them. The row kernel multiplies each row's weight by the scale in double, so that
    no class weight over- or underflows in the compute type. No host wait."""
    top = cp.max(cp.abs(cw), keepdims=True).reshape(1)  # abs: negative ones (validate=False)
    odd = cp.isfinite(top) & (top > 0) & ((top < 1e-30) | (top > 1e30))
    scale = cp.where(odd, top, 1.0)
    return cw / scale, scale


def _denominator(cp, call, t, K, sw, sw_div, sw_mod, cw, rows):
    """The mean's denominator, as (host factor, device scalar or null): never a host wait.
    Weights are float64 here (see _weights)."""
    if not call.labels:
        if call.sample_weight is None:
            return float(rows), _NULL
        return float(rows // max(sw.size, 1)), _device_sum(cp, sw)
    if call.sample_weight is None and call.class_weight is None and call.ignore_index is None:
        return float(rows), _NULL
    w = cp.ones(t.shape, np.float64)
    if call.ignore_index is not None:
        w = w * (t != call.ignore_index)
    if call.class_weight is not None:
        # with no classes every counted label is invalid (NaN, or an error): nothing to gather
        w = w * cw[cp.clip(t, 0, K - 1)] if K else w * 0.0
    if call.sample_weight is not None:
        idx = (cp.arange(rows) // sw_div) % sw_mod
        w = w * sw[idx].reshape(t.shape)
    return 1.0, _device_sum(cp, w)


def _raise_flags(cp, call, flags: int):
    """Turn the kernels' error bits into the same errors as the CPU backends (the ranges
    shown are computed only here, on the failure path)."""
    if not flags:
        return

    def rng(x):
        x = x.astype(_F64)  # nanmin/nanmax of any dtype (on a GPU the cast flushes subnormals)
        return float(cp.nanmin(x)), float(cp.nanmax(x))

    for name, bit in WEIGHT_FLAGS.items():
        if flags & bit:
            w = getattr(call, name).astype(_F64)
            _call.raise_bad_weights(name, float(cp.min(w)), float(cp.max(w)))
    if flags & FLAG_LABEL:
        t = call.target
        counted = t if call.ignore_index is None else t[t != call.ignore_index]
        K = call.pred.shape[call.axis]
        _call.raise_bad_labels(int(counted.min()), int(counted.max()), K, call.ignore_index)
    for name, bit, rule in (("pred", FLAG_PRED, call.pred_rule),
                            ("target", FLAG_TARGET, call.target_rule)):
        if flags & bit:
            x = getattr(call, name)
            if rule == _call.SIGN:  # one value that is neither -1 nor +1
                bad = x[(x != 1) & (x != -1)].astype(_F64)
                value = float(bad[~cp.isnan(bad)][0])  # NaN passes: it propagates
                _call.raise_domain(call, name, rule, value, value)
            _call.raise_domain(call, name, rule, *rng(x))


# ---------------------------------------------------------------------------------------------
# PyTorch, JAX and other CUDA arrays: through DLPack, no copy


def compute_foreign(call: _call.Call):
    """Run a call whose arrays live on a CUDA device but are not CuPy arrays: view them as
    CuPy arrays through DLPack (no copy) and hand the results back in the caller's library.

    PyTorch tensors are detached first (torch refuses to export a tensor that requires grad),
    and the kernels run on torch's current stream, so that torch's caching allocator cannot
    hand an input's memory to other work while a kernel still reads it. bfloat16 tensors go
    as their int16 views (no copy; DLPack's bfloat16 is not in every version on either side)
    and come back the same way."""
    import contextlib

    import array_api_compat
    import cupy as cp

    is_torch = array_api_compat.is_torch_array(call.pred)
    for name, x in (("pred", call.pred), ("target", call.target)):
        if str(x.dtype).endswith("bfloat16") and not cupy_has_bfloat16():
            msg = (f"bfloat16 {name} on a CUDA device needs CuPy 14 or later (with ml_dtypes, "
                   f"installed with gpuloss); this CuPy is {cp.__version__}. Upgrade CuPy, or "
                   f"cast it first, e.g. {name}.float().")
            raise TypeError(msg)
    xp = array_api_compat.array_namespace(call.pred)
    inner = call.with_arrays(lambda x: _as_cupy(cp, x))
    if call.grad_out is not None:  # the same memory, seen by CuPy (pred's too, where it is pred)
        object.__setattr__(inner, "grad_out", _as_cupy(cp, call.grad_out))
    stream = contextlib.nullcontext()
    if is_torch:
        import torch

        current = torch.cuda.current_stream(call.pred.device)
        stream = cp.cuda.ExternalStream(current.cuda_stream, inner.pred.device.id)
    with stream:
        value, grad = compute(inner)

    def back(x):
        if x is None:
            return None
        return to_torch(x) if is_torch else xp.from_dlpack(x)

    if grad is not None and grad is inner.grad_out:
        return back(value), call.grad_out  # written into: the caller's own array back
    return back(value), back(grad)


def to_torch(x):
    """A CuPy array as a torch tensor on the same memory (bfloat16 through its int16 view)."""
    import torch

    if x.dtype == BF16:
        return torch.from_dlpack(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(x)


def _as_cupy(cp, x):
    """A CUDA array of another library as a CuPy array on the same memory."""
    if hasattr(x, "detach"):  # torch
        import torch

        x = x.detach()
        if x.dtype == torch.bfloat16:
            return cp.from_dlpack(x.view(torch.int16)).view(BF16)
    return cp.from_dlpack(x)


@functools.cache
def cupy_has_bfloat16() -> bool:
    """Whether CuPy knows ml_dtypes' bfloat16 (CuPy 14 and later)."""
    import cupy as cp

    try:
        cp.empty(0, BF16)
    except (TypeError, ValueError, NotImplementedError):
        return False
    return True
