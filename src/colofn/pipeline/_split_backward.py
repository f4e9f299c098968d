"""The split backward, ``I`` then ``W``, computing each gradient once.

A stage's backward ``B`` yields the gradients of its inputs (which the previous
stage waits for) and of its parameters (which nobody waits for). Zero-bubble
schedules split it: ``I`` computes the input gradients now, ``W`` the parameter
gradients later, in a bubble. Asking autograd for the parameter gradients from
the stage outputs again would run most of the backward a second time (every
node between the outputs and the parameters' uses): ``I + W`` would cost about
``1.5 B``.

Instead ``I`` finds where the parameters' branches of the autograd graph join
the input-gradient path (the *joins*: for ``y = x @ w``, the matmul's node,
which leads both to ``x`` and to ``w``) and records the gradient flowing into
each join while it computes the input gradients. ``W`` then starts from those
recorded gradients and runs only the parameters' branches: for the matmul,
``x.T @ dy`` and nothing above it. Every node runs once over ``I`` and ``W``
together, except where one parameter joins the input path twice (a tied
embedding used by the first and the last layer of a stage): the stretch of input
path between its two joins runs again in ``W``, and its result is replaced by
the recorded gradient, so nothing is counted twice.

Parameters are grouped by shared joins (a LayerNorm's weight and bias join at
one node) and each group is one ``torch.autograd.grad`` call: a single call
for all groups would make autograd walk the input path between the joins again,
which is the recomputation this module avoids. Groups run in the order of
their first parameter, the same on every rank, so collectives inside the
branches (``per_device``'s gradient sums) are issued in the same order
everywhere. The idea follows ``torch.distributed.pipelining``'s
``stage_backward_input`` / ``stage_backward_weight``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["WeightWork", "backward_input", "backward_weight"]


class _Group:
    """Parameters (by index) whose branches join the input path at the same nodes."""

    __slots__ = ("joins", "params", "recorded")

    def __init__(self) -> None:
        self.params: list[int] = []
        self.joins: list[Node] = []
        self.recorded: dict[Node, tuple[torch.Tensor | None, ...]] = {}


class WeightWork:
    """What ``I`` keeps for ``W``: per group, the joins and the gradients recorded there.

    Also the outputs whose backward never reaches an input (a first stage, or a
    parameter-only output), which ``W`` starts from directly. Holding this keeps
    alive only the graph below the joins; the stage's outputs can be dropped.
    """

    __slots__ = ("edges", "groups", "roots")

    def __init__(self, groups: list[_Group], roots: list[tuple[GradientEdge, torch.Tensor]],
                 edges: list[GradientEdge | None]) -> None:
        self.groups = groups
        self.roots = roots
        self.edges = edges  # each parameter's gradient edge (None: it does not require grad), found once in I


def _node(t: torch.Tensor) -> Node:
    return get_gradient_edge(t).node


def _consumers(roots: Sequence[Node]) -> dict[Node, list[Node]]:
    """For every node reachable from ``roots``, the nodes whose backward feeds it (the reverse edges)."""
    reverse: dict[Node, list[Node]] = {}
    seen = set(roots)
    queue = deque(roots)
    while queue:
        node = queue.popleft()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            reverse.setdefault(nxt, []).append(node)
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return reverse


def _closure(starts: Sequence[Node], reverse: dict[Node, list[Node]]) -> set[Node]:
    """Every node whose backward leads to one of ``starts`` (``starts`` included)."""
    out = set(starts)
    queue = deque(starts)
    while queue:
        for parent in reverse.get(queue.popleft(), ()):
            if parent not in out:
                out.add(parent)
                queue.append(parent)
    return out


def _joins(start: Node, path: set[Node], reverse: dict[Node, list[Node]]) -> list[Node]:
    """The nodes of ``path`` that ``start``'s branch reaches first, in a deterministic order."""
    found: list[Node] = []
    seen = {start}
    queue = deque([start])
    while queue:
        for parent in reverse.get(queue.popleft(), ()):
            if parent in seen:
                continue
            seen.add(parent)
            if parent in path:
                found.append(parent)
            else:
                queue.append(parent)
    return found


def backward_input(
    outs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    ins: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], WeightWork]:
    """``I``: the gradients of ``ins`` (zeros where unused), and what ``W`` needs for ``params``.

    ``outs`` are the stage's floating outputs that require grad and ``grads``
    their cotangents. The autograd graph stays alive (``retain_graph``) only as
    far as the returned :class:`WeightWork` holds it: the joins and below.
    """
    if not outs:
        return [torch.zeros_like(t) for t in ins], WeightWork([], [], [])
    out_nodes = [_node(t) for t in outs]
    reverse = _consumers(out_nodes)
    path = _closure([_node(t) for t in ins], reverse) if ins else set()
    groups: list[_Group] = []
    owner: dict[Node, _Group] = {}
    edges = [get_gradient_edge(p) if p.requires_grad else None for p in params]
    for index, edge in enumerate(edges):
        if edge is None:
            continue
        joins = _joins(edge.node, path, reverse)
        if not joins:
            continue
        merged = [owner[j] for j in joins if j in owner]
        group = merged[0] if merged else _Group()
        if not merged:
            groups.append(group)
        for other in merged[1:]:
            if other is group:
                continue
            group.params += other.params
            for j in other.joins:
                owner[j] = group
                group.joins.append(j)
            groups.remove(other)
        group.params.append(index)
        for j in joins:
            if owner.get(j) is not group:
                owner[j] = group
                group.joins.append(j)
    handles = []
    for group in groups:
        for j in group.joins:
            handles.append(j.register_prehook(_recorder(group, j)))
    try:
        if ins:
            found = list(torch.autograd.grad(outs, list(ins), list(grads), retain_graph=True,
                                             allow_unused=True, materialize_grads=True))
        else:
            found = []
    finally:
        for h in handles:
            h.remove()
    roots = [(get_gradient_edge(t), g) for t, g, n in zip(outs, grads, out_nodes, strict=True) if n not in path]
    for group in groups:
        group.params.sort()
    groups.sort(key=lambda g: g.params[0])
    return found, WeightWork(groups, roots, edges)


def _recorder(group: _Group, join: Node) -> Any:
    def hook(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
        group.recorded[join] = grad_outputs

    return hook


def backward_weight(work: WeightWork, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``W``: the gradients of ``params`` (zeros where unused), from what ``I`` recorded.

    ``work`` is emptied: dropping it frees what is left of the graph.
    """
    total: list[torch.Tensor | None] = [None] * len(params)

    def add(indices: Sequence[int], found: Sequence[torch.Tensor | None]) -> None:
        for i, g in zip(indices, found, strict=True):
            if g is not None:
                prev = total[i]
                total[i] = g if prev is None else prev + g

    if work.roots:
        wanted = [i for i, e in enumerate(work.edges) if e is not None]
        found = torch.autograd.grad([e for e, _ in work.roots], [e for i in wanted if (e := work.edges[i]) is not None],
                                    [g for _, g in work.roots], retain_graph=True, allow_unused=True)
        add(wanted, found)
    for group in work.groups:
        edges, cotangents = [], []
        for j in group.joins:
            for k, g in enumerate(group.recorded.get(j, ())):
                if g is not None:
                    edges.append(GradientEdge(j, k))
                    cotangents.append(g)
        if not edges:
            continue
        # A join below another join of the group receives, in this call, the recomputed flow
        # from above on top of its recorded gradient; the recorded one already holds it.
        clamps = [j.register_prehook(lambda _g, r=group.recorded[j]: r) for j in group.joins
                  if len(group.joins) > 1 and j in group.recorded]
        try:
            # Kept: another group's call may pass through this one's nodes (a tied parameter's
            # stretch of input path); the graph is freed when ``work`` is dropped, right after.
            found = torch.autograd.grad(edges, [e for i in group.params if (e := work.edges[i]) is not None], cotangents,
                                        retain_graph=True, allow_unused=True)
        finally:
            for h in clamps:
                h.remove()
        add(group.params, found)
    work.groups, work.roots, work.edges = [], [], []
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, total, strict=True)]
