"""Every loss, by family: the one place to learn what a loss does.

`regression` (mse, ...), `binary` (bce, bce_with_logits, ...), `categorical` (cce,
cce_with_logits, ...), and `linear` (linear_cross_entropy: a layer and cce_with_logits). A declaration names its family, its options (default, check, doc), its
domain rules, its formula (docstring) and its functor in kernels/gpuloss_math.cuh; the
option checks, the CLI flags, Dask, streaming, the CUDA launch code and the benchmarks read
it. The backends (`gpuloss.backends`) only compute what is written there.
"""

from __future__ import annotations

import difflib

from .._api import declared_aliases
from . import binary, categorical, regression
from .binary import *  # noqa: F403 - every loss is a public name
from .categorical import *  # noqa: F403
from .linear import linear_cross_entropy
from .regression import *  # noqa: F403

_FAMILIES = (regression, binary, categorical)


class _Losses(dict):
    """Every loss by its name: ``gl.LOSSES["mse"] is gl.mse``. An unknown name raises a
    KeyError that lists the names and suggests the closest one."""

    def __missing__(self, name):
        guess = declared_aliases().get(str(name).lower())
        if guess is None:
            close = difflib.get_close_matches(str(name).lower(), list(self), n=1, cutoff=0.5)
            guess = close[0] if close else None
        hint = f" Did you mean {guess!r}?" if guess else ""
        msg = f"No loss named {name!r}; the losses are {', '.join(self)}.{hint}"
        raise KeyError(msg)


LOSSES = _Losses((name, getattr(family, name)) for family in _FAMILIES
                 for name in family.__all__)
"""Every loss by its name, family by family (regression, binary, categorical)."""

# linear_cross_entropy (hidden states, a layer's weight, targets) is public, not in LOSSES
__all__ = ["LOSSES", *regression.__all__, *binary.__all__, *categorical.__all__,
           "linear_cross_entropy"]
