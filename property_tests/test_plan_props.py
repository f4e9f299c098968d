"""colofn.plan's bytes per collective equal comm_trace for random small GPTs and compositions."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

import colofn
from colofn import random
from colofn.models import gpt
from colofn.parallel import Plan, make_value_and_grad, shard_params
from colofn.plan import FP32_ADAM, Candidate, from_gpt, step_collectives

MESHES = [((("dp", 2),), "none"), ((("tp", 2),), "none"), ((("tp", 2),), "megatron"),
          ((("dp", 2), ("tp", 2)), "none"), ((("dp", 2), ("tp", 2)), "megatron"), ((("dp", 4),), "none"),
          ((("sp", 2),), "ulysses"), ((("dp", 2), ("sp", 2)), "ulysses")]


@st.composite
def cases(draw):
    heads = draw(st.sampled_from([2, 4]))
    cfg = gpt.config(
        "tiny", n_layers=draw(st.integers(1, 3)), n_heads=heads, d_model=heads * draw(st.sampled_from([2, 4])),
        d_ff=draw(st.sampled_from([8, 12])), vocab_size=draw(st.sampled_from([16, 24])), seq_len=8,
        tie_embeddings=draw(st.booleans()), pos=draw(st.sampled_from(["learned", "rotary"])),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])))
    mesh, sp = draw(st.sampled_from(MESHES))
    return cfg, mesh, sp, draw(st.sampled_from([4, 8]))


def _program(cfg, mesh_pairs, sp, b):
    shape = dict(mesh_pairs)
    mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
    plan = Plan(dp="dp" if "dp" in shape else None, tp="tp" if "tp" in shape else None, sp=sp,
                sp_axis="sp" if "sp" in shape else None)
    params = shard_params(gpt.init(random.key(0), cfg), cfg, plan, mesh)
    t = random.randint(random.key(1), (b, cfg.seq_len + 1), 0, cfg.vocab_size)
    with colofn.comm_trace() as records:
        make_value_and_grad(cfg, plan, mesh)(params, {"tokens": t[:, :-1], "targets": t[:, 1:]})
    out: Counter = Counter()
    for r in records:
        out[(r.op, "+".join(r.axes), r.phase)] += r.bytes_sent
    return out


@given(cases())
def test_predicted_bytes_per_collective_equal_comm_trace(case):
    cfg, mesh, sp, b = case
    want: Counter = Counter()
    for c in step_collectives(from_gpt(cfg), Candidate(mesh, sp=sp), global_batch=b, precision=FP32_ADAM):
        want[(c.op, c.axis, c.phase)] += c.bytes_sent
    n = 1
    for _, size in mesh:
        n *= size
    for got in colofn.launch(_program, cfg, mesh, sp, b, world_size=n):
        assert got - Counter() == want - Counter(), (cfg, mesh, sp, got, want)


@st.composite
def moe_cases(draw):
    experts = draw(st.sampled_from([2, 4]))
    cfg = gpt.config(
        "tiny", n_layers=draw(st.integers(1, 3)), n_heads=2, d_model=draw(st.sampled_from([4, 8])),
        d_ff=draw(st.sampled_from([8, 12])), vocab_size=16, seq_len=8, tie_embeddings=draw(st.booleans()),
        n_experts=experts, top_k=draw(st.integers(1, experts)), moe_every=draw(st.sampled_from([1, 2])))
    mesh = draw(st.sampled_from([(("ep", 2),), (("dp", 2), ("ep", 2)), (("dp", 2),)]))
    return cfg, mesh, draw(st.sampled_from([4, 8]))


def _moe_program(cfg, mesh_pairs, b):
    shape = dict(mesh_pairs)
    mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
    plan = Plan(dp="dp" if "dp" in shape else None, ep="ep" if "ep" in shape else None)
    params = shard_params(gpt.init(random.key(0), cfg), cfg, plan, mesh)
    t = random.randint(random.key(1), (b, cfg.seq_len + 1), 0, cfg.vocab_size)
    with colofn.comm_trace() as records:
        make_value_and_grad(cfg, plan, mesh)(params, {"tokens": t[:, :-1], "targets": t[:, 1:]})
    out: Counter = Counter()
    for r in records:
        out[(r.op, "+".join(r.axes), r.phase)] += r.bytes_sent
    # Each MoE layer's all-to-alls are padded to the routing's room: read it back.
    return out, tuple(r.shape[1] for r in records if r.op == "all_to_all" and r.phase == "forward")[::2]


@given(moe_cases())
def test_predicted_moe_bytes_per_collective_equal_comm_trace_given_the_routing(case):
    cfg, mesh, b = case
    n = 1
    for _, size in mesh:
        n *= size
    for got, rooms in colofn.launch(_moe_program, cfg, mesh, b, world_size=n):
        want: Counter = Counter()
        for c in step_collectives(from_gpt(cfg), Candidate(mesh), global_batch=b, precision=FP32_ADAM,
                                  ep_rooms=rooms or None):
            want[(c.op, c.axis, c.phase)] += c.bytes_sent
        assert got - Counter() == want - Counter(), (cfg, mesh, got, want)
