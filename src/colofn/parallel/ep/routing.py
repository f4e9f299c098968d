"""Top-k routing whose statistics cover every token of the step, however the tokens are split.

:func:`colofn.models.gpt.route` computes the load-balancing loss (and the
expert capacities) over the tokens it is given. When the tokens are split over
data, sequence or expert axes, the single-device model's values need the sums
over all of them: this module computes the same routing with the statistics
``psum``'d over those axes, so a parallel step routes, drops and balances
exactly as the single-device step does.

* Load-balancing loss (Fedus et al. 2021, Switch Transformer, arXiv:2101.03961,
  eq. 4, extended to top-k): ``E * sum_e f_e * P_e``; the assignment counts and
  the router-probability sums are reduced in one ``psum``.
* Capacity (Lepikhin et al. 2020, GShard, arXiv:2006.16668, Algorithm 1 order):
  first choices of all tokens in global token order, then second choices, ...
  Each rank all-gathers the per-row assignment counts of the other shards to
  find how many assignments precede its own.
* Expert-parallel buffer sizes (:func:`route_and_count`): the kept assignments
  per expert of every rank, as rows of a ``[ranks, experts]`` table that rides
  in the statistics' ``psum`` (each rank fills only its own row, so the sum is
  the table), instead of a separate all-gather: one rendezvous per layer fewer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from colofn.collectives import all_gather, axis_index, axis_size, psum
from colofn.models import gpt
from colofn.parallel.ep._untracked import tag, untracked, vary_alike, vma_of
from colofn.parallel.sp.chunks import Layout, chunk_ids

__all__ = ["route", "route_and_count"]


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def route(
    router: torch.Tensor,
    x: torch.Tensor,
    config: gpt.GPTConfig,
    *,
    batch_axes: tuple[str, ...] = (),
    seq_axis: str | None = None,
    seq_layout: Layout = "contiguous",
) -> gpt.Routing:
    """Route this rank's tokens ``x`` ``[b, s, d]``, a block of the global ``[B, S, d]``.

    ``batch_axes`` split ``B`` (first axis major) and ``seq_axis`` splits ``S``
    in ``seq_layout`` (ring attention's zig-zag: :mod:`~colofn.parallel.sp.chunks`).
    Returns a :class:`colofn.models.gpt.Routing` for the ``b * s`` local tokens
    (row-major) equal to ``gpt.route`` on the global tokens, restricted to this block.
    """
    return route_and_count(router, x, config, batch_axes=batch_axes, seq_axis=seq_axis, seq_layout=seq_layout)[0]


def route_and_count(
    router: torch.Tensor,
    x: torch.Tensor,
    config: gpt.GPTConfig,
    *,
    batch_axes: tuple[str, ...] = (),
    seq_axis: str | None = None,
    seq_layout: Layout = "contiguous",
    count_axis: str | None = None,
) -> tuple[gpt.Routing, torch.Tensor | None]:
    """:func:`route`, and the kept assignments per expert of every rank along ``count_axis``.

    The second value is an int64 ``[axis_size(count_axis), n_experts]`` table,
    row ``i`` the counts of the rank at index ``i`` of ``count_axis`` with this
    rank's other coordinates, invariant along ``count_axis``: what expert parallelism over
    ``count_axis`` needs to size its buffers. It is summed in the statistics'
    ``psum`` (no collective of its own). ``None`` when ``count_axis`` is not
    one of the token axes or when the counts could round in the statistics'
    float dtype (``2**24`` assignments or more in float32): then the caller
    gathers the counts itself.
    """
    axes = batch_axes + ((seq_axis,) if seq_axis else ())
    with untracked(x):
        b, s, d = x.shape
        n_experts, k = router.shape[1], config.top_k
        wide_x, wide_router = _wide(x.reshape(b * s, d)), _wide(router)
    tag(vma_of(x), wide_x)
    tag(vma_of(router), wide_router)
    union, (wide_x, wide_router) = vary_alike((wide_x, wide_router))  # the pvary the mode would put on their matmul
    with untracked(wide_x):  # the local math in one go, tagged below
        probs = torch.softmax(wide_x @ wide_router, dim=-1)
        gates, expert_index = probs.topk(k, dim=-1)
        chosen = F.one_hot(expert_index, n_experts).to(probs.dtype)  # [tokens, k, experts]
        stats = torch.stack([chosen.sum(dim=(0, 1)), probs.sum(dim=0)])
        gates = gates.to(x.dtype)
    tag(union, expert_index, gates, chosen, stats)
    n_tokens = b * s * (axis_size(axes) if axes else 1)
    if config.capacity_factor is None:
        with untracked(expert_index):
            keep = torch.ones_like(expert_index, dtype=torch.bool)
        tag(union, keep)
    else:
        capacity = math.ceil(config.capacity_factor * n_tokens * k / n_experts)
        per_token = rearrange(chosen.detach(), "(b s) k e -> b s k e", b=b)
        keep = rearrange(_rank_in_expert(per_token, batch_axes, seq_axis, seq_layout) < capacity, "b s k -> (b s) k")
    exact = n_tokens * k <= 2 / torch.finfo(stats.dtype).eps  # every partial sum of counts is an exact float
    counted = count_axis is not None and count_axis in axes and exact
    if counted:  # this rank's row of the [ranks, experts] table; the psum fills the others
        mine, ranks = int(axis_index(axes)), axis_size(axes)
        with untracked(stats):
            counts = torch.bincount(expert_index[keep], minlength=n_experts).to(stats.dtype)
            stats = torch.cat([stats, F.pad(counts[None], (0, 0, mine, ranks - mine - 1))])
        tag(union, stats)
    if axes:
        stats = psum(stats, axes)
    summed = vma_of(stats)
    with untracked(stats):
        aux_loss = n_experts * (stats[0] / (n_tokens * k) * stats[1] / n_tokens).sum()
    tag(summed, aux_loss)
    routing = gpt.Routing(expert_index, gates, keep, aux_loss)
    if not counted:
        return routing, None
    sizes = [axis_size(a) for a in axes]
    # the rows of this rank's count_axis group: indexed by this rank's other coordinates, so it varies along them
    at = tuple(slice(None) if a == count_axis else int(axis_index(a)) for a in axes)
    with untracked(stats):
        table = stats[2:].detach().reshape(*sizes, n_experts)[at].to(torch.int64)  # [axis_size(count_axis), n_experts]
    tag(None if summed is None else summed | {a for a in axes if a != count_axis}, table)
    return routing, table


def _rank_in_expert(
    chosen: torch.Tensor, batch_axes: tuple[str, ...], seq_axis: str | None, seq_layout: Layout = "contiguous"
) -> torch.Tensor:
    """For each local assignment ``[b, s, k]``: how many assignments to its expert precede it in GShard order.

    The order is slot-major, then global token order (row ``B``, then
    position ``S``). ``chosen`` is ``[b, s, k, E]`` one-hot; its ``s`` tokens
    are this rank's chunks of the sequence in ``seq_layout``
    (:mod:`~colofn.parallel.sp.chunks`: one chunk, or two under zig-zag).
    """
    n_seq = axis_size(seq_axis) if seq_axis else 1
    i_s = int(axis_index(seq_axis)) if seq_axis else 0
    layout = seq_layout if seq_axis else "contiguous"
    mine = chunk_ids(layout, n_seq, i_s)
    m = len(mine)
    chunks = rearrange(chosen, "b (m c) k e -> m b c k e", m=m)
    per_chunk = reduce(chunks, "m b c k e -> b m k e", "sum")  # this shard's count per row, chunk, slot, expert
    grid = rearrange(per_chunk, "b m k e -> 1 b m k e")  # [n_seq, b, m, k, E] once gathered
    if seq_axis:
        grid = all_gather(per_chunk, seq_axis, axis_dim=0, to="invariant")
    owner = {g: (r, a) for r in range(n_seq) for a, g in enumerate(chunk_ids(layout, n_seq, r))}
    grid = torch.stack([grid[owner[g][0], :, owner[g][1]] for g in range(n_seq * m)])  # [chunks, b, k, E]
    grid = rearrange(grid, "n_chunk b k e -> 1 n_chunk b k e")  # [n_batch, n_chunk, b, k, E] once gathered
    if batch_axes:
        grid = all_gather(grid.squeeze(0), batch_axes, axis_dim=0, to="invariant")
    n_batch, n_chunk, b, k, e = grid.shape
    # Blocks in GShard order: slot, global row (batch shard, local row), sequence chunk.
    flat = rearrange(grid, "n_batch n_chunk b k e -> k (n_batch b n_chunk) e")
    before_slot = flat.sum(dim=1).cumsum(dim=0) - flat.sum(dim=1)  # [k, E]: all earlier slots
    before_block = flat.cumsum(dim=1) - flat  # [k, blocks, E]: earlier blocks of the same slot
    i_b = int(axis_index(batch_axes)) if batch_axes else 0
    out = []
    for a, g in enumerate(mine):
        rows = (i_b * b + torch.arange(b)) * n_chunk + g  # this chunk's block of each local row
        offset = before_slot.unsqueeze(1) + before_block[:, rows]  # [k, b, E]
        within = chunks[a].cumsum(dim=1) - chunks[a]  # [b, c, k, E]: earlier positions of the same row and chunk
        out.append(((rearrange(offset, "k b e -> b 1 k e") + within) * chunks[a]).sum(dim=-1))  # [b, c, k]
    return torch.cat(out, dim=1)
