r"""Regression losses: one loss per element, any real target.

Each declaration is the one place to learn what its loss does: the formula and gradient in the
docstring, its options (default, check, meaning), its domain rules and the functor in
kernels/gpuloss_math.cuh that computes it on the GPU.
"""

from __future__ import annotations

from .._api import Loss
from .._call import ELEMENTWISE
from ._doc import COMMON_PARAMS, ENTRY_POINTS, REDUCTION, RETURNS


def _naive_mse(xp, p, y):
    d = p - y
    return xp.mean(d**2), 2 * d / p.size


mse = Loss(
    "mse",
    family=ELEMENTWISE,
    kernel="GlMse",
    naive=_naive_mse,
    torch_peer=lambda F, x, y: F.mse_loss(x, y),
    doc=    rf"""Mean squared error and its gradient.

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
    {REDUCTION.format(unit="element", mean="Σ w·l / Σ w (Σ l / n unweighted)")}
    {COMMON_PARAMS.format(weight_shape="per element, broadcastable to pred's shape")}

{RETURNS.format(unit="element")}

    Notes
    -----
    {ENTRY_POINTS}

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
