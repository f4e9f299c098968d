"""``Mesh``: a named grid over the ranks of the current world."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from colofn.errors import MeshError, format_failures

__all__ = ["Mesh", "current_mesh", "get_mesh"]


class Mesh:
    """A named grid over the ranks of the current world, row-major (rank = flat index).

    Every rank must build the same meshes in the same order (building one creates
    a process group per axis). ``with mesh:`` makes it the ambient mesh for
    calls that take ``mesh=None``.

    >>> import colofn
    >>> def f():
    ...     mesh = colofn.Mesh((2, 2), ("dp", "tp"))
    ...     return dict(mesh.shape), mesh.axis_index("tp")
    >>> colofn.launch(f, world_size=4)[3]
    ({'dp': 2, 'tp': 2}, 1)
    """

    def __init__(self, shape: Sequence[int] | Mapping[str, int], axis_names: Sequence[str] | None = None) -> None:
        if isinstance(shape, Mapping):
            if axis_names is not None:
                raise MeshError("Mesh takes either a mapping {name: size} or (shape, axis_names), not both")
            axis_names, shape = tuple(shape.keys()), tuple(shape.values())
        shape_t = tuple(shape) if not isinstance(shape, int) else (shape,)
        names_t = tuple(axis_names) if axis_names is not None else ()
        from colofn.world import initialize, process_count

        # Validated before joining a world, so a bad mesh starts nothing: the size
        # of the world initialize() would join is known without joining it.
        world = process_count() if dist.is_initialized() else (
            int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else 1
        )
        failures = []
        if len(shape_t) != len(names_t):
            failures.append(f"shape {shape_t} has {len(shape_t)} axes but axis_names {names_t} has {len(names_t)}")
        for s in shape_t:
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                failures.append(f"axis size {s!r} is not an int >= 1")
        for n in names_t:
            if not isinstance(n, str) or not n:
                failures.append(f"axis name {n!r} is not a non-empty str")
        dup = sorted({n for n in names_t if names_t.count(n) > 1}, key=str)
        if dup:
            failures.append(f"axis names {dup} are used more than once")
        if not failures and math.prod(shape_t) != world:
            failures.append(
                f"shape {shape_t} has {math.prod(shape_t)} devices but the world has {world} ranks"
            )
        if failures:
            raise MeshError(
                format_failures(
                    f"Cannot build Mesh(shape={shape_t}, axis_names={names_t}):",
                    failures,
                    fix="give one int size and one unique name per axis, with sizes multiplying to "
                    f"the world size ({world})",
                )
            )
        initialize()
        self._shape: Mapping[str, int] = MappingProxyType(dict(zip(names_t, shape_t, strict=True)))
        self._axis_names = names_t
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        self._device_mesh = init_device_mesh(device, shape_t, mesh_dim_names=names_t)
        self._coords = tuple(self._device_mesh.get_coordinate() or ())

    @classmethod
    def from_device_mesh(cls, device_mesh: DeviceMesh) -> Mesh:
        """Wrap an existing torch ``DeviceMesh`` that has dim names."""
        names = device_mesh.mesh_dim_names
        if not names:
            raise MeshError("Mesh.from_device_mesh needs a DeviceMesh built with mesh_dim_names")
        self = cls.__new__(cls)
        self._shape = MappingProxyType(dict(zip(names, device_mesh.shape, strict=True)))
        self._axis_names = tuple(names)
        self._device_mesh = device_mesh
        self._coords = tuple(device_mesh.get_coordinate() or ())
        return self

    # --- the contract
    @property
    def shape(self) -> Mapping[str, int]:
        """Ordered mapping axis name -> size."""
        return self._shape

    @property
    def axis_names(self) -> tuple[str, ...]:
        return self._axis_names

    @property
    def size(self) -> int:
        return math.prod(self._shape.values())

    @property
    def ndim(self) -> int:
        return len(self._axis_names)

    @property
    def device_mesh(self) -> DeviceMesh:
        return self._device_mesh

    @property
    def device_type(self) -> str:
        return self._device_mesh.device_type

    @property
    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.device_type)

    # --- helpers
    def axis_index(self, name: str) -> int:
        """This rank's coordinate along axis ``name``."""
        return self._coords[self._axis_position(name)]

    def _axis_position(self, name: str) -> int:
        try:
            return self._axis_names.index(name)
        except ValueError:
            raise MeshError(f"axis {name!r} is not in the mesh {self}") from None

    def axis_group(self, names: str | Sequence[str]) -> dist.ProcessGroup:
        """The process group over the given axes (a tuple is flattened, first name major)."""
        t = (names,) if isinstance(names, str) else tuple(names)
        if len(t) == 1:
            return self._device_mesh.get_group(t[0])
        return self._flat_mesh(t).get_group()

    def _flat_mesh(self, names: tuple[str, ...]) -> DeviceMesh:
        positions = [self._axis_position(n) for n in names]
        if positions != sorted(positions):
            # DeviceMesh flattens in mesh order; a different order needs its own group.
            raise MeshError(
                f"axes {names} must be listed in mesh order {self._axis_names} to be combined"
            )
        return self._device_mesh[names]._flatten("_".join(names))

    def __repr__(self) -> str:
        return "Mesh(" + ", ".join(f"{n}={s}" for n, s in self._shape.items()) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mesh) and self._device_mesh == other._device_mesh

    def __hash__(self) -> int:
        return hash(self._device_mesh)

    # --- ambient mesh
    def __enter__(self) -> Mesh:
        _stack().append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _stack().pop()


_ambient = threading.local()  # per thread, since simulated ranks are threads


def _stack() -> list[Mesh]:
    s = getattr(_ambient, "stack", None)
    if s is None:
        s = _ambient.stack = []
    return s


def current_mesh() -> Mesh | None:
    """The innermost mesh entered with ``with mesh:`` on this rank, or None."""
    s = _stack()
    return s[-1] if s else None


def get_mesh(mesh: Mesh | None, what: str) -> Mesh:
    """``mesh``, or the ambient one; a clear error when neither is there."""
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise MeshError(f"{what}: mesh must be a colofn.Mesh, got {type(mesh).__name__}")
        return mesh
    m = current_mesh()
    if m is None:
        raise MeshError(f"{what} needs a mesh: pass mesh=... or call it inside `with mesh:`")
    return m
