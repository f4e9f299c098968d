"""Differentiable communication over mesh axes on a real (or simulated) world.

Each method is a forward op from :mod:`colofn._comm` paired with its transpose
(the table in ``docs/shard_map.md``), glued by one ``autograd.Function`` with
``setup_context`` so it works under ``torch.autograd`` and
``torch.func.grad``/``vjp``. The transposes are themselves these differentiable
ops, so higher-order gradients work too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from colofn import _comm
from colofn.mesh import Mesh


class _Op(torch.autograd.Function):
    """``forward(x) = fwd(x)``; ``backward(g) = bwd(g)``, both plain callables."""

    @staticmethod
    def forward(x: torch.Tensor, fwd: Callable[[torch.Tensor], torch.Tensor], bwd: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fwd(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.bwd = inputs[2]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        return ctx.bwd(g), None, None


# ``Function.apply`` binds the arguments through ``inspect.signature`` on every call when ``setup_context``
# is defined (about 14 us of the 17 us an op costs); outside functorch transforms it then only calls this.
_op_apply = super(torch.autograd.Function, _Op).apply
_unwrap_dead = torch._functorch.utils.unwrap_dead_wrappers


def op(x: torch.Tensor, fwd: Callable[[torch.Tensor], torch.Tensor], bwd: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if not (x.requires_grad and torch.is_grad_enabled()):
        return fwd(x)
    if torch._C._are_functorch_transforms_active():  # torch.func.grad/vjp: the full path
        return _Op.apply(x, fwd, bwd)
    return _op_apply(*_unwrap_dead((x, fwd, bwd)))  # type: ignore[no-any-return]


class DistComm:
    """Communication for one ``shard_map`` call on ``mesh``."""

    def __init__(self, mesh: Mesh, check_vma: bool) -> None:
        self.mesh = mesh
        self.check_vma = check_vma

    def group(self, axes: tuple[str, ...]) -> _comm.AxisGroup:
        return _comm.axis_group(self.mesh, axes)

    # value-preserving marks
    def pvary(self, x: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
        return op(x, lambda t: t.view_as(t), lambda g: self.psum_raw_grad(g, axes))

    def psum_raw_grad(self, g: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
        grp = self.group(axes)
        return op(g, lambda t: _comm.all_reduce(t, grp), lambda h: h)

    # reductions
    def psum(self, x: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
        grp = self.group(axes)
        if self.check_vma:
            return op(x, lambda t: _comm.all_reduce(t, grp), lambda g: g.view_as(g))
        return op(x, lambda t: _comm.all_reduce(t, grp), lambda g: self.psum(g, axes))

    def pextreme(self, x: torch.Tensor, axes: tuple[str, ...], kind: str) -> torch.Tensor:
        grp = self.group(axes)
        red = dist.ReduceOp.MAX if kind == "max" else dist.ReduceOp.MIN
        out = _comm.all_reduce(x, grp, red)

        def bwd(g: torch.Tensor) -> torch.Tensor:
            if not self.check_vma:
                g = self.psum(g, axes)
            mask = (x.detach() == out).to(g.dtype)
            count = _comm.all_reduce(mask, grp)
            return g * mask / count

        return op(x, lambda t: out.clone(), bwd)

    # gathers and scatters (tiled)
    def all_gather(self, x: torch.Tensor, axes: tuple[str, ...], dim: int) -> torch.Tensor:
        grp = self.group(axes)
        return op(x, lambda t: _comm.all_gather(t, grp, dim), lambda g: self.reduce_scatter(g, axes, dim))

    def all_gather_invariant(self, x: torch.Tensor, axes: tuple[str, ...], dim: int) -> torch.Tensor:
        if not self.check_vma:
            return self.all_gather(x, axes, dim)
        grp = self.group(axes)
        block = x.shape[dim]
        return op(x, lambda t: _comm.all_gather(t, grp, dim), lambda g: g.narrow(dim, grp.index * block, block))

    def reduce_scatter(self, x: torch.Tensor, axes: tuple[str, ...], dim: int) -> torch.Tensor:
        grp = self.group(axes)
        return op(x, lambda t: _comm.reduce_scatter(t, grp, dim), lambda g: self.all_gather(g, axes, dim))

    def all_to_all(self, x: torch.Tensor, axes: tuple[str, ...], split: int, concat: int) -> torch.Tensor:
        grp = self.group(axes)
        return op(
            x,
            lambda t: _comm.all_to_all(t, grp, split, concat),
            lambda g: self.all_to_all(g, axes, concat, split),
        )

    def ppermute(self, x: torch.Tensor, axes: tuple[str, ...], perm: Sequence[tuple[int, int]]) -> torch.Tensor:
        grp = self.group(axes)
        inverse = [(d, s) for s, d in perm]
        return op(x, lambda t: _comm.ppermute(t, grp, perm), lambda g: self.ppermute(g, axes, inverse))


# Bucket sizes as DDP's reducer: a small first bucket so communication starts early, larger ones after.
FIRST_BUCKET_BYTES = 1 << 20
BUCKET_BYTES = 25 << 20


class GradBucket:
    """Coalesces the gradient sums that ``pvary``'s transpose does for ``shard_map`` arguments, overlapped with the backward.

    With varying/invariant tracking, a replicated parameter used with per-shard
    data is ``pvary``'d and its gradient ``psum``'d in the backward: one
    blocking all-reduce per parameter. For the arguments of a ``shard_map`` call
    those sums are instead *stashed* (the pvary's backward returns zeros) in
    flat buckets, one open bucket per (axes, dtype) group, filled in the order
    autograd produces the gradients (the reverse of their use). A bucket whose
    bytes reach the cap (:data:`FIRST_BUCKET_BYTES` for the first,
    :data:`BUCKET_BYTES` after, as DDP's reducer) is launched at once as an
    asynchronous all-reduce, while the backward goes on. Autograd runs the
    arguments' own backward nodes last (they are the oldest nodes of the graph,
    and each runs only after every use of its argument): the first of them
    launches the buckets still open, and each waits only for the buckets that
    hold its argument's sums, adding them to the argument's gradient. Every
    use's gradient is still summed exactly once, over exactly the axes of its
    pvary, so the result is unchanged; only the number of messages and the
    time spent waiting drop. Every rank runs the same graph, so every rank
    stashes and launches in the same order. With ``create_graph=True`` the sums
    happen at once, differentiably.
    """

    def __init__(self, comm: DistComm) -> None:
        self.comm = comm
        self.owned: dict[int, int] = {}  # id(argument block) -> argument index
        self.open: dict[tuple[Any, ...], list[tuple[int, torch.Tensor]]] = {}  # group -> stashed (index, gradient)
        self.open_bytes: dict[tuple[Any, ...], int] = {}
        self.launched: list[_Launched] = []  # in launch order, until waited for
        self.waiting: dict[int, int] = {}  # argument index -> launched buckets holding its sums, not yet waited for
        self.ready: dict[int, torch.Tensor] = {}
        self.cap = FIRST_BUCKET_BYTES

    def enter(self, index: int, local: torch.Tensor) -> torch.Tensor:
        """Wrap argument ``index``'s block so its backward adds the summed gradients."""
        if not local.requires_grad:
            return local
        out = op(local, lambda t: t.view_as(t), lambda g: self._finish(index, g))
        self.owned[id(out)] = index
        return out

    def owns(self, t: torch.Tensor) -> bool:
        return id(t) in self.owned

    def pvary(self, t: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
        index = self.owned[id(t)]
        return op(t, lambda x: x.view_as(x), lambda g: self._stash(index, axes, g))

    def _stash(self, index: int, axes: tuple[str, ...], g: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # create_graph: keep the sum differentiable
            return self.comm.psum_raw_grad(g, axes)
        key = (axes, g.dtype, g.device)
        self.open.setdefault(key, []).append((index, g.detach()))
        self.open_bytes[key] = self.open_bytes.get(key, 0) + g.numel() * g.element_size()
        if self.open_bytes[key] >= self.cap:
            self._launch(key)
        return torch.zeros_like(g)

    def _launch(self, key: tuple[Any, ...]) -> None:
        """Start the all-reduce of group ``key``'s open bucket, without waiting for it."""
        items = self.open.pop(key)
        del self.open_bytes[key]
        grp = self.comm.group(key[0])
        flat = torch.cat([g.reshape(-1) for _, g in items])
        work = None
        if grp.size > 1:
            _comm._rec("all_reduce", grp, flat, "backward")
            work = dist.all_reduce(flat, group=grp.group, async_op=True)
        self.launched.append(_Launched(work, flat, [(i, g.shape) for i, g in items]))
        for i, _ in items:
            self.waiting[i] = self.waiting.get(i, 0) + 1
        self.cap = BUCKET_BYTES

    def _finish(self, index: int, g: torch.Tensor) -> torch.Tensor:
        for key in list(self.open):  # the backward of the body is over: launch what is left, in stash order
            self._launch(key)
        while self.waiting.get(index):
            self._wait(self.launched.pop(0))
        extra = self.ready.pop(index, None)
        return g if extra is None else g + extra

    def _wait(self, b: _Launched) -> None:
        if b.work is not None:
            b.work.wait()
        pieces = b.flat.split([math.prod(shape) for _, shape in b.items])
        for (index, shape), piece in zip(b.items, pieces, strict=True):
            piece = piece.view(shape)
            self.ready[index] = piece if index not in self.ready else self.ready[index] + piece
            self.waiting[index] -= 1


@dataclass
class _Launched:
    work: Any  # the all-reduce's dist.Work; None on a group of one rank
    flat: torch.Tensor  # the bucket, summed in place once ``work`` is done
    items: list[tuple[int, torch.Size]]  # (argument index, gradient shape), in bucket order
