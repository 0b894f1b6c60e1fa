"""PyTorch CPU tensors without an autograd graph take the NumPy backend through zero-copy
views (DESIGN §10), and come back as tensors; tensors that need a graph keep autograd."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_inputs, require
from conftest import run_python as _run
from reference import ALL, CATEGORICAL

import gpuloss as gl
from gpuloss import _dispatch, _torch_build


@pytest.fixture(scope="module")
def torch():
    return require("torch")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("loss", ALL)
def test_torch_cpu_tensors_give_the_numpy_backends_bits(torch, loss, dtype):
    rng = np.random.default_rng(11)
    pred, target = make_inputs(loss, rng, (300, 7), dtype=dtype)
    opts = {"sample_weight": rng.uniform(0.5, 2, 300 if loss in CATEGORICAL else (300, 7))}
    want = gl.LOSSES[loss].value_and_grad(pred, target, **opts)
    tp, tt = torch.from_numpy(pred), torch.from_numpy(np.asarray(target))
    got = gl.LOSSES[loss].value_and_grad(tp, tt, sample_weight=torch.from_numpy(
        opts["sample_weight"]))
    for g, w in zip(got, want):
        assert isinstance(g, torch.Tensor) and g.dtype == tp.dtype
        assert g.numpy().tobytes() == np.asarray(w).tobytes()
    per = gl.LOSSES[loss](tp, tt, reduction="none")
    assert per.numpy().tobytes() == gl.LOSSES[loss](pred, target, reduction="none").tobytes()


def test_which_tensors_take_the_numpy_backend(torch, monkeypatch):
    z = torch.zeros(4, 3)
    assert _dispatch.backend_for(z) is _dispatch._compute_torch_cpu
    # a tensor that needs a graph computes the same way; gpuloss._torch attaches the result
    needs_graph = z.clone().requires_grad_()
    assert _dispatch.backend_for(needs_graph) is _dispatch._compute_torch_cpu
    seen = []
    real = _dispatch._compute_torch_cpu
    monkeypatch.setattr(_dispatch, "_compute_torch_cpu",
                        lambda call: seen.append(call.want_grad) or real(call))
    # (a mean or sum of cce_with_logits with labels takes the C++ node: test_the_common_...)
    out = gl.cce_with_logits(needs_graph, torch.zeros(4, dtype=torch.int64), reduction="none")
    assert seen == [True] and out.grad_fn is not None  # one fused pass, value and gradient


# ---------------------------------------------------------------------------------------------
# autograd: loss.backward() on the fused pass


def _options(loss, rng, shape):
    """A few option sets per loss (weights, smoothing, class weights), as NumPy arrays."""
    sets = [{}, {"reduction": "sum"}, {"reduction": "none"}]
    if loss in CATEGORICAL:
        sets.append({"sample_weight": rng.uniform(0.5, 2, shape[0]),
                     "class_weight": rng.uniform(0.5, 2, shape[1])})
        if loss == "cce_with_logits":
            sets.append({"label_smoothing": 0.1, "reduction": "none"})
    else:
        sets.append({"sample_weight": rng.uniform(0.5, 2, shape)})
        if loss == "bce_with_logits":
            sets.append({"pos_weight": rng.uniform(0.5, 2, shape[1]), "label_smoothing": 0.1})
    return [o for o in sets if set(o) - {"reduction"} <= set(gl.LOSSES[loss].options)]


def _tensors(torch, opts):
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in opts.items()}


@pytest.mark.parametrize("loss", ALL)
def test_backward_is_the_fused_gradient_and_passes_gradcheck(torch, loss):
    rng = np.random.default_rng(13)
    shape = (6, 4)
    pred, target = make_inputs(loss, rng, shape)
    t = torch.from_numpy(np.asarray(target))
    for opts in _options(loss, rng, shape):
        z = torch.from_numpy(pred.copy()).requires_grad_()
        out = gl.LOSSES[loss](z, t, **_tensors(torch, opts))
        assert out.requires_grad and out.grad_fn is not None
        # one pred-sized tensor kept for backward: no logits, no softmax copy (an attribute,
        # not a saved tensor: backward hands it to autograd, which then takes it uncopied;
        # the C++ node keeps it the same way, out of sight)
        if _node_of(out) == "Python node":
            assert len(out.grad_fn.saved_tensors) == 0 and out.grad_fn.grad.shape == z.shape
        weights = torch.from_numpy(rng.uniform(0.5, 2, tuple(out.shape)))
        (out * weights).sum().backward()
        # the derivative of sum(weights * loss): the gradient scaled per sample
        want = gl.LOSSES[loss].grad(pred, target, **opts)
        w = weights.numpy()
        if opts.get("reduction") == "none" and loss in CATEGORICAL:
            w = w[..., None]
        np.testing.assert_allclose(z.grad.numpy(), want * w, rtol=1e-12, atol=1e-15)
        zz = torch.from_numpy(pred.copy()).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x, o=opts: gl.LOSSES[loss](x, t, **_tensors(torch, o)), (zz,),
            eps=1e-6, atol=1e-6, rtol=1e-5)


def test_backward_matches_pytorchs_own_losses(torch):
    F = torch.nn.functional
    rng = np.random.default_rng(14)
    peers = {
        "mse": F.mse_loss,
        "bce": F.binary_cross_entropy,
        "bce_with_logits": F.binary_cross_entropy_with_logits,
        "cce": lambda p, t: F.nll_loss(torch.log(p), t),
        "cce_with_logits": F.cross_entropy,
    }
    for loss, peer in peers.items():
        pred, target = make_inputs(loss, rng, (32, 5))
        ours = torch.from_numpy(pred.copy()).requires_grad_()
        theirs = torch.from_numpy(pred.copy()).requires_grad_()
        t = torch.from_numpy(np.asarray(target))
        a, b = gl.LOSSES[loss](ours, t), peer(theirs, t)
        a.backward()
        b.backward()
        np.testing.assert_allclose(a.item(), b.item(), rtol=1e-12)
        np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-10,
                                   atol=1e-14)


def test_no_graph_under_no_grad_and_plain_tensors_from_grad(torch):
    z = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 3, (8,))
    with torch.no_grad():
        assert not gl.cce_with_logits(z, t).requires_grad
    for result in (gl.cce_with_logits.grad(z, t), *gl.cce_with_logits.value_and_grad(z, t)):
        assert isinstance(result, torch.Tensor) and not result.requires_grad
    assert z.grad is None
    gl.cce_with_logits(z, t).backward()  # a training step: loss.backward() just works
    assert z.grad is not None and z.grad.shape == z.shape


def test_the_inputs_are_viewed_not_copied_and_never_modified(torch, monkeypatch):
    # a small call is computed on the tensors themselves (their addresses, gpuloss.backends.
    # host.compute_torch); a larger one on NumPy views of them (the CPU backends' entry,
    # which hands the views unchanged to the NumPy backend where it does not take them)
    from gpuloss.backends import host as _host_backend

    seen = {}
    real, real_torch = _host_backend.compute, _host_backend.compute_torch

    def spy(call):
        seen["pred"], seen["target"] = call.pred, call.target
        return real(call)

    def spy_torch(call):
        seen["tensors"] = call.pred, call.target
        return real_torch(call)

    monkeypatch.setattr(_host_backend, "compute", spy)
    monkeypatch.setattr(_host_backend, "compute_torch", spy_torch)
    p, y = torch.rand(5000), torch.rand(5000)
    before = p.clone(), y.clone()
    gl.bce.value_and_grad(p, y)
    assert seen["pred"].ctypes.data == p.data_ptr()
    assert seen["target"].ctypes.data == y.data_ptr()
    assert torch.equal(p, before[0]) and torch.equal(y, before[1])
    seen.clear()
    p, y = torch.rand(100), torch.rand(100)
    before = p.clone(), y.clone()
    gl.bce.value_and_grad(p, y)
    assert seen["tensors"][0] is p and seen["tensors"][1] is y and "pred" not in seen
    assert torch.equal(p, before[0]) and torch.equal(y, before[1])


@pytest.fixture(params=["C++ node", "Python node"])
def node(request, torch, monkeypatch):
    """Which autograd node carries a mean of cce_with_logits with labels: gpuloss's compiled
    PyTorch operator's (where it is built: conftest waits for it), or gpuloss._torch's
    _EagerFn, which every other call takes."""
    if request.param == "Python node":
        monkeypatch.setattr(_torch_build, "operator", lambda: None)
    elif _torch_build.wait() is None:
        pytest.skip(f"gpuloss's torch operator: {_torch_build.status()}")
    return request.param


def _node_of(loss):
    return "C++ node" if "KeptGradient" in loss.grad_fn.name() else "Python node"


def test_the_common_call_takes_the_cpp_node(torch):
    """The call of a training step (a mean of cce_with_logits with class indices, float32,
    contiguous CPU tensors) takes the compiled operator's C++ node where it is built (Linux
    has a compiler: it must be), and gives the Python node's bits."""
    if sys.platform.startswith("linux"):
        assert _torch_build.wait() is not None, _torch_build.status()
    rng = np.random.default_rng(7)
    for shape, dtype, labels, options in [
            ((64, 10), np.float32, np.int64, {}),
            ((3, 5, 300), np.float64, np.int32, {"reduction": "sum"}),
            ((700, 100), np.float32, np.int64, {"ignore_index": 3}),
            ((4, 6), np.float32, np.int64, {"ignore_index": 0})]:  # (every row ignored)
        z = torch.from_numpy(rng.standard_normal(shape).astype(dtype))
        y = torch.from_numpy(rng.integers(0, shape[-1], shape[:-1]).astype(labels))
        if shape == (4, 6):
            y.zero_()
        results = {}
        for which in ("C++ node", "Python node"):
            a = z.clone().requires_grad_()
            if which == "Python node":
                with pytest.MonkeyPatch.context() as m:
                    m.setattr(_torch_build, "operator", lambda: None)
                    loss = gl.cce_with_logits(a, y, **options)
            else:
                loss = gl.cce_with_logits(a, y, **options)
            assert _node_of(loss) == which or _torch_build.operator() is None
            loss.backward()
            results[which] = loss.detach(), a.grad
        (v1, g1), (v2, g2) = results.values()
        assert v1.dtype == v2.dtype and v1.shape == v2.shape == ()
        assert torch.equal(v1, v2) or (v1.isnan() and v2.isnan())
        assert torch.equal(g1, g2)


def test_a_label_out_of_range_raises_the_same_error_on_both_nodes(torch, node):
    a = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\], outside \[0, 2\]"):
        gl.cce_with_logits(a, torch.tensor([0, 1, 3, 2]))


def test_backward_hands_the_gradient_over_without_a_copy_and_retains_for_retain_graph(torch,
                                                                                        node):
    """loss.backward() makes pred.grad the forward's gradient buffer itself (no copy of a
    pred-sized tensor); with retain_graph=True a second backward still gets it."""
    z = torch.randn(64, 300)
    y = torch.randint(0, 300, (64,))
    a = z.clone().requires_grad_()
    loss = gl.cce_with_logits(a, y)
    assert _node_of(loss) == node
    handed = []  # what backward returns, on its way to pred.grad
    a.register_hook(lambda grad: handed.append(grad.data_ptr()))
    if node == "Python node":
        handed.append(loss.grad_fn.grad.data_ptr())  # (the forward's buffer itself)
    loss.backward()
    assert set(handed) == {a.grad.data_ptr()}
    b = z.clone().requires_grad_()
    loss = gl.cce_with_logits(b, y)
    loss.backward(retain_graph=True)
    first = b.grad.clone()
    b.grad = None
    loss.backward()
    assert torch.equal(b.grad, first)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()  # the graph is freed now: an error, as PyTorch's own, never no grad


def test_a_kept_gradient_changed_in_place_is_refused_not_used(torch, node):
    """With retain_graph, backward hands out the kept gradient itself; changed in place (by
    the caller, or a hook), the next backward raises as PyTorch does for saved tensors,
    instead of using the changed values."""
    z = torch.randn(6, 5, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    loss = gl.cce_with_logits(z, y)
    (g,) = torch.autograd.grad(loss, z, retain_graph=True)
    want = g.clone()
    g.zero_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, z)
    w = z.detach().clone().requires_grad_()
    w.register_hook(lambda grad: grad.mul_(0.5))
    loss = gl.cce_with_logits(w, y)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(w.grad, want * 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_negative_view_is_read_as_its_values(torch):
    base = torch.tensor([1.0, 2.0, 3.0])
    negative = base._neg_view()  # its memory holds 1, 2, 3; its values are -1, -2, -3
    torch.testing.assert_close(gl.mse.grad(negative, torch.zeros(3)),
                               torch.tensor([-2.0, -4.0, -6.0]) / 3)


def test_a_cached_call_still_refuses_a_target_on_another_device(torch):
    z = torch.randn(4, 5)
    gl.cce_with_logits(z, torch.randint(0, 5, (4,)))  # the signature is remembered
    for _ in range(2):
        with pytest.raises(ValueError, match="different devices"):
            gl.cce_with_logits(z, torch.empty(4, dtype=torch.int64, device="meta"))


def test_create_graph_is_refused_at_once_on_both_nodes(torch, node):
    from gpuloss import _torch

    a = torch.randn(5, 4, requires_grad=True)
    loss = gl.cce_with_logits(a, torch.tensor([0, 1, 2, 3, 0]))
    assert _node_of(loss) == node
    with pytest.raises(RuntimeError) as raised:
        torch.autograd.grad(loss, a, create_graph=True)
    assert _torch.NO_SECOND_DERIVATIVE in str(raised.value)  # (the C++ node's words too)


FIRST_CALLS = """
import torch, gpuloss as gl
from gpuloss import _torch_build
a = torch.randn(8, 5, requires_grad=True)
gl.cce_with_logits(a, torch.arange(8) % 5, label_smoothing=0.1)
print("a call it does not take starts no build:", _torch_build._builder is None)
loss = gl.cce_with_logits(a, torch.arange(8) % 5)
print(loss.grad_fn.name(), _torch_build._builder is not None)
"""


def test_the_operator_builds_in_the_background_for_the_next_run_too(torch, tmp_path):
    """Until the operator is built (in a background thread, started by the first call it
    takes) calls take the Python node; a process that exits first leaves the compiler to put
    the file in place, and the next process loads it."""
    from gpuloss import _host_build

    host = Path(_host_build.module().__file__)  # (its build is not what this is about)
    shutil.copy(host, tmp_path / host.name)
    env = {"GPULOSS_CACHE_DIR": str(tmp_path)}
    out = _run(env, FIRST_CALLS)
    assert "starts no build: True" in out and "EagerFnBackward True" in out
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (list(tmp_path.glob("*.lock"))
                                           or not list(tmp_path.glob("_gpuloss_torch-*.so"))):
        time.sleep(0.5)
    assert list(tmp_path.glob("_gpuloss_torch-*.so")), list(tmp_path.iterdir())
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.log"))
    out = _run(env, FIRST_CALLS.replace("loss = gl", "_torch_build.wait(); loss = gl"))
    assert "KeptGradient" in out


def test_the_operator_can_be_turned_off(torch):
    out = _run({"GPULOSS_TORCH_KERNELS": "0"},
               FIRST_CALLS + "print(_torch_build.wait(), _torch_build.status())")
    assert "EagerFnBackward" in out and "None not in use: GPULOSS_TORCH_KERNELS=0" in out


def test_processes_building_at_once_compile_once(tmp_path):
    """While one process (or thread) builds the operator, the others wait for its file (a
    lock file beside it) instead of compiling too; the lock is gone after."""
    import threading

    from gpuloss import _torch_build

    runs = tmp_path / "runs"
    stand_in = ("import sys, time; open(sys.argv[2], 'a').write('x'); time.sleep(1); "
                "open(sys.argv[-1], 'w').write('built')")  # (the output path comes last)
    compiler = [sys.executable, "-c", stand_in, "-", str(runs)]
    path = tmp_path / "_gpuloss_torch-test.so"
    builders = [threading.Thread(target=_torch_build._build_once, args=(compiler, path))
                for _ in range(3)]
    for b in builders:
        b.start()
    for b in builders:
        b.join()
    assert path.read_text() == "built" and runs.read_text() == "x"
    assert not list(tmp_path.glob("*.lock"))
    _torch_build._build_once(compiler, path)  # (there already: no compile, no lock left)
    assert runs.read_text() == "x" and not list(tmp_path.glob("*.lock"))


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    """A compiler that cannot start, or fails, leaves no temporary, log or lock file, and
    its words reach the reason."""
    from gpuloss import _host_build, _torch_build

    with pytest.raises(OSError):
        _host_build.build([str(tmp_path / "no-such-compiler")], tmp_path / "a.so")
    failing = [sys.executable, "-c", "import sys; print('boom'); sys.exit(1)"]
    with pytest.raises(RuntimeError, match="boom"):
        _host_build.build(failing, tmp_path / "b.so")
    with pytest.raises(RuntimeError, match="boom"):
        _torch_build._build_once(failing, tmp_path / "c.so")
    assert list(tmp_path.iterdir()) == []


def test_the_operator_checks_its_arguments(torch):
    """Called directly, the operator refuses what it cannot read rather than crash or read
    out of bounds (gpuloss._torch checks all this before calling it)."""
    op = _torch_build.wait()
    if op is None:
        pytest.skip(f"gpuloss's torch operator: {_torch_build.status()}")
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert op(z, y, None, True, True, 1, 0) is not None
    assert op(z, y, None, True, True, 5000, 0) is not None  # (GPULOSS_NUM_THREADS=5000)
    for pred, labels, threads in [(torch.randn(4, 0), y, 1), (torch.randn(3, 4).t(), y, 1),
                                  (z, y[:3], 1), (z.double().half(), y, 1),
                                  (z, y.float(), 1), (z, y, 0)]:
        with pytest.raises(RuntimeError):
            op(pred, labels, None, True, True, threads, 0)


def test_the_cpp_node_speaks_the_python_nodes_words():
    """kernels/gpuloss_torch.cpp copies gpuloss._torch's three messages: word for word."""
    import re

    from gpuloss import _torch
    from gpuloss.backends.cuda import kernel_dir

    source = (kernel_dir() / "gpuloss_torch.cpp").read_text()
    for name in ("NO_SECOND_DERIVATIVE", "FREED", "CHANGED"):
        literal = re.search(name + r" =\s*((?:\s*\"[^\"]*\")+);", source).group(1)
        assert "".join(re.findall(r"\"([^\"]*)\"", literal)) == getattr(_torch, name)
