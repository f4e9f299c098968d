"""Hypothesis strategies for meshes, specs, shapes and pytrees (needs ``hypothesis``).

``docs/shard_map.md`` ("Hypothesis strategies") lists every strategy with its
parameters and runs a property test built from them. Specs list a dim's axes in
any order (the first major), so every suite that draws them covers JAX's block
layouts, not only mesh order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import strategies as st

from colofn.partition_spec import P, PartitionSpec

__all__ = ["AXIS_NAMES", "dtypes", "mesh_shapes", "shapes_and_specs", "specs_for", "tensors", "trees"]

AXIS_NAMES = ("i", "j", "k")


@st.composite
def mesh_shapes(draw: st.DrawFn, max_devices: int = 8, max_axes: int = 3, min_devices: int = 1) -> dict[str, int]:
    """Ordered {axis name: size} with 1-``max_axes`` axes and at most ``max_devices`` devices."""
    n_axes = draw(st.integers(1, max_axes))
    sizes: list[int] = []
    for _ in range(n_axes):
        room = max_devices // max(1, math.prod(sizes))
        sizes.append(draw(st.sampled_from([s for s in (1, 2, 3, 4) if s <= room] or [1])))
    shape = dict(zip(AXIS_NAMES[:n_axes], sizes, strict=True))
    if math.prod(sizes) < min_devices:
        from hypothesis import assume

        assume(False)
    return shape


@st.composite
def specs_for(draw: st.DrawFn, mesh_shape: dict[str, int], ndim: int) -> PartitionSpec:
    """A spec for a tensor of rank ``ndim``: each mesh axis used at most once, in any order per dim."""
    axes = draw(st.permutations(list(mesh_shape)))  # the order a dim's axes are listed in (first major)
    entries: list[Any] = [[] for _ in range(ndim)]
    for a in axes:
        slot = draw(st.integers(-1, ndim - 1)) if ndim else -1
        if slot >= 0:
            entries[slot].append(a)
    norm = [None if not e else e[0] if len(e) == 1 else tuple(e) for e in entries]
    while norm and norm[-1] is None and draw(st.booleans()):
        norm.pop()
    return P(*norm)


@st.composite
def shapes_and_specs(draw: st.DrawFn, mesh_shape: dict[str, int], min_ndim: int = 1, max_ndim: int = 3, max_block: int = 3) -> tuple[tuple[int, ...], PartitionSpec]:
    """A spec and a shape it divides: every dim is (product of its axes) x a block size."""
    ndim = draw(st.integers(min_ndim, max_ndim))
    spec = draw(specs_for(mesh_shape, ndim))
    shape = tuple(
        math.prod(mesh_shape[a] for a in spec.dim_axes(d)) * draw(st.integers(1, max_block)) for d in range(ndim)
    )
    return shape, spec


def dtypes(low_precision: bool = True) -> st.SearchStrategy[torch.dtype]:
    options = [torch.float32, torch.float64] + ([torch.bfloat16] if low_precision else [])
    return st.sampled_from(options)


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor with values from a seeded generator (hypothesis draws the seed, so it shrinks)."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@st.composite
def trees(draw: st.DrawFn, leaf: st.SearchStrategy[Any], max_leaves: int = 4) -> Any:
    """Nested dicts and lists of ``leaf`` values."""
    n = draw(st.integers(1, max_leaves))
    leaves = [draw(leaf) for _ in range(n)]
    if n == 1 and draw(st.booleans()):
        return leaves[0]
    if draw(st.booleans()):
        return {f"k{i}": x for i, x in enumerate(leaves)}
    return [leaves[0], {"w": leaves[1:]}] if n > 1 else [leaves[0]]
