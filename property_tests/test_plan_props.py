"""colofn.plan's bytes per collective equal comm_trace for random small GPTs and compositions."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

import colofn
from colofn.models import gpt
from colofn.plan import (
    FP32_ADAM,
    Candidate,
    from_gpt,
    step_bytes,
    step_collectives,
    trainer_step_bytes,
)

MESHES = [((("dp", 2),), "none"), ((("tp", 2),), "none"), ((("tp", 2),), "megatron"),
          ((("dp", 2), ("tp", 2)), "none"), ((("dp", 2), ("tp", 2)), "megatron"), ((("dp", 4),), "none"),
          ((("sp", 2),), "ulysses"), ((("dp", 2), ("sp", 2)), "ulysses"),
          ((("sp", 2),), "ring"), ((("dp", 2), ("sp", 2)), "ring")]


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


@given(cases())
def test_predicted_bytes_per_collective_equal_comm_trace(case):
    cfg, mesh, sp, b = case
    want: Counter = Counter()
    for c in step_collectives(from_gpt(cfg), Candidate(mesh, sp=sp), global_batch=b, precision=FP32_ADAM):
        want[(c.op, c.axis, c.phase)] += c.bytes_sent
    n = 1
    for _, size in mesh:
        n *= size
    for got, _ in colofn.launch(step_bytes, cfg, mesh, b, sp, world_size=n):
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


@given(moe_cases())
def test_predicted_moe_bytes_per_collective_equal_comm_trace_given_the_routing(case):
    cfg, mesh, b = case
    n = 1
    for _, size in mesh:
        n *= size
    for got, rooms in colofn.launch(step_bytes, cfg, mesh, b, world_size=n):
        want: Counter = Counter()
        for c in step_collectives(from_gpt(cfg), Candidate(mesh), global_batch=b, precision=FP32_ADAM,
                                  ep_rooms=rooms or None):
            want[(c.op, c.axis, c.phase)] += c.bytes_sent
        assert got - Counter() == want - Counter(), (cfg, mesh, got, want)


COMPOSITIONS = [  # (mesh, sp, zero, experts?, pipeline?)
    ((("pp", 2), ("dp", 2)), "none", 1, False), ((("pp", 2), ("dp", 2)), "none", 2, False),  # ZeRO inside stages
    ((("dp", 2), ("sp", 2)), "ulysses", 1, False), ((("dp", 2), ("sp", 2)), "ring", 3, False),  # over dp x sp
    ((("dp", 2), ("ep", 2)), "none", 2, True), ((("dp", 2), ("ep", 2)), "none", 3, True),  # dp x ep, experts over dp
    ((("pp", 2), ("ep", 2)), "none", None, True), ((("pp", 2), ("dp", 2)), "none", 1, True),  # experts in stages
]


@st.composite
def composed_cases(draw):
    mesh, sp, zero, moe = draw(st.sampled_from(COMPOSITIONS))
    experts = draw(st.sampled_from([2, 4])) if moe else 0
    cfg = gpt.config(
        "tiny", n_layers=2 * draw(st.integers(1, 2)), n_heads=2, d_model=draw(st.sampled_from([4, 8])),
        d_ff=draw(st.sampled_from([8, 12])), vocab_size=draw(st.sampled_from([16, 24])), seq_len=8,
        tie_embeddings=False,  # as colofn train builds every model (ZeRO-3 gathers a tied table twice)
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])), n_experts=experts, top_k=draw(st.integers(1, experts)) if moe else 1,
        moe_every=draw(st.sampled_from([1, 2])) if moe else 1)
    return cfg, mesh, sp, zero, draw(st.sampled_from([4, 8]))


@settings(max_examples=max(6, settings.default.max_examples // 2))  # 8 ranks' worth of trainers per example
@given(composed_cases())
def test_predicted_bytes_of_zero_on_data_axes_and_in_stages_and_experts_in_stages_equal_comm_trace(case):
    cfg, mesh, sp, zero, b = case
    microbatches = 2
    cand = Candidate(mesh, sp=sp, zero=zero, microbatches=microbatches)
    for got, stage, rooms in colofn.launch(trainer_step_bytes, cfg, mesh, b, sp=sp, zero=zero,
                                           microbatches=microbatches, world_size=4):
        want: Counter = Counter()
        for c in step_collectives(from_gpt(cfg), cand, global_batch=b, precision=FP32_ADAM, stage=stage,
                                  ep_rooms=rooms or None):
            want[(c.op, c.axis, c.phase)] += c.bytes_sent
        assert got - Counter() == want - Counter(), (cfg, mesh, sp, zero, stage, got, want)
