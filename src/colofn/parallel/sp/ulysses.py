"""DeepSpeed-Ulysses attention (Jacobs et al. 2023, arXiv:2309.14509, sec. 3.1).

The sequence is split over an ``sp`` axis everywhere but inside attention.
After the local projections, one all-to-all turns ``[b, heads, s/sp, hd]``
queries, keys and values into ``[b, heads/sp, s, hd]``: each rank then holds
whole sequences for a slice of the heads and runs ordinary causal attention
(:func:`colofn.models.gpt.attention_core`, unchanged). A second all-to-all
turns the output back into sequence shards before ``wo``. The paper sends q, k
and v separately (three all-to-alls); here they travel stacked in one, so an
attention forward is two all-to-alls (and two in backward, their transposes).
Rotary embeddings use each chunk's global positions.
"""

from __future__ import annotations

import torch

from colofn.collectives import all_to_all
from colofn.models import gpt

__all__ = ["attention", "heads_to_seq", "seq_to_heads"]

HEADS, SEQ = -3, -2  # dims of [..., b, heads, s, hd]


def seq_to_heads(x: torch.Tensor, axis: str) -> torch.Tensor:
    """``[..., b, h, s/sp, hd]`` sequence shards -> ``[..., b, h/sp, s, hd]`` head shards."""
    return all_to_all(x, axis, split_axis=x.ndim + HEADS, concat_axis=x.ndim + SEQ, tiled=True)


def heads_to_seq(x: torch.Tensor, axis: str) -> torch.Tensor:
    """``[..., b, h/sp, s, hd]`` head shards -> ``[..., b, h, s/sp, hd]`` sequence shards."""
    return all_to_all(x, axis, split_axis=x.ndim + SEQ, concat_axis=x.ndim + HEADS, tiled=True)


def attention(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    config: gpt.GPTConfig,
    axis: str,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Causal self-attention of this rank's sequence chunk ``x`` ``[b, s/sp, d]``; returns ``[b, s/sp, d]``.

    ``params`` holds this rank's heads (all, or its ``tp`` share: the result is
    then a partial sum over ``tp``); ``positions`` are the chunk's absolute positions.
    """
    q, k, v = gpt.qkv(params, x, config, positions=positions)
    q, k, v = seq_to_heads(torch.stack([q, k, v]), axis).unbind(0)
    o = gpt.attention_core(q, k, v)
    return gpt.attention_out(params, heads_to_seq(o, axis))
