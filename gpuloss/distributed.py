r"""Cross-entropy over a vocabulary split across the ranks of a ``torch.distributed`` group.

When a model's output layer is split by vocabulary (tensor parallelism, as in Megatron-LM),
rank r holds the logits of its classes only, ``[vocab_start_r, vocab_start_r + V_r)``, for
every token. The softmax needs every class of a row, but only through a few numbers per row
(`gpuloss._shards` has the math): each rank reduces its classes, the ranks exchange those
numbers, and each rank forms the gradient of its own classes where they lie.

Per call, on every rank of the group (every rank must make the same call with its shard):

1. **the layout**: one all-reduce (MAX) of a table of ``11 × world`` numbers: each rank's row
   count, shard width and start, dtype, options and a checksum of the labels and sample
   weights, and the labels' range. Every rank reads the same table, so a mismatch
   (overlapping or missing classes, different row counts, different options, a label outside
   every shard) raises the same error on every rank instead of hanging one in a later
   exchange. `cce_with_logits` skips it with ``validate=False`` and ``vocab_start`` given (on
   every rank) in the default mode: then nothing is checked across the ranks; a rank that
   refuses its own input still stops the others at the next exchange, but inputs that
   disagree between ranks (token counts) can hang or abort the group.
2. **the maximum**: one all-reduce (MAX) of the N row maxima (8 bytes per token).
3. **the sums**: one all-reduce (SUM) of seven numbers per token, packed (56 bytes per
   token): each rank's exp-sum rebased to the global maximum (with the count of logits at
   it), the label's logit and class weight on the rank that owns the label, and the sums
   that label smoothing and probability targets need.

Every rank then holds the same per-token losses, returns the same loss, and has its own
shard's gradient: backward sends nothing.

With ``deterministic=True`` the classes are cut into blocks of ``block`` classes (shards must
start at a multiple of it), each rank reduces its blocks separately, and steps 2-3 become one
all-reduce (SUM) of every block's state in a zero-filled global table (each slot is filled
by one rank, so the sum is exact): ``64 × ceil(V / block)`` bytes per token. Every rank
merges the blocks in block order, so the loss and gradients are **bit-identical for every
number of ranks** (1, 2, 4, 8, ...) whose shards are whole blocks.

Options are those of `gpuloss.cce_with_logits` except ``focal_gamma`` (its per-class terms
need a third exchange) and ``axis`` (the classes are the last axis): ``reduction``,
``sample_weight``, ``class_weight`` (this rank's shard of it, shape ``(V_r,)``),
``ignore_index``, ``label_smoothing``, ``z_loss``, ``softcap`` and ``validate``. Targets are
class indices over the whole vocabulary (the same on every rank) or this rank's shard of the
probabilities, shape ``(..., V_r)``.

The gradient is formed in forward (the loss's backward only scales it); there is no second
derivative. Runs on ``gloo`` (CPU tensors, tested); written for ``nccl`` (CUDA tensors) but
not yet run on a GPU.
"""

from __future__ import annotations

from . import _distributed_linear, _ranks
from ._ranks import DEFAULT_BLOCK

__all__ = ["cce_with_logits", "linear_cross_entropy"]


def cce_with_logits(local_logits, target, *, group=None, vocab_start=None,
                    deterministic=False, block=DEFAULT_BLOCK, **options):
    r"""Softmax cross-entropy of logits split by vocabulary over the ranks of `group`.

    Every rank of the group calls it with its shard: ``local_logits`` of shape
    ``(..., V_r)``, this rank's classes ``[vocab_start, vocab_start + V_r)``, and the same
    class-index `target` (``(...)``, over the whole vocabulary) or its shard of probability
    targets (``(..., V_r)``). Every rank gets the same loss, equal to
    ``gpuloss.cce_with_logits`` of the joined logits to rounding; ``loss.backward()`` gives
    each rank the gradient of its own shard, with no exchange in backward.

    Parameters
    ----------
    local_logits : torch.Tensor
        This rank's logits, classes on the last axis.
    target : torch.Tensor
        Class indices (the same on every rank) or this rank's probabilities.
    group : ProcessGroup, optional
        The ranks that share the vocabulary (default: the whole world).
    vocab_start : int, optional
        This rank's first class. None: the ranks' shards follow each other in rank order.
    deterministic : bool, default False
        Bit-identical results for any number of ranks whose shards are whole blocks of
        `block` classes (one all-reduce of every block's state instead of two of the rows').
    block : int, default 1024
        Classes per block in the deterministic mode.
    **options
        `gpuloss.cce_with_logits`' options except ``focal_gamma`` and ``axis``;
        ``class_weight`` is this rank's shard, shape ``(V_r,)``.

    Returns
    -------
    torch.Tensor
        The loss (0-d; per token for ``reduction='none'``), the same on every rank.
    """
    torch = _ranks._torch()
    dist, c, lay = _ranks.prepare(local_logits, target, group, vocab_start, deterministic,
                                  block, options)
    if not (torch.is_grad_enabled() and local_logits.requires_grad):
        value, _ = _ranks.forward(c, dist, group, lay, want_grad=False)
        return value
    return _ranks.cce_function().apply(local_logits, c, dist, group, lay)


def linear_cross_entropy(hidden, local_weight, target, *, bias=None, group=None,
                         vocab_start=None, deterministic=False, block=DEFAULT_BLOCK,
                         chunk_mb=256, reduce_hidden_grad=True, **options):
    r"""Cross-entropy of a linear layer split by vocabulary over the ranks of `group`.

    Every rank calls it with the same ``hidden`` (``(..., H)``) and class-index `target` (or
    its shard of probability targets, ``(..., V_r)``) and its rows of the layer:
    ``local_weight`` ``(V_r, H)`` and ``bias`` ``(V_r,)`` for the classes
    ``[vocab_start, vocab_start + V_r)``. Every rank gets the same loss, equal to
    ``gpuloss.linear_cross_entropy`` with the joined weight to rounding; backward gives
    ``local_weight.grad`` and ``bias.grad`` of this rank's rows and ``hidden.grad`` summed over
    the ranks (see `reduce_hidden_grad`). The logits are never held whole: tokens are taken
    in chunks of about `chunk_mb` megabytes of this rank's logits, with the exchanges of
    `gpuloss.distributed.cce_with_logits` per chunk.

    Parameters
    ----------
    hidden : torch.Tensor
        The hidden states, ``(..., H)``, the same on every rank.
    local_weight : torch.Tensor
        This rank's rows of the layer's weight, ``(V_r, H)``.
    target : torch.Tensor
        Class indices (the same on every rank) or this rank's probabilities.
    bias : torch.Tensor, optional
        This rank's rows of the bias, ``(V_r,)``.
    group : ProcessGroup, optional
        The ranks that share the vocabulary (default: the whole world).
    vocab_start : int, optional
        This rank's first class. None: the ranks' shards follow each other in rank order.
    deterministic : bool, default False
        The loss, d_weight and d_bias bit-identical for any number of ranks whose shards are
        whole blocks (d_hidden, a sum over the ranks, to rounding).
    block : int, default 1024
        Classes per block in the deterministic mode.
    chunk_mb : float, default 256
        Megabytes of logits per chunk of tokens (the widest shard's, in the compute dtype).
    reduce_hidden_grad : bool, default True
        Sum ``hidden``'s gradient over the ranks in forward (one all-reduce of N × H). False
        leaves each rank its own share, for a ``hidden`` whose backward sums it already.
    **options
        `gpuloss.cce_with_logits`' options except ``focal_gamma`` and ``axis``;
        ``class_weight`` is this rank's shard, shape ``(V_r,)``.

    Returns
    -------
    torch.Tensor
        The loss (0-d; per token for ``reduction='none'``), the same on every rank.
    """
    return _distributed_linear.run(hidden, local_weight, target, bias=bias, group=group,
                                   vocab_start=vocab_start, deterministic=deterministic,
                                   block=block, chunk_mb=chunk_mb,
                                   reduce_hidden_grad=reduce_hidden_grad, **options)
