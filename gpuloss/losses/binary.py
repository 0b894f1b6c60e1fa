r"""Binary losses: one loss per element, targets in [0, 1] (or {-1, +1} for the hinge losses).

Each declaration is the one place to learn what its loss does (see `gpuloss.losses`).
"""

from __future__ import annotations

import numpy as np

from .._api import CLIP_EPS, LABEL_SMOOTHING, POS_WEIGHT, Loss, number, optional_number
from .._call import ELEMENTWISE, SIGN, UNIT
from ._doc import COMMON_PARAMS, ENTRY_POINTS, REDUCTION, RETURNS


def _naive_bce(xp, p, y):  # with the clipping a user adds
    eps = np.finfo(p.dtype).eps
    p = xp.clip(p, eps, 1 - eps)
    loss = -xp.mean(y * xp.log(p) + (1 - y) * xp.log(1 - p))
    return loss, (-y / p + (1 - y) / (1 - p)) / p.size


def _focal_params(o):
    """(gamma, a, b) of the focal term, alpha_t = a y + b (1 - y): (alpha, 1 - alpha), or
    (1, 1) without alpha."""
    alpha = o["focal_alpha"]
    return (o["focal_gamma"], 1.0, 1.0) if alpha is None else (o["focal_gamma"], alpha, 1 - alpha)


def _naive_bce_with_logits(xp, z, y):
    s = 1 / (1 + xp.exp(-z))
    loss = -xp.mean(y * xp.log(s) + (1 - y) * xp.log(1 - s))
    return loss, (s - y) / z.size


bce = Loss(
    "bce",
    aliases=("binary_crossentropy", "binary_cross_entropy", "log_loss"),
    family=ELEMENTWISE,
    kernel="GlBce",
    options=(CLIP_EPS,),
    pred_rule=UNIT,
    target_rule=UNIT,
    kernel_params=lambda o: (o["eps"], 1.0 - o["eps"]),  # the clipping bounds
    naive=_naive_bce,
    torch_peer=lambda F, x, y: F.binary_cross_entropy(x, y),
    doc=rf"""Binary cross-entropy on probabilities, and its gradient.

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
    {REDUCTION.format(unit="element", mean="Σ w·l / Σ w (Σ l / n unweighted)")}
    {COMMON_PARAMS.format(weight_shape="per element, broadcastable to pred's shape")}
    eps : float, optional
        Clipping bound, in (0, 0.5). Default: ``finfo(pred.dtype).eps``.

{RETURNS.format(unit="element")}

    Notes
    -----
    {ENTRY_POINTS}

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
    aliases=("binary_cross_entropy_with_logits", "sigmoid_binary_cross_entropy"),
    family=ELEMENTWISE,
    kernel="GlBceLogits",
    options=(POS_WEIGHT, LABEL_SMOOTHING,
             number("focal_gamma", 0.0, "focusing exponent of the focal loss (>= 0; 0: none)",
                    0.0),
             optional_number("focal_alpha", "focal loss: weight of the positive class, in "
                             "[0, 1] (None: no alpha term)", 0.0, 1.0)),
    target_rule=UNIT,
    kernel_params=lambda o: (o["label_smoothing"], *_focal_params(o)),
    kernel_switches={"GL_FOCAL": lambda o, nonzero: nonzero(o["focal_gamma"])
                     or o["focal_alpha"] is not None},
    naive=_naive_bce_with_logits,
    torch_peer=lambda F, x, y: F.binary_cross_entropy_with_logits(x, y),
    doc=rf"""Binary cross-entropy on logits (sigmoid fused), and its gradient.

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
    {REDUCTION.format(unit="element", mean="Σ w·l / Σ w (Σ l / n unweighted)")}
    {COMMON_PARAMS.format(weight_shape="per element, broadcastable to pred's shape")}
    pos_weight : array_like, optional
        Weight of the positive term, broadcast along the last axis (PyTorch's
        ``pos_weight``); it does not enter the mean's denominator.
    label_smoothing : float, default 0
        In [0, 1]; targets become ``y * (1 - label_smoothing) + label_smoothing / 2``.
    focal_gamma : float, default 0
        The focal loss' focusing exponent \(\gamma \ge 0\) (see Notes); 0 is none.
    focal_alpha : float, optional
        The focal loss' weight \(\alpha \in [0, 1]\) of the positive class (see Notes);
        None (the default, as optax) is none. torchvision's default is 0.25.

{RETURNS.format(unit="element")}

    Notes
    -----
    {ENTRY_POINTS}

    **Focal loss** (Lin et al. 2017). With \(p = \sigma(z)\),
    \(p_t = p\, y' + (1 - p)(1 - y')\) and \(\alpha_t = \alpha y' + (1 - \alpha)(1 - y')\)
    (1 without ``focal_alpha``), each element's loss above becomes

    $$
    \ell^{{\mathrm{{focal}}}} = \alpha_t (1 - p_t)^\gamma\, \ell, \qquad
    \frac{{\partial \ell^{{\mathrm{{focal}}}}}}{{\partial z}} = \alpha_t (1 - p_t)^\gamma
        \Big( \frac{{\partial \ell}}{{\partial z}} + \gamma\, (1 - 2 y')\,
        \frac{{p (1 - p)}}{{1 - p_t}}\, \ell \Big)
    $$

    \((1 - p_t)^\gamma\) is computed in the log domain and the ratio
    \(p(1 - p)/(1 - p_t)\), which lies in [0, 1], from \(e^{{-|z|}}\): loss and gradient
    are finite for every finite logit and every \(\gamma \ge 0\) (autograd of the
    formula gives NaN at saturated logits for \(\gamma < 1\)). With both options at their
    defaults the result is the cross-entropy, bit for bit. Matches torchvision's and optax's
    ``sigmoid_focal_loss`` and Keras' ``BinaryFocalCrossentropy(from_logits=True)``.

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


# ---------------------------------------------------------------------------------------------
# hinge, squared_hinge: labels -1 / +1 (or booleans), scores as predictions

_SIGN_PARAMS = f"""\
pred : array
        Scores (decision values), a real floating array.
    target : array
        Labels -1 or +1 with pred's shape, or a boolean array (False is -1, True +1). With
        ``validate=True`` any other value raises ``ValueError`` (0/1 labels: pass
        ``2 * y - 1`` or ``y.astype(bool)``).
    {REDUCTION.format(unit="element", mean="Σ w·l / Σ w (Σ l / n unweighted)")}
    {COMMON_PARAMS.format(weight_shape="per element, broadcastable to pred's shape")}"""


def _naive_hinge(xp, p, y):
    m = 1 - y * p
    return xp.mean(xp.maximum(m, 0)), xp.where(m > 0, -y, 0.0) / p.size


hinge = Loss(
    "hinge",
    aliases=("hinge_loss",),
    family=ELEMENTWISE,
    kernel="GlHinge",
    target_rule=SIGN,
    naive=_naive_hinge,
    torch_peer=lambda F, x, y: F.relu(1 - y * x).mean(),  # as a PyTorch user writes it
    doc=rf"""Hinge loss (the SVM's) and its gradient.

    With labels \(y_i \in \{{-1, +1\}}\) and the margin \(m_i = 1 - y_i p_i\):

    $$
    \ell_i = w_i \max(0, m_i), \qquad
    \frac{{\partial L}}{{\partial p_i}} = \frac{{w_i}}{{\sum_j w_j}}
        \begin{{cases}} -y_i & m_i > 0 \\ 0 & m_i \le 0 \end{{cases}}
    $$

    A sample classified right with a margin of at least 1 costs nothing and pulls nothing.

    Parameters
    ----------
    {_SIGN_PARAMS}

{RETURNS.format(unit="element")}

    Notes
    -----
    {ENTRY_POINTS}

    Like ``optax.hinge_loss`` and Keras ``Hinge`` (which maps 0/1 labels to -1/+1 by itself;
    here pass booleans for that).

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> s = np.array([2.0, 0.5, -0.5]); y = np.array([1.0, 1.0, 1.0])
    >>> float(gl.hinge(s, y))
    0.6666666666666666
    >>> gl.hinge.grad(s, y)
    array([ 0.        , -0.33333333, -0.33333333])
    >>> float(gl.hinge(s, np.array([True, True, False])))
    0.3333333333333333
    """,
)


def _naive_squared_hinge(xp, p, y):
    h = xp.maximum(1 - y * p, 0)
    return xp.mean(h**2), -2 * y * h / p.size


squared_hinge = Loss(
    "squared_hinge",
    family=ELEMENTWISE,
    kernel="GlSquaredHinge",
    target_rule=SIGN,
    naive=_naive_squared_hinge,
    torch_peer=lambda F, x, y: F.relu(1 - y * x).square().mean(),
    doc=rf"""Squared hinge loss and its gradient: the hinge, squared, so that its gradient
    is continuous.

    With labels \(y_i \in \{{-1, +1\}}\) and \(h_i = \max(0, 1 - y_i p_i)\):

    $$
    \ell_i = w_i\,h_i^2, \qquad
    \frac{{\partial L}}{{\partial p_i}} = -\frac{{2\,w_i\,y_i\,h_i}}{{\sum_j w_j}}
    $$

    Parameters
    ----------
    {_SIGN_PARAMS}

{RETURNS.format(unit="element")}

    Notes
    -----
    {ENTRY_POINTS}

    Like Keras ``SquaredHinge``.

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> s = np.array([2.0, 0.5, -0.5]); y = np.array([1.0, 1.0, -1.0])
    >>> float(gl.squared_hinge(s, y))
    0.16666666666666666
    >>> gl.squared_hinge.grad(s, y)
    array([ 0.        , -0.33333333,  0.33333333])
    """,
)

__all__ = ["bce", "bce_with_logits", "hinge", "squared_hinge"]  # the losses declared here, in the order of the docs
