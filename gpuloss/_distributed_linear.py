r"""The pass behind `gpuloss.distributed.linear_cross_entropy`: the output layer split by
vocabulary.

Rank r holds the rows ``[vocab_start_r, vocab_start_r + V_r)`` of the layer's weight (and
bias) and the whole ``hidden`` (the same on every rank, as in Megatron-LM's column-parallel
output layer). The tokens are taken in chunks, as in `gpuloss.linear_cross_entropy`: for each
chunk, this rank's logits ``h_c W_rᵀ (+ b_r)`` (never the whole vocabulary's), the exchanges of
`gpuloss.distributed.cce_with_logits` (a maximum and the packed sums per token, or the
blocks' states in the deterministic mode), the gradient of the chunk's Σ w·l over this
rank's logits, and its products: ``d_hidden_c = G W_r``, ``d_W_r += Gᵀ h_c``,
``d_b_r += Σ_rows G``. The mean's 1/D is applied once at the end.

``d_hidden`` from one rank is only its classes' share: the true gradient is the sum over the
ranks. With ``reduce_hidden_grad=True`` (the default) it is summed here, in forward, by one
all-reduce of N × H numbers, so ``hidden.grad`` is complete on every rank. Pass False when
``hidden`` reaches this call through something whose backward sums it already (Megatron's
``copy_to_tensor_model_parallel_region``): summing twice would multiply it by the number of
ranks.

The exchanges happen per chunk of tokens: with the default 256 MB chunks and a vocabulary
shard of 32,000 classes in float32, about 2,000 tokens per chunk. Every rank must take the
same chunks, so the chunk's size comes from the widest shard (from the whole vocabulary in
the deterministic mode, whose chunking must not depend on the number of ranks).

Deterministic mode: the logits and d_weight are formed one block of classes at a time (the
products' shapes do not depend on the shard), so the loss, d_weight and d_bias are
bit-identical for any number of ranks whose shards are whole blocks; d_hidden is a sum over
the ranks (its all-reduce adds the ranks' shares in the backend's order) and equals the
single-device value to rounding only.

``reduction='none'``: the gradient of Σ_i g_i l_i does not factor out of the products, so
forward computes the losses only and backward runs the pass again with the upstream
gradients as the tokens' weights (its exchanges included: every rank must call backward, as
every rank does after the same loss).
"""

from __future__ import annotations

from . import _linear, _shards
from . import _ranks as _d


def _check(hidden, weight, target, bias, vocab_start, deterministic, block, chunk_mb,
           options):
    torch = _d._torch()
    for name, x in (("hidden", hidden), ("local_weight", weight)):
        if not isinstance(x, torch.Tensor):
            msg = f"{name} must be a torch.Tensor, got {type(x).__name__}."
            raise TypeError(msg)
    import array_api_compat.torch as xp

    _, width = _linear.check_layer(
        xp, hidden, weight, bias, chunk_mb, weight_name="local_weight",
        weight_shape="(V_r, H) = (this rank's classes, hidden features)",
        bias_rows="this rank's classes")
    c = _d._check_shard(tuple(hidden.shape[:-1]), width, hidden.dtype, hidden.device, target,
                        vocab_start, deterministic, block, options, "hidden")
    return c


def _rows_per_chunk(c, lay, chunk_mb) -> int:
    widest = lay.K if c.deterministic else max(lay.widths)
    itemsize = 8 if c.cdt == _d._torch().float64 else 4  # the chunk's logits: compute dtype
    return max(1, int(chunk_mb * 2**20 // max(1, widest * itemsize)))


def _pass(c, dist, group, lay, hidden, weight, bias, *, chunk_mb, want_value, need,
          reduce_hidden_grad, row_scale=None):
    """The chunked pass: (value as float64 total or per-token tensor, D, grads)."""
    torch = _d._torch()
    xp = c.xp
    H = int(hidden.shape[-1])
    h = hidden.detach().reshape(c.N, H)
    W = weight.detach()
    b = None if bias is None else bias.detach()
    on_gpu = h.device.type == "cuda"
    gemm_dtype = c.dtype if (on_gpu or c.dtype == torch.float64) else c.cdt
    Wg, hg = W.to(gemm_dtype), h.to(gemm_dtype)
    bg = None if b is None else b.to(c.cdt)
    pieces = _shards.block_edges(lay.start, c.width, c.block if c.deterministic else None)
    smoothing = float(c.options.get("label_smoothing", 0.0))
    z_loss = float(c.options.get("z_loss", 0.0))
    ii = c.options.get("ignore_index")
    reduction = c.options.get("reduction", "mean")
    want_grad = any(need)
    d_h = torch.zeros((c.N, H), dtype=c.cdt, device=h.device) if need[0] else None
    d_w = torch.zeros(tuple(W.shape), dtype=c.cdt, device=h.device) if need[1] else None
    d_b = (torch.zeros((c.width,), dtype=c.cdt, device=h.device)
           if need[2] and b is not None else None)
    total, denominator = 0.0, 0.0
    per_token = [] if reduction == "none" and want_value else None
    R = _rows_per_chunk(c, lay, chunk_mb)
    for lo in range(0, max(c.N, 1), R):  # (no tokens: one empty chunk, the same exchanges)
        hi = min(lo + R, c.N)
        sub = c.rows(lo, hi)
        h_c = hg[lo:hi]
        z = torch.empty((hi - lo, c.width), dtype=c.cdt, device=h.device)
        for a, e in pieces:  # one product per block in the deterministic mode
            z[:, a:e] = (h_c @ Wg[a:e].T).to(c.cdt)
        if bg is not None:
            z += bg
        s, sech2 = _d._capped(sub, z)
        merged = _d._rows(dist, group, sub, lay, s)
        r = _shards.finish(xp, merged, labels=c.labels, w=sub.sw, smoothing=smoothing,
                           z_loss=z_loss, K=lay.K, reduction="mean", ignore_index=ii,
                           y=sub.target if c.labels else None)
        if per_token is not None:
            per_token.append(r.loss)
        total += float(torch.sum(r.loss))
        denominator += r.denominator
        if not want_grad:
            continue
        scale = (torch.ones(hi - lo, dtype=torch.float64, device=h.device) if row_scale is None
                 else row_scale[lo:hi])
        G = _shards.grad(xp, s, sech2, r, start=lay.start, labels=c.labels,
                         target=sub.target, cw=c.cw, smoothing=smoothing, K=lay.K,
                         row_scale=scale, ignore_index=ii,
                         y=sub.target if c.labels else None, out_dtype=c.cdt)
        Gg = G.to(gemm_dtype)
        if d_h is not None:
            for a, e in pieces:
                d_h[lo:hi] += (Gg[:, a:e] @ Wg[a:e]).to(c.cdt)
        if d_w is not None:
            for a, e in pieces:
                d_w[a:e] += (Gg[:, a:e].T @ h_c).to(c.cdt)
        if d_b is not None:
            d_b += G.sum(dim=0)
    grads = None
    if want_grad:
        inv = 1.0
        if reduction == "mean" and row_scale is None:
            inv = _shards.mean_scale(denominator)
        grads = []
        for g in (d_h, d_w, d_b):
            if g is not None and inv != 1.0:
                g *= inv  # (0 when nothing was counted: zeros, as on one device)
            grads.append(g)
        if d_h is not None and reduce_hidden_grad and lay.world > 1:
            dist.all_reduce(d_h, op=dist.ReduceOp.SUM, group=group)
        grads = [None if g is None else g.to(x.dtype) for g, x in
                 zip(grads, (hidden, weight, bias if bias is not None else hidden))]
        if grads[0] is not None:
            grads[0] = grads[0].reshape(hidden.shape)
    if per_token is not None:
        value = torch.cat(per_token) if per_token else torch.zeros(0, dtype=torch.float64)
        value = value.to(c.dtype).reshape(c.lead)
    elif reduction == "mean":
        value = _shards.mean_value(total, denominator)
    else:
        value = total
    return value, grads


def _value_tensor(value, c, device):
    torch = _d._torch()
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=torch.float64, device=device).to(c.dtype)


def _function():
    torch = _d._torch()

    class _LinearFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, c, dist, group, lay, chunk_mb, reduce_hg):
            need = tuple(ctx.needs_input_grad[:3])
            ctx.none = c.options.get("reduction", "mean") == "none"
            ctx.args = (c, dist, group, lay, chunk_mb, reduce_hg, need)
            if ctx.none:
                ctx.save_for_backward(hidden, weight, bias)
                value, _ = _pass(c, dist, group, lay, hidden, weight, bias, chunk_mb=chunk_mb,
                                 want_value=True, need=(False, False, False),
                                 reduce_hidden_grad=reduce_hg)
                return _value_tensor(value, c, hidden.device)
            value, grads = _pass(c, dist, group, lay, hidden, weight, bias, chunk_mb=chunk_mb,
                                 want_value=True, need=need, reduce_hidden_grad=reduce_hg)
            ctx.grads = grads
            return _value_tensor(value, c, hidden.device)

        @staticmethod
        def backward(ctx, grad_output):
            if torch.is_grad_enabled():
                raise RuntimeError(_d._NO_SECOND)
            c, dist, group, lay, chunk_mb, reduce_hg, need = ctx.args
            g = grad_output.detach()
            if ctx.none:
                hidden, weight, bias = ctx.saved_tensors
                scale = g.reshape(c.N).to(torch.float64)
                _, grads = _pass(c, dist, group, lay, hidden, weight, bias, chunk_mb=chunk_mb,
                                 want_value=False, need=need, reduce_hidden_grad=reduce_hg,
                                 row_scale=scale)
            else:
                grads, ctx.grads = ctx.grads, None
                if grads is None:
                    msg = ("gpuloss.distributed: backward ran twice through one call "
                           "(retain_graph); call the loss again instead.")
                    raise RuntimeError(msg)
                if float(g) != 1.0:
                    grads = [None if x is None else x.mul_(g.to(x.dtype)) for x in grads]
            return (*grads, None, None, None, None, None, None)

    return _LinearFn


_FN = {}


def run(hidden, local_weight, target, *, bias, group, vocab_start, deterministic, block,
        chunk_mb, reduce_hidden_grad, **options):
    """`gpuloss.distributed.linear_cross_entropy` (its docstring says what it does)."""
    torch = _d._torch()
    if not isinstance(reduce_hidden_grad, bool):
        msg = f"reduce_hidden_grad must be True or False, got {reduce_hidden_grad!r}."
        raise TypeError(msg)

    def check():
        return _check(hidden, local_weight, target, bias, vocab_start, deterministic, block,
                      chunk_mb, options)

    dist, c, lay = _d.prepare(hidden, target, group, vocab_start, deterministic, block,
                               options, check=check, fast=False)
    params = (hidden, local_weight, bias)
    if not (torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                            for x in params)):
        value, _ = _pass(c, dist, group, lay, hidden, local_weight, bias, chunk_mb=chunk_mb,
                         want_value=True, need=(False, False, False),
                         reduce_hidden_grad=reduce_hidden_grad)
        return _value_tensor(value, c, hidden.device)
    if "fn" not in _FN:
        _FN["fn"] = _function()
    return _FN["fn"].apply(hidden, local_weight, bias, c, dist, group, lay, chunk_mb,
                           reduce_hidden_grad)
