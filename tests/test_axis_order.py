"""Axis tuples in any order (issue 11 §3): ``P(("b", "a"))`` on mesh ``("a", "b")``, the first axis major.

Each path is checked against the block layout of JAX (what
``colofn.testing.shard_map_reference`` and ``local_block`` compute): the
placements round trip, ``device_put``/``gather``/``sharding_of``, ``shard_map``
in and out specs (values and gradients, global and DTensor arguments), ``jit``
in/out shardings and ``with_sharding_constraint``, and checkpoints saved in one
order and loaded in another. The random specs of the property suites
(``colofn.testing.strategies.specs_for``) list a dim's axes in any order too.
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch.distributed.tensor import Shard
from torch.distributed.tensor.placement_types import _StridedShard

import colofn
from colofn import P
from colofn.sharding import NamedSharding, local_block
from colofn.testing import assert_equivalent, assert_trees_close, shard_map_reference

# full_tensor() of a dim split over several mesh axes logs a "suboptimal redistribute" warning
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

SHAPE = {"a": 2, "b": 3}
X = torch.arange(36.0).reshape(12, 3)


def mesh():
    return colofn.Mesh(tuple(SHAPE.values()), tuple(SHAPE))


def all_specs(names, ndim):
    """Every spec of a rank-``ndim`` tensor over ``names``: each axis on one dim or none, in every order."""
    for slots in itertools.product(range(-1, ndim), repeat=len(names)):
        dims = [[a for a, sl in zip(names, slots, strict=True) if sl == d] for d in range(ndim)]
        for orders in itertools.product(*(itertools.permutations(d) for d in dims)):
            yield P(*orders)


def test_placements_round_trip_for_every_order():
    def program(shape):
        m = colofn.Mesh(shape, ("a", "b", "c"))
        bad = []
        for spec in all_specs(("a", "b", "c"), 2):
            s = NamedSharding(m, spec)
            back = NamedSharding.from_placements(m, s.to_placements(2))
            if back.to_placements(2) != s.to_placements(2) or (1 not in shape and back.spec != spec):
                bad.append(spec)
        return bad

    assert colofn.launch(program, (2, 3, 2), world_size=12)[0] == []
    assert colofn.launch(program, (2, 1, 2), world_size=4)[0] == []  # a size-1 axis may come back elsewhere


def test_out_of_order_axes_become_strided_shards():
    def program():
        m = colofn.Mesh((2, 2, 2), ("a", "b", "c"))
        return {t: NamedSharding(m, P(t)).to_placements(1) for t in itertools.permutations("abc")}

    got = colofn.launch(program, world_size=8)[0]
    s, ss = Shard(0), lambda k: _StridedShard(0, split_factor=k)
    assert got[("a", "b", "c")] == (s, s, s)
    assert got[("b", "a", "c")] == (ss(2), s, s)
    assert got[("c", "a", "b")] == (ss(2), ss(2), s)
    assert got[("c", "b", "a")] == (ss(4), ss(2), s)


def test_device_put_gather_and_sharding_of():
    def program():
        m = mesh()
        out = []
        for spec in (P(("b", "a")), P(None, "b"), P(("b", "a"), None)):
            d = colofn.device_put(X, NamedSharding(m, spec))
            again = colofn.device_put(d, NamedSharding(m, P(("a", "b"))))  # a DTensor is redistributed
            out.append(
                torch.equal(d.to_local(), local_block(X, spec, m))
                and torch.equal(colofn.gather(d), X)
                and colofn.sharding_of(d).spec == spec
                and torch.equal(again.to_local(), local_block(X, P(("a", "b")), m))
            )
        return out

    assert colofn.launch(program, world_size=6) == [[True] * 3] * 6


def body(v):
    return colofn.psum(v.sum(0), "a") * (colofn.axis_index(("b", "a")) + 1.0)


def test_shard_map_specs_in_any_order_equal_the_reference():
    in_spec, out_spec = P(("b", "a")), P(("b", "a"))
    ref = shard_map_reference(body, mesh_shape=SHAPE, in_specs=in_spec, out_specs=out_spec)

    def parallel(x):
        return colofn.shard_map(body, mesh=mesh(), in_specs=in_spec, out_specs=out_spec)(x)

    assert_equivalent(parallel, ref, X, world_size=6)  # values and gradients

    def from_dtensor():  # a DTensor argument in mesh order is redistributed to the spec's order
        m = mesh()
        d = colofn.device_put(X, NamedSharding(m, P(("a", "b")))).detach().requires_grad_()
        y = colofn.shard_map(body, mesh=m, in_specs=in_spec, out_specs=out_spec)(d)
        (y.full_tensor() * torch.arange(1.0, 19.0)).sum().backward()
        return colofn.gather(y), colofn.sharding_of(d.grad).spec, colofn.gather(d.grad)

    x = X.clone().requires_grad_()
    want = ref(x)
    (want * torch.arange(1.0, 19.0)).sum().backward()
    for value, grad_spec, grad in colofn.launch(from_dtensor, world_size=6):
        assert_trees_close((value, grad), (want, x.grad))
        assert grad_spec == P(("a", "b"))  # the gradient comes back in the argument's own layout


def test_jit_shardings_and_constraint_in_any_order():
    def math(x, constrain=lambda y: y):
        return constrain(torch.tanh(x) * 2) + x.sum()

    def f(x):
        return math(x, lambda y: colofn.with_sharding_constraint(y, P(("b", "a"))))

    def program():
        m = mesh()
        with m:
            g = colofn.jit(f, in_shardings=P(("b", "a")), out_shardings=P(("b", "a")))
            x = X.clone().requires_grad_()
            y = g(x)
            y.full_tensor().pow(2).sum().backward()
            return colofn.sharding_of(y).spec, torch.equal(y.to_local(), local_block(math(X), P(("b", "a")), m)), x.grad

    want_x = X.clone().requires_grad_()
    math(want_x).pow(2).sum().backward()
    for spec, same_block, grad in colofn.launch(program, world_size=6):
        assert spec == P(("b", "a")) and same_block
        torch.testing.assert_close(grad, want_x.grad)


def test_checkpoint_saved_in_one_order_loads_in_another(tmp_path):
    def program(path):
        m = mesh()
        colofn.checkpoint.save(path, {"x": colofn.device_put(X, NamedSharding(m, P(("b", "a"))))})
        like = {"x": colofn.device_put(torch.zeros(12, 3), NamedSharding(m, P(("a", "b"))))}
        back = colofn.checkpoint.load(path, like=like)["x"]
        like2 = {"x": colofn.device_put(torch.zeros(12, 3), NamedSharding(m, P(None, "b")))}
        back2 = colofn.checkpoint.load(path, like=like2)["x"]
        return torch.equal(colofn.gather(back), X) and torch.equal(colofn.gather(back2), X)

    assert colofn.launch(program, str(tmp_path / "ckpt"), world_size=6) == [True] * 6


def test_jit_computes_out_of_order_arguments_in_mesh_order():
    """DTensor (torch 2.13) reshapes a ``_StridedShard`` dim wrongly; jit lays such arguments out in mesh order."""
    t = torch.arange(24.0).reshape(2, 12)

    def program():
        m = mesh()
        out = []
        for arg in (t, colofn.device_put(t, NamedSharding(m, P(None, ("b", "a"))))):
            g = colofn.jit(lambda v: v.reshape(-1) * 2.0, in_shardings=NamedSharding(m, P(None, ("b", "a"))),
                           out_shardings=NamedSharding(m, P(("b", "a"))))
            y = g(arg)
            out.append((colofn.sharding_of(y).spec, torch.equal(colofn.gather(y), t.reshape(-1) * 2.0)))
        return out

    assert colofn.launch(program, world_size=6) == [[(P(("b", "a")), True)] * 2] * 6
