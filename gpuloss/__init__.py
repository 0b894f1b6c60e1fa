"""gpuloss: loss functions and their gradients in one fused pass, on GPU (CuPy) or CPU (NumPy).

>>> import numpy as np, gpuloss as gl
>>> loss, grad = gl.bce_with_logits.value_and_grad(np.array([0.0, 2.0]), np.array([1.0, 1.0]))
>>> round(float(loss), 6)
0.410038
"""

from ._dispatch import preferred_namespace
from ._score import ScoreResult, score_files
from ._streaming import StreamingLoss
from ._version import __version__
from .losses import (
    LOSSES,
    bce,
    bce_with_logits,
    cce,
    cce_with_logits,
    hinge,
    huber,
    log_cosh,
    mae,
    mse,
    pinball,
    poisson_nll,
    smooth_l1,
    squared_hinge,
)

__all__ = [
    "LOSSES",
    "ScoreResult",
    "StreamingLoss",
    "__version__",
    "bce",
    "bce_with_logits",
    "cce",
    "cce_with_logits",
    "hinge",
    "huber",
    "log_cosh",
    "mae",
    "mse",
    "pinball",
    "poisson_nll",
    "preferred_namespace",
    "score_files",
    "smooth_l1",
    "squared_hinge",
]
