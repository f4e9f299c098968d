"""Where a rank's sequence chunks sit in the whole sequence: the contiguous and the zig-zag layouts.

``"contiguous"``: with ``n`` ranks the sequence is cut into ``n`` chunks and
rank ``i`` holds chunk ``i``. ``"zigzag"`` (the load-balanced layout of
context-parallel implementations): the sequence is cut into ``2n`` chunks and
rank ``i`` holds chunks ``i`` and ``2n - 1 - i``, one from each end, so under a
causal mask every rank has the same attention work (:mod:`~colofn.parallel.sp.ring`).

>>> [chunk_ids("zigzag", 4, i) for i in range(4)]
[(0, 7), (1, 6), (2, 5), (3, 4)]
>>> zigzag_order(8, 2).tolist()  # the global positions ranks 0, 1 hold, in order
[0, 1, 6, 7, 2, 3, 4, 5]
"""

from __future__ import annotations

from typing import Literal

import torch

from colofn.collectives import all_gather, axis_index, axis_size

__all__ = ["Layout", "chunk_ids", "local_positions", "to_zigzag", "zigzag_order"]

Layout = Literal["contiguous", "zigzag"]


def chunk_ids(layout: Layout, n: int, i: int) -> tuple[int, ...]:
    """The global indices of the chunks rank ``i`` of ``n`` holds, in local order (of ``n`` or ``2n`` chunks)."""
    if layout == "contiguous":
        return (i,)
    if layout == "zigzag":
        return (i, 2 * n - 1 - i)
    raise ValueError(f"layout must be 'contiguous' or 'zigzag', got {layout!r}")


def zigzag_order(seq: int, n: int) -> torch.Tensor:
    """Global positions ``[seq]`` in zig-zag order: rank 0's chunks, then rank 1's, ... (``seq % 2n == 0``)."""
    c = seq // (2 * n)
    return torch.cat([torch.arange(c) + j * c for i in range(n) for j in chunk_ids("zigzag", n, i)])


def local_positions(
    n_local: int, axis: str | None, device: torch.device | None = None, layout: Layout = "contiguous"
) -> torch.Tensor:
    """Absolute positions ``[n_local]`` of this rank's tokens when the sequence is split over ``axis``.

    Learned position tables and rotary embeddings must see these, not
    ``arange(n_local)``: in the contiguous layout chunk ``i`` starts at
    ``i * n_local``; in the zig-zag layout the rank's two half-chunks are
    ``i`` and ``2n - 1 - i`` of size ``n_local / 2``.
    """
    pos = torch.arange(n_local, device=device)
    if axis is None:
        return pos
    # Offsets from the axis_index tensor, not a Python int, so the positions
    # are tracked as varying along the axis (their uses' gradients are not psum'd).
    i = axis_index(axis).to(pos.device)
    if layout == "contiguous":
        return pos + i * n_local
    chunk_ids(layout, 1, 0)  # checks the layout's name
    c = n_local // 2
    return torch.cat([pos[:c] + i * c, pos[:c] + (2 * axis_size(axis) - 1 - i) * c])


def to_zigzag(x: torch.Tensor, axis: str, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous sequence shard of ``x`` -> its zig-zag shard (same shape).

    Meant for token ids and targets at the model's boundary (a tiled
    ``all_gather`` of the shard along ``dim``, then this rank's two
    half-chunks): the activations never move, and a loss summed over tokens
    does not depend on their order.
    """
    n = axis_size(axis)
    if n == 1:
        return x
    dim = dim % x.ndim
    whole = all_gather(x, axis, axis_dim=dim, tiled=True)
    c = whole.shape[dim] // (2 * n)
    parts = [whole.narrow(dim, j * c, c) for j in chunk_ids("zigzag", n, int(axis_index(axis)))]
    return torch.cat(parts, dim=dim)
