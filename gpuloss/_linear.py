"""Linear cross-entropy: the cross-entropy of a linear layer's logits, ``hidden @ weight.T (+
bias)``, with its gradients, without ever holding the whole logits.

A language model's output layer makes the largest tensor of a training step: N tokens × V
classes of logits, and their gradient as much again. Here the tokens are taken in chunks of R
rows, R sized so that one chunk of logits fits `chunk_mb`. For each chunk, in a fixed order:

1. one GEMM makes the chunk's logits, ``z = h_c @ W.T (+ b)``;
2. the fused softmax cross-entropy pass of `cce_with_logits` (its backend: NumPy's blocked
   rows, the CUDA row kernel) reads them and writes the gradient of the chunk's Σ w·l in
   their place, ``G = ∂(Σ_c w l)/∂z``, with the chunk's float64 [Σ w·l, D] (D: the mean's
   denominator, Σ w c_label over the counted tokens);
3. two GEMMs carry G back: ``d_hidden_c = G @ W`` and ``d_weight += G.T @ h_c`` (in blocks of
   classes, into a float32 accumulator for 16-bit weights), ``d_bias += Σ_rows G``.

The mean's 1/D is known only after the last chunk, so it is applied once at the end to
d_hidden, d_weight and d_bias (N×H + V×H + V values, not the N×V logits): the chunks'
gradients are of the sum, and the result does not depend on the chunk size beyond the
rounding of the float32 accumulations. Forward-only calls skip step 3 and the gradient
buffers. The chain rule is the whole story: with G the gradient of
``cce_with_logits(hidden @ weight.T + bias, target, **options)`` with respect to its logits,
``d_hidden = G @ W``, ``d_weight = G.T @ hidden``, ``d_bias = Σ_rows G``.

The loop is written once against the array-API namespace of the inputs: NumPy (BLAS GEMMs),
CuPy (cuBLAS on the current stream; the logits stay in 16-bit where the inputs are, the row
kernel computes in float32), PyTorch tensors (their own GEMMs; the row pass on views of
their memory), and any other array-API library.
"""

from __future__ import annotations

import math
import numbers

import array_api_compat
import numpy as np

from . import _api, _dispatch, _pool

DEFAULT_CHUNK_MB = 256  # one chunk of logits (and, in place, its gradient): at V = 128,256
# in bf16, about 1,000 tokens per chunk: GEMMs that large run at the card's full rate

_CCE = "cce_with_logits"
_OPTIONS = ("reduction", "sample_weight", "validate", "class_weight", "ignore_index",
            "label_smoothing", "focal_gamma", "z_loss", "softcap")
_ACCUMULATE_SHARE = 16  # d_weight's per-chunk product is formed in blocks of classes of at
# most 1/16 of the chunk budget (NumPy has no GEMM that adds into its output)


# ---------------------------------------------------------------------------------------------
# checks


class _Checked:
    """The checked call: flattened views and what the loop needs."""

    __slots__ = (
        "H",
        "N",
        "V",
        "bias",
        "chunk_bytes",
        "hidden",
        "labels",
        "lead",
        "options",
        "reduction",
        "sample_weight",
        "target",
        "weight",
        "xp",
    )


def check_layer(xp, hidden, weight, bias, chunk_mb, *, weight_name="weight",
                weight_shape="(V, H) = (classes, hidden features)",
                bias_rows="one per class, weight's rows") -> tuple[int, int]:
    """The checks of the layer: hidden's dtype and feature axis, the weight's shape, one dtype
    for the three, the bias's shape, chunk_mb. Returns (H, V). The split-vocabulary version
    (gpuloss.distributed) names its weight and rows its own way."""
    dtype = _api.dtype_name(hidden.dtype)
    if _api.dtype_kind(xp, hidden.dtype) != "float" or dtype not in _api._FLOAT_DTYPES:
        msg = (f"Expected hidden to have a real floating dtype (float16, bfloat16, float32 or "
               f"float64), got {dtype}.")
        raise TypeError(msg)
    if hidden.ndim < 1:
        msg = "hidden must have a feature axis (shape (..., H)), got a 0-d array."
        raise ValueError(msg)
    H = int(hidden.shape[-1])
    if weight.ndim != 2 or int(weight.shape[1]) != H:
        msg = (f"{weight_name} must have shape {weight_shape}, with H = {H} as hidden's last "
               f"axis; got {weight_name} of shape {_api._shape(weight)}.")
        raise ValueError(msg)
    V = int(weight.shape[0])
    for name, x in ((weight_name, weight), ("bias", bias)):
        if x is not None and _api.dtype_name(x.dtype) != dtype:
            msg = (f"{name} has dtype {_api.dtype_name(x.dtype)} and hidden {dtype}: pass them "
                   f"in one dtype (the logits are computed in it).")
            raise TypeError(msg)
    if bias is not None and _api._shape(bias) != (V,):
        msg = f"bias must have shape ({V},) ({bias_rows}), got {_api._shape(bias)}."
        raise ValueError(msg)
    if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, numbers.Real):
        msg = f"chunk_mb must be a number of megabytes, got {type(chunk_mb).__name__} {chunk_mb!r}."
        raise TypeError(msg)
    if not 0 < chunk_mb < math.inf:
        msg = f"chunk_mb must be a positive, finite number of megabytes, got {chunk_mb!r}."
        raise ValueError(msg)
    return H, V


def check(hidden, weight, target, bias, chunk_mb, options) -> _Checked:
    """Every check that needs no data (the data's own checks are the row pass's)."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        msg = (f"linear_cross_entropy() got an unexpected keyword argument {unknown[0]!r}; it "
               f"accepts bias, chunk_mb, {', '.join(_OPTIONS)}.")
        if unknown[0] == "axis":
            msg += " The classes are weight's rows: there is no class axis to choose."
        if unknown[0] == "weight":
            msg += " Per-class weights are class_weight=; the layer's weight is positional."
        raise TypeError(msg)
    hidden = _dispatch.as_array(hidden, "hidden")
    xp_h = None if isinstance(hidden, np.ndarray) else _dispatch.array_namespace(hidden, {})
    arrays = {"weight": weight, "target": target}
    if bias is not None:
        arrays["bias"] = bias
    for key in ("sample_weight", "class_weight"):
        if options.get(key) is not None:
            arrays[key] = options[key]
    arrays = {k: _dispatch.as_array(v, k, like=hidden, xp=xp_h) for k, v in arrays.items()}
    xp = _dispatch.array_namespace(hidden, arrays)
    weight, target, bias = arrays["weight"], arrays["target"], arrays.get("bias")

    dtype = _api.dtype_name(hidden.dtype)
    H, V = check_layer(xp, hidden, weight, bias, chunk_mb)

    lead = _api._shape(hidden)[:-1]
    kind = _api.dtype_kind(xp, target.dtype)
    tshape = _api._shape(target)
    if kind == "int":
        if tshape != lead:
            msg = (f"Shape mismatch: class-index target must have hidden's shape without its "
                   f"last axis, {lead}; got {tshape}.")
            raise ValueError(msg)
    elif kind == "float":
        if tshape != (*lead, V):
            msg = (f"Shape mismatch: probability targets must have shape {(*lead, V)} (hidden's "
                   f"tokens × weight's {V} classes); got {tshape}.")
            raise ValueError(msg)
    else:
        msg = (f"Expected target to hold class indices (integer dtype) or probabilities "
               f"(floating dtype), got {_api.dtype_name(target.dtype)}.")
        raise TypeError(msg)
    sw = arrays.get("sample_weight")
    if sw is not None:
        _api._check_real(sw, "sample_weight", xp)
        _api._check_broadcastable(sw, "sample_weight", lead, "hidden's tokens")
    opts = {k: v for k, v in options.items() if k not in ("sample_weight",)}
    if "class_weight" in arrays:
        opts["class_weight"] = arrays["class_weight"]
    cce = _api._BY_NAME[_CCE]
    _api.check_scalar_options(cce, opts, 2, dtype)

    c = _Checked()
    N = math.prod(lead)
    c.xp, c.lead, c.N, c.H, c.V = xp, lead, N, H, V
    c.hidden = xp.reshape(hidden, (N, H))
    c.weight, c.bias = weight, bias
    c.labels = kind == "int"
    c.target = xp.reshape(target, (N,) if c.labels else (N, V))
    if sw is not None:
        sw = xp.reshape(xp.broadcast_to(sw, lead), (N,))
    c.sample_weight = sw
    c.options = opts
    c.reduction = opts.get("reduction", "mean")
    c.chunk_bytes = float(chunk_mb) * 2**20
    return c


# ---------------------------------------------------------------------------------------------
# the chunked pass


def _on_cuda(x) -> bool:
    try:
        return x.__dlpack_device__()[0] == 2  # kDLCUDA
    except (AttributeError, TypeError, RuntimeError):
        return False


def compute(c: _Checked, *, want_value: bool, need: tuple[bool, bool, bool],
            parts: bool = False):
    """The loop. `need` says which of (d_hidden, d_weight, d_bias) to form; the result's
    gradients are None where not needed (and None altogether when none is). With `parts`
    (reduction 'mean' or 'sum') the value is the float64 [Σ w·l, D] and the gradients are
    those of Σ w·l: a part of a larger call (a stream's batch, a Dask block), which the
    caller adds up and divides by the whole D."""
    xp = c.xp
    want_grad = any(need)
    dtype = c.hidden.dtype
    wide = _api.dtype_name(dtype) == "float64"
    acc_dtype = xp.float64 if wide else xp.float32
    # 16-bit inputs: tensor-core GEMMs in their own dtype on a GPU (the row pass computes in
    # float32 either way); on a CPU in float32, where 16-bit GEMMs are slow or missing
    gemm_dtype = dtype if (wide or _on_cuda(c.hidden)) else xp.float32
    W = _cast(xp, c.weight, gemm_dtype)
    b = None if c.bias is None else _cast(xp, c.bias, gemm_dtype)
    itemsize = _itemsize(dtype) if gemm_dtype is dtype else 4  # of the chunk's logits
    V, H, N = c.V, c.H, c.N
    # the budget holds one chunk of logits and, with d_weight wanted, the block of it that
    # one product makes before it is added (1/_ACCUMULATE_SHARE of the budget at most)
    block_v = max(1, min(V, int(c.chunk_bytes / _ACCUMULATE_SHARE // max(H * itemsize, 1))))
    logits_bytes = c.chunk_bytes - (block_v * H * itemsize if need[1] else 0)
    rows = max(1, int(logits_bytes // max(V * itemsize, 1)))
    device = array_api_compat.device(c.hidden)

    d_hidden = d_weight = d_bias = None
    numpy = isinstance(c.hidden, np.ndarray)
    if need[0]:  # (NumPy: from the pool of dropped gradients, already mapped)
        d_hidden = (_pool.empty((N, H), gemm_dtype) if numpy
                    else xp.empty((N, H), dtype=gemm_dtype, device=device))
    if need[1]:  # NumPy: the first chunk's product is written straight into it
        d_weight = (_pool.empty((V, H), acc_dtype) if numpy and N
                    else xp.zeros((V, H), dtype=acc_dtype, device=device))
    if need[2]:
        d_bias = xp.zeros((V,), dtype=acc_dtype, device=device)

    options = dict(c.options)
    sample_weight, factor = c.sample_weight, 1.0
    if not parts:  # (a part keeps its weights' own scale, so that parts add up)
        sample_weight, options["class_weight"], factor = _normalised_weights(c)
    chunk_reduction = "none" if c.reduction == "none" else "sum"
    options["reduction"] = chunk_reduction
    cce = _api._BY_NAME[_CCE]
    gemms = _Gemms(xp, W, b, min(rows, N), d_weight, block_v)
    state = None  # float64 [Σ w·l, D] over the chunks so far
    per_token = []
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        h = _cast(xp, c.hidden[start:stop, ...], gemm_dtype)
        z = gemms.logits(h)
        if sample_weight is not None:
            options["sample_weight"] = sample_weight[start:stop]
        call = _api.prepare(cce, z, c.target[start:stop, ...], options,
                            want_value=want_value or chunk_reduction != "none",
                            want_grad=want_grad, parts=chunk_reduction == "sum",
                            grad_out=z if want_grad else None)
        value, G = _dispatch.route(call)(call)
        z = call = None  # (the gradient took the logits' place)
        if chunk_reduction == "sum":
            state = value if state is None else state + value
        elif want_value:
            per_token.append(value)
        if not want_grad:
            continue
        if need[0]:
            gemms.d_hidden(G, d_hidden, start, stop)
        if need[1]:
            gemms.add_d_weight(G, h)
        if need[2]:
            d_bias += xp.sum(G, axis=0, dtype=acc_dtype)
        G = None  # this chunk's gradient is not kept past it
    gemms = None

    value = None
    scale = factor  # what the gradients take: the weights' factor, over D for the mean
    if chunk_reduction == "sum":
        if state is None:  # no tokens
            state = xp.asarray([0.0, 0.0], dtype=xp.float64, device=device)
        total, denom = state[0], state[1]
        if parts:
            value = state
        elif c.reduction == "mean":
            counted = denom > 0  # (on the arrays' device: no wait for the host)
            value = xp.where(counted, total / xp.where(counted, denom, 1.0), math.nan) * factor
            scale = xp.where(counted, factor / xp.where(counted, denom, 1.0), 0.0)
        else:
            value = total * factor
        if not parts:
            value = xp.astype(value, dtype) if want_value else None
    elif want_value:
        value = (xp.concat(per_token) if per_token
                 else xp.empty((0,), dtype=dtype, device=device))
        if factor != 1.0:
            value = xp.astype(value, xp.float64) * factor
        value = xp.reshape(_cast(xp, value, dtype), c.lead)
    if not want_grad:
        return value, None
    if parts:  # unscaled and in the accumulation dtypes: the caller adds and scales them
        return value, (d_hidden, d_weight, d_bias)
    grads = (
        None if d_hidden is None else xp.reshape(_finish(xp, d_hidden, scale, dtype),
                                                 (*c.lead, H)),
        None if d_weight is None else _finish(xp, d_weight, scale, dtype),
        None if d_bias is None else _finish(xp, d_bias, scale, dtype),
    )
    return value, grads


def _itemsize(dtype) -> int:
    name = _api.dtype_name(dtype)
    return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[name]


def _cast(xp, x, dtype):
    return x if x.dtype == dtype else xp.astype(x, dtype)


class _Gemms:
    """The three products for the inputs' library: NumPy and PyTorch write into buffers made
    once (one chunk of logits reused for every chunk: no page faults after the first) and
    straight into d_hidden's rows; PyTorch adds d_weight's product in place (addmm_); NumPy,
    which has no GEMM that adds into its output, forms it in blocks of `block_v` classes and
    adds each. Other libraries (CuPy, array-api-strict, ...) take the array-API forms."""

    def __init__(self, xp, W, b, rows, d_weight, block_v):
        self.xp, self.W, self.b, self.block_v = xp, W, b, block_v
        self.Wt = xp.permute_dims(W, (1, 0))
        self.torch = None
        if array_api_compat.is_torch_namespace(xp):
            import torch

            self.torch = torch
        self.buffer = None
        if rows and (self.torch is not None or isinstance(W, np.ndarray)):
            self.buffer = xp.empty((rows, W.shape[0]), dtype=W.dtype,
                                   device=array_api_compat.device(W))
        self.acc = d_weight
        self.first = True  # no chunk added to d_weight yet
        self.block = None  # NumPy: the block of d_weight's product, made once
        self.wider_gemm = None  # PyTorch: whether addmm adds 16-bit products into float32

    def logits(self, h):
        out = None if self.buffer is None else self.buffer[: h.shape[0], ...]
        if self.torch is not None:
            if self.b is not None:
                return self.torch.addmm(self.b, h, self.Wt, out=out)
            return self.torch.matmul(h, self.Wt, out=out)
        if out is not None:
            z = np.matmul(h, self.Wt, out=out)
        else:
            z = self.xp.matmul(h, self.Wt)
        if self.b is not None:
            z += self.b
        return z

    def d_hidden(self, G, d_hidden, start, stop):
        out = d_hidden[start:stop, ...]
        if out.dtype == G.dtype and isinstance(out, np.ndarray):
            np.matmul(G, self.W, out=out)
        elif out.dtype == G.dtype and self.torch is not None:
            self.torch.matmul(G, self.W, out=out)
        else:
            d_hidden[start:stop, ...] = self.xp.astype(self.xp.matmul(G, self.W), out.dtype)

    def _addmm_wider(self, acc, Gt, h) -> bool:
        """16-bit products added into a float32 accumulator by one cuBLAS GEMM (beta = 1,
        float32 C: PyTorch's addmm with out_dtype, CUDA only): no product block, no extra
        pass. False where PyTorch has no such GEMM (the CPU, an older version)."""
        if self.wider_gemm is False:
            return False
        try:
            self.torch.ops.aten.addmm.dtype_out(acc, Gt, h, acc.dtype, out=acc)
        except (AttributeError, RuntimeError, NotImplementedError):
            self.wider_gemm = False
            return False
        return True

    def add_d_weight(self, G, h):
        xp, acc = self.xp, self.acc
        Gt = xp.permute_dims(G, (1, 0))
        first, self.first = self.first, False
        if self.torch is not None and acc.dtype == G.dtype:
            acc.addmm_(Gt, h)
        elif self.torch is not None and self._addmm_wider(acc, Gt, h):
            pass
        elif isinstance(acc, np.ndarray) and acc.dtype == G.dtype:
            if first:  # the first chunk's product is the accumulator: no block, no add
                np.matmul(Gt, h, out=acc)
                return
            if self.block is None:
                self.block = np.empty((self.block_v, acc.shape[1]), acc.dtype)
            for v0 in range(0, acc.shape[0], self.block_v):
                v1 = min(acc.shape[0], v0 + self.block_v)
                product = np.matmul(Gt[v0:v1], h, out=self.block[: v1 - v0])
                np.add(acc[v0:v1], product, out=acc[v0:v1])
        else:
            for v0 in range(0, acc.shape[0], self.block_v):
                v1 = min(acc.shape[0], v0 + self.block_v)
                product = xp.matmul(Gt[v0:v1, ...], h)
                acc[v0:v1, ...] = acc[v0:v1, ...] + xp.astype(product, acc.dtype)


def _finish(xp, x, scale, dtype):
    """The accumulated gradient times `scale` (float64: the mean's 1/D, 0 when nothing was
    counted, and the weights' factor), in the input's dtype."""
    if isinstance(scale, float) and scale == 1.0:
        return _cast(xp, x, dtype)
    if isinstance(x, np.ndarray):
        s = float(scale)
        if x.dtype == np.float64 or s == 0 or 1e-30 < abs(s) < 1e30:
            np.multiply(x, x.dtype.type(s), out=x)
        else:  # a factor float32 cannot hold: the product in float64
            x = x.astype(np.float64) * s
    else:  # in place (the accumulators are this call's own): no second d_weight
        x *= scale if isinstance(scale, float) else xp.astype(scale, x.dtype)
    return _cast(xp, x, dtype)


_WEIGHT_RANGE = (1e-20, 1e20)  # weights whose largest magnitude lies outside are rescaled


def _normalised_weights(c):
    """(sample weights, class weights, factor). Each chunk's gradient is that of its Σ w·l,
    kept in the compute dtype until 1/D is applied at the end: weights far from 1 would
    overflow or underflow there in float32 (a class weight of 1e37 makes every gradient inf)
    where the mean itself is unaffected. So weights whose largest magnitude `a` lies outside
    [1e-20, 1e20] are divided by it (in float64), and `factor`, what the value and gradients
    take back in float64 at the end, is the product of those that do not cancel in the mean:
    with class indices the mean divides both out; with probability targets its denominator
    holds the sample weights only; 'sum' and 'none' take both back."""
    xp = c.xp
    sw, cw = c.sample_weight, c.options.get("class_weight")
    scales = []
    for w in (sw, cw):
        top = 1.0
        if w is not None and math.prod(w.shape):
            top = float(xp.max(xp.abs(xp.astype(w, xp.float64))))  # (one read to the host)
            if not (math.isfinite(top) and top > 0) or _WEIGHT_RANGE[0] <= top <= _WEIGHT_RANGE[1]:
                top = 1.0
        scales.append(top)
    a, b = scales
    if a != 1.0:
        sw = xp.astype(sw, xp.float64) / a
    if b != 1.0:
        cw = xp.astype(cw, xp.float64) / b
    if c.reduction == "mean":
        factor = 1.0 if c.labels else b
    else:
        factor = a * b
    return sw, cw, factor
