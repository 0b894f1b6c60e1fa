"""Dask: every loss on dask arrays (NumPy or CuPy chunks), lazily. A layer above the dispatch.

Each chunk is handed to the backend of its own library (NumPy, or the CUDA kernels for CuPy
chunks) and returns a float64 partial state [Σ w·l, the mean's denominator]; dask adds the
states tree-wise, so no worker ever holds more than its chunks and a few numbers. The loss is
a 0-d dask array; the gradient has the prediction's chunks, each chunk's gradient of the sum
times 1/D from the reduced state. Nothing is computed until the caller asks.

Each chunk is checked and computed by `rerun` (`gpuloss._api.run`), handed in by the dispatch:
this module imports only `gpuloss._call` (and `gpuloss._shards`, which imports nothing of
gpuloss), so no import circle runs through it.

A categorical loss needs whole rows, so a class axis split over chunks is joined into one
chunk first, except for cce_with_logits on NumPy chunks (without focal_gamma): there each chunk
reduces its classes to per-block states, one task per row chunk merges them in block order,
and each chunk's gradient is formed where it lies (`_vocab`, with `gpuloss._shards`' math).
"""

from __future__ import annotations

import functools
import math
import string

import numpy as np

from . import _call, _shards


def _dask():
    import dask.array as da

    return da


def _mismatch(name, chunks, want):
    msg = (
        f"Mismatched chunking: {name} has chunks {chunks} but must have {want} to match pred; "
        f"rechunk it (e.g. {name}.rechunk(pred.chunks))."
    )
    return ValueError(msg)


def compute(call: _call.Call, rerun):
    da = _dask()
    pred = call.pred
    if any(np.isnan(s) for s in pred.shape):
        msg = "pred has unknown chunk sizes; call compute_chunk_sizes() first."
        raise ValueError(msg)
    if _split_classes(call, pred):  # cce_with_logits: the class chunks are never joined
        return _vocab(call)
    ndim = pred.ndim
    letters = string.ascii_lowercase[:ndim]
    categorical = call.categorical
    # the class axis is one chunk, so each chunk holds whole rows (the other categorical
    # losses, and cce_with_logits with focal_gamma != 0: see `_split_classes`)
    if categorical and pred.numblocks[call.axis] > 1:
        pred = pred.rechunk({call.axis: -1})
    sample_letters = letters.replace(letters[call.axis], "") if categorical else letters
    sample_chunks = (
        tuple(c for i, c in enumerate(pred.chunks) if i != call.axis) if categorical
        else pred.chunks
    )
    sample_shape = call.sample_shape

    target = call.target
    if categorical and not call.labels:
        if target.numblocks[call.axis] > 1:
            target = target.rechunk({call.axis: -1})
        if target.chunks != pred.chunks:
            raise _mismatch("target", target.chunks, pred.chunks)
    elif target.chunks != sample_chunks:
        raise _mismatch("target", target.chunks, sample_chunks)

    arrays = {"pred": (pred, letters), "target": (target, sample_letters if call.labels
                                                  else letters)}
    if call.sample_weight is not None:
        w = da.broadcast_to(da.asarray(call.sample_weight), sample_shape).rechunk(sample_chunks)
        arrays["sample_weight"] = (w, sample_letters)
    if call.pos_weight is not None:
        pw = da.broadcast_to(da.asarray(call.pos_weight), pred.shape).rechunk(pred.chunks)
        arrays["pos_weight"] = (pw, letters)
    # the loss's own options travel as they are; arrays of one weight per class whole
    static = {**call.options, "validate": call.validate}
    if call.class_weight is not None:
        cw = call.class_weight
        static["class_weight"] = cw.compute() if hasattr(cw, "dask") else cw
    names = tuple(arrays)
    block_args = []
    for name in names:
        block_args += list(arrays[name])
    kwargs = {"loss": call.loss, "names": names, "static": static, "rerun": rerun}

    value = grad = None
    need_state = call.want_value and call.reduction != "none" or (
        call.want_grad and call.reduction == "mean"
    )
    if need_state:
        states = da.blockwise(
            _chunk_parts, letters + "z", *block_args, new_axes={"z": 2},
            adjust_chunks={c: 1 for c in letters}, dtype=np.float64,
            meta=np.empty((0,) * (ndim + 1)), concatenate=True, **kwargs,
        )
        state = states.sum(axis=tuple(range(ndim)))  # tree reduction of float64 pairs
        total, denom = state[0], state[1]
    if call.want_value:
        if call.reduction == "none":
            value = da.blockwise(
                _chunk_values, sample_letters, *block_args, dtype=call.pred.dtype,
                concatenate=True, what="none", **kwargs,
            )
        elif call.reduction == "sum":
            value = total.astype(call.pred.dtype)
        else:
            value = da.where(denom > 0, total / da.where(denom > 0, denom, 1), np.nan)
            value = value.astype(call.pred.dtype)
    if call.want_grad:
        grad = da.blockwise(
            _chunk_values, letters, *block_args, dtype=call.pred.dtype, concatenate=True,
            what="grad", **kwargs,
        )
        if call.reduction == "mean":
            scale = da.where(denom > 0, 1 / da.where(denom > 0, denom, 1), 0.0)
            grad = grad * scale.astype(call.pred.dtype)
        if categorical and grad.chunks != call.pred.chunks:
            grad = grad.rechunk(call.pred.chunks)  # back to the caller's chunks
    return value, grad


def _run(loss, names, static, blocks, rerun, *, reduction, want_value, want_grad,
         parts=False):
    arrays = dict(zip(names, blocks))
    opts = dict(static)
    opts["reduction"] = reduction
    for name in ("sample_weight", "pos_weight"):
        if name in arrays:
            opts[name] = arrays[name]
    return rerun(loss, arrays["pred"], arrays["target"], opts, want_value=want_value,
                 want_grad=want_grad, parts=parts)


def _chunk_parts(*blocks, loss, names, static, rerun):
    """One chunk's float64 [Σ w·l, denominator], shaped (1, ..., 1, 2) for the reduction."""
    parts, _ = _run(loss, names, static, blocks, rerun, reduction="mean", want_value=True,
                    want_grad=False, parts=True)
    return parts.reshape((1,) * blocks[0].ndim + (2,))


def _chunk_values(*blocks, loss, names, static, rerun, what):
    """One chunk's per-sample losses ("none") or gradient of its sum ("grad")."""
    if what == "none":
        value, _ = _run(loss, names, static, blocks, rerun, reduction="none", want_value=True,
                        want_grad=False)
        return value
    _, grad = _run(loss, names, static, blocks, rerun, reduction="sum", want_value=False,
                   want_grad=True)
    return grad


# ---------------------------------------------------------------------------------------------
# cce_with_logits over a class axis split into chunks: never joined (gpuloss._shards has the math)

CLASS_BLOCK = 1024
"""Classes per state block of the split-class path (read when the graph is built). Blocks sit
at the multiples of it in the whole class axis: every class chunking whose boundaries are such
multiples gives bit-identical losses and gradients (for one row chunking)."""

# Elements of a chunk computed at a time (a tile of whole rows, or of rows of one block), so
# that a task's temporaries stay far below a chunk. The tiles are small: a distributed worker
# runs with MALLOC_TRIM_THRESHOLD_ set (distributed's default), which turns off glibc's
# adaptive mmap threshold, so every temporary of 128 KiB or more would be a fresh mapping
# whose pages fault in anew (measured 3 to 7 times slower than these tiles).
_SLAB = 1 << 14

# the per-row numbers a row chunk's merge task hands to its gradient tasks (float64)
_RM, _RSE, _RREST1, _RCSUM, _RCLABEL, _RSY, _ROM, _RW, _RZ, _RLOSS, _RDEN = range(11)
_NR = 11


def _split_classes(call, pred) -> bool:
    """cce_with_logits with its class axis over several NumPy chunks: states per block, no
    join. Focal loss (focal_gamma != 0) is not: its per-class terms need the whole row's
    softmax a second time, so it keeps the join of the class axis (`compute`); nor are CuPy
    chunks (their rows go to the CUDA kernels whole), nor masked arrays (pred, target or
    weights: the joined path refuses them with its TypeError, which this one would not see)."""

    def plain(x):  # a Dask array of plain NumPy chunks (a masked array is an ndarray too)
        return not hasattr(x, "dask") or type(getattr(x, "_meta", None)) is np.ndarray

    return (call.loss == "cce_with_logits" and call.categorical
            and pred.numblocks[call.axis] > 1 and not call.options.get("focal_gamma")
            and plain(pred) and plain(call.target) and plain(call.sample_weight)
            and plain(call.class_weight))


def _xp():
    import array_api_compat.numpy as xp

    return xp


def _slabs(rows, width, size):
    step = max(1, size // max(width, 1))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _labels_int64(y):
    """Class indices as int64 (an unsigned one beyond int64 refused, as the NumPy backend)."""
    if y.dtype.kind == "u" and y.dtype.itemsize == 8 and y.size:
        _call.check_labels_fit_int64(int(y.max()))
    return y.astype(np.int64, copy=False)


def _capped(z, cdt, cap):
    """The logits in the compute dtype (a copy), soft-capped, and the cap's derivative."""
    s = z.astype(cdt)
    if cap is None:
        return s, None
    return _shards.soft_cap(_xp(), s, cdt(cap))


def _vocab(call: _call.Call):
    """(value, grad) of cce_with_logits with the class axis over several chunks.

    Three kinds of task, each on one chunk or one row chunk: the states of a chunk's blocks
    (`_v_states`: rows × blocks × 8 float64), one merge per row chunk taking its class chunks'
    states in class order (`_v_merge`: the per-row numbers of `_shards.finish`), and the
    gradient of each chunk where it lies (`_v_grad`), from the chunk and its rows' numbers.
    The class axis is moved last (a transpose, never a rechunk) and back for the gradient."""
    da = _dask()
    pred = call.pred
    axis, ndim = call.axis, call.pred.ndim
    last = axis == ndim - 1
    P = pred if last else da.moveaxis(pred, axis, -1)
    K = P.shape[-1]
    lead = string.ascii_lowercase[: ndim - 1]
    lead_shape, lead_chunks, kchunks = P.shape[:-1], P.chunks[:-1], P.chunks[-1]
    labels = call.labels
    cdt = np.float64 if pred.dtype == np.float64 else np.float32
    cap = call.options.get("softcap")
    if cap is not None:  # as the kernels take it: beyond the dtype's range, its largest value
        cap = min(float(cap), float(np.finfo(cdt).max))
    smoothing = float(call.label_smoothing)
    z_loss = float(call.options.get("z_loss", 0.0))
    ii = call.ignore_index
    block = CLASS_BLOCK
    starts = np.cumsum((0,) + kchunks[:-1])

    target = call.target
    if labels:
        if target.chunks != lead_chunks:
            raise _mismatch("target", target.chunks, lead_chunks)
        T, tind = target, lead
    else:
        T = target if last else da.moveaxis(target, axis, -1)
        if T.chunks[:-1] != lead_chunks:
            raise _mismatch("target", target.chunks, pred.chunks)
        if T.chunks[-1] != kchunks:  # the targets' classes chunked as pred's
            T = T.rechunk(P.chunks)
        tind = lead + "K"

    # class weights: in memory (checked here), one slice per class chunk
    w_scale = 1.0
    cw, cw_all = call.class_weight, None
    if cw is not None:
        cw = np.asarray(cw.compute() if hasattr(cw, "dask") else cw)
        if call.validate and cw.size:
            lo, hi = float(np.min(cw)), float(np.max(cw))
            if not _call.weights_ok(lo, hi):
                _call.raise_bad_weights("class_weight", lo, hi)
        top = float(np.max(np.abs(cw))) if cw.size else 0.0
        if math.isfinite(top) and top > 0 and not 1e-30 <= top <= 1e30:
            # as the NumPy backend: no class weight over- or underflows in float32; the rows'
            # weights (float64) take the scale back
            cw, w_scale = cw.astype(np.float64) / top, top
        cw = cw.astype(cdt)
        # the class weights whole (one chunk), for the mean's denominator of out-of-range
        # labels (validate=False), which count as the NumPy backend counts them
        cw_all = (da.from_array(cw, chunks=-1)
                  if labels and not call.validate and call.reduction == "mean" else None)
        cw = da.from_array(cw, chunks=(kchunks,))
    # each chunk's place in the array (its classes' slice): known to the graph, no task
    from dask.layers import ArraySliceDep

    S = ArraySliceDep(P.chunks)
    sw = call.sample_weight
    W = None
    if sw is not None:
        if hasattr(sw, "dask"):
            W = da.broadcast_to(sw, lead_shape)
            if W.chunks != lead_chunks:
                W = W.rechunk(lead_chunks)
        else:
            W = da.from_array(np.array(np.broadcast_to(np.asarray(sw), lead_shape), order="C"),
                              chunks=lead_chunks)

    common = {"labels": labels, "cdt": cdt, "cap": cap, "smoothing": smoothing, "K": K,
              "ignore_index": ii}
    # 1. each chunk's states, (rows, blocks of the chunk, 8), where the chunk lies
    nblocks = tuple(len(_shards.block_edges(int(a), int(n), block))
                    for a, n in zip(starts, kchunks))
    rule_msg = (_call.domain_message(call, "target", call.target_rule)
                if call.validate and call.target_rule and not labels else None)
    args = [P, lead + "K", S, lead + "K", T, tind] + ([cw, "K"] if cw is not None else [])
    states = da.blockwise(
        _v_states, lead + "KF", *args, new_axes={"F": _shards.FIELDS},
        adjust_chunks={"K": nblocks}, dtype=np.float64, align_arrays=False, concatenate=True,
        meta=np.empty((0,) * (ndim + 1)), token="cce-class-states", block=block,
        rule_msg=rule_msg, has_cw=cw is not None, **common)

    # 2. one merge per row chunk, of its class chunks' states in class order (in one task: a
    # plain graph layer, so that no optimisation fuses the states' tasks into it)
    rows = _v_merge_layer(call, states, T if labels else None, W, cw_all, nlead=ndim - 1,
                          labels=labels, smoothing=smoothing, z_loss=z_loss, K=K, ii=ii,
                          w_scale=w_scale)
    value = grad = None
    need_total = call.want_value and call.reduction != "none" or (
        call.want_grad and call.reduction == "mean")
    if need_total:
        parts = da.blockwise(_v_parts, lead + "G", rows, lead + "G", dtype=np.float64,
                             adjust_chunks={**{c: 1 for c in lead}, "G": 2},
                             meta=np.empty((0,) * ndim), token="cce-class-parts")
        state = parts.sum(axis=tuple(range(ndim - 1)))  # tree reduction of float64 pairs
        total, denom = state[0], state[1]
    if call.want_value:
        if call.reduction == "none":
            value = da.blockwise(_v_loss, lead, rows, lead + "G", dtype=pred.dtype,
                                 concatenate=True, token="cce-class-loss", to=pred.dtype)
        elif call.reduction == "sum":
            value = total.astype(pred.dtype)
        else:
            value = da.where(denom > 0, total / da.where(denom > 0, denom, 1), np.nan)
            value = value.astype(pred.dtype)
    if call.want_grad:
        scale = (1.0, None)
        if call.reduction == "mean":  # 1/D of every row chunk: known after all of them
            # (an argument of the blockwise, not a keyword: dask would compute a keyword's
            # collection, and all it depends on, a second time)
            scale = (da.where(denom > 0, 1 / da.where(denom > 0, denom, 1), 0.0), "")
        args = [P, lead + "K", S, lead + "K", rows, lead + "G", *scale, T, tind] + (
            [cw, "K"] if cw is not None else [])
        grad = da.blockwise(
            _v_grad, lead + "K", *args, dtype=pred.dtype, align_arrays=False,
            concatenate=True, meta=np.empty((0,) * ndim, dtype=pred.dtype),
            token="cce-class-grad", z_loss=z_loss, has_cw=cw is not None,
            out_dtype=pred.dtype, **common)
        if not last:
            grad = da.moveaxis(grad, -1, axis)
    return value, grad


def _v_merge_layer(call, states, Y, W, CW, *, nlead, labels, smoothing, z_loss, K, ii,
                   w_scale):
    """The (rows, 11) per-row numbers of every row chunk: one task each, taking the states of
    the row chunk's class chunks (in class order), its labels and its sample weights."""
    import itertools

    import dask
    from dask.highlevelgraph import HighLevelGraph

    da = _dask()
    func = functools.partial(
        _v_merge, labels=labels, smoothing=smoothing, z_loss=z_loss, K=K, ignore_index=ii,
        reduction=call.reduction, validate=call.validate, w_scale=w_scale,
        has_y=Y is not None, has_w=W is not None, has_cw=CW is not None)
    name = "cce-class-merge-" + dask.base.tokenize(states, Y, W, CW, call.reduction,
                                                  call.validate, smoothing, z_loss, ii,
                                                  w_scale)
    nk = states.numblocks[nlead]
    layer = {}
    for idx in itertools.product(*(range(n) for n in states.numblocks[:nlead])):
        deps = [[(states.name, *idx, j, 0) for j in range(nk)]]
        if Y is not None:
            deps.append((Y.name, *idx))
        if W is not None:
            deps.append((W.name, *idx))
        if CW is not None:
            deps.append((CW.name, 0))
        layer[(name, *idx, 0)] = (func, *deps)
    collections = [states] + [a for a in (Y, W, CW) if a is not None]
    graph = HighLevelGraph.from_collections(name, layer, dependencies=collections)
    chunks = states.chunks[:nlead] + ((_NR,),)
    return da.Array(graph, name, chunks, dtype=np.float64, meta=np.empty((0,) * (nlead + 1)))


def _flat_chunk(z, t, labels):
    """A chunk as rows: (its leading shape, R, z (R, width), labels (R,) or None, probability
    targets (R, width) or the labels' array)."""
    rows, width = z.shape[:-1], z.shape[-1]
    R = math.prod(rows)
    y = _labels_int64(t.reshape(R)) if labels else None
    return rows, R, z.reshape(R, width), y, (t if labels else t.reshape(R, width))


def _v_states(z, place, t, *rest, labels, cdt, cap, smoothing, K, ignore_index, block,
              rule_msg, has_cw):
    """One chunk's block states (rows, blocks, 8), computed a slab of rows at a time."""
    xp = _xp()
    cw = rest[0] if has_cw else None
    start = place[-1].start
    width = z.shape[-1]
    rows, R, z, y, t = _flat_chunk(z, t, labels)
    if not labels and rule_msg is not None and t.size:  # the targets as stored, NaN passing
        lo, hi = float(np.fmin.reduce(t, axis=None)), float(np.fmax.reduce(t, axis=None))
        if lo < 0 or hi > 1:
            raise ValueError(rule_msg.format(lo=f"{lo:.6g}", hi=f"{hi:.6g}"))
    edges = _shards.block_edges(start, width, block)
    out = np.empty((R, len(edges), _shards.FIELDS))
    for b, (lo, hi) in enumerate(edges):  # a tile of rows of one block at a time
        for i, j in _slabs(R, hi - lo, _SLAB):
            with np.errstate(all="ignore"):  # (as the NumPy backend: overflow is the answer)
                s, _ = _capped(z[i:j, lo:hi], cdt, cap)
            out[i:j, b:b + 1] = _shards.states(
                xp, s, start=start + lo, block=block, labels=labels,
                target=y[i:j] if labels else t[i:j, lo:hi],
                cw=None if cw is None else cw[lo:hi], smoothing=smoothing,
                ignore_index=ignore_index, K=K)
    return out.reshape(*rows, len(edges), _shards.FIELDS)


def _v_merge(states, *rest, labels, smoothing, z_loss, K, ignore_index, reduction, validate,
             w_scale, has_y, has_w, has_cw):
    """A row chunk's merged states (in block order), checks and per-row numbers (rows, 11)."""
    xp = _xp()
    rest = list(rest)
    y = rest.pop(0) if has_y else None
    w = rest.pop(0) if has_w else None
    cw_all = rest.pop(0) if has_cw else None
    st = np.concatenate(states, axis=-2)
    rows, nb = st.shape[:-2], st.shape[-2]
    R = math.prod(rows)
    st = st.reshape(R, nb, _shards.FIELDS)
    if y is not None:
        y = _labels_int64(y.reshape(R))
        if validate and R:
            counted = y != ignore_index if ignore_index is not None else np.ones(R, bool)
            if (((y < 0) | (y >= K)) & counted).any():
                kept = y[counted]
                _call.raise_bad_labels(int(kept.min()), int(kept.max()), K, ignore_index)
    if w is not None:
        w = w.reshape(R)
        if validate and R:
            lo, hi = float(np.min(w)), float(np.max(w))
            if not _call.weights_ok(lo, hi):
                _call.raise_bad_weights("sample_weight", lo, hi)
        with np.errstate(all="ignore"):
            w = w.astype(np.float64) * w_scale
    elif w_scale != 1.0:
        w = np.full(R, w_scale)
    w_given = w
    merged = np.empty((R, _shards.FIELDS))
    for i, j in _slabs(R, nb * _shards.FIELDS, _SLAB):
        merged[i:j] = _shards.merge_blocks(xp, st[i:j])
    r = _shards.finish(xp, merged, labels=labels, w=w, z_scale=1.0 / w_scale,
                       smoothing=smoothing, z_loss=z_loss, K=K,
                       reduction=reduction, ignore_index=ignore_index, y=y)
    out = np.zeros((R, _NR))
    out[:, _RM], out[:, _RSE], out[:, _RREST1] = r.M, r.se, r.rest1
    out[:, _RCSUM], out[:, _RW], out[:, _RLOSS] = r.c_sum, r.w_row, r.loss
    if r.z_lse is not None:
        out[:, _RZ] = r.z_lse
    if labels:
        out[:, _RCLABEL], out[:, _RSY], out[:, _ROM] = r.c_label, r.s_y, r.one_minus_py_se
    if reduction == "mean":  # each row's share of the denominator, as `finish` sums them
        # (probabilities: Σ w, without the class weights' scale that w carries)
        denom_w = r.w_row * merged[:, _shards.C_Y] if labels else r.w_row / w_scale
        out[:, _RDEN] = np.where(r.w_row == 0, 0.0, denom_w)
        if labels and not validate:  # a label in no chunk (out of range): its row's weight
            # is NaN, but it counts in the denominator as in the NumPy backend, with the
            # class weight of the nearest class, so that the other rows keep their gradient
            bad = (merged[:, _shards.OWN] != 1) & (
                y != ignore_index if ignore_index is not None else True)
            if bad.any():
                cwy = 1.0 if cw_all is None else cw_all[np.clip(y, 0, K - 1)].astype(np.float64)
                base = 1.0 if w_given is None else w_given
                out[:, _RDEN] = np.where(bad, np.broadcast_to(base * cwy, (R,)), out[:, _RDEN])
    return out.reshape(*rows, _NR)


def _rows_of(pk, labels, z_loss):
    """The `_shards.Rows` of a slab of per-row numbers."""
    r = _shards.Rows()
    r.M, r.se, r.rest1 = pk[:, _RM], pk[:, _RSE], pk[:, _RREST1]
    r.c_sum, r.w_row, r.loss = pk[:, _RCSUM], pk[:, _RW], pk[:, _RLOSS]
    r.z_lse = pk[:, _RZ] if z_loss else None
    r.log_se = r.denominator = None
    if labels:
        r.c_label, r.s_y, r.one_minus_py_se = pk[:, _RCLABEL], pk[:, _RSY], pk[:, _ROM]
    else:
        r.c_label = r.s_y = r.one_minus_py_se = None
    return r


def _v_grad(z, place, pk, scale, t, *rest, labels, cdt, cap, smoothing, K, ignore_index,
            z_loss, has_cw, out_dtype):
    """One chunk's gradient, where it lies, from the chunk and its rows' merged numbers."""
    xp = _xp()
    cw = rest[0] if has_cw else None
    start = place[-1].start
    width = z.shape[-1]
    rows, R, z, y, t = _flat_chunk(z, t, labels)
    pk = pk.reshape(R, _NR)
    scale = float(scale)
    out = np.empty((R, width), dtype=out_dtype)
    for i, j in _slabs(R, width, _SLAB):
        with np.errstate(all="ignore"):
            s, sech2 = _capped(z[i:j], cdt, cap)
        yi = y[i:j] if labels else None
        out[i:j] = _shards.grad(xp, s, sech2, _rows_of(pk[i:j], labels, z_loss), start=start,
                                labels=labels, target=yi if labels else t[i:j], cw=cw,
                                smoothing=smoothing, K=K, row_scale=np.full(j - i, scale),
                                ignore_index=ignore_index, y=yi, out_dtype=out_dtype)
    return out.reshape(*rows, width)


def _v_parts(pk):
    """A row chunk's float64 [Σ w·l, Σ of the mean's denominator], shaped (1, ..., 1, 2)."""
    flat = pk.reshape(-1, _NR)
    return np.array([np.sum(flat[:, _RLOSS]), np.sum(flat[:, _RDEN])]).reshape(
        (1,) * (pk.ndim - 1) + (2,))


def _v_loss(pk, *, to):
    """A row chunk's per-row losses (reduction='none'), in pred's dtype `to`."""
    return pk[..., _RLOSS].astype(to)
