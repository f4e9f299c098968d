"""Stages 2 and 3 inside the step: gradients reduce-scattered unit by unit during the backward pass,
and (stage 3) parameters all-gathered unit by unit, used, freed, and gathered again for the backward.

Each bucket's full buffer enters the autograd graph through :class:`_UnitGrad`,
whose input is this rank's shard and whose backward reduce-scatters the full
gradient over the data axis (ZeRO-2/3: the full gradient of a unit lives only
until its reduce-scatter). In stage 3 the full buffer comes from an all-gather
issued when ``loss_fn`` first touches the unit (:class:`Gatherer`): the params
handed to ``loss_fn`` are lazy views (``params["w"]``, ``params["layers"][i]``,
iteration over ``params["layers"]``) and each access

1. waits for the unit's gather (issued earlier as a prefetch, when possible),
2. releases the previously used unit, and
3. starts the all-gather of the unit read next in the last step's sequence of
   reads (the first step assumes the params' own order), ``async_op=True``, so
   it overlaps the computation of this one.

Tensors autograd saves for the backward that live in a gathered buffer are
packed as ``(unit, bucket, view)`` handles (``saved_tensors_hooks``) instead of
being kept, so the buffer is freed after the forward; unpacking one in the
backward all-gathers the unit again (and prefetches the next unit the backward
will need), and the unit's reduce-scatter releases it. A unit whose params the
backward never reads (a first layer fed raw data: ``dW = x.T @ g`` needs ``x``
only) is not gathered again, so stage 3 moves at most 3Ψ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from colofn import _comm, _vma
from colofn import tracing as ct
from colofn.collectives import psum_scatter
from colofn.zero import _host_comm
from colofn.zero.memory import LiveBytes

__all__ = ["AsyncReduceScatter", "Gatherer", "unit_grad"]


class _UnitGrad(torch.autograd.Function):
    """``forward(shard) = full`` (given); ``backward(g_full) = hook(g_full)`` (the shard's gradient)."""

    @staticmethod
    def forward(ctx: Any, shard: torch.Tensor, box: list[torch.Tensor], hook: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.hook = hook
        return box.pop()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.hook(g), None, None


def unit_grad(shard: torch.Tensor, full: torch.Tensor, hook: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``full`` as a function of ``shard`` whose gradient is ``hook(gradient of full)``."""
    with _vma.suspended():
        return _UnitGrad.apply(shard, [full], hook)


class AsyncReduceScatter:
    """ZeRO-2's gradient path with each unit's reduce-scatter in flight while the backward goes on.

    :meth:`hook` (what :func:`unit_grad` calls when a unit's full gradient is
    complete) starts the reduce-scatter asynchronously and returns its output
    buffer as the shard's gradient; autograd hands that buffer out untouched
    (the shard is used once), and :meth:`wait`, called once the backward has
    returned and before anything reads a gradient, completes them all. The
    same sums, the same bytes, recorded in the backward as before; only the
    waiting moves to the end.
    """

    def __init__(self, mesh: Any, axis: str | tuple[str, ...], *, in_place: bool = False) -> None:
        self.axis = axis
        self.group = _comm.axis_group(mesh, axis if isinstance(axis, tuple) else (axis,))
        self.pending: list[tuple[dist.Work, Any]] = []  # (work, what it reads or writes: kept alive)
        # ZeRO-1: the full gradient is the caller's and kept until the update, so on a host
        # backend it is summed in place (gloo's reduce-scatter is an all-reduce of a copy)
        self.in_place = in_place and _host_comm.in_place(self.group)

    def hook(self, g: torch.Tensor) -> torch.Tensor:
        grp = self.group
        if self.in_place and g.ndim == 1 and g.is_contiguous():
            _comm._rec("reduce_scatter", grp, g, _comm._phase())
            src = g.detach()
            self.pending.append((_host_comm.start_all_reduce(src, grp), src))
            size = src.shape[0] // grp.size
            return src.narrow(0, grp.index * size, size)  # this rank's shard, summed once waited for
        if grp.size == 1 or not grp.identity_order or g.ndim != 1:
            return psum_scatter(g, self.axis, tiled=True)
        _comm._rec("reduce_scatter", grp, g, _comm._phase())
        src = g.detach().contiguous()
        out = torch.empty(src.shape[0] // grp.size, dtype=src.dtype, device=src.device)
        work = _comm._reduce_scatter_from(out, src, group=grp.group, async_op=True)
        self.pending.append((work, src))  # src stays alive until the op is done
        return out

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


class BucketReduceScatters:
    """One :class:`AsyncReduceScatter` per group of data axes: bucket ``b``'s over its own axes."""

    def __init__(self, plan: Any, *, in_place: bool = False) -> None:
        self.by_axes: dict[tuple[str, ...], AsyncReduceScatter] = {}
        self.of: list[AsyncReduceScatter] = []
        for b in range(len(plan.layout.buckets)):
            axes = plan.bucket_axes(b)
            if axes not in self.by_axes:
                self.by_axes[axes] = AsyncReduceScatter(plan.mesh, axes if len(axes) > 1 else axes[0], in_place=in_place)
            self.of.append(self.by_axes[axes])

    def hook(self, b: int, g: torch.Tensor) -> torch.Tensor:
        return self.of[b].hook(g)

    @property
    def coalesces(self) -> bool:
        """Whether :meth:`start` sums buckets together (in place, on a host backend)."""
        return any(rs.in_place for rs in self.of)

    def start(self, items: list[tuple[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """:meth:`hook` of every ``(bucket, gradient)``; on a host backend, each group's
        in-place sums of one dtype as one coalesced all-reduce (in this order on every rank)."""
        out: dict[int, torch.Tensor] = {}
        together: dict[tuple[int, torch.dtype], list[tuple[int, torch.Tensor]]] = {}
        for b, g in items:
            rs = self.of[b]
            if rs.in_place and g.ndim == 1 and g.is_contiguous():
                together.setdefault((id(rs), g.dtype), []).append((b, g))
            else:
                out[b] = rs.hook(g)
        for group in together.values():
            rs = self.of[group[0][0]]
            grp = rs.group
            phase = _comm._phase()
            for _, g in group:
                _comm._rec("reduce_scatter", grp, g, phase)  # what each stands for, as hook records it
            srcs = [g.detach() for _, g in group]
            rs.pending.append((_host_comm.start_all_reduce_coalesced(srcs, grp), srcs))  # type: ignore[arg-type]
            for (b, _), src in zip(group, srcs, strict=True):
                size = src.shape[0] // grp.size
                out[b] = src.narrow(0, grp.index * size, size)  # this rank's shard, summed once waited for
        return out

    def wait(self) -> None:
        for rs in self.by_axes.values():
            rs.wait()


class _Pending:
    """An all-gather in flight: this rank's full buffer once :meth:`wait` returns."""

    def __init__(self, out: torch.Tensor, work: dist.Work | None) -> None:
        self.out = out
        self.work = work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.out


class Gatherer:
    """Stage 3's per-unit all-gather / release cycle for one step on one rank."""

    def __init__(self, plan: Any, shards: Sequence[torch.Tensor], tag: Callable[[int, torch.Tensor], torch.Tensor], live: LiveBytes, events: list[str]) -> None:
        self.plan = plan
        self.layout = plan.layout
        self.shards = list(shards)
        self.tag = tag  # (leaf index, view) -> view with its vma set
        self.live = live
        self.events = events
        self.groups = [_comm.axis_group(plan.mesh, plan.bucket_axes(b)) for b in range(len(self.layout.buckets))]
        self.leaves: dict[int, torch.Tensor] = {}  # bucket -> shard leaf (requires grad)
        self.pending: dict[int, list[tuple[int, _Pending]]] = {}
        self.fwd: dict[int, dict[int, torch.Tensor]] = {}  # unit -> bucket -> gathered (forward)
        self.bwd: dict[int, dict[int, torch.Tensor]] = {}  # unit -> bucket -> gathered again (backward)
        self.where: dict[tuple[str, int], tuple[int, int]] = {}  # storage -> (unit, bucket), live buffers only
        self.outstanding: dict[int, int] = {}  # unit -> reduce-scatters still to come
        self.current: tuple[int, Any] | None = None
        self.order: list[int] = []  # this step's forward order of first use
        self.sequence: list[int] = []  # every read of a unit, in order (repeats included)
        self.pos = 0  # where this step is in the last step's sequence
        self.saved: set[int] = set()  # units with tensors saved for the backward
        self.backward_started = False

    # ---------------------------------------------------------------- collectives
    def _start(self, u: int, phase: str) -> None:
        if u in self.pending:
            return
        works = []
        for b in self.layout.units[u].buckets:
            shard = self.shards[b]
            n = self.layout.buckets[b].n
            if n == 1:
                works.append((b, _Pending(shard, None)))
                continue
            out = torch.empty(shard.numel() * n, dtype=shard.dtype, device=shard.device)
            if ct.active():
                nbytes = shard.numel() * shard.element_size()
                sent, received = ct.volume("all_gather", nbytes, n)
                ct.record(ct.CommRecord("all_gather", self.plan.bucket_axes(b), n, tuple(shard.shape), shard.dtype, sent, received, phase))
            work = _comm._all_gather_into(out, shard.contiguous(), group=self.groups[b].group, async_op=True)
            works.append((b, _Pending(out, work)))
        self.pending[u] = works
        self.events.append(f"{phase} gather {self.layout.units[u].name} start")

    def _wait(self, u: int, phase: str) -> dict[int, torch.Tensor]:
        if u not in self.pending:
            self._start(u, phase)
        bufs = {b: p.wait() for b, p in self.pending.pop(u)}
        self.events.append(f"{phase} gather {self.layout.units[u].name} wait")
        for b, t in bufs.items():
            if t is not self.shards[b]:
                self.live.add(t)
            self.where[_key(t)] = (u, b)
        return bufs

    def _drop(self, u: int, table: dict[int, dict[int, torch.Tensor]], phase: str) -> None:
        bufs = table.pop(u, None)
        if bufs is None:
            return
        for t in bufs.values():
            self.where.pop(_key(t), None)
        self.events.append(f"{phase} release {self.layout.units[u].name}")

    # ---------------------------------------------------------------- forward
    def _next_in_order(self, u: int) -> int | None:
        """The unit read after this read of ``u`` in the last step's sequence of reads (None if unknown)."""
        order = self.plan.order
        for k in range(self.pos, len(order)):
            if order[k] == u:
                self.pos = k + 1
                return order[k + 1] if k + 1 < len(order) else None
        return None

    def get(self, u: int) -> Any:
        """Unit ``u``'s subtree for ``loss_fn`` (gathering it; releasing the previous unit; prefetching the next)."""
        if self.current is not None and self.current[0] == u:
            return self.current[1]
        if self.current is not None:
            self._drop(self.current[0], self.fwd, "forward")
            self.current = None
        bufs = self._wait(u, "forward")
        self.fwd[u] = bufs
        if u not in self.order:
            self.order.append(u)
        self.sequence.append(u)
        nxt = self._next_in_order(u)
        if self.plan.prefetch and nxt is not None and nxt not in self.fwd:
            self._start(nxt, "forward")
        fulls: dict[int, torch.Tensor] = {}
        for b, full in bufs.items():
            leaf = self.leaves.get(b)
            if leaf is None:
                leaf = self.leaves[b] = self.shards[b].detach().requires_grad_(True)
            self.outstanding[u] = self.outstanding.get(u, 0) + 1
            fulls[b] = unit_grad(leaf, full if full is not self.shards[b] else full.detach(), self._grad_hook(u, b))
        unit = self.layout.units[u]
        views = [self.tag(i, self.layout.leaf_view(i, fulls[self.layout.slots[i].bucket])) for i in unit.leaves]
        from colofn import tree as jt

        tree = jt.unflatten(unit.treedef, views)
        self.current = (u, tree)
        return tree

    def end_forward(self) -> None:
        """After ``loss_fn``: release every gathered unit and finish unused prefetches."""
        if self.current is not None:
            self._drop(self.current[0], self.fwd, "forward")
            self.current = None
        for u in list(self.fwd):
            self._drop(u, self.fwd, "forward")
        for u in list(self.pending):
            for _, p in self.pending.pop(u):
                p.wait()
        # Remember the sequence of reads for the next step's prefetches.
        self.plan.order[:] = self.sequence

    # ---------------------------------------------------------------- saved tensors
    def pack(self, t: torch.Tensor) -> Any:
        hit = self.where.get(_key(t))
        if hit is None:
            return t
        u, b = hit
        self.saved.add(u)
        return _Handle(u, b, tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.requires_grad)

    def unpack(self, h: Any) -> torch.Tensor:
        if not isinstance(h, _Handle):
            return h
        u = h.unit
        if u not in self.bwd:
            self.bwd[u] = self._wait(u, "backward")
            prev = self._prev_needed(u)
            if self.plan.prefetch and prev is not None:
                self._start(prev, "backward")
        return self.bwd[u][h.bucket].as_strided(h.shape, h.stride, h.offset)

    def _prev_needed(self, u: int) -> int | None:
        """The unit the backward will need after ``u``: the previous one used in the forward that saved tensors."""
        if u not in self.order:
            return None
        for v in reversed(self.order[: self.order.index(u)]):
            if v in self.saved and v not in self.bwd and self.outstanding.get(v, 0) > 0:
                return v
        return None

    def _grad_hook(self, u: int, b: int) -> Callable[[torch.Tensor], torch.Tensor]:
        axes = self.plan.bucket_axes(b)
        axis = axes if len(axes) > 1 else axes[0]

        def hook(g: torch.Tensor) -> torch.Tensor:
            shard = psum_scatter(g, axis, tiled=True)
            self.events.append(f"backward reduce_scatter {self.layout.units[u].name}")
            self.outstanding[u] -= 1
            if self.outstanding[u] == 0:
                self._drop(u, self.bwd, "backward")
            return shard

        return hook

    def end_backward(self) -> None:
        for u in list(self.pending):
            for _, p in self.pending.pop(u):
                p.wait()
        for u in list(self.bwd):
            self._drop(u, self.bwd, "backward")

    # ---------------------------------------------------------------- the params loss_fn sees
    def params(self) -> Any:
        layout = self.layout
        if layout.kind == "single":
            return self.get(0)
        if layout.kind == "seq":
            typ, length = layout.skeleton
            return LazyUnits(self, list(range(length)))
        return LazyParams(self)


class _Handle:
    __slots__ = ("bucket", "offset", "requires_grad", "shape", "stride", "unit")

    def __init__(self, unit: int, bucket: int, shape: tuple[int, ...], stride: tuple[int, ...], offset: int, requires_grad: bool) -> None:
        self.unit, self.bucket, self.shape, self.stride, self.offset, self.requires_grad = unit, bucket, shape, stride, offset, requires_grad


def _key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class LazyUnits(Sequence[Any]):
    """A read-only sequence of units (``params["layers"]`` in stage 3): indexing gathers the unit."""

    def __init__(self, gatherer: Gatherer, units: list[int]) -> None:
        self._g = gatherer
        self._units = units

    def __len__(self) -> int:
        return len(self._units)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return LazyUnits(self._g, self._units[i])
        return self._g.get(self._units[i])

    def __iter__(self) -> Iterator[Any]:
        for u in self._units:
            yield self._g.get(u)

    def __repr__(self) -> str:
        return f"LazyUnits({len(self)} units, gathered on access)"


class LazyParams(Mapping[Any, Any]):
    """A read-only mapping over the top-level params (stage 3): ``params[key]`` gathers that unit."""

    def __init__(self, gatherer: Gatherer) -> None:
        self._g = gatherer
        _, keys = gatherer.layout.skeleton
        self._entries: dict[Any, Any] = {}
        u = 0
        n_layers = len(gatherer.layout.units) - sum(1 for _, is_layers, _ in keys if not is_layers)
        for k, is_layers, _ in keys:
            if is_layers:
                self._entries[k] = list(range(u, u + n_layers))
                u += n_layers
            else:
                self._entries[k] = u
                u += 1

    def __getitem__(self, k: Any) -> Any:
        e = self._entries[k]
        return LazyUnits(self._g, e) if isinstance(e, list) else self._g.get(e)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"LazyParams(keys={list(self._entries)}, gathered on access)"
