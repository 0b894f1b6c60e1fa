"""Dask for `gpuloss.linear_cross_entropy`: hidden states (and targets) chunked by tokens, the
output layer's weight shared by every block. Lazy, as every Dask call of gpuloss.

Each block of tokens runs the chunked loop of `gpuloss._linear` on its own (NumPy or CuPy
chunks) and returns its float64 [Σ w·l, D] with the gradients of its Σ w·l: d_hidden for its
tokens, and its whole-vocabulary d_weight and d_bias partials. Dask adds the states and the
partials tree-wise; the mean's 1/D, known from the added states, scales the gradients at the
end. A worker holds one block of tokens, one chunk of logits (`chunk_mb`) and the d_weight
partials it adds (V × H each, float32 for 16-bit weights).
"""

from __future__ import annotations

import math
import uuid

import numpy as np

from . import _linear


def run(hidden, weight, target, bias, chunk_mb, options, *, want_value, want_grad):
    import dask
    import dask.array as da

    if any(isinstance(x, da.Array) for x in (weight, bias)):
        msg = ("linear_cross_entropy on Dask takes the weight (and bias) as one in-memory "
               "array, shared by every block of tokens: pass weight.compute().")
        raise TypeError(msg)
    if not isinstance(target, da.Array):
        target = da.from_array(np.asarray(target))
    options = dict(options)
    sw = options.pop("sample_weight", None)
    H = int(hidden.shape[-1])
    lead = tuple(int(s) for s in hidden.shape[:-1])
    if any(math.isnan(s) for s in hidden.shape):
        msg = "hidden has unknown chunk sizes; call compute_chunk_sizes() first."
        raise ValueError(msg)
    # the checks that need no data, on the lazy arrays' shapes and dtypes (a 0-row stand-in)
    _linear.check(np.empty((0, H), hidden.dtype), weight, np.empty((0, *target.shape[
        len(lead):]), target.dtype), bias, chunk_mb,
        {**options, **({} if sw is None else {"sample_weight": np.ones(())})})
    if tuple(target.shape[: len(lead)]) != lead:
        msg = (f"Shape mismatch: target must have hidden's tokens {lead} as its leading axes; "
               f"got target of shape {tuple(target.shape)}.")
        raise ValueError(msg)
    N = math.prod(lead)
    if N == 0:  # no tokens (Dask cannot reshape an empty array): the in-memory call's result
        c = _linear.check(np.empty((*lead, H), hidden.dtype), weight,
                          np.empty(target.shape, target.dtype), bias, chunk_mb,
                          {**options, **({} if sw is None else {"sample_weight": sw})})
        need = (True, True, bias is not None) if want_grad else (False, False, False)
        value, grads = _linear.compute(c, want_value=want_value, need=need)
        value = None if value is None else da.from_array(value)
        grads = None if grads is None else tuple(da.from_array(g) for g in grads[:sum(need)])
        return value, grads
    h = hidden.reshape(N, H).rechunk({1: -1})  # whole tokens per block
    rows = h.chunks[0]
    t = target.reshape((N, *target.shape[len(lead):]))
    t = t.rechunk({0: rows, **({1: -1} if t.ndim == 2 else {})})
    w = None
    if sw is not None:
        w = da.broadcast_to(da.asarray(sw), lead).reshape(N).rechunk({0: rows})

    # the weight once in the graph, under a name of its own (no hashing of a large array)
    shared = dask.delayed(weight, name=f"linear-weight-{uuid.uuid4().hex}", pure=False)
    shared_bias = (None if bias is None
                   else dask.delayed(bias, name=f"linear-bias-{uuid.uuid4().hex}", pure=False))
    reduction = options.get("reduction", "mean")
    need = (True, True, bias is not None) if want_grad else (False, False, False)
    parts = []
    h_blocks = h.to_delayed().ravel()
    t_blocks = t.to_delayed().ravel()
    w_blocks = [None] * len(h_blocks) if w is None else list(w.to_delayed().ravel())
    for hb, tb, wb in zip(h_blocks, t_blocks, w_blocks):
        parts.append(dask.delayed(_block, pure=True)(
            hb, shared, tb, shared_bias, wb, chunk_mb, options, need,
            want_value=want_value or reduction != "none"))

    dtype = hidden.dtype
    value = scale = None
    if reduction == "none":
        if want_value:
            value = da.concatenate([da.from_delayed(p[0], (n,), dtype)
                                    for p, n in zip(parts, rows)]).reshape(lead)
    else:
        states = da.stack([da.from_delayed(p[0], (2,), np.float64) for p in parts])
        total, denom = states.sum(axis=0)  # tree-wise
        if reduction == "mean":
            counted = denom > 0
            value = da.where(counted, total / da.where(counted, denom, 1), np.nan)
            scale = da.where(counted, 1 / da.where(counted, denom, 1), 0.0)
        else:
            value = total
        value = value.astype(dtype)
    if not want_grad:
        return value, None

    def scaled(x, like):
        x = x if scale is None else x * scale.astype(x.dtype)
        return x.astype(like.dtype)

    acc = np.float64 if np.dtype(weight.dtype) == np.float64 else np.float32
    d_hidden = da.concatenate([da.from_delayed(p[1], (n, H), acc)
                               for p, n in zip(parts, rows)])
    d_weight = da.stack([da.from_delayed(p[2], tuple(weight.shape), acc) for p in parts])
    grads = [scaled(d_hidden, hidden).reshape(*lead, H),
             scaled(d_weight.sum(axis=0), weight)]
    if bias is not None:
        d_bias = da.stack([da.from_delayed(p[3], tuple(bias.shape), acc) for p in parts])
        grads.append(scaled(d_bias.sum(axis=0), bias))
    return value, tuple(grads)


def _block(h, weight, t, bias, sw, chunk_mb, options, need, *, want_value):
    """One block of tokens: (state [Σ w·l, D] or per-token losses, d_hidden, d_weight partial,
    d_bias partial), the gradients those of the block's Σ w·l (its losses' sum for 'none')."""
    opts = dict(options)
    if sw is not None:
        opts["sample_weight"] = sw
    reduction = opts.get("reduction", "mean")
    if reduction == "mean":
        opts["reduction"] = "sum"  # (parts: the same state and gradients of the sum)
    c = _linear.check(h, weight, t, bias, chunk_mb, opts)
    value, grads = _linear.compute(c, want_value=want_value, need=need,
                                   parts=reduction != "none")
    if grads is None:
        return value, None, None, None
    # unscaled, in float32 (float64 for float64 inputs) until the mean's 1/D: the gradient of
    # a block's sum may not fit a 16-bit dtype where the mean's does
    acc = np.float64 if np.dtype(weight.dtype) == np.float64 else np.float32
    return tuple([value] + [None if g is None else g.astype(acc, copy=False) for g in grads])
