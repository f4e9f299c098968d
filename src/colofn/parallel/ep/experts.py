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
``capacity_factor`` drops, exactly as the single-device model does). The
table is read once (a few integers per rank and expert); every index of the
dispatch, the expert grouping and the combine is then one batched op
(``argsort``, ``repeat_interleave``, ``index_select``/``index_copy``), with no
loop over ranks or experts. Both all-to-alls are started asynchronously
(:class:`~colofn.parallel.ep._async.AllToAll`): this rank's own block goes
through its experts while the dispatch travels, and is gated into the output
while the combine does. The index work runs outside the varying/invariant
mode (:mod:`~colofn.parallel.ep._untracked`), tagged once at its edges.
"""

from __future__ import annotations

import torch

from colofn.collectives import all_gather, axis_index, axis_size
from colofn.models import gpt
from colofn.parallel.ep._async import AllToAll
from colofn.parallel.ep._untracked import tag, untracked, vary_alike

__all__ = ["expert_parallel", "grouped_mlp", "local_experts"]


def grouped_mlp(
    params: dict[str, torch.Tensor], x: torch.Tensor, expert: torch.Tensor, config: gpt.GPTConfig
) -> torch.Tensor:
    """Row ``i`` of ``x`` ``[rows, d]`` through expert ``expert[i]`` of ``params["w1"]``/``["w2"]`` ``[E, ...]``."""
    n = params["w1"].shape[0]
    counts = torch.bincount(expert, minlength=n)
    room = int(counts.max()) if expert.numel() else 0
    order = torch.argsort(expert, stable=True)
    rank = torch.empty_like(order).scatter(0, order, torch.arange(len(expert), device=x.device))  # place in sorted order
    at = expert * room + rank - (counts.cumsum(0) - counts)[expert]  # expert e's rows: e * room + 0, 1, ...
    return _through_experts(params, x, at, n, room, config)


def _through_experts(
    params: dict[str, torch.Tensor], x: torch.Tensor, at: torch.Tensor, n: int, room: int, config: gpt.GPTConfig
) -> torch.Tensor:
    """Row ``i`` of ``x`` through the experts at row ``at[i]`` of a zero-padded ``[n * room, d]`` buffer (expert-major)."""
    d = x.shape[-1]
    buffer = x.new_zeros(n * room, d).index_copy(0, at, x).view(n, room, d)
    y = gpt.mlp(params, buffer, config)  # [n, room, d]; empty (but still in the graph) when room is 0
    return y.reshape(n * room, d).index_select(0, at)


def local_experts(
    params: dict[str, torch.Tensor], tokens: torch.Tensor, r: gpt.Routing, config: gpt.GPTConfig
) -> torch.Tensor:
    """``y_t = sum_j gate_tj * expert_(e_tj)(x_t)`` over kept assignments, every expert on this rank.

    With ``w1``/``w2`` split over ``tp`` along ``d_ff``, ``y`` is a partial sum.
    """
    union, (tokens, gates, w1, w2) = vary_alike((tokens, r.gates, params["w1"], params["w2"]))
    with untracked(tokens):
        tok, slot = torch.nonzero(r.keep, as_tuple=True)
        h = grouped_mlp({"w1": w1, "w2": w2}, tokens[tok], r.expert_index[tok, slot], config)
        y = torch.zeros_like(tokens).index_add(0, tok, h * gates[tok, slot, None])
    tag(union, y)
    return y


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
    if table is None:
        counts = torch.bincount(r.expert_index[r.keep], minlength=n_local * n)
        table = all_gather(counts, axis, axis_dim=0, to="invariant")  # [source, expert]
    union, (tokens, gates, w1, w2) = vary_alike((tokens, r.gates, params["w1"], params["w2"]), (axis,))
    experts = {"w1": w1, "w2": w2}
    with untracked(tokens):
        plan = _Plan(table, n, n_local, me)
        d, k, device = tokens.shape[-1], r.expert_index.shape[-1], tokens.device
        # this rank's kept assignments (token-major, slot-minor) sorted by expert, so by destination rank
        key = r.expert_index.reshape(-1)
        if config.capacity_factor is not None:  # the dropped ones last, past the kept
            key = key.masked_fill(~r.keep.reshape(-1), n * n_local)
        order = torch.argsort(key, stable=True)[: plan.kept]
        tok = torch.div(order, k, rounding_mode="floor") if k > 1 else order
        gate = gates.reshape(-1).index_select(0, order)[:, None]
        # Dispatch: row j of the block for rank p is this rank's j-th assignment to p's experts.
        at = plan.send_rows(device)
        buffer = tokens.new_zeros(n * plan.room, d).index_copy(0, at, tokens.index_select(0, tok))
        blocks = buffer.view(n, plan.room, d)
        tag(union, blocks)
        dispatch = AllToAll(blocks, axis)  # block p goes to rank p
        # while it travels, this rank's own block (already here) goes through its experts
        own_at, own_room = plan.own_grouping(device)
        own_block = buffer[me * plan.room : me * plan.room + plan.sent[me]]
        own = _through_experts(experts, own_block, own_at, n_local, own_room, config)
        received = dispatch.wait().reshape(n * plan.room, d)
        rows, other_at, other_room = plan.other_grouping(device)
        done = _through_experts(experts, received.index_select(0, rows), other_at, n_local, other_room, config)
        out = torch.zeros_like(received).index_copy(0, rows, done).view(n, plan.room, d)
        tag(union, out)
        # block p goes back to rank p (this rank's own block is zeros: its results are `own`);
        # while it travels, the own block's results are gated into y
        combine = AllToAll(out, axis)
        lo, hi = plan.own_assignments
        y = torch.zeros_like(tokens).index_add(0, tok[lo:hi], own * gate[lo:hi])
        back = combine.wait().reshape(n * plan.room, d).index_select(0, at)  # zeros in [lo, hi)
        y = y.index_add(0, tok, back * gate)
    tag(union, y)
    return y


class _Plan:
    """Where each assignment goes, from the ``[n, E]`` table of kept assignments per (source rank, expert).

    The table is read once on the host (a few integers per rank and expert:
    the buffer sizes); each index vector is then one batched op (:func:`_runs`).
    """

    def __init__(self, table: torch.Tensor, n: int, n_local: int, me: int) -> None:
        self.n, self.n_local, self.me = n, n_local, me
        self.mine = table.reshape(n, n, n_local)[:, me]  # [source, local expert]: what this rank's experts get
        counts = table.tolist()
        sent = [[sum(row[p * n_local : (p + 1) * n_local]) for p in range(n)] for row in counts]  # [source, dest]
        self.sent = sent[me]
        # The same on every rank of the ep group. At least 1, so that every rank (in every ep
        # group) builds the same autograd graph and issues the same backward collectives,
        # even where capacity dropped every assignment.
        self.room = max(1, max(max(row) for row in sent))
        self.kept = sum(self.sent)
        lo = sum(self.sent[:me])
        self.own_assignments = lo, lo + self.sent[me]
        to_me = [row[me * n_local : (me + 1) * n_local] for row in counts]  # self.mine, on the host
        self.own_room = max(to_me[me])
        others = [sum(to_me[s][e] for s in range(n) if s != me) for e in range(n_local)]
        self.other_room, self.other_total = max(others), sum(others)

    def send_rows(self, device: torch.device) -> torch.Tensor:
        """The send buffer's row of each sorted assignment: rank ``p``'s block starts at ``p * room``."""
        starts = torch.arange(self.n, device=device) * self.room
        return _runs(starts, torch.tensor(self.sent, device=device), self.kept)

    def own_grouping(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """``(at, room)``: each row of this rank's own block (its assignments to its own experts, sorted by
        expert) placed in the expert-major ``[n_local * room, d]`` buffer of :func:`_through_experts`."""
        counts = self.mine[self.me]
        starts = torch.arange(self.n_local, device=device) * self.own_room
        return _runs(starts, counts, self.sent[self.me]), self.own_room

    def other_grouping(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(rows, at, room)``: the received rows from every other rank, in row order, and each one's row
        in the expert-major buffer of :func:`_through_experts`.

        Source ``s``'s block starts at row ``s * room`` and holds its assignments
        to local expert 0, then 1, ...; in the grouped buffer, expert ``e``'s
        rows start at ``e * room`` and take the sources in rank order.
        """
        n, n_local, room = self.n, self.n_local, self.other_room
        who = torch.arange(n, device=device)[:, None]
        counts = self.mine * (who != self.me)  # [source, local expert], this rank's own row zeroed
        row_starts = who * self.room + _exclusive_cumsum(self.mine, 1)
        slot_starts = torch.arange(n_local, device=device) * room + _exclusive_cumsum(counts, 0)
        flat, total = counts.reshape(-1), self.other_total
        return _runs(row_starts.reshape(-1), flat, total), _runs(slot_starts.reshape(-1), flat, total), room


def _exclusive_cumsum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x.cumsum(dim) - x


def _runs(starts: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
    """``starts[i] + 0, 1, ..., counts[i] - 1`` for every ``i``, concatenated (``total`` = ``counts.sum()``).

    >>> _runs(torch.tensor([0, 4, 10]), torch.tensor([2, 0, 3]), 5)
    tensor([ 0,  1, 10, 11, 12])
    """
    offsets = torch.repeat_interleave(starts - _exclusive_cumsum(counts), counts, output_size=total)
    return offsets + torch.arange(total, device=starts.device)
