"""Zig-zag ring attention: exact per-rank work (contiguous unbalanced, zig-zag equal), the layout, one-device equality."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import colofn
from colofn import P, random
from colofn.models import gpt
from colofn.parallel import Plan, check_batch, sp
from colofn.parallel.plan import PlanError
from colofn.parallel.sp import chunks, ring
from colofn.testing import assert_equivalent


@given(n=st.integers(1, 8), per=st.integers(1, 4))
def test_work_per_rank_contiguous_grows_zigzag_is_equal(n, per):
    seq = 2 * n * per
    contiguous = [ring.work("contiguous", n, i, seq) for i in range(n)]
    causal = [ring.work("contiguous", n, i, seq, skip=True) for i in range(n)]
    zigzag = [ring.work("zigzag", n, i, seq) for i in range(n)]
    for layout in (contiguous, causal, zigzag):  # every layout keeps each causal score exactly once
        assert sum(w["useful"] for w in layout) == seq * (seq + 1) // 2
    c, z = seq // n, seq // (2 * n)
    assert [w["useful"] for w in contiguous] == [i * c * c + c * (c + 1) // 2 for i in range(n)]
    assert all(w == {"blocks": n, "computed": n * c * c, "useful": w["useful"]} for w in contiguous)
    assert [w["computed"] for w in causal] == [(i + 1) * c * c for i in range(n)]
    # Zig-zag: the same 2n + 1 blocks of z x z on every rank, two of them causal diagonals.
    want = {"blocks": 2 * n + 1, "computed": (2 * n + 1) * z * z, "useful": z * (z + 1) + (2 * n - 1) * z * z}
    assert zigzag == [want] * n
    if n > 1:
        assert max(w["computed"] for w in causal) == contiguous[0]["computed"] > want["computed"]


@given(n=st.integers(1, 8))
def test_zigzag_schedule_uses_every_received_block(n):
    for i in range(n):
        steps = ring.schedule("zigzag", n, i)
        assert len(steps) == n and all(steps)  # each ppermute's output is used: its backward runs on every rank
        assert {a for a, *_ in steps[0]} == {0, 1}  # both query chunks get their diagonal at step 0
        assert all(kb <= qa for step in steps for *_, qa, kb in step)
    held = sorted(j for i in range(n) for j in chunks.chunk_ids("zigzag", n, i))
    assert held == list(range(2 * n))
    assert sorted(chunks.zigzag_order(4 * n, n).tolist()) == list(range(4 * n))


def test_layout_helpers_inside_shard_map():
    n, seq = 3, 12
    tokens = torch.arange(2 * seq).reshape(2, seq)

    def program():
        mesh = colofn.Mesh((n,), ("sp",))
        f = colofn.shard_map(
            lambda t: (sp.to_zigzag(t, "sp"), sp.local_positions(t.shape[1], "sp", layout="zigzag")),
            mesh=mesh,
            in_specs=P(None, "sp"),
            out_specs=(P(None, "sp"), P("sp")),
        )
        got, pos = f(tokens)
        return got.full_tensor(), pos.full_tensor()

    got, pos = colofn.launch(program, world_size=n)[0]
    order = chunks.zigzag_order(seq, n)
    assert torch.equal(got, tokens[:, order]) and torch.equal(pos, order)


@pytest.mark.parametrize(("layout", "blocks"), [("zigzag", lambda n: 2 * n + 1), ("contiguous", lambda n: n)])
def test_ring_attention_computes_the_scheduled_blocks(monkeypatch, layout, blocks):
    """Zig-zag skips the fully-masked blocks: every rank runs ``block`` 2n + 1 times (contiguous: n, masked)."""
    n, calls = 3, []
    real = ring.block

    def counting(*args, **kw):
        calls.append(int(colofn.axis_index("sp")))
        return real(*args, **kw)

    monkeypatch.setattr(ring, "block", counting)
    q, k, v = (random.normal(random.key(i), (1, 2, 12, 4)) for i in range(3))

    def program():
        f = colofn.shard_map(
            lambda q, k, v: ring.ring_attention(q, k, v, "sp", layout),
            mesh=colofn.Mesh((n,), ("sp",)),
            in_specs=P(None, None, "sp"),
            out_specs=P(None, None, "sp"),
        )
        f(q, k, v)

    colofn.launch(program, world_size=n)
    assert Counter(calls) == {i: blocks(n) for i in range(n)}


@settings(max_examples=max(2, settings.default.max_examples // 2))  # 6 quick, 150 long
@given(
    n=st.integers(1, 4),
    per=st.integers(1, 2),
    heads=st.integers(1, 3),
    b=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_zigzag_ring_attention_equals_one_device(n, per, heads, b, seed):
    """Forward and gradients of q, k, v against causal attention on one device (the layout permuted in and out)."""
    seq = 2 * n * per
    q, k, v = (random.normal(random.key(seed + i), (b, heads, seq, 4), torch.float64) for i in range(3))
    order = chunks.zigzag_order(seq, n)
    inverse = torch.argsort(order)

    def parallel(q, k, v):
        f = colofn.shard_map(
            lambda q, k, v: ring.ring_attention(q, k, v, "sp"),
            mesh=colofn.Mesh((n,), ("sp",)),
            in_specs=P(None, None, "sp"),
            out_specs=P(None, None, "sp"),
        )
        return f(q[:, :, order], k[:, :, order], v[:, :, order]).full_tensor()[:, :, inverse]

    assert_equivalent(parallel, gpt.attention_core, q, k, v, world_size=n)


def test_odd_chunks_fail_clearly():
    def program():
        f = colofn.shard_map(
            lambda q: ring.ring_attention(q, q, q, "sp"),
            mesh=colofn.Mesh((2,), ("sp",)),
            in_specs=P(None, None, "sp"),
            out_specs=P(None, None, "sp"),
        )
        with pytest.raises(ValueError, match="cuts this rank's 3 tokens into 2 chunks.*multiple of 4"):
            f(torch.zeros(1, 1, 6, 2))
        return True

    assert colofn.launch(program, world_size=2) == [True, True]
    with pytest.raises(PlanError, match=r"seq 6 is not divisible by 2 \* sp = 4 .*zig-zag.*multiple of 4"):
        check_batch(Plan(dp="dp", sp="ring", sp_axis="sp"), {"dp": 1, "sp": 2}, (2, 6), 8)
    check_batch(Plan(sp="ulysses", sp_axis="sp"), {"sp": 2}, (2, 6), 8)  # contiguous splits need only sp
