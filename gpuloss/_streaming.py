"""StreamingLoss: a loss over more data than one call, one device or one machine holds."""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys

import numpy as np

from . import _api, _dispatch

_LINEAR = "linear_cross_entropy"


class StreamingLoss:
    """Accumulate a loss batch by batch; partial states from many workers merge exactly.

    The state is two float64 numbers — Σ w·l and the mean's denominator (Σ w, or the number of
    counted elements/samples) — so it is small and picklable, and ``merge`` adds states from
    other processes, devices or machines. ``compute()`` gives what one call of the loss on all
    the data would give, for ``reduction`` "mean" (default) or "sum", with every option of
    the loss (class weights, ignore_index and label smoothing included).

    With CuPy batches the state stays on the GPU until ``compute()``.

    Keyword arguments are the loss's options (``reduction``, ``class_weight``,
    ``label_smoothing``, ...), fixed for the stream; ``sample_weight`` goes to ``update``,
    batch by batch.

    For ``"linear_cross_entropy"`` the output layer is given once, at construction:
    ``StreamingLoss("linear_cross_entropy", weight=W, bias=b, chunk_mb=256, **options)``,
    and ``update(hidden, target, sample_weight=None)`` adds one batch of hidden states
    (forward only: no gradient buffers, no backward GEMMs; the logits are made chunk by
    chunk, never whole). A pickled stream of it carries its state and a fingerprint of the
    weight and bias, not the arrays: it merges with streams of the same layer, and takes no
    more batches.

    Parameters
    ----------
    loss : str or gpuloss loss
        ``"mse"``, ``"bce"``, ... or the loss object itself (``gpuloss.linear_cross_entropy``
        included).
    weight : array, optional
        ``linear_cross_entropy`` only (and needed there): the output layer's weight, shape
        (V, H).
    bias : array, optional
        ``linear_cross_entropy`` only: shape (V,).
    chunk_mb : float, optional
        ``linear_cross_entropy`` only: megabytes of logits per chunk (default 256).

    Examples
    --------
    >>> import numpy as np, gpuloss as gl
    >>> rng = np.random.default_rng(0)
    >>> z, y = rng.standard_normal(1000), (rng.random(1000) < 0.5).astype(float)
    >>> stream = gl.StreamingLoss("bce_with_logits")
    >>> for start in range(0, 1000, 300):
    ...     _ = stream.update(z[start:start + 300], y[start:start + 300])
    >>> bool(np.isclose(stream.compute(), gl.bce_with_logits(z, y), rtol=1e-12))
    True
    """

    def __init__(self, loss, *, weight=None, bias=None, chunk_mb=None, **options):
        from . import _linear
        from .losses import LOSSES

        if isinstance(loss, str):
            if loss == _LINEAR:
                loss = _linear_loss()
            elif loss not in LOSSES:
                msg = f"loss must be one of {', '.join(LOSSES)}, {_LINEAR}; got {loss!r}."
                raise ValueError(msg)
            else:
                loss = LOSSES[loss]
        linear = loss is _linear_loss()
        if not linear and getattr(loss, "name", None) not in LOSSES:
            msg = f"loss must be a gpuloss loss or its name, got {loss!r}."
            raise TypeError(msg)
        self.weight = self.bias = self.chunk_mb = None
        self._fingerprint = None  # (weight's, bias'), made when first needed
        self._detached = False  # unpickled: the fingerprint, not the arrays
        if linear:
            self._set_layer(weight, bias, chunk_mb)
        else:
            given = [k for k, v in (("weight", weight), ("bias", bias), ("chunk_mb", chunk_mb))
                     if v is not None]
            if given:
                msg = (f"StreamingLoss({loss.name!r}) got {given[0]}=, which only "
                       f"{_LINEAR} takes (its output layer)")
                msg += (": per-class weights are class_weight=, per-sample weights go to "
                        "update()." if given[0] == "weight" else ".")
                raise TypeError(msg)
        allowed = _linear._OPTIONS if linear else loss.options
        unknown = sorted(set(options) - set(allowed))
        if unknown or "sample_weight" in options:
            bad = "sample_weight" if "sample_weight" in options else unknown[0]
            hint = " (pass it to update())" if bad == "sample_weight" else ""
            if bad == "axis" and linear:
                hint = " (the classes are weight's rows: there is no class axis to choose)"
            msg = f"StreamingLoss({loss.name!r}) got an unexpected option {bad!r}{hint}."
            raise TypeError(msg)
        reduction = options.pop("reduction", "mean")
        if reduction not in ("mean", "sum"):
            msg = (
                f"reduction must be 'mean' or 'sum' for a stream; got {reduction!r} "
                "(a stream keeps no per-sample data)."
            )
            raise ValueError(msg)
        self.loss = loss
        self.reduction = reduction
        self.options = options
        self._state = None  # float64 [Σ w·l, denominator], on the batches' device
        self.batches = 0
        if linear:  # every check that needs no data, now (the options' values included)
            self._linear_check(self._empty_hidden(), self._empty_target(), self.options)

    def update(self, pred, target, sample_weight=None) -> StreamingLoss:
        """Add one batch. Arguments as for the loss itself (for ``linear_cross_entropy``:
        ``update(hidden, target, sample_weight=None)``)."""
        opts = dict(self.options)
        if sample_weight is not None:
            opts["sample_weight"] = sample_weight
        if self.loss.name == _LINEAR:
            from . import _linear

            with _no_grad(pred, self.weight):
                c = self._linear_check(pred, target, opts)
                parts, _ = _linear.compute(c, want_value=True, need=(False, False, False),
                                           parts=True)
        else:
            call = self.loss.prepare(pred, target, opts, want_value=True, want_grad=False,
                                     parts=True)
            parts, _ = _dispatch.route(call, rerun=_api.run)(call)
        self._add(parts)
        return self

    def _add(self, parts):
        self._state = parts if self._state is None else self._state + parts
        self.batches += 1

    # -- linear_cross_entropy -----------------------------------------------------------------

    def _set_layer(self, weight, bias, chunk_mb):
        from . import _linear

        if weight is None:
            msg = (f"StreamingLoss({_LINEAR!r}) needs weight=, the output layer's weight of "
                   "shape (V, H) (classes × hidden features).")
            raise TypeError(msg)
        weight = _dispatch.as_array(weight, "weight")
        xp = _dispatch.array_namespace(weight, {})
        if _api.dtype_kind(xp, weight.dtype) != "float":
            msg = (f"weight must have a real floating dtype, got "
                   f"{_api.dtype_name(weight.dtype)}.")
            raise TypeError(msg)
        if weight.ndim != 2:
            msg = (f"weight must have shape (V, H) (classes × hidden features), got shape "
                   f"{_api._shape(weight)}.")
            raise ValueError(msg)
        if bias is not None:
            bias = _dispatch.as_array(bias, "bias", like=weight, xp=xp)
            if _api._shape(bias) != (int(weight.shape[0]),):
                msg = (f"bias must have shape ({int(weight.shape[0])},) (one per class, "
                       f"weight's rows), got {_api._shape(bias)}.")
                raise ValueError(msg)
            if _api.dtype_name(bias.dtype) != _api.dtype_name(weight.dtype):
                msg = (f"bias has dtype {_api.dtype_name(bias.dtype)} and weight "
                       f"{_api.dtype_name(weight.dtype)}: pass them in one dtype.")
                raise TypeError(msg)
        self.weight, self.bias = weight, bias
        self.chunk_mb = _linear.DEFAULT_CHUNK_MB if chunk_mb is None else chunk_mb
        self._wide = None  # NumPy 16-bit layers: a float32 copy, made once for the stream

    def _linear_check(self, hidden, target, options):
        from . import _linear

        if self._detached:
            msg = (f"This StreamingLoss({_LINEAR!r}) was unpickled: it carries its state and "
                   "a fingerprint of the weight, not the weight, and takes no more batches. "
                   "Merge it into a stream made with the weight.")
            raise RuntimeError(msg)
        weight, bias = self.weight, self.bias
        if (type(hidden) is np.ndarray and isinstance(weight, np.ndarray)
                and hidden.dtype == weight.dtype and weight.dtype.itemsize == 2):
            # the CPU computes 16-bit layers in float32 (exactly the same numbers): convert
            # the weight once for the stream, not once per batch as each call would
            if self._wide is None:
                self._wide = (weight.astype(np.float32),
                              None if bias is None else bias.astype(np.float32))
            weight, bias = self._wide
            hidden = hidden.astype(np.float32)
        return _linear.check(hidden, weight, target, bias, self.chunk_mb, dict(options))

    def _empty_hidden(self):
        xp = _dispatch.array_namespace(self.weight, {})
        shape = (0, int(self.weight.shape[1]))
        if isinstance(self.weight, np.ndarray):
            return np.empty(shape, self.weight.dtype)
        import array_api_compat

        return xp.empty(shape, dtype=self.weight.dtype,
                        device=array_api_compat.device(self.weight))

    def _empty_target(self):
        if isinstance(self.weight, np.ndarray):
            return np.empty((0,), np.int64)
        import array_api_compat

        xp = _dispatch.array_namespace(self.weight, {})
        return xp.empty((0,), dtype=xp.int32, device=array_api_compat.device(self.weight))

    def _update_per_token(self, hidden, target, sample_weight=None):
        """`update`, returning the batch's per-token losses too, from one forward pass (what
        `gpuloss score --per-sample` needs): the state's Σ w·l is their sum (in float64), its
        denominator comes from a pass over zero-width hidden states (the denominator does not
        depend on the logits, and that pass has no GEMM to speak of)."""
        import array_api_compat

        from . import _linear

        opts = dict(self.options)
        if sample_weight is not None:
            opts["sample_weight"] = sample_weight
        with _no_grad(hidden, self.weight):
            c = self._linear_check(hidden, target, dict(opts, reduction="none"))
            per, _ = _linear.compute(c, want_value=True, need=(False, False, False))
            zero_width = c.xp.reshape(c.hidden[:, :0], (*c.lead, 0))
            empty = _linear.check(zero_width, c.weight[:, :0], target, None, self.chunk_mb,
                                  opts)
            zero, _ = _linear.compute(empty, want_value=True, need=(False, False, False),
                                      parts=True)
            xp = array_api_compat.array_namespace(per)
            total = xp.sum(xp.astype(xp.reshape(per, (-1,)), xp.float64))
            parts = xp.stack([total, zero[1]])
        self._add(parts)
        return per

    def _layer_fingerprint(self):
        if self._fingerprint is None:
            self._fingerprint = (_fingerprint(self.weight), _fingerprint(self.bias))
        return self._fingerprint

    def _same_layer(self, other) -> bool:
        if self.loss.name != _LINEAR:
            return True
        if other.weight is self.weight and other.bias is self.bias and self.weight is not None:
            return True  # the same arrays: nothing to compare
        return other._layer_fingerprint() == self._layer_fingerprint()

    def merge(self, other: StreamingLoss) -> StreamingLoss:
        """Add another stream's state (same loss and options) to this one."""
        if not isinstance(other, StreamingLoss):
            msg = f"merge needs a StreamingLoss, got {type(other).__name__}."
            raise TypeError(msg)
        if (other.loss.name, other.reduction, _key(other.options)) != (
            self.loss.name,
            self.reduction,
            _key(self.options),
        ):
            msg = (
                f"Cannot merge StreamingLoss({other.loss.name!r}, {other.options}) into "
                f"StreamingLoss({self.loss.name!r}, {self.options}): loss and options differ."
            )
            raise ValueError(msg)
        if not self._same_layer(other):
            msg = (f"Cannot merge StreamingLoss({_LINEAR!r}) streams of different output "
                   f"layers: their weight or bias differ.")
            raise ValueError(msg)
        if other._state is not None:
            theirs = _host(other._state)
            self._state = theirs if self._state is None else _host(self._state) + theirs
        self.batches += other.batches
        return self

    @property
    def state(self) -> tuple[float, float]:
        """(Σ w·l, the mean's denominator) so far, as Python floats (reads the device)."""
        if self._state is None:
            return (0.0, 0.0)
        total, denom = _host(self._state)
        return float(total), float(denom)

    def compute(self) -> np.ndarray:
        """The loss over everything seen: a 0-d float64 NumPy array (NaN for a mean over
        nothing, as the loss itself)."""
        total, denom = self.state
        if self.reduction == "sum":
            return np.asarray(total)
        return np.asarray(total / denom if denom > 0 else math.nan)

    def __getstate__(self):
        d = {
            "loss": self.loss.name,
            "reduction": self.reduction,
            "options": {k: _host(v) if hasattr(v, "shape") else v for k, v in self.options.items()},
            "state": None if self._state is None else _host(self._state),
            "batches": self.batches,
        }
        if self.loss.name == _LINEAR:  # the layer's fingerprint, not the layer
            d["layer"] = self._layer_fingerprint()
            d["chunk_mb"] = self.chunk_mb
        return d

    def __setstate__(self, d):
        from .losses import LOSSES

        if d["loss"] == _LINEAR:
            self.loss = _linear_loss()
        else:
            self.loss = LOSSES[d["loss"]]
        self.reduction = d["reduction"]
        self.options = d["options"]
        self._state = d["state"]
        self.batches = d["batches"]
        self.weight = self.bias = None
        self.chunk_mb = d.get("chunk_mb")
        self._fingerprint = d.get("layer")
        self._detached = "layer" in d
        self._wide = None

    def __repr__(self):
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        if self.loss.name == _LINEAR:
            if self.weight is None:
                shape, dtype = self._fingerprint[0][:2]
                layer = f", weight={shape} {dtype} (unpickled: not held)"
            else:
                layer = (f", weight={_api._shape(self.weight)} "
                         f"{_api.dtype_name(self.weight.dtype)}")
            layer += "" if self.bias is None and (self._fingerprint is None or
                                                   self._fingerprint[1] is None) else ", bias"
            opts = layer + opts
        return (
            f"StreamingLoss({self.loss.name!r}, reduction={self.reduction!r}{opts}; "
            f"{self.batches} batches)"
        )


def _host(x):
    """A NumPy copy of a (possibly device) array."""
    if hasattr(x, "get"):
        return x.get()
    return np.asarray(x)


def _fingerprint(x):
    """(shape, dtype, digest of the bytes) of an array of any library, or None: what tells
    two streams' output layers apart without holding both (it reads the array once)."""
    if x is None:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().to("cpu").contiguous().reshape(-1)
        data = t.view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
    else:
        try:
            data = _host(x)
        except (TypeError, ValueError, RuntimeError):
            data = np.from_dlpack(x)
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return (_api._shape(x), _api.dtype_name(x.dtype), hashlib.blake2b(data).hexdigest())


def _no_grad(*arrays):
    """PyTorch's no_grad where the arrays are tensors (scoring builds no graph), else
    nothing."""
    torch = sys.modules.get("torch")
    if torch is not None and any(isinstance(x, torch.Tensor) for x in arrays):
        return torch.no_grad()
    return contextlib.nullcontext()


def _key(options):
    """A comparable form of options whose values may be arrays."""
    out = []
    for k in sorted(options):
        v = options[k]
        if hasattr(v, "shape"):
            v = (tuple(v.shape), _host(v).tobytes())
        out.append((k, v))
    return tuple(out)


def _linear_loss():
    from .losses.linear import linear_cross_entropy

    return linear_cross_entropy
