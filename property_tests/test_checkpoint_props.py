"""Checkpoint round trips across random pairs of meshes and world sizes are exact.

A random tree of tensors (random shapes, dtypes and specs; some plain) and
plain values (random bools, ints, floats, strings, bytes and dtypes inside a
NamedTuple and lists: stored as JSON data) is saved on one random mesh and
loaded on another, each tensor into a random spec of the new mesh or as a
plain tensor; every global value must come back bit for bit, every plain
value and node type exactly.
"""

from __future__ import annotations

import math
import tempfile
from typing import NamedTuple

import torch
from hypothesis import given
from hypothesis import strategies as st

import colofn
from colofn import checkpoint
from colofn.testing.strategies import mesh_shapes, specs_for

DTYPES = (torch.float32, torch.bfloat16, torch.int64, torch.float64)


class Extra(NamedTuple):
    values: list
    note: object


plain = st.one_of(st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=False), st.text(max_size=6),
                  st.binary(max_size=6), st.sampled_from(DTYPES))


@st.composite
def cases(draw):
    mesh_a = draw(mesh_shapes(max_devices=4, max_axes=2))
    mesh_b = draw(mesh_shapes(max_devices=4, max_axes=2))
    leaves = {}
    for k in range(draw(st.integers(1, 4))):
        ndim = draw(st.integers(1, 2))
        shape = tuple(12 * draw(st.integers(1, 2)) for _ in range(ndim))  # 12: divisible by any axis size
        dtype = draw(st.sampled_from(DTYPES))
        spec_a = draw(st.none() | specs_for(mesh_a, ndim))
        spec_b = draw(st.none() | specs_for(mesh_b, ndim))
        leaves[f"t{k}"] = (shape, dtype, spec_a, spec_b)
    step = draw(st.integers(0, 10**9))
    extra = Extra(draw(st.lists(plain, max_size=3)), draw(st.none() | plain))
    return mesh_a, mesh_b, leaves, (step, extra), draw(st.integers(0, 2**16))


def _values(leaves, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (shape, dtype, _, _) in leaves.items():
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 100
        out[k] = x.to(dtype)
    return out


def _mesh(shape):
    return colofn.Mesh(tuple(shape.values()), tuple(shape))


def _save(path, mesh_shape, leaves, values, step_extra):
    step, extra = step_extra
    with _mesh(mesh_shape):
        tree = {"tensors": {k: v if leaves[k][2] is None else colofn.device_put(v, leaves[k][2]) for k, v in values.items()}, "step": step, "extra": extra}
        checkpoint.save(path, tree)


def _load(path, mesh_shape, leaves):
    with _mesh(mesh_shape):
        like = {"tensors": {k: torch.empty(shape, dtype=dt) if spec is None else spec for k, (shape, dt, _, spec) in leaves.items()},
                "step": 0, "extra": colofn.P()}  # a prefix leaf: the plain values' structure comes from the checkpoint
        state = checkpoint.load(path, like)
        return (state["step"], state["extra"]), {k: colofn.gather(v) for k, v in state["tensors"].items()}


@given(cases())
def test_round_trip_across_meshes_is_exact(case):
    mesh_a, mesh_b, leaves, step_extra, seed = case
    values = _values(leaves, seed)
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/step_{step_extra[0]}"
        colofn.launch(_save, path, mesh_a, leaves, values, step_extra, world_size=math.prod(mesh_a.values()))
        for got_step_extra, got in colofn.launch(_load, path, mesh_b, leaves, world_size=math.prod(mesh_b.values())):
            assert got_step_extra == step_extra and type(got_step_extra[1]) is Extra
            assert [type(v) for v in got_step_extra[1].values] == [type(v) for v in step_extra[1].values]
            for k, v in values.items():
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
