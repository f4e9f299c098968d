"""Raw, non-differentiable communication over mesh axes, through ``torch.distributed``.

One function per primitive, each on a single tensor and a :class:`AxisGroup`,
each recorded by :mod:`colofn.comm_trace`. The differentiable collectives in
:mod:`colofn.collectives` are built from these, in forward and in backward.
Works on any backend (colofn's simulated one, gloo, NCCL).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from colofn import tracing as ct
from colofn._world import board
from colofn.errors import ColofnError
from colofn.mesh import Mesh


@dataclass(frozen=True)
class AxisGroup:
    """The group of ranks that differ from this one only along ``axes``."""

    axes: tuple[str, ...]
    size: int
    index: int  # this rank's index in the group (mixed radix, first axis major)
    group: dist.ProcessGroup | None  # None when size == 1
    ranks: tuple[int, ...]  # global ranks, by group index
    order: tuple[int, ...]  # order[k]: the process-group rank of group index k

    @property
    def identity_order(self) -> bool:
        return all(i == o for i, o in enumerate(self.order))

    def to_group_order(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Chunks listed by group index -> listed by process-group rank."""
        out = [chunks[0]] * len(chunks)
        for k, r in enumerate(self.order):
            out[r] = chunks[k]
        return out

    def from_group_order(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Chunks listed by process-group rank -> listed by group index."""
        return [chunks[r] for r in self.order]


def axis_group(mesh: Mesh, axes: tuple[str, ...]) -> AxisGroup:
    """The (cached) group for ``axes`` on ``mesh``; creating one is collective over the world.

    A process group orders its ranks by global rank, i.e. by the axes in mesh
    order; for a tuple in another order, ``order`` maps group indices (first
    requested axis major) to process-group ranks and the ops permute chunks.
    """
    cache: dict[tuple[str, ...], AxisGroup] = mesh.__dict__.setdefault("_colofn_axis_groups", {})
    g = cache.get(axes)
    if g is not None:
        return g
    sizes = [mesh.shape[a] for a in axes]
    index = 0
    for a in axes:
        index = index * mesh.shape[a] + mesh.axis_index(a)
    size = 1
    for s in sizes:
        size *= s
    ranks_grid = mesh.device_mesh.mesh  # tensor of global ranks, mesh-shaped
    if size == 1:
        g = AxisGroup(axes, 1, 0, None, (dist.get_rank(),), (0,))
    else:
        pos = [mesh.axis_names.index(a) for a in axes]
        rest = [i for i in range(mesh.ndim) if i not in pos]
        rows = ranks_grid.permute(*rest, *pos).reshape(-1, size)  # each row: a group, by group index
        mine = next(row.tolist() for row in rows if dist.get_rank() in row.tolist())
        pg = _process_group(mesh, tuple(sorted(axes, key=mesh.axis_names.index)), rows)
        by_rank = sorted(mine)
        g = AxisGroup(axes, size, index, pg, tuple(mine), tuple(by_rank.index(r) for r in mine))
    cache[axes] = g
    return g


# torch 2.13 renames these (the old names warn); older releases only have the old ones.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_from = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _process_group(mesh: Mesh, axes_in_mesh_order: tuple[str, ...], rows: torch.Tensor) -> dist.ProcessGroup:
    cache: dict[tuple[str, ...], dist.ProcessGroup] = mesh.__dict__.setdefault("_colofn_process_groups", {})
    pg = cache.get(axes_in_mesh_order)
    if pg is None:
        if len(axes_in_mesh_order) == 1:
            pg = mesh.device_mesh.get_group(axes_in_mesh_order[0])
        else:  # every rank creates every subgroup (new_group is collective over the world)
            pg, _ = dist.new_subgroups_by_enumeration([sorted(row.tolist()) for row in rows])
        cache[axes_in_mesh_order] = pg
    return pg


def _rec(op: str, g: AxisGroup, x: torch.Tensor, phase: str, sent: int | None = None, received: int | None = None, peer: int | None = None) -> None:
    if not ct.active():
        return
    nbytes = x.numel() * x.element_size()
    if sent is None:
        sent, received = ct.volume(op, nbytes, g.size)
    ct.record(ct.CommRecord(op, g.axes, g.size, tuple(x.shape), x.dtype, sent, received or 0, phase, peer))


class _Watch:
    """Marks this rank's slot of a real world's status board around one collective.

    On a transport failure (gloo's timeouts, "Connection closed by peer") it
    raises the board's report of what every rank was doing instead. A no-op in
    the simulated world, which reports divergence itself.
    """

    __slots__ = ("b",)

    def __init__(self, op: str, g: AxisGroup, x: torch.Tensor) -> None:
        b = self.b = board.current()
        if b is not None:
            b.begin(op, g, x.shape, x.dtype)

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: object) -> None:
        b = self.b
        if b is None:
            return
        if e is None:
            b.end()
        elif isinstance(e, RuntimeError) and not isinstance(e, ColofnError):
            raise b.explain(e) from e
        else:
            b.end(failed=True)


def _phase() -> str:
    return "backward" if torch._C._current_graph_task_id() != -1 else "forward"


def all_reduce(x: torch.Tensor, g: AxisGroup, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    out = x.detach().clone().contiguous()
    if g.size > 1:
        _rec("all_reduce", g, x, _phase())
        with _Watch("all_reduce" if op == dist.ReduceOp.SUM else f"all_reduce({getattr(op, 'name', op)})", g, x):
            dist.all_reduce(out, op=op, group=g.group)
    return out


class AsyncAllReduce:
    """The sum of ``x`` over ``g`` started now and read with :meth:`wait`, so other work runs meanwhile.

    Recorded as :func:`all_reduce` records it (same op, bytes and phase), at the start.
    """

    def __init__(self, x: torch.Tensor, g: AxisGroup) -> None:
        self.out = x.detach().clone().contiguous()
        self.work = None
        if g.size > 1:
            _rec("all_reduce", g, x, _phase())
            self.work = dist.all_reduce(self.out, group=g.group, async_op=True)

    def wait(self) -> torch.Tensor:
        """The sum (waits for it the first time)."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.out


def all_gather(x: torch.Tensor, g: AxisGroup, dim: int = 0) -> torch.Tensor:
    """Blocks of every rank concatenated along ``dim`` (tiled)."""
    if g.size == 1:
        return x.detach().clone()
    _rec("all_gather", g, x, _phase())
    src = x.detach().movedim(dim, 0).contiguous()
    out = torch.empty((g.size * src.shape[0], *src.shape[1:]), dtype=x.dtype, device=x.device)
    with _Watch("all_gather", g, x):
        _all_gather_into(out, src, group=g.group)
    if not g.identity_order:
        out = torch.cat(g.from_group_order(list(out.chunk(g.size))))
    return out.movedim(0, dim).contiguous()


def reduce_scatter(x: torch.Tensor, g: AxisGroup, dim: int = 0) -> torch.Tensor:
    """Sum over ranks of ``x``, split along ``dim``; this rank keeps its chunk (tiled)."""
    if g.size == 1:
        return x.detach().clone()
    _rec("reduce_scatter", g, x, _phase())
    src = x.detach().movedim(dim, 0).contiguous()
    if not g.identity_order:
        src = torch.cat(g.to_group_order(list(src.chunk(g.size))))
    out = torch.empty((src.shape[0] // g.size, *src.shape[1:]), dtype=x.dtype, device=x.device)
    with _Watch("reduce_scatter", g, x):
        _reduce_scatter_from(out, src, group=g.group)
    return out.movedim(0, dim).contiguous()


def all_to_all(x: torch.Tensor, g: AxisGroup, split_dim: int, concat_dim: int) -> torch.Tensor:
    """Split ``x`` along ``split_dim`` into n chunks, chunk i to rank i; concatenate what arrives along ``concat_dim``."""
    if g.size == 1:
        return x.detach().clone()
    _rec("all_to_all", g, x, _phase())
    n = g.size
    chunks = x.detach().movedim(split_dim, 0).contiguous()
    chunks = chunks.reshape(n, chunks.shape[0] // n, *chunks.shape[1:])
    if not g.identity_order:
        chunks = torch.stack(g.to_group_order(list(chunks.unbind(0))))
    chunks = chunks.contiguous()
    out = torch.empty_like(chunks)
    with _Watch("all_to_all", g, x):
        dist.all_to_all_single(out, chunks, group=g.group)
    # out[r] is the chunk from process-group rank r, laid out as moved(split_dim to 0)
    received = g.from_group_order(list(out.unbind(0)))
    pieces = [c.movedim(0, split_dim) for c in received]
    return torch.cat(pieces, dim=concat_dim).contiguous()


def ppermute(x: torch.Tensor, g: AxisGroup, perm: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Send to / receive from group indices by ``perm``; not a destination: zeros."""
    src_of = {d: s for s, d in perm}
    dst_of = {s: d for s, d in perm}
    me = g.index
    out = torch.zeros_like(x.detach())
    ops: list[dist.P2POp] = []
    send_buf = x.detach().contiguous()
    nbytes = x.numel() * x.element_size()
    if me in dst_of and dst_of[me] != me:
        ops.append(dist.P2POp(dist.isend, send_buf, g.ranks[dst_of[me]], g.group))
        _rec("send", g, x, _phase(), sent=nbytes, received=0, peer=dst_of[me])
    if me in src_of:
        if src_of[me] == me:
            out.copy_(send_buf)
        else:
            ops.append(dist.P2POp(dist.irecv, out, g.ranks[src_of[me]], g.group))
            _rec("recv", g, x, _phase(), sent=0, received=nbytes, peer=src_of[me])
    with _Watch("ppermute", g, x):
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
    return out


def broadcast(x: torch.Tensor, g: AxisGroup, source: int) -> torch.Tensor:
    """The block of group index ``source``, on every rank of the group.

    Recorded as a pipelined (chain) broadcast moves it: every rank but the
    source receives ``B`` bytes and every rank but the last of the chain
    (group index ``source - 1``) sends ``B``; no rank moves more than ``B``.
    """
    out = x.detach().clone().contiguous()
    if g.size > 1:
        nbytes = x.numel() * x.element_size()
        last = (source - 1) % g.size
        _rec("broadcast", g, x, _phase(), sent=0 if g.index == last else nbytes, received=0 if g.index == source else nbytes)
        with _Watch("broadcast", g, x):
            dist.broadcast(out, src=g.ranks[source], group=g.group)
    return out


def reduce(x: torch.Tensor, g: AxisGroup, dest: int) -> torch.Tensor:
    """The sum over the group at group index ``dest``; zeros on the other ranks.

    Recorded as a pipelined (chain) reduce moves it: every rank but ``dest``
    sends ``B`` bytes and every rank but the first of the chain (group index
    ``dest + 1``) receives ``B``.
    """
    out = x.detach().clone().contiguous()
    if g.size > 1:
        nbytes = x.numel() * x.element_size()
        first = (dest + 1) % g.size
        _rec("reduce", g, x, _phase(), sent=0 if g.index == dest else nbytes, received=0 if g.index == first else nbytes)
        with _Watch("reduce", g, x):
            dist.reduce(out, dst=g.ranks[dest], group=g.group)
        if g.index != dest:
            out.zero_()
    return out
