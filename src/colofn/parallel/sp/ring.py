"""Ring attention (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise
Transformers for Near-Infinite Context", arXiv:2310.01889).

The sequence is split over an ``sp`` axis of size ``n``; rank ``i`` holds chunk
``i`` of the queries, keys and values. Over ``n`` steps the key/value blocks
travel one hop around the ring (one ``ppermute`` of ``k`` and ``v`` stacked,
``n - 1`` per attention forward; the backward sends the key/value gradients
back the other way, ``n - 1`` more). At step ``t`` rank ``i`` holds chunk
``j = (i - t) mod n``: the diagonal chunk (``t = 0``) is attended causally,
earlier chunks fully, and later chunks (the causal future) are fully masked.
Partial results are merged by their log-sum-exps
(:mod:`~colofn.parallel.sp.blockwise`). Rotary embeddings use each chunk's
global positions.

Future chunks are masked, not skipped, so every rank builds the same autograd
graph and issues the backward ``ppermute``s (and the gradient all-reduces
around them) in the same order; skipping would leave a rank without the
backward of a ``ppermute`` its neighbour sends into. It costs no wall time: rank
``n - 1`` attends to every chunk and the others would wait for it anyway.

Limitations: no zig-zag load balancing (rank ``i`` does ``i + 1`` useful blocks
of ``n``), and autograd keeps every visited block for the backward (no
recomputation), so activation memory is that of full attention.
"""

from __future__ import annotations

import torch

from colofn.collectives import axis_index, axis_size, ppermute
from colofn.models import gpt
from colofn.parallel.sp.blockwise import block, merge

__all__ = ["attention", "ring_attention"]


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: str) -> torch.Tensor:
    """Causal attention of this rank's chunk ``q`` ``[b, h, s/n, hd]`` over the whole sequence's keys."""
    n, i = axis_size(axis), int(axis_index(axis))
    to_next = [(r, (r + 1) % n) for r in range(n)]
    s = q.shape[-2]
    kv = torch.stack([k, v])
    out, lse = block(q, k, v, q_offset=i * s, kv_offset=i * s)
    for t in range(1, n):
        kv = ppermute(kv, axis, to_next)  # now chunk (i - t) mod n
        j = (i - t) % n
        o_t, lse_t = block(q, kv[0], kv[1], q_offset=i * s, kv_offset=j * s)
        out, lse = merge(out, lse, o_t, lse_t)
    return out.to(q.dtype)


def attention(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    config: gpt.GPTConfig,
    axis: str,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Causal self-attention of this rank's sequence chunk ``x`` ``[b, s/n, d]``; returns ``[b, s/n, d]``.

    ``params`` holds this rank's heads (with ``tp``, the result is a partial sum).
    """
    q, k, v = gpt.qkv(params, x, config, positions=positions)
    return gpt.attention_out(params, ring_attention(q, k, v, axis))
