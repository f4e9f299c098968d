"""In-place writes inside shard_map: the varying/invariant rule for mutation, and values/gradients.

Each example draws a mesh, the axes ``x`` is split over, and a program that
starts a (2, 3) buffer from zeros, from the replicated weight ``w`` or from
``x``, takes a view of it (the whole buffer, a row, columns, the transpose, a
flattened slice), then makes 1-3 in-place writes (``__setitem__``, ``add_``,
``mul_``, ``copy_``, ``index_put_``, ``masked_fill_``, ``out=``) through views
of it with values that are invariant (from ``w``, a ``psum``, a constant) or
varying (from ``x``, the axis index). It returns the early view (or the buffer).

The rule, modelled here independently of ``colofn._vma``: views share storage,
so every write makes the whole buffer, and every view of it, vary along the
axes of what was written (plus those of a mask). Then

* with ``out_specs=P()`` shard_map rejects the program iff the buffer varies,
  with JAX's "could not infer replication" text naming each axis;
* accepted programs equal :func:`colofn.testing.shard_map_reference` (values
  and gradients with respect to ``w`` and ``x``), whose ``check_replicated``
  confirms every device's copy of the output is the same;
* with the output split over every mesh axis (no replication promised) every
  program is accepted and equals the reference, which checks that an invariant
  differentiable buffer written with varying data gets its gradient summed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import colofn
from colofn import P
from colofn.errors import SpecError
from colofn.testing import assert_equivalent, shard_map_reference
from colofn.testing.strategies import mesh_shapes, tensors

# full_tensor() of a dim split over two mesh axes logs a "suboptimal redistribute" warning per call
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

VIEWS = ("all", "row0", "cols", "t", "flat")
OPS = ("setitem", "add_", "mul_", "copy_", "index_put_", "masked_fill_", "out=")
VALUES = ("w", "x", "psum", "const", "axis_index")
NO_GRAD_VALUES = ("const", "axis_index")


@dataclass(frozen=True)
class Write:
    view: str
    op: str
    value: str
    mask_from_x: bool = False


@dataclass(frozen=True)
class Program:
    init: str  # zeros, w or x
    out_view: str  # the view returned (taken before any write)
    writes: tuple[Write, ...]


def _view(y: torch.Tensor, kind: str) -> torch.Tensor:
    return {"all": lambda: y, "row0": lambda: y[0], "cols": lambda: y[:, 1:], "t": lambda: y.t(), "flat": lambda: y.view(-1)[2:4]}[kind]()


def _value(kind: str, w: torch.Tensor, x: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
    if kind == "w":
        return w.sum() * 0.5
    if kind == "x":
        return x.sum() * 0.25
    if kind == "psum":
        return colofn.psum(x.sum(), axes) * 0.25 if axes else x.sum() * 0.25
    if kind == "const":
        return torch.tensor(1.5)
    return colofn.axis_index(axes).to(torch.float32) + 0.5 if axes else torch.tensor(0.5)


def body(prog: Program, axes: tuple[str, ...]):
    def f(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = {"zeros": lambda: torch.zeros(2, 3), "w": lambda: w * 1.0, "x": lambda: x * 1.0}[prog.init]()
        out = _view(y, prog.out_view)
        for wr in prog.writes:
            tgt = _view(y, wr.view)
            v = _value(wr.value, w, x, axes)
            if wr.op == "setitem":
                tgt[...] = v
            elif wr.op == "add_":
                tgt.add_(v)
            elif wr.op == "mul_":
                tgt.mul_(v)
            elif wr.op == "copy_":
                tgt.copy_(v.expand(tgt.shape))
            elif wr.op == "index_put_":
                tgt.index_put_((torch.tensor([0]),), v)
            elif wr.op == "masked_fill_":
                mask = (x[: tgt.shape[0]].sum() > 0) if wr.mask_from_x else (tgt > 0)
                tgt.masked_fill_(mask, v)
            else:
                torch.add(v.expand(tgt.shape), 0.0, out=tgt)
        return out

    return f


def varies(prog: Program, axes: tuple[str, ...]) -> bool:
    """The rule: the buffer varies iff it started from x or anything written into it varied."""
    if not axes:
        return False
    return prog.init == "x" or any(wr.value in ("x", "axis_index") or wr.mask_from_x for wr in prog.writes)


@st.composite
def programs(draw: st.DrawFn) -> Program:
    init = draw(st.sampled_from(("zeros", "w", "x")))
    grad = init != "zeros"  # out= cannot write into a tensor autograd tracks
    writes = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(OPS if not grad else OPS[:-1]))
        value = draw(st.sampled_from(NO_GRAD_VALUES if op == "out=" else VALUES))
        grad = grad or value not in NO_GRAD_VALUES
        mask_from_x = op == "masked_fill_" and draw(st.booleans())
        writes.append(Write(draw(st.sampled_from(VIEWS)), op, value, mask_from_x))
    return Program(init, draw(st.sampled_from(VIEWS)), tuple(writes))


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[str, int], tuple[str, ...], Program, torch.Tensor, torch.Tensor]:
    mesh_shape = draw(mesh_shapes(max_devices=4, max_axes=2))
    axes = tuple(a for a in mesh_shape if draw(st.booleans()))
    n = math.prod(mesh_shape[a] for a in axes)
    w = draw(tensors((2, 3)))
    x = draw(tensors((2 * n, 3)))
    return mesh_shape, axes, draw(programs()), w, x


def _spec(axes: tuple[str, ...]) -> P:
    return P(axes if len(axes) != 1 else axes[0]) if axes else P()


@given(cases())
def test_in_place_writes_follow_the_rule_and_equal_the_reference(case) -> None:
    mesh_shape, axes, prog, w, x = case
    note(f"mesh {mesh_shape}, x split over {axes}, {prog}")
    in_specs = (P(), P(_spec(axes)[0]) if axes else P())
    f = body(prog, axes)
    world = math.prod(mesh_shape.values())
    all_axes = _spec(tuple(mesh_shape))

    def parallel(out_specs: P):
        def run(w: torch.Tensor, x: torch.Tensor):
            mesh = colofn.Mesh(tuple(mesh_shape.values()), tuple(mesh_shape))
            return colofn.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(w, x)

        return run

    def ref(out_specs: P):
        return shard_map_reference(f, mesh_shape=mesh_shape, in_specs=in_specs, out_specs=out_specs)

    # split over every axis: always accepted, equal to the reference (gradients included)
    assert_equivalent(parallel(all_axes), ref(all_axes), w, x, world_size=world)
    if varies(prog, axes):
        with pytest.raises(SpecError) as err:
            assert_equivalent(parallel(P()), ref(P()), w, x, world_size=world)
        for a in axes:
            assert f"replicated across mesh axis {a!r}, but could not infer replication" in str(err.value)
    else:  # accepted: the reference finds every device's copy equal, and the values and gradients agree
        checked = shard_map_reference(f, mesh_shape=mesh_shape, in_specs=in_specs, out_specs=P(), check_replicated=True)
        assert_equivalent(parallel(P()), checked, w, x, world_size=world)
