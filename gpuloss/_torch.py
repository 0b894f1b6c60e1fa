"""PyTorch autograd for every loss: the fused pass once in forward, `grad_output` times the
saved gradient in backward (DESIGN §10).

Handed the checked call and the function that computes it without a graph (the NumPy backend
on views of CPU tensors, the CUDA kernels for CUDA tensors), so it imports nothing of gpuloss
and the dispatch stays free of import circles. torch is imported only when a tensor arrives.
"""

from __future__ import annotations

import dataclasses


def compute_with_graph(call, compute):
    """(the loss of `call` attached to autograd through `call.pred`, None).

    `compute(call)` returns (value, grad) as plain tensors. Forward asks it for both in one
    pass and keeps only the gradient (one pred-sized tensor: no logits, no softmax copy).
    """
    value, grad = compute(dataclasses.replace(call, want_value=True, want_grad=True))
    axis = call.axis if call.categorical and call.reduction == "none" else None
    return _attach().apply(call.pred, value, grad, axis), None


_FN = None


def _attach():
    """The autograd Function, made on first use (so that importing gpuloss needs no torch)."""
    global _FN
    if _FN is None:
        import torch

        class FusedLoss(torch.autograd.Function):
            @staticmethod
            def forward(ctx, pred, value, grad, axis):
                ctx.save_for_backward(grad)
                ctx.axis = axis
                return value

            @staticmethod
            def backward(ctx, grad_output):
                (grad,) = ctx.saved_tensors
                if ctx.axis is not None:  # one loss per sample: broadcast along the classes
                    grad_output = grad_output.unsqueeze(ctx.axis)
                elif (grad_output.device.type == "cpu" and grad_output.dim() == 0
                      and grad_output.item() == 1.0):
                    # loss.backward(): the saved gradient itself, no pass and no new tensor
                    # (autograd copies it if it is still shared, e.g. with retain_graph)
                    return grad, None, None, None
                return grad * grad_output, None, None, None

        _FN = FusedLoss
    return _FN
