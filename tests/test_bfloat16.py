"""bfloat16 on the CPU: NumPy arrays of ml_dtypes.bfloat16 and torch bfloat16 tensors compute
in float32 (sums in float64) and come back in bfloat16, within bfloat16 rounding of the
float32 computation on the same values."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_inputs, require
from reference import ALL

import gpuloss as gl

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = ml_dtypes.bfloat16


def _bf16_inputs(loss, rng):
    pred, target = make_inputs(loss, rng, (30, 5))
    pred = pred.astype(BF16)
    if target.dtype.kind == "f":
        target = target.astype(BF16)
    return pred, target


def _as32(x):
    return x.astype(np.float32) if x.dtype == BF16 else x


def _assert_bf16_rounding_of(got, want32):
    """got (bfloat16) is want32 rounded to bfloat16, to one unit in its last place."""
    want = np.asarray(want32, np.float32)
    got = np.asarray(got).astype(np.float32)
    ulp = np.abs(want.astype(BF16).astype(np.float32)) * 2.0**-7 + 1e-38
    assert np.all(np.abs(got - want) <= ulp), (got, want)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss", ALL)
def test_numpy_bfloat16_arrays(loss, reduction):
    rng = np.random.default_rng(0)
    pred, target = _bf16_inputs(loss, rng)
    v, g = gl.LOSSES[loss].value_and_grad(pred, target, reduction=reduction)
    assert np.asarray(v).dtype == BF16 and g.dtype == BF16 and g.shape == pred.shape
    v32, g32 = gl.LOSSES[loss].value_and_grad(pred.astype(np.float32), _as32(target),
                                              reduction=reduction)
    _assert_bf16_rounding_of(v, v32)
    _assert_bf16_rounding_of(g, g32)


@pytest.mark.parametrize("loss", ALL)
def test_torch_bfloat16_tensors_train(loss):
    torch = require("torch")
    rng = np.random.default_rng(1)
    pred, target = _bf16_inputs(loss, rng)
    x = torch.tensor(pred.astype(np.float32)).to(torch.bfloat16).requires_grad_()
    t = (torch.tensor(target.astype(np.float32)).to(torch.bfloat16) if target.dtype == BF16
         else torch.tensor(target))
    out = gl.LOSSES[loss](x, t)
    out.backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    v32, g32 = gl.LOSSES[loss].value_and_grad(pred.astype(np.float32), _as32(target))
    _assert_bf16_rounding_of(out.detach().float().numpy(), v32)
    _assert_bf16_rounding_of(x.grad.float().numpy(), g32)


def test_bfloat16_validation_and_clipping():
    p = np.array([0.5, 1.5], BF16)
    with pytest.raises(ValueError, match="pred must hold probabilities"):
        gl.bce(p, np.array([0.0, 1.0], BF16))
    # bce's default eps is bfloat16's own, as finfo(pred.dtype).eps is for every dtype
    eps = float(ml_dtypes.finfo(BF16).eps)
    v = gl.bce(np.array([0.0], BF16), np.array([1.0], BF16))
    np.testing.assert_allclose(float(v), -np.log(np.float32(eps)), rtol=1e-2)
