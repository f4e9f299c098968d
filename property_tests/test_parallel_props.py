"""Every parallel plan equals the single-device GPT: loss and the gradient of every parameter.

For each strategy and combination, hypothesis draws the mesh's axis sizes
(1, 2 or 4), a small model that fits them (learned or rotary positions,
LayerNorm or RMSNorm, tied or untied embeddings, dense or MoE with top-1/2
routing and with or without a capacity), a batch and a seed. The parallel run
(``shard_params`` + ``make_loss`` + ``torch.autograd.grad`` on a simulated
world) must match ``colofn.models.gpt.loss`` and ``torch.autograd.grad`` on one
device, in float64 so that only real differences show. Failures shrink to the
smallest mesh and model.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import colofn
from colofn import random, tree
from colofn.models import gpt
from colofn.parallel import Plan, make_loss, make_value_and_grad, shard_params
from colofn.testing import assert_trees_close

# name: (plan, mesh axes in order, whether the model must have experts)
COMBOS = {
    "dp": (Plan(dp="dp"), ("dp",), False),
    "tp": (Plan(tp="tp"), ("tp",), False),
    "dp+tp": (Plan(dp="dp", tp="tp"), ("dp", "tp"), False),
    "tp+megatron_sp": (Plan(tp="tp", sp="megatron"), ("tp",), False),
    "dp+tp+megatron_sp": (Plan(dp="dp", tp="tp", sp="megatron"), ("dp", "tp"), False),
    "dp+ulysses": (Plan(dp="dp", sp="ulysses", sp_axis="sp"), ("dp", "sp"), False),
    "tp+ulysses": (Plan(tp="tp", sp="ulysses", sp_axis="sp"), ("sp", "tp"), False),
    "dp+ring": (Plan(dp="dp", sp="ring", sp_axis="sp"), ("dp", "sp"), False),
    "tp+ring": (Plan(tp="tp", sp="ring", sp_axis="sp"), ("sp", "tp"), False),
    "dp+ep": (Plan(dp="dp", ep="ep"), ("dp", "ep"), True),
    "tp+ep": (Plan(tp="tp", ep="ep"), ("ep", "tp"), True),
    "megatron_sp+ep_on_dp": (Plan(dp="dp", tp="tp", sp="megatron", ep="dp"), ("dp", "tp"), True),
    "ring+ep_on_sp": (Plan(dp="dp", sp="ring", sp_axis="sp", ep="sp"), ("dp", "sp"), True),
}

EXAMPLES = max(2, settings.default.max_examples // 2)  # 6 under the quick profile, 150 under long


@st.composite
def setups(draw, name, combos=None):
    """``(plan, sizes, config, batch, seq, seed)`` for ``(combos or COMBOS)[name]`` (the ZeRO props reuse it)."""
    plan, axes, needs_experts = (combos or COMBOS)[name]
    sizes: dict[str, int] = {}
    for a in axes:
        room = 8 // math.prod(sizes.values() or [1])
        sizes[a] = draw(st.sampled_from([s for s in (2, 1, 4) if s <= room]))
    tp = sizes.get("tp", 1)
    sp = sizes.get(plan.seq_axis, 1) if plan.seq_axis else 1
    ulysses = sizes["sp"] if plan.sp == "ulysses" else 1
    ep = sizes[plan.ep] if plan.ep else 1
    pos = draw(st.sampled_from(["learned", "rotary"]))
    n_heads = tp * ulysses * draw(st.sampled_from([1, 2]))
    n_experts = (
        ep * draw(st.sampled_from([1, 2])) if needs_experts else draw(st.sampled_from([0, 0, 2]))
    )
    top_k = draw(st.integers(1, min(2, n_experts))) if n_experts else 1
    batch_ranks = math.prod(sizes[a] for a in plan.batch_axes)
    b = batch_ranks * draw(st.sampled_from([1, 2]))
    s = sp * (2 if plan.seq_layout == "zigzag" else 1) * draw(st.sampled_from([1, 2, 3]))  # ring: 2 chunks a rank
    cfg = gpt.config(
        "tiny",
        vocab_size=tp * draw(st.sampled_from([8, 12])),
        seq_len=max(s, 4),
        n_heads=n_heads,
        d_model=n_heads * draw(st.sampled_from([2, 4])),
        n_layers=draw(st.sampled_from([1, 2])),
        d_ff=tp * draw(st.sampled_from([2, 4])),
        pos=pos,
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        tie_embeddings=draw(st.booleans()),
        n_experts=n_experts,
        top_k=top_k,
        moe_every=draw(st.sampled_from([1, 2])),
        capacity_factor=draw(st.sampled_from([None, 1.0, 1.5])),
        aux_loss_coef=draw(st.sampled_from([0.01, 1.0])),
        dtype=torch.float64,
    )
    return plan, sizes, cfg, b, s, draw(st.integers(0, 2**16))


def _program(cfg, plan, sizes, params, batch):
    mesh = colofn.Mesh(tuple(sizes.values()), tuple(sizes))
    sharded = tree.map(lambda p: p.detach().requires_grad_(), shard_params(params, cfg, plan, mesh))
    loss = make_loss(cfg, plan, mesh)(sharded, batch)
    grads = torch.autograd.grad(loss.to_local(), tree.leaves(sharded))
    # make_value_and_grad (no rendezvous in the forward where the tokens are split) gives the same bits
    again, grads2 = make_value_and_grad(cfg, plan, mesh)(shard_params(params, cfg, plan, mesh), batch)
    assert torch.equal(again.to_local(), loss.to_local().detach())
    for a, b in zip(tree.leaves(grads2), grads, strict=True):
        assert torch.equal(a.to_local(), b.to_local())
    return loss.to_local().detach(), tree.unflatten(
        tree.structure(params), [g.full_tensor() for g in grads]
    )


@pytest.mark.parametrize("name", list(COMBOS))
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_plan_equals_single_device(name, data):
    plan, sizes, cfg, b, s, seed = data.draw(setups(name))
    params = gpt.init(random.key(seed), cfg)
    tokens = random.randint(random.key(seed + 1), (b, s + 1), 0, cfg.vocab_size)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    leaf = tree.map(lambda p: p.detach().requires_grad_(), params)
    want = gpt.loss(leaf, batch, cfg)
    want_grads = tree.unflatten(
        tree.structure(params), torch.autograd.grad(want, tree.leaves(leaf))
    )
    results = colofn.launch(
        _program, cfg, plan, sizes, params, batch, world_size=math.prod(sizes.values())
    )
    for rank, (loss, grads) in enumerate(results):
        assert_trees_close(loss, want.detach(), what=f"loss (rank {rank})", rtol=1e-9, atol=1e-10)
        assert_trees_close(grads, want_grads, what=f"gradient (rank {rank})", rtol=1e-7, atol=1e-9)
