"""JAX inside `jax.jit`, `jax.grad`, `jax.vmap`: every loss as a `jax.custom_jvp`.

A traced call cannot leave JAX: no host reads, no kernels of ours. It computes with the
generic backend's array-API formulas on `jax.numpy` (the stable forms of DESIGN §4, the same
options, reductions and weights), which XLA compiles and fuses. The loss's value is a
`custom_jvp` whose rule computes value and gradient together and gives the tangent as
`Σ gradient × dpred`; reverse mode transposes that into `g ×` the saved gradient (broadcast
along the classes for reduction "none"), so that `jax.grad` of a loss costs one pass, as in
PyTorch's autograd (`gpuloss._torch`). (A `custom_vjp` would do the same under reverse mode but
refuse forward mode: `jax.jvp`, `jax.jacfwd`, `jax.hessian`.) Targets and
weights get no gradient. `.grad` and `.value_and_grad` return the formulas' results directly.

With `validate=True`, the data checks become `jax.experimental.checkify` checks with the
messages of the eager errors. Under eager `jax.grad` and `jax.vmap` they raise at once (a
`ValueError`, as eager calls do). Inside `jax.jit` nothing can raise on data: there they are
checkify's debug checks, reported when the function is wrapped in `checkify.checkify` and
otherwise skipped, as JAX's own checks (out-of-bounds indices, NaN) are.

Concrete (not traced) JAX arrays never come here: on the CPU they take the NumPy backend
through zero-copy views, on a GPU the CUDA kernels (`gpuloss._dispatch`).
"""

from __future__ import annotations

import dataclasses
import importlib

from . import _call

_ARRAYS = ("pred", "target", "sample_weight", "pos_weight", "class_weight")


def is_jax_array(x) -> bool:
    """A JAX array, concrete or traced (without importing JAX)."""
    return type(x).__module__.split(".")[0] in ("jax", "jaxlib")


def is_traced(x) -> bool:
    """A JAX tracer (jit, grad, vmap, ...): an array whose values are not at hand."""
    if type(x).__module__[:3] != "jax":  # (a slice, not startswith: torch.compile traces this)
        return False
    import jax

    return isinstance(x, jax.core.Tracer)


def compute(call: _call.Call):
    """(value, grad) of a call on JAX arrays of which at least one is traced."""
    generic = importlib.import_module("gpuloss.backends.generic")
    if call.validate:
        _check(call)
    call = dataclasses.replace(call, validate=False)
    if call.want_grad or call.parts:
        return generic.compute(call)
    return _differentiable_value(call, generic.compute), None


def _differentiable_value(call, formulas):
    import jax
    import jax.numpy as jnp

    names = [name for name in _ARRAYS if getattr(call, name) is not None]

    def rebuilt(arrays, want_grad):
        return dataclasses.replace(call, **dict(zip(names, arrays)), want_grad=want_grad)

    @jax.custom_jvp
    def value(*arrays):
        return formulas(rebuilt(arrays, want_grad=False))[0]

    def value_and_tangent(arrays, tangents):
        # one pass: the value and the gradient; the tangent is linear in pred's tangent,
        # so reverse mode transposes it into `g × gradient` and keeps the gradient
        # from this pass (targets and weights: no derivative)
        out, grad = formulas(rebuilt(arrays, want_grad=True))
        dp = tangents[0].astype(grad.dtype)
        if call.reduction != "none":
            return out, jnp.sum(grad * dp).astype(out.dtype)
        if call.categorical:  # one loss per sample: the classes' terms add up
            return out, jnp.sum(grad * dp, axis=call.axis).astype(out.dtype)
        return out, (grad * dp).astype(out.dtype)

    value.defjvp(value_and_tangent)
    return value(*(getattr(call, name) for name in names))


def _check(call):
    """The backends' data checks (`validate=True`) as checkify checks, same messages."""
    import jax.numpy as jnp
    from jax.experimental import checkify

    def nan_range(x):
        x = x.astype(jnp.float32) if x.dtype == jnp.bool_ else x
        return {"lo": jnp.nanmin(x), "hi": jnp.nanmax(x)}

    checks = []  # (every value passes, message template, values for {lo} and {hi})
    for name in ("sample_weight", "pos_weight", "class_weight"):
        w = getattr(call, name)
        if w is not None and w.size:
            checks.append((jnp.all(jnp.isfinite(w) & (w >= 0)), _call.weights_message(name),
                           {"lo": jnp.min(w), "hi": jnp.max(w)}))
    for name, rule in (("pred", call.pred_rule), ("target", call.target_rule)):
        x = getattr(call, name)
        if rule is None or not x.size:
            continue
        nan = jnp.isnan(x) if jnp.issubdtype(x.dtype, jnp.floating) else False
        if rule == _call.SIGN:
            bad = (x != 1) & (x != -1) & ~nan
            first = x.reshape(-1)[jnp.argmax(bad.reshape(-1))]
            checks.append((~jnp.any(bad), _call.domain_message(call, name, rule),
                           {"lo": first, "hi": first}))
        else:
            inside = (x >= 0) & (x <= 1) if rule == _call.UNIT else x >= 0
            checks.append((jnp.all(inside | nan), _call.domain_message(call, name, rule),
                           nan_range(x)))
    if call.labels and call.target.size:
        t, K = call.target, call.pred.shape[call.axis]
        counted = (t != call.ignore_index if call.ignore_index is not None
                   else jnp.ones(t.shape, bool))
        kept_lo = jnp.min(jnp.where(counted, t, jnp.iinfo(t.dtype).max))
        kept_hi = jnp.max(jnp.where(counted, t, jnp.iinfo(t.dtype).min))
        checks.append((jnp.all(((t >= 0) & (t < K)) | ~counted),
                       _call.labels_message(K, call.ignore_index),
                       {"lo": kept_lo, "hi": kept_hi}))
    check = checkify.debug_check if _staged() else checkify.check
    for ok, message, values in checks:
        check(ok, message, **values)


def _staged() -> bool:
    """Inside jax.jit (or checkify, scan, ...): a check cannot raise there, only report to
    checkify. (JAX's own test of its trace stack; if it is gone, assume staged.)"""
    from jax._src import core

    return getattr(core, "unsafe_am_i_under_a_jit", lambda: True)()
