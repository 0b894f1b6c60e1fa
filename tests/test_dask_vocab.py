"""Dask: cce_with_logits over a class axis split into chunks is never joined.

Each chunk reduces its classes to per-block states, a row chunk's states merge in block order,
and each chunk's gradient is formed where it lies (`gpuloss._dask._vocab`, with the math of
`gpuloss._shards`). The numbers equal the NumPy backend's to rounding for every option, and
are bit-identical for every class chunking whose boundaries are multiples of the block.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require

import gpuloss as gl
from gpuloss import _dask

da = require("dask.array")
dask = require("dask")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

N, K, BLOCK = 30, 48, 6
ALIGNED = (48, 24, 12, 6, (12, 6, 30), (18, 30))  # 1 to 8 class chunks, at multiples of 6
UNEVEN = (16, 8, 5, (7, 20, 21), (1, 47))  # 3 to 10 chunks, boundaries inside blocks


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(_dask, "CLASS_BLOCK", BLOCK)
    with dask.config.set(scheduler="sync"):
        yield


def _inputs(rng, dtype, labels, n=N):
    z = (rng.standard_normal((n, K)) * 3).astype(dtype)
    if labels:
        return z, rng.integers(0, K, n)
    return z, rng.dirichlet(np.full(K, 0.3), n).astype(dtype)


def _options(rng, dtype, labels):
    cw = rng.uniform(0.5, 2.0, K).astype(dtype)
    sw = rng.uniform(0.5, 2.0, N).astype(dtype)
    yield {}
    yield {"label_smoothing": 0.1}
    yield {"z_loss": 1e-3}
    yield {"softcap": 4.0}
    yield {"softcap": 1e300}  # beyond float32's range: its largest value, as the kernels
    yield {"class_weight": cw}
    yield {"sample_weight": sw}
    if labels:
        yield {"ignore_index": 3}
        yield {"ignore_index": 3, "class_weight": cw, "label_smoothing": 0.2}
    yield {"label_smoothing": 0.2, "class_weight": cw, "z_loss": 1e-2, "softcap": 5.0,
           "sample_weight": sw, "validate": False}


def _dask_call(z, t, chunks, labels, row_chunk=10, method="value_and_grad", **opts):
    Z = da.from_array(z, chunks=(row_chunk, chunks))
    T = da.from_array(t, chunks=row_chunk if labels else (row_chunk, chunks))
    return getattr(gl.cce_with_logits, method)(Z, T, **opts), Z


def _close(got, want, dtype, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    scale = max(np.max(np.abs(want)), 1e-30) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("labels", [True, False], ids=["indices", "probabilities"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_option_matches_numpy(dtype, labels):
    rng = np.random.default_rng(0)
    z, t = _inputs(rng, dtype, labels)
    for i, opts in enumerate(_options(rng, dtype, labels)):
        # every chunking for the plain call and for all options at once, a few for the rest
        chunkings = ALIGNED[1:] + UNEVEN if i in (0, 9) else (8, (7, 20, 21))
        for reduction in ("mean", "sum", "none"):
            want_v, want_g = gl.cce_with_logits.value_and_grad(z, t, reduction=reduction,
                                                               **opts)
            for chunks in chunkings if reduction == "mean" else chunkings[:2]:
                (v, g), Z = _dask_call(z, t, chunks, labels, reduction=reduction, **opts)
                assert isinstance(v, da.Array) and isinstance(g, da.Array), "results are lazy"
                assert g.chunks == Z.chunks
                v, g = dask.compute(v, g)
                assert v.dtype == dtype and g.dtype == dtype
                what = f"{opts} {reduction} {chunks}"
                _close(v, want_v, dtype, what)
                _close(g, want_g, dtype, what)


@pytest.mark.parametrize("labels", [True, False], ids=["indices", "probabilities"])
def test_bit_identical_for_every_aligned_class_chunking(labels):
    rng = np.random.default_rng(1)
    z, t = _inputs(rng, np.float32, labels)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 6.0,
            "class_weight": rng.uniform(0.5, 2, K).astype(np.float32),
            "sample_weight": rng.uniform(0.5, 2, N).astype(np.float32)}
    for reduction in ("mean", "none"):
        outs = [dask.compute(*_dask_call(z, t, c, labels, reduction=reduction, **opts)[0])
                for c in ALIGNED[1:]]
        for v, g in outs[1:]:
            assert np.array_equal(v, outs[0][0]) and np.array_equal(g, outs[0][1])
        # a class axis not last, and several row chunks, too
        Z = da.from_array(np.ascontiguousarray(z.T), chunks=(12, 10))
        T = t if labels else np.ascontiguousarray(t.T)
        T = da.from_array(T, chunks=10 if labels else (12, 10))
        v, g = dask.compute(*gl.cce_with_logits.value_and_grad(Z, T, axis=0,
                                                               reduction=reduction, **opts))
        assert np.array_equal(v, outs[0][0]) and np.array_equal(g.T, outs[0][1])


def test_no_task_holds_a_whole_row():
    """The gradient keeps pred's chunks, no rechunk is in the graph, the states' tasks are not
    fused into the merge, and no task reads more than one chunk of logits (or of targets)."""
    from dask.callbacks import Callback
    from dask.core import get_dependencies

    rng = np.random.default_rng(2)
    z, t = _inputs(rng, np.float64, False)
    Z, T = da.from_array(z, chunks=(10, 8)), da.from_array(t, chunks=(10, 8))
    v, g = gl.cce_with_logits.value_and_grad(Z, T, sample_weight=np.ones(N))
    assert g.chunks == Z.chunks
    assert not any("rechunk" in name for name in g.dask.layers), list(g.dask.layers)
    (opt,) = dask.optimize(g)
    names = {key[0].rsplit("-", 1)[0] for key in dict(opt.__dask_graph__())
             if isinstance(key, tuple)}
    assert {"cce-class-states", "cce-class-merge", "cce-class-grad"} <= names, names
    # how many chunks of the logits, and of the targets, one task reads at most (the
    # from_array layers' keys survive the optimisation)
    sources = {Z.name: 0, T.name: 0}

    class Watch(Callback):
        def _pretask(self, key, dsk, state):
            deps = [d[0] for d in get_dependencies(dsk, key) if isinstance(d, tuple)]
            for name, most in sources.items():
                sources[name] = max(most, deps.count(name))

    with Watch():
        v, g = dask.compute(v, g)
    assert sources == {Z.name: 1, T.name: 1}
    _close(g, gl.cce_with_logits.grad(z, t, sample_weight=np.ones(N)), np.float64, "grad")


def test_leading_axes_and_a_class_axis_not_last():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((4, 5, K)) * 3
    y = rng.integers(0, K, (4, 5))
    sw = rng.uniform(0.5, 2, (1, 5))  # broadcast over the first axis
    Z = da.from_array(z, chunks=(2, 3, 12))
    for reduction in ("mean", "none"):
        v, g = gl.cce_with_logits.value_and_grad(Z, da.from_array(y, chunks=(2, 3)),
                                                 sample_weight=sw, reduction=reduction)
        assert g.chunks == Z.chunks
        want_v, want_g = gl.cce_with_logits.value_and_grad(z, y, sample_weight=sw,
                                                           reduction=reduction)
        _close(v.compute(), want_v, np.float64, reduction)
        _close(g.compute(), want_g, np.float64, reduction)
    # (B, K, T), axis=1, probabilities chunked along the classes unlike pred: rechunked to it
    zt = np.ascontiguousarray(np.moveaxis(z, -1, 1))
    p = rng.dirichlet(np.ones(K), (4, 5))
    pt = np.ascontiguousarray(np.moveaxis(p, -1, 1))
    Zt = da.from_array(zt, chunks=(2, 16, 3))
    v, g = gl.cce_with_logits.value_and_grad(Zt, da.from_array(pt, chunks=(2, 24, 3)), axis=1,
                                             label_smoothing=0.1)
    assert g.chunks == Zt.chunks
    want_v, want_g = gl.cce_with_logits.value_and_grad(zt, pt, axis=1, label_smoothing=0.1)
    _close(v.compute(), want_v, np.float64, "axis=1")
    _close(g.compute(), want_g, np.float64, "axis=1")
    with pytest.raises(ValueError, match="Mismatched chunking: target has chunks"):
        gl.cce_with_logits(Zt, da.from_array(pt, chunks=(1, 24, 3)), axis=1)


@pytest.mark.parametrize("labels", [True, False], ids=["indices", "probabilities"])
def test_edge_rows(labels):
    rng = np.random.default_rng(4)
    z, t = _inputs(rng, np.float64, labels, n=8)
    z[0, :30] = -np.inf  # masked classes in several chunks, the label (or the mass) elsewhere
    z[1, 40:] = -np.inf
    z[2] = rng.choice([-1e4, 1e4], K)  # large logits: exp underflows to 0 off the maximum
    z[3, 5] = 1e4
    z[4, 7] = z[4, 30] = 1e4  # the maximum twice, in two chunks
    if labels:
        t[0], t[1], t[3], t[5] = 45, 3, 47, K - 1  # labels in the last chunk
        t[6] = -100  # ignored
        z[2, t[2]] = 1e4
        opts_list = [{"ignore_index": -100}, {"ignore_index": -100, "label_smoothing": 0.0,
                                               "z_loss": 1e-4}]
    else:
        t[0, :30] = 0.0
        t[0] /= t[0].sum()
        t[1, 40:] = 0.0
        t[1] /= t[1].sum()
        opts_list = [{}, {"z_loss": 1e-4}]
    for opts in opts_list:
        want_v, want_g = gl.cce_with_logits.value_and_grad(z, t, reduction="none", **opts)
        assert np.all(np.isfinite(want_v))
        for chunks in (8, (7, 20, 21)):
            (v, g), _ = _dask_call(z, t, chunks, labels, row_chunk=4, reduction="none", **opts)
            v, g = dask.compute(v, g)
            _close(v, want_v, np.float64, f"{opts} {chunks}")
            _close(g, want_g, np.float64, f"{opts} {chunks}")


@pytest.mark.parametrize("labels", [True, False], ids=["indices", "probabilities"])
def test_extreme_class_weights_and_empty_inputs(labels):
    """Class weights beyond float32's comfortable range are rescaled as the NumPy backend
    does (the rows' float64 weights take the scale back); no rows, and every row ignored."""
    rng = np.random.default_rng(8)
    z, t = _inputs(rng, np.float32, labels)
    for top in (1e35, 1e-35):
        opts = {"class_weight": rng.uniform(0.5, 2, K) * top, "label_smoothing": 0.1}
        for reduction in ("mean", "sum", "none"):
            want_v, want_g = gl.cce_with_logits.value_and_grad(z, t, reduction=reduction,
                                                               **opts)
            (v, g), _ = _dask_call(z, t, (7, 20, 21), labels, reduction=reduction, **opts)
            v, g = dask.compute(v, g)
            _close(v, want_v, np.float32, f"{top} {reduction}")
            _close(g, want_g, np.float32, f"{top} {reduction}")
    empty = {"ignore_index": -1} if labels else {}
    for zz, tt in ((z[:0], t[:0]), (z, np.full(N, -1)) if labels else (z[:0], t[:0])):
        (v, g), _ = _dask_call(zz, tt, 8, labels, **empty)
        want_v, want_g = gl.cce_with_logits.value_and_grad(zz, tt, **empty)
        v, g = dask.compute(v, g)
        assert np.isnan(v) and np.isnan(want_v)  # 0 / 0, as NumPy
        assert np.array_equal(g, want_g)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_chunks_compute_in_float32(dtype):
    if dtype == "bfloat16":
        dtype = require("ml_dtypes").bfloat16
    rng = np.random.default_rng(5)
    z, t = _inputs(rng, np.float32, True)
    z = z.astype(dtype)
    want_v, want_g = gl.cce_with_logits.value_and_grad(z, t, softcap=5.0)
    (v, g), _ = _dask_call(z, t, 12, True, softcap=5.0)
    v, g = dask.compute(v, g)
    assert v.dtype == z.dtype and g.dtype == z.dtype
    np.testing.assert_allclose(np.float32(v), np.float32(want_v), rtol=1e-2)
    np.testing.assert_allclose(g.astype(np.float32), want_g.astype(np.float32), rtol=1e-2,
                               atol=1e-2 * np.abs(want_g.astype(np.float32)).max())


def test_errors_as_numpy():
    rng = np.random.default_rng(6)
    z, t = _inputs(rng, np.float64, True)
    bad = t.copy()
    bad[3] = K
    with pytest.raises(ValueError) as want:
        gl.cce_with_logits(z, bad)
    (v, g), _ = _dask_call(z, bad, 8, True, row_chunk=N)  # one row chunk: the same range
    with pytest.raises(ValueError) as got:
        g.compute()
    assert str(got.value) == str(want.value)
    bad[3] = -100  # PyTorch's default ignore_index: its hint, and fine with ignore_index
    (v, _), _ = _dask_call(z, bad, 8, True, method="value_and_grad")
    with pytest.raises(ValueError, match="pass ignore_index=-100"):
        v.compute()
    (v, _), _ = _dask_call(z, bad, 8, True, ignore_index=-100)
    _close(v.compute(), gl.cce_with_logits(z, bad, ignore_index=-100), np.float64, "ignored")
    # validate=False: no check; an out-of-range label gives its row NaN, and counts in the
    # mean's denominator as in NumPy, so that the other rows keep their gradient
    bad[5], bad[7] = K + 3, 3
    opts = {"validate": False, "ignore_index": 3, "class_weight": rng.uniform(0.5, 2, K),
            "sample_weight": rng.uniform(0.5, 2, N)}
    for reduction in ("none", "mean"):
        want_v, want_g = gl.cce_with_logits.value_and_grad(z, bad, reduction=reduction, **opts)
        (v, g), _ = _dask_call(z, bad, 8, True, reduction=reduction, **opts)
        v, g = dask.compute(v, g)
        assert np.isnan(g[5]).all() and np.isfinite(np.delete(g, [3, 5], axis=0)).all()
        np.testing.assert_allclose(v, want_v, rtol=1e-12)
        np.testing.assert_allclose(g, want_g, rtol=1e-12, atol=1e-15)

    z, p = _inputs(rng, np.float64, False)
    p[2, 30] = 1.5
    (v, _), _ = _dask_call(z, p, 8, False)
    with pytest.raises(ValueError, match=r"target must hold probabilities in \[0, 1\]; found "
                                         r"values in \[[^,]+, 1\.5\]\."):
        v.compute()
    p[2, 30] = -0.5
    (v, g), _ = _dask_call(z, p, 8, False)
    with pytest.raises(ValueError, match="target must hold probabilities in"):
        dask.compute(v, g)
    with pytest.raises(ValueError, match="class_weight must be non-negative"):
        _dask_call(z, t, 8, True, class_weight=-np.ones(K))
    sw = np.ones(N)
    sw[4] = np.nan
    (v, _), _ = _dask_call(z, t, 8, True, sample_weight=sw)
    with pytest.raises(ValueError, match="sample_weight must be non-negative"):
        v.compute()


def test_focal_loss_keeps_the_join():
    rng = np.random.default_rng(7)
    z, t = _inputs(rng, np.float64, True)
    (v, g), Z = _dask_call(z, t, 8, True, focal_gamma=2.0)
    assert any("rechunk" in name for name in g.dask.layers)
    assert g.chunks == Z.chunks
    want_v, want_g = gl.cce_with_logits.value_and_grad(z, t, focal_gamma=2.0)
    _close(v.compute(), want_v, np.float64, "focal")
    _close(g.compute(), want_g, np.float64, "focal")


@pytest.mark.parametrize("which", ["pred", "target", "sample_weight"])
def test_masked_arrays_are_refused_as_before(which):
    """A masked chunk (pred, probability targets or weights) takes the joined path, which
    refuses it; the split path would compute on the masked data."""
    rng = np.random.default_rng(8)
    z, t = _inputs(rng, np.float64, False)
    Z = da.from_array(z, chunks=(10, 12))
    T = da.from_array(t, chunks=(10, 12))
    W = da.from_array(np.ones(N), chunks=10)
    if which == "pred":
        Z = da.ma.masked_greater(Z, 1.0)
    elif which == "target":
        T = da.ma.masked_greater(T, 0.5)
    else:
        W = da.ma.masked_greater(W, 2.0)
    with pytest.raises(TypeError, match="masked array"):
        gl.cce_with_logits(Z, T, sample_weight=W).compute()


def test_one_dimensional_pred_with_a_scalar_weight():
    rng = np.random.default_rng(9)
    z = rng.standard_normal(20)
    y = np.int64(3)
    got = gl.cce_with_logits(da.from_array(z, chunks=6), da.from_array(np.asarray(y)),
                             sample_weight=np.float64(2.0))
    _close(got.compute(), gl.cce_with_logits(z, y, sample_weight=np.float64(2.0)), np.float64,
           "1-d")
