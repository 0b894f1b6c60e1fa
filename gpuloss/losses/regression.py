r"""Regression losses: one loss per element, any real target.

Each declaration is the one place to learn what its loss does: the formula and gradient in the
docstring, its options (default, check, meaning), its domain rules and the functor in
kernels/gpuloss_math.cuh that computes it on the GPU.
"""

from __future__ import annotations

from .._api import Loss, flag, number
from .._call import ELEMENTWISE, NONNEG
from ._doc import COMMON_PARAMS, ENTRY_POINTS, REDUCTION, RETURNS


def _naive_mse(xp, p, y):
    d = p - y
    return xp.mean(d**2), 2 * d / p.size


mse = Loss(
    "mse",
    aliases=("mse_loss", "mean_squared_error", "squared_error", "l2_loss"),
    family=ELEMENTWISE,
    kernel="GlMse",
    naive=_naive_mse,
    torch_peer=lambda F, x, y: F.mse_loss(x, y),
    doc=rf"""Mean squared error and its gradient.

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


_ELEMENTWISE_PARAMS = f"""\
pred : array
        Predictions, a real floating array (float16, float32 or float64).
    target : array
        Targets with pred's shape (integer and boolean targets are used as numbers).
    {REDUCTION.format(unit="element", mean="Σ w·l / Σ w (Σ l / n unweighted)")}
    {COMMON_PARAMS.format(weight_shape="per element, broadcastable to pred's shape")}"""


# ---------------------------------------------------------------------------------------------
# mae


def _naive_mae(xp, p, y):
    d = p - y
    return xp.mean(xp.abs(d)), xp.sign(d) / p.size


mae = Loss(
    "mae",
    aliases=("l1", "l1_loss", "mean_absolute_error"),
    family=ELEMENTWISE,
    kernel="GlMae",
    naive=_naive_mae,
    torch_peer=lambda F, x, y: F.l1_loss(x, y),
    doc=rf"""Mean absolute error (L1) and its gradient.

    $$
    \ell_i = w_i\,|p_i - y_i|, \qquad
    \frac{{\partial L}}{{\partial p_i}} = \frac{{w_i}}{{\sum_j w_j}}\,\mathrm{{sign}}(p_i - y_i)
    $$

    with \(\mathrm{{sign}}(0) = 0\): the gradient is 0 where the prediction is exact (as
    PyTorch's), and \(L = \sum_i \ell_i / \sum_i w_i\).

    Parameters
    ----------
    {_ELEMENTWISE_PARAMS}

{RETURNS.format(unit="element")}

    Notes
    -----
    {ENTRY_POINTS}

    Like ``torch.nn.functional.l1_loss``, Keras ``MeanAbsoluteError`` and
    ``sklearn.metrics.mean_absolute_error`` (``sample_weight`` as in scikit-learn).

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> p = np.array([0.5, 2.0, 1.0]); y = np.array([1.0, 2.0, 0.0])
    >>> float(gl.mae(p, y))
    0.5
    >>> gl.mae.grad(p, y)
    array([-0.33333333,  0.        ,  0.33333333])
    """,
)


# ---------------------------------------------------------------------------------------------
# huber


def _naive_huber(xp, p, y, delta=1.0):
    d = p - y
    a = xp.abs(d)
    loss = xp.where(a <= delta, 0.5 * d**2, delta * (a - 0.5 * delta))
    return xp.mean(loss), xp.where(a <= delta, d, delta * xp.sign(d)) / p.size


huber = Loss(
    "huber",
    aliases=("huber_loss",),
    family=ELEMENTWISE,
    kernel="GlHuber",
    options=(number("delta", 1.0, "where the loss turns from quadratic to linear (> 0; inf "
                    "is half the squared error)", 0.0, closed=False, hi_closed=True),),
    naive=_naive_huber,
    torch_peer=lambda F, x, y: F.huber_loss(x, y),
    doc=rf"""Huber loss and its gradient: quadratic near the target, linear beyond delta.

    With \(d_i = p_i - y_i\):

    $$
    \ell_i = w_i \begin{{cases}} \tfrac12 d_i^2 & |d_i| \le \delta \\
        \delta\,(|d_i| - \tfrac12 \delta) & |d_i| > \delta \end{{cases}}, \qquad
    \frac{{\partial L}}{{\partial p_i}} = \frac{{w_i}}{{\sum_j w_j}}
        \begin{{cases}} d_i & |d_i| \le \delta \\ \delta\,\mathrm{{sign}}(d_i) & |d_i| > \delta
        \end{{cases}}
    $$

    i.e. the gradient is \(d_i\) clipped to \([-\delta, \delta]\): large errors pull no harder
    than \(\delta\).

    Parameters
    ----------
    {_ELEMENTWISE_PARAMS}
    delta : float, default 1.0
        Where the quadratic part ends (> 0; ``inf`` gives half the squared error). A value
        beyond the data's dtype is taken as its largest finite value.

{RETURNS.format(unit="element")}

    Notes
    -----
    {ENTRY_POINTS}

    Like ``torch.nn.functional.huber_loss`` (``delta``), ``optax.huber_loss`` and Keras
    ``Huber``. It is `smooth_l1` scaled by \(\delta\): huber(δ) = δ · smooth_l1(β = δ).

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> p = np.array([0.5, 3.0, -1.0]); y = np.array([0.0, 0.0, 0.0])
    >>> round(float(gl.huber(p, y)), 6)
    1.041667
    >>> gl.huber.grad(p, y, delta=2.0)
    array([ 0.16666667,  0.66666667, -0.33333333])
    """,
)


# ---------------------------------------------------------------------------------------------
# smooth_l1


def _naive_smooth_l1(xp, p, y, beta=1.0):
    d = p - y
    a = xp.abs(d)
    loss = xp.where(a < beta, 0.5 * d**2 / beta, a - 0.5 * beta)
    return xp.mean(loss), xp.where(a < beta, d / beta, xp.sign(d)) / p.size


smooth_l1 = Loss(
    "smooth_l1",
    aliases=("smooth_l1_loss",),
    family=ELEMENTWISE,
    kernel="GlSmoothL1",
    options=(number("beta", 1.0, "where the loss turns from quadratic to linear (>= 0; 0 is "
                    "mae)", 0.0, hi_closed=True),),
    naive=_naive_smooth_l1,
    torch_peer=lambda F, x, y: F.smooth_l1_loss(x, y),
    doc=rf"""Smooth L1 loss and its gradient: quadratic below beta, then linear (PyTorch).

    With \(d_i = p_i - y_i\):

    $$
    \ell_i = w_i \begin{{cases}} \dfrac{{d_i^2}}{{2\beta}} & |d_i| < \beta \\
        |d_i| - \tfrac12 \beta & |d_i| \ge \beta \end{{cases}}, \qquad
    \frac{{\partial L}}{{\partial p_i}} = \frac{{w_i}}{{\sum_j w_j}}
        \begin{{cases}} d_i / \beta & |d_i| < \beta \\ \mathrm{{sign}}(d_i) & |d_i| \ge \beta
        \end{{cases}}
    $$

    With \(\beta = 0\) it is exactly `mae` (no division by zero).

    Parameters
    ----------
    {_ELEMENTWISE_PARAMS}
    beta : float, default 1.0
        Where the quadratic part ends (>= 0; ``inf`` allowed). A value beyond the data's
        dtype is taken as its largest finite value.

{RETURNS.format(unit="element")}

    Notes
    -----
    {ENTRY_POINTS}

    Like ``torch.nn.functional.smooth_l1_loss`` (``beta``). `huber` with ``delta`` = β is
    β times this loss.

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> p = np.array([0.5, 3.0, -1.0]); y = np.array([0.0, 0.0, 0.0])
    >>> float(gl.smooth_l1(p, y))
    1.0416666666666667
    >>> gl.smooth_l1.grad(p, y, beta=2.0)
    array([ 0.08333333,  0.33333333, -0.16666667])
    """,
)


# ---------------------------------------------------------------------------------------------
# log_cosh


def _naive_log_cosh(xp, p, y):
    d = p - y
    return xp.mean(xp.log(xp.cosh(d))), xp.tanh(d) / p.size


log_cosh = Loss(
    "log_cosh",
    aliases=("logcosh",),
    family=ELEMENTWISE,
    kernel="GlLogCosh",
    naive=_naive_log_cosh,
    torch_peer=lambda F, x, y: (F.softplus(2 * (x - y)) - (x - y) - 0.6931471805599453).mean(),
    doc=rf"""Log-cosh loss and its gradient: like half the squared error near the target,
    like the absolute error far from it, smooth everywhere.

    With \(d_i = p_i - y_i\):

    $$
    \ell_i = w_i \log\cosh d_i
           = w_i \left( |d_i| + \log\!\left(1 + e^{{-2|d_i|}}\right) - \log 2 \right), \qquad
    \frac{{\partial L}}{{\partial p_i}} = \frac{{w_i}}{{\sum_j w_j}} \tanh d_i
    $$

    Neither form is computed as written: \(\cosh d\) overflows for \(|d| > 710\) (float64;
    89 in float32), and the second form cancels for small \(|d|\), where the loss is about
    \(d^2/2\). With \(t = \tanh d\), which is the gradient anyway:

    $$
    \log\cosh d = \begin{{cases}} -\tfrac12 \log(1 - t^2) & |d| \le 1 \\
        |d| - \log(1 + |t|) & |d| > 1 \end{{cases}}
    $$

    (\(\cosh^2 d = 1 / (1 - t^2)\) and \(1 + \tanh|d| = e^{{|d|}} / \cosh d\)), each through
    ``log1p``: accurate to a few units in the last place for every \(d\), tiny ones
    included, and never overflowing.

    Parameters
    ----------
    {_ELEMENTWISE_PARAMS}

{RETURNS.format(unit="element")}

    Notes
    -----
    {ENTRY_POINTS}

    Like ``optax.log_cosh`` and Keras ``LogCosh`` (PyTorch has none).

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> p = np.array([0.5, 3.0, -1.0]); y = np.array([0.0, 0.0, 0.0])
    >>> round(float(gl.log_cosh(p, y)), 6)
    0.954408
    >>> gl.log_cosh.grad(p, y).round(6)
    array([ 0.154039,  0.331685, -0.253865])
    """,
)


# ---------------------------------------------------------------------------------------------
# poisson_nll


def _naive_poisson_nll(xp, p, y):  # log_input=True
    return xp.mean(xp.exp(p) - y * p), (xp.exp(p) - y) / p.size


poisson_nll = Loss(
    "poisson_nll",
    aliases=("poisson", "poisson_nll_loss"),
    family=ELEMENTWISE,
    kernel="GlPoissonNll",
    options=(
        flag("log_input", True, "pred is the log of the rate (default), or the rate itself"),
        flag("full", False, "add Stirling's approximation of log(y!) where y > 1"),
        number("eps", 1e-8, "added to the rate inside the log when log_input is False (>= 0)",
               0.0),
    ),
    pred_rule=lambda o: None if o["log_input"] else NONNEG,
    target_rule=NONNEG,
    naive=_naive_poisson_nll,
    torch_peer=lambda F, x, y: F.poisson_nll_loss(x, y),
    doc=rf"""Poisson negative log-likelihood and its gradient.

    With ``log_input=True`` (default) the prediction is the log of the rate, \(\lambda_i =
    e^{{p_i}}\); with ``log_input=False`` it is the rate itself:

    $$
    \ell_i = w_i \begin{{cases}} e^{{p_i}} - y_i\,p_i & \text{{log\_input}} \\
        p_i - y_i \log(p_i + \epsilon) & \text{{otherwise}} \end{{cases}}, \qquad
    \frac{{\partial L}}{{\partial p_i}} = \frac{{w_i}}{{\sum_j w_j}}
        \begin{{cases}} e^{{p_i}} - y_i & \text{{log\_input}} \\
        1 - y_i / (p_i + \epsilon) & \text{{otherwise}} \end{{cases}}
    $$

    This is \(-\log P(y_i \mid \lambda_i)\) without the \(\log y_i!\) term, which does not
    depend on the prediction; ``full=True`` adds Stirling's approximation of it,
    \(y \log y - y + \tfrac12 \log(2\pi y)\), where \(y_i > 1\) (no gradient).

    Parameters
    ----------
    {_ELEMENTWISE_PARAMS.replace("Targets with pred's shape", "Counts (>= 0) with pred's shape")}
    log_input : bool, default True
        pred holds log-rates (True) or rates (False; then pred >= 0 is checked).
    full : bool, default False
        Add Stirling's term where \(y > 1\).
    eps : float, default 1e-8
        Added to the rate inside the log when ``log_input=False`` (>= 0).

{RETURNS.format(unit="element")}

    Notes
    -----
    {ENTRY_POINTS}

    Like ``torch.nn.functional.poisson_nll_loss`` (same options and defaults). Keras
    ``Poisson`` is ``log_input=False`` with its own epsilon (1e-7).

    The loss is a difference of two terms that cancel near its minimum (it crosses zero for
    \(y > e\)): in float32 its absolute error is about \(10^{{-7}}\) times the terms'
    size, \(e^{{p}} + |y\,p|\), as for any float32 implementation. The gradient has no
    such cancellation beyond \(e^{{p}} - y\) itself.

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> z = np.array([0.0, 1.0, -1.0]); y = np.array([1.0, 2.0, 0.0])
    >>> round(float(gl.poisson_nll(z, y)), 6)
    0.695387
    >>> gl.poisson_nll.grad(z, y).round(6)
    array([0.      , 0.239427, 0.122626])
    """,
)


# ---------------------------------------------------------------------------------------------
# pinball


def _naive_pinball(xp, p, y, q=0.5):
    r = y - p
    loss = xp.maximum(q * r, (q - 1) * r)
    return xp.mean(loss), xp.where(r > 0, -q, xp.where(r < 0, 1 - q, 0.0)) / p.size


pinball = Loss(
    "pinball",
    aliases=("quantile", "quantile_loss", "mean_pinball_loss"),
    family=ELEMENTWISE,
    kernel="GlPinball",
    options=(number("quantile", 0.5, "the quantile to predict, in (0, 1)", 0.0, 1.0,
                    closed=False),),
    naive=_naive_pinball,
    torch_peer=lambda F, x, y: (0.5 * (y - x).abs()).mean(),  # quantile 0.5, as a user writes
    doc=rf"""Pinball (quantile) loss and its gradient: smallest at the chosen quantile of the
    targets.

    With the residual \(r_i = y_i - p_i\) and quantile \(q\):

    $$
    \ell_i = w_i \max\big(q\,r_i,\ (q - 1)\,r_i\big), \qquad
    \frac{{\partial L}}{{\partial p_i}} = \frac{{w_i}}{{\sum_j w_j}}
        \begin{{cases}} -q & r_i > 0 \\ 1 - q & r_i < 0 \\ 0 & r_i = 0 \end{{cases}}
    $$

    Under-predictions cost \(q\) per unit, over-predictions \(1 - q\); \(q = 0.5\) is half
    the absolute error.

    Parameters
    ----------
    {_ELEMENTWISE_PARAMS}
    quantile : float, default 0.5
        In (0, 1).

{RETURNS.format(unit="element")}

    Notes
    -----
    {ENTRY_POINTS}

    Like ``sklearn.metrics.mean_pinball_loss`` (its ``alpha`` is our ``quantile``).

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> p = np.array([1.0, 2.0, 3.0]); y = np.array([2.0, 2.0, 1.0])
    >>> round(float(gl.pinball(p, y, quantile=0.9)), 6)
    0.366667
    >>> gl.pinball.grad(p, y, quantile=0.9)
    array([-0.3       ,  0.        ,  0.03333333])
    """,
)

__all__ = ["mse", "mae", "huber", "smooth_l1", "log_cosh", "poisson_nll", "pinball"]  # the losses declared here, in the order of the docs
