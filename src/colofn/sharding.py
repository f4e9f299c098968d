"""``NamedSharding``, ``device_put`` and ``gather``: where each tensor lives."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from colofn import tracing
from colofn import tree as jt
from colofn.errors import ShardingError, SpecError, format_failures
from colofn.mesh import Mesh, get_mesh
from colofn.partition_spec import P, PartitionSpec, dim_axes

__all__ = [
    "NamedSharding",
    "check_spec",
    "device_put",
    "from_local_block",
    "gather",
    "local_block",
    "sharding_of",
]


class NamedSharding:
    """A ``PartitionSpec`` on a ``Mesh``.

    >>> import colofn, torch
    >>> def f():
    ...     s = colofn.NamedSharding(colofn.Mesh((2, 2), ("dp", "tp")), colofn.P("dp"))
    ...     return s.shard_shape((8, 3)), s.to_placements(2)
    >>> colofn.launch(f, world_size=4)[0]
    ((4, 3), (Shard(dim=0), Replicate()))
    """

    __slots__ = ("mesh", "spec")

    def __init__(self, mesh: Mesh, spec: PartitionSpec) -> None:
        if not isinstance(mesh, Mesh):
            raise TypeError(f"NamedSharding needs a colofn.Mesh, got {type(mesh).__name__}")
        if not isinstance(spec, PartitionSpec):
            raise TypeError(f"NamedSharding needs a P(...), got {type(spec).__name__} {spec!r}")
        failures = spec_mesh_failures(spec, mesh)
        if failures:
            raise SpecError(format_failures(f"{spec} does not fit {mesh}:", failures, fix=_spec_fix(mesh)))
        self.mesh = mesh
        self.spec = spec

    def __repr__(self) -> str:
        return f"NamedSharding({self.mesh}, {self.spec})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NamedSharding) and other.mesh == self.mesh and other.spec == self.spec

    def __hash__(self) -> int:
        return hash((self.mesh, self.spec))

    def shard_shape(self, global_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of each block (raises if a dim does not divide)."""
        failures = spec_shape_failures(self.spec, self.mesh, tuple(global_shape))
        if failures:
            raise ShardingError(format_failures(f"{self.spec} cannot split shape {tuple(global_shape)}:", failures))
        return tuple(
            d // math.prod(self.mesh.shape[a] for a in self.spec.dim_axes(i))
            for i, d in enumerate(global_shape)
        )

    def to_placements(self, ndim: int) -> tuple[Placement, ...]:
        """DTensor placements (one per mesh axis) for a tensor of rank ``ndim``.

        A dim split over axes in mesh order is ``Shard(d)`` on each. DTensor
        processes mesh axes left to right, each splitting what the previous
        left; an axis that must be *minor* to axes after it in mesh order (as
        ``"a"`` in ``P(("b", "a"))`` on mesh ``("a", "b")``, JAX's block
        layout: the first named axis major) is ``_StridedShard(d,
        split_factor=k)``, ``k`` the product of the sizes of those later axes
        named before it. Each rank's block is the same as JAX's, so no data moves.

        >>> import colofn, torch
        >>> def f():
        ...     s = colofn.NamedSharding(colofn.Mesh((2, 2), ("a", "b")), colofn.P(("b", "a")))
        ...     return s.to_placements(1)
        >>> colofn.launch(f, world_size=4)[0]
        (_StridedShard(dim=0, sf=2), Shard(dim=0))
        """
        if len(self.spec) > ndim:
            raise SpecError(f"{self.spec} has {len(self.spec)} entries but the tensor has rank {ndim}")
        placements: list[Placement] = [Replicate() for _ in self.mesh.axis_names]
        pos = {a: i for i, a in enumerate(self.mesh.axis_names)}
        for d, entry in enumerate(self.spec):
            axes = dim_axes(entry)
            for k, a in enumerate(axes):
                sf = math.prod(self.mesh.shape[x] for x in axes[:k] if pos[x] > pos[a])
                split = sf > 1 and self.mesh.shape[a] > 1
                placements[pos[a]] = _StridedShard(d, split_factor=sf) if split else Shard(d)
        return tuple(placements)

    @classmethod
    def from_placements(cls, mesh: Mesh, placements: Sequence[Placement]) -> NamedSharding:
        """The inverse of :meth:`to_placements` (``Partial`` has no spec and is an error).

        The order of a dim's axes is read back from the ``_StridedShard`` split
        factors: walking the mesh axes from the last, each goes in after the
        shortest run of the later ones whose sizes multiply to its split factor.
        """
        if len(placements) != mesh.ndim:
            raise ShardingError(f"{len(placements)} placements for a mesh of {mesh.ndim} axes ({mesh})")
        by_dim: dict[int, list[tuple[str, int]]] = {}
        for name, p in zip(mesh.axis_names, placements, strict=True):
            if isinstance(p, Partial):
                raise ShardingError(
                    f"placement {p} on axis {name!r} is a pending reduction with no PartitionSpec; "
                    "redistribute to Replicate() or Shard(d) first"
                )
            if isinstance(p, _StridedShard):
                by_dim.setdefault(p.dim, []).append((name, int(p.split_factor)))
            elif isinstance(p, Shard):
                if type(p) is not Shard:
                    raise ShardingError(f"placement {p} on axis {name!r} has no PartitionSpec equivalent")
                by_dim.setdefault(p.dim, []).append((name, 1))
        ndim = max(by_dim) + 1 if by_dim else 0
        entries = [_axis_order(mesh, by_dim[d], placements) if d in by_dim else None for d in range(ndim)]
        return cls(mesh, P(*entries))


def _axis_order(mesh: Mesh, axes: list[tuple[str, int]], placements: Sequence[Placement]) -> tuple[str, ...]:
    """The spec order (first major) of one dim's axes, from their (name, split factor) in mesh order."""
    order: list[str] = []
    for name, sf in reversed(axes):
        k, prod = 0, 1
        while prod < sf and k < len(order):
            prod *= mesh.shape[order[k]]
            k += 1
        if prod != sf:
            raise ShardingError(f"placements {tuple(placements)} on {mesh}: split factor {sf} of axis {name!r} "
                                "matches no order of the axes after it; it has no PartitionSpec equivalent")
        order.insert(k, name)
    return tuple(order)


def _spec_fix(mesh: Mesh) -> str:
    return f"name only axes of the mesh {tuple(mesh.axis_names)}, each at most once"


def spec_mesh_failures(spec: PartitionSpec, mesh: Mesh) -> list[str]:
    out = []
    seen: set[str] = set()
    for i, entry in enumerate(spec):
        axes = dim_axes(entry)
        for a in axes:
            if a not in mesh.shape:
                out.append(f"dim {i}: axis {a!r} is not in the mesh {mesh}")
            elif a in seen:
                out.append(f"dim {i}: axis {a!r} is used more than once")
            seen.add(a)
    return out


def spec_shape_failures(spec: PartitionSpec, mesh: Mesh, shape: tuple[int, ...]) -> list[str]:
    if len(spec) > len(shape):
        return [f"{spec} has {len(spec)} entries but the tensor has rank {len(shape)} (shape {shape})"]
    out = []
    for i, entry in enumerate(spec):
        axes = dim_axes(entry)
        n = math.prod(mesh.shape.get(a, 1) for a in axes)
        if n > 1 and shape[i] % n:
            sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
            out.append(f"dim {i} of size {shape[i]} is not divisible by {n} (axes {sizes})")
    return out


def check_spec(path: str, spec: PartitionSpec, mesh: Mesh, shape: tuple[int, ...]) -> list[str]:
    """Every reason ``spec`` cannot shard a tensor of ``shape`` at ``path`` on ``mesh``."""
    return [f"{path} (shape {shape}, spec {spec}): {f}" for f in spec_mesh_failures(spec, mesh) + spec_shape_failures(spec, mesh, shape)]


def local_block(x: torch.Tensor, spec: PartitionSpec, mesh: Mesh) -> torch.Tensor:
    """This rank's block of global tensor ``x`` under ``spec`` (no communication)."""
    for d, entry in enumerate(spec):
        axes = dim_axes(entry)
        if not axes:
            continue
        n, idx = 1, 0
        for a in axes:  # first axis major
            idx = idx * mesh.shape[a] + mesh.axis_index(a)
            n *= mesh.shape[a]
        size = x.shape[d] // n
        x = x.narrow(d, idx * size, size)
    return x


def from_local_block(block: torch.Tensor, spec: PartitionSpec, mesh: Mesh) -> DTensor:
    """The DTensor whose block on this rank is ``block`` under ``spec`` (no communication)."""
    shape = list(block.shape)
    for d, entry in enumerate(spec):
        shape[d] *= math.prod(mesh.shape[a] for a in dim_axes(entry))
    stride, step = [1] * len(shape), 1  # contiguous strides of the global shape
    for d in reversed(range(len(shape))):
        stride[d], step = step, step * max(shape[d], 1)
    placements = NamedSharding(mesh, spec).to_placements(block.ndim)
    return DTensor.from_local(
        block.contiguous(), mesh.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=tuple(stride)
    )


def _as_sharding(s: Any, mesh: Mesh | None, path: str) -> tuple[NamedSharding | None, list[str]]:
    """The sharding a prefix leaf stands for, or the reasons it cannot be one."""
    if isinstance(s, NamedSharding):
        return s, []
    if isinstance(s, PartitionSpec):
        m = get_mesh(mesh, f"the spec {s} at {path}")
        bad = spec_mesh_failures(s, m)
        if bad:
            return None, [f"{path} (spec {s}): {b}" for b in bad]
        return NamedSharding(m, s), []
    return None, [f"{path}: expected a NamedSharding, P(...) or None, got {type(s).__name__} {s!r}"]


def _is_sharding_leaf(x: Any) -> bool:
    return x is None or isinstance(x, NamedSharding | PartitionSpec)


def device_put(tree: Any, shardings: Any, *, mesh: Mesh | None = None) -> Any:
    """Place a pytree of global tensors (the same value on every rank) as DTensors.

    ``shardings`` is a pytree prefix of ``tree`` whose leaves are
    ``NamedSharding``s, or ``P``s on ``mesh`` (or the ambient mesh), or ``None``
    (leave that subtree as it is). Plain tensors are split locally (no
    communication); DTensors are redistributed.

    Raises:
      SpecError / ShardingError naming every bad leaf path, before any communication.
    """
    sh = jt.broadcast_prefix(shardings, tree, is_leaf=_is_sharding_leaf, prefix_name="shardings", full_name="tree")
    pairs, treedef = jt.flatten_with_path(tree)
    failures: list[str] = []
    bad_leaves = 0
    targets: list[NamedSharding | None] = []
    for (path, x), s in zip(pairs, sh, strict=True):
        p = jt.keystr(path)
        if s is None:
            targets.append(None)
            continue
        # Every reason this leaf cannot be placed: bad axes, rank and divisibility together.
        if isinstance(s, NamedSharding | PartitionSpec):
            spec = s.spec if isinstance(s, NamedSharding) else s
            m = s.mesh if isinstance(s, NamedSharding) else get_mesh(mesh, f"the spec {s} at {p}")
            if isinstance(x, torch.Tensor):
                bad = check_spec(p, spec, m, tuple(x.shape))
            else:
                bad = [f"{p}: got {type(x).__name__} {x!r:.40}, not a tensor"]
                bad += [f"{p} (spec {spec}): {b}" for b in spec_mesh_failures(spec, m)]
            ns = None if bad else (s if isinstance(s, NamedSharding) else NamedSharding(m, s))
        else:
            ns, bad = _as_sharding(s, mesh, p)
        targets.append(ns)
        failures += bad
        bad_leaves += bool(bad)
    if failures:
        raise ShardingError(
            format_failures(
                f"device_put cannot place {bad_leaves} leaf(s):",
                failures,
                fix="name only mesh axes, each once, in at most as many entries as the tensor has "
                "dims; make every sharded dim divisible by the product of its axes' sizes (or "
                "shard another dim: P(None, 'tp') splits dim 1)",
            )
        )
    out = [x if t is None else _place(x, t) for (_, x), t in zip(pairs, targets, strict=True)]
    return jt.unflatten(treedef, out)


def _place(x: torch.Tensor, s: NamedSharding) -> DTensor:
    placements = s.to_placements(x.ndim)
    dm = s.mesh.device_mesh
    if isinstance(x, DTensor):
        if x.device_mesh == dm and tuple(x.placements) == placements:
            return x
        tracing.note_mesh(dm)
        return x.redistribute(dm, placements)
    x = x.to(s.mesh.device)
    local = local_block(x, s.spec, s.mesh)
    return DTensor.from_local(local.contiguous(), dm, placements, run_check=False, shape=x.shape, stride=x.contiguous().stride())


def gather(tree: Any) -> Any:
    """The global value of every DTensor leaf, on every rank (other leaves unchanged)."""
    def full(x: Any) -> Any:
        if not isinstance(x, DTensor):
            return x
        tracing.note_mesh(x.device_mesh)
        return x.full_tensor()

    return jt.map(full, tree)


def sharding_of(x: DTensor, mesh: Mesh | None = None) -> NamedSharding:
    """The ``NamedSharding`` of a DTensor."""
    m = mesh if mesh is not None and mesh.device_mesh == x.device_mesh else Mesh.from_device_mesh(x.device_mesh)
    return NamedSharding.from_placements(m, x.placements)
