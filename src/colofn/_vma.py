"""Varying/invariant tracking inside ``shard_map`` (JAX's "VMA").

Every local tensor inside a ``shard_map`` body is *varying* along some mesh axes
(its value may differ between the ranks of that axis) and *invariant* along the
rest. The set of varying axes (the tensor's *vma*) is kept on the tensor as an
attribute tagged with the current ``shard_map`` call, so values left over from
another call (or captured from outside) count as invariant.

A :class:`torch.overrides.TorchFunctionMode` propagates vma through every torch
op: the result varies along the union of its operands' axes, and an operand
that requires grad and is invariant along some of those axes is first passed
through ``pvary`` (identity forward, ``psum`` backward), JAX's
``auto_insert_reshard``. That is what makes the gradient of a replicated
parameter used with per-shard data summed over the data axis exactly once,
with no hand-written all-reduce.

In-place writes (``y[i] = v``, ``add_``, ``copy_``, ``out=``, writes through a
view) are tracked too (:func:`_write_targets`, :func:`_before_write`,
:func:`_after_write`): the target varies along the union of its own axes and
the written value's, and so does every tensor that shares its storage and was
tagged before the write (its base and its other views). A later out_specs
check then sees the mutation, as JAX's does for ``x.at[i].set(v)``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ATTR = "_colofn_vma"
Vma = frozenset[str]
EMPTY: Vma = frozenset()


class Context:
    """The state of one ``shard_map`` call on this rank (or one device of the reference)."""

    _next_epoch = 0
    _epoch_lock = threading.Lock()

    def __init__(self, mesh_shape: dict[str, int], coords: dict[str, int], comm: Any, check_vma: bool) -> None:
        self.mesh_shape = mesh_shape
        self.coords = coords
        self.comm = comm  # the communication backend: real (torch.distributed) or the serial reference
        self.check_vma = check_vma
        self.bucket: Any = None  # a _dist_comm.GradBucket for shard_map's arguments, if any
        # implicit pvary outputs by (id(operand), axes), the operand kept alive: a value used many
        # times with varying data is pvary'd once, so its gradient is psum'd once, not once per use
        self.pvary_cache: dict[tuple[int, tuple[str, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
        # in-place writes of varying data: storage address -> (the storage, kept alive so the
        # address is not reused; the clock of the last write; the axes written into it so far)
        self.written: dict[int, tuple[Any, int, Vma]] = {}
        self.clock = 0  # counts writes; a tag remembers the clock it was made at
        with Context._epoch_lock:
            Context._next_epoch += 1
            self.epoch = Context._next_epoch

    def vma(self, t: torch.Tensor) -> Vma:
        while True:
            tag = getattr(t, _ATTR, None)
            if tag is not None and tag[0] == self.epoch:
                return tag[1] if not self.written else tag[1] | _written_since(self, t, tag[2])
            # torch.func wraps its inputs afresh: the wrapper has the value, so the vma, of what it wraps
            if not _is_functorch_wrapper(t):
                return _written_since(self, t, -1) if self.written else EMPTY
            t = _unwrapped(t)

    def set_vma(self, t: torch.Tensor, vma: Iterable[str]) -> torch.Tensor:
        tag = (self.epoch, frozenset(vma), self.clock)
        u = t
        while True:  # tag what a torch.func wrapper wraps too: that is what the transform returns
            try:
                setattr(u, _ATTR, tag)
            except (AttributeError, RuntimeError):
                pass
            if not _is_functorch_wrapper(u):
                return t
            u = _unwrapped(u)


_is_functorch_wrapper = torch._C._functorch.is_functorch_wrapped_tensor
_unwrapped = torch._C._functorch.get_unwrapped

_local = threading.local()


def current() -> Context | None:
    s = getattr(_local, "stack", None)
    return s[-1] if s else None


@contextmanager
def active(ctx: Context) -> Any:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    s.append(ctx)
    mode = _VmaMode(ctx) if ctx.check_vma else None
    try:
        if mode is None:
            yield ctx
        else:
            with mode:
                yield ctx
    finally:
        s.pop()


@contextmanager
def suspended() -> Any:
    """Run torch ops without vma propagation (inside collectives)."""
    prev = getattr(_local, "suspended", False)
    _local.suspended = True
    try:
        yield
    finally:
        _local.suspended = prev


def _tensors(args: Any) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, list | tuple):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


class _VmaMode(TorchFunctionMode):
    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        if not kwargs:
            done, out = _fast_path(self.ctx, func, args)
            if done:
                return out
        kwargs = kwargs or {}
        if getattr(_local, "suspended", False):
            return func(*args, **kwargs)
        ctx = self.ctx
        if func is torch.autograd.grad:
            return _grad(ctx, func, args, kwargs)
        operands = _tensors(args) + _tensors(kwargs.values())
        vmas = [ctx.vma(t) for t in operands]
        union = frozenset().union(*vmas) if vmas else EMPTY
        if not union:
            return func(*args, **kwargs)
        if torch.is_grad_enabled() and any(v != union and t.requires_grad for t, v in zip(operands, vmas, strict=True)):
            if _in_place(func) and args:  # the target can't be swapped for a pvary'd view
                rest, kwargs = _pvary_operands(ctx, union, args[1:], kwargs)
                args = (args[0], *rest)
            else:
                args, kwargs = _pvary_operands(ctx, union, args, kwargs)
        targets = _write_targets(func, args, kwargs)
        if targets:
            _before_write(ctx, targets, union)
        out = func(*args, **kwargs)
        _tag(ctx, out, union)
        if targets:
            _after_write(ctx, targets, union)
        return out


_PLAIN_FUNCS: dict[Any, bool] = {}  # func -> may take the fast path (not in place, not autograd.grad)


def _fast_path(ctx: Context, func: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    """The common op, decided without the full path's bookkeeping: ``(True, result)`` or ``(False, None)``.

    Taken only for an op that is not in place (those, and ops with keyword
    arguments such as ``out=``, always take the full path), whose positional
    arguments are tensors or non-container values, every tensor with the same
    vma: no operand needs a pvary, so the result is the op's, tagged with that
    vma (untagged when it is empty), exactly what the full path returns.
    """
    plain = _PLAIN_FUNCS.get(func)
    if plain is None:
        try:
            plain = _PLAIN_FUNCS[func] = func is not torch.autograd.grad and not _in_place(func)
        except TypeError:  # an unhashable callable
            return False, None
    if not plain or getattr(_local, "suspended", False):
        return False, None
    vma: Vma | None = None
    for a in args:
        if isinstance(a, torch.Tensor):
            v = ctx.vma(a)
            if vma is None:
                vma = v
            elif v != vma:
                return False, None
        elif isinstance(a, list | tuple | dict):
            return False, None
    out = func(*args)
    if vma:
        _tag(ctx, out, vma)
    return True, out


_IN_PLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__", "__iand__", "__ior__"})


def _in_place(func: Callable[..., Any]) -> bool:
    name = getattr(func, "__name__", "")
    return name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))


# ----------------------------------------------------------------------------- in-place writes

# in-place by name but no write of values: they change no tensor's vma
_NOT_WRITES = frozenset({"requires_grad_", "retain_grad", "share_memory_", "detach_", "pin_memory", "record_stream"})


def _write_targets(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors ``func`` writes into: an ``out=`` argument, else an in-place op's first argument."""
    out = kwargs.get("out")
    if out is not None:
        return _tensors((out,))
    if args and isinstance(args[0], torch.Tensor) and _in_place(func) and getattr(func, "__name__", "") not in _NOT_WRITES:
        return [args[0]]
    return []


def _storage(t: torch.Tensor) -> Any:
    while _is_functorch_wrapper(t):
        t = _unwrapped(t)
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, meta, ... tensors: no storage to share
        return None
    return s if s.nbytes() else None


def _written_since(ctx: Context, t: torch.Tensor, clock: int) -> Vma:
    """Axes written into ``t``'s storage after its tag was made (at ``clock``; -1: untagged)."""
    s = _storage(t)
    hit = ctx.written.get(s.data_ptr()) if s is not None else None
    return hit[2] if hit is not None and hit[1] > clock else EMPTY


def written_axes(ctx: Context, t: torch.Tensor) -> Vma:
    """The axes in-place writes put into ``t``'s storage (to word an error)."""
    return _written_since(ctx, t, -1) if ctx.written else EMPTY


def _before_write(ctx: Context, targets: list[torch.Tensor], union: Vma) -> None:
    """Mark a differentiable target's base varying along the written axes before varying data goes in.

    The written storage varies afterwards, so its cotangent does too; what the
    base held before must then have a ``pvary`` (whose transpose sums) on its
    way in, as an out-of-place op would have inserted on an invariant operand.
    The base itself is not replaced (the target aliases it): it is overwritten
    with the pvary'd copy of its own value.
    """
    if not torch.is_grad_enabled():
        return
    from colofn.collectives import _pvary_one

    for t in targets:
        base = t._base if t._base is not None else t
        missing = union - ctx.vma(base)
        if not missing or not base.requires_grad or base.is_leaf:
            continue
        axes = tuple(a for a in ctx.mesh_shape if a in missing)
        with suspended():
            base.copy_(_pvary_one(base, axes).clone())


def _after_write(ctx: Context, targets: list[torch.Tensor], union: Vma) -> None:
    """The targets, and every older tensor on their storage, now vary along ``union``."""
    ctx.clock += 1
    for t in targets:
        s = _storage(t)
        if s is not None:
            prev = ctx.written.get(s.data_ptr())
            ctx.written[s.data_ptr()] = (s, ctx.clock, union | (prev[2] if prev else EMPTY))
        ctx.set_vma(t, union | ctx.vma(t))


def _grad(ctx: Context, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``torch.autograd.grad`` (also what ``torch.func.grad``/``vjp`` call): a cotangent has the vma of its primal.

    The autograd engine computes gradients without passing through this mode, so
    they would come back untagged (invariant). With implicit pvary inserted on
    every invariant operand that meets varying data, the gradient of an invariant
    input is psum'd (invariant) and that of a varying input varies, as in JAX.
    """
    inputs = args[1] if len(args) > 1 else kwargs["inputs"]
    with suspended():
        grads = func(*args, **kwargs)
    for x, g in zip((inputs,) if isinstance(inputs, torch.Tensor) else inputs, grads, strict=True):
        if isinstance(g, torch.Tensor):
            ctx.set_vma(g, ctx.vma(x))
    return grads


def _tag(ctx: Context, out: Any, vma: Vma) -> None:
    if isinstance(out, torch.Tensor):
        ctx.set_vma(out, vma)
    elif isinstance(out, list | tuple):
        for o in out:
            if isinstance(o, torch.Tensor):
                ctx.set_vma(o, vma)


def vary_over(t: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
    """``t`` varying over ``axes`` too, by the pvary an op mixing it with such a value would insert.

    The same (cached) implicit pvary, so for a ``shard_map`` argument its
    gradient sum goes to the gradient buckets. Call it on the argument before
    taking a view of it (a slice, a transpose) that meets varying data: the
    implicit pvary would otherwise be on the view, summed on its own, blocking.
    Outside tracking (no body, or a ``check_vma=False`` one: no implicit pvary
    to stand for), or where ``t`` varies over ``axes`` already, ``t`` itself.
    """
    ctx = current()
    if ctx is None or not ctx.check_vma or not axes or set(axes) <= ctx.vma(t):
        return t
    with suspended():
        (out,), _ = _pvary_operands(ctx, frozenset(ctx.vma(t) | set(axes)), (t,), {})
    return out


def _pvary_operands(ctx: Context, union: Vma, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    from colofn.collectives import _pvary_one

    def fix(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            missing = union - ctx.vma(a)
            if not missing:
                return a
            axes = tuple(a_ for a_ in ctx.mesh_shape if a_ in missing)
            hit = ctx.pvary_cache.get((id(a), axes))
            if hit is None:
                if ctx.bucket is not None and ctx.bucket.owns(a):  # an argument: coalesce its gradient sum
                    out = ctx.set_vma(ctx.bucket.pvary(a, axes), ctx.vma(a) | set(axes))
                else:
                    out = _pvary_one(a, axes)
                hit = ctx.pvary_cache[(id(a), axes)] = (a, out)
            return hit[1]
        if isinstance(a, list | tuple) and any(isinstance(x, torch.Tensor) for x in a):
            return type(a)(fix(x) for x in a) if not hasattr(a, "_fields") else a
        return a

    return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}
