"""Attention over one key/value block with its log-sum-exp, and the online-softmax merge of blocks.

The math of blockwise attention (Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax", arXiv:1805.02867; Liu et al. 2023, arXiv:2310.01889):
softmax attention over keys ``K1 ++ K2`` equals the attentions over ``K1`` and
``K2`` separately, each weighted by ``exp(lse_i - lse)`` where ``lse_i`` is the
log-sum-exp of a block's scores and ``lse = logaddexp(lse_1, lse_2)``. No
communication here; :mod:`~colofn.parallel.sp.ring` moves the blocks.

>>> import torch
>>> from colofn import random
>>> from colofn.models import gpt
>>> q, k, v = (random.normal(random.key(i), (1, 2, 4, 8)) for i in range(3))
>>> o1, l1 = block(q[:, :, 2:], k[:, :, :2], v[:, :, :2], q_offset=2, kv_offset=0)
>>> o2, l2 = block(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], q_offset=2, kv_offset=2)
>>> o, _ = merge(o1, l1, o2, l2)
>>> torch.allclose(o, gpt.attention_core(q, k, v)[:, :, 2:], atol=1e-6)
True
"""

from __future__ import annotations

import math

import torch
from einops import einsum

__all__ = ["block", "merge"]


def block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_offset: int, kv_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention of ``q`` ``[b, h, sq, hd]`` over one block ``k``, ``v`` ``[b, h, sk, hd]``.

    Query ``i`` sits at position ``q_offset + i`` and sees the keys at positions
    ``kv_offset + j <= q_offset + i``. Returns ``(out [b, h, sq, hd], lse [b, h, sq])``
    in at least float32. A query that sees no key gets an ``lse`` near the
    float minimum (masked with a finite value, not ``-inf``), so :func:`merge`
    gives it weight exactly 0 and no NaN reaches the values or gradients.
    """
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = einsum(q.to(wide), k.to(wide), "... sq hd, ... sk hd -> ... sq sk") / math.sqrt(q.shape[-1])
    q_pos = torch.arange(q.shape[-2], device=q.device) + q_offset
    kv_pos = torch.arange(k.shape[-2], device=q.device) + kv_offset
    scores = scores.masked_fill(q_pos[:, None] < kv_pos[None, :], torch.finfo(wide).min)
    lse = torch.logsumexp(scores, dim=-1)
    return einsum(torch.exp(scores - lse.unsqueeze(-1)), v.to(wide), "... sq sk, ... sk hd -> ... sq hd"), lse


def merge(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over both blocks' keys, from each block's ``(out, lse)``."""
    lse = torch.logaddexp(lse1, lse2)
    return o1 * torch.exp(lse1 - lse).unsqueeze(-1) + o2 * torch.exp(lse2 - lse).unsqueeze(-1), lse
