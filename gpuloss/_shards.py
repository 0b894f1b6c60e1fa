r"""Softmax cross-entropy over a class axis split into shards: the math that
`gpuloss.distributed` (torch.distributed ranks) and the Dask path (class-axis chunks) share.

A row's loss needs every class of the row, but only through a few numbers per row. Each
shard (a rank's slice of the vocabulary, a Dask chunk, or a block of `block` classes inside
one) reduces its own classes to a **state** per row, eight float64 numbers:

====  ==========================================================================
m     the shard's largest (soft-capped) logit
count how many of its logits equal m
rest  Σ exp(s_k − m) over its other logits (< m): the exp-sum is count + rest
dot   Σ C_k (s_k − m): C_k the class coefficients of label smoothing (class weights)
      or of probability targets (cw_k t'_k)
csum  Σ C_k
s_y   the label's logit, where the label is one of the shard's classes (else 0)
c_y   the label's class weight there (1 without class weights; else 0)
own   1 where the label is one of the shard's classes (else 0)
====  ==========================================================================

States merge without the data: the row maximum M is the maximum of the shards' m (exact),
each state is **rebased** to M (``rest ← (count + rest) e^{m − M}``, ``dot ← dot + (m − M)
csum``, count kept only where m = M) and the rebased states are added. s_y, c_y and own have
one non-zero shard per row, so their sums are exact in any order. From the merged state
(`finish`): the exp-sum is ``se = count + rest`` and ``log se = log1p(count − 1 + rest)`` (the
row maximum's own 1 is never added to a tiny rest, so a confident row keeps the digits of its
loss), ``lse = M + log se``, and

- class indices: ``l = w [(1 − λ) c_y (log se − (s_y − M)) + λ/K (Σcw log se − dot)]
  + z_loss·lse²·c_y w``,
- probabilities: ``l = w [csum log se − dot] + z_loss·lse²·w``,

which is `cce_with_logits`' loss written in terms of the shifted logits (its docstring has the
formulas). Each shard's gradient then needs only the row's M, se, and coefficients (`grad`):
no exchange in backward.

Split invariance: with blocks aligned to multiples of `block` classes, the states of a block
depend only on the block's data, and `merge_blocks` adds them in global block order, one
block at a time; so the merged state, the loss and the gradient are bit-identical for every
split of the classes into shards that are unions of whole blocks.

Written once against the array-API namespace of the shard (NumPy in Dask chunks, PyTorch on
ranks). Focal loss is not offered here: its per-class terms need the full softmax of every
class a second time, a third exchange per call.
"""

from __future__ import annotations

import math

import numpy as np
from array_api_compat import device as _device

M, COUNT, REST, DOT, CSUM, S_Y, C_Y, OWN = range(8)
FIELDS = 8
SUPPORTED = ("reduction", "sample_weight", "validate", "class_weight", "ignore_index",
             "label_smoothing", "z_loss", "softcap")


def soft_cap(xp, z, c):
    """(c tanh(z / c), sech²(z / c)) from s = exp(−2|z / c|), as the NumPy backend's
    `_soft_cap`: no cancellation where tanh is near 1. NaN stays NaN; ±inf gives ±c and 0."""
    x = z / c
    a = -2 * xp.abs(x)
    s = xp.exp(a)
    tanh_abs = -xp.expm1(a) / (1 + s)
    capped = c * xp.where(x < 0, -tanh_abs, xp.where(x > 0, tanh_abs, x))  # ±0, NaN: kept
    sech2 = 4 * s / ((1 + s) * (1 + s))
    return capped, sech2


def block_edges(start: int, width: int, block: int | None) -> list[tuple[int, int]]:
    """The shard's classes [start, start + width) cut at the multiples of `block` (None: one
    piece), as (begin, end) offsets inside the shard."""
    if block is None or width == 0:
        return [(0, width)]
    edges = []
    lo = 0
    while lo < width:
        nxt = ((start + lo) // block + 1) * block - start
        hi = min(nxt, width)
        edges.append((lo, hi))
        lo = hi
    return edges


def coefficients(xp, target, labels, cw, smoothing, K, cdt):
    """The class coefficients C of the dot and csum fields, shape (N, width) or (1, width);
    None when no term needs them (class indices without label smoothing)."""
    if labels:
        if not smoothing:
            return None
        if cw is None:
            return None  # C = 1: the fields are the plain sums (see `states`)
        return xp.reshape(cw, (1, -1))
    t = xp.astype(target, cdt)
    if smoothing:
        t = t * (1 - smoothing) + smoothing / K
    return t if cw is None else t * xp.reshape(cw, (1, -1))


ROW_BLOCK_ELEMENTS = 1 << 18  # logits per slice of rows (1 MiB of float32): the passes over a
# slice stay in the core's cache, where passes over a whole shard went to memory each time


def _row_slices(N: int, width: int):
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, width))
    return [(r, min(r + step, N)) for r in range(0, N, step)]


def states(xp, s, *, start, block, labels, target, cw, smoothing, ignore_index, K):
    """The states of one shard's classes: s the (N, width) soft-capped logits in the compute
    dtype, `start` their first class; one state per block (shape (N, nblocks, 8), float64).
    `target`: the (N,) class indices (global) or the (N, width) probabilities of the shard."""
    N, width = s.shape
    C = coefficients(xp, target, labels, cw, smoothing, K, s.dtype)
    ones_c = bool(labels and smoothing and cw is None)
    pieces = block_edges(start, width, block)
    out = xp.zeros((N, len(pieces), FIELDS), dtype=xp.float64, device=_device(s))
    with np.errstate(all="ignore"):  # −inf − (−inf) and NaN inside where(): masked below
        for r0, r1 in _row_slices(N, width):
            for j, (lo, hi) in enumerate(pieces):
                Cb = None if C is None else C[r0:r1, lo:hi] if C.shape[0] == N else C[:, lo:hi]
                _piece_state(xp, out[r0:r1, j], s[r0:r1, lo:hi], Cb, ones_c)
    if labels:
        _label_fields(xp, out, s, target, cw, start, pieces, ignore_index)
    return out


def _piece_state(xp, out, sb, C, ones_c):
    """One piece's m, count, rest, dot, csum into `out` (rows × 8), from its logits `sb`."""
    f64 = xp.float64
    cdt = sb.dtype
    if sb.shape[1] == 0:
        out[:, M] = -math.inf
        return
    m = xp.max(sb, axis=1)
    eq = sb == m[:, None]
    out[:, M] = xp.astype(m, f64)
    out[:, COUNT] = xp.astype(xp.sum(xp.astype(eq, cdt), axis=1), f64)
    # the maxima's own 1s apart (count): a confident row's tiny rest keeps its digits
    e = xp.where(eq, xp.zeros((), dtype=cdt), xp.exp(sb - m[:, None]))
    out[:, REST] = xp.sum(e, axis=1, dtype=f64)
    if C is None and not ones_c:
        return
    # s − m, and −inf for a masked class even in a piece whose logits are all −inf (there
    # −inf − (−inf) would be NaN): a weighted masked class makes the loss +inf, not NaN
    d = xp.where(sb == -math.inf, -math.inf, xp.astype(sb, f64) - xp.astype(m, f64)[:, None])
    if ones_c:  # label smoothing without class weights: C = 1
        out[:, DOT] = xp.sum(xp.where(eq, 0.0, d), axis=1)
        out[:, CSUM] = float(sb.shape[1])
        return
    cb = xp.astype(C, f64)
    # a class with no weight adds 0, even where its logit is −inf
    out[:, DOT] = xp.sum(xp.where(cb == 0, 0.0, cb * d), axis=1)
    out[:, CSUM] = xp.sum(cb, axis=1) if cb.shape[0] == sb.shape[0] else xp.sum(cb)


def _label_fields(xp, out, s, y, cw, start, pieces, ignore_index):
    """s_y, c_y, own: in the block holding each row's label (rows whose label is ignore_index
    or outside the shard have none)."""
    f64 = xp.float64
    N, width = s.shape
    local = y - start
    owned = (local >= 0) & (local < width)
    if ignore_index is not None:
        owned = owned & (y != ignore_index)
    safe = xp.where(owned, local, xp.zeros_like(local))
    if N == 0 or width == 0:
        return
    sy = xp.astype(xp.take_along_axis(s, xp.reshape(safe, (N, 1)), axis=1)[:, 0], f64)
    cy = (xp.ones((N,), dtype=f64, device=_device(s)) if cw is None
          else xp.astype(xp.take(cw, safe), f64))
    zero = xp.zeros((), dtype=f64, device=_device(s))
    for j, (lo, hi) in enumerate(pieces):
        here = owned & (local >= lo) & (local < hi)
        out[:, j, S_Y] = xp.where(here, sy, zero)
        out[:, j, C_Y] = xp.where(here, cy, zero)
        out[:, j, OWN] = xp.astype(here, f64)


def rebase(xp, st, top):
    """The states `st` (..., 8) relative to the row maxima `top` (broadcast against st's
    leading axes): count and rest of the new reference, dot shifted by (m − top) csum."""
    m = st[..., M]
    at_top = m == top
    with np.errstate(all="ignore"):
        scale = xp.exp(m - top)  # ≤ 1; 0 for m = −inf below a finite top
        out = xp.zeros_like(st)
        out[..., M] = top
        out[..., COUNT] = xp.where(at_top, st[..., COUNT], 0.0)
        out[..., REST] = xp.where(at_top, st[..., REST],
                                  (st[..., COUNT] + st[..., REST]) * scale)
        shift = xp.where(st[..., CSUM] == 0, 0.0, (m - top) * st[..., CSUM])
        out[..., DOT] = st[..., DOT] + xp.where(at_top, 0.0, shift)
    out[..., CSUM] = st[..., CSUM]
    out[..., S_Y:] = st[..., S_Y:]
    return out


def merge_blocks(xp, st):
    """Merge (N, nblocks, 8) states along the blocks, in block order, one block at a time:
    the same additions in the same order whatever array held which block."""
    top = xp.max(st[..., M], axis=1)
    based = rebase(xp, st, top[:, None])
    acc = based[:, 0, :]
    for j in range(1, based.shape[1]):
        acc = acc + based[:, j, :]
    acc[:, M] = top
    return acc


def mean_value(total: float, denominator: float) -> float:
    """The mean as the single-device backends form it: total / D in float64 (0 / 0 is NaN,
    x / 0 infinite)."""
    with np.errstate(all="ignore"):
        return float(np.divide(np.float64(total), np.float64(denominator)))


def mean_scale(denominator: float) -> float:
    """The mean's 1/D on the gradients: 0 when nothing was counted (D ≤ 0), as on one
    device: an all-padding batch leaves the weights alone."""
    return 1.0 / denominator if denominator > 0 else 0.0


class Rows:
    """What every shard needs of its rows after the merge: the weighted loss per row (before
    the reduction's 1/D), the mean's denominator, and the gradient's per-row numbers."""

    __slots__ = ("M", "c_label", "c_sum", "denominator", "log_se", "loss", "one_minus_py_se",
                 "rest1", "s_y", "se", "w_row", "z_lse")


def finish(xp, merged, *, labels, w, smoothing, z_loss, K, reduction, ignore_index, y,
           z_scale=1.0):
    """The per-row losses (w applied) and the gradient's per-row numbers from the merged
    (N, 8) state. `w`: the (N,) sample weights in float64 (None: 1); `y`: the labels.
    `z_scale`: for probability targets, the z-term's share of w (1 / the scale w carries for
    class weights rescaled by their maximum: the z-loss weighs a sample 1, not by them)."""
    f64 = xp.float64
    st = merged
    N = st.shape[0]
    r = Rows()
    r.M = st[:, M]
    r.rest1 = st[:, COUNT] - 1 + st[:, REST]  # the exp-sum without the maximum's own 1
    r.se = st[:, COUNT] + st[:, REST]
    ls, zl = float(smoothing), float(z_loss)
    dev = _device(st)
    w_row = xp.ones((N,), dtype=f64, device=dev) if w is None else w
    with np.errstate(all="ignore"):
        # an infinite row maximum (a +inf logit, or every logit −inf) makes the row NaN, as on
        # one device (inf − inf there)
        finite = xp.isfinite(r.M)
        r.se = xp.where(finite, r.se, math.nan)
        r.rest1 = xp.where(finite, r.rest1, math.nan)
        r.log_se = xp.log1p(r.rest1)
        lse = r.M + r.log_se
        r.z_lse = 2 * zl * lse * (1.0 if labels else z_scale) if zl else None
        if labels:
            ignored = (y == ignore_index) if ignore_index is not None else \
                xp.zeros((N,), dtype=xp.bool, device=dev)
            w_row = xp.where(ignored, 0.0, w_row)
            # a label in no shard (possible with validate=False) gives its row NaN, never a
            # guess, and leaves the mean's denominator (the other rows keep their gradient)
            bad = (st[:, OWN] != 1) & ~ignored
            c_y, r.s_y = st[:, C_Y], st[:, S_Y]
            denom_w = xp.where(bad, 0.0, w_row * c_y)
            w_row = xp.where(bad, math.nan, w_row)
            c_true = (1 - ls) * c_y
            nll = r.log_se - (r.s_y - r.M)  # −log p_y
            # a label term with no weight adds 0, even at −inf; NaN stays NaN
            loss = xp.where((c_true == 0) & ~xp.isnan(nll), 0.0, c_true * nll)
            r.c_sum = r.c_label = c_true
            if ls:  # csum: Σ cw over every class, dot: Σ cw_k (s_k − M)
                loss = loss + (ls / K) * (st[:, CSUM] * r.log_se - st[:, DOT])
                r.c_sum = c_true + (ls / K) * st[:, CSUM]
                r.c_label = c_true + (ls / K) * c_y
            if zl:  # z lse² c_y; its gradient 2 z lse c_y softmax folds into c_sum
                loss = loss + zl * lse * lse * c_y
                r.c_sum = r.c_sum + r.z_lse * c_y
            # (1 − p_y) se = rest1 − expm1(s_y − M): no cancellation near p_y = 1
            r.one_minus_py_se = r.rest1 - xp.expm1(r.s_y - r.M)
        else:
            r.s_y = r.c_label = r.one_minus_py_se = None
            loss = st[:, CSUM] * r.log_se - st[:, DOT]
            if zl:
                loss = loss + zl * lse * lse * z_scale
            r.c_sum = st[:, CSUM]
            denom_w = w_row
        # a row of weight 0 adds 0, even where its loss is infinite; NaN stays NaN
        r.loss = xp.where((w_row == 0) & ~xp.isnan(loss), 0.0, loss * w_row)
    r.w_row = w_row
    r.denominator = (float(xp.sum(xp.where(w_row == 0, 0.0, denom_w)))
                     if reduction == "mean" else 1.0)
    return r


def grad(xp, s, sech2, r, *, start, labels, target, cw, smoothing, K, row_scale,
         ignore_index, y, out_dtype):
    """The shard's gradient of Σ_i row_scale_i l_i with respect to its (uncapped) logits: s
    the capped logits in the compute dtype, sech2 the cap's derivative (None without a cap),
    `row_scale` (N,) float64 (the upstream gradient, with the mean's 1/D); the sample weights
    come from r.w_row. The formulas are `cce_with_logits`' (NumPy backend), with the row's
    M and se from the merge. Formed a slice of rows at a time, in cache."""
    N, width = s.shape
    out = xp.empty((N, width), dtype=out_dtype, device=_device(s))
    gw = r.w_row * row_scale  # (N,) float64
    inv_se = 1 / r.se
    C = None if labels else coefficients(xp, target, labels, cw, smoothing, K, s.dtype)
    cwk = None
    if labels and smoothing and cw is not None:
        cwk = xp.reshape(xp.astype(cw, s.dtype), (1, -1))
    label_col = None
    if labels:
        local = y - start
        owned = (local >= 0) & (local < width)
        if ignore_index is not None:
            owned = owned & (y != ignore_index)
        label_col = xp.where(owned, local, xp.full_like(local, -1))
    with np.errstate(all="ignore"):
        for r0, r1 in _row_slices(N, width):
            rows = slice(r0, r1)
            G = _grad_rows(xp, s[rows], r, rows, gw[rows], inv_se[rows], labels=labels,
                           C=None if C is None else C[rows], cwk=cwk, smoothing=smoothing, K=K,
                           label_col=None if label_col is None else label_col[rows])
            if sech2 is not None:
                G = G * sech2[rows]
            out[rows] = xp.astype(G, out_dtype)
    return out


def _grad_rows(xp, s, r, rows, gw, inv_se, *, labels, C, cwk, smoothing, K, label_col):
    cdt = s.dtype

    def col(v):  # a per-row float64 number as a column in the compute dtype
        return xp.astype(v, cdt)[:, None]

    e = xp.exp(s - col(r.M[rows]))  # ≤ 1: M is the row's maximum over every shard
    ls = float(smoothing)
    if labels:
        G = e * col(r.c_sum[rows] * gw * inv_se)
        if ls:
            G = G - col(gw * (ls / K)) * (1.0 if cwk is None else cwk)
        here = xp.nonzero(label_col >= 0)[0]
        if here.shape[0]:
            # the label's column as p (c_sum − c) − c (1 − p): no cancellation near p = 1
            c_sum, c_label = r.c_sum[rows][here], r.c_label[rows][here]
            s_y, top = r.s_y[rows][here], r.M[rows][here]
            inv = inv_se[here]
            p_y = xp.exp(s_y - top) * inv
            g_y = gw[here] * (p_y * (c_sum - c_label)
                              - c_label * r.one_minus_py_se[rows][here] * inv)
            G[here, label_col[here]] = xp.astype(g_y, cdt)
        return G
    top = s == col(r.M[rows])
    # 1 − p = (se − e) / se, and at the maximum (e = 1) exactly rest1 / se
    om = xp.where(top, col(r.rest1[rows]), col(r.se[rows]) - e) * col(inv_se)
    p = e * col(inv_se)
    G = (p * (col(r.c_sum[rows]) - C) - C * om) * col(gw)
    if r.z_lse is not None:  # 2 z lse softmax, weight 1 per class
        G = G + p * col(r.z_lse[rows] * gw)
    return G
