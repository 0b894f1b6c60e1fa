"""PyTorch modules: every gpuloss loss as a ``torch.nn.Module``.

``gpuloss.torch.Loss("cce_with_logits", label_smoothing=0.1)`` is a module for models and
configs: calling it runs the loss on tensors, attached to autograd when the prediction
requires grad (the fused pass once in forward; backward multiplies the saved gradient).
Importing this module imports PyTorch; ``import gpuloss`` alone does not.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _api
from ._torch import operators as _register_operators

_register_operators()  # torch.ops.gpuloss.<loss>, registered before anything is compiled

__all__ = ["LinearCrossEntropy", "Loss"]

_ARRAY_OPTIONS = ("sample_weight", "pos_weight", "class_weight")


class Loss(torch.nn.Module):
    """A gpuloss loss as an ``nn.Module``.

    Parameters
    ----------
    name : str
        The loss, as in ``gpuloss.LOSSES`` (other libraries' names are suggested when
        unknown).
    **options
        The loss's options (``reduction``, ``class_weight``, ``label_smoothing``, ...), fixed
        for every call. Array options become buffers: ``module.to(device)`` moves them, and
        they are in ``state_dict()``.

    Notes
    -----
    Calling the module as ``module(pred, target, **more)`` returns ``gpuloss.<name>(pred,
    target, **options, **more)``; ``more`` overrides an option for one call (a batch's
    ``sample_weight``, say).

    Examples
    --------
    >>> import torch, gpuloss.torch
    >>> criterion = gpuloss.torch.Loss("cce_with_logits", label_smoothing=0.1)
    >>> z = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]], requires_grad=True)
    >>> loss = criterion(z, torch.tensor([0, 1]))
    >>> loss.backward()
    >>> z.grad.shape
    torch.Size([2, 3])
    """

    def __init__(self, name: str, **options):
        super().__init__()
        fn = _api._BY_NAME.get(name) if isinstance(name, str) else None
        if fn is None:
            from . import LOSSES

            fn = LOSSES[name]  # the KeyError that lists the names and suggests one
        unknown = sorted(set(options) - set(fn.options))
        if unknown:
            msg = (f"{fn.name} has no option {unknown[0]!r}; it accepts "
                   f"{', '.join(fn.options)}.")
            raise TypeError(msg)
        self.name = fn.name
        self._fn = fn
        self._options = {}
        for key, value in options.items():
            if key in _ARRAY_OPTIONS and value is not None and not np.isscalar(value):
                tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(
                    np.asarray(value))
                self.register_buffer(key, tensor)
            else:
                self._options[key] = value

    def forward(self, pred, target, **more):
        options = dict(self._options)
        options.update({key: buf for key, buf in self.named_buffers(recurse=False)})
        options.update(more)
        return self._fn(pred, target, **options)

    def extra_repr(self) -> str:
        shown = [repr(self.name)]
        shown += [f"{k}={v!r}" for k, v in self._options.items()]
        shown += [f"{k}=<tensor {tuple(b.shape)}>" for k, b in self.named_buffers(recurse=False)]
        return ", ".join(shown)


class LinearCrossEntropy(torch.nn.Module):
    """A language model's output layer and its cross-entropy in one module, without the
    logits: ``gpuloss.linear_cross_entropy(hidden, lm_head.weight, target, bias=lm_head.bias,
    **options)``.

    Parameters
    ----------
    lm_head : torch.nn.Module
        The output layer: anything with a ``weight`` of shape (V, H) and an optional ``bias``
        (``nn.Linear(H, V)``; an ``nn.Embedding(V, H)`` for tied embeddings). It is a
        submodule: its parameters are this module's, and their gradients accumulate as usual
        (a weight tied to the embeddings gets both contributions).
    chunk_mb : float, default 256
        Megabytes of logits per chunk.
    **options
        ``cce_with_logits``' options (``reduction``, ``ignore_index``, ``label_smoothing``,
        ``z_loss``, ``softcap``, ...), fixed for every call; ``forward``'s keywords (these, and
        ``chunk_mb``) override them for one call. The bias is the layer's own.

    Examples
    --------
    >>> import torch, gpuloss.torch
    >>> head = torch.nn.Linear(16, 100, bias=False)
    >>> criterion = gpuloss.torch.LinearCrossEntropy(head, ignore_index=-100)
    >>> hidden = torch.randn(8, 16, requires_grad=True)
    >>> loss = criterion(hidden, torch.randint(0, 100, (8,)))
    >>> loss.backward()
    >>> head.weight.grad.shape
    torch.Size([100, 16])
    """

    def __init__(self, lm_head: torch.nn.Module, *, chunk_mb: float | None = None, **options):
        super().__init__()
        from ._linear import DEFAULT_CHUNK_MB
        from .losses.linear import linear_cross_entropy

        weight = getattr(lm_head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            msg = (f"lm_head must be a module with a 2-D weight (V, H), such as nn.Linear(H, V); "
                   f"got {type(lm_head).__name__}.")
            raise TypeError(msg)
        from ._linear import _OPTIONS

        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            msg = (f"linear_cross_entropy has no option {unknown[0]!r}; it accepts chunk_mb, "
                   f"{', '.join(_OPTIONS)}.")
            raise TypeError(msg)
        self.lm_head = lm_head
        self.chunk_mb = DEFAULT_CHUNK_MB if chunk_mb is None else chunk_mb
        self._fn = linear_cross_entropy
        self._options = options

    def forward(self, hidden, target, **more):
        options = {"chunk_mb": self.chunk_mb, **self._options, **more}
        bias = getattr(self.lm_head, "bias", None)
        if not isinstance(bias, torch.Tensor):  # nn.Embedding has none; Linear(bias=False) None
            bias = None
        return self._fn(hidden, self.lm_head.weight, target, bias=bias, **options)

    def extra_repr(self) -> str:
        shown = [f"chunk_mb={self.chunk_mb!r}"] + [f"{k}={v!r}" for k, v in self._options.items()]
        return ", ".join(shown)
