"""PyTorch autograd for `gpuloss.linear_cross_entropy` (imported only when a tensor arrives).

One rule, DESIGN §10's: the gradients are formed in the forward pass, where the chunked loop
has each chunk's gradient at hand, and backward only scales them by grad_output. That holds
for the reductions 'mean' and 'sum', whose grad_output is one number. With 'none' each token's
loss has its own grad_output g_i, and d_weight = Σ_i g_i G_iᵀ h_i does not factor out of the
products, so forward computes the losses alone (no gradient GEMMs) and backward runs the loop
once with the tokens weighted by g (the gradient of Σ g_i l_i): exact for any upstream
gradient, at the cost of a second pass only in that mode.

Only hidden, weight and bias get gradients (each only when it requires grad: a frozen output
layer skips the d_weight GEMM); a probability target or weight that requires grad is refused,
never given a silent None. There is no second derivative: backward with ``create_graph=True``
raises. Backward hands the gradients formed in forward to autograd (scaled in place by
grad_output unless it is 1: no copy of d_weight); a retained graph's second backward runs the
loop again.
"""

from __future__ import annotations

import torch

from . import _linear, _torch

_NO_SECOND = _torch.NO_SECOND_DERIVATIVE.replace("gpuloss losses have", "linear_cross_entropy "
                                                 "has")


@torch.compiler.disable  # under torch.compile: a graph break, the call runs eagerly (it is
# not yet one operator node, as the other losses are)
def run(hidden, weight, target, bias, chunk_mb, options, *, want_value, want_grad):
    for name, x in (("target", target), ("sample_weight", options.get("sample_weight")),
                    ("class_weight", options.get("class_weight"))):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            _torch._raise_other_grad(name)
    params = (hidden, weight, bias)
    graph = (want_value and not want_grad and torch.is_grad_enabled()
             and any(isinstance(x, torch.Tensor) and x.requires_grad for x in params))
    if not graph:
        return _eager(params, target, chunk_mb, options, want_value=want_value,
                      want_grad=want_grad)
    value = _LinearFn.apply(hidden, weight, bias, target, chunk_mb, options)
    return value, None


def _detached(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def _eager(params, target, chunk_mb, options, *, want_value, want_grad,
           need=(True, True, True)):
    """The loop on detached tensors: torch's own GEMMs, the row pass on views of the chunk."""
    hidden, weight, bias = (_detached(x) for x in params)
    options = {k: _detached(v) for k, v in options.items()}
    c = _linear.check(hidden, weight, _detached(target), bias, chunk_mb, options)
    if want_grad:
        need = (need[0], need[1], need[2] and c.bias is not None)
    else:
        need = (False, False, False)
    value, grads = _linear.compute(c, want_value=want_value, need=need)
    if grads is not None:  # the public .grad's tuple: d_bias only with a bias
        grads = grads[:3 if c.bias is not None else 2]
    return value, grads


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk_mb, options):
        need = tuple(ctx.needs_input_grad[:3])
        ctx.reduction = options.get("reduction", "mean")
        ctx.args = (target, chunk_mb, options)
        ctx.save_for_backward(hidden, weight, bias)  # (for 'none', and a second backward)
        if ctx.reduction == "none":  # backward runs the loop with the tokens weighted by g
            value, _ = _eager((hidden, weight, bias), target, chunk_mb, options,
                              want_value=True, want_grad=False)
            return value
        value, grads = _eager((hidden, weight, bias), target, chunk_mb, options,
                              want_value=True, want_grad=True, need=need)
        ctx.grads = grads  # (not saved_tensors: they are outputs of no graph)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: refuse rather than detach silently
            raise RuntimeError(_NO_SECOND)
        if ctx.reduction == "none":
            hidden, weight, bias = ctx.saved_tensors
            target, chunk_mb, options = ctx.args
            options = dict(options)
            g = grad_output.detach()
            sw = options.get("sample_weight")
            if sw is not None:  # (a number or list too, as the forward pass takes it)
                g = g * torch.as_tensor(_detached(sw), dtype=g.dtype, device=g.device)
            options["sample_weight"] = g
            options["reduction"] = "sum"
            options["validate"] = False  # forward checked the data; g may be negative
            _, grads = _eager((hidden, weight, bias), target, chunk_mb, options,
                              want_value=False, want_grad=True,
                              need=tuple(ctx.needs_input_grad[:3]))
        else:
            # The forward pass's gradients are handed over (autograd takes them without a
            # copy) and scaled in place, unless grad_output is 1 (a loss's backward(): one
            # read of it, a sync on a GPU that costs nothing beside the GEMMs). A retained
            # graph's second backward (gradcheck, two autograd.grad calls) finds them gone
            # and runs the loop again.
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                hidden, weight, bias = ctx.saved_tensors
                target, chunk_mb, options = ctx.args
                _, grads = _eager((hidden, weight, bias), target, chunk_mb, options,
                                  want_value=False, want_grad=True,
                                  need=tuple(ctx.needs_input_grad[:3]))
            scale = grad_output.detach()
            if scale.numel() != 1 or float(scale) != 1.0:
                grads = tuple(g.mul_(scale.to(g.dtype)) if g is not None else None
                              for g in grads)
        grads = tuple(grads) + (None,) * (3 - len(grads))
        return grads[0], grads[1], grads[2], None, None, None
