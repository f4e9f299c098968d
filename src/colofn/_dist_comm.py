"""Differentiable communication over mesh axes on a real (or simulated) world.

Each method is a forward op from :mod:`colofn._comm` paired with its transpose
(the table in ``docs/shard_map.md``), glued by one ``autograd.Function`` with
``setup_context`` so it works under ``torch.autograd`` and
``torch.func.grad``/``vjp``. The transposes are themselves these differentiable
ops, so higher-order gradients work too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def op(x: torch.Tensor, fwd: Callable[[torch.Tensor], torch.Tensor], bwd: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if not (x.requires_grad and torch.is_grad_enabled()):
        return fwd(x)
    return _Op.apply(x, fwd, bwd)


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


class GradBucket:
    """Coalesces the gradient sums that ``pvary``'s transpose does for ``shard_map`` arguments.

    With varying/invariant tracking, a replicated parameter used with per-shard
    data is ``pvary``'d and its gradient ``psum``'d in the backward: one
    blocking all-reduce per parameter. For the arguments of a ``shard_map`` call
    those sums are instead *stashed* (the pvary's backward returns zeros) and
    flushed when the first argument's own backward runs (autograd runs it only
    after every use of that argument), as one flat all-reduce per (axes, dtype)
    group, each stashed gradient added back to its argument's gradient. Every
    use's gradient is still summed exactly once, over exactly the axes of its
    pvary, so the result is unchanged; only the number of messages drops. With
    ``create_graph=True`` the sums happen at once, differentiably.
    """

    def __init__(self, comm: DistComm) -> None:
        self.comm = comm
        self.owned: dict[int, int] = {}  # id(argument block) -> argument index
        self.pending: list[tuple[int, tuple[str, ...], torch.Tensor]] = []
        self.ready: dict[int, torch.Tensor] = {}

    def enter(self, index: int, local: torch.Tensor) -> torch.Tensor:
        """Wrap argument ``index``'s block so its backward adds the flushed sums."""
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
        self.pending.append((index, axes, g.detach()))
        return torch.zeros_like(g)

    def _finish(self, index: int, g: torch.Tensor) -> torch.Tensor:
        if self.pending:
            self._flush()
        extra = self.ready.pop(index, None)
        return g if extra is None else g + extra

    def _flush(self) -> None:
        groups: dict[tuple[Any, ...], list[tuple[int, torch.Tensor]]] = {}
        for index, axes, g in self.pending:  # insertion order: the same on every rank
            groups.setdefault((axes, g.dtype, g.device), []).append((index, g))
        self.pending = []
        for (axes, _, _), items in groups.items():
            flat = torch.cat([g.reshape(-1) for _, g in items])
            total = _comm.all_reduce(flat, self.comm.group(axes))
            for (index, g), piece in zip(items, total.split([g.numel() for _, g in items]), strict=True):
                piece = piece.view_as(g)
                self.ready[index] = piece if index not in self.ready else self.ready[index] + piece
