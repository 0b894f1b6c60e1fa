"""StreamingLoss: batch by batch, merged and pickled, it gives the one-shot loss."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import make_inputs, to_xp
from reference import CATEGORICAL
from test_losses import _cases, _options

import gpuloss as gl

SPLITS = (0, 3, 4, 11, 17, 30)  # uneven batches, one of them empty


def _batches(n):
    edges = [s for s in SPLITS if s < n] + [n]
    return list(zip(edges[:-1], edges[1:]))


def _weight_batch(opts, lo, hi, loss):
    w = opts.get("sample_weight")
    if w is None:
        return None
    w = np.asarray(w)
    # per-row weights follow the batch; a weight along the last axis is the same for all
    return w[lo:hi] if (w.ndim and w.shape[0] == 30 and (loss in CATEGORICAL or w.ndim == 2)) \
        else w


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("loss", "shape", "labels"), list(_cases()))
def test_stream_equals_one_shot_for_every_option(loss, shape, labels, reduction):
    rng = np.random.default_rng(0)
    shape = (30,) + shape[1:]
    pred, target = make_inputs(loss, rng, shape, labels=labels)
    for opts in _options(loss, rng, shape, labels):
        if loss in CATEGORICAL and "ignore_index" in opts:
            target = target.copy()
            target[::4] = opts["ignore_index"]
        want = gl.LOSSES[loss](pred, target, reduction=reduction, **opts)
        fixed = {k: v for k, v in opts.items() if k != "sample_weight"}
        one, two = (gl.StreamingLoss(loss, reduction=reduction, **fixed) for _ in range(2))
        for i, (lo, hi) in enumerate(_batches(30)):
            stream = one if i % 2 == 0 else two
            stream.update(pred[lo:hi], target[lo:hi],
                          sample_weight=_weight_batch(opts, lo, hi, loss))
        two = pickle.loads(pickle.dumps(two))  # a partial state travels between processes
        merged = one.merge(two)
        np.testing.assert_allclose(merged.compute(), want, rtol=1e-12, atol=1e-15,
                                   err_msg=str(opts))


def test_stream_of_nothing_and_of_ignored_samples():
    assert np.isnan(gl.StreamingLoss("mse").compute())
    assert gl.StreamingLoss("mse", reduction="sum").compute() == 0
    s = gl.StreamingLoss("cce_with_logits", ignore_index=-1)
    s.update(np.zeros((3, 4)), np.array([-1, -1, -1]))
    assert np.isnan(s.compute())


def test_stream_works_on_other_namespaces(xp):
    rng = np.random.default_rng(1)
    pred, target = make_inputs("bce_with_logits", rng, (40,))
    s = gl.StreamingLoss("bce_with_logits")
    s.update(to_xp(xp, pred[:25]), to_xp(xp, target[:25]))
    s.update(to_xp(xp, pred[25:]), to_xp(xp, target[25:]))
    np.testing.assert_allclose(s.compute(), gl.bce_with_logits(pred, target), rtol=1e-12)


def test_stream_errors():
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum' for a stream"):
        gl.StreamingLoss("mse", reduction="none")
    with pytest.raises(TypeError, match="sample_weight.*pass it to update"):
        gl.StreamingLoss("mse", sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="loss must be one of"):
        gl.StreamingLoss("l3_loss")
    with pytest.raises(TypeError, match="unexpected option 'pos_weight'"):
        gl.StreamingLoss("mse", pos_weight=2.0)
    a = gl.StreamingLoss("cce", class_weight=np.ones(3))
    with pytest.raises(ValueError, match="loss and options differ"):
        a.merge(gl.StreamingLoss("cce", class_weight=np.full(3, 2.0)))
    with pytest.raises(ValueError, match="target must hold targets"):
        gl.StreamingLoss("bce").update(np.array([0.5]), np.array([2.0]))


def test_state_is_two_float64_numbers():
    s = gl.StreamingLoss("mse")
    s.update(np.array([1.0, 2.0]), np.array([0.0, 0.0]))
    assert s.state == (5.0, 2.0)
    assert len(pickle.dumps(s)) < 1000
    assert float(s.compute()) == 2.5
    assert "2 batches" not in repr(s) and "1 batches" in repr(s)
