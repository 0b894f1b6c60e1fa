"""StreamingLoss: a loss over more data than one call, one device or one machine holds."""

from __future__ import annotations

import math

import numpy as np

from . import _api, _dispatch


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

    Parameters
    ----------
    loss : str or gpuloss loss
        ``"mse"``, ``"bce"``, ... or the loss object itself.

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

    def __init__(self, loss, **options):
        from .losses import LOSSES

        if isinstance(loss, str):
            if loss not in LOSSES:
                msg = f"loss must be one of {', '.join(LOSSES)}; got {loss!r}."
                raise ValueError(msg)
            loss = LOSSES[loss]
        if getattr(loss, "name", None) not in LOSSES:
            msg = f"loss must be a gpuloss loss or its name, got {loss!r}."
            raise TypeError(msg)
        unknown = sorted(set(options) - set(loss.options))
        if unknown or "sample_weight" in options:
            bad = "sample_weight" if "sample_weight" in options else unknown[0]
            hint = " (pass it to update())" if bad == "sample_weight" else ""
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

    def update(self, pred, target, sample_weight=None) -> StreamingLoss:
        """Add one batch. Arguments as for the loss itself."""
        opts = dict(self.options)
        if sample_weight is not None:
            opts["sample_weight"] = sample_weight
        call = self.loss.prepare(pred, target, opts, want_value=True, want_grad=False,
                                 parts=True)
        parts, _ = _dispatch.route(call, rerun=_api.run)(call)
        self._state = parts if self._state is None else self._state + parts
        self.batches += 1
        return self

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
        return {
            "loss": self.loss.name,
            "reduction": self.reduction,
            "options": {k: _host(v) if hasattr(v, "shape") else v for k, v in self.options.items()},
            "state": None if self._state is None else _host(self._state),
            "batches": self.batches,
        }

    def __setstate__(self, d):
        from .losses import LOSSES

        self.loss = LOSSES[d["loss"]]
        self.reduction = d["reduction"]
        self.options = d["options"]
        self._state = d["state"]
        self.batches = d["batches"]

    def __repr__(self):
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (
            f"StreamingLoss({self.loss.name!r}, reduction={self.reduction!r}{opts}; "
            f"{self.batches} batches)"
        )


def _host(x):
    """A NumPy copy of a (possibly device) array."""
    if hasattr(x, "get"):
        return x.get()
    return np.asarray(x)


def _key(options):
    """A comparable form of options whose values may be arrays."""
    out = []
    for k in sorted(options):
        v = options[k]
        if hasattr(v, "shape"):
            v = (tuple(v.shape), _host(v).tobytes())
        out.append((k, v))
    return tuple(out)
