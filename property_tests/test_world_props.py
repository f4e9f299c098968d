"""Hypothesis: random meshes, specs and shapes on simulated worlds of 1-8 ranks.

* device_put then gather gives back the original tensor;
* the local blocks tile the global tensor exactly (checked against an independent
  block computation, and every element is held by exactly one block position);
* collectives over mesh-axis groups through plain torch.distributed equal a
  serial computation over the ranks' values.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

import colofn
from colofn import Mesh, NamedSharding, P

NAMES = ("a", "b", "c")


@st.composite
def meshes(draw: st.DrawFn) -> tuple[int, tuple[int, ...], tuple[str, ...]]:
    """(world size 1-8, shape of 1-3 axes multiplying to it, axis names)."""
    n = draw(st.integers(1, 8))
    k = draw(st.integers(1, 3))
    shape, left = [], n
    for i in range(k - 1):
        s = draw(
            st.sampled_from([d for d in range(1, left + 1) if left % d == 0]), label=f"axis {i}"
        )
        shape.append(s)
        left //= s
    shape.append(left)
    return n, tuple(shape), NAMES[:k]


@st.composite
def sharded_cases(
    draw: st.DrawFn,
) -> tuple[int, tuple[int, ...], tuple[str, ...], P, tuple[int, ...]]:
    """A mesh, a spec using each axis at most once (in mesh order within a dim), and a
    shape each of whose sharded dims is divisible by the product of its axes."""
    n, shape, names = draw(meshes())
    ndim = draw(st.integers(1, 3))
    # each mesh axis: not used (-1) or the tensor dim it splits
    where = [draw(st.integers(-1, ndim - 1), label=f"dim of {a}") for a in names]
    entries: list[Any] = []
    for d in range(ndim):
        axes = tuple(a for a, w in zip(names, where, strict=True) if w == d)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    if draw(st.booleans(), label="trim trailing None"):
        while entries and entries[-1] is None:
            entries.pop()
    sizes = dict(zip(names, shape, strict=True))
    tshape = tuple(
        math.prod(sizes[a] for a, w in zip(names, where, strict=True) if w == d)
        * draw(st.integers(1, 3))
        for d in range(ndim)
    )
    return n, shape, names, P(*entries), tshape


def _coords(r: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(r % s)
        r //= s
    return tuple(reversed(out))


def _expected_block(
    x: torch.Tensor, spec: P, names: tuple[str, ...], shape: tuple[int, ...], r: int
) -> tuple[tuple[slice, ...], torch.Tensor]:
    """The block of rank r, computed independently of colofn (row-major coordinates,
    first axis of a tuple major)."""
    coords = dict(zip(names, _coords(r, shape), strict=True))
    sizes = dict(zip(names, shape, strict=True))
    slices = []
    for d in range(x.ndim):
        axes = spec.dim_axes(d)
        n = math.prod(sizes[a] for a in axes)
        idx = 0
        for a in axes:
            idx = idx * sizes[a] + coords[a]
        step = x.shape[d] // n
        slices.append(slice(idx * step, (idx + 1) * step))
    return tuple(slices), x[tuple(slices)]


@given(sharded_cases())
def test_device_put_gather_round_trip_and_blocks_tile(case: Any) -> None:
    n, shape, names, spec, tshape = case
    x = torch.arange(math.prod(tshape), dtype=torch.float32).reshape(tshape)

    def f() -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], Any]:
        mesh = Mesh(shape, names)
        s = NamedSharding(mesh, spec)
        d = colofn.device_put(x, s)
        assert tuple(d.to_local().shape) == s.shard_shape(tshape)
        return d.to_local().clone(), colofn.gather(d), tuple(d.shape), colofn.sharding_of(d).spec

    out = colofn.launch(f, world_size=n)
    coverage = torch.zeros(tshape, dtype=torch.int64)
    seen: dict[tuple[Any, ...], torch.Tensor] = {}
    for r, (local, full, gshape, spec_back) in enumerate(out):
        assert torch.equal(full, x)  # device_put then gather == original
        assert gshape == tshape
        assert spec_back == spec
        slices, want = _expected_block(x, spec, names, shape, r)
        assert torch.equal(local, want), (r, slices)
        key = tuple((sl.start, sl.stop) for sl in slices)
        if key in seen:  # a replica: the same block as another rank
            assert torch.equal(seen[key], local)
        else:
            seen[key] = local
            coverage[slices] += 1
    assert bool((coverage == 1).all())  # distinct blocks tile the tensor exactly


@given(meshes(), st.data())
def test_axis_collectives_equal_serial(m: Any, data: st.DataObject) -> None:
    n, shape, names = m
    axes = data.draw(
        st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True).map(
            lambda xs: tuple(a for a in names if a in xs)  # mesh order
        ),
        label="axes",
    )
    op = data.draw(
        st.sampled_from(["sum", "max", "all_gather", "reduce_scatter", "all_to_all"]), label="op"
    )
    rows = data.draw(st.integers(1, 3), label="rows")

    def value(r: int, salt: int = 0) -> torch.Tensor:
        return (
            torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) * (r + 1) + 10 * salt - r
        )

    def group_of(r: int) -> list[int]:
        """Ranks that differ from r only along `axes`, ordered by their flattened
        coordinate along `axes` (first axis major) = their rank in the axis group."""
        c = _coords(r, shape)
        pos = [names.index(a) for a in axes]
        members = [
            q
            for q in range(n)
            if all(_coords(q, shape)[i] == c[i] for i in range(len(shape)) if i not in pos)
        ]
        return sorted(members, key=lambda q: [_coords(q, shape)[i] for i in pos])

    def f() -> torch.Tensor:
        mesh = Mesh(shape, names)
        group = mesh.axis_group(axes)
        r = dist.get_rank()
        g = dist.get_world_size(group)
        assert dist.get_process_group_ranks(group) == sorted(group_of(r))
        if op in ("sum", "max"):
            t = value(r)
            dist.all_reduce(
                t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group
            )
            return t
        if op == "all_gather":
            outs = [torch.empty(rows, 2) for _ in range(g)]
            dist.all_gather(outs, value(r), group=group)
            return torch.stack(outs)
        if op == "reduce_scatter":
            out = torch.empty(rows, 2)
            dist.reduce_scatter(out, [value(r, j) for j in range(g)], group=group)
            return out
        outs = [torch.empty(rows, 2) for _ in range(g)]
        dist.all_to_all(outs, [value(r, j) for j in range(g)], group=group)
        return torch.stack(outs)

    got = colofn.launch(f, world_size=n)
    for r in range(n):
        members = group_of(r)
        me = members.index(r)
        if op == "sum":
            want = sum((value(q) for q in members), torch.zeros(rows, 2))
        elif op == "max":
            want = torch.stack([value(q) for q in members]).amax(0)
        elif op == "all_gather":
            want = torch.stack([value(q) for q in members])
        elif op == "reduce_scatter":
            want = sum((value(q, me) for q in members), torch.zeros(rows, 2))
        else:
            want = torch.stack([value(q, me) for q in members])
        assert torch.equal(got[r], want), (r, members, op, axes)


def test_group_ranks_cover_the_world() -> None:
    # a deterministic companion: for every mesh shape of 8 ranks and every axis subset,
    # the axis groups partition the world
    for shape in [(8,), (2, 4), (4, 2), (2, 2, 2), (1, 8), (8, 1, 1)]:
        names = NAMES[: len(shape)]

        def f(shape: tuple[int, ...] = shape, names: tuple[str, ...] = names) -> list[list[int]]:
            mesh = Mesh(shape, names)
            subsets = [
                c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)
            ]
            return [dist.get_process_group_ranks(mesh.axis_group(s)) for s in subsets]

        out = colofn.launch(f, world_size=8)
        for i in range(len(out[0])):
            groups = {tuple(o[i]) for o in out}
            assert sorted(r for grp in groups for r in grp) == list(range(8))
