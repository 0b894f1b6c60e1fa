"""The machinery of `gpuloss.distributed` (its docstring says what happens per call): each
rank's checks, the layout table, the exchanges, the pass over one rank's logits, and the
autograd function of `cce_with_logits`. `gpuloss._distributed_linear` builds on it."""

from __future__ import annotations

import math
import numbers
import zlib

import numpy as np

from . import _api, _call, _shards

DEFAULT_BLOCK = 1024  # classes per block in the deterministic mode

# the layout table: one row per rank, MAX-reduced from −inf (each rank fills its own row)
(_FAILED, _ROWS, _WIDTH, _START, _LABELS, _DTYPE, _MODE, _OPTIONS, _CHECKSUM, _LABEL_LO,
 _LABEL_HI) = range(11)
_LAYOUT_FIELDS = 11
_CHECK_MOD = 2**52  # checksums modulo this: exact in the float64 table
_DTYPES = {"float16": 1, "bfloat16": 2, "float32": 3, "float64": 4}


def _torch():
    import torch

    return torch


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        msg = ("gpuloss.distributed needs an initialised torch.distributed process group "
               "(torch.distributed.init_process_group, e.g. under torchrun).")
        raise RuntimeError(msg)
    return dist


# ---------------------------------------------------------------------------------------------
# the rank's own checks (before any exchange)


class _Local:
    """One rank's checked inputs, flattened to (N, width)."""

    __slots__ = ("N", "block", "cdt", "cw", "deterministic", "dtype", "labels", "lead",
                 "logits", "options", "start", "sw", "target", "width", "xp")

    def rows(self, lo: int, hi: int) -> _Local:
        """The same shard for the tokens [lo, hi) (a chunk of them)."""
        sub = _Local()
        for name in self.__slots__:
            setattr(sub, name, getattr(self, name))
        sub.N, sub.lead = hi - lo, (hi - lo,)
        sub.target = self.target[lo:hi]
        sub.sw = None if self.sw is None else self.sw[lo:hi]
        return sub


def _check_local(logits, target, vocab_start, deterministic, block, options) -> _Local:
    torch = _torch()
    if not isinstance(logits, torch.Tensor):
        msg = f"local_logits must be a torch.Tensor, got {type(logits).__name__}."
        raise TypeError(msg)
    _check_float(logits.dtype, "local_logits")
    if logits.ndim < 1:
        msg = "local_logits must have a class axis (shape (..., V_r)), got a 0-d tensor."
        raise ValueError(msg)
    c = _check_shard(tuple(logits.shape[:-1]), int(logits.shape[-1]), logits.dtype,
                     logits.device, target, vocab_start, deterministic, block, options,
                     "local_logits")
    c.logits = logits.reshape(c.N, c.width)
    return c


def _check_float(dtype, name):
    if _api.dtype_name(dtype) not in _DTYPES:
        msg = (f"Expected {name} to have a real floating dtype (float16, bfloat16, float32 or "
               f"float64), got {_api.dtype_name(dtype)}.")
        raise TypeError(msg)


def _check_shard(lead, width, dtype, device, target, vocab_start, deterministic, block,
                 options, what) -> _Local:
    """The checks of one rank's shard: `lead` the tokens' shape, `width` its classes."""
    torch = _torch()
    unknown = sorted(set(options) - set(_shards.SUPPORTED))
    if unknown:
        name = unknown[0]
        why = {"focal_gamma": " The focal loss's per-class terms need the whole softmax a "
                              "second time: it is not offered over a split vocabulary.",
               "axis": " The classes are the last axis of local_logits."}.get(name, "")
        msg = (f"gpuloss.distributed got an unexpected keyword argument {name!r}; it accepts "
               f"{', '.join(_shards.SUPPORTED)}.{why}")
        raise TypeError(msg)
    dtype_name = _api.dtype_name(dtype)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        msg = f"block must be a positive number of classes, got {block!r}."
        raise ValueError(msg)
    if not isinstance(deterministic, bool):
        msg = f"deterministic must be True or False, got {deterministic!r}."
        raise TypeError(msg)
    if vocab_start is not None and (isinstance(vocab_start, bool)
                                    or not isinstance(vocab_start, numbers.Integral)
                                    or vocab_start < 0):
        msg = (f"vocab_start must be a non-negative int (this rank's first class) or None (the "
               f"ranks' shards in rank order), got {vocab_start!r}.")
        raise ValueError(msg)
    for name in ("target", "sample_weight", "class_weight"):
        x = target if name == "target" else options.get(name)
        if isinstance(x, torch.Tensor) and x.requires_grad:
            msg = (f"{name} requires grad, but gpuloss differentiates with respect to the "
                   f"logits only (its gradient would be lost). Pass {name}.detach().")
            raise RuntimeError(msg)
    cce = _api._BY_NAME["cce_with_logits"]
    scalars = {k: v for k, v in options.items() if k not in ("sample_weight", "class_weight")}
    _api.check_scalar_options(cce, scalars, 2, dtype_name)

    import array_api_compat.torch as xp

    c = _Local()
    c.xp = xp
    c.dtype, c.deterministic, c.block = dtype, deterministic, block
    c.cdt = torch.float64 if dtype == torch.float64 else torch.float32
    c.lead, c.width = lead, width
    c.N = math.prod(lead)
    c.start = vocab_start
    c.logits = None
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(np.asarray(target), device=device)
    target = target.detach()
    c.labels = not (target.is_floating_point() or target.is_complex())
    if target.dtype == torch.bool:
        msg = ("Expected target to hold class indices (integer dtype) or probabilities "
               "(floating dtype), got bool.")
        raise TypeError(msg)
    if c.labels:
        if tuple(target.shape) != c.lead:
            msg = (f"Shape mismatch: class-index target must have the tokens' shape, {c.lead} "
                   f"({what}' shape without its last axis); got {tuple(target.shape)}.")
            raise ValueError(msg)
        c.target = target.reshape(c.N).to(device=device, dtype=torch.int64)
    else:
        if tuple(target.shape) != (*c.lead, c.width):
            msg = (f"Shape mismatch: probability targets must be this rank's shard, shape "
                   f"{(*c.lead, c.width)} (tokens × this rank's classes); got "
                   f"{tuple(target.shape)}.")
            raise ValueError(msg)
        c.target = target.reshape(c.N, c.width).to(device)
        if options.get("validate", True) and c.target.numel():
            lo, hi = float(c.target.min()), float(c.target.max())
            if lo < 0 or hi > 1:  # NaN compares False: it propagates, as on one device
                msg = (f"target must hold probabilities in [0, 1]; found values in "
                       f"[{lo:.6g}, {hi:.6g}] (in this rank's shard).")
                raise ValueError(msg)
    cw = options.get("class_weight")
    if cw is not None:
        cw = torch.as_tensor(cw, device=device).detach()
        if tuple(cw.shape) != (c.width,):
            msg = (f"class_weight must be this rank's shard of the class weights, shape "
                   f"({c.width},), one per class of this rank; got {tuple(cw.shape)}.")
            raise ValueError(msg)
        cw = cw.to(c.cdt)
        if options.get("validate", True):
            _check_weights(cw, "class_weight")
    c.cw = cw
    sw = options.get("sample_weight")
    if sw is not None:
        sw = torch.as_tensor(sw, device=device).detach()
        try:
            sw = torch.broadcast_to(sw, c.lead)
        except RuntimeError:
            msg = (f"sample_weight of shape {tuple(sw.shape)} does not broadcast to the "
                   f"tokens' shape {c.lead}.")
            raise ValueError(msg) from None
        sw = sw.reshape(c.N).to(torch.float64)
        if options.get("validate", True):
            _check_weights(sw, "sample_weight")
    c.sw = sw
    c.options = {k: v for k, v in options.items() if k not in ("sample_weight", "class_weight")}
    return c


def _check_weights(w, name):
    """The single-device rule and message: finite and >= 0 (NaN fails)."""
    if w.numel() == 0:
        return
    lo, hi = float(w.min()), float(w.max())
    if w.isnan().any():
        lo = math.nan
    if not _call.weights_ok(lo, hi):
        _call.raise_bad_weights(name, lo, hi)


def _options_code(c: _Local) -> float:
    """A number that differs (almost surely) between two calls with different options: every
    rank must run the same loss. Values normalised first (softcap 2 is 2.0, an np.int64
    ignore_index an int)."""
    o = c.options
    cap, ii = o.get("softcap"), o.get("ignore_index")
    key = repr((o.get("reduction", "mean"), float(o.get("label_smoothing", 0.0)),
                float(o.get("z_loss", 0.0)), None if cap is None else float(cap),
                None if ii is None else int(ii), bool(o.get("validate", True)),
                c.cw is not None, c.sw is not None, c.deterministic, c.block))
    return float(zlib.crc32(key.encode()))


def _checksum(c: _Local) -> float:
    """A checksum of the labels and of the sample weights' bits, which every rank must share:
    integer sums (modulo 2^52, exact in the table), so that no summation order or thread
    count changes it, and NaN weights compare equal."""
    torch = _torch()
    total = 0
    if c.N:  # each value times an odd weight of its position: a swap changes the sum
        odd = torch.arange(1, 2 * c.N, 2, dtype=torch.int64, device=c.target.device)
        if c.labels:
            total += int((c.target * odd).sum())  # (int64 wraps the same way everywhere)
        if c.sw is not None:
            total += int((c.sw.contiguous().view(torch.int64) * odd).sum())
    return float(total % _CHECK_MOD)


def _label_range(c: _Local) -> tuple[float, float]:
    """The counted labels' (not ignore_index) smallest and largest, for every rank's check."""
    if not c.labels:
        return 0.0, 0.0
    ii = c.options.get("ignore_index")
    kept = c.target if ii is None else c.target[c.target != ii]
    if kept.numel() == 0:
        return math.inf, -math.inf  # (the MAX of −lo and of hi: nothing)
    return float(kept.min()), float(kept.max())


# ---------------------------------------------------------------------------------------------
# the exchanges


class _Layout:
    __slots__ = ("K", "label_hi", "label_lo", "rank", "start", "starts", "widths", "world")


def _agree_on_layout(dist, group, c: _Local | None, error: BaseException | None, device):
    """The layout table (one all-reduce MAX), then the same verdict on every rank."""
    torch = _torch()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    table = torch.full((world, _LAYOUT_FIELDS), -math.inf, dtype=torch.float64, device=device)
    if c is None:
        table[rank, _FAILED] = 1.0
    else:
        lo, hi = _label_range(c)
        table[rank] = torch.tensor(
            [0.0, c.N, c.width, -1.0 if c.start is None else c.start, float(c.labels),
             _DTYPES[_api.dtype_name(c.dtype)], float(c.deterministic), _options_code(c),
             _checksum(c), -lo, hi], dtype=torch.float64)
    dist.all_reduce(table, op=dist.ReduceOp.MAX, group=group)
    t = table.cpu().tolist()
    failed = [r for r in range(world) if t[r][_FAILED] == 1.0]
    if failed:
        if error is not None:
            raise error
        msg = (f"rank {failed[0]} of the group refused its inputs (its own error says why); "
               f"every rank stops here rather than wait for it.")
        raise RuntimeError(msg)

    def differ(field, what):
        values = [t[r][field] for r in range(world)]
        if len(set(values)) > 1:
            first = next(r for r in range(world) if values[r] != values[0])
            msg = (f"The ranks disagree on {what}: rank 0 has {_show(field, values[0])}, rank "
                   f"{first} {_show(field, values[first])}. Every rank must make the same call "
                   f"with its shard of the classes.")
            raise ValueError(msg)

    differ(_ROWS, "the number of tokens (local_logits' leading shape)")
    differ(_LABELS, "the kind of target (class indices or probabilities)")
    differ(_DTYPE, "local_logits' dtype")
    differ(_MODE, "deterministic")
    differ(_OPTIONS, "the options (reduction, label_smoothing, z_loss, softcap, ignore_index, "
                     "validate, block, which weights are given)")
    differ(_CHECKSUM, "the labels or sample weights (their sums differ)")
    widths = [int(t[r][_WIDTH]) for r in range(world)]
    given = [t[r][_START] for r in range(world)]
    if all(g == -1.0 for g in given):
        starts = [sum(widths[:r]) for r in range(world)]
    elif any(g == -1.0 for g in given):
        r = next(r for r in range(world) if (given[r] == -1.0) != (given[0] == -1.0))
        msg = (f"vocab_start is given on some ranks and not on others (rank 0: {given[0]:g}, "
               f"rank {r}: {given[r]:g}, -1 for None): give it on every rank or on none.")
        raise ValueError(msg)
    else:
        starts = [int(g) for g in given]
    _check_cover(starts, widths)
    lay = _Layout()
    lay.world, lay.rank, lay.start, lay.K = world, rank, starts[rank], sum(widths)
    lay.starts, lay.widths = starts, widths
    # the labels' range, as every rank sees it in the table: one verdict everywhere
    lay.label_lo = -max(t[r][_LABEL_LO] for r in range(world))
    lay.label_hi = max(t[r][_LABEL_HI] for r in range(world))
    if c.deterministic:
        for r in range(world):
            end = starts[r] + widths[r]
            if widths[r] and (starts[r] % c.block or (end % c.block and end != lay.K)):
                msg = (f"deterministic=True needs every shard made of whole blocks of "
                       f"{c.block} classes: rank {r} holds classes [{starts[r]}, {end}). Align "
                       f"the shards (pad the vocabulary) or pass block= a divisor of them.")
                raise ValueError(msg)
    return lay


def _show(field, value):
    if field == _DTYPE:
        return next(k for k, v in _DTYPES.items() if v == value)
    if field == _LABELS:
        return "class indices" if value else "probabilities"
    if field in (_OPTIONS, _CHECKSUM):
        return f"{value!r}"
    return f"{value:g}"


def _check_cover(starts, widths):
    """The shards must tile [0, V) exactly: no class twice, none missing."""
    order = sorted(range(len(starts)), key=lambda r: (starts[r], widths[r]))
    pos = 0
    for r in order:
        if widths[r] == 0:
            continue
        if starts[r] < pos:
            prev = next(q for q in order if widths[q] and starts[q] < pos
                        and starts[q] + widths[q] > starts[r] and q != r)
            msg = (f"The shards overlap: rank {prev} holds classes [{starts[prev]}, "
                   f"{starts[prev] + widths[prev]}) and rank {r} [{starts[r]}, "
                   f"{starts[r] + widths[r]}). Check vocab_start on each rank.")
            raise ValueError(msg)
        if starts[r] > pos:
            msg = (f"No rank holds classes [{pos}, {starts[r]}): the shards must cover the "
                   f"vocabulary from 0 with no gap. Check vocab_start on each rank.")
            raise ValueError(msg)
        pos = starts[r] + widths[r]


def _check_labels(c: _Local, lay: _Layout):
    """Class indices in [0, V) (or ignore_index), from the layout table's range: the same
    verdict on every rank."""
    if not c.labels or not c.options.get("validate", True):
        return
    lo, hi = lay.label_lo, lay.label_hi
    if lo <= hi and (lo < 0 or hi >= lay.K):
        _call.raise_bad_labels(int(lo), int(hi), lay.K, c.options.get("ignore_index"))


# ---------------------------------------------------------------------------------------------
# the pass: local states, exchange, loss per row, this rank's gradient


def _capped(c: _Local, logits):
    """The logits in the compute dtype, soft-capped, and the cap's derivative (or None)."""
    s = logits.to(c.cdt)
    cap = c.options.get("softcap")
    if cap is None:
        return s, None
    cap = min(float(cap), float(np.finfo(np.float32 if c.cdt != _torch().float64
                                         else np.float64).max))
    return _shards.soft_cap(c.xp, s, cap)


def _rows(dist, group, c: _Local, lay: _Layout, s, *, fast_k=False):
    """The exchanges, then the merged per-row state (N, 8), identical on every rank."""
    torch = _torch()
    xp = c.xp
    smoothing = float(c.options.get("label_smoothing", 0.0))
    K = lay.K
    if c.deterministic:
        st = _shards.states(xp, s, start=lay.start, block=c.block, labels=c.labels,
                            target=c.target, cw=c.cw, smoothing=smoothing,
                            ignore_index=c.options.get("ignore_index"), K=K)
        nblocks = -(-K // c.block)
        table = torch.zeros((c.N, nblocks, _shards.FIELDS), dtype=torch.float64,
                            device=s.device)
        if c.width:  # (a shard of no classes fills no slot: its one empty piece is not a
            first = lay.start // c.block  # block, and its start may be another rank's)
            table[:, first:first + st.shape[1]] = st
        dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)  # each slot: one rank's
        return _shards.merge_blocks(xp, table)
    st = _shards.states(xp, s, start=lay.start, block=None, labels=c.labels, target=c.target,
                        cw=c.cw, smoothing=smoothing,
                        ignore_index=c.options.get("ignore_index"), K=K)[:, 0]
    top = st[:, _shards.M].clone()
    if fast_k:  # no layout table: the vocabulary's size rides with the maxima
        top = torch.cat([top, torch.tensor([float(lay.start + c.width)], dtype=torch.float64,
                                           device=top.device)])
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    if fast_k:
        if top[-1] == math.inf:
            msg = ("a rank of the group refused its inputs (its own error says why); every "
                   "rank stops here rather than wait for it.")
            raise RuntimeError(msg)
        lay.K = int(top[-1])
        top = top[:-1]
    packed = _shards.rebase(xp, st, top)[:, _shards.COUNT:].contiguous()
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    merged = torch.empty((c.N, _shards.FIELDS), dtype=torch.float64, device=s.device)
    merged[:, _shards.M] = top
    merged[:, _shards.COUNT:] = packed
    return merged


def prepare(local_logits, target, group, vocab_start, deterministic, block, options, *,
             check=None, fast=True):
    """The local checks (`check`: a function of no argument that returns the _Local, by
    default local_logits') and the layout: (dist, c, lay)."""
    dist = _dist()
    error = None
    if check is None:
        def check():
            return _check_local(local_logits, target, vocab_start, deterministic, block,
                                options)
    try:
        c = check()
    except (TypeError, ValueError, RuntimeError) as e:
        c, error = None, e
    if (fast and not options.get("validate", True) and vocab_start is not None
            and not deterministic):
        if error is not None:  # no layout table to carry the verdict: the maxima's exchange
            _refuse_in_fast_path(dist, group, local_logits)  # carries it, where it can
            raise error
        lay = _Layout()  # the fast path: two exchanges; K arrives with the maxima
        lay.world, lay.rank = dist.get_world_size(group), dist.get_rank(group)
        lay.start, lay.K = vocab_start, -1
        return dist, c, lay
    lay = _agree_on_layout(dist, group, c, error, _safe_device(local_logits))
    _check_labels(c, lay)
    return dist, c, lay


def _refuse_in_fast_path(dist, group, logits):
    """This rank refused its input on the fast path: it joins the maxima's all-reduce with
    +inf as the vocabulary's end, so the other ranks stop there too. Without even a token
    count (logits not a tensor) the others wait for the group's timeout."""
    torch = _torch()
    if not isinstance(logits, torch.Tensor) or logits.ndim < 1:
        return
    buf = torch.full((math.prod(logits.shape[:-1]) + 1,), -math.inf, dtype=torch.float64,
                     device=logits.device)
    buf[-1] = math.inf
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)


def _safe_device(x):
    torch = _torch()
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def forward(c: _Local, dist, group, lay: _Layout, *, want_grad: bool):
    """(loss, gradient of local_logits or None): the reduced loss is the same on every rank;
    the gradient is of the reduced loss (or, for 'none', of each row's own loss)."""
    torch = _torch()
    xp = c.xp
    s, sech2 = _capped(c, c.logits.detach())
    merged = _rows(dist, group, c, lay, s, fast_k=lay.K == -1)
    reduction = c.options.get("reduction", "mean")
    smoothing = float(c.options.get("label_smoothing", 0.0))
    ii = c.options.get("ignore_index")
    r = _shards.finish(xp, merged, labels=c.labels, w=c.sw, smoothing=smoothing,
                       z_loss=float(c.options.get("z_loss", 0.0)), K=lay.K,
                       reduction=reduction, ignore_index=ii, y=c.target if c.labels else None)
    if reduction == "none":
        value = r.loss.to(c.dtype).reshape(c.lead)
        scale = torch.ones(c.N, dtype=torch.float64, device=s.device)
    else:
        total = float(torch.sum(r.loss))
        if reduction == "mean":
            total = _shards.mean_value(total, r.denominator)
        value = torch.tensor(total, dtype=torch.float64, device=s.device).to(c.dtype)
        inv = _shards.mean_scale(r.denominator) if reduction == "mean" else 1.0
        scale = torch.full((c.N,), inv, dtype=torch.float64, device=s.device)
    grad = None
    if want_grad:
        grad = _shards.grad(xp, s, sech2, r, start=lay.start, labels=c.labels,
                            target=c.target, cw=c.cw, smoothing=smoothing, K=lay.K,
                            row_scale=scale, ignore_index=ii,
                            y=c.target if c.labels else None, out_dtype=c.dtype)
        grad = grad.reshape(*c.lead, c.width)
    return value, grad


def cce_function():
    """The autograd function (made once: torch is imported only when a tensor arrives)."""
    if "cce" in _FN:
        return _FN["cce"]
    torch = _torch()

    class _CceFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, c, dist, group, lay):
            value, grad = forward(c, dist, group, lay, want_grad=True)
            ctx.grad = grad
            ctx.none = c.options.get("reduction", "mean") == "none"
            return value

        @staticmethod
        def backward(ctx, grad_output):
            if torch.is_grad_enabled():
                raise RuntimeError(_NO_SECOND)
            grad = ctx.grad
            if grad is None:
                raise RuntimeError("gpuloss.distributed: backward ran twice through one "
                                   "call (retain_graph); call the loss again instead.")
            ctx.grad = None
            g = grad_output.detach()
            if ctx.none:  # each row's own upstream gradient
                grad = grad * g.to(grad.dtype)[..., None]
            elif float(g) != 1.0:
                grad = grad.mul_(g.to(grad.dtype))
            return grad, None, None, None, None

    _FN["cce"] = _CceFn
    return _CceFn


_NO_SECOND = ("gpuloss.distributed has no second derivative: backward hands over the "
              "gradient formed in forward (create_graph=True, grad of grad).")
_FN = {}
