"""The CUDA path on the emulated device (see test_emulated.py) for three additions of the
categorical row kernel and its launch code, against the NumPy backend:

- `softcap` of cce_with_logits (GL_SOFTCAP, GlCceLogits<4..7>): z' = c tanh(z / c) before
  everything else, in every row layout (staged small rows, warp rows, block rows, rows read
  twice), with class indices and probabilities, alone and with focal and z-loss;
- `parts` with reduction "sum" (GL_SUM_PARTS): the value [Σ w·l, D] of a partial state, and
  the gradient of Σ w·l (not divided by D);
- `grad_out`: the gradient written into the caller's buffer, or over pred itself (in place),
  bit for bit what a separate buffer gets, in every layout.

A few launches per layout, each covering several grid-stride steps (the emulator's grid holds
3 blocks).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from agreement import assert_agree, device_view
from kernel_host import _runtime, device_array

import gpuloss as gl
from gpuloss import _api
from gpuloss.backends import cuda as _cuda_backend
from gpuloss.backends import numpy as _numpy_backend

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16)
CAP = 5.0
# the option combinations of the softcap variants (GlCceLogits<4>..<7>)
COMBOS = ({}, {"focal_gamma": 2.0}, {"z_loss": 1e-3}, {"focal_gamma": 2.0, "z_loss": 1e-3})
LAYOUTS = ("staged", "warp", "block", "twice")


def _layout_k(dtype, labels: bool, layout: str) -> int:
    """A K that lands in `layout` (the warp and block layouts full to the last value of their
    register cache, the row read twice just beyond the block's)."""
    functor = gl.cce_with_logits.functor(0)
    configs = _cuda_backend.row_configs(dtype, labels, functor)
    shift = _cuda_backend.row_shift(dtype)
    (_, _), (wt, wc), (bt, bc), _ = configs
    K = {"staged": 10, "warp": wt * wc - shift, "block": bt * bc - shift,
         "twice": bt * bc - shift + 1}[layout]
    want = {"staged": configs[0], "warp": configs[1], "block": configs[2],
            "twice": configs[3]}[layout]
    assert _cuda_backend.row_config(K, dtype, labels, functor) == want
    return K


def _rows(layout: str) -> int:
    """Rows enough for two grid-stride steps of the emulator's 3 blocks in each layout."""
    return {"staged": 200, "warp": 30, "block": 5, "twice": 5}[layout]


def _inputs(dtype, labels: bool, layout: str, seed: int = 0, edges: bool = True):
    """Logits spread well past the cap (so that tanh saturates), with the edges of the cap in
    the first rows: +-1e4, the dtype's largest value, +-inf (capped to +-c, derivative 0) and a
    NaN (its row NaN)."""
    rng = np.random.default_rng(seed)
    K, N = _layout_k(dtype, labels, layout), _rows(layout)
    z = rng.standard_normal((N, K)) * 8.0
    if edges:
        top = float(np.finfo(np.float32 if dtype == BF16 else dtype).max)
        z[0, :4] = [1e4, -1e4, top, -top]
        z[1, :2] = [np.inf, -np.inf]
        z[2, K // 2] = np.nan
    z = (z.astype(np.float32) if dtype == BF16 else z).astype(dtype)
    if labels:
        t = rng.integers(0, K, N)
        t[0], t[1] = 0, 1  # the label on an edge value
        return z, t
    t = rng.uniform(0, 1, (N, K)) ** 4
    t = (t / t.sum(1, keepdims=True)).astype(dtype)
    return z, t


def _cuda(loss, pred, target, *, want_value=True, want_grad=True, parts=False, grad_out=None,
          **opts):
    call = _api.prepare(loss, pred, target, opts, want_value=want_value, want_grad=want_grad,
                        parts=parts, grad_out=grad_out)
    return _cuda_backend.compute(call, _runtime("device"))


def _numpy(loss, pred, target, *, want_value=True, want_grad=True, parts=False, **opts):
    call = _api.prepare(loss, pred, target, opts, want_value=want_value, want_grad=want_grad,
                        parts=parts)
    return _numpy_backend.compute(call)


def _agree_with_numpy(pred, target, what, **opts):
    got = _cuda("cce_with_logits", pred, target, **opts)
    p, t, o = device_view(pred, target, opts)
    want = gl.cce_with_logits.value_and_grad(p, t, **o)
    assert_agree(got[0], want[0], pred.dtype, f"value {what} {opts}")
    assert_agree(got[1], want[1], pred.dtype, f"grad {what} {opts}")
    return got


# ---------------------------------------------------------------------------------------------
# softcap


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "probabilities"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_softcap_agrees_with_numpy_in_every_layout(dtype, labels):
    """Each layout once per dtype and target kind, each with another switch combination (all
    four over the dtypes), reduction "sum" and "none" on two of them; the edge rows give
    finite losses for +-inf logits (capped to +-c) and a NaN row for the NaN."""
    for i, layout in enumerate(LAYOUTS):
        z, t = _inputs(dtype, labels, layout, seed=i)
        opts = dict(COMBOS[(i + DTYPES.index(dtype)) % 4], softcap=CAP)
        if i == 1:
            opts["reduction"] = "none"
        if i == 2:
            opts.update(reduction="sum", label_smoothing=0.1)
        value, grad = _agree_with_numpy(z, t, f"{np.dtype(dtype).name} {layout}", **opts)
        if opts.get("reduction") == "none":  # the edge rows: finite, finite, NaN
            assert np.isfinite(value[:2].astype(np.float64)).all()
            assert np.isnan(value[2].astype(np.float64))
            assert np.isfinite(grad[:2].astype(np.float64)).all()
            assert (grad[1, :2].astype(np.float64) == 0).all()  # d tanh at +-inf: 0


def test_softcap_is_the_cross_entropy_of_the_capped_logits():
    """Independently of both backends: the cross-entropy of c tanh(z / c) in float64, the
    gradient through the chain rule, in a staged and a twice-read layout. Every gradient
    element to its own relative precision, also where tanh(z / c) rounds to +-1 (|z / c| of
    12, 20, 30: 1 - tanh^2 would give 0 there; float32 holds sech^2 = 4e-26 and the gradient)."""
    for dtype, rtol in ((np.float64, 1e-9), (np.float32, 1e-5)):
        for layout in ("staged", "twice"):
            z, t = _inputs(dtype, True, layout, edges=False)
            z[3, :6] = [60, -60, 100, -100, 150, -150]
            value, grad = _cuda("cce_with_logits", z, t, softcap=CAP)
            x = z.astype(np.float64) / CAP
            capped = CAP * np.tanh(x)
            m = capped.max(1, keepdims=True)
            log_q = capped - m - np.log(np.exp(capped - m).sum(1, keepdims=True))
            rows = np.arange(len(t))
            g = np.exp(log_q)
            g[rows, t] -= 1
            want_grad = g / len(t) / np.cosh(x) ** 2
            np.testing.assert_allclose(value, -log_q[rows, t].mean(), rtol=rtol)
            np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=0)
            assert (grad[3, :6] != 0).all()
            assert not np.allclose(value, gl.cce_with_logits(z, t))  # the cap changed it


# ---------------------------------------------------------------------------------------------
# parts with reduction "sum"


def _parts_cases():
    rng = np.random.default_rng(7)
    z = (rng.standard_normal((40, 12)) * 3).astype(np.float32)
    t = rng.integers(0, 12, 40)
    t[3] = -100
    sw = rng.uniform(0.5, 2.0, 40)
    cw = rng.uniform(0.5, 2.0, 12)
    p = rng.uniform(0, 1, (40, 12))
    p = (p / p.sum(1, keepdims=True)).astype(np.float32)
    zw = (rng.standard_normal((9, 300)) * 3).astype(np.float32)  # a warp per row
    tw = rng.integers(0, 300, 9)
    return [
        ("cce_with_logits", z, t, {"class_weight": cw, "sample_weight": sw,
                                   "ignore_index": -100, "label_smoothing": 0.1}),
        ("cce_with_logits", z, t % 12, {"class_weight": cw * 1e35}),  # rescaled weights
        ("cce_with_logits", z, p, {"sample_weight": sw, "class_weight": cw}),
        ("cce_with_logits", zw, tw, {"softcap": 2.0, "z_loss": 1e-3}),
        ("mse", z.ravel(), p.ravel(), {"sample_weight": np.repeat(sw, 12)}),
        ("mse", z.ravel(), p.ravel(), {}),
    ]


@pytest.mark.parametrize("case", range(6))
def test_parts_with_sum_give_the_state_and_the_gradient_of_the_sum(case):
    """[Σ w·l, D] in float64 as the NumPy backend's (D as a mean's parts have it), and the
    gradient of Σ w·l: NumPy's for reduction "sum", D times the mean-parts gradient."""
    loss, pred, target, opts = _parts_cases()[case]
    value, grad = _cuda(loss, pred, target, parts=True, reduction="sum", **opts)
    want_value, want_grad = _numpy(loss, pred, target, parts=True, reduction="sum", **opts)
    assert value.dtype == np.float64 and value.shape == (2,)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    mean_value, mean_grad = _cuda(loss, pred, target, parts=True, **opts)
    assert value.tobytes() == mean_value.tobytes()  # the same state either way
    sum_grad = gl.LOSSES[loss].grad(pred, target, reduction="sum", **opts)
    assert_agree(grad, sum_grad, pred.dtype, f"{loss} {opts}")
    assert_agree(grad, want_grad, pred.dtype, f"{loss} {opts}")
    np.testing.assert_allclose(grad, mean_grad * np.float32(value[1]), rtol=1e-5,
                               atol=1e-6 * float(np.abs(grad).max()))


# ---------------------------------------------------------------------------------------------
# grad_out, and the gradient written over pred


def _in_place_matches(loss, pred, target, **opts):
    """The gradient written over (a copy of) pred equals the one written to a new buffer, bit
    for bit, and so do the values; the caller's array comes back."""
    want_value, want_grad = _cuda(loss, pred, target, **opts)
    z = device_array(pred)
    value, grad = _cuda(loss, z, target, grad_out=z, **opts)
    assert grad is z
    assert grad.tobytes() == want_grad.tobytes(), (loss, pred.shape, opts)
    assert np.asarray(value).tobytes() == np.asarray(want_value).tobytes()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_place_gradient_is_bit_for_bit_the_same_in_every_layout(layout):
    """grad_out = pred: every value is read before its gradient overwrites it (a row read
    twice reads it in pass 1, the focal extra pass and pass 2; staged rows read the block's
    tile whole first). Class indices with every switch (softcap, focal: the extra pass,
    z-loss), probabilities plain, float32; bfloat16 through its 16-bit view."""
    z, t = _inputs(np.float32, True, layout, edges=False)
    _in_place_matches("cce_with_logits", z, t, softcap=CAP, focal_gamma=2.0, z_loss=1e-3)
    z, t = _inputs(np.float32, False, layout, edges=False, seed=1)
    _in_place_matches("cce_with_logits", z, t, sample_weight=np.linspace(0.5, 2.0, len(z)))
    if layout in ("staged", "twice"):
        z, t = _inputs(BF16, True, layout, edges=False, seed=2)
        _in_place_matches("cce_with_logits", z, t, focal_gamma=2.0, reduction="sum")


def test_in_place_elsewhere_and_grad_out_buffers():
    """Other losses in place (an elementwise one, nll, parts with "sum" as linear
    cross-entropy's chunks); a separate grad_out is written and returned; a grad_out that
    overlaps pred only in part, or of another dtype, is not used (a new array, same values)."""
    rng = np.random.default_rng(3)
    p = rng.standard_normal(1000).astype(np.float32)
    _in_place_matches("mse", p, rng.standard_normal(1000).astype(np.float32))
    a = np.log(rng.uniform(0.01, 1, (50, 10)))
    _in_place_matches("nll", a, rng.integers(0, 10, 50))
    z, t = _inputs(np.float32, True, "warp", edges=False)
    _in_place_matches("cce_with_logits", z, t, parts=True, reduction="sum", softcap=CAP)

    z, t = _inputs(np.float32, True, "staged", edges=False)
    want = _cuda("cce_with_logits", z, t)[1]
    out = device_array(np.full(z.shape, np.nan, np.float32))
    got = _cuda("cce_with_logits", z, t, grad_out=out)[1]
    assert got is out and got.tobytes() == want.tobytes()
    wide = device_array(np.concatenate([z.ravel(), np.zeros(10, np.float32)]))
    pred, shifted = wide[:-10].reshape(z.shape), wide[10:].reshape(z.shape)
    got = _cuda("cce_with_logits", pred, t, grad_out=shifted)[1]
    assert got is not shifted and got.tobytes() == want.tobytes()
    assert pred.tobytes() == z.tobytes()  # not written over
    got = _cuda("cce_with_logits", z, t, grad_out=z.astype(np.float64))[1]
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "probabilities"])
def test_softcap_and_in_place_move_each_value_as_often_as_plain_cross_entropy(labels):
    """Memory traffic (the emulator's counts): the capped values and the cap's derivatives stay
    on chip, so a softcap row is read once where it fits the register cache and twice beyond,
    as plain cross-entropy's, and its gradient written once; in place, the same bytes, read and
    written through the one array."""
    rt = _runtime("device")
    for layout in LAYOUTS:
        z, t = _inputs(np.float32, labels, layout, edges=False)
        reads = 2 if layout == "twice" else 1
        size = z.nbytes
        for in_place in (False, True):
            zz = device_array(z)
            call = _api.prepare("cce_with_logits", zz, t, {"softcap": CAP, "z_loss": 1e-3},
                                want_value=True, want_grad=True,
                                grad_out=zz if in_place else None)
            with rt.traffic() as seen:
                _cuda_backend.compute(call, rt)
            (traffic,) = seen
            assert "GlCceLogits<6>" in traffic.kernel
            if in_place:  # one array: pred's reads and grad's writes both under "grad"
                flows = traffic["grad"]
                assert traffic["pred"].read.bytes == 0
            else:
                flows = type(traffic["grad"])(traffic["pred"].read, traffic["grad"].written)
                assert traffic["grad"].read.bytes == 0
            assert flows.read.bytes == reads * size and flows.read.distinct == size, layout
            assert flows.written.bytes == size and flows.written.distinct == size, layout
