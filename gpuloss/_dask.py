"""Dask: every loss on dask arrays (NumPy or CuPy chunks), lazily. A layer above the dispatch.

Each chunk is handed to the backend of its own library (NumPy, or the CUDA kernels for CuPy
chunks) and returns a float64 partial state [Σ w·l, the mean's denominator]; dask adds the
states tree-wise, so no worker ever holds more than its chunks and a few numbers. The loss is
a 0-d dask array; the gradient has the prediction's chunks, each chunk's gradient of the sum
times 1/D from the reduced state. Nothing is computed until the caller asks.

Each chunk is checked and computed by `rerun` (`gpuloss._api.run`), handed in by the dispatch:
this module imports only `gpuloss._call`, so no import circle runs through it.
"""

from __future__ import annotations

import string

import numpy as np

from . import _call


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
    ndim = pred.ndim
    letters = string.ascii_lowercase[:ndim]
    categorical = call.categorical
    # the class axis is one chunk, so each chunk holds whole rows
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
