"""Float64 reference implementations, written from the formulas in DESIGN.md as plainly as
possible and independently of the package's backends (whole arrays, no blocks, no tricks
beyond the standard stable forms np.logaddexp and max-shifted log-sum-exp)."""

from __future__ import annotations

import numpy as np

ELEMENTWISE = ("mse", "bce", "bce_with_logits")
CATEGORICAL = ("cce", "cce_with_logits")
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
):
    """The loss as DESIGN.md defines it, in float64."""
    pred = np.asarray(pred)
    if eps is None:
        eps = float(np.finfo(pred.dtype).eps)
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
    if loss in ELEMENTWISE:
        y = y.astype(np.float64)
        w = np.broadcast_to(
            np.asarray(1.0 if sample_weight is None else sample_weight, np.float64), p.shape
        )
        if loss == "mse":
            per = (p - y) ** 2
        elif loss == "bce":
            pc = np.clip(p, eps, 1 - eps)
            per = -(y * np.log(pc) + (1 - y) * np.log1p(-pc))
        else:
            ys = y * (1 - label_smoothing) + label_smoothing / 2
            c = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
            # softplus(z) = logaddexp(0, z)
            per = (1 - ys) * np.logaddexp(0, p) + c * ys * np.logaddexp(0, -p)
        per = w * per
        denom = w.sum()
    else:
        z = np.moveaxis(p, axis, -1)
        K = z.shape[-1]
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
        if loss == "cce":
            logp = np.log(np.clip(z, eps, 1 - eps))
        elif K == 0:
            logp = z  # no classes: every sum over k is empty
        else:
            m = z.max(-1, keepdims=True)
            logp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
        with np.errstate(invalid="ignore"):  # a class with no weight adds 0, even at -inf
            per = -np.where(coef == 0, 0.0, coef * logp).sum(-1)
        per = np.where(sample_w > 0, sample_w * per, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / denom if denom > 0 else np.nan


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
