"""linear_cross_entropy: the chunked linear layer + cross-entropy against its composition
(cce_with_logits of hidden @ weight.T + bias, and the chain rule), against PyTorch's
F.linear_cross_entropy, its memory, its errors and its autograd; and cce_with_logits'
softcap, which the two share."""

from __future__ import annotations

import math
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from conftest import require

import gpuloss as gl

BF16 = ml_dtypes.bfloat16


def _inputs(rng, N=37, H=8, V=11, dtype=np.float64, labels=True, lead=None):
    h = rng.normal(size=(N, H)).astype(dtype)
    W = (rng.normal(size=(V, H)) / 2).astype(dtype)
    b = rng.normal(size=V).astype(dtype)
    t = rng.integers(0, V, N) if labels else rng.dirichlet(np.ones(V), N).astype(dtype)
    if lead is not None:
        h = h.reshape(*lead, H)
        t = t.reshape(lead) if labels else t.reshape(*lead, V)
    return h, W, b, t


def composition(h, W, t, b=None, **options):
    """cce_with_logits on the whole logits, in float64, and the chain rule."""
    h64, W64 = h.astype(np.float64), W.astype(np.float64)
    z = h64 @ W64.T + (0.0 if b is None else b.astype(np.float64))
    t = t if t.dtype.kind in "iu" else t.astype(np.float64)
    value, G = gl.cce_with_logits.value_and_grad(z, t, **options)
    V, H = W.shape
    G2 = G.reshape(-1, V)
    grads = (G @ W64, G2.T @ h64.reshape(-1, H), G2.sum(axis=0))
    return value, grads if b is not None else grads[:2]


OPTION_SETS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.2},
    {"z_loss": 1e-2},
    {"focal_gamma": 2.0},
    {"softcap": 3.0},
    {"ignore_index": 3},
    {"class_weight": "random"},
    {"sample_weight": "random"},
    {"label_smoothing": 0.1, "z_loss": 1e-3, "focal_gamma": 1.0, "softcap": 5.0,
     "class_weight": "random", "sample_weight": "random", "reduction": "sum"},
]


def _options(rng, options, N, V):
    out = dict(options)
    if out.get("class_weight") == "random":
        out["class_weight"] = rng.random(V) + 0.1
    if out.get("sample_weight") == "random":
        out["sample_weight"] = rng.random(N)
    return out


@pytest.mark.parametrize(("options", "labels"), [
    (o, labels) for o in OPTION_SETS for labels in (True, False)
    if labels or "ignore_index" not in o],  # (ignore_index is for class indices)
    ids=lambda x: ("labels" if x else "probabilities") if isinstance(x, bool)
    else "-".join(x) or "plain")
def test_equals_the_composition_in_float64(options, labels):
    rng = np.random.default_rng(7)
    h, W, b, t = _inputs(rng, labels=labels)
    if "ignore_index" in options:
        t[::4] = options["ignore_index"]
    opts = _options(rng, options, len(h), len(W))
    for bias in (None, b):
        for chunk_mb in (1e-4, 256):  # one row per chunk, and one chunk
            value, grads = gl.linear_cross_entropy.value_and_grad(
                h, W, t, bias=bias, chunk_mb=chunk_mb, **opts)
            ref_value, ref_grads = composition(h, W, t, bias, **opts)
            np.testing.assert_allclose(value, ref_value, rtol=1e-12, atol=1e-14)
            assert len(grads) == len(ref_grads) == (2 if bias is None else 3)
            for g, r, x in zip(grads, ref_grads, (h, W, b)):
                assert g.shape == x.shape and g.dtype == x.dtype
                np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-14)
            alone = gl.linear_cross_entropy(h, W, t, bias=bias, chunk_mb=chunk_mb, **opts)
            np.testing.assert_array_equal(alone, value)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16],
                         ids=["float32", "float16", "bfloat16"])
def test_narrow_dtypes_compute_in_float32_and_return_their_dtype(dtype):
    rng = np.random.default_rng(3)
    h, W, b, t = _inputs(rng, N=64, H=16, V=50, dtype=dtype)
    value, (dh, dw, db) = gl.linear_cross_entropy.value_and_grad(h, W, t, bias=b,
                                                                  chunk_mb=1e-3)
    ref_value, (rh, rw, rb) = composition(h, W, t, b)  # float64 from the same inputs
    assert value.dtype == dh.dtype == dw.dtype == db.dtype == np.dtype(dtype)
    per_token = gl.linear_cross_entropy(h, W, t, bias=b, reduction="none", chunk_mb=1e-3)
    assert per_token.dtype == np.dtype(dtype) and per_token.shape == t.shape
    # float32 arithmetic, then one rounding to the output dtype
    out_eps = 2.0 ** -7 if dtype is BF16 else np.finfo(dtype).eps
    tol = max(out_eps, 1e-5)
    np.testing.assert_allclose(np.float64(value), ref_value, rtol=tol)
    for g, r in ((dh, rh), (dw, rw), (db, rb)):
        np.testing.assert_allclose(g.astype(np.float64), r, rtol=tol,
                                   atol=tol * np.abs(r).max())


def test_results_do_not_depend_on_the_chunk_size_beyond_rounding():
    rng = np.random.default_rng(5)
    h, W, b, t = _inputs(rng, N=300, H=32, V=200, dtype=np.float32)
    ref_value, ref = gl.linear_cross_entropy.value_and_grad(h, W, t, bias=b, chunk_mb=1000)
    for chunk_mb in (0.01, 0.05, 0.1):  # 13, 65, 131 rows per chunk
        value, grads = gl.linear_cross_entropy.value_and_grad(h, W, t, bias=b,
                                                              chunk_mb=chunk_mb)
        np.testing.assert_allclose(value, ref_value, rtol=1e-6)
        for g, r in zip(grads, ref):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * np.abs(r).max())
    again = gl.linear_cross_entropy.value_and_grad(h, W, t, bias=b, chunk_mb=0.05)
    value, grads = gl.linear_cross_entropy.value_and_grad(h, W, t, bias=b, chunk_mb=0.05)
    assert value == again[0]  # a fixed chunk order: bit-identical repeats
    for g, r in zip(grads, again[1]):
        np.testing.assert_array_equal(g, r)


def test_leading_axes_and_reduction_none_shapes():
    rng = np.random.default_rng(1)
    h, W, b, t = _inputs(rng, N=24, lead=(2, 3, 4))
    per = gl.linear_cross_entropy(h, W, t, bias=b, reduction="none", chunk_mb=1e-4)
    assert per.shape == (2, 3, 4)
    ref, _ = composition(h, W, t, b, reduction="none")
    np.testing.assert_allclose(per, ref, rtol=1e-12)
    dh, dw, db = gl.linear_cross_entropy.grad(h, W, t, bias=b, reduction="none")
    assert dh.shape == h.shape and dw.shape == W.shape and db.shape == b.shape


def test_forward_only_matches_and_inputs_are_not_modified():
    rng = np.random.default_rng(2)
    h, W, b, t = _inputs(rng, dtype=np.float32)
    copies = [x.copy() for x in (h, W, b, t)]
    value = gl.linear_cross_entropy(h, W, t, bias=b, chunk_mb=1e-4)
    both, _ = gl.linear_cross_entropy.value_and_grad(h, W, t, bias=b, chunk_mb=1e-4)
    assert value == both
    for x, c in zip((h, W, b, t), copies):
        np.testing.assert_array_equal(x, c)


def test_nothing_counted_gives_nan_and_zero_gradients_as_cce_with_logits():
    rng = np.random.default_rng(4)
    h, W, _, t = _inputs(rng)
    t[:] = -100
    value, (dh, dw) = gl.linear_cross_entropy.value_and_grad(h, W, t, ignore_index=-100)
    z_value = gl.cce_with_logits(h @ W.T, t, ignore_index=-100)
    assert math.isnan(float(value)) and math.isnan(float(z_value))
    assert not dh.any() and not dw.any()
    empty, (eh, ew) = gl.linear_cross_entropy.value_and_grad(h[:0], W, t[:0],
                                                             reduction="sum")
    assert float(empty) == 0.0 and eh.shape == (0, h.shape[1]) and not ew.any()


def test_memory_stays_within_the_chunk_budget(monkeypatch):
    """The whole logits (N × V float32 = 32 MB here) never exist: the call's peak above its
    outputs is one chunk of logits (the budget, 4 MB) and the blocks of the row pass. One
    thread: each thread keeps its row-pass scratch from call to call (allocated in the
    warm-up), and with two, which thread takes which block depends on the machine's load (a
    helper thread that took no block in the warm-up allocated its scratch in the measured
    call: a flaky failure in CI)."""
    monkeypatch.setenv("GPULOSS_NUM_THREADS", "1")
    rng = np.random.default_rng(6)
    N, H, V = 2048, 64, 4096
    h = rng.normal(size=(N, H)).astype(np.float32)
    W = (rng.normal(size=(V, H)) / 8).astype(np.float32)
    t = rng.integers(0, V, N)
    chunk_mb = 4
    gl.linear_cross_entropy.value_and_grad(h, W, t, chunk_mb=chunk_mb)  # warm: thread scratch
    tracemalloc.start()
    try:
        value, (dh, dw) = gl.linear_cross_entropy.value_and_grad(h, W, t, chunk_mb=chunk_mb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    outputs = dh.nbytes + dw.nbytes
    extra = peak - outputs
    logits = N * V * 4
    assert extra <= 1.1 * chunk_mb * 2**20, (extra / 2**20, logits / 2**20)
    ref_value, _ = composition(h, W, t)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: {**a, "weight": a["weight"][:, :-1]}, ValueError, "weight must have shape"),
        (lambda a: {**a, "weight": a["weight"].astype(np.float32)}, TypeError,
         "weight has dtype float32"),
        (lambda a: {**a, "bias": a["bias"][:-1]}, ValueError, "bias must have shape"),
        (lambda a: {**a, "target": a["target"][:-1]}, ValueError, "class-index target"),
        (lambda a: {**a, "target": np.ones((37, 3))}, ValueError, "probability targets"),
        (lambda a: {**a, "hidden": a["hidden"].astype(np.int64)}, TypeError,
         "hidden to have a real floating"),
        (lambda a: {**a, "chunk_mb": 0}, ValueError, "chunk_mb"),
        (lambda a: {**a, "chunk_mb": "1"}, TypeError, "chunk_mb must be a number"),
        (lambda a: {**a, "axis": 0}, TypeError, "no class axis"),
        (lambda a: {**a, "weight_": 1}, TypeError, "unexpected keyword argument 'weight_'"),
        (lambda a: {**a, "label_smoothing": 2.0}, ValueError, "label_smoothing"),
        (lambda a: {**a, "softcap": 0.0}, ValueError, "softcap"),
        (lambda a: {**a, "sample_weight": np.ones(5)}, ValueError, "sample_weight"),
        (lambda a: {**a, "target": a["target"] + 100}, ValueError, "class indices"),
    ],
)
def test_clear_errors_name_the_argument(change, error, match):
    rng = np.random.default_rng(0)
    h, W, b, t = _inputs(rng)
    args = change({"hidden": h, "weight": W, "target": t, "bias": b})
    with pytest.raises(error, match=match):
        gl.linear_cross_entropy(**args)


def test_options_are_keyword_only():
    rng = np.random.default_rng(0)
    h, W, b, t = _inputs(rng)
    with pytest.raises(TypeError, match="keyword-only"):
        gl.linear_cross_entropy(h, W, t, b)


def test_generic_array_api_path_agrees_with_numpy():
    xps = require("array_api_strict")
    rng = np.random.default_rng(8)
    h, W, b, t = _inputs(rng, dtype=np.float64)
    value, grads = gl.linear_cross_entropy.value_and_grad(
        xps.asarray(h), xps.asarray(W), xps.asarray(t), bias=xps.asarray(b), chunk_mb=1e-4,
        label_smoothing=0.1)
    ref_value, ref = gl.linear_cross_entropy.value_and_grad(h, W, t, bias=b,
                                                            label_smoothing=0.1)
    np.testing.assert_allclose(np.asarray(value), ref_value, rtol=1e-12)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# PyTorch


def _torch_peer_options(options):
    out = dict(options)
    if "class_weight" in out:
        out["weight"] = out.pop("class_weight")
    out.setdefault("ignore_index", -100)
    return out


@pytest.mark.parametrize("options", [{}, {"reduction": "sum"}, {"reduction": "none"},
                                     {"label_smoothing": 0.1, "ignore_index": 2},
                                     {"class_weight": "random"}],
                         ids=lambda o: "-".join(o) or "plain")
def test_matches_torch_linear_cross_entropy_values_and_backward(options):
    torch = require("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(11)
    h, W, b, t = _inputs(rng)
    opts = _options(rng, options, len(h), len(W))
    if "class_weight" in opts:
        opts["class_weight"] = torch.tensor(opts["class_weight"])
    N = len(h)
    upstream = torch.tensor(rng.random(N) + 0.5) if opts.get("reduction") == "none" else \
        torch.tensor(1.7, dtype=torch.float64)
    results = []
    for fn in ("gpuloss", "torch"):
        ht, Wt, bt = (torch.tensor(x, requires_grad=True) for x in (h, W, b))
        if fn == "gpuloss":
            loss = gl.linear_cross_entropy(ht, Wt, torch.tensor(t), bias=bt, chunk_mb=1e-4,
                                           **opts)
        else:
            loss = F.linear_cross_entropy(ht, Wt, torch.tensor(t), linear_bias=bt,
                                          **_torch_peer_options(opts))
        (loss * upstream).sum().backward()  # non-uniform upstream gradients with 'none'
        results.append((loss.detach().numpy(), ht.grad.numpy(), Wt.grad.numpy(),
                        bt.grad.numpy()))
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_backward_with_every_option_matches_a_torch_formula(reduction):
    """z_loss and softcap, which PyTorch's loss lacks, against autograd through their
    formulas; 'none' with a non-uniform upstream gradient."""
    torch = require("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(12)
    h, W, b, t = _inputs(rng)
    cap, zl, ls = 4.0, 1e-2, 0.1
    upstream = torch.tensor(rng.random(len(h)) - 0.3)  # negative ones too
    grads = []
    for fn in ("gpuloss", "formula"):
        ht, Wt, bt = (torch.tensor(x, requires_grad=True) for x in (h, W, b))
        tt = torch.tensor(t)
        if fn == "gpuloss":
            loss = gl.linear_cross_entropy(ht, Wt, tt, bias=bt, softcap=cap, z_loss=zl,
                                           label_smoothing=ls, reduction=reduction,
                                           chunk_mb=2e-4)
        else:
            z = cap * torch.tanh((ht @ Wt.T + bt) / cap)
            lse = torch.logsumexp(z, dim=-1)
            loss = F.cross_entropy(z, tt, label_smoothing=ls, reduction="none") + zl * lse**2
            loss = loss.mean() if reduction == "mean" else loss
        (loss * (upstream if reduction == "none" else 1.0)).sum().backward()
        grads.append((loss.detach().numpy(), ht.grad.numpy(), Wt.grad.numpy(),
                      bt.grad.numpy()))
    for ours, theirs in zip(*grads):
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-13)


def test_torch_frozen_layer_tied_weights_and_no_second_derivative():
    torch = require("torch")
    rng = np.random.default_rng(13)
    h, W, _, t = _inputs(rng, dtype=np.float32)
    ht = torch.tensor(h, requires_grad=True)
    frozen = torch.tensor(W)
    gl.linear_cross_entropy(ht, frozen, torch.tensor(t)).backward()
    assert ht.grad is not None and frozen.grad is None
    # a weight used twice (tied embeddings): its gradients add up
    Wt = torch.tensor(W, requires_grad=True)
    (gl.linear_cross_entropy(ht.detach(), Wt, torch.tensor(t)) + Wt.sum()).backward()
    _, dw = gl.linear_cross_entropy.grad(h, W, t)
    np.testing.assert_allclose(Wt.grad.numpy(), dw + 1, rtol=1e-5)
    with pytest.raises(RuntimeError, match="no second derivative"):
        loss = gl.linear_cross_entropy(ht, Wt, torch.tensor(t))
        torch.autograd.grad(loss, ht, create_graph=True)
    # a retained graph's second backward (two autograd.grad calls) gives the same gradients
    loss = gl.linear_cross_entropy(ht, Wt, torch.tensor(t))
    first = torch.autograd.grad(loss, ht, retain_graph=True)[0]
    second = torch.autograd.grad(loss, (ht, Wt))
    torch.testing.assert_close(first, second[0], rtol=0, atol=0)
    np.testing.assert_allclose(second[1].numpy(), dw, rtol=1e-5, atol=1e-7)
    soft = torch.tensor(rng.dirichlet(np.ones(W.shape[0]), len(h)).astype(np.float32),
                        requires_grad=True)
    with pytest.raises(RuntimeError, match="target requires grad"):
        gl.linear_cross_entropy(ht, Wt, soft)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_gradcheck(reduction):
    torch = require("torch")
    rng = np.random.default_rng(20)
    h, W, b, t = _inputs(rng, N=6, H=3, V=5)
    args = tuple(torch.tensor(x, requires_grad=True) for x in (h, W, b))
    assert torch.autograd.gradcheck(
        lambda hh, WW, bb: gl.linear_cross_entropy(hh, WW, torch.tensor(t), bias=bb,
                                                   reduction=reduction, label_smoothing=0.1,
                                                   chunk_mb=1e-4), args)


def test_torch_module_takes_the_lm_head():
    torch = require("torch")
    import gpuloss.torch as gt

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40)
    criterion = gt.LinearCrossEntropy(head, label_smoothing=0.1, chunk_mb=1e-3)
    assert dict(criterion.named_parameters()).keys() == {"lm_head.weight", "lm_head.bias"}
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    target = torch.randint(0, 40, (2, 5))
    criterion(hidden, target).backward()
    ref = torch.nn.functional.cross_entropy(head(hidden).reshape(-1, 40), target.reshape(-1),
                                            label_smoothing=0.1)
    gh, gw, gb = torch.autograd.grad(ref, (hidden, head.weight, head.bias))
    torch.testing.assert_close(hidden.grad, gh)
    torch.testing.assert_close(head.weight.grad, gw)
    torch.testing.assert_close(head.bias.grad, gb)
    with pytest.raises(TypeError, match="lm_head must be a module with a 2-D weight"):
        gt.LinearCrossEntropy(torch.nn.ReLU())
    with pytest.raises(TypeError, match="no option 'axis'"):
        gt.LinearCrossEntropy(head, axis=1)
    one_chunk = criterion(hidden.detach(), target, chunk_mb=100, label_smoothing=0.0)
    torch.testing.assert_close(one_chunk, torch.nn.functional.cross_entropy(
        head(hidden.detach()).reshape(-1, 40), target.reshape(-1)))


# ---------------------------------------------------------------------------------------------
# cce_with_logits' softcap


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "probabilities"])
def test_softcap_is_the_capped_logits_and_the_chain_rule(labels, dtype):
    rng = np.random.default_rng(21)
    z = (rng.normal(size=(40, 9)) * 30).astype(dtype)
    t = rng.integers(0, 9, 40) if labels else rng.dirichlet(np.ones(9), 40).astype(dtype)
    cap = 10.0
    for extra in ({}, {"focal_gamma": 2.0, "z_loss": 1e-3, "label_smoothing": 0.1}):
        value, grad = gl.cce_with_logits.value_and_grad(z, t, softcap=cap, **extra)
        x = z.astype(np.float64) / cap
        capped_value, capped_grad = gl.cce_with_logits.value_and_grad(
            cap * np.tanh(x), t if labels else t.astype(np.float64), **extra)
        tol = 1e-12 if dtype == np.float64 else 2e-6
        np.testing.assert_allclose(value, capped_value, rtol=tol)
        np.testing.assert_allclose(grad, capped_grad / np.cosh(x) ** 2, rtol=tol * 10,
                                   atol=tol * np.abs(capped_grad).max())


def test_softcap_at_the_edges():
    z = np.array([[np.inf, 0.0, -np.inf], [1e30, -1e30, 0.0], [np.nan, 1.0, 2.0],
                  [1e-30, -1e-30, 0.0]])
    t = np.array([0, 1, 2, 0])
    value, grad = gl.cce_with_logits.value_and_grad(z, t, softcap=5.0, reduction="none")
    capped = np.array([[5.0, 0.0, -5.0], [5.0, -5.0, 0.0], [np.nan, 1.0, 2.0],
                       [1e-30, -1e-30, 0.0]])
    capped[2, 1:] = 5 * np.tanh(capped[2, 1:] / 5)
    ref = gl.cce_with_logits(capped, t, reduction="none")
    np.testing.assert_allclose(value, ref, rtol=1e-15)
    assert np.isnan(grad[2]).all()
    # the cap's derivative is 0 at +-inf and at +-1e30 (the logit cannot move the loss), 1 at 0
    assert (grad[0, [0, 2]] == 0).all() and (grad[1, :2] == 0).all()
    np.testing.assert_allclose(grad[3], gl.cce_with_logits.grad(capped[3:], t[3:],
                                                                 reduction="none")[0])


def test_softcap_on_the_generic_path_agrees_with_numpy():
    xps = require("array_api_strict")
    rng = np.random.default_rng(22)
    z = rng.normal(size=(12, 7)) * 20
    t = rng.integers(0, 7, 12)
    ours = gl.cce_with_logits.value_and_grad(xps.asarray(z), xps.asarray(t), softcap=8.0)
    ref = gl.cce_with_logits.value_and_grad(z, t, softcap=8.0)
    np.testing.assert_allclose(np.asarray(ours[0]), ref[0], rtol=1e-14)
    np.testing.assert_allclose(np.asarray(ours[1]), ref[1], rtol=1e-12, atol=1e-17)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's own (torch.jit ...)
# dynamo's own, which it hides itself outside pytest's warnings-as-errors (safe_has_grad)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_torch_compile_runs_the_call_eagerly_inside_a_compiled_function():
    torch = require("torch")
    rng = np.random.default_rng(14)
    h, W, _, t = _inputs(rng, dtype=np.float32)

    def step(hidden, weight, target):
        return gl.linear_cross_entropy(torch.relu(hidden), weight, target) * 2

    grads = []
    for fn in (torch.compile(step), step):
        ht, Wt = torch.tensor(h, requires_grad=True), torch.tensor(W, requires_grad=True)
        loss = fn(ht, Wt, torch.tensor(t))
        loss.backward()
        grads.append((loss.detach(), ht.grad, Wt.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# JAX


@pytest.mark.parametrize("options", [{}, {"reduction": "sum"},
                                     {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0,
                                      "ignore_index": 2, "class_weight": "random"}],
                         ids=lambda o: "-".join(o) or "plain")
def test_jax_jit_grad_equals_numpy(options):
    jax = require("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(15)
    h, W, b, t = _inputs(rng, dtype=np.float32)
    opts = _options(rng, options, len(h), len(W))
    ref_value, ref = gl.linear_cross_entropy.value_and_grad(h, W, t, bias=b, **opts)
    jopts = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in opts.items()}

    def loss(hh, WW, bb):
        return gl.linear_cross_entropy(hh, WW, jnp.asarray(t), bias=bb, chunk_mb=2e-4, **jopts)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
        jnp.asarray(h), jnp.asarray(W), jnp.asarray(b))
    np.testing.assert_allclose(float(value), ref_value, rtol=1e-5)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-4, atol=1e-6 * np.abs(r).max())
    eager_value, eager = gl.linear_cross_entropy.value_and_grad(
        jnp.asarray(h), jnp.asarray(W), jnp.asarray(t), bias=jnp.asarray(b), chunk_mb=2e-4,
        **jopts)
    np.testing.assert_allclose(float(eager_value), ref_value, rtol=1e-5)
    assert len(eager) == 3


def test_jax_reduction_none_with_any_cotangent_and_vmap():
    jax = require("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(16)
    h, W, _, t = _inputs(rng, dtype=np.float32)
    up = (rng.random(len(h)) - 0.3).astype(np.float32)  # negative cotangents too

    def weighted(hh, WW):
        per = gl.linear_cross_entropy(hh, WW, jnp.asarray(t), reduction="none", chunk_mb=2e-4)
        return jnp.sum(per * up)

    grads = jax.grad(weighted, argnums=(0, 1))(jnp.asarray(h), jnp.asarray(W))
    ref = gl.linear_cross_entropy.grad(h, W, t, reduction="sum", sample_weight=up,
                                       validate=False)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-4, atol=1e-6 * np.abs(r).max())
    batch = np.stack([h, h[::-1], 2 * h])
    per_sequence = jax.vmap(lambda x: gl.linear_cross_entropy(x, jnp.asarray(W), jnp.asarray(t),
                                                              chunk_mb=2e-4))(jnp.asarray(batch))
    np.testing.assert_allclose(np.asarray(per_sequence),
                               [gl.linear_cross_entropy(x, W, t) for x in batch], rtol=1e-5)


def test_jax_never_holds_the_logits_under_jit():
    """XLA's own memory analysis of the compiled loss-and-gradient: its temporaries are a few
    chunks, fixed as the tokens double, far below the logits."""
    jax = require("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(17)
    H, V, chunk_mb = 64, 4096, 2
    temps = []
    for N in (2048, 4096):
        h = jnp.asarray(rng.normal(size=(N, H)).astype(np.float32))
        W = jnp.asarray((rng.normal(size=(V, H)) / 8).astype(np.float32))
        t = jnp.asarray(rng.integers(0, V, N))
        fn = jax.jit(jax.value_and_grad(
            lambda hh, WW, tt: gl.linear_cross_entropy(hh, WW, tt, chunk_mb=chunk_mb),
            argnums=(0, 1)))
        temp = fn.lower(h, W, t).compile().memory_analysis().temp_size_in_bytes
        temps.append(temp)
        assert temp < N * V * 4 / 4, (temp / 2**20, N * V * 4 / 2**20)
    assert temps[1] <= temps[0] * 1.1 + H * 4096 * 4  # (d_hidden grows with N, the rest not)


# ---------------------------------------------------------------------------------------------
# Dask


@pytest.mark.parametrize("options", [{}, {"reduction": "sum"}, {"reduction": "none"},
                                     {"ignore_index": 2, "label_smoothing": 0.1,
                                      "sample_weight": "random"}],
                         ids=lambda o: "-".join(o) or "plain")
def test_dask_blocks_of_tokens_equal_one_call(options):
    da = require("dask.array")
    rng = np.random.default_rng(18)
    h, W, b, t = _inputs(rng, N=50)
    opts = _options(rng, options, len(h), len(W))
    t[::7] = 2 if "ignore_index" in opts else t[::7]
    lazy = dict(opts)
    if "sample_weight" in lazy:
        lazy["sample_weight"] = da.from_array(opts["sample_weight"], chunks=17)
    value, grads = gl.linear_cross_entropy.value_and_grad(
        da.from_array(h, chunks=(17, 8)), W, da.from_array(t, chunks=17), bias=b,
        chunk_mb=1e-4, **lazy)
    assert isinstance(value, da.Array) and all(isinstance(g, da.Array) for g in grads)
    ref_value, ref = gl.linear_cross_entropy.value_and_grad(h, W, t, bias=b, **opts)
    np.testing.assert_allclose(value.compute(), ref_value, rtol=1e-12)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g.compute(), r, rtol=1e-10, atol=1e-15)


def test_dask_takes_the_weight_in_memory():
    da = require("dask.array")
    rng = np.random.default_rng(19)
    h, W, _, t = _inputs(rng)
    with pytest.raises(TypeError, match=r"weight.compute\(\)"):
        gl.linear_cross_entropy(da.from_array(h), da.from_array(W), da.from_array(t))
    with pytest.raises(ValueError, match="Shape mismatch"):
        gl.linear_cross_entropy(da.from_array(h), W, da.from_array(t[:-1]))


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "probabilities"])
@pytest.mark.parametrize(("weights", "reduction"), [
    ({"class_weight": 1e37}, "mean"), ({"sample_weight": 2e38}, "mean"),
    ({"class_weight": 1e-36}, "mean"), ({"sample_weight": 1e-42}, "mean"),
    ({"sample_weight": 1e30}, "sum"), ({"class_weight": 1e-35}, "none")],
    ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v:g}" for k, v in x.items()))
def test_extreme_weights_in_float32_give_the_composition(weights, reduction, labels):
    """Each chunk's gradient is that of its sum until 1/D at the end: weights far from 1 are
    rescaled first, so float32 neither overflows nor underflows where the mean does not."""
    rng = np.random.default_rng(23)
    h, W, _, t = _inputs(rng, N=256, H=16, V=50, dtype=np.float32, labels=labels)
    opts = {"reduction": reduction}
    for name, scale in weights.items():
        n = len(W) if name == "class_weight" else len(h)
        opts[name] = ((rng.random(n) + 0.5) * scale).astype(np.float32)
    value, (dh, dw) = gl.linear_cross_entropy.value_and_grad(h, W, t, chunk_mb=0.01, **opts)
    ref_value, (rh, rw) = composition(h, W, t, **{k: v.astype(np.float64) if isinstance(
        v, np.ndarray) else v for k, v in opts.items()})
    assert np.isfinite(value).all() and np.isfinite(dh).all() and np.isfinite(dw).all()
    np.testing.assert_allclose(value, ref_value, rtol=2e-6)
    for g, r in ((dh, rh), (dw, rw)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())


def test_reduction_none_backward_takes_scalar_sample_weights():
    torch = require("torch")
    rng = np.random.default_rng(24)
    h, W, _, t = _inputs(rng)
    ht = torch.tensor(h, requires_grad=True)
    gl.linear_cross_entropy(ht, torch.tensor(W), torch.tensor(t), reduction="none",
                            sample_weight=2.0).sum().backward()
    dh, _ = gl.linear_cross_entropy.grad(h, W, t, reduction="sum", sample_weight=2.0)
    np.testing.assert_allclose(ht.grad.numpy(), dh, rtol=1e-12)
