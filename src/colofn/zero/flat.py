"""Flatten-and-pad: every unit's parameters as 1-D buffers that split evenly over the data axis.

A *unit* is the granularity of ZeRO-3's gather-use-free cycle (and of every
stage's communication buckets): each element of ``params["layers"]`` (when it
is a list or tuple) and each other top-level entry of a dict of params; each
element of a list/tuple of params; or the whole tree when it is a single
tensor or another node. Within a unit, the leaves of each dtype are
concatenated (in ``colofn.tree`` order) into one *bucket*: a 1-D buffer padded
with zeros to a multiple of the data-axis size ``n``, so that rank ``i`` owns
elements ``[i * shard, (i + 1) * shard)``. No value is lost: padding is only
ever appended, and :meth:`FlatLayout.views` reads the leaves back as views.

>>> import torch
>>> params = {"layers": [{"w": torch.ones(2, 3)}, {"w": torch.ones(5)}], "head": torch.ones(1)}
>>> layout = FlatLayout.build(params, n=4)
>>> [(u.name, [layout.buckets[b].padded for b in u.buckets]) for u in layout.units]
[("['layers'][0]", [8]), ("['layers'][1]", [8]), ("['head']", [4])]
>>> flats = layout.flatten(layout.local_leaves(params))
>>> [f.tolist() for f in flats][2]
[1.0, 0.0, 0.0, 0.0]
>>> layout.unflatten(flats)["layers"][0]["w"].shape
torch.Size([2, 3])
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.distributed.tensor import DTensor

from colofn import tree as jt
from colofn.partition_spec import P, PartitionSpec

__all__ = ["Bucket", "FlatLayout", "Slot", "Unit", "split_units"]

LAYERS = "layers"


@dataclass(frozen=True)
class Slot:
    """Where one leaf lives: its bucket, offset and local shape (this rank's block of it)."""

    path: str
    bucket: int
    offset: int
    shape: tuple[int, ...]
    spec: PartitionSpec  # the leaf's own spec over the model axes (P() for a plain tensor)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Bucket:
    """The leaves of one dtype in one unit, flattened into ``padded`` elements."""

    unit: int
    dtype: torch.dtype
    numel: int
    padded: int  # a multiple of n, at least n
    n: int
    axes: tuple[str, ...] = ()  # the data axes this bucket is sharded (and its gradient summed) over

    @property
    def shard(self) -> int:
        """Elements each rank of the data axis owns."""
        return self.padded // self.n


@dataclass(frozen=True)
class Unit:
    """A subtree of the params gathered, used and freed together (one ZeRO-3 step of the cycle)."""

    name: str  # its path, JAX-style: "['layers'][0]"
    treedef: Any  # of the unit's subtree
    leaves: tuple[int, ...]  # global leaf indices (into FlatLayout.slots), in the subtree's order
    buckets: tuple[int, ...]


Kind = Literal["dict", "seq", "single"]


def split_units(params: Any) -> tuple[Kind, tuple[Any, ...], list[tuple[str, Any]]]:
    """``(kind, skeleton, [(unit name, subtree), ...])`` in forward order (the params' own order).

    ``skeleton`` describes the top level for :func:`assemble`: for a dict, its
    ``(key, is_layers)`` pairs in insertion order and the layers' container
    type; for a list/tuple, its type and length.
    """
    if isinstance(params, dict):
        units: list[tuple[str, Any]] = []
        keys: list[tuple[Any, bool, type | None]] = []
        for k, v in params.items():
            if k == LAYERS and isinstance(v, list | tuple) and not hasattr(v, "_fields"):
                keys.append((k, True, type(v)))
                units += [(f"[{k!r}][{i}]", layer) for i, layer in enumerate(v)]
            else:
                keys.append((k, False, None))
                units.append((f"[{k!r}]", v))
        return "dict", (type(params), tuple(keys)), units
    if isinstance(params, list | tuple) and not hasattr(params, "_fields"):
        return "seq", (type(params), len(params)), [(f"[{i}]", v) for i, v in enumerate(params)]
    return "single", (), [("", params)]


def assemble(kind: Kind, skeleton: tuple[Any, ...], values: Sequence[Any]) -> Any:
    """Inverse of :func:`split_units`: the params tree from one value per unit."""
    if kind == "single":
        return values[0]
    if kind == "seq":
        typ, _ = skeleton
        return typ(values)
    typ, keys = skeleton
    out, i = {}, 0
    n_layers = len(values) - sum(1 for _, is_layers, _ in keys if not is_layers)
    for k, is_layers, seq_type in keys:
        if is_layers:
            count = n_layers
            out[k] = seq_type(values[i : i + count])
            i += count
        else:
            out[k] = values[i]
            i += 1
    return out if typ is dict else typ(out)


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if isinstance(x, DTensor) else x


@dataclass(frozen=True)
class FlatLayout:
    """How the (local blocks of the) params map onto padded 1-D buckets, unit by unit."""

    kind: Kind
    skeleton: tuple[Any, ...]
    treedef: Any  # of the whole params tree
    units: tuple[Unit, ...]
    buckets: tuple[Bucket, ...]
    slots: tuple[Slot, ...]  # indexed by global leaf index (unit order, then tree order)
    n: int

    @staticmethod
    def build(
        params: Any,
        n: int,
        specs: Sequence[PartitionSpec] | None = None,
        groups: Sequence[tuple[tuple[str, ...], int]] | None = None,
    ) -> FlatLayout:
        """The layout of ``params`` for a data axis of ``n`` ranks.

        ``params`` leaves may be DTensors (their local blocks are flattened);
        ``specs`` gives each leaf's spec over the model axes, in
        :meth:`local_leaves` order (default: ``P()`` for all). ``groups`` gives
        each leaf's ``(data axes, ranks)`` to shard over instead of ``((), n)``:
        leaves of one unit and dtype share a bucket only if their groups match.
        """
        kind, skeleton, parts = split_units(params)
        units: list[Unit] = []
        buckets: list[Bucket] = []
        slots: list[Slot] = []
        for u, (name, sub) in enumerate(parts):
            pairs, sub_def = jt.flatten_with_path(sub)
            by_dtype: dict[tuple[torch.dtype, tuple[str, ...], int], int] = {}
            fill: dict[int, int] = {}
            leaf_ids = []
            for path, x in pairs:
                local = _local(x)
                i = len(slots)
                key = (local.dtype, *groups[i]) if groups is not None else (local.dtype, (), n)
                if key not in by_dtype:
                    by_dtype[key] = len(buckets) + len(by_dtype)
                b = by_dtype[key]
                off = fill.get(b, 0)
                fill[b] = off + local.numel()
                spec = specs[i] if specs is not None else P()
                where = (name + jt.keystr(path).replace("<root>", "")) or "<root>"
                slots.append(Slot(where, b, off, tuple(local.shape), spec))
                leaf_ids.append(i)
            ordered = sorted(by_dtype.items(), key=lambda kv: kv[1])
            for (dtype, axes, size), b in ordered:
                numel = fill[b]
                padded = max(1, -(-numel // size)) * size
                buckets.append(Bucket(u, dtype, numel, padded, size, axes))
            units.append(Unit(name or "<root>", sub_def, tuple(leaf_ids), tuple(b for _, b in ordered)))
        return FlatLayout(kind, skeleton, jt.structure(params), tuple(units), tuple(buckets), tuple(slots), n)

    # ---------------------------------------------------------------- leaves <-> buckets
    def local_leaves(self, params: Any) -> list[torch.Tensor]:
        """The params' leaves (local blocks of DTensors) in layout order."""
        _, _, parts = split_units(params)
        return [_local(x) for _, sub in parts for x in jt.leaves(sub)]

    def flatten(self, leaves: Sequence[torch.Tensor], dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """One padded 1-D buffer per bucket (new storage), optionally cast to ``dtype``."""
        out = []
        for b, bucket in enumerate(self.buckets):
            buf = torch.zeros(bucket.padded, dtype=dtype or bucket.dtype, device=device or leaves[0].device)
            for i in self.units[bucket.unit].leaves:
                s = self.slots[i]
                if s.bucket == b:
                    buf[s.offset : s.offset + s.numel].copy_(leaves[i].detach().reshape(-1))
            out.append(buf)
        return out

    def leaf_view(self, i: int, flat: torch.Tensor) -> torch.Tensor:
        s = self.slots[i]
        return flat[s.offset : s.offset + s.numel].view(s.shape)

    def views(self, flats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every leaf as a view into its bucket, in layout order.

        One ``split`` per bucket (its leaves are contiguous from offset 0, the
        padding last): one autograd node per bucket, whose backward
        concatenates the leaves' gradients, not a slice per leaf, each of whose
        backwards writes into a zero buffer of the whole bucket. Plain tensors
        are cut with ``__torch_function__`` off (no mode sees the ~50 views: a
        ``shard_map`` body tags them itself).
        """
        out: list[torch.Tensor] = [flats[0]] * len(self.slots)
        plain = all(type(f) is torch.Tensor for f in flats)
        with torch._C.DisableTorchFunction() if plain else contextlib.nullcontext():
            for b, flat in enumerate(flats):
                ids = self._bucket_leaves[b]
                sizes = [self.slots[i].numel for i in ids]
                pad = flat.numel() - sum(sizes)
                for i, piece in zip(ids, flat.split([*sizes, pad] if pad else sizes), strict=False):
                    out[i] = piece.view(self.slots[i].shape)
        return out

    @functools.cached_property
    def _bucket_leaves(self) -> tuple[tuple[int, ...], ...]:
        """Each bucket's leaf indices in offset order (they fill it from 0, contiguously)."""
        ids: list[list[int]] = [[] for _ in self.buckets]
        for i, s in enumerate(self.slots):
            ids[s.bucket].append(i)
        for b, leaves in enumerate(ids):
            leaves.sort(key=lambda i: self.slots[i].offset)
            ends = [self.slots[i].offset + self.slots[i].numel for i in leaves]
            assert [self.slots[i].offset for i in leaves] == [0, *ends[:-1]], f"bucket {b} is not filled contiguously"
        return tuple(tuple(x) for x in ids)

    def unit_tree(self, u: int, flats: Sequence[torch.Tensor] | dict[int, torch.Tensor]) -> Any:
        """Unit ``u``'s subtree, its leaves views into ``flats`` (indexed by bucket)."""
        unit = self.units[u]
        return jt.unflatten(unit.treedef, [self.leaf_view(i, flats[self.slots[i].bucket]) for i in unit.leaves])

    def unflatten(self, flats: Sequence[torch.Tensor]) -> Any:
        """The params tree, its leaves views into ``flats`` (one per bucket)."""
        return assemble(self.kind, self.skeleton, [self.unit_tree(u, flats) for u in range(len(self.units))])

    def rebuild(self, leaves: Sequence[Any]) -> Any:
        """The params tree from leaves in layout order."""
        values = []
        for unit in self.units:
            values.append(jt.unflatten(unit.treedef, [leaves[i] for i in unit.leaves]))
        return assemble(self.kind, self.skeleton, values)

    # ---------------------------------------------------------------- sizes
    def nbytes(self, dtype: torch.dtype | None = None, padded: bool = True) -> int:
        """Bytes of all buckets (``Ψ`` per rank), in ``dtype`` or each bucket's own."""
        total = 0
        for b in self.buckets:
            size = (dtype or b.dtype).itemsize
            total += (b.padded if padded else b.numel) * size
        return total

    def shard(self, flat: torch.Tensor, index: int, b: int) -> torch.Tensor:
        """Rank ``index``'s shard of bucket ``b`` (a view): elements ``[index * shard, (index + 1) * shard)``."""
        size = flat.shape[0] // self.buckets[b].n
        return flat.narrow(0, index * size, size)
