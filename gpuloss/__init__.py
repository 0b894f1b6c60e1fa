"""gpuloss: loss functions and their gradients in one fused pass, on GPU (CuPy) or CPU (NumPy).

>>> import numpy as np, gpuloss as gl
>>> loss, grad = gl.bce_with_logits.value_and_grad(np.array([0.0, 2.0]), np.array([1.0, 1.0]))
>>> round(float(loss), 6)
0.410038
"""

from . import losses as _losses
from ._dispatch import preferred_namespace
from ._score import ScoreResult, score_files
from ._streaming import StreamingLoss
from ._version import __version__
from .losses import *  # noqa: F403 - every loss, by its name (gpuloss.losses declares them)

__all__ = ["ScoreResult", "StreamingLoss", "__version__", "preferred_namespace", "score_files"]
__all__ += _losses.__all__  # LOSSES and every loss
__all__.sort()


def _register_torch_operators():
    """torch.ops.gpuloss.<loss>, for torch.compile and torch.export: registered now when
    PyTorch is already imported (a trace cannot register them; 15 ms), else by `import
    gpuloss.torch` or the first call on a tensor."""
    import sys

    if "torch" in sys.modules:
        from . import _torch

        _torch.operators()


_register_torch_operators()
