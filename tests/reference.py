"""Float64 reference implementations, written from the formulas in DESIGN.md as plainly as
possible and independently of the package's backends (whole arrays, no blocks, no tricks
beyond the standard stable forms np.logaddexp and max-shifted log-sum-exp)."""

from __future__ import annotations

import numpy as np

CATALOGUE = ("mae", "huber", "smooth_l1", "log_cosh", "poisson_nll", "hinge", "squared_hinge",
             "pinball")  # the elementwise losses of CATALOGUE.md
ELEMENTWISE = ("mse", "bce", "bce_with_logits", *CATALOGUE)
CATEGORICAL = ("cce", "cce_with_logits", "nll", "kl_div", "kl_div_with_logits",
               "multiclass_hinge")
LABELED = ("cce", "cce_with_logits", "nll", "multiclass_hinge")  # categorical losses that
# take class indices (and class weights); the kl_div losses take probability targets only
LABELS_ONLY = ("multiclass_hinge",)  # and this one class indices only


def target_kinds(loss):
    """The categorical targets `loss` takes: True for class indices, False for
    probabilities."""
    return tuple(labels for labels in (True, False)
                 if (loss in LABELED if labels else loss not in LABELS_ONLY))
ALL = ELEMENTWISE + CATEGORICAL


def reference(
    loss,
    pred,
    target,
    *,
    reduction="mean",
    sample_weight=None,
    pos_weight=None,
    class_weight=None,
    ignore_index=None,
    label_smoothing=0.0,
    axis=-1,
    eps=None,
    validate=True,
    delta=1.0,
    beta=1.0,
    quantile=0.5,
    log_input=True,
    full=False,
    log_target=False,
    focal_gamma=0.0,
    focal_alpha=None,
    z_loss=0.0,
    softcap=None,
    temperature=1.0,
    target_logits=False,
    margin=1.0,
):
    """The loss as DESIGN.md and CATALOGUE.md define it, in float64."""
    pred = np.asarray(pred)
    if eps is None:
        eps = 1e-8 if loss == "poisson_nll" else float(np.finfo(pred.dtype).eps)
    # for the mean, weights of an extreme scale are first divided by their maximum (the mean
    # does not change; as the backends do), then they enter the computation in the compute
    # dtype (float32 for float16/32 data)
    if reduction == "mean":
        labels = loss in CATEGORICAL and np.issubdtype(np.asarray(target).dtype, np.integer)
        def rescaled(w):
            w = np.asarray(w, np.float64)
            top = float(np.max(w)) if w.size else 0.0
            return w / top if np.isfinite(top) and top > 0 and not 1e-20 <= top <= 1e20 else w
        if sample_weight is not None:
            sample_weight = rescaled(sample_weight)
        if class_weight is not None and labels:
            class_weight = rescaled(class_weight)
    compute = np.float64 if pred.dtype == np.float64 else np.float32
    with np.errstate(over="ignore"):
        sample_weight, pos_weight, class_weight = (
            None if w is None else np.asarray(w, np.float64).astype(compute).astype(np.float64)
            for w in (sample_weight, pos_weight, class_weight)
        )
    p = pred.astype(np.float64)
    y = np.asarray(target)
    # bce/cce clip to [eps, 1 - eps] as the compute dtype holds those bounds (1 - 1e-7 is not
    # a float32 number)
    bounds = (float(compute(eps)), float(compute(1 - eps)))
    if loss in ELEMENTWISE:
        if loss in ("hinge", "squared_hinge") and y.dtype == bool:
            y = np.where(y, 1.0, -1.0)
        with np.errstate(over="ignore"):  # targets enter the computation in the compute dtype
            y = y.astype(compute).astype(np.float64)
        w = np.broadcast_to(
            np.asarray(1.0 if sample_weight is None else sample_weight, np.float64), p.shape
        )
        if loss in CATALOGUE:  # scalar options enter in the compute dtype too
            per = _catalogue(loss, p, y, delta=delta, beta=beta, quantile=quantile,
                             log_input=log_input, full=full, eps=float(compute(eps)))
        elif loss == "mse":
            per = (p - y) ** 2
        elif loss == "bce":
            pc = np.clip(p, *bounds)
            per = -(y * np.log(pc) + (1 - y) * np.log1p(-pc))
        else:
            ys = y * (1 - label_smoothing) + label_smoothing / 2
            c = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
            # softplus(z) = logaddexp(0, z)
            per = (1 - ys) * np.logaddexp(0, p) + c * ys * np.logaddexp(0, -p)
            if focal_alpha is not None:  # torchvision's sigmoid_focal_loss
                per = (focal_alpha * ys + (1 - focal_alpha) * (1 - ys)) * per
            if focal_gamma:  # (1 - p_t)^gamma, 1 - p_t = sigma(z)(1 - y) + sigma(-z) y
                with np.errstate(divide="ignore", invalid="ignore"):
                    log_1m_pt = np.logaddexp(np.log(1 - ys) - np.logaddexp(0, -p),
                                             np.log(ys) - np.logaddexp(0, p))
                per = np.exp(focal_gamma * log_1m_pt) * per
        with np.errstate(invalid="ignore"):  # a weight of 0 on an infinite loss: NaN, as computed
            per = w * per
        denom = w.sum()
    else:
        z = np.moveaxis(p, axis, -1)
        if loss == "cce_with_logits" and softcap is not None:  # Gemma 2: c tanh(z / c)
            c = min(float(softcap), float(np.finfo(np.float32).max))  # (clamped, as the kernels)
            z = c * np.tanh(z / c)
        K = z.shape[-1]
        nan_rows = np.isnan(z).any(-1)
        if not np.issubdtype(y.dtype, np.integer):
            nan_rows = nan_rows | np.isnan(np.moveaxis(y.astype(np.float64), axis, -1)).any(-1)
        cw = np.ones(K) if class_weight is None else np.asarray(class_weight, np.float64)
        sw = np.broadcast_to(
            np.asarray(1.0 if sample_weight is None else sample_weight, np.float64), z.shape[:-1]
        )
        if np.issubdtype(y.dtype, np.integer):
            counted = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
            onehot = (y[..., None] == np.arange(K)).astype(np.float64)
            cwy = (onehot * cw).sum(-1)
            ls = label_smoothing
            # PyTorch: (1 - ls) * cw[y] * nll + ls / K * sum_k cw_k * (-log p_k)
            coef = (1 - ls) * cwy[..., None] * onehot + (ls / K if K else 0.0) * cw
            sample_w = sw * counted
            denom = (sample_w * cwy).sum()
        else:
            t = np.moveaxis(y.astype(np.float64), axis, -1)
            if loss == "cce_with_logits":
                t = t * (1 - label_smoothing) + (label_smoothing / K if K else 0.0)
            coef = cw * t
            sample_w = sw
            denom = sw.sum()
        if loss == "multiclass_hinge":  # cw[y] max(0, margin + max_{k != y} z_k - z_y)
            with np.errstate(invalid="ignore"):
                others = np.where(onehot > 0, -np.inf, z).max(-1) if K > 1 else -np.inf
                zy = (onehot * np.where(onehot > 0, z, 0)).sum(-1)
                per = cwy * np.maximum(0.0, (margin + others) - zy)
                per = np.where(np.isnan(z).any(-1), np.nan, per) if K else per
            per = _weigh(per, sample_w, nan_rows)
            coef = None
        if loss == "kl_div_with_logits":  # T^2 Σ t (log t - log q), q = softmax(z / T)
            u = z / temperature
            m = u.max(-1, keepdims=True) if K else u
            log_q = u - m - np.log(np.exp(u - m).sum(-1, keepdims=True))
            if target_logits:
                v = t / temperature
                mt = v.max(-1, keepdims=True) if K else v
                log_t = v - mt - np.log(np.exp(v - mt).sum(-1, keepdims=True))
                t = np.exp(log_t)
            else:
                log_t = np.log(np.where(t > 0, t, 1.0))
            with np.errstate(invalid="ignore"):  # NaN log q (a +inf logit) kept, as for cce
                per = temperature**2 * np.where((t == 0) & ~np.isnan(log_q), 0.0,
                                                t * (log_t - log_q)).sum(-1)
            per = _weigh(per, sample_w, nan_rows)
            coef = None
        if loss == "kl_div":  # Σ t (log t - a), 0 log 0 = 0
            log_t = t if log_target else np.log(np.where(t > 0, t, 1.0))
            t = np.exp(t) if log_target else t
            with np.errstate(invalid="ignore"):
                per = np.where(t == 0, 0.0, t * (log_t - z)).sum(-1)
            per = _weigh(per, sample_w, nan_rows)
            coef = None
        if loss == "cce":
            logp = np.log(np.clip(z, *bounds))
        elif loss == "nll" or K == 0:
            logp = z  # log-probabilities as given (or no classes: every sum is empty)
        elif loss in ("kl_div", "kl_div_with_logits", "multiclass_hinge"):
            pass
        elif K == 0:
            logp = z  # no classes: every sum over k is empty
        else:
            m = z.max(-1, keepdims=True)
            logp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
        if coef is not None:
            focal = 1.0
            if focal_gamma and K:  # Keras' categorical focal loss: (1 - q)^gamma
                with np.errstate(divide="ignore"):
                    focal = np.exp(focal_gamma * np.log(-np.expm1(logp)))
            with np.errstate(invalid="ignore"):  # a class with no weight adds 0, even at -inf
                # (a NaN still propagates: NaN anywhere in a row makes the row NaN)
                per = -np.where((coef == 0) & ~np.isnan(logp), 0.0, coef * focal * logp).sum(-1)
            if z_loss and K:  # PaLM: z lse^2, weighted as the sample (cw[y] for indices)
                lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
                zw = cwy if np.issubdtype(y.dtype, np.integer) else 1.0
                per = per + z_loss * lse**2 * zw
            per = _weigh(per, sample_w, nan_rows)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / denom if denom > 0 else np.nan


def _weigh(per, sample_w, nan_rows):
    """Per-sample losses times their weights: a sample of weight 0 (or ignored) adds 0, even
    where its loss is infinite, but a NaN in its row (prediction or target probabilities)
    makes it NaN whatever the weight (nothing is lost silently)."""
    with np.errstate(invalid="ignore"):
        out = np.where(sample_w > 0, sample_w * per, 0.0)
    return np.where(nan_rows, np.nan, out)


def _catalogue(loss, p, y, *, delta, beta, quantile, log_input, full, eps):
    """Per-element losses of CATALOGUE.md, as its table writes them."""
    d = p - y
    with np.errstate(all="ignore"):
        if loss == "mae":
            return np.abs(d)
        if loss == "huber":
            return np.where(np.abs(d) <= delta, 0.5 * d**2, delta * (np.abs(d) - 0.5 * delta))
        if loss == "smooth_l1":
            if beta == 0:
                return np.abs(d)
            return np.where(np.abs(d) < beta, 0.5 * d**2 / beta, np.abs(d) - 0.5 * beta)
        if loss == "log_cosh":
            # optax's form, logaddexp(d, -d) - log 2, cancels for small |d|; there the series
            a = np.abs(d)
            x = a * a
            series = x * (1 / 2 - x * (1 / 12 - x * (1 / 45 - x * (17 / 2520 - x * (
                31 / 14175 - x * 691 / 935550)))))
            return np.where(a < 0.1, series, np.logaddexp(d, -d) - np.log(2.0))
        if loss == "poisson_nll":
            per = np.exp(p) - y * p if log_input else p - y * np.log(p + eps)
            if full:
                stirling = y * np.log(y) - y + 0.5 * np.log(2 * np.pi * y)
                per = per + np.where(y > 1, stirling, 0.0)
            return per
        if loss == "hinge":
            return np.maximum(0.0, 1 - y * p)  # NaN propagates
        if loss == "squared_hinge":
            return np.maximum(0.0, 1 - y * p) ** 2
        r = y - p  # pinball
        return np.maximum(quantile * r, (quantile - 1) * r)


def numeric_grad(f, pred, h=1e-6):
    """Central finite differences of the scalar function f (the sum, for arrays) at pred."""
    pred = np.array(pred, dtype=np.float64)
    g = np.zeros_like(pred)
    flat = pred.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        step = h * max(1.0, abs(old))
        flat[i] = old + step
        up = float(np.sum(f(pred)))
        flat[i] = old - step
        down = float(np.sum(f(pred)))
        flat[i] = old
        g.reshape(-1)[i] = (up - down) / (2 * step)
    return g
