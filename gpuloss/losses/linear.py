"""linear_cross_entropy: a language model's output layer and its cross-entropy in one call,
without the logits (the chunked loop is `gpuloss._linear`; PyTorch's autograd, JAX's scan and
Dask's blocks are `gpuloss._torch_linear`, `_jax_linear` and `_dask_linear`).

It is not one of `LOSSES` (which take a prediction and a target): it takes hidden states, the
layer's weight and the targets.
"""

from __future__ import annotations

import inspect
import sys

from .. import _api, _jax, _linear, _torch

__all__ = ["linear_cross_entropy"]


class LinearCrossEntropy:
    """See `linear_cross_entropy`'s docstring (the one instance of this class)."""

    name = "linear_cross_entropy"

    def __init__(self):
        self.__name__ = self.__qualname__ = self.name
        self.__module__ = "gpuloss"
        self.__doc__ = _DOC
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for n in ("hidden", "weight", "target")]
        params += [inspect.Parameter("bias", inspect.Parameter.KEYWORD_ONLY, default=None),
                   inspect.Parameter("chunk_mb", inspect.Parameter.KEYWORD_ONLY,
                                     default=_linear.DEFAULT_CHUNK_MB)]
        cce = _api._BY_NAME["cce_with_logits"]
        defaults = {o.name: o.default for o in cce.declared}
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=defaults[n])
                   for n in _linear._OPTIONS]
        self.__signature__ = inspect.Signature(params)
        self.grad = self._entry_point("grad", want_value=False)
        self.value_and_grad = self._entry_point("value_and_grad", want_value=True)

    def __repr__(self):
        return f"<gpuloss loss {self.name!r}>"

    def __reduce__(self):
        return "linear_cross_entropy"  # the module-level instance (gpuloss.losses.linear)

    def __call__(self, hidden, weight, target, *positional, bias=None,
                 chunk_mb=_linear.DEFAULT_CHUNK_MB, **options):
        _refuse_positional(positional)
        return run(hidden, weight, target, bias, chunk_mb, options, want_value=True,
                   want_grad=False)[0]

    def _entry_point(self, method, *, want_value):
        def entry(hidden, weight, target, *positional, bias=None,
                  chunk_mb=_linear.DEFAULT_CHUNK_MB, **options):
            _refuse_positional(positional)
            value, grads = run(hidden, weight, target, bias, chunk_mb, options,
                               want_value=want_value, want_grad=True)
            return (value, grads) if want_value else grads

        entry.__name__ = method
        entry.__qualname__ = f"{self.name}.{method}"
        entry.__module__ = "gpuloss"
        entry.__signature__ = self.__signature__
        what = "the loss and its gradients" if want_value else "the gradients"
        entry.__doc__ = (
            f"Return {what} of :func:`gpuloss.linear_cross_entropy`: ``(d_hidden, d_weight)``, "
            "or ``(d_hidden, d_weight, d_bias)`` with a bias, each in its input's shape, dtype "
            "and library. Takes exactly the arguments of ``gpuloss.linear_cross_entropy``; "
            "for reduction='none' the gradients are those of the sum of the returned losses.")
        return entry


def _refuse_positional(positional):
    if positional:
        msg = (f"linear_cross_entropy() got {len(positional)} option(s) by position; options "
               f"are keyword-only: linear_cross_entropy(hidden, weight, target, bias=b, "
               f"reduction='sum').")
        raise TypeError(msg)


def run(hidden, weight, target, bias, chunk_mb, options, *, want_value, want_grad):
    """(value, gradients or None) of one entry point."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.compiler.is_compiling():  # (before anything looks at a
        # tensor): the compiler leaves the call to eager PyTorch, a graph break
        return _torch_module().run(hidden, weight, target, bias, chunk_mb, options,
                                   want_value=want_value, want_grad=want_grad)
    if type(hidden).__module__.startswith("dask."):
        from .. import _dask_linear  # blocks of tokens, the weight shared; lazy

        return _dask_linear.run(hidden, weight, target, bias, chunk_mb, options,
                                want_value=want_value, want_grad=want_grad)
    if any(_jax.is_jax_array(x) for x in (hidden, weight, bias)):
        from .. import _jax_linear  # one lax.scan with a custom_vjp: jit, grad, vmap

        return _jax_linear.run(hidden, weight, target, bias, chunk_mb, options,
                               want_value=want_value, want_grad=want_grad)
    if any(_torch.is_tensor(x) for x in (hidden, weight, bias)):  # autograd
        return _torch_module().run(hidden, weight, target, bias, chunk_mb, options,
                                   want_value=want_value, want_grad=want_grad)
    c = _linear.check(hidden, weight, target, bias, chunk_mb, options)
    need = (True, True, c.bias is not None) if want_grad else (False, False, False)
    value, grads = _linear.compute(c, want_value=want_value, need=need)
    if grads is not None:
        grads = tuple(g for g, n in zip(grads, need) if n)
        if c.bias is None:
            grads = grads[:2]
    return value, grads


def _torch_module():
    from .. import _torch_linear  # (imports torch: only once a tensor has arrived)

    return _torch_linear


_DOC = r"""Cross-entropy of a linear layer's logits, and its gradients, without the logits.

    Equal to ``cce_with_logits(hidden @ weight.T + bias, target, **options)`` with the chain
    rule for the gradients: with \(G = \partial L / \partial z\) the gradient with respect to
    the logits \(z = h W^\top + b\),

    $$
    \frac{\partial L}{\partial h} = G\, W, \qquad
    \frac{\partial L}{\partial W} = G^\top h, \qquad
    \frac{\partial L}{\partial b} = \textstyle\sum_{\text{tokens}} G .
    $$

    The tokens are taken in chunks of at most ``chunk_mb`` megabytes of logits; each chunk's
    gradient is written over its logits and carried straight into the three products, so
    the whole \(N \times V\) logits never exist. See the guide page "Language models".

    Parameters
    ----------
    hidden : array
        Hidden states, shape (..., H) (tokens × features).
    weight : array
        The output layer's weight, shape (V, H) (classes × features), hidden's dtype.
    target : array
        Class indices (integer, hidden's shape without its last axis) or probabilities
        (floating, shape (..., V)).
    bias : array, optional
        Shape (V,).
    chunk_mb : float, default 256
        Megabytes of logits per chunk (in float32 on the CPU for 16-bit inputs). Results do
        not depend on it beyond rounding.
    reduction : {'mean', 'sum', 'none'}
        As ``cce_with_logits``: 'mean' divides by \(D = \sum_i w_i c_{t_i}\) over the
        counted tokens; 'none' gives one loss per token (hidden's shape without its last
        axis), and ``.grad`` the gradients of their sum.
    sample_weight : array, optional
        Non-negative weight per token, broadcastable to hidden's shape without its last axis.
    validate : bool, default True
        Check labels' range and weights.
    class_weight, ignore_index, label_smoothing, focal_gamma, z_loss, softcap
        As ``cce_with_logits``.

    Returns
    -------
    loss : array
        0-d (reduction 'mean' or 'sum') or per token ('none'), in hidden's dtype and library.

    Notes
    -----
    ``.grad`` returns ``(d_hidden, d_weight)``, or ``(d_hidden, d_weight, d_bias)`` with a
    bias, each in its input's shape and dtype; ``.value_and_grad`` returns ``(loss, grads)``
    from one pass. The gradients are those of exactly what the call returns (with the mean's
    1/D). With PyTorch tensors the call is differentiable: ``loss.backward()`` fills
    ``hidden.grad``, ``weight.grad`` and ``bias.grad``; see ``gpuloss.torch.LinearCrossEntropy``.

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> rng = np.random.default_rng(0)
    >>> h = rng.normal(size=(4, 3)); W = rng.normal(size=(5, 3)); t = np.array([0, 4, 2, 2])
    >>> loss = gl.linear_cross_entropy(h, W, t)
    >>> bool(np.isclose(loss, gl.cce_with_logits(h @ W.T, t)))
    True
    >>> d_hidden, d_weight = gl.linear_cross_entropy.grad(h, W, t)
    >>> d_hidden.shape, d_weight.shape
    ((4, 3), (5, 3))
    """

linear_cross_entropy = LinearCrossEntropy()
