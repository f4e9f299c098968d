"""Every collective inside shard_map equals the serial reference, forward and backward.

Random meshes (1-3 axes, up to 8 devices), specs, shapes and dtypes; failures
shrink to a minimal mesh/spec/shape.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import colofn
from colofn import P
from colofn.partition_spec import PartitionSpec
from colofn.testing import assert_equivalent, shard_map_reference
from colofn.testing.strategies import dtypes, mesh_shapes, shapes_and_specs, tensors


def without(spec: PartitionSpec, axes: tuple[str, ...]) -> PartitionSpec:
    return P(*[tuple(a for a in spec.dim_axes(d) if a not in axes) for d in range(len(spec))])


def with_axes(spec: PartitionSpec, axes: tuple[str, ...], mesh_shape: dict[str, int], dim: int = 0) -> PartitionSpec:
    """``spec`` plus every axis of ``axes`` it does not name yet, on ``dim`` (mesh order kept)."""
    entries = [list(spec.dim_axes(d)) for d in range(max(len(spec), dim + 1))]
    for a in axes:
        if a not in spec.axes:
            entries[dim].append(a)
    order = list(mesh_shape)
    return P(*[tuple(sorted(e, key=order.index)) for e in entries])


def check(f, mesh_shape, x, in_spec, out_spec, dtype):
    names, sizes = tuple(mesh_shape), tuple(mesh_shape.values())

    def parallel(x):
        mesh = colofn.Mesh(sizes, names)
        return colofn.shard_map(f, mesh=mesh, in_specs=in_spec, out_specs=out_spec)(x)

    ref = shard_map_reference(f, mesh_shape=mesh_shape, in_specs=in_spec, out_specs=out_spec)
    assert_equivalent(parallel, ref, x, world_size=math.prod(sizes))


@st.composite
def setups(draw, min_ndim=1):
    mesh_shape = draw(mesh_shapes())
    shape, spec = draw(shapes_and_specs(mesh_shape, min_ndim=min_ndim))
    dtype = draw(dtypes())
    x = draw(tensors(shape, dtype))
    n_axes = draw(st.integers(1, len(mesh_shape)))
    axes = tuple(draw(st.permutations(list(mesh_shape)))[:n_axes])
    return mesh_shape, spec, x, axes, dtype


@given(setups(), st.sampled_from(["psum", "pmean", "pmax", "pmin"]))
def test_reductions(setup, name):
    mesh_shape, spec, x, axes, dtype = setup
    op = getattr(colofn, name)
    # sin keeps values distinct so pmax/pmin ties are rare but allowed (ties split evenly in both)
    check(lambda v: op(torch.sin(v) * 2, axes), mesh_shape, x, spec, without(spec, axes), dtype)


@given(setups(), st.data())
def test_pbroadcast(setup, data):
    mesh_shape, spec, x, axes, dtype = setup
    source = data.draw(st.integers(0, math.prod(mesh_shape[a] for a in axes) - 1), label="source")
    check(lambda v: colofn.pbroadcast(torch.sin(v) * 2, axes, source), mesh_shape, x, spec, without(spec, axes), dtype)


@given(setups(), st.booleans(), st.booleans())
def test_all_gather(setup, tiled, invariant):
    mesh_shape, spec, x, axes, dtype = setup
    d = 0

    def f(v):
        return colofn.all_gather(v * 1.5, axes, axis_dim=d, tiled=tiled, to="invariant" if invariant else "varying")

    if invariant:
        out = without(spec, axes)
        if not tiled:
            out = P(None, *out.padded(x.ndim))
    else:
        base = spec if tiled else P(None, *spec.padded(x.ndim))
        out = with_axes(base, axes, mesh_shape, dim=0 if tiled else 1)
    check(f, mesh_shape, x, spec, out, dtype)


@given(setups(), st.booleans())
def test_psum_scatter(setup, tiled):
    mesh_shape, spec, x, axes, dtype = setup
    n = math.prod(mesh_shape[a] for a in axes)
    # an extra leading dim of size n (untiled) or 2n (tiled) to scatter
    lead = 2 * n if tiled else n
    g = torch.Generator().manual_seed(0)
    w = torch.randn((lead,), generator=g, dtype=torch.float64).to(dtype)

    def f(v):
        big = w.reshape(lead, *([1] * v.ndim)) * v.unsqueeze(0)
        return colofn.psum_scatter(big, axes, scatter_dimension=0, tiled=tiled)

    out = with_axes(P(None, *spec.padded(x.ndim)) if tiled else spec, axes, mesh_shape, dim=0)
    check(f, mesh_shape, x, spec, out, dtype)


@given(setups(min_ndim=2), st.booleans())
def test_all_to_all(setup, tiled):
    mesh_shape, spec, x, axes, dtype = setup
    n = math.prod(mesh_shape[a] for a in axes)

    def f(v):
        big = torch.cat([v * (i + 1) for i in range(n)], dim=0) if tiled else torch.stack([v * (i + 1) for i in range(n)], 0)
        return colofn.all_to_all(big, axes, 0, 1, tiled=tiled)

    # tiled: dim0 has n*b0 (split), dim1 grows by n; untiled: new dim of size n at 1 (after removing 0)
    out = with_axes(spec, axes, mesh_shape, dim=0)
    check(f, mesh_shape, x, spec, out, dtype)


@given(setups(), st.sampled_from(["shift", "reverse", "partial"]))
def test_ppermute(setup, kind):
    mesh_shape, spec, x, axes, dtype = setup
    n = math.prod(mesh_shape[a] for a in axes)
    perm = {
        "shift": [(i, (i + 1) % n) for i in range(n)],
        "reverse": [(i, n - 1 - i) for i in range(n)],
        "partial": [(i, i + 1) for i in range(n - 1)],
    }[kind]
    check(lambda v: colofn.ppermute(v * 3, axes, perm), mesh_shape, x, spec, with_axes(spec, axes, mesh_shape), dtype)


@given(setups())
def test_axis_index_and_size(setup):
    mesh_shape, spec, x, axes, dtype = setup

    def f(v):
        return v * colofn.axis_size(axes) + colofn.axis_index(axes).to(v.dtype)

    check(f, mesh_shape, x, spec, with_axes(spec, axes, mesh_shape), dtype)
