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


# ---------------------------------------------------------------------------------------------
# kl_div_with_logits (distillation)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
@pytest.mark.parametrize("target_logits", [False, True])
def test_kl_div_with_logits_matches_pytorch_distillation(reduction, temperature, target_logits):
    """Hinton et al.'s loss as distillation code writes it in PyTorch:
    T^2 kl_div(log_softmax(z / T), t, "batchmean"), t = softmax(teacher / T) or given."""
    torch = require("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(24)
    z = 3 * rng.standard_normal((25, 6))
    teacher = 3 * rng.standard_normal((25, 6))
    target = teacher if target_logits else F.softmax(torch.tensor(teacher), -1).numpy()
    torch_reduction = {"mean": "batchmean", "sum": "sum", "none": "none"}[reduction]

    def peer(x, y):
        t = F.softmax(y / temperature, -1) if target_logits else y
        out = temperature**2 * F.kl_div(F.log_softmax(x / temperature, -1), t,
                                        reduction=torch_reduction)
        return out.sum(-1) if reduction == "none" else out

    ours = gl.kl_div_with_logits.value_and_grad(z, target, reduction=reduction,
                                                temperature=temperature,
                                                target_logits=target_logits)
    _assert_peer(ours, torch_value_and_grad(torch, peer, z, target))


def test_kl_div_with_logits_edges_and_refusals():
    # identical student and teacher: 0 loss, 0 gradient, at any temperature, even huge logits
    z = np.array([[1e30, 0.0, -1e30], [3.0, 1.0, 2.0]])
    for T in (1.0, 0.1, 7.0):
        v, g = gl.kl_div_with_logits.value_and_grad(z, z, target_logits=True, temperature=T,
                                                    reduction="none")
        assert np.isfinite(v).all() and np.isfinite(g).all()
        np.testing.assert_allclose(v, 0.0, atol=1e-15)
        np.testing.assert_allclose(g, 0.0, atol=1e-15)
    # the gradient is T (q - t): for a large T it tends to the centred logits' difference
    # over K (Hinton et al.'s limit, which the T^2 keeps at this scale)
    rng = np.random.default_rng(25)
    s, t = rng.standard_normal((2, 50, 10))
    g = gl.kl_div_with_logits.grad(s, t, target_logits=True, temperature=1e3, reduction="sum")
    centred = (s - s.mean(1, keepdims=True)) - (t - t.mean(1, keepdims=True))
    np.testing.assert_allclose(g, centred / 10, rtol=0, atol=1e-3)  # O(|s|^2 / T) off
    # a class with no target mass adds 0, even where the student gives it none
    v = gl.kl_div_with_logits(np.array([[0.0, -np.inf]]), np.array([[1.0, 0.0]]))
    assert v == 0.0
    # a +inf logit makes its row NaN (inf - inf), as for cce_with_logits, whatever the target
    v = gl.kl_div_with_logits(np.array([[0.0, np.inf], [0.0, 1.0]]), np.zeros((2, 2)),
                              reduction="none", validate=False)
    assert np.isnan(v[0]) and v[1] == 0.0
    with pytest.raises(TypeError, match="kl_div_with_logits needs probability targets"):
        gl.kl_div_with_logits(z, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"target must hold probabilities in \[0, 1\]"):
        gl.kl_div_with_logits(z, z)  # logits passed as probabilities
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            gl.kl_div_with_logits(z, z, target_logits=True, temperature=bad)
    with pytest.raises(TypeError, match="target_logits"):
        gl.kl_div_with_logits(z, z, target_logits=1)


# ---------------------------------------------------------------------------------------------
# multiclass_hinge


def _optax_multiclass_hinge(torch, scores, labels, margin=1.0):
    """optax.multiclass_hinge_loss, written in PyTorch:
    max(0, max_k (scores_k + margin [k != y]) - scores_y) = max(0, margin + max_{k != y} z - z_y)
    (optax adds the margin to every score but the label's; the two agree)."""
    one_hot = torch.nn.functional.one_hot(labels, scores.shape[-1]).to(scores.dtype)
    zy = (scores * one_hot).sum(-1)
    return torch.clamp((scores + margin * (1 - one_hot)).max(-1).values - zy, min=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", [{}, {"margin": 0.3}, {"margin": 0.0}, {"class_weight": True},
                                  {"ignore_index": 1, "class_weight": True}])
def test_multiclass_hinge_matches_optax(reduction, opts):
    torch = require("torch")
    rng = np.random.default_rng(26)
    z, t = make_inputs("multiclass_hinge", rng, (40, 5))
    margin = opts.get("margin", 1.0)
    cw = rng.uniform(0.2, 2, 5) if opts.get("class_weight") else np.ones(5)
    ignore = opts.get("ignore_index")
    counted = np.ones(40) if ignore is None else (t != ignore) * 1.0

    def peer(x, y):
        per = (_optax_multiclass_hinge(torch, x, y, margin) * torch.tensor(cw)[y]
               * torch.tensor(counted))
        denom = float((cw[t] * counted).sum())
        return {"mean": per.sum() / denom, "sum": per.sum(), "none": per}[reduction]

    ours_opts = {k: v for k, v in opts.items() if k != "class_weight"}
    if opts.get("class_weight"):
        ours_opts["class_weight"] = cw
    ours = gl.multiclass_hinge.value_and_grad(z, t, reduction=reduction, **ours_opts)
    _assert_peer(ours, torch_value_and_grad(torch, peer, z, t))


def test_multiclass_hinge_edges_and_refusals():
    # ties: the gradient goes to the first of the largest other scores; at the margin, nothing
    z = np.array([[1.0, 2.0, 2.0, 0.0], [2.0, 1.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.5]])
    v, g = gl.multiclass_hinge.value_and_grad(z, np.array([0, 0, 3]), reduction="none")
    assert v.tolist() == [2.0, 0.0, 1.0]
    assert g.tolist() == [[-1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, -1]]
    # one class: nothing to beat
    v, g = gl.multiclass_hinge.value_and_grad(np.array([[3.0], [-1.0]]), np.array([0, 0]),
                                              reduction="none")
    assert v.tolist() == [0.0, 0.0] and g.tolist() == [[0.0], [0.0]]
    # an ignored sample adds 0 even where its margin is infinite
    v = gl.multiclass_hinge(np.array([[np.inf, 0, 0], [1.0, 2.0, 0.0]]), np.array([1, 0]),
                            ignore_index=1, reduction="none")
    assert v.tolist() == [0.0, 2.0]
    # every sample ignored: NaN mean, zero gradient (as cce)
    v, g = gl.multiclass_hinge.value_and_grad(z, np.array([1, 1, 1]), ignore_index=1)
    assert np.isnan(v) and (g == 0).all()
    # NaN: that row only
    z_nan = z.copy()
    z_nan[1, 3] = np.nan
    v, g = gl.multiclass_hinge.value_and_grad(z_nan, np.array([0, 0, 3]), reduction="none")
    assert np.isnan(v[1]) and np.isnan(g[1]).all() and np.isfinite(v[[0, 2]]).all()
    with pytest.raises(TypeError, match="multiclass_hinge needs class indices"):
        gl.multiclass_hinge(z, np.full(z.shape, 0.25))
    with pytest.raises(ValueError, match="margin"):
        gl.multiclass_hinge(z, np.array([0, 0, 3]), margin=-1.0)
    with pytest.raises(ValueError, match="class indices in"):
        gl.multiclass_hinge(z, np.array([0, 0, 4]))


# ---------------------------------------------------------------------------------------------
# cce_with_logits' focal_gamma and z_loss


def _keras_categorical_focal(torch, logits, y, gamma):
    """Keras' CategoricalFocalCrossentropy(from_logits=True, alpha=1) without its clipping:
    Σ_k -y_k (1 - q_k)^gamma log q_k, q = softmax (log q from log_softmax)."""
    log_q = torch.log_softmax(logits, -1)
    return -(y * (1 - log_q.exp()) ** gamma * log_q).sum(-1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("labels", [True, False])
def test_focal_cce_matches_keras(reduction, gamma, labels):
    torch = require("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(27)
    z, t = make_inputs("cce_with_logits", rng, (30, 5), labels=labels)
    cw = rng.uniform(0.2, 2, 5)
    w = rng.uniform(0.1, 2, 30)
    y = np.eye(5)[t] if labels else t
    denom = float((w * cw[t]).sum()) if labels else float(w.sum())

    def peer(x, _):
        per = _keras_categorical_focal(torch, x, torch.tensor(y * cw), gamma) * torch.tensor(w)
        return {"mean": per.sum() / denom, "sum": per.sum(), "none": per}[reduction]

    ours = gl.cce_with_logits.value_and_grad(z, t, reduction=reduction, focal_gamma=gamma,
                                             class_weight=cw, sample_weight=w)
    _assert_peer(ours, torch_value_and_grad(torch, peer, z, t))
    del F


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_z_loss_matches_liger(reduction, label_smoothing):
    """Liger-Kernel's cross-entropy with lse_square_scale (PaLM's z-loss): the cross-entropy
    plus z lse^2 per counted sample, the mean over the counted samples."""
    torch = require("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(28)
    z, t = make_inputs("cce_with_logits", rng, (30, 7))
    t[:3] = -100
    scale = 1e-2

    def peer(x, y):
        ce = F.cross_entropy(x, y, reduction="none", ignore_index=-100,
                             label_smoothing=label_smoothing)
        lse = torch.logsumexp(x, -1)
        per = ce + scale * lse**2 * (y != -100)
        return {"mean": per.sum() / float((t != -100).sum()), "sum": per.sum(),
                "none": per}[reduction]

    ours = gl.cce_with_logits.value_and_grad(z, t, reduction=reduction, z_loss=scale,
                                             ignore_index=-100, label_smoothing=label_smoothing)
    _assert_peer(ours, torch_value_and_grad(torch, peer, z, t))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_cce_is_finite_at_saturation(dtype, gamma):
    big = 3e38 if dtype == np.float32 else 1e300
    z = np.array([[big, 0.0, -big], [1e4, -1e4, 0.0], [-big, -big, -big], [0, 0, 0]], dtype)
    for t in (np.array([0, 1, 2, 0]), np.array([1, 0, 0, 2])):
        v, g = gl.cce_with_logits.value_and_grad(z, t, focal_gamma=gamma, z_loss=0.0,
                                                 reduction="none")
        assert np.isfinite(v).all() and np.isfinite(g).all(), (v, g)
    # a right and confident prediction: no loss, no pull, whatever gamma
    v, g = gl.cce_with_logits.value_and_grad(z[:1], np.array([0]), focal_gamma=gamma,
                                             reduction="none")
    assert v[0] == 0 and (g == 0).all()


def test_focal_and_z_loss_defaults_are_the_cross_entropy_bit_for_bit():
    rng = np.random.default_rng(29)
    for labels in (True, False):
        z, t = make_inputs("cce_with_logits", rng, (200, 9), labels=labels)
        plain = gl.cce_with_logits.value_and_grad(z, t, reduction="none", label_smoothing=0.1)
        got = gl.cce_with_logits.value_and_grad(z, t, reduction="none", label_smoothing=0.1,
                                                focal_gamma=0.0, z_loss=0.0)
        assert got[0].tobytes() == plain[0].tobytes() and got[1].tobytes() == plain[1].tobytes()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="focal_gamma"):
            gl.cce_with_logits(z, t, focal_gamma=bad)
        with pytest.raises(ValueError, match="z_loss"):
            gl.cce_with_logits(z, t, z_loss=bad)


@pytest.mark.parametrize("variant", ["bce_with_logits+focal", "cce_with_logits+focal",
                                     "cce_with_logits+z_loss", "kl_div_with_logits+T2"])
def test_the_benchmarks_option_variants_compute_the_same_loss(variant):
    """The CPU benchmark's naive NumPy and PyTorch contenders for the option variants compute
    what we do (so its ratios compare like with like)."""
    torch = require("torch")
    from gpuloss import _bench_cpu

    loss, opts, naive, peer, target_logits = _bench_cpu.VARIANTS[variant]
    fn = gl.LOSSES[loss]
    rng = np.random.default_rng(30)
    if fn.family == "categorical":
        z = 2 * rng.standard_normal((50, 6))
        t = 2 * rng.standard_normal((50, 6)) if target_logits else rng.integers(0, 6, 50)
    else:
        z, t = 3 * rng.standard_normal(300), rng.uniform(0, 1, 300)
    ours = fn.value_and_grad(z, t, **opts)
    np.testing.assert_allclose(naive(np, z, t)[0], ours[0], rtol=1e-10)
    np.testing.assert_allclose(naive(np, z, t)[1], ours[1], rtol=1e-9, atol=1e-15)
    theirs = torch_value_and_grad(torch, lambda x, y: peer(torch.nn.functional, x, y), z, t)
    _assert_peer(ours, theirs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_kl_div_with_logits_is_finite_at_saturation(dtype, temperature):
    big = 1e4 if dtype == np.float32 else 1e30
    z = np.array([[big, 0.0, -big], [-big, 0.0, big], [0.0, 0.0, 0.0]], dtype)
    teacher = z[:, ::-1].copy()
    v, g = gl.kl_div_with_logits.value_and_grad(z, teacher, target_logits=True,
                                                temperature=temperature, reduction="none")
    assert np.isfinite(v).all() and np.isfinite(g).all(), (v, g)
    # the teacher puts its mass where the student puts none: the loss is about
    # T^2 (2 big / T) = 2 T big, for the two saturated rows
    np.testing.assert_allclose(v[:2].astype(np.float64), 2 * temperature * big, rtol=1e-6)
    np.testing.assert_allclose(g[:2].astype(np.float64),
                               temperature * np.array([[1, 0, -1], [-1, 0, 1]]), rtol=1e-6)


@pytest.mark.parametrize("opts", [{"focal_gamma": 0.5}, {"z_loss": 1e-3},
                                  {"focal_gamma": 2.0, "z_loss": 1e-3, "label_smoothing": 0.1}])
def test_focal_and_z_loss_with_every_sample_ignored(opts):
    """All ignored: NaN mean, zero gradient, as cce; 'sum' and 'none' are 0."""
    z = np.array([[1e4, 0.0, -1e4], [1.0, 2.0, 3.0]])
    t = np.array([1, 1])
    v, g = gl.cce_with_logits.value_and_grad(z, t, ignore_index=1, **opts)
    assert np.isnan(v) and (g == 0).all()
    v, g = gl.cce_with_logits.value_and_grad(z, t, ignore_index=1, reduction="none", **opts)
    assert (v == 0).all() and (g == 0).all()
