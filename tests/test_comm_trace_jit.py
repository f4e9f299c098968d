"""``comm_trace`` records the collectives DTensor issues under ``jit`` (issue 11 §4).

Inside ``jit`` and at ``with_sharding_constraint`` DTensor issues PyTorch's
functional collectives; ``comm_trace`` must see every one torch's own
``CommDebugMode`` sees, with colofn's byte accounting, without counting
colofn's own collectives twice.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor.debug import CommDebugMode

import colofn
from colofn import P
from colofn.tracing import own, volume

# DTensor logs a "suboptimal redistribute" warning for sums pending on two mesh axes
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

FUNCOL_NAME = {
    "all_reduce": "c10d_functional.all_reduce",
    "all_gather": "c10d_functional.all_gather_into_tensor",
    "reduce_scatter": "c10d_functional.reduce_scatter_tensor",
}


def mlp(x, w1, w2):
    h = torch.relu(x @ w1)
    h = colofn.with_sharding_constraint(h, P("dp", "tp"))
    return ((h @ w2) ** 2).mean()


ARGS = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate([(8, 4), (4, 16), (16, 4)])]


def test_jit_step_records_what_comm_debug_mode_counts_with_ring_bytes():
    def program():
        with colofn.Mesh((2, 2), ("dp", "tp")):
            f = colofn.jit(mlp, in_shardings=(P("dp"), P(None, "tp"), P("tp")))
            xs = [a.clone().requires_grad_() for a in ARGS]
            with colofn.comm_trace() as records:
                f(*xs).backward()
            xs = [a.clone().requires_grad_() for a in ARGS]
            with CommDebugMode() as debug:
                f(*xs).backward()
            return records, {str(k): v for k, v in debug.get_comm_counts().items()}

    for records, counts in colofn.launch(program, world_size=4):
        assert {FUNCOL_NAME[op]: n for op, n in Counter(r.op for r in records).items()} == counts
        assert {r.phase for r in records} == {"forward", "backward"}
        for r in records:
            assert r.axes in {("dp",), ("tp",)} and r.group_size == 2
            nbytes = torch.Size(r.shape).numel() * r.dtype.itemsize
            assert (r.bytes_sent, r.bytes_received) == volume(r.op, nbytes, 2)


def test_with_sharding_constraint_gather_is_recorded_exactly():
    def program():
        with colofn.Mesh((2,), ("dp",)):
            f = colofn.jit(lambda x: colofn.with_sharding_constraint(x * 2, P()), in_shardings=P("dp"))
            with colofn.comm_trace() as records:
                f(torch.ones(8, 4))
            return [(r.op, r.axes, r.shape, r.bytes_sent, r.bytes_received, r.phase) for r in records]

    # each rank holds a (4, 4) float32 block (64 bytes) and receives the other one
    assert colofn.launch(program, world_size=2) == [[("all_gather", ("dp",), (4, 4), 64, 64, "forward")]] * 2


def test_shard_map_collectives_are_not_counted_twice_and_dtensor_arguments_are_seen():
    def program():
        mesh = colofn.Mesh((2,), ("i",))
        f = colofn.shard_map(lambda x: colofn.psum(x, "i"), mesh=mesh, in_specs=P(), out_specs=P())
        x = colofn.device_put(torch.ones(4), colofn.NamedSharding(mesh, P("i")))  # gathered on entry (DTensor)
        with colofn.comm_trace() as records:
            f(torch.ones(4))
            f(x)
        return [(r.op, r.axes, r.bytes_sent) for r in records]

    # psum of 4 floats: a ring all-reduce sends 16 bytes (colofn's own record, once); the sharded
    # DTensor argument is all-gathered by DTensor (2 floats in, 8 bytes sent)
    want = [("all_reduce", ("i",), 16), ("all_gather", ("i",), 8), ("all_reduce", ("i",), 16)]
    assert colofn.launch(program, world_size=2) == [want] * 2


def test_own_functional_collectives_are_left_to_their_caller():
    def program():
        mesh = colofn.Mesh((2,), ("i",))
        group = mesh.device_mesh.get_group(0)
        raw = torch.distributed.new_group([0, 1])
        with mesh, colofn.comm_trace() as records:
            funcol.all_reduce(torch.ones(4), "sum", group).wait()
            funcol.all_reduce(torch.ones(2), "sum", raw).wait()
            funcol.broadcast(torch.ones(3), 0, group).wait()
            with own():
                funcol.all_reduce(torch.ones(4), "sum", group).wait()
        return [(r.op, r.axes, r.bytes_sent, r.bytes_received) for r in records]

    # a group of the ambient mesh is named by its axis, a raw group's axes are (""); a broadcast of
    # 12 bytes as a chain: the source sends them, the other rank receives them
    rank0, rank1 = colofn.launch(program, world_size=2)
    assert rank0 == [("all_reduce", ("i",), 16, 16), ("all_reduce", ("",), 8, 8), ("broadcast", ("i",), 12, 0)]
    assert rank1 == [("all_reduce", ("i",), 16, 16), ("all_reduce", ("",), 8, 8), ("broadcast", ("i",), 0, 12)]


def test_dtensor_false_records_only_colofns_own_collectives():
    def program():
        with colofn.Mesh((2,), ("dp",)):
            f = colofn.jit(lambda x: colofn.with_sharding_constraint(x * 2, P()), in_shardings=P("dp"))
            g = colofn.shard_map(lambda x: colofn.psum(x, "dp"), in_specs=P("dp"), out_specs=P())
            with colofn.comm_trace(dtensor=False) as own_only:
                f(torch.ones(8, 4))
                g(torch.ones(4))
                with colofn.comm_trace() as inner:  # a nested trace may still ask for DTensor's
                    f(torch.ones(8, 4))
            return [r.op for r in own_only], [r.op for r in inner]

    # the inner trace's DTensor gather reaches the outer trace too: every open trace records
    assert colofn.launch(program, world_size=2) == [(["all_reduce", "all_gather"], ["all_gather"])] * 2


def test_a_group_over_several_axes_is_named_by_its_ranks():
    def program():
        mesh = colofn.Mesh((2, 2), ("a", "b"))
        both = mesh.axis_group(("a", "b"))  # a flattened mesh's group: no dim of the mesh has it
        with mesh, colofn.comm_trace() as records:
            funcol.all_reduce(torch.ones(4), "sum", both).wait()
        return [(r.op, r.axes, r.group_size, r.bytes_sent) for r in records]

    assert colofn.launch(program, world_size=4) == [[("all_reduce", ("a", "b"), 4, 24)]] * 4
