"""Second-order derivatives through random compositions of every collective equal the serial reference.

The programs are those of ``test_shard_map_props`` (elementwise math, matmuls
with replicated weights, psum, pmean, pmax/pmin, pbroadcast, all_gather,
psum_scatter, ppermute, all_to_all, invariant/varying mixing). Two properties:

* outside: the gradient of the shard_map'd function taken with
  ``create_graph=True`` is differentiated again (a Hessian-vector product per
  input: ``assert_equivalent`` compares the gradients' values and their own
  gradients against a fixed cotangent), under ``check_vma=True`` and ``False``;
* inside: ``shard_map(torch.func.grad(loss))`` equals the gradient of the
  reference loss (JAX's identity ``shard_map(grad(f)) == grad(shard_map(f))``
  for an invariant scalar loss), and so do its own gradients.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, note, settings
from torch.distributed.tensor import DTensor

import colofn
from colofn import P
from colofn.testing import assert_equivalent, shard_map_reference
from test_shard_map_props import body_of, cases  # a sibling test module: the same programs


def _wrt(*args):
    return [a for a in args if a.requires_grad]


def _full(y):
    return y.full_tensor() if isinstance(y, DTensor) else y


def _cotangent(y, i):
    n = y.numel()
    return (torch.sin(torch.arange(n, dtype=torch.float64) * 1.3 + i) + 0.25).reshape(y.shape).to(y.dtype)


def grad_of(fn):
    """``(x, *ws) -> d <fn(x, *ws), c> / d(x, *ws)``, differentiable again (``create_graph=True``)."""

    def first(*args):
        outs = [_full(y) for y in fn(*args)]
        total = sum((y * _cotangent(y, i)).sum() for i, y in enumerate(outs))
        if not total.requires_grad:  # the outputs do not depend on the inputs (ppermute to nobody, say)
            return tuple(torch.zeros_like(a) for a in _wrt(*args))
        return torch.autograd.grad(total, _wrt(*args), create_graph=True, allow_unused=True, materialize_grads=True)

    return first


def programs_and_args(prog, x, weights):
    names, sizes = tuple(prog.mesh_shape), tuple(prog.mesh_shape.values())
    in_specs = (prog.in_spec, *[P() for cap in prog.captured if not cap])

    def split(ws):
        closure = {i: w for i, (w, cap) in enumerate(zip(ws, prog.captured, strict=True)) if cap}
        return body_of(prog, closure), [w for w, cap in zip(ws, prog.captured, strict=True) if not cap]

    return names, sizes, in_specs, split


MORE = settings(max_examples=settings.default.max_examples)


@MORE
@given(cases(check_vma=True, low_precision=False))
def test_second_order_from_outside(case):
    """grad-of-grad of the shard_map'd program equals that of the reference (with tracking)."""
    _outside(*case)


@MORE
@given(cases(check_vma=False, low_precision=False))
def test_second_order_from_outside_without_vma_tracking(case):
    _outside(*case)


def _outside(prog, x, weights):
    names, sizes, in_specs, split = programs_and_args(prog, x, weights)
    out_specs = (prog.out_spec, P())
    note(f"program: mesh {prog.mesh_shape}, in {prog.in_spec}, out {prog.out_spec}, steps {list(prog.steps)}")

    def parallel(x, *ws):
        body, args = split(ws)
        mesh = colofn.Mesh(sizes, names)
        return colofn.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=prog.check_vma)(x, *args)

    def reference(x, *ws):
        body, args = split(ws)
        return shard_map_reference(body, mesh_shape=prog.mesh_shape, in_specs=in_specs, out_specs=out_specs)(x, *args)

    assert_equivalent(grad_of(parallel), grad_of(reference), x, *weights, world_size=math.prod(sizes))


@MORE
@given(cases(check_vma=True, low_precision=False))
def test_grad_inside_the_body_then_outside(case):
    """``shard_map(torch.func.grad(loss))`` is the reference's gradient, to second order."""
    prog, x, weights = case
    names, sizes, in_specs, split = programs_and_args(prog, x, weights)
    note(f"program: mesh {prog.mesh_shape}, in {prog.in_spec}, steps {list(prog.steps)}")

    def loss_of(body):
        return lambda *args: body(*args)[1]

    def parallel(x, *ws):
        body, args = split(ws)
        mesh = colofn.Mesh(sizes, names)
        g = torch.func.grad(loss_of(body), argnums=tuple(range(1 + len(args))))
        return colofn.shard_map(g, mesh=mesh, in_specs=in_specs, out_specs=in_specs)(x, *args)

    def reference(x, *ws):
        body, args = split(ws)
        ref = shard_map_reference(loss_of(body), mesh_shape=prog.mesh_shape, in_specs=in_specs, out_specs=P())
        loss = ref(x, *args)
        if not loss.requires_grad:  # the loss does not depend on the inputs (ppermute to nobody, say)
            return tuple(torch.zeros_like(a) for a in (x, *args))
        return torch.autograd.grad(loss, (x, *args), create_graph=True, allow_unused=True, materialize_grads=True)

    assert_equivalent(parallel, reference, x, *weights, world_size=math.prod(sizes))
