"""Generic array-API backend: the formulas of `gpuloss.losses` written with whole-array
operations of any array-API namespace (PyTorch, JAX, array-api-strict, ...).

Plain and readable rather than fast: it allocates full-size temporaries (under `jax.jit`,
XLA fuses them away: this is also the JAX formulation, see `gpuloss._jax`). Results come back
as the caller's arrays, on the caller's device. Per-element arithmetic is in float32 for
float16/bfloat16/float32 inputs and float64 otherwise; sums over the batch are float64, or,
where the namespace has no float64 (JAX without x64), float32 sums of blocks added pairwise
with compensation (`_total`). Nothing here reads a value back to the host unless `validate`
asks for it, so that the formulas also run inside a JAX trace.
"""

from __future__ import annotations

import math

import array_api_compat
import numpy as np

from .. import _call


def compute(call: _call.Call):
    # NumPy-backed namespaces (array-api-strict) would warn on inf/NaN: those are results here
    with np.errstate(all="ignore"):
        return _compute(call)


def _compute(call: _call.Call):
    xp = array_api_compat.array_namespace(call.pred)
    cdt = xp.float64 if call.pred.dtype == xp.float64 else xp.float32
    acc = _accumulator(xp)
    if call.categorical:
        value, grad = _categorical(call, xp, cdt, acc)
    else:
        value, grad = _elementwise(call, xp, cdt, acc)
    dtype = call.pred.dtype
    if value is not None and not call.parts:
        value = xp.astype(value, dtype)
    if grad is not None:
        grad = xp.astype(grad, dtype)
    return (value if call.want_value else None), grad


def _accumulator(xp):
    """The dtype sums are taken in: float64, unless the namespace has none (JAX without x64,
    where asking for float64 would warn and give float32 anyway)."""
    if array_api_compat.is_jax_namespace(xp):
        import jax

        if jax.dtypes.canonicalize_dtype(np.float64) != np.float64:
            return xp.float32
    return xp.float64


_BLOCK = 1024  # float32 totals: XLA sums blocks this long, the blocks are added pairwise


def _total(xp, x, acc):
    """The sum of every element of `x` in `acc`. In float64 a plain sum. In float32 (JAX
    without x64) the blocks' sums are added pairwise with each addition's rounding error
    kept (Knuth's two-sum) and added back: a blocked sum of n elements is accurate to
    about (1024 + log2(n / 1024)) float32 roundings in the worst case instead of n. (A
    reshape into blocks alone does not do it: XLA merges a sum of sums into one sum.)"""
    x = xp.astype(xp.reshape(x, (-1,)), acc)
    if acc == xp.float64 or x.shape[0] <= _BLOCK:
        return xp.sum(x)
    m = x.shape[0] // _BLOCK
    heads = xp.sum(xp.reshape(x[: m * _BLOCK], (m, _BLOCK)), axis=1)
    s = xp.concat([heads, xp.reshape(xp.sum(x[m * _BLOCK:]), (1,))])
    err = xp.zeros_like(s)
    while s.shape[0] > 1:
        if s.shape[0] % 2:
            s = xp.concat([s, xp.zeros_like(s[:1])])
            err = xp.concat([err, xp.zeros_like(err[:1])])
        a, b = s[0::2], s[1::2]
        t = a + b
        bv = t - a
        err = err[0::2] + err[1::2] + ((a - (t - bv)) + (b - bv))  # exactly a + b - t
        s = t
    return s[0] + err[0]


def _range(xp, x):
    """Smallest and largest value, looking past NaN (NaN propagates, it is not out of range)."""
    if math.prod(x.shape) == 0:
        return math.inf, -math.inf
    nan = xp.isnan(x)
    inside = xp.asarray(0.5, dtype=x.dtype, device=array_api_compat.device(x))
    return float(xp.min(xp.where(nan, inside, x))), float(xp.max(xp.where(nan, inside, x)))


def _check_rule(call, xp, x, name, rule):
    """`x` as stored against the domain rule (NaN passes: it propagates)."""
    if rule == _call.SIGN:
        bad = (x != 1) & (x != -1) & ~xp.isnan(xp.astype(x, _accumulator(xp)))
        if xp.any(bad):
            value = float(x[bad][0])
            _call.raise_domain(call, name, rule, value, value)
        return
    lo, hi = _range(xp, x)
    if lo < 0 or (rule == _call.UNIT and hi > 1):
        _call.raise_domain(call, name, rule, lo, hi)


def _check_weight(xp, w, name):
    """Weights as given (before any rescaling or cast): finite and non-negative."""
    if math.prod(w.shape):
        lo, hi = float(xp.min(w)), float(xp.max(w))
        if not _call.weights_ok(lo, hi):
            _call.raise_bad_weights(name, lo, hi)


def _reduce(call, xp, per_item, weight_sum, acc):
    """The value the reduction asks for; sums in `acc` (see `_total`)."""
    if call.reduction == "none":
        return per_item
    total = _total(xp, per_item, acc)
    if call.parts:
        return xp.stack([total, xp.astype(xp.asarray(weight_sum), acc)])
    return total if call.reduction == "sum" else total / weight_sum


def _for_mean(call, xp, w, acc):
    """Weights rescaled by their maximum when they would under- or overflow in float32 (the
    mean does not change; see the NumPy backend). Chosen with `where`, not read back: the
    data stays on its device (and in a JAX trace)."""
    if w is None or call.reduction != "mean" or call.parts or math.prod(w.shape) == 0:
        return w  # partial states keep the weights' own scale, so that they add up
    if not xp.isdtype(w.dtype, "real floating"):
        w = xp.astype(w, acc)
    top = xp.max(w)
    extreme = xp.isfinite(top) & (top > 0) & ((top < 1e-20) | (top > 1e20))
    return w / xp.where(extreme, top, xp.ones_like(top))


def _scale(call, xp, weight_sum, cdt):
    """The mean's 1/D (0 when nothing counts), in the compute dtype."""
    if call.reduction != "mean":
        return 1.0
    if isinstance(weight_sum, float):
        return 1.0 / weight_sum if weight_sum > 0 else 0.0
    positive = weight_sum > 0
    safe = xp.where(positive, weight_sum, xp.ones_like(weight_sum))
    return xp.astype(xp.where(positive, 1 / safe, xp.zeros_like(safe)), cdt)


def _elementwise(call, xp, cdt, acc):
    shape = tuple(call.pred.shape)
    P = xp.astype(call.pred, cdt)
    Y = xp.astype(call.target, cdt)
    W = None
    if call.sample_weight is not None:
        if call.validate:
            _check_weight(xp, call.sample_weight, "sample_weight")
        sw = _for_mean(call, xp, call.sample_weight, acc)
        W = xp.astype(xp.broadcast_to(sw, shape), cdt)
        weight_sum = _total(xp, W, acc)  # the weights as the products use them
    else:
        weight_sum = float(math.prod(shape))
    if call.validate:  # as stored, before any conversion
        if call.pred_rule:
            _check_rule(call, xp, call.pred, "pred", call.pred_rule)
        if call.target_rule:
            _check_rule(call, xp, call.target, "target", call.target_rule)
        if call.pos_weight is not None:
            _check_weight(xp, call.pos_weight, "pos_weight")

    loss, grad = _ELEMENTWISE[call.loss](xp, P, Y, call)
    if W is not None:
        loss = loss * W
        grad = grad * W
    value = _reduce(call, xp, loss, weight_sum, acc)
    grad = grad * _scale(call, xp, weight_sum, cdt) if call.want_grad else None
    return value, grad


# ---------------------------------------------------------------------------------------------
# elementwise formulas: (per-element loss, its derivative) in the compute dtype


def _mse(xp, P, Y, call):
    d = P - Y
    return d * d, 2 * d


def _bce(xp, P, Y, call):
    pc = xp.clip(P, call.eps, 1 - call.eps)
    loss = -(Y * xp.log(pc) + (1 - Y) * xp.log1p(-pc))
    return loss, (pc - Y) / (pc * (1 - pc))


def _bce_with_logits(xp, P, Y, call):
    if call.label_smoothing:
        Y = Y * (1 - call.label_smoothing) + call.label_smoothing / 2
    PY = Y
    if call.pos_weight is not None:
        PY = Y * xp.astype(xp.broadcast_to(call.pos_weight, tuple(P.shape)), P.dtype)
    e = xp.exp(-xp.abs(P))
    lg = xp.log1p(e)
    mz = xp.maximum(P, xp.zeros_like(P))
    loss = (1 - Y) * (mz + lg) + PY * ((mz - P) + lg)
    r = 1 / (1 + e)
    positive = P >= 0
    sig_z = xp.where(positive, r, e * r)  # sigmoid(z), with no cancellation
    sig_minus_z = xp.where(positive, e * r, r)
    grad = (1 - Y) * sig_z - PY * sig_minus_z
    _, gamma, a_pos, a_neg = call.kernel_params  # focal: alpha_t = a_pos y + a_neg (1 - y)
    if gamma or a_pos != 1 or a_neg != 1:
        loss, grad = _focal_binary(xp, P, Y, e, loss, grad, gamma, a_pos, a_neg)
    return loss, grad


def _focal_binary(xp, P, Y, e, ce, ce_grad, gamma, a_pos, a_neg):
    # l = alpha_t M CE with M = (1 - p_t)^gamma, (1 + e)(1 - p_t) = den = a (1 - y) + b y,
    # (a, b) = (1, e) for z >= 0, (e, 1) below; M from the log domain, and dM/dz =
    # gamma M (1 - 2y) R with R = p (1 - p) / (1 - p_t) = e / ((1 + e) den) in [0, 1]
    alpha_t = 1.0 if a_pos == 1 and a_neg == 1 else Y * a_pos + (1 - Y) * a_neg
    if not gamma:
        return alpha_t * ce, alpha_t * ce_grad
    gamma = _param(xp, gamma, P.dtype)
    one = xp.ones_like(P)
    positive = P >= 0
    a, b = xp.where(positive, one, e), xp.where(positive, e, one)
    den = a * (1 - Y) + b * Y
    tiny = float(xp.finfo(P.dtype).smallest_normal)  # den = 0 only where M = 0 too
    R = e / ((1 + e) * xp.maximum(den, xp.full_like(den, tiny)))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lm = gamma * (xp.log(den) - xp.log1p(e))  # log M
        gm = xp.exp(lm + math.log(gamma))  # gamma M; near the dtype's largest gamma, with R
        gmr = xp.where(xp.isfinite(gm), gm * R, xp.exp(lm + math.log(gamma) + xp.log(R)))
        M = xp.exp(lm)
    return alpha_t * (M * ce), alpha_t * (M * ce_grad + gmr * ((1 - 2 * Y) * ce))


def _param(xp, value, dtype):
    """A loss's scalar parameter as the kernels take it: beyond the dtype's range, its largest
    finite value (NaN stays NaN)."""
    top = float(xp.finfo(dtype).max)
    return value if math.isnan(value) else min(max(float(value), -top), top)


def _where_nan(xp, x, value):
    """`value`, with NaN wherever x is NaN (NaN propagates into the gradient)."""
    return xp.where(xp.isnan(x), x, value)


def _mae(xp, P, Y, call):
    d = P - Y
    return xp.abs(d), xp.sign(d)


def _huber(xp, P, Y, call):
    delta = _param(xp, call.options["delta"], P.dtype)
    d = P - Y
    a = xp.abs(d)
    inside = a <= delta
    loss = xp.where(inside, 0.5 * d * d, delta * (a - 0.5 * delta))
    return loss, xp.where(inside, d, delta * xp.sign(d))


def _smooth_l1(xp, P, Y, call):
    beta = _param(xp, call.options["beta"], P.dtype)
    d = P - Y
    a = xp.abs(d)
    inside = a < beta  # never for beta = 0: then it is |d|, sign(d)
    safe = beta if beta > 0 else 1.0
    loss = xp.where(inside, (a / safe) * (0.5 * a), a - 0.5 * beta)  # no d^2 overflow
    return loss, xp.where(inside, d / safe, xp.sign(d))


def _log_cosh(xp, P, Y, call):
    # t = tanh(d): -log1p(-t^2) / 2 for |d| <= 1, |d| - log1p(|t|) beyond
    d = P - Y
    a = xp.abs(d)
    t = xp.tanh(d)
    loss = xp.where(a > 1, a - xp.log1p(xp.abs(t)), -0.5 * xp.log1p(-(t * t)))
    return loss, t


def _poisson_nll(xp, P, Y, call):
    o = call.options
    if o["log_input"]:
        e = xp.exp(P)
        loss, grad = e - Y * P, e - Y
    else:
        q = P + o["eps"]
        loss, grad = P - Y * xp.log(q), 1 - Y / q
    if o["full"]:  # Stirling's term where y > 1 (log of y <= 1 never taken)
        big = Y > 1
        y = xp.where(big, Y, xp.ones_like(Y))
        stirling = y * xp.log(y) - y + 0.5 * xp.log(2 * math.pi * y)
        loss = loss + xp.where(big, stirling, xp.zeros_like(Y))
    return loss, grad


def _hinge(xp, P, Y, call):
    m = 1 - Y * P
    zero = xp.zeros_like(m)
    return _where_nan(xp, m, xp.maximum(m, zero)), _where_nan(xp, m, xp.where(m > 0, -Y, zero))


def _squared_hinge(xp, P, Y, call):
    m = 1 - Y * P
    h = _where_nan(xp, m, xp.maximum(m, xp.zeros_like(m)))
    return h * h, 0 - 2 * Y * h  # +0 where h = 0


def _pinball(xp, P, Y, call):
    q = call.options["quantile"]
    r = Y - P
    loss = _where_nan(xp, r, xp.maximum(q * r, (q - 1) * r))
    grad = xp.where(r > 0, xp.full_like(r, -q), xp.full_like(r, 1 - q))
    return loss, grad * xp.abs(xp.sign(r))  # 0 at r = 0, NaN for NaN


_ELEMENTWISE = {
    "mse": _mse, "bce": _bce, "bce_with_logits": _bce_with_logits, "mae": _mae,
    "huber": _huber, "smooth_l1": _smooth_l1, "log_cosh": _log_cosh,
    "poisson_nll": _poisson_nll, "hinge": _hinge, "squared_hinge": _squared_hinge,
    "pinball": _pinball,
}


def _rest(xp, S, E, acc):
    """Σ exp(S) over the last axis without the row maximum's own 1 (S = Z - max), in `acc`:
    log of the sum = log1p(rest) keeps the digits of a row dominated by its maximum (1 + 1e-22
    rounds to 1), as the kernels and the NumPy backend. NaN in a row stays NaN."""
    classes = xp.arange(S.shape[-1], device=array_api_compat.device(S))
    top = xp.expand_dims(xp.argmax(S, axis=-1), axis=-1) == classes
    rest = xp.sum(xp.astype(xp.where(top, xp.zeros_like(E), E), acc), axis=-1, keepdims=True)
    nan_row = xp.any(xp.isnan(S), axis=-1, keepdims=True)
    return xp.where(nan_row, xp.full_like(rest, math.nan), rest)


def _log_softmax(xp, U, acc):
    """(log softmax, softmax) over the last axis, max-shifted, the sum of exp in `acc`."""
    S = U - xp.max(U, axis=-1, keepdims=True)
    E = xp.exp(S)
    rest = _rest(xp, S, E, acc)
    return S - xp.astype(xp.log1p(rest), U.dtype), E / xp.astype(1 + rest, U.dtype)


def _categorical(call, xp, cdt, acc):
    ndim = call.pred.ndim
    perm = tuple(i for i in range(ndim) if i != call.axis) + (call.axis,)
    inverse = tuple(perm.index(i) for i in range(ndim))
    Z = xp.astype(xp.permute_dims(call.pred, perm), cdt)
    K = Z.shape[-1]
    sample_shape = tuple(Z.shape[:-1])
    nan = xp.asarray(math.nan, dtype=cdt, device=array_api_compat.device(Z))
    sech2 = None
    if call.options.get("softcap") is not None:
        Z, sech2 = _soft_cap(xp, Z, call.options["softcap"])

    cw = None
    if call.class_weight is not None:
        if call.validate:
            _check_weight(xp, call.class_weight, "class_weight")
        # only with class indices are class weights in the mean's denominator
        cw = (call.class_weight if not call.labels
              else _for_mean(call, xp, call.class_weight, acc))
        cw = xp.astype(cw, cdt)
    w = xp.ones(sample_shape, dtype=cdt, device=array_api_compat.device(Z))
    if call.sample_weight is not None:
        if call.validate:
            _check_weight(xp, call.sample_weight, "sample_weight")
        sw = _for_mean(call, xp, call.sample_weight, acc)
        w = xp.astype(xp.broadcast_to(sw, sample_shape), cdt)

    if call.labels:
        t = call.target
        if xp.isdtype(t.dtype, "unsigned integer"):  # class indices are int64 inside
            traced = any(c.__name__.endswith("Tracer") for c in type(t).__mro__)  # JAX
            if t.dtype == xp.uint64 and math.prod(sample_shape) and not traced:
                _call.check_labels_fit_int64(int(xp.max(t)))
            t = xp.astype(t, xp.int64)
        counted = xp.ones(sample_shape, dtype=xp.bool, device=array_api_compat.device(Z))
        if call.ignore_index is not None:
            counted = t != call.ignore_index
        in_range = (t >= 0) & (t < K)
        if call.validate and math.prod(sample_shape):
            if xp.any(~in_range & counted):
                kept = t[counted]
                _call.raise_bad_labels(int(xp.min(kept)), int(xp.max(kept)), K, call.ignore_index)
        w = xp.where(counted, w, xp.zeros_like(w))
        w = xp.where(in_range | ~counted, w, nan)  # bad labels give NaN, never an index error
        classes = xp.arange(K, device=array_api_compat.device(Z))
        T = xp.astype(xp.expand_dims(t, axis=-1) == classes, cdt)  # one-hot
        cwy = xp.ones_like(w) if cw is None else xp.sum(T * cw, axis=-1)
        weight_sum = _total(xp, xp.astype(w, acc) * xp.astype(cwy, acc), acc)
    else:
        T = xp.astype(xp.permute_dims(call.target, perm), cdt)
        if call.validate and call.target_rule:  # as stored, before any conversion
            _check_rule(call, xp, call.target, "target", call.target_rule)
        weight_sum = (float(math.prod(sample_shape)) if call.sample_weight is None
                      else _total(xp, w, acc))

    cw_vec = xp.ones(K, dtype=cdt, device=array_api_compat.device(Z)) if cw is None else cw
    if call.loss == "cce":
        if call.validate and call.pred_rule:
            _check_rule(call, xp, Z, "pred", call.pred_rule)
        pc = xp.clip(Z, call.eps, 1 - call.eps)
        C = T * cw_vec
        if call.labels and K:  # NaN anywhere in a row: that row's loss and gradient are NaN
            w = xp.where(xp.any(xp.isnan(Z), axis=-1), nan, w)
        loss = -xp.sum(C * xp.log(pc), axis=-1)
        grad = -C / pc
    elif call.loss in ("nll", "kl_div"):
        if call.loss == "nll":  # -Σ c a, c = cw t (one-hot t for class indices)
            C, X = T * cw_vec, -Z
            if call.labels and K:  # NaN anywhere in a row: that row's loss and gradient are NaN
                w = xp.where(xp.any(xp.isnan(Z), axis=-1), nan, w)
            nan_in = xp.isnan(Z)
        else:  # Σ t (log t - a), 0 log 0 = 0; the target is log t with log_target
            log_target = call.options["log_target"]
            C = xp.exp(T) if log_target else T
            X = (T if log_target else xp.log(T)) - Z
            nan_in = xp.isnan(Z) | xp.isnan(T)
        # a class with no weight adds 0, even where X is infinite (masked, 0 log 0)
        loss = xp.sum(xp.where((C == 0) & ~nan_in, xp.zeros_like(X), C * X), axis=-1)
        grad = -C
    elif call.loss in ("kl_div_with_logits", "multiclass_hinge") and K == 0:
        # no classes: empty sums (an invalid class index already made its weight NaN)
        loss, grad = xp.zeros(sample_shape, dtype=cdt, device=array_api_compat.device(Z)), Z
    elif call.loss == "kl_div_with_logits":
        # T^2 Σ t (log t - log q), q = softmax(z / T), t = target or softmax(target / T)
        temp, target_logits = call.kernel_params
        logq, q = _log_softmax(xp, Z / temp, acc)
        if target_logits:
            logt, C = _log_softmax(xp, T / temp, acc)
            t_sum = 1.0
        else:
            C, logt, t_sum = T, xp.log(T), xp.sum(T, axis=-1, keepdims=True)
        X = logt - logq
        nan_in = xp.isnan(logq) | xp.isnan(T)  # a +inf logit too (inf - inf), as cce
        loss = temp * temp * xp.sum(
            xp.where((C == 0) & ~nan_in, xp.zeros_like(X), C * X), axis=-1)
        grad = temp * (q * t_sum - C)
    elif call.loss == "multiclass_hinge":
        # cw[y] max(0, margin + max_{j != y} z_j - z_y); +-cw[y] at the runner-up and y
        (margin,) = call.kernel_params
        if K:
            w = xp.where(xp.any(xp.isnan(Z), axis=-1), nan, w)
        others = xp.where(T > 0, xp.full_like(Z, -math.inf), Z)
        runner = (xp.max(others, axis=-1) if K > 1 else
                  xp.full(sample_shape, -math.inf, dtype=cdt, device=array_api_compat.device(Z)))
        runner_k = xp.argmax(others, axis=-1) if K > 1 else None
        zy = xp.sum(xp.where(T > 0, Z, xp.zeros_like(Z)), axis=-1)
        lead = margin + runner
        m = lead - zy
        if K == 1:  # nothing to beat: 0 (NaN for a NaN score), not -inf - -inf
            m = xp.where(xp.isnan(zy), zy, xp.full_like(zy, -math.inf))
        active = lead > zy  # decided on the inputs, as the kernel
        loss = cwy * xp.where(active | xp.isnan(m), m, xp.zeros_like(m))
        s = xp.astype(active, cdt) * cwy
        grad = -T * xp.expand_dims(s, axis=-1)
        if K > 1:
            at_runner = xp.expand_dims(runner_k, axis=-1) == classes
            grad = grad + xp.astype(at_runner, cdt) * xp.expand_dims(s, axis=-1)
    else:
        if K == 0:
            logp = soft = one_minus_soft = Z
        else:
            m = xp.max(Z, axis=-1, keepdims=True)
            S = Z - m  # max-shifted: exp never overflows
            E = xp.exp(S)
            # the row sum in float64 (where there is one) as 1 + rest, log1p(rest)
            rest = _rest(xp, S, E, acc)
            se = 1 + rest
            logp = S - xp.astype(xp.log1p(rest), cdt)
            soft = E / xp.astype(se, cdt)
            # 1 - softmax as (rest - expm1(S)) / se: no cancellation near softmax = 1
            one_minus_soft = xp.astype((rest - xp.astype(xp.expm1(S), acc)) / se, cdt)
        ls = call.label_smoothing
        if call.labels:
            # PyTorch: (1 - ls) * nll + ls / K * sum_k cw_k (-log p_k), with the mean over
            # sum of cw[y]; equal to cross-entropy against c_k y'_k, with
            # c y' = (1 - ls) cw[y] onehot + ls / K cw.
            C = (1 - ls) * xp.expand_dims(cwy, axis=-1) * T
            C_sum = (1 - ls) * xp.expand_dims(cwy, axis=-1)  # Σ C, known without a pass
            if ls:  # unsmoothed, the other classes' weights are not used at all
                C = C + (ls / K if K else 0.0) * cw_vec
                C_sum = C_sum + (ls / K if K else 0.0) * xp.sum(cw_vec)
        else:
            C = cw_vec * (T * (1 - ls) + (ls / K if K else 0.0))
            C_sum = xp.sum(C, axis=-1, keepdims=True)
        # a class that carries no weight adds 0, also at a -inf (masked) logit; NaN stays
        loss = -xp.sum(C * xp.where((C == 0) & ~xp.isnan(logp), xp.zeros_like(logp), logp),
                       axis=-1)
        # softmax * sum(C) - C as p (sum(C) - C) - C (1 - p): no cancellation near p = 1
        grad = soft * (C_sum - C) - C * one_minus_soft
        gamma, z_loss, _ = call.kernel_params  # (softcap: applied to Z above)
        if gamma and K:  # focal: Σ c M (-log q), M = (1 - q)^gamma; g = h - q Σ h
            nlq = -logp
            with np.errstate(divide="ignore", invalid="ignore"):
                M = xp.exp(gamma * xp.log(one_minus_soft))
                ratio = xp.where(one_minus_soft > 0, nlq / one_minus_soft, xp.ones_like(nlq))
                qr = xp.where(soft > 0, soft * ratio, xp.zeros_like(soft))
            zero = xp.zeros_like(nlq)
            loss = xp.sum(xp.where((C == 0) & ~xp.isnan(nlq), zero, C * M * nlq), axis=-1)
            h = xp.where(C == 0, zero, -C * M * (1 + gamma * qr))
            grad = h - soft * xp.sum(h, axis=-1, keepdims=True)
        if z_loss and K:  # z lse^2 with the label's class weight (1 for probabilities)
            zw = cwy if call.labels else xp.ones_like(w)
            lse = xp.squeeze(m, axis=-1) + xp.astype(xp.log1p(xp.squeeze(rest, axis=-1)), cdt)
            loss = loss + z_loss * lse * lse * zw
            grad = grad + xp.expand_dims(2 * z_loss * lse * zw, axis=-1) * soft
    # a sample of weight 0 adds 0 even where its loss is infinite (NaN stays NaN)
    weighted = xp.where((w == 0) & xp.isinf(loss), xp.zeros_like(loss), loss * w)
    value = _reduce(call, xp, weighted, weight_sum, acc)
    if not call.want_grad:
        return value, None
    grad = grad * xp.expand_dims(w, axis=-1) * _scale(call, xp, weight_sum, cdt)
    if sech2 is not None:  # the chain rule through the cap
        grad = grad * sech2
    return value, xp.permute_dims(grad, inverse)


def _soft_cap(xp, Z, c):
    """(c tanh(z / c), its derivative sech^2(z / c)), both from s = exp(-2|z / c|) as the
    NumPy backend computes them (no cancellation near tanh = 1 or 0)."""
    c = min(float(c), float(np.finfo(np.float64 if Z.dtype == xp.float64 else np.float32).max))
    X = Z / c  # (c beyond the compute dtype's range: its largest value, as the kernel takes it)
    A = -2 * xp.abs(X)
    S = xp.exp(A)
    capped = c * (-xp.expm1(A) / (1 + S))
    capped = xp.where(X < 0, -capped, capped)  # (copysign: NaN stays NaN either way)
    return capped, 4 * S / ((1 + S) * (1 + S))
