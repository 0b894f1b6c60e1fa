"""What "the CUDA path agrees with the NumPy path" means, for the emulated device
(tests/test_emulated.py) and for a real one (tests/test_gpu.py).

The device computes float16/bfloat16/float32 data in float with flush-to-zero (CuPy compiles every
kernel, its own casts included, with -ftz=true; README "Numerics on the GPU"): a float32
subnormal (|x| < 1.18e-38) counts as zero where it enters float arithmetic, and a subnormal
float32 result becomes zero; bfloat16 has float32's exponent range, so the same holds for it. So the NumPy reference is computed on the inputs as the device
sees them (`device_view`), and float32 results are compared after the same flush. float64
is never flushed. Everything else must agree: NaN and infinities exactly where the reference
has them, finite values within the GPU tests' tolerances, errors of the same type.

What this view does not model: flushing inside the arithmetic. A subnormal intermediate of
normal inputs (a loss term of 1.5 FLT_MIN - FLT_MIN, say) is 0 on the device and stays on the
CPU, where a huge weight (1e30, with reduction "sum" or "none") can lift it back to a normal
number. The fuzz generator can draw such a case, rarely (none in 26,000 random examples);
a disagreement of that form is flush-to-zero, not a defect of either side.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FLT_TINY = float(np.finfo(np.float32).tiny)
BF16 = np.dtype(ml_dtypes.bfloat16)
# bfloat16: both sides round a float32 result once; close results may round apart by one unit
RTOL = {"float16": 5e-3, "bfloat16": 2.0**-7, "float32": 1e-5, "float64": 1e-10}


def _is_float(x) -> bool:
    return isinstance(x, np.ndarray) and (x.dtype.kind == "f" or x.dtype == BF16)


def flush(x, float32_only=True):
    """Subnormal float32 values (or, for any float array with float32_only=False, values
    below float32's smallest normal) replaced by zeros of the same sign."""
    if not _is_float(x):
        return x
    if float32_only and x.dtype not in (np.float32, BF16):
        return x
    wide = x.astype(np.float32) if x.dtype == BF16 else x  # bfloat16: float32's range
    with np.errstate(invalid="ignore"):
        tiny = np.abs(wide) < FLT_TINY
    if not tiny.any():
        return x
    return np.where(tiny, np.copysign(np.zeros((), wide.dtype), wide), wide).astype(x.dtype)


def device_view(pred, target, opts):
    """(pred, target, opts) as a float32 kernel computes with them: pred, float32 weights and
    the loss's float parameters flushed; float targets flushed on their conversion to float
    (any float dtype). float64 data (float64 kernels) is returned unchanged."""
    if not isinstance(pred, np.ndarray) or pred.dtype not in (np.float16, BF16, np.float32):
        return pred, target, opts
    opts = dict(opts)
    for key in ("sample_weight", "pos_weight", "class_weight"):
        if isinstance(opts.get(key), np.ndarray):
            opts[key] = flush(opts[key])  # weights are float64 on the device: float32 flushes
    for key, value in opts.items():
        # a loss's float parameters (eps, beta, ...) enter float32 arithmetic in the kernel:
        # a subnormal one counts as zero there
        if isinstance(value, float) and 0 < abs(value) < FLT_TINY:
            opts[key] = float(np.copysign(0.0, value))
    return flush(pred), flush(target, float32_only=False), opts


def assert_within_one_bfloat16_rounding(got, want, what=""):
    """Two bfloat16 results of (nearly) the same float32 computation: equal, or one bfloat16
    unit in the last place apart (close float32 values may round to neighbours)."""
    got = np.asarray(got).astype(np.float32)
    want = np.asarray(want).astype(np.float32)
    ulp = np.abs(want) * 2.0**-7
    assert np.all((np.abs(got - want) <= ulp) | (got == want)), (what, got, want)


def assert_agree(got, want, dtype, what=""):
    """`got` (device) agrees with `want` (NumPy on the device view)."""
    dtype = np.dtype(dtype)
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    got = np.asarray(flush(got), np.float64)
    want = np.asarray(flush(want), np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), (what, "NaN differs", got, want)
    assert np.array_equal(np.isposinf(got), np.isposinf(want)), (what, "+inf differs", got, want)
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), (what, "-inf differs", got, want)
    finite = np.isfinite(want)
    if not finite.any():
        return
    rtol = RTOL[dtype.name]
    scale = float(np.abs(want[finite]).max())
    if dtype in (np.float16, BF16):
        scale = max(scale, 1e-3)  # float16 and bfloat16 store the float32 result rounded
    np.testing.assert_allclose(got[finite], want[finite], rtol=rtol, atol=rtol * scale,
                               err_msg=what)
