r"""The five losses: what each computes, its gradient, and what "mean" divides by.

This module is the one place to learn what a loss does. The backends (`_numpy_backend`,
`_generic_backend`, `_cuda_backend`) only compute what is written here.
"""

from __future__ import annotations

import difflib

from ._api import Loss

_REDUCTION = """\
reduction : {{'mean', 'sum', 'none'}}, default 'mean'
        'none' returns the weighted per-{unit} losses, 'sum' their sum, 'mean' {mean}."""

_COMMON_PARAMS = """\
sample_weight : array_like, optional
        Non-negative weights {weight_shape}. Applied as ``w * l`` for every reduction.
    validate : bool, default True
        Check the values (domain, labels, weights) and raise ``ValueError`` when they are
        out of range. ``False`` skips the check: bad values then give NaN, never an
        out-of-bounds access."""

_RETURNS = """\
    Returns
    -------
    loss : array
        0-d array (reduction 'mean' or 'sum') or per-{unit} losses ('none'), in pred's
        dtype, library and device. ``float(loss)`` works."""

_ENTRY_POINTS = """\
``.grad`` returns the gradient with respect to pred (pred's shape and dtype);
    ``.value_and_grad`` returns ``(loss, grad)`` from one pass over the data. The gradient
    is the derivative of exactly what the call returns: it carries the 1/n of the mean, and
    for 'none' it is the derivative of the sum of the returned array."""


mse = Loss(
    "mse",
    (),
    rf"""Mean squared error and its gradient.

    $$
    \ell_i = w_i\,(p_i - y_i)^2, \qquad
    L = \frac{{\sum_i \ell_i}}{{\sum_i w_i}}, \qquad
    \frac{{\partial L}}{{\partial p_i}} = \frac{{2\,w_i\,(p_i - y_i)}}{{\sum_j w_j}}
    $$

    Without weights (all \(w_i = 1\)) the mean divides by n, the number of elements, and
    the gradient is \(2 (p_i - y_i) / n\).

    Parameters
    ----------
    pred : array
        Predictions, a real floating array (float16, float32 or float64).
    target : array
        Targets with pred's shape (integer and boolean targets are used as numbers).
    {_REDUCTION.format(unit="element", mean="Σ w·l / Σ w (Σ l / n unweighted)")}
    {_COMMON_PARAMS.format(weight_shape="per element, broadcastable to pred's shape")}

{_RETURNS.format(unit="element")}

    Notes
    -----
    {_ENTRY_POINTS}

    Like ``torch.nn.functional.mse_loss`` and ``sklearn.metrics.mean_squared_error``
    (``sample_weight`` as in scikit-learn).

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> p = np.array([0.5, 2.0, 1.0]); y = np.array([1.0, 2.0, 0.0])
    >>> float(gl.mse(p, y))
    0.4166666666666667
    >>> gl.mse.grad(p, y)
    array([-0.33333333,  0.        ,  0.66666667])
    """,
)

bce = Loss(
    "bce",
    ("eps",),
    rf"""Binary cross-entropy on probabilities, and its gradient.

    Probabilities are first clipped, \(p' = \mathrm{{clip}}(p, \epsilon, 1 - \epsilon)\),
    and the loss **and** the gradient are evaluated at \(p'\) (so the gradient never
    vanishes silently at 0 or 1):

    $$
    \ell_i = -w_i \left[ y_i \log p'_i + (1 - y_i) \log(1 - p'_i) \right], \qquad
    \frac{{\partial L}}{{\partial p_i}}
      = \frac{{w_i}}{{\sum_j w_j}} \left( -\frac{{y_i}}{{p'_i}} + \frac{{1 - y_i}}{{1 - p'_i}} \right)
      = \frac{{w_i}}{{\sum_j w_j}} \, \frac{{p'_i - y_i}}{{p'_i (1 - p'_i)}}
    $$

    and \(L = \sum_i \ell_i / \sum_i w_i\) (the mean divides by n when unweighted).

    Parameters
    ----------
    pred : array
        Probabilities in [0, 1], a real floating array.
    target : array
        Targets in [0, 1] (soft labels allowed) with pred's shape.
    {_REDUCTION.format(unit="element", mean="Σ w·l / Σ w (Σ l / n unweighted)")}
    {_COMMON_PARAMS.format(weight_shape="per element, broadcastable to pred's shape")}
    eps : float, optional
        Clipping bound, in (0, 0.5). Default: ``finfo(pred.dtype).eps``.

{_RETURNS.format(unit="element")}

    Notes
    -----
    {_ENTRY_POINTS}

    Matches ``torch.nn.functional.binary_cross_entropy`` away from the clipping bounds
    (PyTorch clamps the log at -100 instead) and ``sklearn.metrics.log_loss`` for binary
    problems. Prefer `bce_with_logits` when you have logits: it needs no clipping.

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> p = np.array([0.9, 0.2, 0.6]); y = np.array([1.0, 0.0, 1.0])
    >>> round(float(gl.bce(p, y)), 6)
    0.279777
    >>> loss, grad = gl.bce.value_and_grad(p, y)
    >>> grad.round(6)
    array([-0.37037 ,  0.416667, -0.555556])
    """,
)

bce_with_logits = Loss(
    "bce_with_logits",
    ("pos_weight", "label_smoothing"),
    rf"""Binary cross-entropy on logits (sigmoid fused), and its gradient.

    With \(y' = y (1 - \lambda) + \lambda / 2\) (label smoothing \(\lambda\)),
    positive-class weight \(c\) (``pos_weight``) and
    \(\mathrm{{softplus}}(z) = \log(1 + e^z)\):

    $$
    \ell_i = w_i \left[ (1 - y'_i)\,\mathrm{{softplus}}(z_i)
             + c_i\, y'_i\, \mathrm{{softplus}}(-z_i) \right], \qquad
    \frac{{\partial L}}{{\partial z_i}} = \frac{{w_i}}{{\sum_j w_j}}
        \left[ (1 - y'_i)\,\sigma(z_i) - c_i\, y'_i\, \sigma(-z_i) \right]
    $$

    With \(c = 1\) the gradient is the familiar \((\sigma(z_i) - y_i) / n\).
    The loss is computed as \(\mathrm{{softplus}}(z) = \max(z, 0) + \log(1 + e^{{-|z|}})\),
    which never overflows, and both terms are non-negative so nothing cancels: results are
    exact for every finite logit, up to the dtype's maximum. No clipping.

    Parameters
    ----------
    pred : array
        Logits, a real floating array.
    target : array
        Targets in [0, 1] with pred's shape.
    {_REDUCTION.format(unit="element", mean="Σ w·l / Σ w (Σ l / n unweighted)")}
    {_COMMON_PARAMS.format(weight_shape="per element, broadcastable to pred's shape")}
    pos_weight : array_like, optional
        Weight of the positive term, broadcast along the last axis (PyTorch's
        ``pos_weight``); it does not enter the mean's denominator.
    label_smoothing : float, default 0
        In [0, 1]; targets become ``y * (1 - label_smoothing) + label_smoothing / 2``.

{_RETURNS.format(unit="element")}

    Notes
    -----
    {_ENTRY_POINTS}

    Matches ``torch.nn.functional.binary_cross_entropy_with_logits`` (``weight`` there is
    our ``sample_weight``, but PyTorch's mean divides by n even when weighted; ours divides
    by Σ w, as scikit-learn does).

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> z = np.array([2.0, -1.0, 0.0]); y = np.array([1.0, 0.0, 1.0])
    >>> round(float(gl.bce_with_logits(z, y)), 6)
    0.377779
    >>> gl.bce_with_logits.grad(z, y).round(6)
    array([-0.039734,  0.089647, -0.166667])
    """,
)

cce = Loss(
    "cce",
    ("class_weight", "ignore_index", "axis", "eps"),
    rf"""Categorical cross-entropy on probabilities, and its gradient.

    Probabilities are clipped, \(p' = \mathrm{{clip}}(p, \epsilon, 1 - \epsilon)\), and
    loss and gradient are evaluated at \(p'\). With class weights \(c_k\):

    $$
    \ell_i = -w_i \sum_k c_k\, y_{{ik}} \log p'_{{ik}}, \qquad
    \frac{{\partial L}}{{\partial p_{{ik}}}} = -\frac{{w_i}}{{D}}\,\frac{{c_k\, y_{{ik}}}}{{p'_{{ik}}}}
    $$

    Integer targets \(t_i\) mean one-hot \(y\); then
    \(D = \sum_i w_i c_{{t_i}}\) over the samples not equal to ``ignore_index``
    (PyTorch's ``cross_entropy`` convention). Probability targets: \(D = \sum_i w_i\)
    (N, the number of samples, when unweighted).

    Parameters
    ----------
    pred : array
        Probabilities in [0, 1] with the classes along ``axis``.
    target : array
        Either class indices (integer dtype, pred's shape without ``axis``) or probabilities
        (floating, pred's shape; one-hot or soft).
    {_REDUCTION.format(unit="sample", mean="divides by D above")}
    {_COMMON_PARAMS.format(weight_shape="per sample, broadcastable to pred's shape without axis")}
    class_weight : array_like, optional
        Shape (K,): weight of each class (PyTorch's ``weight``).
    ignore_index : int, optional
        With integer targets: samples with this label give 0 loss, 0 gradient, and leave
        the denominator.
    axis : int, default -1
        The class axis.
    eps : float, optional
        Clipping bound, in (0, 0.5). Default: ``finfo(pred.dtype).eps``.

{_RETURNS.format(unit="sample")}

    Notes
    -----
    {_ENTRY_POINTS}

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]); t = np.array([0, 2])
    >>> round(float(gl.cce(p, t)), 6)
    0.289909
    >>> gl.cce.grad(p, t).round(6)
    array([[-0.714286,  0.      ,  0.      ],
           [ 0.      ,  0.      , -0.625   ]])
    """,
)

cce_with_logits = Loss(
    "cce_with_logits",
    ("class_weight", "ignore_index", "label_smoothing", "axis"),
    rf"""Categorical cross-entropy on logits (softmax fused), and its gradient.

    With \(\log p_{{ik}} = z_{{ik}} - \mathrm{{logsumexp}}_j z_{{ij}}\) (computed with the
    row maximum subtracted, so it never overflows), class weights \(c_k\) and label
    smoothing \(\lambda\):

    $$
    \ell_i = -w_i \sum_k c_k\, y'_{{ik}} \log p_{{ik}}, \qquad
    \frac{{\partial L}}{{\partial z_{{ik}}}} = \frac{{w_i}}{{D}}
        \Big( \mathrm{{softmax}}(z_i)_k \sum_j c_j y'_{{ij}} - c_k\, y'_{{ik}} \Big)
    $$

    Unweighted one-hot targets give the familiar \((\mathrm{{softmax}}(z_i)_k - y_{{ik}})/N\).
    Probability targets are smoothed as \(y' = y (1 - \lambda) + \lambda / K\), and
    \(D = \sum_i w_i\) (N unweighted). Integer targets follow PyTorch's
    ``cross_entropy`` exactly: \(\ell_i = w_i[(1-\lambda) c_{{t_i}} (-\log p_{{i t_i}})
    + \frac{{\lambda}}{{K}} \sum_k c_k (-\log p_{{ik}})]\) and
    \(D = \sum_i w_i c_{{t_i}}\) over samples not equal to ``ignore_index``.

    Parameters
    ----------
    pred : array
        Logits with the classes along ``axis``.
    target : array
        Either class indices (integer dtype, pred's shape without ``axis``) or probabilities
        (floating, pred's shape; one-hot or soft).
    {_REDUCTION.format(unit="sample", mean="divides by D above")}
    {_COMMON_PARAMS.format(weight_shape="per sample, broadcastable to pred's shape without axis")}
    class_weight : array_like, optional
        Shape (K,): weight of each class (PyTorch's ``weight``).
    ignore_index : int, optional
        With integer targets: samples with this label give 0 loss, 0 gradient, and leave
        the denominator.
    label_smoothing : float, default 0
        In [0, 1], PyTorch's formula.
    axis : int, default -1
        The class axis (use ``axis=1`` for PyTorch's (N, C, d1, ...) layout).

{_RETURNS.format(unit="sample")}

    Notes
    -----
    {_ENTRY_POINTS}

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> z = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]]); t = np.array([0, 1])
    >>> round(float(gl.cce_with_logits(z, t)), 6)
    0.31854
    >>> gl.cce_with_logits.grad(z, t).round(6)
    array([[-0.170499,  0.121216,  0.049283],
           [ 0.054302, -0.09876 ,  0.044459]])
    """,
)

# what other libraries call these losses, for the KeyError's suggestion
_PEER_NAMES = {
    "crossentropy": "cce_with_logits", "cross_entropy": "cce_with_logits",
    "categorical_crossentropy": "cce", "sparse_categorical_crossentropy": "cce",
    "softmax_cross_entropy": "cce_with_logits", "binary_crossentropy": "bce",
    "binary_cross_entropy": "bce", "binary_cross_entropy_with_logits": "bce_with_logits",
    "sigmoid_binary_cross_entropy": "bce_with_logits", "log_loss": "bce",
    "mse_loss": "mse", "mean_squared_error": "mse", "squared_error": "mse", "l2_loss": "mse",
}


class _Losses(dict):
    """Every loss by its name: ``gl.LOSSES["mse"] is gl.mse``. An unknown name raises a
    KeyError that lists the names and suggests the closest one."""

    def __missing__(self, name):
        guess = _PEER_NAMES.get(str(name).lower())
        if guess is None:
            close = difflib.get_close_matches(str(name).lower(), list(self), n=1, cutoff=0.5)
            guess = close[0] if close else None
        hint = f" Did you mean {guess!r}?" if guess else ""
        msg = f"No loss named {name!r}; the losses are {', '.join(self)}.{hint}"
        raise KeyError(msg)


LOSSES = _Losses(
    (loss.name, loss) for loss in (mse, bce, bce_with_logits, cce, cce_with_logits)
)
