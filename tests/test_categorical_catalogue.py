"""nll and kl_div (CATALOGUE.md) against PyTorch to 1e-12 in float64, every option and
reduction, and their edges. (The float64 reference, finite differences, namespaces, Dask,
properties, the fuzz generator and the emulated row kernels cover them through
reference.CATEGORICAL.)"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_inputs, require, torch_value_and_grad

import gpuloss as gl

REDUCTIONS = ("mean", "sum", "none")


def _assert_peer(ours, theirs):
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", [{}, {"class_weight": True}, {"ignore_index": 2},
                                  {"class_weight": True, "ignore_index": 0}])
def test_nll_matches_pytorch(reduction, opts):
    torch = require("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(20)
    a, t = make_inputs("nll", rng, (30, 5))
    ours_opts, theirs_opts = {}, {}
    if "class_weight" in opts:
        cw = rng.uniform(0.2, 2, 5)
        ours_opts["class_weight"], theirs_opts["weight"] = cw, torch.tensor(cw)
    if "ignore_index" in opts:
        ours_opts["ignore_index"] = theirs_opts["ignore_index"] = opts["ignore_index"]
    ours = gl.nll.value_and_grad(a, t, reduction=reduction, **ours_opts)
    theirs = torch_value_and_grad(
        torch, lambda x, y: F.nll_loss(x, y, reduction=reduction, **theirs_opts), a, t)
    _assert_peer(ours, theirs)


def test_nll_on_pytorchs_layout_and_with_probabilities():
    torch = require("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(21)
    a, t = make_inputs("nll", rng, (6, 4, 3), axis=1)  # (N, C, d), classes on axis 1
    ours = gl.nll.value_and_grad(a, t, axis=1)
    theirs = torch_value_and_grad(torch, lambda x, y: F.nll_loss(x, y), a, t)
    _assert_peer(ours, theirs)
    # probability targets: -Σ_k c_k t_k a_k per sample, the mean over samples
    a, p = make_inputs("nll", rng, (8, 5), labels=False)
    cw = rng.uniform(0.5, 2, 5)
    ours = gl.nll.value_and_grad(a, p, class_weight=cw)
    theirs = torch_value_and_grad(
        torch, lambda x, y: -(torch.tensor(cw) * y * x).sum(-1).mean(), a, p)
    _assert_peer(ours, theirs)
    # nll of a log-softmax is cce_with_logits
    z = rng.standard_normal((8, 5))
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    labels = np.arange(8) % 5
    np.testing.assert_allclose(gl.nll(logp, labels), gl.cce_with_logits(z, labels), rtol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_matches_pytorch(reduction, log_target):
    torch = require("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(22)
    a, t = make_inputs("kl_div", rng, (25, 6), labels=False)
    if not log_target:  # a class with no mass: 0 log 0 = 0 (PyTorch agrees; with log_target
        t[0, 2] = 0.0   # its target is -inf, where PyTorch gives NaN and we 0: see below)
        t[0] /= t[0].sum()
    with np.errstate(divide="ignore"):  # log 0 = -inf: the class with no mass
        target = np.log(t) if log_target else t
    torch_reduction = {"mean": "batchmean", "sum": "sum", "none": "none"}[reduction]

    def peer(x, y):
        out = F.kl_div(x, y, reduction=torch_reduction, log_target=log_target)
        return out.sum(-1) if reduction == "none" else out  # ours: one loss per sample

    with np.errstate(divide="ignore"):
        ours = gl.kl_div.value_and_grad(a, target, reduction=reduction, log_target=log_target)
    _assert_peer(ours, torch_value_and_grad(torch, peer, a, target))


def test_kl_div_edges_and_refusals():
    # a class with no target mass adds 0 even where the prediction gives it no mass either
    a = np.array([[0.0, -np.inf], [np.log(0.5), np.log(0.5)]])
    t = np.array([[1.0, 0.0], [0.5, 0.5]])
    v, g = gl.kl_div.value_and_grad(a, t, reduction="none")
    assert v.tolist() == [0.0, 0.0] and np.isfinite(g).all()
    # with log_target, a target of -inf is a class with no mass too (PyTorch: NaN)
    with np.errstate(divide="ignore"):
        np.testing.assert_array_equal(
            gl.kl_div.value_and_grad(a, np.log(t), log_target=True, reduction="none")[0],
            [0.0, 0.0])
    # mass where the prediction has none: infinite, as in PyTorch
    assert gl.kl_div(np.array([[0.0, -np.inf]]), np.array([[0.5, 0.5]])) == np.inf
    with pytest.raises(TypeError, match="kl_div needs probability targets"):
        gl.kl_div(a, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"target must hold probabilities in \[0, 1\]"):
        gl.kl_div(a, np.array([[1.5, -0.5], [0.5, 0.5]]))
    with np.errstate(divide="ignore"):  # log-probabilities are not range-checked
        gl.kl_div(a, np.log(t), log_target=True)
    with pytest.raises(TypeError, match="class_weight"):
        gl.kl_div(a, t, class_weight=np.ones(2))
    # NaN propagates to its row only
    a_nan = a.copy()
    a_nan[1, 0] = np.nan
    v = gl.kl_div(a_nan, t, reduction="none")
    assert v[0] == 0.0 and np.isnan(v[1])


def test_nll_edges():
    # an ignored sample adds 0 even at a = -inf; nothing counted gives NaN and zero gradient
    a = np.array([[-np.inf, 0.0], [np.log(0.5), np.log(0.5)]])
    v, g = gl.nll.value_and_grad(a, np.array([0, 1]), ignore_index=0, reduction="none")
    assert v[0] == 0.0 and np.isclose(v[1], np.log(2)) and (g[0] == 0).all()
    v, g = gl.nll.value_and_grad(a, np.array([0, 0]), ignore_index=0)
    assert np.isnan(v) and (g == 0).all()
    # a counted label at -inf: an infinite loss, as in PyTorch
    assert gl.nll(a, np.array([0, 1])) == np.inf


def test_kl_div_streaming_and_cli(tmp_path):
    rng = np.random.default_rng(23)
    a, t = make_inputs("kl_div", rng, (60, 4), labels=False)
    want = gl.kl_div(a, t)
    stream = gl.StreamingLoss("kl_div")
    for i in range(0, 60, 25):
        stream.update(a[i:i + 25], t[i:i + 25])
    np.testing.assert_allclose(stream.compute(), want, rtol=1e-12)
    import contextlib
    import io
    import json

    from gpuloss import _cli

    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "t.npy", np.log(t))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _cli.main(["score", "kl_div", str(tmp_path / "a.npy"), str(tmp_path / "t.npy"),
                          "--log-target", "--json", "--device", "cpu"]) == 0
    np.testing.assert_allclose(json.loads(out.getvalue())["loss"], want, rtol=1e-12)
