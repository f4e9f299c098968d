"""Expert-parallel dispatch, grouping and combine equal the single-device MoE for any routing.

Hypothesis draws the expert-parallel size (1, 2 or 4, with dp 1 or 2 beside
it), the experts per rank, top-k, the capacity factor (none, or one that drops
some or most assignments), the tokens per rank and how skewed the router is
(up to every token choosing one expert, so some ranks send nothing and some
experts get nothing), and whether the counts come with the routing
statistics or are all-gathered. ``route_and_count`` + ``expert_parallel``
inside ``shard_map`` must give ``gpt.moe``'s output, load-balancing loss and
gradients (router, expert weights, tokens), and tag the output varying along
the token axes, in float64 and float32. Every index of the dispatch is built from the count table
(:class:`colofn.parallel.ep.experts._Plan`), so these are the cases where an
off-by-one would show.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import colofn
from colofn import P, _vma, random
from colofn.models import gpt
from colofn.parallel import ep
from colofn.testing import assert_equivalent


@st.composite
def cases(draw):
    n = draw(st.sampled_from([1, 2, 4]))
    dp = draw(st.sampled_from([1, 2])) if n < 4 else 1
    n_local = draw(st.sampled_from([1, 2]))
    top_k = draw(st.integers(1, min(2, n * n_local)))
    capacity = draw(st.sampled_from([None, None, 0.5, 1.0]))
    rows = draw(st.integers(1, 3))  # sequences per rank
    seq = draw(st.integers(1, 3))
    skew = draw(st.sampled_from([0.0, 2.0, 50.0]))  # 50: every token's first choice is one expert
    gathered = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    return n, dp, n_local, top_k, capacity, rows, seq, skew, gathered, dtype


@given(cases())
def test_expert_parallel_equals_single_device_moe(case):
    n, dp, n_local, top_k, capacity, rows, seq, skew, gathered, dtype = case
    cfg = gpt.config("tiny", d_model=8, n_heads=2, d_ff=12, n_experts=n * n_local, top_k=top_k,
                     capacity_factor=capacity, dtype=dtype)  # fmt: skip
    params = gpt.init(random.key(0), cfg)["layers"][0]["moe"]
    x = random.normal(random.key(1), (dp * n * rows, seq, cfg.d_model), dtype)
    x[..., 0] = 1.0  # a constant feature: the skewed router column wins for every token
    params["router"][0, -1] += skew

    def body(params, x):
        r, table = ep.route_and_count(params["router"], x, cfg, batch_axes=("dp", "ep"), count_axis="ep")
        y = ep.expert_parallel(params, x.flatten(0, 1), r, cfg, "ep", None if gathered else table)
        assert _vma.current().vma(y) == {"dp", "ep"}
        return y.reshape(x.shape), r.aux_loss

    def parallel(params, x):
        specs = {"router": P(), "w1": P("ep"), "w2": P("ep")}
        mesh = colofn.Mesh((dp, n), ("dp", "ep"))
        return colofn.shard_map(body, mesh=mesh, in_specs=(specs, P(("dp", "ep"))), out_specs=(P(("dp", "ep")), P()))(
            params, x
        )

    assert_equivalent(parallel, lambda p, x: gpt.moe(p, x, cfg), params, x, world_size=dp * n)

