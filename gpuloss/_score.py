"""Scoring files: `gpuloss.score_files`, the Python side of `gpuloss score`.

Inputs are read one chunk at a time (.npy in row ranges straight from the file, .npz members
whole, Parquet columns batch by batch), so memory is bounded by the chunk, not the file.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ScoreResult:
    """What `score_files` found.

    Attributes
    ----------
    loss : float
        The reduced loss over every row (the sum when ``reduction="none"``); NaN when a
        row's loss is NaN.
    n : int
        Loss elements counted: every element for mse and bce*, every sample for cce*.
    nan_rows : int
        Rows (first axis) whose loss is NaN.
    device : str
        Where it was computed: ``"cpu"`` or ``"cuda (<card>)"``.
    seconds : float
        Wall time of the scoring loop.
    per_sample : str or None
        The absolute path of the per-sample file written, or None.
    nan_first_rows : tuple of int
        The first rows (at most three, counting from 0) whose loss is NaN; empty when none.
    """

    loss: float
    n: int
    nan_rows: int
    device: str
    seconds: float
    per_sample: str | None = None
    nan_first_rows: tuple[int, ...] = ()


def score_files(loss, pred, target, *, reduction="mean", sample_weight=None, per_sample=None,
                device="auto", chunk_mb=64.0, chunk_size=None, progress=False, weight=None,
                bias=None, **options):
    """Score a loss over files, chunk by chunk, on the CPU or a GPU.

    The Python side of ``gpuloss score``: memory is bounded by the chunk, not the files.
    Other keyword arguments are the loss's options; ``class_weight`` and ``pos_weight`` may
    be arrays or file specs.

    For ``"linear_cross_entropy"``, `pred` holds hidden states (N, H) and `weight` is the
    output layer's (V, H) weight, loaded once (a ``.npy`` file is memory-mapped): each chunk
    of rows is scored as ``cce_with_logits(hidden @ weight.T + bias, target)`` without its
    logits ever being whole (at most `chunk_mb` of them at a time). Hidden states and
    weight may differ in dtype: both are computed in the wider one (16-bit in float32 on
    the CPU).

    Parameters
    ----------
    loss : str or loss object
        A loss name (``"mse"``, ``"cce_with_logits"``, ``"linear_cross_entropy"``, ...) or
        one of the loss objects.
    pred, target : str or path
        ``"FILE.npy"``, ``"FILE.npz:KEY"`` or ``"FILE.parquet:COLUMN"``; the first axis is
        the rows.
    reduction : {"mean", "sum", "none"}
        ``"none"`` needs `per_sample`, and `loss` is then the sum.
    sample_weight : str or path, optional
        A file spec as above: one weight per row (read chunk by chunk), or an array
        broadcast to every chunk (loaded whole).
    per_sample : str or path, optional
        A ``.npy`` path for the per-sample losses (the ``reduction="none"`` result), written
        under a temporary name and renamed when complete: the file is whole or absent.
    device : {"auto", "cpu", "cuda"}
        ``"auto"`` takes a GPU if one is usable.
    chunk_mb : float
        Memory for one chunk of all inputs together, in MiB (default 64); for
        ``linear_cross_entropy`` also the most logits made at a time.
    chunk_size : int, optional
        Rows per chunk, instead of `chunk_mb`.
    progress : bool
        A progress bar on stderr (on a terminal, for runs over a second).
    weight : str, path or array, optional
        ``linear_cross_entropy`` only, and needed there: the output layer's weight, shape
        (V, H), as a file spec (``.npy`` files are memory-mapped) or an array.
    bias : str, path or array, optional
        ``linear_cross_entropy`` only: shape (V,), a file spec or an array.

    Returns
    -------
    ScoreResult

    Raises
    ------
    ValueError
        A missing or unreadable file, rows that differ, an option that does not apply to the
        loss, a domain error (its message names the first offending rows), and every error
        the loss itself raises.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, gpuloss as gl
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> np.save(folder / "p.npy", np.array([0.5, 1.5])); np.save(folder / "y.npy", np.zeros(2))
    >>> gl.score_files("mse", folder / "p.npy", folder / "y.npy").loss
    1.25
    """
    from . import _io, _linear
    from ._streaming import StreamingLoss
    from .losses import LOSSES

    linear = loss is _linear_loss() or loss == _linear_loss().name
    fn = _linear_loss() if linear else (
        LOSSES[loss] if isinstance(loss, str) else loss)
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and not linear:
            hint = "; per-class weights are class_weight" if name == "weight" else ""
            raise ValueError(f"{name} applies only to linear_cross_entropy (its output layer's "
                             f"{name}), not to {fn.name}{hint}.")
    if linear and weight is None:
        raise ValueError("linear_cross_entropy needs weight: the output layer's weight, shape "
                         "(V, H), as a file or an array.")
    for name, value in (("chunk_mb", chunk_mb), ("chunk_size", chunk_size)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}.")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none'; got {reduction!r}.")
    if reduction == "none" and per_sample is None:
        raise ValueError("reduction 'none' needs per_sample (a .npy path) to write to.")
    if per_sample is not None:
        folder = Path(per_sample).parent
        if not folder.is_dir():
            raise ValueError(f"per_sample {per_sample}: the folder {folder} does not exist.")
    if linear:  # the options of cce_with_logits but its class axis
        allowed = [o for o in _linear._OPTIONS if o not in ("reduction", "sample_weight")]
        declared = [o for o in LOSSES["cce_with_logits"].declared if o.name in allowed]
    else:
        allowed, declared = fn.options, fn.declared
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown[0]} does not apply to {fn.name}.")
    opts = dict(options)
    for opt in declared:  # array options may be given as files
        if opt.kind == "array" and isinstance(opts.get(opt.name), (str, Path)):
            opts[opt.name] = _load_small(str(opts[opt.name]), opt.name)
    if linear:  # loaded once, before any file is opened for its rows
        W, b = load_layer(weight, bias)

    src_pred = _io.open_input(str(pred), "pred")
    src_target = _io.open_input(str(target), "target")
    sources = [src_pred, src_target]
    tmp_out = None
    try:
        if src_pred.rows != src_target.rows:
            raise ValueError(f"Shape mismatch: pred has {src_pred.rows} rows ({pred}), target "
                             f"has {src_target.rows} rows ({target}).")
        src_weight = weight_all = None  # the sample weights: per row, or one array for all
        if sample_weight is not None:
            src_weight = _io.open_input(str(sample_weight), "sample_weight")
            sources.append(src_weight)
            if src_weight.rows != src_pred.rows:  # not one weight per row: broadcast it whole
                weight_all, src_weight = _load_small(str(sample_weight), "sample_weight"), None
        xp, where = device_namespace(device)
        dtype = None  # linear_cross_entropy: the dtype the rows are computed in
        layer = {}  # linear_cross_entropy: StreamingLoss' weight, bias and chunk_mb
        if linear:
            check_layer(W, src_pred, pred, weight_name=f"weight {weight}" if isinstance(
                weight, (str, Path)) else "weight")
            dtype = layer_dtype(src_pred.dtype, W.dtype, gpu=xp is not np)
            layer = {"weight": _to_device(xp, W, dtype), "chunk_mb": chunk_mb,
                     "bias": None if b is None else _to_device(xp, b, dtype)}
            fn = _BoundLinear(**layer)
        name = fn.name if linear else fn
        stream = StreamingLoss(name, reduction="sum" if reduction == "none" else reduction,
                               **layer, **opts)
        rows = src_pred.rows
        chunk = int(chunk_size) if chunk_size else rows_per_chunk(chunk_mb, sources)
        bar = progress_bar(rows) if progress else None
        written = None
        n_loss = nan_rows = 0
        nan_first: list[int] = []
        start_time = time.perf_counter()
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            p = src_pred.read(start, stop)
            p = xp.asarray(p if dtype is None else p.astype(dtype, copy=False))
            t = xp.asarray(src_target.read(start, stop))
            w = None
            if src_weight is not None:
                w = xp.asarray(src_weight.read(start, stop))
            elif weight_all is not None:
                w = xp.asarray(weight_all)
            part = StreamingLoss(name, reduction=stream.reduction, **layer, **opts)
            per = None
            try:
                if linear and per_sample is not None:  # the losses and the state, one pass
                    per = part._update_per_token(p, t, sample_weight=w)
                else:
                    part.update(p, t, sample_weight=w)
            except ValueError as exc:
                bad = _first_bad_rows(fn, p, t, w, opts, w_per_row=src_weight is not None)
                if not bad:
                    raise
                # the earlier chunks passed: these are the first offending rows of the files
                text = str(exc) if str(exc).endswith(".") else f"{exc}."
                where_bad = rows_text([start + row for row in bad])
                raise ValueError(f"{text} First at {where_bad} (counting from 0).") from exc
            stream.merge(part)
            if per_sample is not None or math.isnan(part.state[0]):
                if per is None:
                    per = fn(p, t, reduction="none", sample_weight=w, **opts)
                nan_at = _nan_rows(per, stop - start)
                nan_rows += len(nan_at)
                nan_first += [start + int(row) for row in nan_at[:FIRST_ROWS - len(nan_first)]]
                if per_sample is not None:
                    if written is None:
                        tmp_out = f"{per_sample}.tmp-{os.getpid()}"
                        written = np.lib.format.open_memmap(
                            tmp_out, mode="w+", dtype=per.dtype, shape=(rows, *per.shape[1:]))
                    written[start:stop] = per.get() if hasattr(per, "get") else per
            n_loss += _count(fn, p, opts)
            if bar is not None:
                bar.update(stop - start)
        value = float(stream.compute())
        seconds = time.perf_counter() - start_time
        if bar is not None:
            bar.close()
        if written is not None:
            written.flush()
            del written
            os.replace(tmp_out, per_sample)  # complete, or not there at all
            tmp_out = None
    finally:
        for src in sources:
            src.close()
        if tmp_out is not None and os.path.exists(tmp_out):
            os.remove(tmp_out)
    path = str(Path(per_sample).resolve()) if per_sample is not None else None
    return ScoreResult(value, n_loss, nan_rows, where, seconds, path, tuple(nan_first))


class _BoundLinear:
    """linear_cross_entropy with its layer given: called as the other losses are,
    ``fn(hidden, target, **options)``."""

    name = "linear_cross_entropy"
    family = "linear"

    def __init__(self, weight, bias, chunk_mb):
        self.weight, self.bias, self.chunk_mb = weight, bias, chunk_mb

    def __call__(self, hidden, target, **options):
        from .losses.linear import linear_cross_entropy

        return linear_cross_entropy(hidden, self.weight, target, bias=self.bias,
                                    chunk_mb=self.chunk_mb, **options)


def load_layer(weight, bias, *, weight_name="weight", bias_name="bias"):
    """(weight, bias) of linear_cross_entropy as arrays, from file specs (a .npy weight is
    memory-mapped, not read) or arrays, checked for what needs no hidden states: a (V, H)
    floating weight, a (V,) floating bias. The names are those of the messages."""
    from ._api import _FLOAT_DTYPES, dtype_name

    if isinstance(weight, (str, Path)):
        weight, weight_name = _load_matrix(str(weight), weight_name), f"{weight_name} {weight}"
    elif not hasattr(weight, "shape"):
        weight = np.asarray(weight)
    if len(weight.shape) != 2:
        raise ValueError(f"{weight_name} must have shape (V, H) (classes × hidden features); "
                         f"got shape {tuple(weight.shape)}.")
    if dtype_name(weight.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"{weight_name} must hold floating-point numbers, got "
                         f"{dtype_name(weight.dtype)}.")
    if bias is not None:
        if isinstance(bias, (str, Path)):
            bias, bias_name = _load_small(str(bias), bias_name), f"{bias_name} {bias}"
        elif not hasattr(bias, "shape"):
            bias = np.asarray(bias)
        V = int(weight.shape[0])
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{bias_name} must have shape ({V},) (one per class, the "
                             f"weight's rows); got shape {tuple(bias.shape)}.")
        if dtype_name(bias.dtype) not in _FLOAT_DTYPES:
            raise ValueError(f"{bias_name} must hold floating-point numbers, got "
                             f"{dtype_name(bias.dtype)}.")
    return weight, bias


def check_layer(weight, src_pred, pred, *, weight_name="weight", pred_name="pred"):
    """The hidden states' file against the weight: (N, ..., H) floating rows, H = the
    weight's second axis."""
    from ._api import _FLOAT_DTYPES, dtype_name

    shape, H = tuple(src_pred.shape), int(weight.shape[1])
    if len(shape) < 2:
        raise ValueError(f"{pred_name} {pred} must hold hidden states, shape (N, H) (tokens × "
                         f"features) for linear_cross_entropy; got shape {shape}.")
    if dtype_name(src_pred.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"{pred_name} {pred} must hold hidden states of a floating dtype, got "
                         f"{dtype_name(src_pred.dtype)}.")
    if shape[-1] != H:
        raise ValueError(f"Shape mismatch: {weight_name} has shape {tuple(weight.shape)}, but "
                         f"{pred_name} {pred} holds hidden states of {shape[-1]} features (its "
                         f"last axis): the weight must be (V, {shape[-1]}).")


def layer_dtype(hidden, weight, *, gpu: bool):
    """The dtype linear_cross_entropy computes a file's rows in: the wider of the hidden
    states' and the weight's; 16-bit in float32 on the CPU (as the loss itself does)."""
    sizes = {np.dtype(hidden).itemsize, np.dtype(weight).itemsize}
    if 8 in sizes:
        return np.dtype(np.float64)
    if 4 in sizes or not gpu:
        return np.dtype(np.float32)
    try:
        return np.promote_types(hidden, weight)
    except TypeError:  # float16 with bfloat16
        return np.dtype(np.float32)


def _to_device(xp, x, dtype):
    """An array of the layer in `dtype`, on the scoring device, converted once (a
    memory-mapped weight already in `dtype` stays mapped on the CPU)."""
    if xp is np and isinstance(x, np.ndarray):
        return x.astype(dtype, copy=False)
    host = x.get() if hasattr(x, "get") else np.asarray(x)
    return xp.asarray(host.astype(dtype, copy=False))


def _load_matrix(spec, name):
    """A whole array from a file spec: a .npy file memory-mapped (read as it is used),
    other formats read whole."""
    from . import _io

    src = _io.open_input(spec, name)
    try:
        if isinstance(src, _io.NpySource):
            return np.load(src.path, mmap_mode="r")
        return src.read(0, src.rows) if src.shape else src.read(0, 1)
    finally:
        src.close()


def device_namespace(choice: str):
    """(array namespace, description) for ``"auto"``, ``"cpu"`` or ``"cuda"``."""
    from ._dispatch import preferred_namespace
    from ._gpu_probe import nvidia_driver_present

    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {choice!r}.")
    if choice == "cpu":
        return np, "cpu"
    # Without a driver no GPU can be usable: skip importing CuPy (about a second or two)
    xp = preferred_namespace() if nvidia_driver_present() else np
    if choice == "cuda" and xp is np:
        raise ValueError("device cuda: no usable CUDA GPU here (CuPy missing, no driver or no "
                         "device); use cpu.")
    if xp is np:
        return np, "cpu"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    return xp, f"cuda ({props['name'].decode()})"


def _load_small(spec, name):
    from . import _io

    src = _io.open_input(spec, name)
    try:
        return src.read(0, src.rows) if src.shape else src.read(0, 1)
    finally:
        src.close()


def rows_per_chunk(megabytes: float, sources) -> int:
    """Rows per chunk so that one chunk of every input takes about `megabytes` MiB."""
    row_bytes = 0
    for src in sources:
        width = int(np.prod(src.shape[1:], dtype=np.int64)) if len(src.shape) > 1 else 1
        row_bytes += np.dtype(src.dtype).itemsize * width
    return max(1, int(megabytes * (1 << 20)) // max(row_bytes, 1))


def _nan_rows(per, rows: int) -> np.ndarray:
    """The rows (first axis) of a chunk whose loss is NaN anywhere, in order."""
    per = per.get() if hasattr(per, "get") else np.asarray(per)
    return np.flatnonzero(np.isnan(per.reshape(rows, -1)).any(axis=1))


FIRST_ROWS = 3  # offending rows named in a message: enough to find the pattern in the data


def rows_text(rows) -> str:
    """ "row 17" or "rows 17, 203, 999": row numbers for a message."""
    return f"{'row' if len(rows) == 1 else 'rows'} {', '.join(map(str, rows))}"


def _first_bad_rows(fn, p, t, w, opts, *, w_per_row: bool) -> list[int]:
    """The first rows of a chunk (at most FIRST_ROWS) that the loss refuses, found by halving
    the chunk and asking the loss itself, so that every check it makes is covered (ranges,
    class indices, weights). [] when the error is not in the rows' values: a shape, an option,
    a weight array shared by every row, or a class axis that runs along the rows."""
    if p.ndim == 0 or t.ndim == 0:
        return []  # a single value: no rows to tell apart
    if fn.family == "categorical" and opts.get("axis", -1) % p.ndim == 0:
        return []  # the "rows" are classes: slicing them changes the loss' question

    def refused(a, b):
        try:
            fn(p[a:b], t[a:b], reduction="sum", sample_weight=w[a:b] if w_per_row else w,
               **opts)
        except ValueError:
            return True
        return False

    if refused(0, 0):  # no rows at all and still refused: not the rows' fault
        return []
    found: list[int] = []

    def search(a, b):  # a range is refused exactly when it holds a refused row
        if len(found) >= FIRST_ROWS or not refused(a, b):
            return
        if b - a == 1:
            found.append(a)
            return
        search(a, (a + b) // 2)
        search((a + b) // 2, b)

    search(0, len(p))
    return found


def _count(fn, p, opts):
    """Loss elements in a chunk: every element (elementwise losses) or every sample
    (categorical)."""
    if fn.family == "categorical":
        return int(np.prod(p.shape)) // max(1, p.shape[opts.get("axis", -1)])
    if fn.family == "linear":  # one loss per token: hidden states (N, ..., H)
        return int(np.prod(p.shape[:-1]))
    return int(np.prod(p.shape))


def progress_bar(rows):
    """A progress bar on stderr, only on a terminal and only for runs over a second."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=rows, unit="rows", file=sys.stderr, delay=1.0, dynamic_ncols=True,
                leave=False)


def _linear_loss():
    from .losses.linear import linear_cross_entropy

    return linear_cross_entropy
