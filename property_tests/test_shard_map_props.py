"""Random compositions of collectives inside shard_map equal the serial reference.

Each example draws a mesh, an input spec and dtype, and a program of 2-4 steps
on a 2-D local block: elementwise math, matmul with a replicated weight (passed
as a ``P()`` argument or captured by closure), psum, pmean, pmax/pmin,
pbroadcast, all_gather (varying
or invariant), psum_scatter, ppermute, all_to_all, and steps that mix the value
with an invariant one (its pmean) or a varying one (the axis index), so that
implicit pvary decides the gradients. The program's output spec names exactly
the axes its value varies along (tracked here by JAX's rules), sometimes plus an
axis it is invariant along (tiled copies); a second output is an invariant
scalar with spec ``P()``. Values and gradients (w.r.t. the input and every
weight) must equal :func:`colofn.testing.shard_map_reference` on every rank.
Failures shrink to a short program on a small mesh.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import colofn
from colofn import P
from colofn.partition_spec import PartitionSpec
from colofn.testing import assert_equivalent, shard_map_reference
from colofn.testing.strategies import dtypes, mesh_shapes, shapes_and_specs, tensors

# full_tensor() of a dim split over two mesh axes logs a "suboptimal redistribute" warning per call
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

KINDS = (
    "elementwise",
    "matmul",
    "psum",
    "pmean",
    "pmax",
    "pbroadcast",
    "all_gather",
    "psum_scatter",
    "ppermute",
    "all_to_all",
    "mix_invariant",
    "mix_axis_index",
)
MAX_ROWS = 24  # keep local blocks small: all_gather multiplies the rows, all_to_all the columns
MAX_COLS = 12


@dataclass(frozen=True)
class Step:
    kind: str
    axes: tuple[str, ...] = ()
    option: object = (
        None  # matmul: weight index; all_gather: to=; ppermute: perm; scatter/a2a: widen first
    )

    def __repr__(self) -> str:
        extra = "" if self.option is None else f", {self.option!r}"
        return (
            f"{self.kind}({self.axes!r}{extra})"
            if self.axes
            else f"{self.kind}({'' if self.option is None else self.option!r})"
        )


@dataclass(frozen=True)
class Program:
    mesh_shape: dict[str, int]
    in_spec: PartitionSpec
    steps: tuple[Step, ...]
    weight_shapes: tuple[tuple[int, int], ...]
    captured: tuple[bool, ...]  # per weight: closure-captured (True) or a P() argument
    out_spec: PartitionSpec
    check_vma: bool


def _mesh_order(axes, mesh_shape):
    return tuple(a for a in mesh_shape if a in axes)


@st.composite
def programs(draw, check_vma: bool):
    mesh_shape = draw(mesh_shapes(max_devices=4))
    names = list(mesh_shape)
    (rows, cols), spec = draw(shapes_and_specs(mesh_shape, min_ndim=2, max_ndim=2))
    r = rows // math.prod(mesh_shape[a] for a in spec.dim_axes(0))
    c = cols // math.prod(mesh_shape[a] for a in spec.dim_axes(1))
    vary = set(spec.axes)
    steps, weights, captured = [], [], []
    for kind in draw(st.lists(st.sampled_from(KINDS + ("matmul",)), min_size=2, max_size=4)):
        axes = tuple(draw(st.permutations(names))[: draw(st.integers(1, len(names)))])
        n = math.prod(mesh_shape[a] for a in axes)
        if kind == "matmul":
            c2 = draw(st.integers(1, 3))
            weights.append((c, c2))
            # without vma tracking nothing sees a closure's uses: check_vma=False takes weights as arguments
            captured.append(check_vma and draw(st.booleans()))
            steps.append(Step("matmul", option=len(weights) - 1))
            c = c2
        elif kind in ("psum", "pmean"):
            steps.append(Step(kind, axes))
            vary -= set(axes)
        elif kind == "pmax":  # pmax or pmin
            steps.append(Step(kind, axes, draw(st.sampled_from(["max", "min"]))))
            vary -= set(axes)
        elif kind == "pbroadcast":
            steps.append(Step(kind, axes, draw(st.integers(0, n - 1))))
            vary -= set(axes)
        elif kind == "all_gather":
            if r * n > MAX_ROWS:
                continue
            to = draw(st.sampled_from(["varying", "invariant"]))
            steps.append(Step(kind, axes, to))
            r *= n
            vary = vary | set(axes) if to == "varying" else vary - set(axes)
        elif kind in ("psum_scatter", "all_to_all"):
            widen = r % n != 0  # first stack n scaled copies along the rows so they split evenly
            if (widen and r * n > MAX_ROWS) or (kind == "all_to_all" and c * n > MAX_COLS):
                continue
            steps.append(Step(kind, axes, widen))
            r = (r * n if widen else r) // n
            c = c * n if kind == "all_to_all" else c
            vary |= set(axes)
        elif kind == "ppermute":
            shift = draw(st.sampled_from(["shift", "reverse", "partial"]))
            perm = {
                "shift": [(i, (i + 1) % n) for i in range(n)],
                "reverse": [(i, n - 1 - i) for i in range(n)],
                "partial": [(i, i + 1) for i in range(n - 1)],  # index 0 receives zeros
            }[shift]
            steps.append(Step(kind, axes, tuple(perm)))
            vary |= set(axes)
        elif kind == "mix_axis_index":
            steps.append(Step(kind, axes))
            vary |= set(axes)
        else:  # elementwise, mix_invariant (v + pmean(v): an invariant value meets a varying one)
            steps.append(Step(kind, axes if kind == "mix_invariant" else ()))
    # name every axis the result varies along (else check_vma refuses it), sometimes one it does not (copies)
    extra = {draw(st.sampled_from(names))} if check_vma else set()
    out_spec = P(_mesh_order(vary | extra, mesh_shape) or None)
    return Program(
        mesh_shape, spec, tuple(steps), tuple(weights), tuple(captured), out_spec, check_vma
    ), (rows, cols)


def body_of(prog: Program, closure: dict[int, torch.Tensor]):
    """The per-device function; weights not in ``closure`` arrive as arguments after ``x``."""

    def body(x, *arg_weights):
        it = iter(arg_weights)
        ws = [closure[i] if i in closure else next(it) for i in range(len(prog.weight_shapes))]
        v = x
        for s in prog.steps:
            n = math.prod(prog.mesh_shape[a] for a in s.axes)
            if s.kind == "elementwise":
                v = torch.tanh(v) + 0.5 * v
            elif s.kind == "matmul":
                v = v @ ws[s.option]
            elif s.kind == "psum":
                v = colofn.psum(v, s.axes)
            elif s.kind == "pmean":
                v = colofn.pmean(v, s.axes)
            elif s.kind == "pmax":
                v = (colofn.pmax if s.option == "max" else colofn.pmin)(v, s.axes)
            elif s.kind == "pbroadcast":
                v = colofn.pbroadcast(v, s.axes, s.option)
            elif s.kind == "all_gather":
                v = colofn.all_gather(v, s.axes, axis_dim=0, tiled=True, to=s.option)
            elif s.kind in ("psum_scatter", "all_to_all"):
                if s.option:
                    v = torch.cat([v * ((k + 1) / n) for k in range(n)])
                if s.kind == "psum_scatter":
                    v = colofn.psum_scatter(v, s.axes, scatter_dimension=0, tiled=True)
                else:
                    v = colofn.all_to_all(v, s.axes, 0, 1, tiled=True)
            elif s.kind == "ppermute":
                v = colofn.ppermute(v, s.axes, list(s.option))
            elif s.kind == "mix_invariant":
                v = v + 0.5 * colofn.pmean(v, s.axes)
            elif s.kind == "mix_axis_index":
                v = v + 0.25 * colofn.axis_index(s.axes).to(v.dtype)
        names = tuple(prog.mesh_shape)
        return v, colofn.psum((v * v).sum(), names) / math.prod(prog.mesh_shape.values())

    return body


def check(prog: Program, x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    for s in prog.steps:
        event(s.kind)
    event(f"dtype {x.dtype}")
    if any(prog.captured):
        event("closure weight")
    note(
        f"program: mesh {prog.mesh_shape}, in {prog.in_spec}, out {prog.out_spec}, steps {list(prog.steps)}"
    )
    names, sizes = tuple(prog.mesh_shape), tuple(prog.mesh_shape.values())
    in_specs = (prog.in_spec, *[P() for cap in prog.captured if not cap])
    out_specs = (prog.out_spec, P())

    def split(ws):
        closure = {i: w for i, (w, cap) in enumerate(zip(ws, prog.captured, strict=True)) if cap}
        args = [w for w, cap in zip(ws, prog.captured, strict=True) if not cap]
        return body_of(prog, closure), args

    def parallel(x, *ws):
        body, args = split(ws)
        mesh = colofn.Mesh(sizes, names)
        return colofn.shard_map(
            body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=prog.check_vma
        )(x, *args)

    def reference(x, *ws):
        body, args = split(ws)
        return shard_map_reference(
            body, mesh_shape=prog.mesh_shape, in_specs=in_specs, out_specs=out_specs
        )(x, *args)

    assert_equivalent(parallel, reference, x, *weights, world_size=math.prod(sizes))


@st.composite
def cases(draw, check_vma: bool, low_precision: bool = True):
    prog, shape = draw(programs(check_vma))
    dtype = draw(dtypes(low_precision))
    x = draw(tensors(shape, dtype))
    weights = [
        draw(tensors(s, torch.float64)).div(math.sqrt(s[0])).to(dtype) for s in prog.weight_shapes
    ]
    return prog, x, weights


# each example is one short simulated world: afford more than the quick profile's default
MORE = settings(max_examples=max(settings.default.max_examples, 100))


@MORE
@given(cases(check_vma=True))
def test_compositions_equal_reference(case):
    check(*case)


@MORE
@given(cases(check_vma=False))
def test_compositions_equal_reference_without_vma_tracking(case):
    """JAX's check_vma=False transposes (sum cotangents of replicated inputs, divide those of
    replicated outputs) give the same gradients when the weights are arguments."""
    check(*case)
