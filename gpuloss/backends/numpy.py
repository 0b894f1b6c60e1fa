"""NumPy backend: one pass over the data in cache-sized blocks, on every core.

The arrays are cut into blocks of about `BLOCK` elements (whole rows for cce*). Each block is
read once from memory; all intermediate work happens on block-sized scratch buffers that stay
in the core's cache, so the only full-size array allocated is the output. Blocks are shared
among a few threads (NumPy releases the GIL inside ufunc loops). Each block's partial sums are
kept in float64 and stored by block number, then added in block order: the result does not
depend on the number of threads or on which thread ran which block, so repeated calls give
bit-identical results.

Per-element arithmetic is done in float32 for float16/float32 inputs and in float64 for
float64 inputs. Sums over the batch are float64. Row sums over the K classes of one sample
(cce*) use NumPy's pairwise float32/float64 summation.

The formulas are the ones documented in `gpuloss.losses`; each block function below says in
one comment line what it computes. Adding an elementwise loss adds one block function to
`_ELEMENTWISE`; the domain checks, weights, reductions and threads are the driver's.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import _call, _pool

_NO_RANGE = (0.0, 0.0, False)  # a range that was not checked
BLOCK = 1 << 17  # elements per block: fewer blocks cost less Python overhead; a block's
# inputs and scratch (a few MB) stay in the L2/L3 caches
ROW_BLOCK = 1 << 19  # the same for whole rows: the row losses make fewer passes per block, so
# the per-block Python overhead weighs more (measured: nll, cce 2x faster than at 1 << 17)
ONE_BLOCK = 1 << 19  # elements: an elementwise call up to this size is one block on the
# calling thread (measured on the 2-core VM: 2^18 elements take 200 us in one block, 384 us
# split in two; from 2^20 the split pays)
_F64 = np.float64


# ---------------------------------------------------------------------------------------------
# threads and blocks


_executor_now: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _executor_now
    with _executor_lock:
        if _executor_now is None or _executor_now._max_workers != workers:
            _executor_now = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpuloss")
        return _executor_now


def blocks(shape: tuple[int, ...], block: int, whole_last_axis: bool = False) -> list:
    """Index tuples that cut an array of `shape` into C-order blocks of about `block` elements.

    Each block is a contiguous run of a C-contiguous array. With `whole_last_axis`, a block
    never splits the last axis (cce* rows stay whole).
    """
    ndim = len(shape)
    if math.prod(shape) <= block or ndim == 0 or (whole_last_axis and ndim == 1):
        return [...]  # x[...] is a view even of a 0-d array (x[()] would be a scalar)
    inner = shape[-1] if whole_last_axis else 1
    split = ndim - 2 if whole_last_axis else ndim - 1
    while split > 0 and inner * shape[split] <= block:
        inner *= shape[split]
        split -= 1
    step = max(1, block // inner)
    outer = itertools.product(*(range(d) for d in shape[:split]))
    return [
        (*o, slice(s, min(s + step, shape[split])))
        for o in outer
        for s in range(0, shape[split], step)
    ]


def run_blocks(num_blocks: int, work) -> list:
    """Run `work(i, scratch)` for every block i; results come back in block order.

    `scratch` is a per-thread `Scratch`. Which thread runs which block does not matter: each
    result is stored at its block's index. The caller holds np.errstate(all="ignore").
    """
    if num_blocks == 1:  # a small call: this thread, no closures (np.errstate is the caller's)
        return [work(0, _thread_scratch())]
    results: list = [None] * num_blocks
    workers = min(_pool.cpu_threads(), num_blocks)
    counter = itertools.count()

    def worker():
        scratch = _thread_scratch()
        with np.errstate(all="ignore"):  # inf/NaN are results here, not warnings
            for i in iter(counter.__next__, None):
                if i >= num_blocks:
                    break
                results[i] = work(i, scratch)

    # the calling thread works too: one thread fewer to wake (a wake-up costs tens of
    # microseconds on a VM, which a 256 x 1000 call notices), and its caches are warm
    helpers = [_executor(workers - 1).submit(worker) for _ in range(workers - 1)]
    try:
        worker()
    finally:
        for f in helpers:
            f.result()
    return results


_local = threading.local()


def _thread_scratch() -> Scratch:
    """This thread's scratch buffers, kept from call to call (a call never keeps a reference
    to them after it returns: results are always fresh arrays)."""
    scratch = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = Scratch()
    return scratch


class Scratch:
    """Block-sized work buffers of one thread, reused from block to block."""

    def __init__(self):
        self._bufs: dict[tuple[str, np.dtype], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        size = math.prod(shape)
        if size > ROW_BLOCK:  # one huge row's buffers: not kept after the call
            return np.empty(shape, dtype)
        key = (name, np.dtype(dtype))
        buf = self._bufs.get(key)
        if buf is None or buf.size < size:
            buf = self._bufs[key] = np.empty(max(size, 1), dtype)
        return buf[:size].reshape(shape)

    def load(self, name: str, x: np.ndarray, dtype) -> np.ndarray:
        """`x` itself if it already has `dtype` and is contiguous, else a copy in scratch."""
        if x.dtype == dtype and x.flags.c_contiguous:
            return x
        out = self.get(name, x.shape, dtype)
        np.copyto(out, x, casting="unsafe")
        return out


def _compute_dtype(dtype) -> type:
    return _F64 if dtype == _F64 else np.float32


def _min_max(x: np.ndarray) -> tuple[float, float, bool]:
    """Smallest and largest value, looking past NaN (NaN propagates, it is not out of
    range), and whether a NaN was seen."""
    if x.size == 0:
        return (math.inf, -math.inf, False)
    lo = float(np.minimum.reduce(x, axis=None))
    hi = float(np.maximum.reduce(x, axis=None))
    if math.isnan(lo) or math.isnan(hi):  # rare: look again, ignoring NaN
        return (float(np.fmin.reduce(x, axis=None)), float(np.fmax.reduce(x, axis=None)), True)
    return (lo, hi, False)


def _merge_ranges(ranges) -> tuple[float, float]:
    lo = min((r[0] for r in ranges if not math.isnan(r[0])), default=math.inf)
    hi = max((r[1] for r in ranges if not math.isnan(r[1])), default=-math.inf)
    return lo, hi


def _weight_total(w: np.ndarray, shape, cdt) -> float:
    """Σ of `w` broadcast to `shape`, without materialising the broadcast, of the weights as
    the per-element products use them (in the compute dtype), so that numerator and
    denominator of the mean agree."""
    padded = (1,) * (len(shape) - w.ndim) + tuple(w.shape)
    repeats = math.prod(s for s, ws in zip(shape, padded) if ws == 1)
    flat = w.reshape(-1)
    step = 1 << 20  # cast in slices: no full-size temporary
    total = math.fsum(
        float(np.add.reduce(flat[i : i + step].astype(cdt), dtype=_F64))
        for i in range(0, flat.size, step)
    )
    return total * repeats


def _for_mean(w: np.ndarray, call) -> np.ndarray:
    """Weights rescaled by their maximum when they would under- or overflow in float32.

    The mean Σ w l / Σ w does not change, but w l stays representable (weights of 1e-200
    would otherwise round to 0 and turn the mean into 0 / 1e-200)."""
    if call.reduction != "mean" or call.parts or w.size == 0:
        return w  # partial states keep the weights' own scale, so that they add up
    top = float(np.max(w))
    if math.isfinite(top) and top > 0 and not 1e-20 <= top <= 1e20:
        return w.astype(_F64) / top  # in float64: float32 weights keep their precision
    return w


def _scaled_class_weights(cw: np.ndarray) -> tuple[np.ndarray, float]:
    """(class weights / scale, scale): their largest magnitude where it lies outside [1e-30,
    1e30], else 1 (as the CUDA backend), so that no class weight over- or underflows in
    float32 (weights in range are left alone: a small one is not pushed below float32's range).
    A mean over class indices divides the scale out; elsewhere the rows' weights take it back in
    float64."""
    top = float(np.max(np.abs(cw))) if cw.size else 0.0  # abs: negative ones (validate=False)
    if math.isfinite(top) and top > 0 and not 1e-30 <= top <= 1e30:
        return cw.astype(_F64) / top, top
    return cw, 1.0


def _check_weights(w, name, validate):
    """Weights as given (before any rescaling or cast): finite and non-negative."""
    if validate and w is not None and w.size:
        lo, hi = float(np.min(w)), float(np.max(w))
        if not _call.weights_ok(lo, hi):
            _call.raise_bad_weights(name, lo, hi)


def _finish(call, total: float, denom: float, grad, per_sample):
    """Package the value (0-d array or per-sample array) and gradient in pred's dtype."""
    dtype = call.pred.dtype
    value = None
    if call.parts:
        value = np.array([total, denom], dtype=_F64)
    elif call.want_value:
        if call.reduction == "none":
            value = per_sample
        elif call.reduction == "sum":
            value = np.asarray(total, dtype=dtype)
        else:
            value = np.asarray(np.divide(_F64(total), _F64(denom)), dtype=dtype)
    return value, grad


def _grad_scale(call, denom: float) -> float:
    """The 1/n of the mean, which every gradient carries; zeros when nothing was counted."""
    if call.reduction != "mean":
        return 1.0
    return 1.0 / denom if denom > 0 else 0.0


def compute(call: _call.Call):
    with np.errstate(all="ignore"):
        if call.categorical:
            return _categorical(call)
        return _elementwise(call)


def _rule_range(rule, x) -> tuple[float, float, bool]:
    """What `_check_rule` needs of one block: its range, or for SIGN one offending value."""
    if rule != _call.SIGN:
        return _min_max(x)
    bad = (x != 1) & (x != -1)
    if bad.any():
        values = x[bad].astype(_F64)
        values = values[~np.isnan(values)]  # NaN passes: it propagates
        if values.size:
            return (float(values[0]), float(values[0]), True)
    return None


def _check_rule(call, name, rule, ranges):
    if rule == _call.SIGN:
        for r in ranges:
            if r is not None:
                _call.raise_domain(call, name, rule, r[0], r[1])
        return
    lo, hi = _merge_ranges(ranges)
    if lo < 0 or (rule == _call.UNIT and hi > 1):  # NaN compares False: it propagates
        _call.raise_domain(call, name, rule, lo, hi)


# ---------------------------------------------------------------------------------------------
# mse, bce, bce_with_logits: one loss per element


def _elementwise(call):
    p, y = call.pred, call.target
    shape = p.shape
    n = p.size
    cdt = _compute_dtype(p.dtype)
    w = call.sample_weight
    pw = call.pos_weight
    if w is not None:
        w = np.asarray(w)
        _check_weights(w, "sample_weight", call.validate)
        w = _for_mean(w, call)
    if pw is not None:
        pw = np.asarray(pw)
        _check_weights(pw, "pos_weight", call.validate)

    denom = float(n)
    if w is not None:
        wsum = _weight_total(w, shape, cdt)
        denom = wsum
    gscale = _grad_scale(call, denom)

    # Fortran-ordered data: work on transposed views so that blocks are contiguous runs.
    flip = p.ndim > 1 and p.flags.f_contiguous and not p.flags.c_contiguous
    order = "F" if flip else "C"
    grad = _pool.empty(shape, p.dtype, order=order) if call.want_grad else None
    per_elem = (
        _pool.empty(shape, p.dtype, order=order)
        if call.want_value and call.reduction == "none"
        else None
    )

    def view(x, broadcast=True):
        if x is None:
            return None
        if broadcast:  # read-only views: inputs are never written
            if type(x) is not np.ndarray or x.shape != shape:  # (NumPy scalars too)
                x = np.broadcast_to(x, shape)
            else:
                x = x.view()  # (broadcast_to costs microseconds a small call notices)
                x.flags.writeable = False
        return x.T if flip else x

    P, Y, W, PW = (view(x) for x in (p, y, w, pw))
    G, L = (view(x, broadcast=False) for x in (grad, per_elem))
    index = blocks(P.shape, BLOCK if n > ONE_BLOCK else ONE_BLOCK)
    kernel = _ELEMENTWISE[call.loss]
    want_sum = call.want_value and call.reduction != "none"
    consts = _Consts(call, cdt, gscale, want_sum)
    pred_rule = call.pred_rule if call.validate else None
    target_rule = call.target_rule if call.validate else None

    if n == 0:
        results = []
    else:

        def work(i, scratch):
            ix = index[i]
            pb = scratch.load("p", P[ix], cdt)
            yb = scratch.load("y", Y[ix], cdt)
            # domain checks on the values as stored (pb is exact: float16 widens exactly)
            pr = _rule_range(pred_rule, pb) if pred_rule else None
            tr = _rule_range(target_rule, Y[ix]) if target_rule else None
            wb = None if W is None else scratch.load("w", W[ix], cdt)
            pwb = None if PW is None else scratch.load("pw", PW[ix], cdt)
            gb = None
            if G is not None:
                gb = G[ix] if G.dtype == cdt else scratch.get("g", pb.shape, cdt)
            lb = scratch.get("l", pb.shape, cdt) if (want_sum or L is not None) else None
            total = kernel(pb, yb, wb, pwb, gb, lb, scratch, consts)
            if G is not None and gb is not G[ix]:
                np.copyto(G[ix], gb, casting="unsafe")
            if L is not None:
                np.copyto(L[ix], lb, casting="unsafe")
            return total, pr, tr

        results = run_blocks(len(index), work)

    if results:
        if pred_rule:
            _check_rule(call, "pred", pred_rule, [r[1] for r in results])
        if target_rule:
            _check_rule(call, "target", target_rule, [r[2] for r in results])
    total = math.fsum(r[0] for r in results) if want_sum else 0.0
    return _finish(call, total, denom, grad, per_elem)


class _Consts:
    """Scalars a block kernel needs, in the compute dtype; for cce*, the class count K and
    the class weights (cw, and their sum)."""

    def __init__(self, call, cdt, gscale, want_sum, K=0, cw=None, w_scale=1.0):
        self.K = K
        # a factor of every row's weight that class weights were divided by (see
        # _scaled_class_weights), taken back on the losses' float64 sums (the gradient's in
        # _categorical)
        self.w_scale = w_scale
        self.cw = cw
        self.cw_sum = float(K) if cw is None else float(np.sum(cw, dtype=_F64))
        self.ignore_index = call.ignore_index
        self.validate = call.validate
        self.want_sum = want_sum
        self.gscale = cdt(gscale)
        self.two_gscale = cdt(2 * gscale)
        self.smooth = call.label_smoothing
        self.opt = call.options  # the loss's own options, by name
        # the loss's scalar parameters as the kernels get them
        self.params = _params(call.kernel_params, cdt)
        if call.eps is not None:
            # the bounds as the kernels get them: 1 - eps in float64, then rounded once
            lo, hi = call.kernel_params[:2]
            self.lo, self.hi = cdt(lo), cdt(hi)
        self.cdt = cdt


_LARGEST = {np.float32: float(np.finfo(np.float32).max), _F64: float(np.finfo(_F64).max)}


@functools.lru_cache(maxsize=256)
def _params(values, cdt) -> tuple:
    """`_param` of each value (remembered: a training loop repeats one option set)."""
    return tuple(_param(v, cdt) for v in values)


def _param(value, cdt):
    """A loss's scalar parameter in the compute dtype as the kernels take it (gl_param): a
    value beyond the dtype's range becomes its largest finite value, never inf."""
    top = _LARGEST[cdt]
    return cdt(min(max(float(value), -top), top)) if not math.isnan(value) else cdt(value)


def _sum_f64(x) -> float:
    return float(np.add.reduce(x, axis=None, dtype=_F64))


# Each elementwise block writes the unweighted loss into L and dl/dp into G; _weigh applies
# the weights and the mean's 1/D.


def _weigh(G, L, W, k, scaled=False) -> float:
    """Weights on the block's losses (and their float64 sum when wanted) and on dl/dp, with
    the mean's 1/D unless the block already `scaled` it in."""
    total = 0.0
    if L is not None:
        if W is not None:
            np.multiply(L, W, out=L)
        if k.want_sum:
            total = _sum_f64(L)
    if G is not None:
        if not scaled:
            np.multiply(G, k.gscale, out=G)
        if W is not None:
            np.multiply(G, W, out=G)
    return total


def _diff(P, Y, s, k, name="d"):
    d = s.get(name, P.shape, k.cdt)
    np.subtract(P, Y, out=d)
    return d


def _mse_block(P, Y, W, PW, G, L, s, k):
    # l = w (p - y)^2 ;  g = 2 w (p - y) / D
    d = G if G is not None else s.get("d", P.shape, k.cdt)
    np.subtract(P, Y, out=d)
    if L is not None:
        np.multiply(d, d, out=L)
    if G is not None:
        np.multiply(d, k.two_gscale, out=G)  # 2 and the mean's 1/D in one product
    return _weigh(G, L, W, k, scaled=True)


def _bce_block(P, Y, W, PW, G, L, s, k):
    # p' = clip(p, eps, 1 - eps);  l = -w [y log p' + (1 - y) log(1 - p')]
    # g = w (p' - y) / (p' (1 - p')) / D, the seed's -y/p + (1-y)/(1-p) over one denominator
    pc = s.get("pc", P.shape, k.cdt)
    np.clip(P, k.lo, k.hi, out=pc)
    if L is not None:
        lq = s.get("lq", P.shape, k.cdt)
        np.negative(pc, out=lq)
        np.log1p(lq, out=lq)  # log(1 - p') without losing small p'
        np.log(pc, out=L)
        np.multiply(L, Y, out=L)
        om = s.get("om", P.shape, k.cdt)
        np.subtract(1, Y, out=om)
        np.multiply(lq, om, out=lq)
        np.add(L, lq, out=L)  # y log p' + (1-y) log(1-p'): exact when y is 0 or 1
        np.negative(L, out=L)
    if G is not None:
        den = s.get("den", P.shape, k.cdt)
        np.subtract(1, pc, out=den)
        np.multiply(den, pc, out=den)
        np.subtract(pc, Y, out=G)
        np.divide(G, den, out=G)
    return _weigh(G, L, W, k)


def _bce_logits_block(Z, Y, W, PW, G, L, s, k):
    # y' = y (1 - ls) + ls/2;  l = w [(1 - y') softplus(z) + pos_weight y' softplus(-z)]
    # g = w [(1 - y') sigmoid(z) - pos_weight y' sigmoid(-z)] / D   (= sigmoid(z) - y' unweighted)
    # Each term is non-negative, so nothing cancels: exact for every finite z.
    if k.smooth:
        ys = s.get("ys", Z.shape, k.cdt)
        np.multiply(Y, k.cdt(1 - k.smooth), out=ys)
        np.add(ys, k.cdt(k.smooth / 2), out=ys)
        Y = ys
    e = s.get("e", Z.shape, k.cdt)
    np.abs(Z, out=e)
    np.negative(e, out=e)
    np.exp(e, out=e)  # exp(-|z|) never overflows
    om = s.get("om", Z.shape, k.cdt)
    np.subtract(1, Y, out=om)
    py = Y
    if PW is not None:
        py = s.get("py", Z.shape, k.cdt)
        np.multiply(Y, PW, out=py)
    _, gamma, a_pos, a_neg = k.params  # focal: gamma, alpha_t = a_pos y + a_neg (1 - y)
    focal = bool(gamma) or a_pos != 1 or a_neg != 1
    ce_only = focal and L is None
    if ce_only:  # the focal gradient needs the cross-entropy itself
        L = s.get("ce", Z.shape, k.cdt)
    if L is not None:
        lg = s.get("lg", Z.shape, k.cdt)
        np.log1p(e, out=lg)
        spn = s.get("spn", Z.shape, k.cdt)
        np.maximum(Z, 0, out=L)
        np.subtract(L, Z, out=spn)  # max(-z, 0), exactly
        np.add(spn, lg, out=spn)  # softplus(-z)
        np.add(L, lg, out=L)  # softplus(z)
        np.multiply(L, om, out=L)
        np.multiply(spn, py, out=spn)
        np.add(L, spn, out=L)
    if G is not None:
        # sigmoid(z) = a / (1 + e), sigmoid(-z) = b / (1 + e) with e = exp(-|z|) and (a, b)
        # = (1, e) for z >= 0, (e, 1) for z < 0: picked exactly by max(e, 1 or 0).
        r = s.get("r", Z.shape, k.cdt)
        np.add(e, 1, out=r)
        np.divide(k.gscale, r, out=r)  # the mean's 1/D folded in
        pos = s.get("pos", Z.shape, k.cdt)
        np.greater_equal(Z, 0, out=pos)  # 1.0 where z >= 0
        a = s.get("a", Z.shape, k.cdt)
        np.maximum(e, pos, out=a)
        np.subtract(1, pos, out=pos)
        np.maximum(e, pos, out=pos)  # b
        np.multiply(a, om, out=G)
        np.multiply(pos, py, out=pos)
        np.subtract(G, pos, out=G)
        np.multiply(G, r, out=G)
    if focal:
        _focal_binary(Z, Y, e, L, G, s, k, gamma, a_pos, a_neg)
        if ce_only:
            L = None
    return _weigh(G, L, W, k, scaled=True)


def _focal_binary(Z, Y, e, L, G, s, k, gamma, a_pos, a_neg):
    """The sigmoid focal loss from the cross-entropy L and its scaled derivative G, in place:
    l = alpha_t M CE, g = alpha_t (M CE' + (gamma M) (1 - 2y) R CE), with M = (1 - p_t)^gamma,
    alpha_t = a_pos y + a_neg (1 - y) (alpha y + (1 - alpha)(1 - y); 1 without alpha),
    (1 + e)(1 - p_t) = den = a (1 - y) + b y ((a, b) = (1, e) for z >= 0, (e, 1) below) and
    R = p (1 - p) / (1 - p_t) = e / ((1 + e) den), which lies in [0, 1]. M and gamma M come
    from the log domain (gamma M = exp(gamma log(1 - p_t) + log gamma): a huge gamma never
    meets M = 0 as inf * 0), so both are finite for every finite z and gamma >= 0."""
    A = s.get("M", Z.shape, k.cdt)  # alpha_t
    if a_pos == 1 and a_neg == 1:
        A.fill(1)
    else:  # two products: (2 alpha - 1) y + (1 - alpha) would cancel for a tiny alpha
        neg = s.get("fneg", Z.shape, k.cdt)
        np.subtract(1, Y, out=neg)
        np.multiply(neg, a_neg, out=neg)
        np.multiply(Y, a_pos, out=A)
        np.add(A, neg, out=A)
    if gamma:
        pos = s.get("fpos", Z.shape, k.cdt)
        np.greater_equal(Z, 0, out=pos)
        a = s.get("fa", Z.shape, k.cdt)
        np.maximum(e, pos, out=a)
        np.subtract(1, pos, out=pos)
        np.maximum(e, pos, out=pos)  # b
        den = s.get("fden", Z.shape, k.cdt)
        np.subtract(1, Y, out=den)
        np.multiply(den, a, out=den)
        np.multiply(pos, Y, out=pos)
        np.add(den, pos, out=den)
        lm = s.get("flm", Z.shape, k.cdt)  # log M
        with np.errstate(divide="ignore"):
            np.log(den, out=lm)
        np.log1p(e, out=a)
        np.subtract(lm, a, out=lm)
        np.multiply(lm, gamma, out=lm)
        if G is not None:
            # R = e / ((1 + e) max(den, tiny)): den = 0 only where M = 0 as well
            np.maximum(den, np.finfo(k.cdt).tiny, out=den)
            np.add(e, 1, out=a)
            np.multiply(den, a, out=den)
            R = s.get("fR", Z.shape, k.cdt)
            np.divide(e, den, out=R)
            np.multiply(Y, k.cdt(2), out=a)
            np.subtract(1, a, out=a)  # 1 - 2y
            np.multiply(L, a, out=den)  # CE (1 - 2y)
            np.add(lm, np.log(gamma), out=a)
            np.exp(a, out=a)  # gamma M
            huge = ~np.isfinite(a)  # gamma near the dtype's largest value: R from the logs
            if huge.any():
                np.copyto(a, np.exp(np.log(gamma) + lm + np.log(R)), where=huge)
                np.copyto(R, 1, where=huge)
            np.multiply(R, a, out=a)  # gamma M R
            np.multiply(den, a, out=den)
            np.multiply(den, k.gscale, out=den)
        np.exp(lm, out=lm)  # M
        if G is not None:
            np.multiply(G, lm, out=G)
            np.add(G, den, out=G)
        np.multiply(L, lm, out=L)
    if G is not None:
        np.multiply(G, A, out=G)
    np.multiply(L, A, out=L)


# ---------------------------------------------------------------------------------------------
# the elementwise catalogue


def _mae_block(P, Y, W, PW, G, L, s, k):
    # l = |d| ;  g = sign(d), 0 at d = 0
    d = _diff(P, Y, s, k)
    if L is not None:
        np.abs(d, out=L)
    if G is not None:
        np.sign(d, out=G)
    return _weigh(G, L, W, k)


def _huber_terms(d, limit, G, L, s, k, over_limit=False):
    # m = min(|d|, limit):  L = m (|d| - m/2)  (= d^2/2 inside, limit (|d| - limit/2) outside)
    # G = clip(d, -limit, limit); over_limit: both divided by limit, L as (m / limit)(|d| - m/2)
    # (m / limit is exactly 1 outside: a subnormal limit is not multiplied in and divided back)
    if L is not None:
        a = s.get("a", d.shape, k.cdt)
        np.abs(d, out=a)
        m = s.get("m", d.shape, k.cdt)
        np.minimum(a, limit, out=m)  # NaN stays NaN
        np.multiply(m, k.cdt(0.5), out=L)
        np.subtract(a, L, out=a)
        if over_limit:
            np.divide(m, limit, out=m)
        np.multiply(m, a, out=L)
    if G is not None:
        np.clip(d, -limit, limit, out=G)
        if over_limit:
            np.divide(G, limit, out=G)


def _huber_block(P, Y, W, PW, G, L, s, k):
    _huber_terms(_diff(P, Y, s, k), _param(k.opt["delta"], k.cdt), G, L, s, k)
    return _weigh(G, L, W, k)


def _smooth_l1_block(P, Y, W, PW, G, L, s, k):
    # huber with delta = beta, over beta (= d^2 / 2 beta inside, |d| - beta/2 outside);
    # beta = 0: l = |d|, g = sign(d)
    beta = _param(k.opt["beta"], k.cdt)
    if beta == 0:
        return _mae_block(P, Y, W, PW, G, L, s, k)
    _huber_terms(_diff(P, Y, s, k), beta, G, L, s, k, over_limit=True)
    return _weigh(G, L, W, k)


def _log_cosh_block(P, Y, W, PW, G, L, s, k):
    # t = tanh(d) (the gradient):  l = -log1p(-t^2) / 2 for |d| <= 1 (no cancellation near 0),
    # l = |d| - log1p(|t|) beyond (no overflow; log cosh d = |d| - log(1 + tanh |d|)).
    # One log1p on an argument picked by 0/1 factors: masked NumPy operations are many times
    # slower than arithmetic.
    d = _diff(P, Y, s, k)
    t = G if G is not None else s.get("t", P.shape, k.cdt)
    np.tanh(d, out=t)
    if L is not None:
        a = s.get("a", P.shape, k.cdt)
        np.abs(d, out=a)
        small = s.get("small", P.shape, k.cdt)
        np.less_equal(a, 1, out=small)  # 1.0 where |d| <= 1 (and NaN: its t is NaN)
        at = s.get("at", P.shape, k.cdt)
        np.abs(t, out=at)
        arg = s.get("arg", P.shape, k.cdt)
        np.multiply(at, small, out=arg)  # |t| where small, else 0
        np.subtract(1, small, out=L)  # 1.0 where big
        np.multiply(a, L, out=a)  # |d| where big, else 0
        np.subtract(L, arg, out=arg)
        np.multiply(arg, at, out=arg)  # |t| where big, -t^2 where small: exact either way
        np.log1p(arg, out=arg)
        np.multiply(small, k.cdt(-0.5), out=small)
        np.add(small, 1, out=small)  # 1 where big, 1/2 where small
        np.multiply(arg, small, out=L)
        np.subtract(a, L, out=L)
    return _weigh(G, L, W, k)


def _poisson_nll_block(P, Y, W, PW, G, L, s, k):
    # log_input: l = exp(p) - y p, g = exp(p) - y;  else l = p - y log(p + eps), g = 1 - y/(p + eps)
    # full: l += y log y - y + log(2 pi y)/2 where y > 1 (Stirling; no gradient)
    e = s.get("e", P.shape, k.cdt)
    t = s.get("t", P.shape, k.cdt)
    if k.opt["log_input"]:
        np.exp(P, out=e)
        if G is not None:
            np.subtract(e, Y, out=G)
        if L is not None:
            np.multiply(Y, P, out=t)
            np.subtract(e, t, out=L)
    else:
        np.add(P, _param(k.opt["eps"], k.cdt), out=e)
        if G is not None:
            np.divide(Y, e, out=G)
            np.subtract(1, G, out=G)
        if L is not None:
            np.log(e, out=t)
            np.multiply(Y, t, out=t)
            np.subtract(P, t, out=L)
    if L is not None and k.opt["full"]:
        big = s.get("big", P.shape, np.bool_)
        np.greater(Y, 1, out=big)
        if big.any():
            np.log(Y, out=t)
            np.multiply(Y, t, out=t)
            np.subtract(t, Y, out=t)
            np.multiply(Y, k.cdt(2 * math.pi), out=e)
            np.log(e, out=e)
            np.multiply(e, k.cdt(0.5), out=e)
            np.add(t, e, out=t)
            np.add(L, t, out=L, where=big)
    return _weigh(G, L, W, k)


def _hinge_block(P, Y, W, PW, G, L, s, k):
    # m = 1 - y p (y = +-1):  l = max(0, m) ;  g = -y sign(max(0, m)): -y where m > 0, 0 where
    # m <= 0, NaN for NaN
    h = L if L is not None else s.get("h", P.shape, k.cdt)
    np.multiply(Y, P, out=h)
    np.subtract(1, h, out=h)
    np.maximum(h, 0, out=h)  # NaN stays NaN
    if G is not None:
        np.sign(h, out=G)
        np.multiply(G, Y, out=G)
        np.subtract(0, G, out=G)  # 0 - 0 = +0: no signed zeros where nothing pulls
        if np.isnan(G).any():  # rare: 0 * inf for an infinite label (validate=False)
            np.copyto(G, np.where(h > 0, -Y, np.where(np.isnan(h), h, 0)))
    return _weigh(G, L, W, k)


def _squared_hinge_block(P, Y, W, PW, G, L, s, k):
    # h = max(0, 1 - y p):  l = h^2 ;  g = -2 y h
    h = s.get("m", P.shape, k.cdt)
    np.multiply(Y, P, out=h)
    np.subtract(1, h, out=h)
    np.maximum(h, 0, out=h)
    if L is not None:
        np.multiply(h, h, out=L)
    if G is not None:
        np.multiply(Y, k.cdt(2), out=G)
        np.multiply(G, h, out=G)
        np.subtract(0, G, out=G)  # +0 where h = 0
    return _weigh(G, L, W, k)


def _pinball_block(P, Y, W, PW, G, L, s, k):
    # r = y - p:  l = max(q r, (q - 1) r) ;  g = -q where r > 0, 1 - q where r < 0, 0 at r = 0
    q = _param(k.opt["quantile"], k.cdt)
    r = _diff(Y, P, s, k, "r")
    if L is not None:
        below = s.get("below", P.shape, k.cdt)
        np.multiply(r, q - k.cdt(1), out=below)
        np.multiply(r, q, out=L)
        np.maximum(L, below, out=L)
    if G is not None:
        # (1 - q) [r < 0] - q [r > 0] + 0 sign(r): exact, and NaN for NaN
        side = s.get("side", P.shape, k.cdt)
        np.less(r, 0, out=side)
        np.multiply(side, k.cdt(1) - q, out=G)
        np.greater(r, 0, out=side)
        np.multiply(side, q, out=side)
        np.subtract(G, side, out=G)
        np.sign(r, out=side)
        np.multiply(side, 0, out=side)
        np.add(G, side, out=G)
    return _weigh(G, L, W, k)


_ELEMENTWISE = {
    "mse": _mse_block, "bce": _bce_block, "bce_with_logits": _bce_logits_block,
    "mae": _mae_block, "huber": _huber_block, "smooth_l1": _smooth_l1_block,
    "log_cosh": _log_cosh_block, "poisson_nll": _poisson_nll_block, "hinge": _hinge_block,
    "squared_hinge": _squared_hinge_block, "pinball": _pinball_block,
}


# ---------------------------------------------------------------------------------------------
# cce, cce_with_logits: one loss per sample, classes along `axis`


def _categorical(call):
    p, y = call.pred, call.target
    K = p.shape[call.axis]
    cdt = _compute_dtype(p.dtype)
    last = call.axis == p.ndim - 1  # the usual layout: no moveaxis views to make
    P = p if last else np.moveaxis(p, call.axis, -1)
    sample_shape = P.shape[:-1]
    N = math.prod(sample_shape)
    T = y if call.labels or last else np.moveaxis(y, call.axis, -1)
    if call.labels and T.dtype.kind == "u":  # class indices are int64 inside
        if T.dtype.itemsize == 8 and T.size:
            _call.check_labels_fit_int64(int(T.max()))
        T = T.astype(np.int64)

    cw = None
    w_scale = 1.0  # what the rows' weights take back of the class weights' rescaling
    if call.class_weight is not None:
        cw = np.asarray(call.class_weight)
        _check_weights(cw, "class_weight", call.validate)
        cw, w_scale = _scaled_class_weights(cw)
        if call.labels and call.reduction == "mean" and not call.parts:  # it cancels
            w_scale = 1.0
        cw = cw.astype(cdt)
    sw = call.sample_weight
    if sw is not None:
        sw = np.asarray(sw)
        _check_weights(sw, "sample_weight", call.validate)
        sw = _for_mean(sw, call)
        SW = np.broadcast_to(sw, sample_shape)
    else:
        SW = None

    if call.labels:  # partial states keep the class weights' own scale
        denom = _label_prepass(call, T, K, cw, SW) * w_scale
    elif sw is not None:
        denom = _weight_total(sw, sample_shape, cdt)
    else:
        denom = float(N)
    gscale = _grad_scale(call, denom)
    # the class weights' scale on the gradient: inside 1/D where the mean divides it out (a
    # partial state's denominator carries it), else multiplied in afterwards, in float64
    grad_post = 1.0
    if call.labels and call.reduction == "mean":
        gscale *= w_scale
    else:
        grad_post = w_scale

    grad = None
    if call.want_grad:
        grad = call.grad_out if call.grad_out is not None else _pool.empty(p.shape, p.dtype)
    # the gradient written over pred itself (linear cross-entropy's chunk of logits): each
    # block is copied before it is read, since the block functions write G as they go
    in_place = grad is not None and np.shares_memory(grad, p)
    softcap = call.options.get("softcap")
    G = grad if grad is None or last else np.moveaxis(grad, call.axis, -1)
    per_sample = (
        _pool.empty(sample_shape, p.dtype)
        if call.want_value and call.reduction == "none"
        else None
    )
    want_sum = call.want_value and call.reduction != "none"
    consts = _Consts(call, cdt, gscale, want_sum, K=K, cw=cw, w_scale=w_scale)
    kernel = _CATEGORICAL[(call.loss, call.labels)]
    index = blocks(P.shape, ROW_BLOCK, whole_last_axis=True)

    if N == 0:
        results = []
    elif K == 0:  # no classes: every sum over k is empty, and any class index is invalid
        per = np.zeros(sample_shape)
        if call.labels:
            counted = T != call.ignore_index if call.ignore_index is not None else True
            per = np.where(counted, np.nan, 0.0)
        if per_sample is not None:
            per_sample[...] = per
        results = [(float(np.sum(per)), _NO_RANGE, _NO_RANGE)]
    else:

        def work(i, scratch):
            ix = index[i]
            if in_place or softcap is not None:  # a copy of its own, to cap or keep
                pb = scratch.get("p", P[ix].shape, cdt)
                np.copyto(pb, P[ix], casting="unsafe")
            else:
                pb = scratch.load("p", P[ix], cdt)
            rows = pb.shape[:-1]
            R = math.prod(rows)
            pb = pb.reshape(R, K)
            sech2 = None
            if softcap is not None:
                sech2 = _soft_cap(pb, softcap, scratch, want_grad=G is not None)
            tb = T[ix]
            tb = tb.reshape(R) if call.labels else scratch.load("t", tb, cdt).reshape(R, K)
            swb = None if SW is None else scratch.load("sw", SW[ix], cdt).reshape(R)
            gb = Gb = None
            if G is not None:
                Gb = G[ix]
                direct = Gb.dtype == cdt and Gb.flags.c_contiguous
                gb = Gb.reshape(R, K) if direct else scratch.get("g", (R, K), cdt)
            lb = None
            if want_sum or per_sample is not None:
                lb = scratch.get("l", (R,), cdt)
            result = kernel(pb, tb, swb, gb, lb, scratch, consts)
            if sech2 is not None:  # the chain rule through the cap
                np.multiply(gb, sech2, out=gb)
            if gb is not None and grad_post != 1:  # rare: extreme class weights
                gb[...] = gb.astype(_F64) * grad_post
            if call.validate and not call.labels and T.dtype != cdt:
                result = (*result[:2], _min_max(T[ix]))  # the targets as stored, not as cast
            if G is not None and not direct:
                np.copyto(Gb, gb.reshape(Gb.shape), casting="unsafe")
            if per_sample is not None:
                np.copyto(per_sample[ix], lb.reshape(rows))
            return result

        results = run_blocks(len(index), work)

    if call.validate and results:
        if call.pred_rule:
            _check_rule(call, "pred", call.pred_rule, [r[1] for r in results])
        if call.target_rule:
            _check_rule(call, "target", call.target_rule, [r[2] for r in results])
    total = math.fsum(r[0] for r in results) if want_sum else 0.0
    return _finish(call, total, denom, grad, per_sample)


def _soft_cap(Z, c, s, want_grad):
    """Cap the logits in place, z <- c tanh(z / c) (Gemma 2's soft-capping), and return the
    cap's derivative sech^2(z / c) (None unless `want_grad`). Both from s = exp(-2|z / c|):
    tanh = sign (-expm1(-2|x|)) / (1 + s) and sech^2 = 4 s / (1 + s)^2 keep their digits where
    tanh is near 1 (1 - tanh^2 would cancel) and near 0. NaN stays NaN; +-inf gives +-c, 0."""
    cdt = Z.dtype.type
    c = _param(c, cdt)  # as the kernel takes it: beyond the dtype's range, its largest value
    X = Z  # the block's own copy: x = z / c, then the capped logits
    np.divide(X, c, out=X)
    A = s.get("cap_a", Z.shape, Z.dtype)
    np.abs(X, out=A)
    np.multiply(A, cdt(-2), out=A)
    S = s.get("cap_s", Z.shape, Z.dtype)
    np.exp(A, out=S)
    np.expm1(A, out=A)  # -(1 - s)
    sech2 = None
    if want_grad:
        sech2 = s.get("cap_sech2", Z.shape, Z.dtype)
        np.add(S, 1, out=sech2)
        np.square(sech2, out=sech2)
        np.divide(S, sech2, out=sech2)
        np.multiply(sech2, cdt(4), out=sech2)
    np.add(S, 1, out=S)
    np.divide(A, S, out=A)  # -tanh|x|
    np.negative(A, out=A)
    np.copysign(A, X, out=X)  # NaN stays NaN (|NaN| = NaN through every step)
    np.multiply(X, c, out=X)
    return sech2


def _label_prepass(call, labels, K, cw, SW) -> float:
    """Check the class indices and return the mean's denominator Σ_i sw_i cw[y_i]."""
    if call.ignore_index is None and cw is None and SW is None:  # the common call: a range
        if call.validate and labels.size:
            lo = int(np.minimum.reduce(labels, axis=None))  # (the ufuncs: .min() wraps them)
            hi = int(np.maximum.reduce(labels, axis=None))
            if lo < 0 or hi >= K:
                _call.raise_bad_labels(lo, hi, K, None)
        return float(labels.size) if call.reduction == "mean" or call.parts else 0.0
    counted = np.ones(labels.shape, bool)
    if call.ignore_index is not None:
        counted = labels != call.ignore_index
    if call.validate and labels.size:
        bad = ((labels < 0) | (labels >= K)) & counted
        if bad.any():
            kept = labels[counted]
            _call.raise_bad_labels(int(kept.min()), int(kept.max()), K, call.ignore_index)
    if call.reduction != "mean" and not call.parts:
        return 0.0
    w = counted.astype(_F64)
    if cw is not None:  # cw is already in the compute dtype
        w *= cw[np.clip(labels, 0, max(K - 1, 0))] if K else 0
    if SW is not None:  # the weights as the per-sample products use them
        w *= SW.astype(cw.dtype if cw is not None else _compute_dtype(call.pred.dtype))
    return float(np.sum(w, dtype=_F64))


def _row_weights(labels, swb, k):
    """Per-row label, class weight of that label, and sample weight with ignored rows at 0
    and invalid labels (possible with validate=False) at NaN."""
    K = k.K
    valid = (labels >= 0) & (labels < K)
    safe = np.where(valid, labels, 0)
    w = np.ones(labels.shape, k.cdt) if swb is None else swb.copy()
    if k.ignore_index is not None:
        w[labels == k.ignore_index] = 0
        valid |= labels == k.ignore_index
    w[~valid] = np.nan  # a bad label gives NaN, never an out-of-bounds read
    cwy = None if k.cw is None else k.cw[safe]
    return safe, cwy, w


def _flat(K, cols):
    """The flat positions of one column per row (cols[i] in row i) of a C-contiguous block
    with K columns."""
    return np.arange(0, cols.size * K, K) + cols


def _at(X, flat):
    """X's values at the flat positions of a C-contiguous block (one per row): np.take on
    the flat view is several times faster than X[rows, cols]."""
    return X.reshape(-1).take(flat)


def _put(X, flat, values):
    X.reshape(-1)[flat] = values


def _weigh_rows(L, w, k) -> float:
    """The sample weights on the rows' losses, and their float64 sum when one is wanted. A
    row of weight 0 adds 0 even where its loss is infinite (NaN stays NaN)."""
    zero_inf = None
    if not np.isfinite(np.add.reduce(L)):  # rare: an infinite (or NaN) loss
        zero_inf = np.isinf(L) & (w == 0)
    with np.errstate(invalid="ignore"):
        np.multiply(L, w, out=L)
    if zero_inf is not None:
        L[zero_inf] = 0
    return _scaled_total(L, k)


def _scaled_total(L, k) -> float:
    """The float64 sum of the rows' weighted losses when one is wanted, with the class
    weights' scale taken back (on L too, for reduction="none"), in float64."""
    total = _sum_f64(L) * k.w_scale if k.want_sum else 0.0
    if k.w_scale != 1:
        L[...] = L.astype(_F64) * k.w_scale
    return total


def _class_coefs(T, s, k):
    """The classes' coefficients for probability targets, c = cw (t (1 - ls) + ls / K): T
    itself when neither label smoothing nor class weights apply."""
    if not k.smooth and k.cw is None:
        return T
    C = s.get("C", T.shape, k.cdt)
    if k.smooth:
        np.multiply(T, k.cdt(1 - k.smooth), out=C)
        np.add(C, k.cdt(k.smooth / T.shape[1]), out=C)
        if k.cw is not None:
            np.multiply(C, k.cw, out=C)
    else:
        np.multiply(T, k.cw, out=C)
    return C


def _row_max(Z, starts=None):
    """(each row's maximum, its flat position): argmax and a gather, several times faster than
    np.maximum.reduce along short rows. argmax stops at a NaN, so a row with NaN gets NaN.
    `starts`: the rows' flat starts, if at hand."""
    cols = Z.argmax(axis=1)
    top = _flat(Z.shape[1], cols) if starts is None else starts + cols
    return _at(Z, top), top


def _rest(S, E, top):
    """Σ_k E_k of each row without the row maximum's own 1 (S = Z - max, E = exp(S), `top` the
    maximum's flat positions), in float64: log Σ exp(S) = log1p(rest) keeps the digits of a row
    dominated by its maximum (1 + 1e-22 would round to 1), as the kernel's (m, rest) does. NaN
    in a row stays NaN."""
    e_top = _at(E, top)
    _put(E, top, 0)
    # einsum's row sums: a sequential float64 sum, 2-4x faster than add.reduce along short
    # rows (float64 has the digits to spare for K float32 terms in [0, 1])
    rest = np.einsum("ij->i", E, dtype=_F64)
    _put(E, top, e_top)
    return np.where(np.isnan(e_top), e_top, rest)


def _cce_logits_block(Z, labels, swb, G, L, s, k):
    # log p = z - logsumexp(z);  l = (1 - ls) cw[y] (-log p_y) + ls/K Σ_k cw_k (-log p_k)
    # g_k = sw/D [ (1 - ls) cw[y] (softmax_k - [k = y]) + ls/K (softmax_k Σ cw - cw_k) ]
    # A NaN logit or an invalid label (NaN weight) makes the row's loss and gradient NaN.
    # z_loss: l gains z lse_full^2 cw[y]; g gains 2 z lse_full cw[y] softmax, which folds into
    # the softmax's coefficient c_sum
    gamma, zl, _ = k.params  # (the softcap is applied around the block)
    zl = float(zl)  # its terms are formed in float64 (2 zl may overflow the compute dtype)
    if gamma:
        return _cce_logits_focal_block(Z, labels, swb, G, L, s, k, labels=True)
    R, K = Z.shape
    if swb is None and k.ignore_index is None and k.validate:  # the common call: every label
        safe, w = labels, None  # was checked to be in range, every row weighs 1
        cwy = None if k.cw is None else k.cw[labels]
    else:
        safe, cwy, w = _row_weights(labels, swb, k)
    starts = np.arange(0, R * K, K)
    at = starts + safe  # each row's label, flat
    m, top = _row_max(Z, starts)
    S = s.get("S", (R, K), k.cdt)
    np.subtract(Z, m[:, None], out=S)  # max-shifted: exp never overflows
    E = G if G is not None else s.get("E", (R, K), k.cdt)
    np.exp(S, out=E)
    rest = _rest(S, E, top)
    se = 1 + rest
    lse = np.log1p(rest)
    ls = k.smooth
    cw_y = 1 if cwy is None else cwy  # the label's class weight
    c_true = (1 - ls) * cw_y
    unit_label = cwy is None and not ls  # c_true = 1: the common call skips its products
    s_y = _at(S, at)
    total = 0.0
    if L is not None:
        np.subtract(lse, s_y, out=L)  # -log p_y
        if unit_label:  # weight 1: nothing to multiply
            pass
        elif np.any(c_true == 0):  # rare: a label term with no weight adds 0, even at -inf
            np.copyto(L, np.where((c_true == 0) & ~np.isnan(L), 0, L * c_true))
        else:
            np.multiply(L, c_true, out=L)
        if ls:
            dot = S.sum(axis=1) if k.cw is None else S @ k.cw
            if k.cw is not None and np.isnan(dot).any():  # rare: 0 * -inf, a masked class
                dot = np.where(k.cw == 0, 0, S) @ k.cw  # of no weight adds 0 (as the kernel)
            L += (ls / K) * (k.cw_sum * lse - dot)
        if zl:
            full = m + lse
            L += zl * full * full * cw_y
        total = _scaled_total(L, k) if w is None else _weigh_rows(L, w, k)
    if G is not None:
        gw = k.gscale if w is None else w * k.gscale
        if unit_label and not zl:  # c_sum = c_label = 1: g = gw (p - [k = y]), where at the
            # label p - 1 = (expm1(z_y - m) - rest) / se in float64: no cancellation
            scale = gw / se
            np.multiply(E, scale.astype(k.cdt)[:, None], out=E)
            p_minus_1 = np.expm1(s_y.astype(_F64))
            p_minus_1 -= rest
            p_minus_1 *= scale
            _put(G, at, p_minus_1)
            return (total,)
        om_label = rest - np.expm1(s_y.astype(_F64))  # (1 - p_y) se, no cancellation
        if w is None:
            gw = np.full(R, gw, k.cdt)  # the per-row forms below broadcast it
        c_sum = c_true + ls / K * k.cw_sum if ls else c_true  # unsmoothed: no other cw
        if zl:
            c_sum = c_sum + 2 * zl * (m + lse) * cw_y
        e_label = _at(E, at).astype(_F64)
        np.multiply(E, (c_sum * gw / se).astype(k.cdt)[:, None], out=E)
        if ls:
            cw = 1 if k.cw is None else k.cw
            G -= (gw * (ls / K))[:, None] * cw
        # the label's column as p (c_sum - c) - c (1 - p), 1 - p = (rest - expm1(z_y - m)) / se
        # in float64: no cancellation when the label is predicted with confidence
        c_label = c_true + ls / K * cw_y if ls else c_true
        _put(G, at, gw * ((e_label / se) * (c_sum - c_label) - c_label * om_label / se))
    return (total,)


def _cce_logits_probs_block(Z, T, swb, G, L, s, k):
    # t' = t (1 - ls) + ls/K, c = cw t';  l = Σ_k c_k (logsumexp(z) - z_k)
    # g_k = sw/D (softmax_k Σ_j c_j - c_k); z_loss as for class indices (weight 1)
    gamma, zl, _ = k.params
    zl = float(zl)  # its terms are formed in float64 (2 zl may overflow the compute dtype)
    if gamma:
        return _cce_logits_focal_block(Z, T, swb, G, L, s, k, labels=False)
    R, K = Z.shape
    trange = _min_max(T) if k.validate else _NO_RANGE
    w = np.ones(R, k.cdt) if swb is None else swb
    m, top = _row_max(Z)
    S = s.get("S", (R, K), k.cdt)
    np.subtract(Z, m[:, None], out=S)
    E = G if G is not None else s.get("E", (R, K), k.cdt)
    np.exp(S, out=E)
    rest = _rest(S, E, top)
    se = 1 + rest
    lse = np.log1p(rest)
    C = _class_coefs(T, s, k)
    csum = np.add.reduce(C, axis=1)
    total = 0.0
    if L is not None:
        np.multiply(lse, csum, out=L)
        dot = np.einsum("ij,ij->i", C, S)
        if np.isnan(dot).any():  # rare: 0 * -inf, a masked logit that carries no weight, adds 0
            dot = np.einsum("ij,ij->i", C, np.where(C == 0, 0, S))
        L -= dot
        if zl:  # weight 1 per sample: the class weights' scale, which the rows' losses take
            full = m + lse  # back afterwards (extreme class weights), is not the z-term's
            L += zl * full * full / k.w_scale
        total = _weigh_rows(L, w, k)
    if G is not None:
        # p (c_sum - c) - c (1 - p) with 1 - p = (se - e) / se (rest at the row's maximum): no
        # cancellation near p = 1
        gw64 = w * _F64(k.gscale)
        gw = gw64.astype(k.cdt)[:, None]
        om = s.get("om", (R, K), k.cdt)
        np.subtract(se[:, None], E, out=om)
        _put(om, top, rest)
        np.multiply(om, (1 / se).astype(k.cdt)[:, None], out=om)
        np.multiply(om, C, out=om)
        np.multiply(E, (1 / se).astype(k.cdt)[:, None], out=E)
        zq = None
        if zl:  # the z-loss's 2 z lse softmax, weighted in float64 (a row of weight 0 adds 0)
            zq = s.get("zq", (R, K), k.cdt)
            np.multiply(E, (2 * zl * (m + lse) * gw64 / k.w_scale).astype(k.cdt)[:, None],
                        out=zq)
        np.multiply(E, np.subtract(csum[:, None], C, dtype=k.cdt), out=E)
        np.subtract(E, om, out=E)
        np.multiply(E, gw, out=E)
        if zq is not None:
            np.add(E, zq, out=E)
    return (total, _NO_RANGE, trange)


def _cce_logits_focal_block(Z, T, swb, G, L, s, k, labels):
    # cce_with_logits with focal_gamma (class indices or probabilities; z_loss too), from the
    # classes' coefficients c (as the plain blocks) and q = softmax(z):
    #   l = Σ_k c_k M_k (-log q_k), M_k = (1 - q_k)^gamma from the log domain;
    #   g_j = h_j - q_j Σ_k h_k, h_k = -c_k M_k (1 + gamma q_k (-log q_k) / (1 - q_k))
    #   with (-log q)/(1 - q) -> 1 as q -> 1 and q (-log q) -> 0 as q -> 0; 1 - q_k =
    #   (rest - expm1(z_k - m)) / se, rest = se - 1, as the kernel: no cancellation
    #   z_loss: l gains z lse^2 cw[y] (cw[y] = 1 for probabilities), g gains 2 z lse q cw[y]
    R, K = Z.shape
    gamma, zl, _ = k.params
    zl = float(zl)  # its terms are formed in float64 (2 zl may overflow the compute dtype)
    if labels:
        trange = _NO_RANGE
        safe, cwy, w = _row_weights(T, swb, k)
        zw = np.ones(R, k.cdt) if cwy is None else cwy
        C = s.get("C", (R, K), k.cdt)
        C[...] = 0 if not k.smooth else (k.smooth / K) * (1 if k.cw is None else k.cw)
        at = _flat(K, safe)
        _put(C, at, _at(C, at) + (1 - k.smooth) * zw)
    else:
        trange = _min_max(T) if k.validate else _NO_RANGE
        w = np.ones(R, k.cdt) if swb is None else swb
        zw = 1 / k.w_scale  # weight 1 once the rows take back the class weights' scale
        C = _class_coefs(T, s, k)
    m, top = _row_max(Z)
    S = s.get("S", (R, K), k.cdt)
    np.subtract(Z, m[:, None], out=S)
    q = s.get("q", (R, K), k.cdt)
    np.exp(S, out=q)
    rest = _rest(S, q, top)
    se = 1 + rest
    log_se = np.log1p(rest)
    inv = (1 / se).astype(k.cdt)[:, None]
    np.multiply(q, inv, out=q)
    omq = s.get("omq", (R, K), k.cdt)  # 1 - q
    np.expm1(S, out=omq)
    np.subtract(rest.astype(k.cdt)[:, None], omq, out=omq)
    np.multiply(omq, inv, out=omq)
    nlq = S  # -log q = log se - (z - m), in place of S
    np.subtract(log_se.astype(k.cdt)[:, None], S, out=nlq)
    M = s.get("M", (R, K), k.cdt)  # (1 - q)^gamma
    with np.errstate(divide="ignore"):
        np.log(omq, out=M)
    np.multiply(M, gamma, out=M)
    np.exp(M, out=M)
    np.multiply(M, C, out=M)  # c M
    h = s.get("h", (R, K), k.cdt)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.multiply(M, nlq, out=h)  # the loss terms c M (-log q)
        per = np.add.reduce(h, axis=1, dtype=_F64)
        if np.isnan(per).any():  # rare: 0 * inf, a class with no weight at a masked logit
            per = np.add.reduce(np.where((C == 0) & ~np.isnan(nlq), 0, h), axis=1, dtype=_F64)
        if zl:
            full = m + log_se
            per += zl * full * full * zw
        if G is not None:
            # h = -c M (1 + gamma q (-log q) / (1 - q))
            np.divide(nlq, omq, out=h)
            np.multiply(h, q, out=h)
            np.multiply(h, gamma, out=h)
            np.add(h, 1, out=h)
            np.multiply(h, M, out=h)
            np.negative(h, out=h)
            if np.isnan(np.add.reduce(h, axis=None)):  # rare: q = 1 or 0 exactly, 0 * inf
                ratio = np.where(omq > 0, nlq / omq, 1)
                qr = np.where(q > 0, q * ratio, 0)
                h[...] = np.where(C == 0, 0, -M * (1 + gamma * qr))
            hs = np.add.reduce(h, axis=1, dtype=_F64)
            if zl:  # the z-loss's 2 z lse q joins q's coefficient
                hs = hs - 2 * zl * (m + log_se) * zw
            # (h - q hs) w / D, with hs w / D in float64: a row of weight 0 adds 0 even where
            # hs overflows the compute dtype
            gw64 = w * _F64(k.gscale)
            np.multiply(h, gw64.astype(k.cdt)[:, None], out=G)
            np.multiply(q, (hs * gw64).astype(k.cdt)[:, None], out=q)
            np.subtract(G, q, out=G)
    total = 0.0
    if L is not None:
        np.copyto(L, per, casting="unsafe")
        total = _weigh_rows(L, w, k)
    return (total, _NO_RANGE, trange)


def _cce_block(P, labels, swb, G, L, s, k):
    # p' = clip(p, eps, 1 - eps);  l = -cw[y] log p'_y ;  g = -sw cw[y] / (p'_y D) at k = y, else 0
    # A NaN anywhere in the row or an invalid label (NaN weight) makes the row's loss and its
    # whole gradient row NaN, as for cce_with_logits.
    R, K = P.shape
    prange = _min_max(P)  # also says whether a NaN is present, whatever `validate`
    safe, cwy, w = _row_weights(labels, swb, k)
    if prange[2]:
        w[np.isnan(P).any(axis=1)] = np.nan
    if not k.validate:
        prange = _NO_RANGE
    at = _flat(K, safe)  # each row's label, flat
    py = np.clip(_at(P, at), k.lo, k.hi)
    c = w if cwy is None else w * cwy
    total = 0.0
    if L is not None:
        np.log(py, out=L)
        np.negative(L, out=L)
        np.multiply(L, c, out=L)
        total = _scaled_total(L, k)
    if G is not None:
        G.fill(0)
        _put(G, at, -(c * k.gscale) / py)
        nan_rows = np.isnan(w)
        if nan_rows.any():
            G[nan_rows] = np.nan
    return (total, prange, _NO_RANGE)


def _cce_probs_block(P, T, swb, G, L, s, k):
    # p' = clip(p, eps, 1 - eps);  l = -Σ_k cw_k t_k log p'_k ;  g_k = -sw cw_k t_k / (p'_k D)
    R, K = P.shape
    prange = _min_max(P) if k.validate else _NO_RANGE
    trange = _min_max(T) if k.validate else _NO_RANGE
    w = np.ones(R, k.cdt) if swb is None else swb
    pc = s.get("pc", (R, K), k.cdt)
    np.clip(P, k.lo, k.hi, out=pc)
    C = _class_coefs(T, s, k)
    total = 0.0
    if L is not None:
        lp = s.get("lp", (R, K), k.cdt)
        np.log(pc, out=lp)
        np.negative(np.einsum("ij,ij->i", C, lp), out=L)
        total = _weigh_rows(L, w, k)
    if G is not None:
        np.divide(C, pc, out=G)
        np.multiply(G, (-k.gscale * w)[:, None], out=G)
    return (total, prange, trange)


def _masked_row_sum(C, X, s, k, inputs):
    """Σ_k C_k X_k per row, where a class with C = 0 adds 0 even where X is ±inf or NaN
    because of infinite `inputs` (a masked class, 0 log 0); a NaN among the inputs still makes
    the row NaN."""
    prod = s.get("prod", C.shape, k.cdt)
    np.multiply(C, X, out=prod)
    if np.isnan(prod).any():  # rare: 0 * inf; look again
        nan_input = np.zeros(C.shape, bool)
        for x in inputs:
            nan_input |= np.isnan(x)
        np.copyto(prod, np.where((C == 0) & ~nan_input, 0, prod))
    return np.add.reduce(prod, axis=1)


def _nll_block(A, labels, swb, G, L, s, k):
    # l = -cw[y] a_y ;  g = -sw cw[y] / D at k = y, else 0 (a = log-probabilities, no clipping)
    # A NaN anywhere in the row or an invalid label (NaN weight) makes the row NaN, as for cce.
    R, K = A.shape
    safe, cwy, w = _row_weights(labels, swb, k)
    if np.isnan(np.add.reduce(A, axis=None)):  # one pass; NaN (or inf - inf): look closer
        w[np.isnan(A).any(axis=1)] = np.nan
    at = _flat(K, safe)  # each row's label, flat
    c = w if cwy is None else w * cwy
    total = 0.0
    if L is not None:
        ay = _at(A, at)
        np.multiply(c, ay, out=L)
        np.negative(L, out=L)
        L[c == 0] = 0  # an ignored or unweighted sample adds 0, even at a = -inf
        total = _scaled_total(L, k)
    if G is not None:
        G.fill(0)
        _put(G, at, -(c * k.gscale))
        nan_rows = np.isnan(w)
        if nan_rows.any():
            G[nan_rows] = np.nan
    return (total,)


def _nll_probs_block(A, T, swb, G, L, s, k):
    # c = cw t:  l = -Σ_k c_k a_k ;  g_k = -sw c_k / D
    R, K = A.shape
    trange = _min_max(T) if k.validate else _NO_RANGE
    w = np.ones(R, k.cdt) if swb is None else swb
    C = _class_coefs(T, s, k)
    total = 0.0
    if L is not None:
        np.negative(_masked_row_sum(C, A, s, k, (A, T)), out=L)
        total = _weigh_rows(L, w, k)
    if G is not None:
        np.multiply(C, (-k.gscale * w).astype(k.cdt)[:, None], out=G)
    return (total, _NO_RANGE, trange)


def _kl_div_block(A, T, swb, G, L, s, k):
    # t = target (exp(target) with log_target):  l = Σ_k t_k (log t_k - a_k), 0 log 0 = 0 ;
    # g_k = -sw t_k / D
    R, K = A.shape
    trange = _min_max(T) if k.validate else _NO_RANGE
    w = np.ones(R, k.cdt) if swb is None else swb
    t = s.get("t", (R, K), k.cdt)
    logt = s.get("logt", (R, K), k.cdt)
    if k.opt["log_target"]:
        np.copyto(logt, T)
        np.exp(T, out=t)
    else:
        np.copyto(t, T)
        np.log(T, out=logt)  # -inf where t = 0: masked in the sum
    total = 0.0
    if L is not None:
        np.subtract(logt, A, out=logt)
        L[...] = _masked_row_sum(t, logt, s, k, (A, T))
        total = _weigh_rows(L, w, k)
    if G is not None:
        np.multiply(t, (-k.gscale * w).astype(k.cdt)[:, None], out=G)
    return (total, _NO_RANGE, trange)


def _log_softmax(Z, s, k, name, scale=None):
    """log softmax(Z / scale) and softmax(Z / scale) per row, in scratch arrays (max-shifted;
    log of the row sums of exp from log1p of the sum without the maximum's 1, in float64), and
    that sum (NaN for a row with a NaN or +inf value)."""
    U = s.get(name, Z.shape, k.cdt)
    if scale is None:
        np.copyto(U, Z)
    else:
        np.divide(Z, scale, out=U)
    m, top = _row_max(U)
    np.subtract(U, m[:, None], out=U)
    E = s.get(name + "_e", Z.shape, k.cdt)
    np.exp(U, out=E)
    rest = _rest(U, E, top)
    np.subtract(U, np.log1p(rest).astype(k.cdt)[:, None], out=U)
    np.multiply(E, (1 / (1 + rest)).astype(k.cdt)[:, None], out=E)
    return U, E, rest


_EM_SERIES = [1 / math.factorial(n) for n in range(16, 1, -1)]  # 1/16! .. 1/2!


def _kl_shifted(Z, T, t, logt, temp, s, k):
    """The teacher-logit KL in the form whose relative error does not grow with T (as the
    kernel's GlKlDivLogits): u = z - target, s = Σ t u, d = u - s, x = d / T,
    Y = T^2 X = Σ t T^2 (expm1(x) - x) (t d^2 times a series where |x| < 1/2, from
    t e^x = exp(log t + x) beyond), and per row the loss T^2 log1p(X) and the gradient
    T (q - t) = (t T expm1(x) - t Y / T) / (1 + X); also which rows it is finite in."""
    R, K = Z.shape
    d = s.get("kd", (R, K), k.cdt)
    np.subtract(Z, T, out=d)
    a = s.get("ka", (R, K), k.cdt)
    np.multiply(t, d, out=a)
    shift = np.add.reduce(a, axis=1, dtype=_F64).astype(k.cdt)
    np.subtract(d, shift[:, None], out=d)
    x = s.get("kx", (R, K), k.cdt)
    np.divide(d, temp, out=x)
    small = np.abs(x) < 0.5
    series = s.get("kser", (R, K), k.cdt)  # (expm1(x) - x) / x^2
    series.fill(_EM_SERIES[0])
    for c in _EM_SERIES[1:]:
        np.multiply(series, x, out=series)
        np.add(series, k.cdt(c), out=series)
    te = s.get("kte", (R, K), k.cdt)  # t e^x
    np.add(logt, x, out=te)
    np.exp(te, out=te)
    y = s.get("ky", (R, K), k.cdt)  # t T^2 (expm1(x) - x)
    np.subtract(te, t, out=y)
    np.multiply(t, x, out=a)
    np.subtract(y, a, out=y)
    np.multiply(y, temp, out=y)
    np.multiply(y, temp, out=y)
    np.multiply(d, d, out=a)
    np.multiply(a, series, out=a)
    np.multiply(a, t, out=a)
    a[t == 0] = 0
    np.copyto(y, a, where=small)
    Y = np.add.reduce(y, axis=1, dtype=_F64).astype(k.cdt)
    X = Y / temp / temp
    # t T expm1(x): t d expm1(x) / x where |x| < 1/2 (t d at x = 0), T (t e^x - t) beyond
    g = y
    np.subtract(te, t, out=g)
    np.multiply(g, temp, out=g)
    np.expm1(x, out=a)
    np.divide(a, x, out=a)
    np.multiply(a, d, out=a)
    np.copyto(a, d, where=x == 0)
    np.multiply(a, t, out=a)
    np.copyto(g, a, where=small)
    np.multiply(t, (Y / temp)[:, None], out=a)
    np.subtract(g, a, out=g)
    np.multiply(g, (1 / (1 + X))[:, None], out=g)
    loss = np.where(X > 0, Y * (np.log1p(X) / np.where(X > 0, X, 1)), Y)
    return loss, g, np.isfinite(Y) & np.isfinite(X)


def _kl_div_logits_block(Z, T, swb, G, L, s, k):
    # q = softmax(z / T); t = target, or softmax(target / T) with target_logits;
    # l = T^2 Σ_k t_k (log t_k - log q_k), 0 log 0 = 0 ;  g_k = sw T (q_k Σ_j t_j - t_k) / D
    # With teacher logits, rows in the shifted form of _kl_shifted (rows it overflows in, or
    # with a NaN or +inf logit, in the direct form above).
    R, K = Z.shape
    temp, target_logits = k.params
    trange = _NO_RANGE
    w = np.ones(R, k.cdt) if swb is None else swb
    logq, q, rest_q = _log_softmax(Z, s, k, "q", temp)
    shifted = None
    if target_logits:
        # not "t": the driver may have loaded the target itself into scratch "t"
        logt, t, rest_t = _log_softmax(T, s, k, "teacher", temp)
        t_sum = k.cdt(1)
        with np.errstate(all="ignore"):
            sh_loss, sh_grad, ok = _kl_shifted(Z, T, t, logt, temp, s, k)
        ok &= ~np.isnan(rest_q) & ~np.isnan(rest_t)
        shifted = ok if ok.any() else None
    else:
        trange = _min_max(T) if k.validate else _NO_RANGE
        t = T
        logt = s.get("logt", (R, K), k.cdt)
        with np.errstate(divide="ignore"):
            np.log(T, out=logt)  # -inf where t = 0: masked in the sum
        t_sum = np.add.reduce(T, axis=1)[:, None]
    total = 0.0
    if L is not None:
        np.subtract(logt, logq, out=logt)
        # log q is NaN for a NaN or +inf logit (inf - inf, as cce_with_logits): kept
        L[...] = _masked_row_sum(t, logt, s, k, (logq, T))
        np.multiply(L, temp * temp, out=L)
        if shifted is not None:
            np.copyto(L, sh_loss, where=shifted)
        total = _weigh_rows(L, w, k)
    if G is not None:
        np.multiply(q, t_sum, out=G)
        np.subtract(G, t, out=G)
        np.multiply(G, temp, out=G)
        if shifted is not None:
            np.copyto(G, sh_grad, where=shifted[:, None])
        np.multiply(G, (k.gscale * w).astype(k.cdt)[:, None], out=G)
    return (total, _NO_RANGE, trange)


def _multiclass_hinge_block(Z, labels, swb, G, L, s, k):
    # l = cw[y] max(0, margin + max_{j != y} z_j - z_y); where l > 0 the gradient is
    # sw cw[y] / D at the first arg-max j != y and -sw cw[y] / D at y
    R, K = Z.shape
    (margin,) = k.params
    safe, cwy, w = _row_weights(labels, swb, k)
    at = _flat(K, safe)  # each row's label, flat
    zy = _at(Z, at)
    # the first arg-max of the row is the first arg-max off the label unless it is the label
    # (argmax stops at a NaN: that row is NaN)
    runner_k = np.argmax(Z, axis=1)
    runner = _at(Z, _flat(K, runner_k))
    w[np.isnan(runner)] = np.nan
    own = np.flatnonzero(runner_k == safe)
    if own.size:  # those rows again, with the label taken out
        if K > 1:
            others = Z[own]
            others[np.arange(own.size), safe[own]] = -np.inf
            runner_k[own] = np.argmax(others, axis=1)
            runner[own] = others[np.arange(own.size), runner_k[own]]
        else:  # no other class: nothing to beat
            runner[own] = -np.inf
    with np.errstate(invalid="ignore"):
        lead = margin + runner  # margin is in the compute dtype
        m = lead - zy
        if K == 1:  # nothing to beat: 0, and NaN for a NaN score (not -inf - -inf)
            m = np.where(np.isnan(zy), zy, -np.inf).astype(k.cdt)
        active = lead > zy if K > 1 else np.zeros(R, bool)  # as the kernel decides it
        c = w if cwy is None else w * cwy
    total = 0.0
    if L is not None:  # cw[y] max(0, m), then the sample weight, as the kernel
        with np.errstate(invalid="ignore"):
            np.multiply(np.where(active | np.isnan(m), m, 0), 1 if cwy is None else cwy, out=L)
        total = _weigh_rows(L, w, k)
    if G is not None:
        G.fill(0)
        gc = np.where(active, c * k.gscale, 0).astype(k.cdt)
        if K > 1:
            _put(G, _flat(K, runner_k), gc)
        _put(G, at, -gc)  # after the runner-up: with K = 1 (no runner-up) it is the label
        nan_rows = np.isnan(w)
        if nan_rows.any():
            G[nan_rows] = np.nan
    return (total,)


_CATEGORICAL = {
    ("cce_with_logits", True): _cce_logits_block,
    ("cce_with_logits", False): _cce_logits_probs_block,
    ("cce", True): _cce_block,
    ("cce", False): _cce_probs_block,
    ("nll", True): _nll_block,
    ("nll", False): _nll_probs_block,
    ("kl_div", False): _kl_div_block,
    ("kl_div_with_logits", False): _kl_div_logits_block,
    ("multiclass_hinge", True): _multiclass_hinge_block,
}
