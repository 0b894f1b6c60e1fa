"""Docstring pieces every loss shares (parameters, returns, the entry points)."""

REDUCTION = """\
reduction : {{'mean', 'sum', 'none'}}, default 'mean'
        'none' returns the weighted per-{unit} losses, 'sum' their sum, 'mean' {mean}."""

COMMON_PARAMS = """\
sample_weight : array_like, optional
        Non-negative weights {weight_shape}. Applied as ``w * l`` for every reduction.
    validate : bool, default True
        Check the values (domain, labels, weights) and raise ``ValueError`` when they are
        out of range. ``False`` skips the check: bad values then give NaN, never an
        out-of-bounds access."""

RETURNS = """\
    Returns
    -------
    loss : array
        0-d array (reduction 'mean' or 'sum') or per-{unit} losses ('none'), in pred's
        dtype, library and device. ``float(loss)`` works."""

ENTRY_POINTS = """\
``.grad`` returns the gradient with respect to pred (pred's shape and dtype);
    ``.value_and_grad`` returns ``(loss, grad)`` from one pass over the data. The gradient
    is the derivative of exactly what the call returns: it carries the 1/n of the mean, and
    for 'none' it is the derivative of the sum of the returned array."""
