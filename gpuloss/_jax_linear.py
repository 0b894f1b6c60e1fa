"""JAX for `gpuloss.linear_cross_entropy`: the chunked loop as one `lax.scan`, so that under
`jax.jit` XLA holds one chunk of logits at a time (never the N × V logits), with a
`custom_vjp` that keeps DESIGN §10's rule: for 'mean' and 'sum' the gradients are formed in
the forward pass and backward scales them by the cotangent; for 'none' (one cotangent per
token) backward runs the loop once more with the tokens weighted by it. `grad`, `vmap` and
`jit` compose with it as with any JAX function.

The chunk's loss and gradient are the generic array-API formulas of `cce_with_logits`
(`gpuloss.backends.generic`) on `jax.numpy`, as for every loss under a JAX trace. The tokens
are padded to a whole number of chunks with weight-0 rows, which add nothing to the loss, the
denominator or the gradients.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from . import _api, _call, _jax, _linear


def run(hidden, weight, target, bias, chunk_mb, options, *, want_value, want_grad):
    import jax.numpy as jnp

    c = _linear.check(hidden, weight, target, bias, chunk_mb, options)
    if c.options.get("validate", True):
        _validate(c)
    plan = _plan(c)
    sw = c.sample_weight
    weight_dtype = jnp.float64 if plan.dtype == "float64" else jnp.float32
    # floating sample weights (the tokens' weights are scaled by cotangents in backward)
    sw = jnp.ones((c.N,), weight_dtype) if sw is None else jnp.asarray(sw).astype(weight_dtype)
    args = (c.hidden, c.weight, c.bias, c.target, sw, c.options.get("class_weight"))
    if not want_grad:
        value = _value_fn(plan)(*args)
        return _shaped(c, value), None
    value, grads = _forward(plan, *args, want_value=True, need=(True, True, c.bias is not None))
    grads = (jnp.reshape(grads[0], (*c.lead, c.H)), *grads[1:])
    return _shaped(c, value), grads[:3 if c.bias is not None else 2]


def _shaped(c, value):
    import jax.numpy as jnp

    return jnp.reshape(value, c.lead) if c.reduction == "none" else value


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What fixes the traced computation (hashable: one custom_vjp function per plan)."""

    rows: int  # tokens per chunk
    chunks: int
    N: int
    V: int
    dtype: str  # hidden's dtype name
    labels: bool
    reduction: str
    options: tuple  # the loss's scalar options, as (name, value) pairs


def _plan(c) -> _Plan:
    compute = 8 if _api.dtype_name(c.hidden.dtype) == "float64" else 4
    rows = max(1, int(c.chunk_bytes // max(c.V * compute, 1)))
    rows = min(rows, max(c.N, 1))
    scalars = tuple(sorted((k, v) for k, v in c.options.items()
                           if k not in ("class_weight", "reduction", "validate")))
    return _Plan(rows, -(-c.N // rows), c.N, c.V, _api.dtype_name(c.hidden.dtype), c.labels,
                 c.reduction, scalars)


def _validate(c):
    """The row pass's data checks, once for the whole call (the scan computes unchecked)."""
    import jax

    call = _call.Call(loss="cce_with_logits",
                      pred=jax.ShapeDtypeStruct((c.N, c.V), c.hidden.dtype), target=c.target,
                      reduction=c.reduction, family=_call.CATEGORICAL, axis=1,
                      labels=c.labels, ignore_index=c.options.get("ignore_index"),
                      target_rule=None if c.labels else _call.UNIT,
                      sample_weight=c.sample_weight,
                      class_weight=c.options.get("class_weight"))
    _jax._check(call)


def _chunk(plan, W, b, h, t, sw, cw, *, want_grad):
    """One chunk's float64-free state: (value [Σ w·l, D] or per-token losses, G)."""
    import jax.numpy as jnp

    from .backends import generic

    gemm = jnp.float64 if plan.dtype == "float64" else jnp.float32
    z = jnp.matmul(h.astype(gemm), W.astype(gemm).T)
    if b is not None:
        z = z + b.astype(gemm)
    options = dict(plan.options)
    options["reduction"] = "none" if plan.reduction == "none" else "sum"
    options["sample_weight"] = sw
    options["validate"] = False
    if cw is not None:
        options["class_weight"] = cw
    cce = _api._BY_NAME["cce_with_logits"]
    call = _api.prepare(cce, z, t, options, want_value=True, want_grad=want_grad,
                        parts=plan.reduction != "none")
    value, G = generic.compute(call)
    return value, G


def _padded(plan, h, t, sw):
    import jax.numpy as jnp

    pad = plan.rows * plan.chunks - plan.N
    if pad:
        h = jnp.concatenate([h, jnp.zeros((pad, h.shape[1]), h.dtype)])
        fill = jnp.zeros((pad,), t.dtype) if plan.labels else jnp.zeros((pad, plan.V), t.dtype)
        t = jnp.concatenate([t, fill])
        sw = jnp.concatenate([sw, jnp.zeros((pad,), sw.dtype)])
    split = (plan.chunks, plan.rows)
    return (jnp.reshape(h, (*split, h.shape[1])), jnp.reshape(t, (*split, *t.shape[1:])),
            jnp.reshape(sw, split))


def _forward(plan, h, W, b, t, sw, cw, *, want_value, need):
    """(value, (d_hidden, d_weight, d_bias)) by one scan over the chunks; gradients of
    exactly the value (the mean's 1/D applied at the end)."""
    import jax
    import jax.numpy as jnp

    acc = jnp.float64 if plan.dtype == "float64" else jnp.float32
    hs, ts, sws = _padded(plan, h, t, sw)
    want_grad = any(need)

    def body(carry, xs):
        state, dW, db = carry
        hc, tc, swc = xs
        value, G = _chunk(plan, W, b, hc, tc, swc, cw, want_grad=want_grad)
        dh = None
        if want_grad:
            G = G.astype(acc)
            if need[0]:
                dh = G @ W.astype(acc)
            if need[1]:
                dW = dW + G.T @ hc.astype(acc)
            if need[2]:
                db = db + jnp.sum(G, axis=0)
        if plan.reduction == "none":
            return (state, dW, db), (value, dh)
        return (state + value, dW, db), (None, dh)

    init = (jnp.zeros((2,), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32),
            jnp.zeros(W.shape, acc) if need[1] else None,
            jnp.zeros(W.shape[:1], acc) if need[2] else None)
    (state, dW, db), (per_token, dh) = jax.lax.scan(body, init, (hs, ts, sws))
    dtype = h.dtype
    if plan.reduction == "none":
        value = jnp.reshape(per_token, (-1,))[: plan.N].astype(dtype)
        scale = None
    else:
        total, denom = state[0], state[1]
        counted = denom > 0
        if plan.reduction == "mean":
            value = jnp.where(counted, total / jnp.where(counted, denom, 1), jnp.nan)
            scale = jnp.where(counted, 1 / jnp.where(counted, denom, 1), 0)
        else:
            value, scale = total, None
        value = value.astype(dtype)

    def finish(x, like):
        if x is None:
            return None
        return (x if scale is None else x * scale.astype(x.dtype)).astype(like.dtype)

    grads = (finish(None if dh is None else jnp.reshape(dh, (-1, h.shape[1]))[: plan.N], h),
             finish(dW, W), finish(db, b) if b is not None else None)
    return value, grads


@functools.lru_cache(maxsize=64)
def _value_fn(plan: _Plan):
    """The value as a differentiable JAX function of (h, W, b, t, sw): custom_vjp."""
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def value(h, W, b, t, sw, cw):
        return _forward(plan, h, W, b, t, sw, cw, want_value=True, need=(False,) * 3)[0]

    def fwd(h, W, b, t, sw, cw):
        if plan.reduction == "none":  # backward weights the tokens by their cotangents
            out = _forward(plan, h, W, b, t, sw, cw, want_value=True, need=(False,) * 3)[0]
            return out, (h, W, b, t, sw, cw)
        out, grads = _forward(plan, h, W, b, t, sw, cw, want_value=True,
                              need=(True, True, b is not None))
        return out, (grads, t, sw, cw)

    def bwd(res, g):
        # (targets and weights get zero cotangents, as every gpuloss loss gives them in JAX)
        if plan.reduction == "none":
            h, W, b, t, sw, cw = res
            summed = dataclasses.replace(plan, reduction="sum")
            _, grads = _forward(summed, h, W, b, t, sw * g.astype(sw.dtype), cw,
                                want_value=False, need=(True, True, b is not None))
        else:
            grads, t, sw, cw = res
            grads = tuple(None if x is None else x * g.astype(x.dtype) for x in grads)
        dh, dW, db = grads
        return (dh, dW, db, _zero_cotangent(t), jnp.zeros_like(sw),
                None if cw is None else _zero_cotangent(cw))

    value.defvjp(fwd, bwd)
    return value


def _zero_cotangent(t):
    import jax
    import jax.numpy as jnp

    if jnp.issubdtype(t.dtype, jnp.integer):
        return np.zeros(t.shape, dtype=jax.dtypes.float0)
    return jnp.zeros_like(t)
