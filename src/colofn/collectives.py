"""Named-axis collectives for use inside ``shard_map``.

Each takes a pytree of local tensors and an ``axis_name`` (one mesh axis or a
tuple of them, the first major; ``()`` is a group of one rank), maps over the
tree, and is differentiable to any order (``torch.autograd``, ``create_graph=True``,
``torch.func.grad``/``vjp``, and ``jvp`` on real worlds): its backward is its
transpose, itself a differentiable collective. Semantics follow JAX's
``shard_map`` with ``check_vma=True``; see ``docs/shard_map.md`` for the table of
inputs, outputs and transposes.

>>> import colofn, torch
>>> from colofn import P
>>> def f():
...     mesh = colofn.Mesh((4,), ("i",))
...     g = colofn.shard_map(lambda x: colofn.psum(x, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
...     return colofn.gather(g(torch.arange(4.0))).item()
>>> colofn.launch(f, world_size=4)
[6.0, 6.0, 6.0, 6.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from colofn import _vma
from colofn import tree as jt
from colofn._perm import check_perm
from colofn.errors import ShapeError, SpecError

__all__ = [
    "all_gather",
    "all_to_all",
    "axis_index",
    "axis_size",
    "pbroadcast",
    "pmax",
    "pmean",
    "pmin",
    "ppermute",
    "psum",
    "psum_scatter",
    "pvary",
]

AxisName = str | Sequence[str]


def _ctx(op: str) -> _vma.Context:
    ctx = _vma.current()
    if ctx is None:
        raise SpecError(
            f"colofn.{op} was called outside shard_map: named mesh axes are bound only inside a "
            "function run by colofn.shard_map; call it from there"
        )
    return ctx


def _axes(ctx: _vma.Context, axis_name: AxisName, op: str) -> tuple[str, ...]:
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    bad = [a for a in axes if a not in ctx.mesh_shape]
    if bad or len(set(axes)) != len(axes):  # () is allowed: a group of one rank, as in JAX
        problem = f"unknown axis name(s) {bad}" if bad else f"an axis repeated in {axes}"
        raise SpecError(
            f"colofn.{op}(..., axis_name={axis_name!r}): {problem}; the mesh axes are "
            f"{tuple(ctx.mesh_shape)}"
        )
    return axes


def _size(ctx: _vma.Context, axes: tuple[str, ...]) -> int:
    return math.prod(ctx.mesh_shape[a] for a in axes)


def _map(fn: Callable[[torch.Tensor], torch.Tensor], x: Any, op: str) -> Any:
    if isinstance(x, torch.Tensor):  # the common case, without building paths
        return fn(x)

    def one(path: Any, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"colofn.{op}: leaf {jt.keystr(path)} is a {type(t).__name__}, not a tensor")
        return fn(t)

    return jt.map_with_path(one, x)


def _implicit_pvary(ctx: _vma.Context, t: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
    """Mark ``t`` varying along ``axes`` (JAX's implicit pvary): no data moves."""
    if not ctx.check_vma:
        return t
    have = ctx.vma(t)
    missing = tuple(a for a in axes if a not in have)
    if not missing:
        return t
    out = ctx.comm.pvary(t, missing) if t.requires_grad else t.view_as(t)
    return ctx.set_vma(out, have | set(missing))


def _pvary_one(t: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
    ctx = _ctx("pvary")
    with _vma.suspended():
        out = ctx.comm.pvary(t, axes)
    return ctx.set_vma(out, ctx.vma(t) | set(axes))


def _finish(ctx: _vma.Context, out: torch.Tensor, vma: frozenset[str]) -> torch.Tensor:
    return ctx.set_vma(out, vma)


# ----------------------------------------------------------------------------- reductions


def _reduction(kind: Literal["sum", "mean", "max", "min"]) -> Callable[[Any, AxisName], Any]:
    op = {"sum": "psum", "mean": "pmean", "max": "pmax", "min": "pmin"}[kind]

    def collective(x: Any, axis_name: AxisName) -> Any:
        ctx = _ctx(op)
        axes = _axes(ctx, axis_name, op)

        def one(t: torch.Tensor) -> torch.Tensor:
            with _vma.suspended():
                t = _implicit_pvary(ctx, t, axes)
                vma = ctx.vma(t) - set(axes)
                if kind in ("sum", "mean"):
                    out = ctx.comm.psum(t, axes)
                    if kind == "mean":
                        out = out / _size(ctx, axes)
                else:
                    out = ctx.comm.pextreme(t, axes, kind)
            return _finish(ctx, out, vma)

        return _map(one, x, op)

    return collective


psum = _reduction("sum")
psum.__name__ = psum.__qualname__ = "psum"
psum.__doc__ = """Sum over the ranks of ``axis_name``; the result is invariant along it.

An input invariant along the axis is first marked varying (implicit pvary), so it
counts once per rank: ``psum(1.0-like, "i")`` is the axis size. Backward: pvary (no
communication).
"""
pmean = _reduction("mean")
pmean.__name__ = pmean.__qualname__ = "pmean"
pmean.__doc__ = "``psum(x, axis_name) / axis_size``; invariant along the axis. Backward: ``/ axis_size``, then pvary."
pmax = _reduction("max")
pmax.__name__ = pmax.__qualname__ = "pmax"
pmax.__doc__ = "Maximum over the axis; invariant. Backward: the cotangent goes to the holders of the maximum, split evenly between ties."
pmin = _reduction("min")
pmin.__name__ = pmin.__qualname__ = "pmin"
pmin.__doc__ = "Minimum over the axis; invariant. Backward: the cotangent goes to the holders of the minimum, split evenly between ties."


def pvary(x: Any, axis_name: AxisName) -> Any:
    """Mark ``x`` (invariant along ``axis_name``) as varying along it; the value is unchanged.

    Backward: ``psum`` over the axis. Passing a value that already varies along
    the axis is an error (it would be summed twice).
    """
    ctx = _ctx("pvary")
    axes = _axes(ctx, axis_name, "pvary")

    def one(t: torch.Tensor) -> torch.Tensor:
        already = [a for a in axes if a in ctx.vma(t)]
        if already and ctx.check_vma:
            raise SpecError(
                f"colofn.pvary: the value already varies along {already}; pvary takes values "
                "invariant along the axis (drop the pvary, or psum first)"
            )
        return _pvary_one(t, axes)

    return _map(one, x, "pvary")


def pbroadcast(x: Any, axis_name: AxisName, source: int) -> Any:
    """The block of the rank whose index along ``axis_name`` is ``source``, on every rank of the axis.

    Moves what a broadcast moves (``dist.broadcast`` on the axis group: no rank
    sends or receives more than the block), where ``psum(where(axis_index(axis)
    == source, x, 0), axis)`` all-reduces (about twice the bytes). An input
    invariant along the axis is first marked varying (implicit pvary); the result
    is invariant along the axis. Backward: the cotangent delivered to
    ``source``, zeros elsewhere (with ``check_vma=False``, summed over the axis:
    a reduce).

    >>> import colofn, torch
    >>> from colofn import P
    >>> def f():
    ...     mesh = colofn.Mesh((4,), ("i",))
    ...     g = colofn.shard_map(lambda x: colofn.pbroadcast(x, "i", 2), mesh=mesh, in_specs=P("i"), out_specs=P())
    ...     return colofn.gather(g(torch.arange(4.0))).item()
    >>> colofn.launch(f, world_size=4)
    [2.0, 2.0, 2.0, 2.0]
    """
    ctx = _ctx("pbroadcast")
    axes = _axes(ctx, axis_name, "pbroadcast")
    n = _size(ctx, axes)
    if isinstance(source, bool) or not isinstance(source, int) or not 0 <= source < n:
        raise SpecError(
            f"colofn.pbroadcast over {axes} (size {n}): source must be an int index in [0, {n}), "
            f"got {source!r}"
        )

    def one(t: torch.Tensor) -> torch.Tensor:
        with _vma.suspended():
            t = _implicit_pvary(ctx, t, axes)
            vma = ctx.vma(t) - set(axes)
            out = ctx.comm.pbroadcast(t, axes, source)
        return _finish(ctx, out, vma)

    return _map(one, x, "pbroadcast")


# ----------------------------------------------------------------------------- gathers and scatters


def all_gather(
    x: Any,
    axis_name: AxisName,
    *,
    axis_dim: int = 0,
    tiled: bool = False,
    to: Literal["varying", "invariant"] = "varying",
) -> Any:
    """Every rank's block along ``axis_name``, stacked at ``axis_dim`` (concatenated if ``tiled``).

    ``to="varying"`` (default): the result still varies along the axis; backward is
    ``psum_scatter``. ``to="invariant"``: the result is invariant along the axis;
    backward takes this rank's slice (no communication).
    """
    if to not in ("varying", "invariant"):
        raise ValueError(f"all_gather: to must be 'varying' or 'invariant', got {to!r}")
    ctx = _ctx("all_gather")
    axes = _axes(ctx, axis_name, "all_gather")

    def one(t: torch.Tensor) -> torch.Tensor:
        d = _dim(axis_dim, t.ndim + (0 if tiled else 1), "all_gather", "axis_dim")
        with _vma.suspended():
            t = _implicit_pvary(ctx, t, axes)
            vma = ctx.vma(t)
            src = t if tiled else t.unsqueeze(d)
            if to == "varying":
                out = ctx.comm.all_gather(src, axes, d)
                vma = vma | set(axes)
            else:
                out = ctx.comm.all_gather_invariant(src, axes, d)
                vma = vma - set(axes)
        return _finish(ctx, out, vma)

    return _map(one, x, "all_gather")


def psum_scatter(x: Any, axis_name: AxisName, *, scatter_dimension: int = 0, tiled: bool = False) -> Any:
    """Sum over ``axis_name``, each rank keeping its block of ``scatter_dimension``.

    Untiled: ``x.shape[scatter_dimension]`` must equal the axis size and that dim is
    removed. Tiled: it must be divisible by the axis size. Result varies along the
    axis. Backward: ``all_gather``.
    """
    ctx = _ctx("psum_scatter")
    axes = _axes(ctx, axis_name, "psum_scatter")
    n = _size(ctx, axes)

    def one(t: torch.Tensor) -> torch.Tensor:
        d = _dim(scatter_dimension, t.ndim, "psum_scatter", "scatter_dimension")
        if (t.shape[d] % n if tiled else t.shape[d] != n):
            need = f"divisible by {n}" if tiled else f"equal to {n}"
            raise ShapeError(
                f"psum_scatter over {axes} (size {n}): dim {d} of the operand, of size {t.shape[d]} "
                f"(shape {tuple(t.shape)}), must be {need}"
                + ("" if tiled else "; pass tiled=True to split a longer dim into blocks")
            )
        with _vma.suspended():
            t = _implicit_pvary(ctx, t, axes)
            vma = ctx.vma(t) | set(axes)
            out = ctx.comm.reduce_scatter(t, axes, d)
            if not tiled:
                out = out.squeeze(d)
        return _finish(ctx, out, vma)

    return _map(one, x, "psum_scatter")


def all_to_all(x: Any, axis_name: AxisName, split_axis: int, concat_axis: int, *, tiled: bool = False) -> Any:
    """Split ``split_axis`` into one chunk per rank, send chunk i to rank i, join what arrives along ``concat_axis``.

    Untiled (as ``jax.lax.all_to_all``): ``x.shape[split_axis]`` must equal the axis
    size; that dim is removed and a new dim of the axis size appears at
    ``concat_axis``. Result varies along the axis. Backward: ``all_to_all`` with the
    two dims swapped.
    """
    ctx = _ctx("all_to_all")
    axes = _axes(ctx, axis_name, "all_to_all")
    n = _size(ctx, axes)

    def one(t: torch.Tensor) -> torch.Tensor:
        s = _dim(split_axis, t.ndim, "all_to_all", "split_axis")
        c = _dim(concat_axis, t.ndim, "all_to_all", "concat_axis")
        if (t.shape[s] % n if tiled else t.shape[s] != n):
            need = f"divisible by {n}" if tiled else f"equal to {n}"
            raise ShapeError(
                f"all_to_all over {axes} (size {n}): split_axis {s} of the operand, of size "
                f"{t.shape[s]} (shape {tuple(t.shape)}), must be {need}"
            )
        with _vma.suspended():
            t = _implicit_pvary(ctx, t, axes)
            vma = ctx.vma(t) | set(axes)
            if tiled:
                out = ctx.comm.all_to_all(t, axes, s, c)
            else:  # jax.lax.all_to_all's untiled form, on top of the tiled one
                if s < c:
                    c += 1
                    src = t.unsqueeze(c)
                elif s == c:
                    src = t
                else:
                    src = t.unsqueeze(c)
                    s += 1
                out = ctx.comm.all_to_all(src, axes, s, c)
                if s != c:
                    out = out.squeeze(s)
        return _finish(ctx, out, vma)

    return _map(one, x, "all_to_all")


def ppermute(x: Any, axis_name: AxisName, perm: Sequence[tuple[int, int]]) -> Any:
    """Send each block from axis index ``src`` to ``dst`` for every ``(src, dst)`` in ``perm``.

    Ranks that are no pair's destination get zeros. Result varies along the axis.
    Backward: ``ppermute`` with the pairs reversed.
    """
    ctx = _ctx("ppermute")
    axes = _axes(ctx, axis_name, "ppermute")
    n = _size(ctx, axes)
    pairs = check_perm(perm, axes, n)

    def one(t: torch.Tensor) -> torch.Tensor:
        with _vma.suspended():
            t = _implicit_pvary(ctx, t, axes)
            vma = ctx.vma(t) | set(axes)
            out = ctx.comm.ppermute(t, axes, pairs)
        return _finish(ctx, out, vma)

    return _map(one, x, "ppermute")


def axis_index(axis_name: AxisName) -> torch.Tensor:
    """This rank's index along ``axis_name`` (a 0-d int64 tensor, varying along the axis)."""
    ctx = _ctx("axis_index")
    axes = _axes(ctx, axis_name, "axis_index")
    i = 0
    for a in axes:
        i = i * ctx.mesh_shape[a] + ctx.coords[a]
    return ctx.set_vma(torch.tensor(i, dtype=torch.int64), set(axes))


def axis_size(axis_name: AxisName) -> int:
    """The number of ranks along ``axis_name`` (the product for a tuple)."""
    ctx = _ctx("axis_size")
    return _size(ctx, _axes(ctx, axis_name, "axis_size"))


def _dim(d: int, ndim: int, op: str, name: str) -> int:
    if not -ndim <= d < ndim:
        raise ShapeError(f"{op}: {name}={d} is out of range for a result of rank {ndim}")
    return d % ndim
