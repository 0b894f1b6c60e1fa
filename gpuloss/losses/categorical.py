r"""Categorical losses: one loss per sample over a class axis; targets are class indices or
probabilities.

Each declaration is the one place to learn what its loss does (see `gpuloss.losses`).
"""

from __future__ import annotations

import numpy as np

from .._api import (
    AXIS,
    CLASS_WEIGHT,
    CLIP_EPS,
    IGNORE_INDEX,
    LABEL_SMOOTHING,
    Loss,
    flag,
    number,
    optional_number,
)
from .._call import CATEGORICAL, UNIT
from ._doc import COMMON_PARAMS, ENTRY_POINTS, REDUCTION, RETURNS


def _scatter(x, index, value, add=False):
    """x[index] = value (or += value), in place; JAX arrays are immutable, and get a new
    array through .at (the naive formulas also run on jax.numpy in the JAX benchmark)."""
    if hasattr(x, "at"):
        return x.at[index].add(value) if add else x.at[index].set(value)
    if add:
        x[index] += value
    else:
        x[index] = value
    return x


def _one_hot(xp, t, like):  # scattered: xp.eye(K)[t] would need K x K memory
    return _scatter(xp.zeros_like(like), (xp.arange(like.shape[0]), t), 1)


def _naive_cce(xp, p, t):  # class indices, one-hot, with the clipping a user adds
    eps = np.finfo(p.dtype).eps
    onehot = _one_hot(xp, t, p)
    p = xp.clip(p, eps, 1 - eps)
    loss = -xp.mean(xp.sum(onehot * xp.log(p), axis=1))
    return loss, -onehot / p / p.shape[0]


def _naive_cce_with_logits(xp, z, t):
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    s = e / e.sum(axis=1, keepdims=True)
    onehot = _one_hot(xp, t, z)
    loss = -xp.mean(xp.log(s[xp.arange(z.shape[0]), t]))
    return loss, (s - onehot) / z.shape[0]


cce = Loss(
    "cce",
    aliases=("categorical_crossentropy", "sparse_categorical_crossentropy"),
    family=CATEGORICAL,
    kernel="GlCce",
    options=(CLASS_WEIGHT, IGNORE_INDEX, AXIS, CLIP_EPS),
    pred_rule=UNIT,
    kernel_params=lambda o: (o["eps"], 1.0 - o["eps"]),  # the clipping bounds
    naive=_naive_cce,
    torch_peer=lambda F, x, t: F.nll_loss(x.log(), t),
    doc=rf"""Categorical cross-entropy on probabilities, and its gradient.

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
    {REDUCTION.format(unit="sample", mean="divides by D above")}
    {COMMON_PARAMS.format(weight_shape="per sample, broadcastable to pred's shape without axis")}
    class_weight : array_like, optional
        Shape (K,): weight of each class (PyTorch's ``weight``).
    ignore_index : int, optional
        With integer targets: samples with this label give 0 loss, 0 gradient, and leave
        the denominator.
    axis : int, default -1
        The class axis.
    eps : float, optional
        Clipping bound, in (0, 0.5). Default: ``finfo(pred.dtype).eps``.

{RETURNS.format(unit="sample")}

    Notes
    -----
    {ENTRY_POINTS}

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

_FLT_MIN = float(np.finfo(np.float32).tiny)


cce_with_logits = Loss(
    "cce_with_logits",
    aliases=("crossentropy", "cross_entropy", "softmax_cross_entropy"),
    family=CATEGORICAL,
    kernel="GlCceLogits",
    options=(CLASS_WEIGHT, IGNORE_INDEX, LABEL_SMOOTHING, AXIS,
             number("focal_gamma", 0.0, "focusing exponent of the focal loss (>= 0; 0: none)",
                    0.0),
             number("z_loss", 0.0, "weight of PaLM's auxiliary z-loss, lse^2 (>= 0)", 0.0),
             optional_number("softcap", "Gemma 2's logit soft-capping c tanh(z / c) (finite, "
                             ">= 1.2e-38: float32's smallest normal number)", _FLT_MIN)),
    kernel_params=lambda o: (o["focal_gamma"], o["z_loss"], o["softcap"] or 0.0),
    kernel_switches={"GL_FOCAL": lambda o, nonzero: nonzero(o["focal_gamma"]),
                     "GL_Z_LOSS": lambda o, nonzero: nonzero(o["z_loss"]),
                     "GL_SOFTCAP": lambda o, nonzero: o["softcap"] is not None},
    naive=_naive_cce_with_logits,
    torch_peer=lambda F, x, t: F.cross_entropy(x, t),
    doc=rf"""Categorical cross-entropy on logits (softmax fused), and its gradient.

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
    {REDUCTION.format(unit="sample", mean="divides by D above")}
    {COMMON_PARAMS.format(weight_shape="per sample, broadcastable to pred's shape without axis")}
    class_weight : array_like, optional
        Shape (K,): weight of each class (PyTorch's ``weight``).
    ignore_index : int, optional
        With integer targets: samples with this label give 0 loss, 0 gradient, and leave
        the denominator.
    label_smoothing : float, default 0
        In [0, 1], PyTorch's formula.
    focal_gamma : float, default 0
        \(\gamma \ge 0\): Keras' categorical focal loss, each class's term weighed by
        \((1 - p_{{ik}})^\gamma\); 0 is plain cross-entropy.
    z_loss : float, default 0
        \(z \ge 0\): PaLM's auxiliary loss \(z \cdot \mathrm{{lse}}_i^2\) per sample (times the
        label's class weight), which keeps the log-partition near 0.
    softcap : float, optional
        \(c \ge\) 1.2e-38 (float32's smallest normal number), finite: Gemma 2's final-logit
        soft-capping. Everything above is computed on the
        capped logits \(c \tanh(z / c)\), and the gradient with respect to \(z\) carries
        the cap's derivative \(\mathrm{{sech}}^2(z / c)\) (computed from
        \(e^{{-2|z/c|}}\), so it keeps its digits where \(\tanh\) is near 1). None: no cap.
    axis : int, default -1
        The class axis (use ``axis=1`` for PyTorch's (N, C, d1, ...) layout).

{RETURNS.format(unit="sample")}

    Notes
    -----
    {ENTRY_POINTS}

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

_CATEGORICAL_PARAMS = f"""\
{REDUCTION.format(unit="sample", mean="divides by D above")}
    {COMMON_PARAMS.format(weight_shape="per sample, broadcastable to pred's shape without axis")}"""


# ---------------------------------------------------------------------------------------------
# nll


def _naive_nll(xp, a, t):  # class indices
    rows = xp.arange(a.shape[0])
    grad = _scatter(xp.zeros_like(a), (rows, t), -1.0 / a.shape[0])
    return -xp.mean(a[rows, t]), grad


nll = Loss(
    "nll",
    aliases=("nll_loss", "negative_log_likelihood"),
    family=CATEGORICAL,
    kernel="GlNll",
    cache_registers=16,  # at 32, ptxas spills (128 registers): see kernel-resources-*.json
    options=(CLASS_WEIGHT, IGNORE_INDEX, AXIS),
    log_probabilities=True,
    naive=_naive_nll,
    torch_peer=lambda F, x, t: F.nll_loss(x, t),
    doc=rf"""Negative log-likelihood of log-probabilities, and its gradient.

    With log-probabilities \(a_{{ik}}\) (e.g. a log-softmax) and class weights \(c_k\):

    $$
    \ell_i = -w_i \sum_k c_k\, y_{{ik}}\, a_{{ik}}, \qquad
    \frac{{\partial L}}{{\partial a_{{ik}}}} = -\frac{{w_i}}{{D}}\, c_k\, y_{{ik}}
    $$

    Integer targets \(t_i\) mean one-hot \(y\): \(\ell_i = -w_i c_{{t_i}} a_{{i t_i}}\), the
    gradient is \(-w_i c_{{t_i}} / D\) at \(t_i\) and 0 elsewhere, and
    \(D = \sum_i w_i c_{{t_i}}\) over the samples not equal to ``ignore_index`` (PyTorch's
    convention). Probability targets: \(D = \sum_i w_i\) (N unweighted). Nothing is clipped:
    \(a = -\infty\) at a counted class gives an infinite loss, as in PyTorch; a class with
    no weight in the sum adds 0 even at \(-\infty\).

    Parameters
    ----------
    pred : array
        Log-probabilities with the classes along ``axis``.
    target : array
        Either class indices (integer dtype, pred's shape without ``axis``) or probabilities
        (floating, pred's shape).
    {_CATEGORICAL_PARAMS}
    class_weight : array_like, optional
        Shape (K,): weight of each class (PyTorch's ``weight``).
    ignore_index : int, optional
        With integer targets: samples with this label give 0 loss, 0 gradient, and leave
        the denominator.
    axis : int, default -1
        The class axis (``axis=1`` for PyTorch's (N, C, d1, ...) layout).

{RETURNS.format(unit="sample")}

    Notes
    -----
    {ENTRY_POINTS}

    Like ``torch.nn.functional.nll_loss`` (``weight``, ``ignore_index``; its default
    ``ignore_index`` is -100, ours None), with probability targets as well. It is
    `cce_with_logits` when pred is a log-softmax.

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> a = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])); t = np.array([0, 2])
    >>> round(float(gl.nll(a, t)), 6)
    0.289909
    >>> gl.nll.grad(a, t)
    array([[-0.5,  0. ,  0. ],
           [ 0. ,  0. , -0.5]])
    """,
)


# ---------------------------------------------------------------------------------------------
# kl_div


def _naive_kl_div(xp, a, t):  # probability targets
    with np.errstate(divide="ignore", invalid="ignore"):
        logt = xp.where(t > 0, xp.log(xp.where(t > 0, t, 1.0)), 0.0)
    return xp.sum(t * (logt - a)) / a.shape[0], -t / a.shape[0]


kl_div = Loss(
    "kl_div",
    aliases=("kl_divergence", "kullback_leibler", "kld", "kl"),
    family=CATEGORICAL,
    kernel="GlKlDiv",
    options=(flag("log_target", False, "target holds log-probabilities"), AXIS),
    target_rule=lambda o: None if o["log_target"] else UNIT,
    class_indices=False,
    log_probabilities=True,
    naive=_naive_kl_div,
    torch_peer=lambda F, x, t: F.kl_div(x, t, reduction="batchmean"),
    doc=rf"""Kullback-Leibler divergence KL(t ‖ p) from log-probabilities, and its gradient.

    With log-probabilities \(a_{{ik}} = \log p_{{ik}}\) and target probabilities \(t_{{ik}}\)
    (or \(t = e^{{\text{{target}}}}\) with ``log_target=True``):

    $$
    \ell_i = w_i \sum_k t_{{ik}} \left(\log t_{{ik}} - a_{{ik}}\right), \qquad
    \frac{{\partial L}}{{\partial a_{{ik}}}} = -\frac{{w_i}}{{D}}\, t_{{ik}}
    $$

    with \(0 \log 0 = 0\) (a class the target gives no mass adds nothing, even where
    \(a = -\infty\)), and \(D = \sum_i w_i\) (N, the number of samples, unweighted): the
    mean is the true KL per sample, PyTorch's ``reduction="batchmean"``. With
    ``log_target=True``, \(\log t\) is the target itself (no log is taken).

    Parameters
    ----------
    pred : array
        Log-probabilities with the classes along ``axis``.
    target : array
        Probabilities (floating, pred's shape; checked to lie in [0, 1]), or
        log-probabilities with ``log_target=True`` (not checked). Class indices are refused.
    {_CATEGORICAL_PARAMS}
    log_target : bool, default False
        The target holds log-probabilities.
    axis : int, default -1
        The class axis.

{RETURNS.format(unit="sample")}

    Notes
    -----
    {ENTRY_POINTS}

    Like ``torch.nn.functional.kl_div(a, t, reduction="batchmean", log_target=...)`` for
    2-D input (for N-D input PyTorch divides by size(0), we by the number of samples, every
    position but the class axis; with ``log_target`` a target of \(-\infty\) is a class with
    no mass, 0 here, NaN in PyTorch) and ``optax.kl_divergence``. Nothing is clipped: a class with
    mass in the target and \(a = -\infty\) gives an infinite loss.

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> a = np.log(np.array([[0.5, 0.5], [0.9, 0.1]])); t = np.array([[0.5, 0.5], [0.5, 0.5]])
    >>> round(float(gl.kl_div(a, t)), 6)
    0.255413
    >>> gl.kl_div.grad(a, t)
    array([[-0.25, -0.25],
           [-0.25, -0.25]])
    """,
)


# ---------------------------------------------------------------------------------------------
# kl_div_with_logits




def _naive_kl_div_with_logits(xp, z, t):  # probability targets, T = 1
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    q = e / e.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        logt = xp.where(t > 0, xp.log(xp.where(t > 0, t, 1.0)), 0.0)
    loss = xp.sum(t * (logt - xp.log(q))) / z.shape[0]
    return loss, (q * t.sum(axis=1, keepdims=True) - t) / z.shape[0]


kl_div_with_logits = Loss(
    "kl_div_with_logits",
    aliases=("distillation", "distillation_loss", "kd_loss"),
    family=CATEGORICAL,
    kernel="GlKlDivLogits",
    options=(number("temperature", 1.0, "softmax temperature T (finite, >= 1.2e-38: float32's "
                    "smallest normal number, which no GPU flushes to 0)", _FLT_MIN),
             flag("target_logits", False, "target holds the teacher's logits"), AXIS),
    target_rule=lambda o: None if o["target_logits"] else UNIT,
    kernel_params=lambda o: (o["temperature"], float(o["target_logits"])),
    kernel_switches={"GL_TEACHER_LOGITS": lambda o, nonzero: bool(o["target_logits"])},
    class_indices=False,
    naive=_naive_kl_div_with_logits,
    torch_peer=lambda F, x, t: F.kl_div(F.log_softmax(x, dim=-1), t, reduction="batchmean"),
    doc=rf"""Distillation loss: KL(t ‖ softmax(z / T)) from the student's logits, and its
    gradient; the teacher's probabilities or logits in the same pass.

    With temperature \(T\), \(q_{{ik}} = \mathrm{{softmax}}(z_i / T)_k\) and the target
    \(t_{{ik}}\) (probabilities; with ``target_logits=True``,
    \(t_i = \mathrm{{softmax}}(\text{{target}}_i / T)\), the teacher's logits):

    $$
    \ell_i = w_i\, T^2 \sum_k t_{{ik}} \left(\log t_{{ik}} - \log q_{{ik}}\right), \qquad
    \frac{{\partial L}}{{\partial z_{{ik}}}} = \frac{{w_i}}{{D}}\, T
        \Big( q_{{ik}} \sum_j t_{{ij}} - t_{{ik}} \Big)
    $$

    with \(0 \log 0 = 0\) and \(D = \sum_i w_i\) (N unweighted): the mean is the KL per
    sample (PyTorch's ``"batchmean"``). The \(T^2\) keeps the gradient's scale independent
    of \(T\) (Hinton et al. 2015). \(\log q\) and (for teacher logits) \(\log t\) come
    from max-shifted log-sum-exps, never from the log of a rounded probability; both rows are
    read in one pass.

    Parameters
    ----------
    pred : array
        The student's logits with the classes along ``axis``.
    target : array
        The teacher's probabilities (pred's shape; checked to lie in [0, 1]), or its logits
        with ``target_logits=True`` (not checked). Class indices are refused.
    {_CATEGORICAL_PARAMS}
    temperature : float, default 1
        \(T\), finite and at least 1.18e-38 (float32's smallest normal number, which no GPU
        flushes to 0), applied to the student's logits and to the teacher's (with
        ``target_logits``); given probabilities are used as they are. With teacher logits the
        loss is computed in a form whose relative error does not grow with \(T\) (see the
        math page).
    target_logits : bool, default False
        The target holds the teacher's logits.
    axis : int, default -1
        The class axis.

{RETURNS.format(unit="sample")}

    Notes
    -----
    {ENTRY_POINTS}

    With \(T = 1\) and probabilities: ``torch.nn.functional.kl_div(log_softmax(z), t,
    reduction="batchmean")``; with teacher logits, ``T**2 * kl_div(log_softmax(z / T),
    softmax(teacher / T), reduction="batchmean")`` as distillation code writes it, without
    either softmax in memory.

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> z = np.array([[2.0, 0.0], [0.0, 1.0]]); teacher = np.array([[1.0, 0.0], [0.0, 2.0]])
    >>> round(float(gl.kl_div_with_logits(z, teacher, target_logits=True, temperature=2.0)), 6)
    0.108599
    """,
)


# ---------------------------------------------------------------------------------------------
# multiclass_hinge


def _naive_multiclass_hinge(xp, z, t):  # class indices, margin 1
    rows = xp.arange(z.shape[0])
    zy = z[rows, t]
    others = _scatter(z.copy(), (rows, t), -np.inf)
    k = others.argmax(axis=1)
    m = 1 + others[rows, k] - zy
    active = (m > 0) / z.shape[0]
    grad = _scatter(xp.zeros_like(z), (rows, k), active, add=True)
    grad = _scatter(grad, (rows, t), -active, add=True)
    return xp.mean(xp.maximum(m, 0)), grad


def _torch_multiclass_hinge(F, x, t):  # optax's formula, written in PyTorch
    zy = x.gather(1, t[:, None])[:, 0]
    others = x.scatter(1, t[:, None], float("-inf"))
    return F.relu(1 + others.max(dim=1).values - zy).mean()


multiclass_hinge = Loss(
    "multiclass_hinge",
    aliases=("multiclass_hinge_loss", "crammer_singer", "multi_margin"),
    family=CATEGORICAL,
    kernel="GlMulticlassHinge",
    options=(number("margin", 1.0, "the margin the label must win by (>= 0)", 0.0),
             CLASS_WEIGHT, IGNORE_INDEX, AXIS),
    probability_targets=False,
    naive=_naive_multiclass_hinge,
    torch_peer=_torch_multiclass_hinge,
    doc=rf"""Multiclass hinge loss (Crammer-Singer) on scores, and its gradient.

    With scores \(z_{{ik}}\), the label \(y_i\), margin \(\mu\) and class weights
    \(c_k\):

    $$
    \ell_i = w_i\, c_{{y_i}} \max\Big(0,\; \mu + \max_{{k \ne y_i}} z_{{ik}} - z_{{i y_i}}\Big)
    $$

    Where \(\ell_i > 0\) the gradient is \(+w_i c_{{y_i}} / D\) at the first class
    \(k \ne y_i\) of largest score and \(-w_i c_{{y_i}} / D\) at \(y_i\); it is 0
    elsewhere and where \(\ell_i = 0\) (at the kink itself too). \(D = \sum_i w_i
    c_{{y_i}}\) over the samples not equal to ``ignore_index``, as for `cce`. With a single
    class there is nothing to beat: the loss is 0.

    Parameters
    ----------
    pred : array
        Scores with the classes along ``axis``.
    target : array
        Class indices (integer dtype, pred's shape without ``axis``); other targets raise
        ``TypeError``.
    {_CATEGORICAL_PARAMS}
    margin : float, default 1
        \(\mu \ge 0\).
    class_weight : array_like, optional
        Shape (K,): weight of each class, applied by the label.
    ignore_index : int, optional
        Samples with this label give 0 loss, 0 gradient, and leave the denominator.
    axis : int, default -1
        The class axis.

{RETURNS.format(unit="sample")}

    Notes
    -----
    {ENTRY_POINTS}

    ``optax.multiclass_hinge_loss`` (per sample) and scikit-learn's
    ``hinge_loss`` for multiclass problems (its mean). PyTorch's ``multi_margin_loss`` is
    another loss (Weston-Watkins: a sum over every class \(k \ne y\), divided by K).

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> z = np.array([[2.0, 1.5, 0.0], [0.0, 3.0, 1.0]]); t = np.array([0, 2])
    >>> gl.multiclass_hinge(z, t, reduction="none")
    array([0.5, 3. ])
    >>> gl.multiclass_hinge.grad(z, t)
    array([[-0.5,  0.5,  0. ],
           [ 0. ,  0.5, -0.5]])
    """,
)


__all__ = ["cce", "cce_with_logits", "nll", "kl_div", "kl_div_with_logits", "multiclass_hinge"]  # the losses declared here, in the order of the docs
