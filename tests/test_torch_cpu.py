"""PyTorch CPU tensors without an autograd graph take the NumPy backend through zero-copy
views (DESIGN §10), and come back as tensors; tensors that need a graph keep autograd."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_inputs, require
from reference import ALL, CATEGORICAL

import gpuloss as gl
from gpuloss import _dispatch


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


def test_which_tensors_take_the_numpy_backend(torch):
    z = torch.zeros(4, 3)
    assert _dispatch.backend_for(z) is _dispatch._compute_torch_cpu
    needs_graph = z.clone().requires_grad_()
    assert _dispatch.backend_for(needs_graph) is not _dispatch._compute_torch_cpu
    with torch.no_grad():
        assert _dispatch.backend_for(needs_graph) is _dispatch._compute_torch_cpu


def test_a_tensor_that_needs_a_graph_still_gets_its_gradient(torch):
    rng = np.random.default_rng(12)
    pred, target = make_inputs("cce_with_logits", rng, (50, 4))
    z = torch.from_numpy(pred).requires_grad_()
    gl.cce_with_logits(z, torch.from_numpy(target)).backward()
    np.testing.assert_allclose(z.grad.numpy(), gl.cce_with_logits.grad(pred, target),
                               rtol=1e-12)


def test_the_inputs_are_viewed_not_copied_and_never_modified(torch, monkeypatch):
    from gpuloss import _numpy_backend

    seen = {}
    real = _numpy_backend.compute

    def spy(call):
        seen["pred"], seen["target"] = call.pred, call.target
        return real(call)

    monkeypatch.setattr(_numpy_backend, "compute", spy)
    p, y = torch.rand(1000), torch.rand(1000)
    before = p.clone(), y.clone()
    gl.bce.value_and_grad(p, y)
    assert seen["pred"].ctypes.data == p.data_ptr()
    assert seen["target"].ctypes.data == y.data_ptr()
    assert torch.equal(p, before[0]) and torch.equal(y, before[1])
