"""Dask: lazy losses and gradients, reduced tree-wise, on a real two-process LocalCluster."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_inputs, require
from reference import CATEGORICAL
from test_losses import REDUCTIONS, _cases, _options

import gpuloss as gl

da = require("dask.array")
distributed = require("distributed")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                        "ignore::ResourceWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    with distributed.Client(cluster) as c:
        assert len(c.scheduler_info()["workers"]) == 2
        yield c
    cluster.close()


def _dask(x, chunks):
    return None if x is None else da.from_array(x, chunks=chunks)


@pytest.mark.parametrize(("loss", "shape", "labels"), list(_cases()))
def test_every_loss_and_option_on_a_cluster_matches_in_memory(client, loss, shape, labels):
    rng = np.random.default_rng(0)
    shape = (37,) + shape[1:]
    pred, target = make_inputs(loss, rng, shape, labels=labels)
    chunks = (10,) + shape[1:] if loss in CATEGORICAL else (10, 2)
    sample_chunks = (10,) if (loss in CATEGORICAL and labels) else chunks
    P, T = _dask(pred, chunks), _dask(target, sample_chunks)
    for opts in _options(loss, rng, shape, labels):
        for reduction in REDUCTIONS:
            want_v, want_g = gl.LOSSES[loss].value_and_grad(pred, target, reduction=reduction,
                                                            **opts)
            v, g = gl.LOSSES[loss].value_and_grad(P, T, reduction=reduction, **opts)
            assert isinstance(v, da.Array) and isinstance(g, da.Array), "results are lazy"
            assert g.chunks == P.chunks
            v, g = client.compute([v, g], sync=True)
            np.testing.assert_allclose(v, want_v, rtol=1e-12, atol=1e-15, err_msg=str(opts))
            np.testing.assert_allclose(g, want_g, rtol=1e-12, atol=1e-15, err_msg=str(opts))


@pytest.mark.parametrize("loss", ["bce_with_logits", "cce_with_logits"])
def test_many_chunks_tree_reduction_and_dtypes(client, loss):
    rng = np.random.default_rng(1)
    shape = (2000, 8)
    for dtype in (np.float32, np.float64):
        pred, target = make_inputs(loss, rng, shape, dtype=dtype)
        P = da.from_array(pred, chunks=(50, 8) if loss in CATEGORICAL else (50, 3))
        T = da.from_array(target, chunks=(50,) if loss in CATEGORICAL else P.chunks)
        v = client.compute(gl.LOSSES[loss](P, T), sync=True)
        want = gl.LOSSES[loss](pred, target)
        assert v.dtype == dtype
        np.testing.assert_allclose(v, want, rtol=1e-12 if dtype == np.float64 else 1e-6)


@pytest.mark.parametrize("loss", ["cce_with_logits", "cce", "kl_div_with_logits"])
def test_class_axis_split_over_chunks_on_a_cluster(client, loss):
    """cce_with_logits merges per-block states and never joins a row (tests/test_dask_vocab.py
    has its own tests); the other categorical losses join the class axis first."""
    rng = np.random.default_rng(2)
    z, t = make_inputs(loss, rng, (30, 12))
    Z = da.from_array(z, chunks=(10, 5))
    T = da.from_array(t, chunks=10 if t.ndim == 1 else (10, 5))
    v, g = gl.LOSSES[loss].value_and_grad(Z, T)
    joined = any("rechunk" in str(name) for name in g.dask.layers)
    assert joined == (loss != "cce_with_logits")
    np.testing.assert_allclose(v.compute(), gl.LOSSES[loss](z, t), rtol=1e-12)
    assert g.chunks == Z.chunks
    np.testing.assert_allclose(g.compute(), gl.LOSSES[loss].grad(z, t), rtol=1e-12,
                               atol=1e-15)


def test_mismatched_chunking_is_a_clear_error():
    p = da.zeros((20, 4), chunks=(10, 4))
    with pytest.raises(ValueError, match="Mismatched chunking: target has chunks"):
        gl.mse(p, da.zeros((20, 4), chunks=(5, 4)))
    with pytest.raises(ValueError, match="Mismatched chunking"):
        gl.cce_with_logits(p, da.zeros(20, chunks=5, dtype=np.int64))
    with pytest.raises(TypeError, match="different libraries"):
        gl.mse(p, np.zeros((20, 4)))


def test_errors_surface_at_compute_time():
    p = da.from_array(np.array([0.5, 1.5]), chunks=1)
    lazy = gl.bce(p, da.from_array(np.array([0.0, 1.0]), chunks=1))
    with pytest.raises(ValueError, match="pred must hold probabilities"):
        lazy.compute()
