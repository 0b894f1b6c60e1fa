"""gpuloss.torch.Loss: every loss as an nn.Module (DESIGN §10)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import make_inputs, require
from reference import ALL

import gpuloss as gl


@pytest.fixture(scope="module")
def torch():
    return require("torch")


@pytest.mark.parametrize("loss", ALL)
def test_the_module_is_the_loss_with_its_options(torch, loss):
    from gpuloss.torch import Loss

    rng = np.random.default_rng(0)
    pred, target = make_inputs(loss, rng, (12, 4))
    module = Loss(loss, reduction="sum")
    x = torch.tensor(pred, requires_grad=True)
    out = module(x, torch.tensor(target))
    out.backward()
    want_v, want_g = gl.LOSSES[loss].value_and_grad(pred, target, reduction="sum")
    np.testing.assert_allclose(out.detach().numpy(), want_v, rtol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), want_g, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda p: module(p, torch.tensor(target)),
                                    (torch.tensor(pred, requires_grad=True),))


def test_array_options_are_buffers_and_calls_can_override(torch):
    from gpuloss.torch import Loss

    cw = np.array([1.0, 2.0, 0.5])
    module = Loss("cce_with_logits", class_weight=cw, label_smoothing=0.1)
    assert list(module.state_dict()) == ["class_weight"]
    assert "label_smoothing=0.1" in repr(module) and "class_weight=<tensor (3,)>" in repr(module)
    z = torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0, 1, 2])
    want = gl.cce_with_logits(z.numpy(), t.numpy(), class_weight=cw, label_smoothing=0.1)
    np.testing.assert_allclose(module(z, t).numpy(), want, rtol=1e-12)
    w = np.arange(1.0, 7.0)
    np.testing.assert_allclose(module(z, t, sample_weight=torch.tensor(w)).numpy(),
                               gl.cce_with_logits(z.numpy(), t.numpy(), class_weight=cw,
                                                  label_smoothing=0.1, sample_weight=w),
                               rtol=1e-12)
    module.to(torch.float32)  # buffers follow the module
    assert module.class_weight.dtype == torch.float32


def test_a_training_loop_learns(torch):
    from gpuloss.torch import Loss

    torch.manual_seed(0)
    x = torch.randn(256, 5)
    y = (x @ torch.randn(5, 3)).argmax(1)  # a linearly separable 3-class problem
    model = torch.nn.Linear(5, 3)
    criterion = Loss("cce_with_logits")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.3 * first
    assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_unknown_names_and_options_are_refused(torch):
    from gpuloss.torch import Loss

    with pytest.raises(KeyError, match="No loss named"):
        Loss("not_a_loss")
    with pytest.raises(TypeError, match="mse has no option 'delta'"):
        Loss("mse", delta=1.0)


def test_import_gpuloss_does_not_import_torch():
    code = "import sys, gpuloss; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backward_hands_over_the_saved_gradient_safely(torch):
    """loss.backward() gives autograd the saved gradient itself (no copy): the buffer must
    then never be reused while x.grad holds it, and retain_graph must still accumulate."""
    n = 1 << 19  # 2 MiB of float32: large enough for the CPU backend's buffer pool
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.standard_normal(n, dtype=np.float32), requires_grad=True)
    y1 = torch.tensor(rng.standard_normal(n, dtype=np.float32))
    y2 = torch.tensor(rng.standard_normal(n, dtype=np.float32))
    gl.mse(x, y1).backward()
    first = x.grad.clone()
    np.testing.assert_allclose(first.numpy(), gl.mse.grad(x.detach().numpy(), y1.numpy()))
    for _ in range(3):  # later passes must not write into x.grad's memory
        gl.mse(x.detach(), y2)
        gl.mse.value_and_grad(x.detach(), y2)
        loss = gl.mse(x, y2)
    assert torch.equal(x.grad, first)
    loss.backward(retain_graph=True)
    loss.backward()
    want = first + 2 * torch.from_numpy(gl.mse.grad(x.detach().numpy(), y2.numpy()))
    np.testing.assert_allclose(x.grad.numpy(), want.numpy(), rtol=1e-6,
                               atol=1e-6 * float(want.abs().max()))  # float32 sums
    # a non-unit grad_output still scales
    x.grad = None
    (3 * gl.mse(x, y1)).backward()
    np.testing.assert_allclose(x.grad.numpy(), 3 * first.numpy(), rtol=1e-6)
