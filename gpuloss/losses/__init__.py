"""Every loss, by family: the one place to learn what a loss does.

`regression` (mse, ...), `binary` (bce, bce_with_logits, ...), `categorical` (cce,
cce_with_logits, ...). A declaration names its family, its options (default, check, doc), its
domain rules, its formula (docstring) and its functor in kernels/gpuloss_math.cuh; the
option checks, the CLI flags, Dask, streaming, the CUDA launch code and the benchmarks read
it. The backends (`gpuloss.backends`) only compute what is written there.
"""

from __future__ import annotations

import difflib

from .binary import bce, bce_with_logits, hinge, squared_hinge
from .categorical import cce, cce_with_logits
from .regression import huber, log_cosh, mae, mse, pinball, poisson_nll, smooth_l1

# what other libraries call these losses, for the KeyError's suggestion
_PEER_NAMES = {
    "crossentropy": "cce_with_logits", "cross_entropy": "cce_with_logits",
    "categorical_crossentropy": "cce", "sparse_categorical_crossentropy": "cce",
    "softmax_cross_entropy": "cce_with_logits", "binary_crossentropy": "bce",
    "binary_cross_entropy": "bce", "binary_cross_entropy_with_logits": "bce_with_logits",
    "sigmoid_binary_cross_entropy": "bce_with_logits", "log_loss": "bce",
    "mse_loss": "mse", "mean_squared_error": "mse", "squared_error": "mse", "l2_loss": "mse",
    "l1": "mae", "l1_loss": "mae", "mean_absolute_error": "mae", "huber_loss": "huber",
    "smooth_l1_loss": "smooth_l1", "logcosh": "log_cosh", "poisson": "poisson_nll",
    "poisson_nll_loss": "poisson_nll", "hinge_loss": "hinge", "quantile": "pinball",
    "quantile_loss": "pinball", "mean_pinball_loss": "pinball",
}


class _Losses(dict):
    """Every loss by its name: ``gl.LOSSES["mse"] is gl.mse``. An unknown name raises a
    KeyError that lists the names and suggests the closest one."""

    def __missing__(self, name):
        guess = _PEER_NAMES.get(str(name).lower())
        if guess is None:
            close = difflib.get_close_matches(str(name).lower(), list(self), n=1, cutoff=0.5)
            guess = close[0] if close else None
        hint = f" Did you mean {guess!r}?" if guess else ""
        msg = f"No loss named {name!r}; the losses are {', '.join(self)}.{hint}"
        raise KeyError(msg)


LOSSES = _Losses(
    (loss.name, loss)
    for loss in (mse, bce, bce_with_logits, cce, cce_with_logits, mae, huber, smooth_l1,
                 log_cosh, poisson_nll, hinge, squared_hinge, pinball)
)
"""Every loss by its name, in the order of the docs."""
