"""PyTorch as a host: autograd for every loss, and every loss as a PyTorch operator.

Two ways in, one autograd rule (DESIGN §10: the fused pass once in forward, `grad_output`
times the saved gradient in backward):

- Eager calls on plain tensors (the training loop) compute straight away: the checked call
  goes to the compiled CPU kernels or the NumPy backend on CPU tensors, or to the CUDA
  kernels, and `_EagerFn` attaches the value to autograd. The most common of them (a mean or
  sum of cce_with_logits with class indices on CPU tensors) takes gpuloss's PyTorch operator
  instead where it is built (`compute_graph`: gpuloss._torch_build), whose node is the same
  rule in C++.
- Under `torch.compile`, `torch.export`, `torch.func` transforms, or with tensor subclasses,
  the call goes through the custom operator ``torch.ops.gpuloss.<loss>`` (one per loss,
  registered with a fake implementation that gives the shapes, so the compiler sees one opaque
  node and no graph break), still inside `_LossFn`, whose `vmap` rule maps over the batch.

There is no second derivative: a backward with ``create_graph=True`` raises at once, and
differentiating the saved gradient again (torch.func.hessian, grad of grad) raises too; a
gradient is never silently detached. Only pred gets a gradient: a target or weight that
requires grad is refused with a message, never given a silent None.

torch is imported only when a tensor arrives (`sys.modules`), so `import gpuloss` needs none.
"""

from __future__ import annotations

import sys
import threading

NO_SECOND_DERIVATIVE = (
    "gpuloss losses have no second derivative: backward computes the fused gradient, which "
    "is not itself differentiable (create_graph=True, torch.func.hessian, grad of grad). "
    "Use the loss's PyTorch formula where second derivatives are needed."
)

# The kept gradient's two misuses (the C++ node of kernels/gpuloss_torch.cpp says the same)
FREED = ("Trying to backward through a gpuloss loss a second time: its gradient was freed by "
         "the first backward. Pass retain_graph=True to the first one.")
CHANGED = ("one of the variables needed for gradient computation has been modified by an "
           "inplace operation: the gradient a gpuloss loss keeps for backward (returned by an "
           "earlier backward with retain_graph=True, or passed to a hook) was changed in "
           "place. Clone it before changing it.")

_ARRAY_OPTIONS = ("sample_weight", "pos_weight", "class_weight")


class _Api:
    """What this module uses of gpuloss._api, handed in by it (`bind`), so that nothing here
    imports the layer above: the declared losses by name, `run` (check and compute one call)
    and `check_scalar_options`."""

    losses: dict = {}
    run = None
    check_scalar_options = None


def bind(losses: dict, run, check_scalar_options) -> None:
    _Api.losses, _Api.run, _Api.check_scalar_options = losses, run, check_scalar_options


def is_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_plain_tensor(x) -> bool:
    """A torch.Tensor itself (no subclass: not a Parameter, a fake or functional tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and type(x) is torch.Tensor


def run(loss, pred, target, options, *, want_value, want_grad, compute, compute_graph):
    """One entry point of `loss` called with a torch tensor as pred. `compute(call)` is the
    checked dispatch (gpuloss._api's), for calls that need no autograd graph;
    `compute_graph(call)` the value with its autograd node in C++ where a compiled operator
    takes the call (None: `_EagerFn` carries the gradient)."""
    import torch

    tensors = (pred, target, *(options.get(k) for k in _ARRAY_OPTIONS))
    if not _OPERATORS and not torch.compiler.is_compiling():
        operators()  # registered on the first eager call, ready for a later torch.compile
    if _traced(torch, tensors):
        return _run_traced(torch, loss, pred, target, options, want_value, want_grad)
    graph = want_value and not want_grad and pred.requires_grad and torch.is_grad_enabled()
    call = loss.prepare(pred, target, options, want_value=want_value,
                        want_grad=want_grad or graph)
    if not graph:
        return compute(call)
    _refuse_other_grads(call)
    value = compute_graph(call)
    if value is not None:
        return value, None
    value, grad = compute(call)
    axis = call.axis if call.categorical and call.reduction == "none" else None
    return _EagerFn.apply(pred, value, grad, axis), None


def _traced(torch, tensors) -> bool:
    """Whether a compiler or a torch.func transform is looking (or a tensor subclass: fake,
    functional, distributed ...): then the loss has to be one operator node."""
    if torch.compiler.is_compiling():
        return True
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and isinstance(t, torch.Tensor)
               and (type(t) not in (torch.Tensor, torch.nn.Parameter) or is_wrapped(t))
               for t in tensors)


def _refuse_other_grads(call):
    for name in ("target", *_ARRAY_OPTIONS):
        x = getattr(call, name)
        if x is not None and getattr(x, "requires_grad", False):
            _raise_other_grad(name)


def _raise_other_grad(name):
    msg = (f"{name} requires grad, but gpuloss differentiates with respect to pred only (its "
           f"gradient would be lost). Pass {name}.detach(); a teacher that must learn too "
           f"needs a PyTorch formula for its side.")
    raise RuntimeError(msg)


# ---------------------------------------------------------------------------------------------
# the one autograd rule


class _ViaOp:
    """How `_LossFn` computes a traced call: the loss's operator, with its scalar options."""

    def __init__(self, op, scalars, axis, want_grad):
        self.op, self.scalars, self.axis, self.want_grad = op, scalars, axis, want_grad

    def __call__(self, pred, target, sample_weight, pos_weight, class_weight):
        return self.op(pred, target, sample_weight, pos_weight, class_weight, *self.scalars,
                       self.want_grad)


def _backward(torch, grad, grad_value, axis):
    """grad_output times the saved gradient (broadcast along the classes for one loss per
    sample)."""
    if axis is not None:
        return grad * grad_value.unsqueeze(axis)
    if (type(grad_value) is torch.Tensor and grad_value.device.type == "cpu"
            and grad_value.dim() == 0 and not torch.compiler.is_compiling()
            and torch._C._functorch.maybe_current_level() is None
            and grad_value.item() == 1.0):
        # loss.backward(): the saved gradient itself, no pass and no new tensor (autograd
        # copies it if it is still shared, e.g. with retain_graph)
        return grad
    return grad * grad_value


def _keep_graph(torch) -> bool:
    """Whether the running backward keeps the graph (retain_graph=True): then a later backward
    needs the gradient again. True where PyTorch cannot say (an older version)."""
    ask = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if ask is None else bool(ask())


def _make_eager_fn():
    import torch

    class EagerFn(torch.autograd.Function):
        """The eager form: (value, grad) computed before, grad saved. (The setup_context form
        that torch.func needs costs an inspect.signature per call, about 40 us.)"""

        @staticmethod
        def forward(ctx, pred, value, grad, axis):
            # kept as an attribute, not saved: backward hands the tensor itself to autograd,
            # which takes it as pred.grad without a copy only if nothing else holds it (grad
            # is an input here, so this makes no reference cycle)
            ctx.grad = grad
            ctx.version = grad._version  # (what save_for_backward would check)
            ctx.axis = axis
            return value

        @staticmethod
        def backward(ctx, grad_value):
            if torch.is_grad_enabled():  # create_graph=True
                raise RuntimeError(NO_SECOND_DERIVATIVE)
            grad = ctx.grad
            if grad is None:  # (PyTorch's own check needs saved tensors, which this has not)
                raise RuntimeError(FREED)
            if grad._version != ctx.version:  # changed in place since (a hook, or the tensor
                # an earlier torch.autograd.grad returned): PyTorch's error for saved tensors
                raise RuntimeError(CHANGED)
            if not _keep_graph(torch):  # the last backward through this graph: let go
                ctx.grad = None
            return _backward(torch, grad, grad_value, ctx.axis), None, None, None

    return EagerFn


def _make_loss_fn():
    import torch

    class LossFn(torch.autograd.Function):
        """value, grad = the fused pass; backward = grad_output x the saved grad."""

        @staticmethod
        def forward(pred, target, sample_weight, pos_weight, class_weight, how):
            return how(pred, target, sample_weight, pos_weight, class_weight)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(output[1])
            ctx.axis = inputs[-1].axis  # reduction="none" over classes: one loss per sample

        @staticmethod
        def backward(ctx, grad_value, grad_of_grad):
            if not torch.compiler.is_compiling():  # (the compiler traces this with every
                # gradient present, and has no double backward of its own)
                if grad_of_grad is not None:  # something differentiates the gradient itself
                    raise RuntimeError(NO_SECOND_DERIVATIVE)
                if (torch.is_grad_enabled()
                        and torch._C._functorch.maybe_current_level() is None):
                    raise RuntimeError(NO_SECOND_DERIVATIVE)  # create_graph=True, eager
            none = (None,) * 5
            if grad_value is None:
                return (None, *none)
            (grad,) = ctx.saved_tensors
            return (_backward(torch, grad, grad_value, ctx.axis), *none)

        @staticmethod
        def vmap(info, in_dims, pred, target, sample_weight, pos_weight, class_weight, how):
            # one call per batch entry: exact, and as fast as the batch is short
            args = (pred, target, sample_weight, pos_weight, class_weight)
            values, grads = [], []
            for b in range(info.batch_size):
                one = [a if d is None or a is None else a.select(d, b)
                       for a, d in zip(args, in_dims[:5])]
                value, grad = LossFn.apply(*one, how)  # (a slice may be differentiated)
                values.append(value)
                grads.append(grad)
            return (torch.stack(values), torch.stack(grads)), (0, 0)

    return LossFn


_LossFn = _EagerFn = None  # made with the operators (a trace cannot define a class)


# ---------------------------------------------------------------------------------------------
# the operators


def _run_traced(torch, loss, pred, target, options, want_value, want_grad):
    op = operators()[loss.name]
    unknown = [k for k in options if k not in loss.option_set]
    if unknown:  # the eager message (loss.prepare raises it)
        loss.prepare(pred, target, options, want_value=want_value, want_grad=want_grad)
    # the eager checks of the scalar options: the operator's schema would convert a wrong
    # type rather than refuse it (ignore_index=True would become 1)
    _Api.check_scalar_options(loss, options, pred.dim(), str(pred.dtype).rsplit(".", 1)[-1])
    target = _as_tensor(torch, target, "target", pred)
    arrays = [_as_tensor(torch, options.get(name), name, pred) for name in _ARRAY_OPTIONS]
    for name, value in (("target", target), *zip(_ARRAY_OPTIONS, arrays)):
        if isinstance(value, torch.Tensor) and value.requires_grad and torch.is_grad_enabled():
            _raise_other_grad(name)
    scalars = tuple(options.get(o.name, o.default) for o in loss.declared
                    if o.kind != "array")
    axis = None
    if loss.family == "categorical" and options.get("reduction", "mean") == "none":
        axis = options.get("axis", -1) % pred.dim()
    graph = want_value and not want_grad and pred.requires_grad and torch.is_grad_enabled()
    # under vmap a batched pred says requires_grad=False although its base may need the
    # gradient: there, compute it whenever grad mode is on
    wrapped = not torch.compiler.is_compiling() and \
        torch._C._functorch.is_functorch_wrapped_tensor(pred)
    need_grad = want_grad or graph or (want_value and wrapped and torch.is_grad_enabled())
    value, grad = _LossFn.apply(pred, target, *arrays,
                                _ViaOp(op, scalars, axis, need_grad))
    if graph or not pred.requires_grad:
        return value, (grad if want_grad else None)
    # .grad and .value_and_grad return plain tensors, as in eager mode
    return value.detach(), (grad.detach() if want_grad else None)


def _as_tensor(torch, x, name, pred):
    """A list or number as a tensor on pred's device, as eager calls take them; another
    library's array is refused, as eager calls refuse it."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "__array_namespace__") or hasattr(x, "__array__"):
        msg = (f"Arrays from different libraries in one call: pred is a torch array, {name} "
               f"is a {type(x).__module__.split('.')[0]} array. Convert {name} to torch first.")
        raise TypeError(msg)
    return torch.as_tensor(x, device=pred.device)


_OPERATORS: dict = {}
_REGISTERING = threading.Lock()


def operators() -> dict:
    """{loss name: torch.ops.gpuloss.<name>}, registered on first use (with `_LossFn`).
    Registration cannot happen inside a torch.compile trace: `import gpuloss.torch` (or any
    eager call on a tensor, or importing gpuloss after torch) does it beforehand."""
    if _OPERATORS:
        return _OPERATORS
    import torch

    if torch.compiler.is_compiling():
        msg = ("gpuloss's PyTorch operators are not registered yet, and cannot be while "
               "torch.compile traces: import gpuloss.torch (or import gpuloss after torch) "
               "before compiling.")
        raise RuntimeError(msg)
    with _REGISTERING:  # one registration, published whole (threads' first calls race here)
        if not _OPERATORS:
            global _LossFn, _EagerFn
            _LossFn, _EagerFn = _make_loss_fn(), _make_eager_fn()
            ops = {name: _define(torch, loss) for name, loss in _Api.losses.items()}
            _OPERATORS.update(ops)
    return _OPERATORS


_SCHEMA_TYPES = {"reduction": "str", "validate": "bool", "axis": "int",
                 "ignore_index": "int?", "bool": "bool"}


def _define(torch, loss):
    """torch.ops.gpuloss.<loss>(pred, target, sample_weight, pos_weight, class_weight, <the
    loss's scalar options in declared order>, want_grad) -> (value, grad)."""
    scalar_options = [o for o in loss.declared if o.kind != "array"]
    names = [o.name for o in scalar_options]
    args = ["Tensor pred", "Tensor target", "Tensor? sample_weight", "Tensor? pos_weight",
            "Tensor? class_weight"]
    for o in scalar_options:
        kind = _SCHEMA_TYPES.get(o.name) or _SCHEMA_TYPES.get(o.kind)
        if kind is None:  # a number: None where it is optional (eps, ...)
            kind = "float?" if o.default is None else "float"
        args.append(f"{kind} {o.name}")
    schema = f"({', '.join(args)}, bool want_grad) -> (Tensor, Tensor)"

    def impl(pred, target, sample_weight, pos_weight, class_weight, *rest):
        *scalars, want_grad = rest
        options = dict(zip(names, scalars))
        for key, value in zip(_ARRAY_OPTIONS, (sample_weight, pos_weight, class_weight)):
            if value is not None:
                options[key] = value
        value, grad = _Api.run(loss.name, pred, target, options, want_value=True,
                               want_grad=want_grad)
        # contiguous, as the fake implementation says (the CPU backend returns pred's layout)
        value = value.clone() if _shares(value, pred, target) else value.contiguous()
        return value, (grad.contiguous() if want_grad else pred.new_empty(0))

    def fake(pred, target, sample_weight, pos_weight, class_weight, *rest):
        *scalars, want_grad = rest
        options = dict(zip(names, scalars))
        shape = ()
        if options["reduction"] == "none":
            shape = pred.shape
            if loss.family == "categorical":
                axis = options["axis"] % pred.dim()
                shape = (*pred.shape[:axis], *pred.shape[axis + 1:])
        grad = pred.new_empty(pred.shape) if want_grad else pred.new_empty(0)
        return pred.new_empty(shape), grad

    op = torch.library.custom_op(f"gpuloss::{loss.name}", impl, mutates_args=(),
                                 schema=schema)
    op.register_fake(fake)
    return getattr(torch.ops.gpuloss, loss.name).default


def _shares(x, *inputs) -> bool:
    """An operator's output may not alias an input (never the case in gpuloss's backends;
    checked, since a view would corrupt the traced graph)."""
    return any(x is i for i in inputs)
