"""Differentiable communication over mesh axes on a real (or simulated) world.

Each method is a forward op from :mod:`colofn._comm` paired with its transpose
(the table in ``docs/shard_map.md``), glued by one ``autograd.Function`` with
``setup_context`` so it works under ``torch.autograd`` and
``torch.func.grad``/``vjp``. The transposes are themselves these differentiable
ops, so higher-order gradients work too; forward mode (``jvp``) applies the op
to the tangent, and ``vmap`` batches the shape-blind ones (psum, pvary,
pbroadcast, ppermute). What cannot work raises, naming the collective.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist

from colofn import _comm, _step_sums, _vma
from colofn.mesh import Mesh
from colofn.world import in_simulated_world

Fn = Callable[[torch.Tensor], torch.Tensor]


class _Op(torch.autograd.Function):
    """``forward(x) = fwd(x)``; ``backward(g) = bwd(g)``; forward mode: ``jvp(t) = lin(t)``.

    ``bwd`` is the transpose and ``lin`` the op itself, both differentiable (built
    with :func:`op` again), so the graph a backward pass records can be
    differentiated again with the collectives it needs.
    """

    @staticmethod
    def forward(x: torch.Tensor, name: str, fwd: Fn, bwd: Fn, lin: Fn | None) -> torch.Tensor:
        return fwd(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _, ctx.name, _, ctx.bwd, ctx.lin = inputs

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        with _vma.suspended():  # the transposes are typed by construction: no implicit pvary in here
            return ctx.bwd(g), None, None, None, None

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor, *_: Any) -> torch.Tensor:
        if ctx.lin is None:
            raise NotImplementedError(
                f"forward-mode differentiation (torch.func.jvp, torch.autograd.forward_ad) through "
                f"colofn's {ctx.name} is not supported; use reverse mode (torch.func.grad/vjp, "
                "torch.autograd.grad with create_graph=True) for this value"
            )
        with _vma.suspended():
            return ctx.lin(t)

    @staticmethod
    def vmap(info: Any, in_dims: Any, x: torch.Tensor, name: str, fwd: Fn, bwd: Fn, lin: Fn | None) -> Any:
        if name not in _BATCHABLE:
            raise NotImplementedError(
                f"colofn.{name} under torch.func.vmap is not supported: its dims or its selection would "
                "need a batching rule (psum, pmean, pvary, pbroadcast and ppermute have one). Move the "
                "vmap out of the shard_map body, or put the batch into the tensor (a leading dim) and "
                "call the collective once"
            )
        # elementwise across ranks and blind to the shape: the same op on the whole batch, batch dim kept
        return _Op.apply(x, name, fwd, bwd, lin), in_dims[0]


# collectives whose raw op and transposes work on any shape, position by position (so a vmap
# batch dim just rides along); gathers, scatters and all_to_all name dims, pmax/pmin keep a selection
_BATCHABLE = frozenset({"psum", "pvary", "pbroadcast", "ppermute"})


def _same(t: torch.Tensor) -> torch.Tensor:
    return t.view_as(t)


# ``Function.apply`` binds the arguments through ``inspect.signature`` on every call when ``setup_context``
# is defined (about 14 us of the 17 us an op costs); outside functorch transforms it then only calls this.
_op_apply = super(torch.autograd.Function, _Op).apply
_unwrap_dead = torch._functorch.utils.unwrap_dead_wrappers


def op(x: torch.Tensor, fwd: Fn, bwd: Fn, *, lin: Fn | None = None, name: str = "shard_map") -> torch.Tensor:
    """``fwd(x)``, differentiable with transpose ``bwd`` (and ``lin``, the op itself, for forward mode).

    Plain ``fwd(x)`` when nothing differentiates it; under a ``torch.func``
    transform or forward-mode AD always the ``autograd.Function`` (so ``vmap``
    raises and ``jvp`` carries tangents instead of dropping them).
    """
    transforms = _transforms_active()
    if transforms or fwAD._current_level >= 0:
        if _forward_mode(transforms) and in_simulated_world():
            raise NotImplementedError(
                f"forward-mode differentiation (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) "
                f"through colofn's {name} is not supported in the simulated world: torch's forward-AD "
                "levels are shared by every thread of a process, so thread ranks running it at once corrupt "
                "each other's tangents. Use reverse mode (torch.func.grad/vjp of a grad, or "
                "torch.autograd.grad with create_graph=True; a Hessian-vector product is grad of "
                "<grad, v>), or run on a real world (colofn.launch(..., backend='gloo'))"
            )
        return _Op.apply(x, name, fwd, bwd, lin)
    if x.requires_grad and torch.is_grad_enabled():
        return _op_apply(*_unwrap_dead((x, name, fwd, bwd, lin)))  # type: ignore[no-any-return]
    return fwd(x)


_transforms_active = torch._C._are_functorch_transforms_active


def _forward_mode(transforms: bool) -> bool:
    if fwAD._current_level >= 0:
        return True
    stack = torch._C._functorch.get_interpreter_stack() if transforms else None
    return any(ci.key() == torch._C._functorch.TransformType.Jvp for ci in stack or ())


def _plain(x: torch.Tensor) -> torch.Tensor:
    """``x``'s value as a plain tensor, outside every ``torch.func`` level and autograd graph."""
    x = x.detach()
    while torch._C._functorch.is_functorch_wrapped_tensor(x):
        x = torch._C._functorch.get_unwrapped(x)
    return x.detach()


class DistComm:
    """Communication for one ``shard_map`` call on ``mesh``.

    Every method is a differentiable collective whose backward is its transpose,
    itself one of these methods, so gradients of any order are exact. With
    ``check_vma`` a cotangent has the varying/invariant type of its primal, so
    ``psum``'s transpose is ``pvary`` (no communication) and ``pvary``'s is
    ``psum``; without it (every device's copy its own variable) ``psum``'s
    transpose is ``psum``.
    """

    def __init__(self, mesh: Mesh, check_vma: bool) -> None:
        self.mesh = mesh
        self.check_vma = check_vma

    def group(self, axes: tuple[str, ...]) -> _comm.AxisGroup:
        return _comm.axis_group(self.mesh, axes)

    # value-preserving marks
    def pvary(self, x: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
        """Invariant -> varying, no data moves; transpose: the psum to invariant."""
        return op(x, _same, lambda g: self._psum_invariant(g, axes), lin=lambda t: self.pvary(t, axes), name="pvary")

    def _psum_invariant(self, x: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
        """Varying -> invariant sum; transpose: pvary."""
        grp = self.group(axes)
        return op(
            x,
            lambda t: _comm.all_reduce(t, grp),
            lambda g: self.pvary(g, axes),
            lin=lambda t: self._psum_invariant(t, axes),
            name="psum",
        )

    def psum_raw_grad(self, g: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
        """Sum the gradient of a value replicated along ``axes`` (a shard_map argument's, say).

        The sum is one global value: its cotangent is the same on every rank, so
        the transpose is the identity (``pvary`` under tracking).
        """
        if self.check_vma:
            return self._psum_invariant(g, axes)
        grp = self.group(axes)
        return op(g, lambda t: _comm.all_reduce(t, grp), _same, lin=lambda t: self.psum_raw_grad(t, axes), name="psum")

    # reductions
    def psum(self, x: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
        if self.check_vma:
            return self._psum_invariant(x, axes)
        grp = self.group(axes)
        return op(
            x,
            lambda t: _comm.all_reduce(t, grp),
            lambda g: self.psum(g, axes),
            lin=lambda t: self.psum(t, axes),
            name="psum",
        )

    def pextreme(self, x: torch.Tensor, axes: tuple[str, ...], kind: str) -> torch.Tensor:
        """pmax/pmin: the derivative goes to the holders of the extreme, split evenly between ties."""
        grp = self.group(axes)
        red = dist.ReduceOp.MAX if kind == "max" else dist.ReduceOp.MIN
        with torch._C._DisableFuncTorch():  # constants at every torch.func level: the selection is one
            base = _plain(x)
            out = _comm.all_reduce(base, grp, red)
        shares: list[torch.Tensor] = []

        def share() -> torch.Tensor:  # 1/ties at the holders of the extreme, 0 elsewhere (counted once, when needed)
            if not shares:
                with torch._C._DisableFuncTorch():
                    mask = (base == out).to(x.dtype)
                    shares.append(mask / _comm.all_reduce(mask, grp))
            return shares[0]

        def bwd(g: torch.Tensor) -> torch.Tensor:  # the selection's transpose
            return (self.pvary(g, axes) if self.check_vma else self.psum(g, axes)) * share()

        def lin(t: torch.Tensor) -> torch.Tensor:  # the selection: the holders' tangents, averaged
            return self.psum(t * share(), axes)

        return op(x, lambda t: out.clone(), bwd, lin=lin, name=f"p{kind}")

    # gathers and scatters (tiled)
    def all_gather(self, x: torch.Tensor, axes: tuple[str, ...], dim: int) -> torch.Tensor:
        grp = self.group(axes)
        return op(
            x,
            lambda t: _comm.all_gather(t, grp, dim),
            lambda g: self.reduce_scatter(g, axes, dim),
            lin=lambda t: self.all_gather(t, axes, dim),
            name="all_gather",
        )

    def all_gather_invariant(self, x: torch.Tensor, axes: tuple[str, ...], dim: int) -> torch.Tensor:
        if not self.check_vma:
            return self.all_gather(x, axes, dim)
        return self.gather_blocks(x, axes, dim)

    def gather_blocks(self, x: torch.Tensor, axes: tuple[str, ...], dim: int) -> torch.Tensor:
        """Varying blocks -> the one (invariant) whole; transpose: this rank's block (:meth:`take_block`)."""
        grp = self.group(axes)
        return op(
            x,
            lambda t: _comm.all_gather(t, grp, dim),
            lambda g: self.take_block(g, axes, dim),
            lin=lambda t: self.gather_blocks(t, axes, dim),
            name="all_gather",
        )

    def take_block(self, x: torch.Tensor, axes: tuple[str, ...], dim: int) -> torch.Tensor:
        """An invariant whole -> this rank's block of ``dim`` (no communication); transpose: :meth:`gather_blocks`."""
        grp = self.group(axes)
        block = x.shape[dim] // grp.size
        return op(
            x,
            lambda t: t.narrow(dim, grp.index * block, block).clone(),
            lambda g: self.gather_blocks(g, axes, dim),
            lin=lambda t: self.take_block(t, axes, dim),
            name="all_gather",
        )

    def reduce_scatter(self, x: torch.Tensor, axes: tuple[str, ...], dim: int) -> torch.Tensor:
        grp = self.group(axes)
        return op(
            x,
            lambda t: _comm.reduce_scatter(t, grp, dim),
            lambda g: self.all_gather(g, axes, dim),
            lin=lambda t: self.reduce_scatter(t, axes, dim),
            name="psum_scatter",
        )

    def all_to_all(self, x: torch.Tensor, axes: tuple[str, ...], split: int, concat: int) -> torch.Tensor:
        grp = self.group(axes)
        return op(
            x,
            lambda t: _comm.all_to_all(t, grp, split, concat),
            lambda g: self.all_to_all(g, axes, concat, split),
            lin=lambda t: self.all_to_all(t, axes, split, concat),
            name="all_to_all",
        )

    def ppermute(self, x: torch.Tensor, axes: tuple[str, ...], perm: Sequence[tuple[int, int]]) -> torch.Tensor:
        grp = self.group(axes)
        inverse = [(d, s) for s, d in perm]
        return op(
            x,
            lambda t: _comm.ppermute(t, grp, perm),
            lambda g: self.ppermute(g, axes, inverse),
            lin=lambda t: self.ppermute(t, axes, perm),
            name="ppermute",
        )

    # broadcast and its transposes
    def pbroadcast(self, x: torch.Tensor, axes: tuple[str, ...], source: int) -> torch.Tensor:
        """The block of group index ``source`` on every rank; transpose: the cotangent delivered to ``source``.

        Under tracking the cotangent of the (invariant) result is one value, so
        the transpose keeps it at ``source`` and zeros elsewhere with no
        communication; without tracking every rank's cotangent counts, and the
        transpose is a sum delivered to ``source`` (a reduce).
        """
        grp = self.group(axes)
        bwd = (lambda g: self.keep_at(g, axes, source)) if self.check_vma else (lambda g: self.reduce_to(g, axes, source))
        return op(
            x,
            lambda t: _comm.broadcast(t, grp, source),
            bwd,
            lin=lambda t: self.pbroadcast(t, axes, source),
            name="pbroadcast",
        )

    def keep_at(self, x: torch.Tensor, axes: tuple[str, ...], source: int) -> torch.Tensor:
        """``x`` at group index ``source``, zeros elsewhere (no communication); transpose: :meth:`pbroadcast`."""
        grp = self.group(axes)
        return op(
            x,
            lambda t: t.detach().clone() if grp.index == source else torch.zeros_like(t),
            lambda g: self.pbroadcast(g, axes, source),
            lin=lambda t: self.keep_at(t, axes, source),
            name="pbroadcast",
        )

    def reduce_to(self, x: torch.Tensor, axes: tuple[str, ...], dest: int) -> torch.Tensor:
        """The sum over ``axes`` at group index ``dest``, zeros elsewhere; transpose: :meth:`pbroadcast`."""
        grp = self.group(axes)
        return op(
            x,
            lambda t: _comm.reduce(t, grp, dest),
            lambda g: self.pbroadcast(g, axes, dest),
            lin=lambda t: self.reduce_to(t, axes, dest),
            name="pbroadcast",
        )


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
    happen at once, differentiably. Inside a pipeline step, the sums of the
    step's parameters go to its :class:`~colofn._step_sums.StepSums` instead
    (once per step, not once per microbatch).
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
        self.step_sums = _step_sums.current()
        self.deferred: dict[int, _step_sums.Handle] = {}  # argument index -> its parameter in step_sums

    def enter(self, index: int, local: torch.Tensor) -> torch.Tensor:
        """Wrap argument ``index``'s block so its backward adds the summed gradients."""
        if not local.requires_grad:
            return local
        if (out := self._enter_deferred(index, local)) is not None:
            return out
        out = op(local, lambda t: t.view_as(t), lambda g: self._finish(index, g), lin=_same)
        self.owned[id(out)] = index
        return out

    def enter_all(self, blocks: list[Any]) -> list[Any]:
        """:meth:`enter` of every block (argument ``i`` is ``blocks[i]``; non-tensors and blocks without grad pass as they are).

        Under plain autograd, one node for all of them (:class:`_EnterAll`):
        autograd runs it last, as it would each argument's own node.
        """
        idx = [i for i, x in enumerate(blocks) if isinstance(x, torch.Tensor) and x.requires_grad]
        if not idx or not _plain_autograd():
            return [self.enter(i, x) if isinstance(x, torch.Tensor) else x for i, x in enumerate(blocks)]
        out = list(blocks)
        for i in list(idx):  # a pipeline step's parameters: plain views, their sums are the step's
            if (y := self._enter_deferred(i, blocks[i])) is not None:
                out[i] = y
                idx.remove(i)
        if not idx:
            return out
        for i, y in zip(idx, _EnterAll.apply(self, tuple(idx), *(blocks[i] for i in idx)), strict=True):
            out[i] = y
            self.owned[id(y)] = i
        return out

    def _enter_deferred(self, index: int, local: torch.Tensor) -> torch.Tensor | None:
        """A plain view of ``local`` if its sums belong to the running pipeline step (:class:`StepSums`), else None."""
        if self.step_sums is None or (h := self.step_sums.handle(local)) is None:
            return None
        self.deferred[index] = h  # the step adds its sums: no backward node of its own to wait in
        out = local.view_as(local)
        self.owned[id(out)] = index
        return out

    def owns(self, t: torch.Tensor) -> bool:
        return id(t) in self.owned

    def pvary(self, t: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
        index = self.owned[id(t)]
        if _plain_autograd():  # a view whose gradient hook stashes: no Python node of its own
            out = t.view_as(t)
            out.register_hook(functools.partial(self._stash_hook, index, axes))
            return out
        return op(t, lambda x: x.view_as(x), lambda g: self._stash(index, axes, g), lin=lambda u: self.comm.pvary(u, axes), name="pvary of a shard_map argument")

    def _stash_hook(self, index: int, axes: tuple[str, ...], g: torch.Tensor) -> torch.Tensor:
        with _vma.suspended():
            return self._stash(index, axes, g)

    def _stash(self, index: int, axes: tuple[str, ...], g: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # create_graph: keep the sum differentiable
            return self.comm.psum_raw_grad(g, axes)
        if index in self.deferred:
            assert self.step_sums is not None
            return self.step_sums.stash(self.comm, self.deferred[index], axes, g)
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

    def _finish_all(self, indices: tuple[int, ...], gs: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
        """:meth:`_finish` of every argument at once; an unused one (``None``) stays ``None``."""
        return [g if g is None else self._finish(i, g) for i, g in zip(indices, gs, strict=True)]

    def _wait(self, b: _Launched) -> None:
        if b.work is not None:
            b.work.wait()
        pieces = b.flat.split([math.prod(shape) for _, shape in b.items])
        for (index, shape), piece in zip(b.items, pieces, strict=True):
            piece = piece.view(shape)
            self.ready[index] = piece if index not in self.ready else self.ready[index] + piece
            self.waiting[index] -= 1


def _plain_autograd() -> bool:
    """No ``torch.func`` transform and no forward-mode AD: what :func:`op`'s own fast path needs too."""
    return not _transforms_active() and fwAD._current_level < 0


class _EnterAll(torch.autograd.Function):
    """The arguments of one call entered by one node: ``forward`` views them, ``backward`` adds each one's sums.

    For plain autograd only (:meth:`GradBucket.enter_all`); under ``torch.func``
    transforms or forward-mode AD every argument gets its own :func:`op`.
    """

    @staticmethod
    def forward(ctx: Any, bucket: GradBucket, indices: tuple[int, ...], *blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.bucket, ctx.indices = bucket, indices
        ctx.set_materialize_grads(False)
        return tuple(x.view_as(x) for x in blocks)

    @staticmethod
    def backward(ctx: Any, *gs: torch.Tensor | None) -> tuple[Any, ...]:
        with _vma.suspended():
            return (None, None, *ctx.bucket._finish_all(ctx.indices, gs))


@dataclass
class _Launched:
    work: Any  # the all-reduce's dist.Work; None on a group of one rank
    flat: torch.Tensor  # the bucket, summed in place once ``work`` is done
    items: list[tuple[int, torch.Size]]  # (argument index, gradient shape), in bucket order
