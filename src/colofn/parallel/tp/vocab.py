"""Vocabulary-parallel embedding and cross-entropy (Shoeybi et al. 2019, arXiv:1909.08053, sec. 3).

``embed.tok`` ``[vocab, d_model]`` is split over ``tp`` by rows, so rank ``r``
holds ids ``[r * V/tp, (r + 1) * V/tp)``. With tied embeddings the head is
``tok.T``, so the logits come out split over the vocabulary too, and the loss
is computed without ever gathering them:

* the embedding looks up the ids this rank holds, zeros the others, and the
  caller sums the partial embeddings over ``tp`` (``tp.leave``);
* the cross-entropy takes the max over the vocabulary with one ``pmax`` (of a
  detached value: the result does not depend on it), and the sum of
  exponentials and the target's logit with one ``psum`` of both. Its backward
  needs no communication: ``psum``'s transpose is ``pvary``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from colofn.collectives import axis_index, pmax, psum

__all__ = ["cross_entropy_sums", "embed_partial", "IGNORE"]

IGNORE = -100  # targets equal to this are skipped, as torch's cross_entropy


def _local_ids(ids: torch.Tensor, block: int, axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids relative to this rank's vocabulary block, and whether each falls inside it."""
    local = ids - axis_index(axis) * block
    inside = (local >= 0) & (local < block)
    return torch.where(inside, local, 0), inside


def embed_partial(tok: torch.Tensor, ids: torch.Tensor, axis: str) -> torch.Tensor:
    """This rank's share of the token embeddings ``[..., d_model]``: zero rows for ids it does not hold.

    Summed over ``axis`` it is ``F.embedding(ids, full_tok)``.
    """
    local, inside = _local_ids(ids, tok.shape[0], axis)
    return F.embedding(local, tok) * inside.unsqueeze(-1).to(tok.dtype)


def cross_entropy_sums(
    logits: torch.Tensor, targets: torch.Tensor, axis: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of token losses, number of counted tokens)`` for ``logits`` ``[..., V_local]``.

    With ``axis`` the logits are this rank's vocabulary block and both results
    are invariant along ``axis``; without, the logits are the whole vocabulary.
    Computed in at least float32; targets equal to -100 are not counted.
    """
    wide = rearrange(logits, "... v -> (...) v")  # [tokens, V_local]
    wide = wide.to(torch.promote_types(wide.dtype, torch.float32))
    t = rearrange(targets, "... -> (...)")
    valid = t != IGNORE
    count = valid.sum().to(wide.dtype)
    if axis is None:
        return F.cross_entropy(wide, t, ignore_index=IGNORE, reduction="sum"), count
    top = pmax(
        wide.detach().amax(dim=-1), axis
    )  # any per-token shift works; the max keeps exp finite
    z = wide - top.unsqueeze(-1)
    local, inside = _local_ids(t, wide.shape[-1], axis)
    picked = z.gather(1, local.unsqueeze(1)).squeeze(1) * (inside & valid).to(z.dtype)
    sum_exp, target_z = psum(torch.stack([z.exp().sum(dim=-1), picked]), axis).unbind(0)
    return ((sum_exp.log() - target_z) * valid.to(z.dtype)).sum(), count
