"""``shard_map``: run per-device code on local blocks, with named-axis collectives.

Reference semantics (the oracle of the tests, :func:`colofn.testing.shard_map_reference`):
split each input into blocks by its spec, run ``f`` on each device's blocks,
model each collective on the blocks of all devices, and reassemble the outputs
by their specs. Here every rank runs ``f`` on its own blocks only, and the
collectives communicate for real.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar, overload

import torch
from torch.distributed.tensor import DTensor

from colofn import _vma, tracing
from colofn import tree as jt
from colofn._dist_comm import DistComm, GradBucket, op
from colofn.errors import SpecError, format_failures
from colofn.mesh import Mesh, get_mesh
from colofn.partition_spec import PartitionSpec, dim_axes
from colofn.sharding import (
    NamedSharding,
    from_local_block,
    local_block,
    spec_mesh_failures,
    spec_shape_failures,
)
from colofn.world import in_simulated_world

__all__ = ["per_device", "shard_map"]

F = TypeVar("F", bound=Callable[..., Any])


@overload
def shard_map(f: F, /, *, mesh: Mesh | None = None, in_specs: Any, out_specs: Any, check_vma: bool = True) -> F: ...
@overload
def shard_map(f: None = None, /, *, mesh: Mesh | None = None, in_specs: Any, out_specs: Any, check_vma: bool = True) -> Callable[[F], F]: ...


def shard_map(
    f: Callable[..., Any] | None = None,
    /,
    *,
    mesh: Mesh | None = None,
    in_specs: Any,
    out_specs: Any,
    check_vma: bool = True,
) -> Any:
    """Map ``f`` over the blocks of its arguments, one block per device of ``mesh``.

    Args:
      f: per-device code. Inside it every tensor is this rank's local block, and
        the collectives of :mod:`colofn.collectives` work over the mesh axes.
      mesh: the mesh (default: the ambient one, from ``with mesh:``).
      in_specs: a pytree prefix of the argument tuple, with a ``P`` per leaf.
        Arguments may be global tensors (the same value on every rank; each rank
        takes its block) or DTensors (redistributed to the spec if they differ).
      out_specs: a pytree prefix of ``f``'s result. An axis the spec leaves out
        promises the result is invariant along it; naming an axis the result is
        invariant along gives ``axis_size`` tiled copies.
      check_vma: track varying/invariant values (JAX's ``check_vma``): needed for
        gradients equal to the single-device ones without hand-written reductions.

    Returns:
      ``f`` mapped: it returns DTensors laid out by ``out_specs``. Gradients flow
      back to global-tensor arguments as the full global gradient on every rank
      and to DTensor arguments as DTensors with their sharding.

    Usable as a decorator: ``@shard_map(mesh=mesh, in_specs=..., out_specs=...)``.

    >>> import colofn, torch
    >>> from colofn import P
    >>> def program():
    ...     mesh = colofn.Mesh((2,), ("dp",))
    ...     @colofn.shard_map(mesh=mesh, in_specs=(P(), P("dp")), out_specs=P())
    ...     def loss(w, x):
    ...         return colofn.pmean(((x @ w) ** 2).mean(), "dp")
    ...     w = torch.ones(3, requires_grad=True)
    ...     loss(w, torch.arange(12.0).reshape(4, 3)).to_local().backward()
    ...     return w.grad.tolist()
    >>> colofn.launch(program, world_size=2)[0]
    [216.0, 249.0, 282.0]
    """
    if f is None:
        return lambda g: shard_map(g, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
    if not callable(f):
        raise TypeError(f"shard_map needs a callable, got {type(f).__name__}")

    @functools.wraps(f)
    def mapped(*args: Any, **kwargs: Any) -> Any:
        if torch._C._are_functorch_transforms_active():
            raise TypeError(
                f"shard_map'd function {_name(f)!r} was called under a torch.func transform (grad, vjp, "
                "vmap, ...); its results are DTensors, which torch.func cannot carry. Apply the transform "
                "inside instead, as in JAX: shard_map(torch.func.grad(local_loss), ...) with pmean/psum "
                "in local_loss, or use torch.autograd.grad/backward on the shard_map'd function"
            )
        if kwargs:
            raise TypeError(
                f"shard_map'd function {_name(f)!r} was called with keyword arguments {sorted(kwargs)}; "
                "pass every argument positionally (in_specs follows the positional argument tuple), "
                "or bind static ones with functools.partial"
            )
        m = get_mesh(mesh, f"shard_map of {_name(f)!r}")
        return _run(f, m, in_specs, out_specs, check_vma, args)

    return mapped


def _name(f: Callable[..., Any]) -> str:
    return getattr(f, "__name__", type(f).__name__)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _param_names(f: Callable[..., Any], n: int) -> list[str | None]:
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        return [None] * n
    names: list[str | None] = []
    for i in range(n):
        if i < len(params) and params[i].kind in (params[i].POSITIONAL_ONLY, params[i].POSITIONAL_OR_KEYWORD):
            names.append(params[i].name)
        elif any(p.kind == p.VAR_POSITIONAL for p in params):
            names.append(next(p.name for p in params if p.kind == p.VAR_POSITIONAL) + f"[{i}]")
        else:
            names.append(None)
    return names


def _global_shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_inputs(f: Callable[..., Any], mesh: Mesh, in_specs: Any, args: tuple[Any, ...]) -> tuple[list[Any], list[PartitionSpec], Any]:
    specs = jt.broadcast_prefix(in_specs, args, is_leaf=_is_spec, prefix_name="in_specs", full_name="the argument tuple")
    spec_paths = functools.cache(  # where each argument's spec sits in in_specs, to word an error
        lambda: jt.broadcast_prefix(
            jt.map_with_path(lambda p, _: "in_specs" + (jt.keystr(p) if len(p) else ""), in_specs, is_leaf=_is_spec),
            args,
            is_leaf=lambda s: isinstance(s, str),
        )
    )
    leaves, treedef = jt.flatten(args)
    paths = functools.cache(lambda: [p for p, _ in jt.flatten_with_path(args)[0]])  # to word an error
    names = functools.cache(lambda: _param_names(f, len(args)))  # inspect only to word an error
    failures: list[str] = []
    fixes: dict[str, None] = {}  # ordered set
    for i, (x, spec) in enumerate(zip(leaves, specs, strict=True)):
        if _is_spec(spec) and isinstance(x, torch.Tensor):
            if not spec_mesh_failures(spec, mesh) and not spec_shape_failures(spec, mesh, _global_shape(x)):
                if not isinstance(x, DTensor) or x.device_mesh == mesh.device_mesh:
                    continue  # the common case, checked without building any text
        path = paths()[i]
        arg_path, spec_path = "args" + jt.keystr(path), spec_paths()[i]
        bound = ""
        nm = names()[path[0].entry] if len(path) and isinstance(getattr(path[0], "entry", None), int) else None
        if nm:
            bound = f", where args[{path[0].entry}] is bound to {_name(f)}'s parameter {nm!r},"
        if not _is_spec(spec):
            failures.append(f"{spec_path} for {arg_path}{bound} is {spec!r}, not a P(...)")
            fixes["give a P(...) for every argument (P() replicates it)"] = None
            continue
        if not isinstance(x, torch.Tensor):
            article = "an" if type(x).__name__[:1].lower() in "aeiou" else "a"
            failures.append(f"{arg_path}{bound} is {article} {type(x).__name__} ({x!r:.40}), not a tensor")
            fixes["shard_map maps tensors only: close over other values or bind them with functools.partial"] = None
            continue
        shape = _global_shape(x)
        where = f"{arg_path} of shape {shape}{bound} corresponds to {spec_path} of value {spec}"
        bad = spec_mesh_failures(spec, mesh) + spec_shape_failures(spec, mesh, shape)
        failures += [f"{where}: {msg}" for msg in bad]
        if bad:
            fixes[
                "name only mesh axes, each once per spec, in at most as many entries as the argument has "
                "dims, and make each split dim divisible by the product of its axes' sizes"
            ] = None
        if isinstance(x, DTensor) and x.device_mesh != mesh.device_mesh:
            failures.append(f"{arg_path}{bound} is a DTensor on another mesh ({x.device_mesh}) than {mesh}")
            fixes["move DTensor arguments to the shard_map's mesh (or pass global tensors)"] = None
    if failures:
        raise SpecError(
            format_failures(
                f"shard_map applied to {_name(f)!r} got arguments that do not fit in_specs on {mesh} "
                f"(axis sizes {dict(mesh.shape)}):",
                failures,
                fix="; ".join(fixes),
            )
        ) from None
    return leaves, specs, treedef


def _enter(x: torch.Tensor, spec: PartitionSpec, mesh: Mesh, comm: DistComm, check_vma: bool) -> torch.Tensor:
    """This rank's block of an argument; backward gives the gradient in the argument's own form."""
    if isinstance(x, DTensor):
        placements = NamedSharding(mesh, spec).to_placements(x.ndim)
        if tuple(x.placements) != placements:
            x = x.redistribute(mesh.device_mesh, placements)
        local = x.to_local()
        if not check_vma:
            missing = tuple(a for a in mesh.axis_names if a not in spec.axes)
            if missing:
                local = op(local, lambda t: t.view_as(t), lambda g: comm.psum_raw_grad(g, missing))
        return local
    x = x.to(mesh.device)
    split = [(d, dim_axes(e)) for d, e in enumerate(spec) if dim_axes(e)]
    missing = tuple(a for a in mesh.axis_names if a not in spec.axes)

    def bwd(g: torch.Tensor) -> torch.Tensor:
        if not check_vma and missing:
            g = comm.psum_raw_grad(g, missing)
        for d, axes in split:  # full gradient on every rank: gather the blocks back (transpose: the block)
            g = comm.gather_blocks(g, axes, d)
        return g

    if in_simulated_world():
        # Simulated ranks are threads sharing the caller's tensor: give each its own
        # block, as a process of a real world has, so an in-place op stays local.
        return op(x, lambda t: local_block(t, spec, mesh).clone(), bwd)
    return op(x, lambda t: local_block(t, spec, mesh), bwd)


def _run(f: Callable[..., Any], mesh: Mesh, in_specs: Any, out_specs: Any, check_vma: bool, args: tuple[Any, ...]) -> Any:
    if _vma.current() is not None:
        raise NotImplementedError(
            f"shard_map of {_name(f)!r} was called inside another shard_map's body; nested shard_map "
            "is not supported: use one shard_map over all the mesh axes"
        )
    leaves, specs, treedef = _check_inputs(f, mesh, in_specs, args)
    tracing.note_mesh(mesh.device_mesh)  # DTensor arguments' redistributions are recorded with axis names
    comm = DistComm(mesh, check_vma)
    ctx = _vma.Context(dict(mesh.shape), {a: mesh.axis_index(a) for a in mesh.axis_names}, comm, check_vma)
    local = [_enter(x, s, mesh, comm, check_vma) for x, s in zip(leaves, specs, strict=True)]
    if check_vma:
        ctx.bucket = GradBucket(comm)
        local = ctx.bucket.enter_all(local)
    local = [ctx.set_vma(t, s.axes) for t, s in zip(local, specs, strict=True)]
    with _vma.active(ctx):
        out = f(*jt.unflatten(treedef, local))
    return _exit(f, mesh, ctx, out_specs, out, check_vma, comm)


def per_device(f: Callable[..., Any], /, *, mesh: Mesh | None = None, in_specs: Any, check_vma: bool = True) -> Callable[..., Any]:
    """The body of a ``shard_map``, for callers that already hold this rank's blocks.

    ``f`` is called on the arguments as they are (no splitting, no DTensors):
    ``in_specs`` only says which mesh axes each argument varies along, and the
    collectives and varying/invariant tracking work inside as in
    :func:`shard_map`. The results are returned as local tensors, still tagged,
    so a following ``per_device`` call sees how they vary. This is what a
    pipeline stage runs: its activations arrive as local blocks from another
    rank (see ``colofn.train``).

    >>> import colofn, torch
    >>> from colofn import P
    >>> def program():
    ...     mesh = colofn.Mesh((2,), ("dp",))
    ...     w = torch.ones(2, requires_grad=True)
    ...     x = torch.full((2,), float(colofn.process_index() + 1))  # this rank's block
    ...     f = per_device(lambda w, x: colofn.pmean((w * x).sum(), "dp"), mesh=mesh, in_specs=(P(), P("dp")))
    ...     f(w, x).backward()
    ...     return w.grad.tolist()
    >>> colofn.launch(program, world_size=2)
    [[1.5, 1.5], [1.5, 1.5]]
    """

    checked: dict[Any, tuple[Mesh, list[Any]]] = {}  # argument structure -> (mesh, its checked specs)

    @functools.wraps(f)
    def body(*args: Any) -> Any:
        if _vma.current() is not None:
            raise NotImplementedError(f"per_device of {_name(f)!r} was called inside a shard_map body")
        m = get_mesh(mesh, f"per_device of {_name(f)!r}")
        leaves, treedef = jt.flatten(args)
        hit = checked.get(treedef)
        if hit is not None and hit[0] is m:  # a pipeline calls a stage once per microbatch: check once
            specs = hit[1]
        else:
            specs = jt.broadcast_prefix(in_specs, args, is_leaf=_is_spec, prefix_name="in_specs", full_name="the argument tuple")
            bad = [spec for spec in specs if not _is_spec(spec) or spec_mesh_failures(spec, m)]
            if bad:
                raise SpecError(f"per_device of {_name(f)!r}: in_specs entries {bad} are not P(...) of axes of {m}")
            checked[treedef] = (m, specs)
        comm = DistComm(m, check_vma)
        ctx = _vma.Context(dict(m.shape), {a: m.axis_index(a) for a in m.axis_names}, comm, check_vma)
        bucket = ctx.bucket = GradBucket(comm) if check_vma else None  # the gradient sums in buckets, as shard_map's

        entered = bucket.enter_all(leaves) if bucket is not None else leaves

        def tag(x: Any, e: Any, s: PartitionSpec) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            return ctx.set_vma(e if e is not x else x.view_as(x), s.axes)  # never tag the caller's tensor

        # untracked (check_vma=False): nothing reads a tag to decide anything, so none is made
        tagged = [tag(x, e, s) for x, e, s in zip(leaves, entered, specs, strict=True)] if check_vma else entered
        with _vma.active(ctx):
            return f(*jt.unflatten(treedef, tagged))

    return body


def _exit(f: Callable[..., Any], mesh: Mesh, ctx: _vma.Context, out_specs: Any, out: Any, check_vma: bool, comm: DistComm) -> Any:
    specs = jt.broadcast_prefix(out_specs, out, is_leaf=_is_spec, prefix_name="out_specs", full_name=f"the result of {_name(f)!r}")
    leaves, treedef = jt.flatten(out)
    paths = functools.cache(lambda: [p for p, _ in jt.flatten_with_path(out)[0]])  # to word an error
    failures: list[str] = []
    for i, (y, spec) in enumerate(zip(leaves, specs, strict=True)):
        if _is_spec(spec) and isinstance(y, torch.Tensor) and not isinstance(y, DTensor) and len(spec) <= y.ndim:
            if not spec_mesh_failures(spec, mesh) and not (check_vma and ctx.vma(y) - set(spec.axes)):
                continue  # the common case, checked without building any text
        path = paths()[i]
        where = f"the output at {jt.keystr(path)}" if len(path) else "the output"
        if not _is_spec(spec):
            failures.append(f"out_specs entry for {where} is {spec!r}, not a P(...)")
            continue
        if not isinstance(y, torch.Tensor) or isinstance(y, DTensor):
            failures.append(f"{where} is a {type(y).__name__}, not a local tensor")
            continue
        failures += [f"{where} (local shape {tuple(y.shape)}), out_specs {spec}: {m}" for m in spec_mesh_failures(spec, mesh)]
        if len(spec) > y.ndim:
            failures.append(f"{where} has rank {y.ndim} but its out spec {spec} has {len(spec)} entries")
        if check_vma:
            for a in mesh.axis_names:
                if a not in spec.axes and a in ctx.vma(y):
                    how = " (a value varying along it was written into it in place)" if a in _vma.written_axes(ctx, y) else ""
                    failures.append(
                        f"out_specs {spec} for {where} implies that the corresponding output value is "
                        f"replicated across mesh axis {a!r}, but could not infer replication over it: "
                        f"the value varies along {a!r}{how}. Fix: psum/pmean/all_gather(to='invariant') it "
                        f"over {a!r}, or name {a!r} in its out spec"
                    )
    if failures:
        raise SpecError(format_failures(f"shard_map of {_name(f)!r}: the result does not fit out_specs on {mesh}:", failures))
    results = []
    for y, spec in zip(leaves, specs, strict=True):
        if not check_vma:
            k = math.prod(mesh.shape[a] for a in mesh.axis_names if a not in spec.axes)
            if k > 1:
                y = op(y, lambda t: t.view_as(t), functools.partial(torch.div, other=k))
        else:  # an axis named for an invariant value gives tiled copies: their cotangents sum (JAX's pvary)
            tiled = tuple(a for a in mesh.axis_names if a in spec.axes and a not in ctx.vma(y))
            if tiled:
                y = comm.pvary(y, tiled)
        results.append(from_local_block(y, spec, mesh))
    return jt.unflatten(treedef, results)
