"""The expert computation of a MoE layer, local (every expert here) or expert parallel (all-to-all).

:func:`grouped_mlp` is the math: rows grouped by expert into a padded
``[experts, rows, d]`` buffer and run through the stacked weights with one
batched matmul each (``colofn.models.gpt.mlp`` broadcasts over the expert dim).
One op per weight also means one gradient sum per weight, issued in the same
order on every rank whatever the routing.

:func:`expert_parallel` adds the communication of expert parallelism (Lepikhin
et al. 2020, GShard, arXiv:2006.16668, sec. 2.2; Fedus et al. 2021, Switch
Transformer, arXiv:2101.03961): each rank holds ``E / ep`` experts; its token
assignments, sorted by expert, go to the experts' ranks with one all-to-all
(dispatch) and come back with a second (combine). Buffers are padded to the
largest count any rank sends any other in this step, known to every rank
from the table of per-expert counts (summed with the routing statistics by
:func:`~colofn.parallel.ep.routing.route_and_count`, or all-gathered here
when not given), so no assignment is ever dropped for lack of room (only
``capacity_factor`` drops, exactly as the single-device model does). Every
index of the dispatch and combine is computed with batched ops from that
table (no loop over ranks or experts). Both all-to-alls are started
asynchronously (:class:`~colofn.parallel.ep._async.AllToAll`): this rank's own
block goes through its experts while the dispatch travels, and is gated into
the output while the combine does.
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce

from colofn.collectives import all_gather, axis_index, axis_size
from colofn.models import gpt
from colofn.parallel.ep._async import AllToAll

__all__ = ["expert_parallel", "grouped_mlp", "local_experts"]


def grouped_mlp(
    params: dict[str, torch.Tensor], x: torch.Tensor, expert: torch.Tensor, config: gpt.GPTConfig
) -> torch.Tensor:
    """Row ``i`` of ``x`` ``[rows, d]`` through expert ``expert[i]`` of ``params["w1"]``/``["w2"]`` ``[E, ...]``."""
    n = params["w1"].shape[0]
    counts = torch.bincount(expert, minlength=n)
    room = int(counts.max()) if expert.numel() else 0
    order = torch.argsort(expert, stable=True)
    start = counts.cumsum(0) - counts
    slot = torch.empty_like(expert)
    slot[order] = torch.arange(len(expert), device=x.device) - start[expert[order]]
    at = expert * room + slot
    rows = x.new_zeros(n * room, x.shape[-1]).index_copy(0, at, x)
    buffer = rearrange(rows, "(e room) d -> e room d", e=n)  # expert e's rows
    y = gpt.mlp(
        params, buffer, config
    )  # [n, room, d]; empty (but still in the graph) when room is 0
    return rearrange(y, "e room d -> (e room) d")[at]


def local_experts(
    params: dict[str, torch.Tensor], tokens: torch.Tensor, r: gpt.Routing, config: gpt.GPTConfig
) -> torch.Tensor:
    """``y_t = sum_j gate_tj * expert_(e_tj)(x_t)`` over kept assignments, every expert on this rank.

    With ``w1``/``w2`` split over ``tp`` along ``d_ff``, ``y`` is a partial sum.
    """
    tok, slot = torch.nonzero(r.keep, as_tuple=True)
    h = grouped_mlp(params, tokens[tok], r.expert_index[tok, slot], config)
    return torch.zeros_like(tokens).index_add(0, tok, h * r.gates[tok, slot, None])


def expert_parallel(
    params: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    r: gpt.Routing,
    config: gpt.GPTConfig,
    axis: str,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`local_experts` with the experts split over ``axis``: all-to-all dispatch and combine.

    ``params["w1"]`` holds this rank's ``E / n`` experts (block ``axis_index``).
    ``table`` is the int64 ``[n, E]`` count of kept assignments of every rank
    of ``axis`` per expert (row: the sending rank), invariant along ``axis``,
    as :func:`~colofn.parallel.ep.routing.route_and_count` returns it; without
    it the counts are all-gathered here (one more collective).
    """
    n_local, n, me = params["w1"].shape[0], axis_size(axis), int(axis_index(axis))
    tok, slot = torch.nonzero(r.keep, as_tuple=True)
    expert = r.expert_index[tok, slot]
    order = torch.argsort(expert, stable=True)  # sorted by expert, so by destination rank
    tok, slot, expert = tok[order], slot[order], expert[order]
    if table is None:
        counts = torch.bincount(expert, minlength=n_local * n)
        table = all_gather(counts, axis, axis_dim=0, to="invariant")  # [source, expert]
    sent = reduce(table, "src (dst e) -> src dst", "sum", dst=n)  # assignments each rank sends each rank
    # The same on every rank of the ep group. At least 1, so that every rank (in every ep
    # group) builds the same autograd graph and issues the same backward collectives,
    # even where capacity dropped every assignment.
    room = max(1, int(sent.max()))
    # Dispatch: row j of the block for rank p is this rank's j-th assignment to p's experts.
    dest = expert // n_local
    at = dest * room + torch.arange(len(expert), device=tokens.device) - _exclusive_cumsum(sent[me])[dest]
    buffer = tokens.new_zeros(n * room, tokens.shape[-1]).index_copy(0, at, tokens[tok])
    # block p goes to rank p; while it travels, this rank's own block (already here) goes through its experts
    dispatch = AllToAll(rearrange(buffer, "(rank room) d -> rank room d", rank=n), axis)
    rows, local = _received_rows(table[:, me * n_local : (me + 1) * n_local], room)
    own = (rows >= me * room) & (rows < (me + 1) * room)
    own_rows, other_rows = rows[own], rows[~own]
    done_here = torch.zeros_like(buffer).index_copy(0, own_rows, grouped_mlp(params, buffer[own_rows], local[own], config))
    received = rearrange(dispatch.wait(), "rank room d -> (rank room) d")
    out = torch.zeros_like(received).index_copy(
        0, other_rows, grouped_mlp(params, received[other_rows], local[~own], config)
    )
    # block p goes back to rank p (this rank's own block is zeros: its results are done_here);
    # while it travels, the own block's results are gated into y
    combine = AllToAll(rearrange(out, "(rank room) d -> rank room d", rank=n), axis)
    here = dest == me
    gates = r.gates[tok, slot, None]
    y = torch.zeros_like(tokens).index_add(0, tok[here], done_here[at[here]] * gates[here])
    back = rearrange(combine.wait(), "rank room d -> (rank room) d")
    return y.index_add(0, tok[~here], back[at[~here]] * gates[~here])


def _exclusive_cumsum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x.cumsum(dim) - x


def _received_rows(mine: torch.Tensor, room: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The filled rows of the received buffer and the local expert of each, from ``mine`` ``[source, local expert]``.

    Source ``s``'s block starts at row ``s * room`` and holds its assignments to
    local expert 0, then 1, ...

    >>> _received_rows(torch.tensor([[2, 1], [0, 3]]), room=4)
    (tensor([0, 1, 2, 4, 5, 6]), tensor([0, 0, 1, 1, 1, 1]))
    """
    n, n_local = mine.shape
    starts = torch.arange(n, device=mine.device)[:, None] * room + _exclusive_cumsum(mine)  # [source, local expert]
    counts = mine.reshape(-1)
    total = int(counts.sum())
    rows = torch.repeat_interleave(starts.reshape(-1) - _exclusive_cumsum(counts), counts, output_size=total)
    local = torch.repeat_interleave(torch.arange(n_local, device=mine.device).repeat(n), counts, output_size=total)
    return rows + torch.arange(total, device=mine.device), local
