"""PyTorch as a host: every loss is the operator torch.ops.gpuloss.<loss>, so torch.compile
traces through a call with no graph break, torch.export captures it, torch.func transforms
differentiate and map it; second derivatives and gradients for targets are refused with a
message, never silently missing (issue 25, item 2). CPU tensors; the same code path serves
CUDA tensors."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import make_inputs, require
from reference import ALL, CATEGORICAL

import gpuloss as gl

# PyTorch 2.13's own compiler instantiates every autograd.Function it traces and warns about
# that itself (any Function, not gpuloss's); the suite turns warnings into errors
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*autograd.function.Function'> should not be instantiated:DeprecationWarning")


@pytest.fixture(scope="module")
def torch():
    torch = require("torch")
    import gpuloss.torch  # noqa: F401  (registers the operators, as a user would)

    return torch


def _inputs(torch, loss, rng, shape=(6, 4)):
    pred, target = make_inputs(loss, rng, shape)
    return torch.from_numpy(pred), torch.from_numpy(np.asarray(target))


def _eager_grad(torch, loss, pred, target, **opts):
    z = pred.clone().requires_grad_()
    value = gl.LOSSES[loss](z, target, **opts)
    value.sum().backward()
    return value.detach(), z.grad


@pytest.mark.parametrize("loss", ALL)
def test_every_loss_is_a_checked_operator(torch, loss):
    rng = np.random.default_rng(31)
    pred, target = _inputs(torch, loss, rng)
    op = getattr(torch.ops.gpuloss, loss).default
    spec = gl.LOSSES[loss]
    scalars = [o.default for o in spec.declared if o.kind != "array"]
    value, grad = op(pred, target, None, None, None, *scalars, True)
    want_value, want_grad = spec.value_and_grad(pred.numpy(), target.numpy())
    np.testing.assert_allclose(value.numpy(), want_value, rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-12)
    # schema and fake (meta) implementation agree with the real one
    torch.library.opcheck(op, (pred, target, None, None, None, *scalars, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("loss", ALL)
def test_torch_func_grad_is_the_fused_gradient(torch, loss):
    rng = np.random.default_rng(32)
    pred, target = _inputs(torch, loss, rng)
    got = torch.func.grad(lambda x: gl.LOSSES[loss](x, target))(pred)
    want = gl.LOSSES[loss].grad(pred.numpy(), target.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss", ["mse", "huber", "bce_with_logits", "cce_with_logits",
                                  "kl_div_with_logits"])
def test_vmap_maps_over_the_batch(torch, loss):
    rng = np.random.default_rng(33)
    pred, target = _inputs(torch, loss, rng, (3, 5, 4))
    got = torch.func.vmap(lambda p, t: gl.LOSSES[loss](p, t))(pred, target)
    want = torch.stack([gl.LOSSES[loss](p, t) for p, t in zip(pred, target)])
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)
    # per-example gradients, the usual reason for vmap(grad(...))
    grads = torch.func.vmap(torch.func.grad(lambda p, t: gl.LOSSES[loss](p, t)))(pred, target)
    for g, p, t in zip(grads, pred, target):
        np.testing.assert_allclose(g.numpy(), gl.LOSSES[loss].grad(p.numpy(), t.numpy()),
                                   rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("loss", "opts"), [
    ("cce_with_logits", {"label_smoothing": 0.1}),
    ("cce_with_logits", {"reduction": "none"}),
    ("mse", {"reduction": "sum"}),
    ("bce_with_logits", {"pos_weight": "tensor"}),
    ("kl_div_with_logits", {"temperature": 2.0}),
])
def test_torch_compile_fullgraph_matches_eager(torch, loss, opts):
    rng = np.random.default_rng(34)
    pred, target = _inputs(torch, loss, rng)
    if opts.get("pos_weight") == "tensor":
        opts = {"pos_weight": torch.from_numpy(rng.uniform(0.5, 2, 4))}
    torch._dynamo.reset()

    def step(x, t):
        return gl.LOSSES[loss](x, t, **opts)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # a graph break raises
    z = pred.clone().requires_grad_()
    value = compiled(z, target)
    value.sum().backward()
    want_value, want_grad = _eager_grad(torch, loss, pred, target, **opts)
    np.testing.assert_allclose(value.detach().numpy(), want_value.numpy(), rtol=1e-12)
    np.testing.assert_allclose(z.grad.numpy(), want_grad.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's own (torch.jit ...)
def test_a_compiled_training_step_with_inductor(torch):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))

    def loss_of(m):
        return gl.cce_with_logits(m(x), y)

    compiled = torch.compile(loss_of, fullgraph=True)
    compiled(model).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_torch_export_captures_the_operator(torch):
    rng = np.random.default_rng(35)
    pred, target = _inputs(torch, "cce_with_logits", rng)

    class Scorer(torch.nn.Module):
        def forward(self, z, t):
            return gl.cce_with_logits(z, t, reduction="none", label_smoothing=0.05)

    program = torch.export.export(Scorer(), (pred, target))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "gpuloss.cce_with_logits.default" in targets
    np.testing.assert_allclose(
        program.module()(pred, target).numpy(),
        gl.cce_with_logits(pred.numpy(), target.numpy(), reduction="none",
                           label_smoothing=0.05), rtol=1e-12)


def test_second_derivatives_raise_at_once(torch):
    pred, target = _inputs(torch, "mse", np.random.default_rng(36))
    z = pred.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(gl.mse(z, target), z, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.func.grad(torch.func.grad(lambda x: gl.mse(x, target[0, 0])))(pred[0, 0])
    with pytest.raises(Exception, match="jvp"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.func's own torch.jit use
        torch.func.hessian(lambda x: gl.mse(x, target[0]))(pred[0])  # forward mode: torch's
        # message asks for a jvp rule
    z.grad = None
    gl.mse(z, target).backward()  # first derivatives are untouched
    assert z.grad is not None


@pytest.mark.parametrize("traced", [False, True])
def test_a_target_that_requires_grad_is_refused(torch, traced):
    rng = np.random.default_rng(37)
    student, _ = _inputs(torch, "kl_div_with_logits", rng)
    teacher = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def distill(s, t):
        return gl.kl_div_with_logits(s, t, target_logits=True, temperature=2.0)

    fn = torch.compile(distill, fullgraph=True, backend="aot_eager") if traced else distill
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="target requires grad.*detach"):
        fn(student.clone().requires_grad_(), teacher)
    # detached, it is a constant: the student gets its gradient
    s = student.clone().requires_grad_()
    fn(s, teacher.detach()).backward()
    assert s.grad is not None


def test_compiling_before_any_registration_says_what_to_do(tmp_path):
    require("torch")
    code = (
        "import gpuloss as gl, torch\n"  # gpuloss first: nothing is registered at import
        "f = torch.compile(lambda x, y: gl.mse(x, y), fullgraph=True, backend='eager')\n"
        "try:\n"
        "    f(torch.ones(3), torch.zeros(3))\n"
        "except Exception as e:\n"
        "    print('ERR', e)\n"
        "import gpuloss.torch\n"
        "torch._dynamo.reset()\n"
        "print('OK', float(f(torch.ones(3), torch.zeros(3))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "import gpuloss.torch" in out.split("ERR", 1)[1]
    assert "OK 1.0" in out


@pytest.mark.parametrize("loss", [name for name in ALL if name in CATEGORICAL][:2])
def test_module_losses_compile_too(torch, loss):
    import gpuloss.torch as gt

    torch._dynamo.reset()
    criterion = gt.Loss(loss, reduction="sum")
    rng = np.random.default_rng(38)
    pred, target = _inputs(torch, loss, rng)
    compiled = torch.compile(criterion, fullgraph=True, backend="aot_eager")
    np.testing.assert_allclose(compiled(pred, target).numpy(),
                               gl.LOSSES[loss](pred.numpy(), target.numpy(), reduction="sum"),
                               rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# what an adversarial review found (each failed before its fix)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's own
def test_a_transposed_pred_compiles_with_inductor(torch):
    """The operator's outputs are contiguous, as its fake implementation says (the CPU
    backend returns pred's own layout, which inductor's layout check refused)."""
    torch._dynamo.reset()
    w, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    x = w.clone().requires_grad_()
    torch.compile(lambda a: gl.mse(a.t(), y), fullgraph=True)(x).backward()
    want = gl.mse.grad(w.t().contiguous().numpy(), y.numpy())
    np.testing.assert_allclose(x.grad.numpy(), want.T, rtol=1e-12)
    per = torch.compile(lambda a: gl.mse(a.t(), y, reduction="none").reshape(-1),
                        backend="aot_eager")(w)
    np.testing.assert_allclose(per.numpy(), ((w.t() - y) ** 2).reshape(-1).numpy(), rtol=1e-12)


def test_wrong_option_types_are_refused_under_torch_func_too(torch):
    y, p = torch.tensor([0, 1, 2, 1, 0, 1]), torch.randn(6, 3)
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        torch.func.grad(lambda a: gl.cce_with_logits(a, y, ignore_index=True))(p)
    with pytest.raises(TypeError, match="delta must be a real number"):
        torch.func.grad(lambda a: gl.huber(a, a.detach(), delta=True))(p)
    with pytest.raises(TypeError, match="different libraries"):
        torch.func.grad(lambda a: gl.cce_with_logits(a, y, sample_weight=np.ones(6)))(p)
    with pytest.raises(ValueError, match="class axis"):
        torch.func.grad(lambda a: gl.cce_with_logits(a, torch.tensor(0)))(torch.tensor(1.0))
    # a list is a target as in eager calls
    got = torch.func.grad(lambda a: gl.cce_with_logits(a, [0, 1, 2, 1, 0, 1]))(p)
    np.testing.assert_allclose(got.numpy(), gl.cce_with_logits.grad(p.numpy(), y.numpy()),
                               rtol=1e-6)


def test_vmap_outputs_can_be_differentiated(torch):
    p = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (4,))
    torch.func.vmap(lambda x: gl.cce_with_logits(x, y))(p).sum().backward()
    want = np.stack([gl.cce_with_logits.grad(x, y.numpy()) for x in p.detach().numpy()])
    np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-12)
    got = torch.func.grad(
        lambda a: torch.func.vmap(lambda x: gl.cce_with_logits(x, y))(a).sum())(p.detach())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_a_tensor_subclass_is_a_torch_tensor(torch):
    class Tagged(torch.Tensor):
        pass

    x = torch.randn(4, 3, dtype=torch.float64).as_subclass(Tagged).requires_grad_()
    gl.cce_with_logits(x, torch.tensor([0, 1, 2, 0])).backward()
    want = gl.cce_with_logits.grad(x.detach().as_subclass(torch.Tensor).numpy(),
                                   np.array([0, 1, 2, 0]))
    np.testing.assert_allclose(x.grad.as_subclass(torch.Tensor).numpy(), want, rtol=1e-12)


def test_first_calls_from_many_threads_register_once():
    require("torch")
    code = (
        "import threading, gpuloss as gl, torch\n"  # gpuloss first: registered on first call
        "barrier, errors = threading.Barrier(4), []\n"
        "def first():\n"
        "    barrier.wait()\n"
        "    try:\n"
        "        gl.mse(torch.ones(3, requires_grad=True), torch.zeros(3)).backward()\n"
        "    except Exception as e:\n"
        "        errors.append(repr(e))\n"
        "threads = [threading.Thread(target=first) for _ in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print('ERRORS', errors)\n"
    )
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300, check=True).stdout
        assert "ERRORS []" in out, out
