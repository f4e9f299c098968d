"""A serial reference ``shard_map``: the oracle the parallel implementation is tested against.

No process groups, no DTensor, no varying/invariant tracking: split each input
into blocks by its spec, run ``f`` once per device (each device a thread of a
lock-step barrier), model every collective as plain differentiable tensor math
on the blocks of all devices, and reassemble outputs by their specs (for axes an
out spec leaves out, device 0's copy). Gradients of the reference are therefore
the true gradients of the global function, computed by ordinary autograd, to
any order (differentiate the reference from outside: a collective under a
``torch.func`` transform inside its body raises, since there is no tracking to
tell which device's copy a gradient belongs to).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from colofn import _vma
from colofn import tree as jt
from colofn.partition_spec import PartitionSpec, dim_axes

__all__ = ["shard_map_reference"]


class _Meeting:
    """Lock-step exchange of one value per device."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.slots: list[Any] = [None] * n
        self.barrier = threading.Barrier(n)

    def exchange(self, device: int, value: Any) -> list[Any]:
        self.slots[device] = value
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got


class RefComm:
    """The collectives as math on all devices' blocks (one instance per device)."""

    def __init__(self, mesh_shape: dict[str, int], device: int, meeting: _Meeting) -> None:
        self.mesh_shape = mesh_shape
        self.names = list(mesh_shape)
        self.device = device
        self.meeting = meeting
        self.coords = _coords(mesh_shape, device)

    def _group(self, axes: tuple[str, ...]) -> tuple[list[int], int]:
        """Devices of my group along ``axes``, ordered by group index, and my index."""
        members = []
        for d in range(self.meeting.n):
            c = _coords(self.mesh_shape, d)
            if all(c[a] == self.coords[a] for a in self.names if a not in axes):
                members.append((_index(c, axes, self.mesh_shape), d))
        members.sort()
        return [d for _, d in members], _index(self.coords, axes, self.mesh_shape)

    def _all(self, x: torch.Tensor, axes: tuple[str, ...]) -> tuple[list[torch.Tensor], int]:
        if torch._C._are_functorch_transforms_active():
            raise NotImplementedError(
                "shard_map_reference models the body as one global function of every device's blocks, "
                "with no varying/invariant tracking, so a torch.func transform inside the body would "
                "differentiate one device's copy only. Differentiate the reference from outside (it is "
                "ordinary autograd, to any order): shard_map(grad(f)) equals grad of the reference of f "
                "for an invariant scalar f"
            )
        vals = self.meeting.exchange(self.device, x)
        devs, me = self._group(axes)
        return [vals[d] for d in devs], me

    def pvary(self, x: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
        return x

    def psum(self, x: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
        vals, _ = self._all(x, axes)
        return torch.stack(vals).sum(0)

    def pextreme(self, x: torch.Tensor, axes: tuple[str, ...], kind: str) -> torch.Tensor:
        vals, _ = self._all(x, axes)
        s = torch.stack(vals)
        return s.amax(0) if kind == "max" else s.amin(0)

    def pbroadcast(self, x: torch.Tensor, axes: tuple[str, ...], source: int) -> torch.Tensor:
        vals, _ = self._all(x, axes)
        return vals[source]

    def all_gather(self, x: torch.Tensor, axes: tuple[str, ...], dim: int) -> torch.Tensor:
        vals, _ = self._all(x, axes)
        return torch.cat(vals, dim)

    all_gather_invariant = all_gather

    def reduce_scatter(self, x: torch.Tensor, axes: tuple[str, ...], dim: int) -> torch.Tensor:
        vals, me = self._all(x, axes)
        total = torch.stack(vals).sum(0)
        return total.chunk(len(vals), dim)[me]

    def all_to_all(self, x: torch.Tensor, axes: tuple[str, ...], split: int, concat: int) -> torch.Tensor:
        vals, me = self._all(x, axes)
        return torch.cat([v.chunk(len(vals), split)[me] for v in vals], concat)

    def ppermute(self, x: torch.Tensor, axes: tuple[str, ...], perm: Sequence[tuple[int, int]]) -> torch.Tensor:
        vals, me = self._all(x, axes)
        src = {d: s for s, d in perm}.get(me)
        return vals[src] if src is not None else torch.zeros_like(x)


def _coords(mesh_shape: dict[str, int], device: int) -> dict[str, int]:
    out = {}
    for a in reversed(list(mesh_shape)):
        out[a] = device % mesh_shape[a]
        device //= mesh_shape[a]
    return {a: out[a] for a in mesh_shape}


def _index(coords: dict[str, int], axes: Sequence[str], mesh_shape: dict[str, int]) -> int:
    i = 0
    for a in axes:
        i = i * mesh_shape[a] + coords[a]
    return i


def _block(x: torch.Tensor, spec: PartitionSpec, mesh_shape: dict[str, int], coords: dict[str, int]) -> torch.Tensor:
    for d, entry in enumerate(spec):
        axes = dim_axes(entry)
        if axes:
            n = math.prod(mesh_shape[a] for a in axes)
            size = x.shape[d] // n
            x = x.narrow(d, _index(coords, axes, mesh_shape) * size, size)
    return x


def _assemble(blocks: list[torch.Tensor], spec: PartitionSpec, mesh_shape: dict[str, int]) -> torch.Tensor:
    """The global value from every device's block: along named axes concatenate, others take index 0."""
    names = list(mesh_shape)
    n = len(blocks)
    coords = [_coords(mesh_shape, d) for d in range(n)]
    named = set(spec.axes)
    # Devices at coordinate 0 on every axis the spec leaves out.
    keep = {d for d in range(n) if all(coords[d][a] == 0 for a in names if a not in named)}

    def build(dims_left: list[tuple[int, tuple[str, ...]]], fixed: dict[str, int]) -> torch.Tensor:
        if not dims_left:
            d = next(d for d in keep if all(coords[d][a] == v for a, v in fixed.items()))
            return blocks[d]
        (dim, axes), rest = dims_left[0], dims_left[1:]
        parts = []
        for flat in range(math.prod(mesh_shape[a] for a in axes)):
            sub, k = {}, flat
            for a in reversed(axes):
                sub[a] = k % mesh_shape[a]
                k //= mesh_shape[a]
            parts.append(build(rest, {**fixed, **sub}))
        return torch.cat(parts, dim)

    return build([(d, dim_axes(e)) for d, e in enumerate(spec) if dim_axes(e)], {})


def _check_replicated(blocks: list[Any], spec: PartitionSpec, mesh_shape: dict[str, int], path: str) -> None:
    """Every device's block equals that of the device at coordinate 0 along each axis ``spec`` leaves out."""
    from colofn.errors import SpecError

    for a in mesh_shape:
        if a in spec.axes or mesh_shape[a] == 1:
            continue
        for d, b in enumerate(blocks):
            c = _coords(mesh_shape, d)
            if c[a] == 0:
                continue
            base = blocks[_device({**c, a: 0}, mesh_shape)]
            same = torch.equal(b.detach(), base.detach()) if isinstance(b, torch.Tensor) else b == base
            if not same:
                raise SpecError(
                    f"shard_map_reference: out spec {spec} for the output at {path} leaves out mesh axis {a!r}, "
                    f"but the devices' values differ along it (device {d} at {c})"
                )


def _device(coords: dict[str, int], mesh_shape: dict[str, int]) -> int:
    return _index(coords, tuple(mesh_shape), mesh_shape)


def shard_map_reference(
    f: Callable[..., Any], *, mesh_shape: dict[str, int], in_specs: Any, out_specs: Any, check_replicated: bool = False
) -> Callable[..., Any]:
    """The serial model of ``shard_map(f, ...)`` over a mesh of ``mesh_shape`` (no world needed).

    Takes and returns *global* tensors; differentiable end to end. An out spec
    that leaves out an axis takes the copy of the devices at coordinate 0 along
    it; with ``check_replicated`` the devices' copies must also be equal along
    it, or a ``SpecError`` names the output and the axis. That is the meaning of
    the varying/invariant check, by values: ``shard_map`` rejects what it cannot
    prove replicated (its rule is stricter: a varying value that happens to be
    equal everywhere is rejected too), so a program it accepts passes this check.

    >>> import torch, colofn
    >>> from colofn import P
    >>> ref = shard_map_reference(lambda x: colofn.psum(x, "i"), mesh_shape={"i": 2}, in_specs=P("i"), out_specs=P())
    >>> ref(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    tensor([4., 6.])
    """
    mesh_shape = dict(mesh_shape)
    n = math.prod(mesh_shape.values())

    def run(*args: Any) -> Any:
        specs = jt.broadcast_prefix(in_specs, args, is_leaf=lambda s: isinstance(s, PartitionSpec), prefix_name="in_specs", full_name="the argument tuple")
        leaves, treedef = jt.flatten(args)
        meeting = _Meeting(n)
        results: list[Any] = [None] * n
        errors: list[BaseException | None] = [None] * n

        def device(d: int) -> None:
            coords = _coords(mesh_shape, d)
            ctx = _vma.Context(mesh_shape, coords, RefComm(mesh_shape, d, meeting), check_vma=False)
            blocks = [_block(x, s, mesh_shape, coords) for x, s in zip(leaves, specs, strict=True)]
            try:
                with _vma.active(ctx):
                    results[d] = f(*jt.unflatten(treedef, blocks))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors[d] = e
                meeting.barrier.abort()

        threads = [threading.Thread(target=device, args=(d,), name=f"colofn-ref-{d}") for d in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
        if first is None:
            first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        out_leaves, out_def = jt.flatten(results[0])
        per_device = [jt.flatten(r)[0] for r in results]
        out_specs_b = jt.broadcast_prefix(out_specs, results[0], is_leaf=lambda s: isinstance(s, PartitionSpec), prefix_name="out_specs", full_name="the result")
        if check_replicated:
            for i, (path, _) in enumerate(jt.flatten_with_path(results[0])[0]):
                _check_replicated([per_device[d][i] for d in range(n)], out_specs_b[i], mesh_shape, jt.keystr(path))
        assembled = [
            _assemble([per_device[d][i] for d in range(n)], out_specs_b[i], mesh_shape) for i in range(len(out_leaves))
        ]
        return jt.unflatten(out_def, assembled)

    return run
