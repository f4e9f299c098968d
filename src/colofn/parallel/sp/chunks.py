"""Where a rank's sequence chunk sits in the whole sequence."""

from __future__ import annotations

import torch

from colofn.collectives import axis_index

__all__ = ["local_positions"]


def local_positions(
    n_local: int, axis: str | None, device: torch.device | None = None
) -> torch.Tensor:
    """Absolute positions ``[n_local]`` of this rank's chunk when the sequence is split evenly over ``axis``.

    Learned position tables and rotary embeddings must see these, not
    ``arange(n_local)``: chunk ``i`` starts at ``i * n_local``.
    """
    pos = torch.arange(n_local, device=device)
    if axis is None:
        return pos
    return pos + axis_index(axis).to(pos.device) * n_local
