"""Example inputs for any loss, made from its declaration (family and domain rules): what
`gpuloss demo` and the benchmarks run on, so that a new loss is demonstrated and timed
without a line of its own here."""

from __future__ import annotations

import numpy as np

from ._call import CATEGORICAL, NONNEG, SIGN, UNIT


def _softmax(xp, z):
    e = xp.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def default_rules(fn) -> tuple[str | None, str | None]:
    """(pred_rule, target_rule) of loss `fn` with its default options."""
    rule = fn.pred_rule
    if callable(rule):
        rule = rule({o.name: o.default for o in fn.declared})
    return rule, fn.target_rule


def example_inputs(fn, rng, *, n=1 << 20, rows=16384, classes=64, dtype=np.float32, xp=np):
    """(pred, target) for loss `fn`: n elements, or rows x classes with class indices.
    `rng` is `xp.random.default_rng(...)` (NumPy or CuPy: only random, standard_normal and
    integers are used, which both have)."""
    pred_rule, target_rule = default_rules(fn)
    if fn.family == CATEGORICAL:
        z = 2 * rng.standard_normal((rows, classes))
        if pred_rule == UNIT:  # probabilities: a softmax of the logits
            z = _softmax(xp, z)
        elif fn.log_probabilities:
            z = xp.log(_softmax(xp, z))
        if fn.class_indices:
            return z.astype(dtype), rng.integers(0, classes, rows).astype(xp.int64)
        return z.astype(dtype), _softmax(xp, 2 * rng.standard_normal((rows, classes))).astype(dtype)
    if pred_rule == UNIT:
        pred = 0.01 + 0.98 * rng.random(n)
    elif pred_rule == NONNEG:
        pred = 0.1 + 2.9 * rng.random(n)
    elif target_rule in (UNIT, SIGN):  # logits or scores of a binary problem
        pred = 3 * rng.standard_normal(n)
    else:
        pred = rng.standard_normal(n)
    if target_rule == UNIT:
        target = rng.random(n) < (pred if pred_rule == UNIT else 0.5)
    elif target_rule == SIGN:
        target = xp.where(rng.random(n) < 0.5, -1.0, 1.0)
    elif target_rule == NONNEG:
        target = xp.floor(4 * rng.random(n))  # counts 0..3
    else:
        target = rng.standard_normal(n)
    return pred.astype(dtype), target.astype(dtype)
