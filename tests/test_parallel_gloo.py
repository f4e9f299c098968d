"""dp x tp and sequence parallelism on real processes (gloo): the same numbers as one device."""

from __future__ import annotations

import pytest
import torch

import colofn
from colofn import random, tree
from colofn.models import gpt
from colofn.parallel import Plan, make_loss, shard_params

PLANS = [
    ("dp+tp", Plan(dp="dp", tp="tp"), {"dp": 2, "tp": 2}),
    ("dp+tp+megatron_sp", Plan(dp="dp", tp="tp", sp="megatron"), {"dp": 2, "tp": 2}),
    ("dp+ring", Plan(dp="dp", sp="ring", sp_axis="sp"), {"dp": 2, "sp": 2}),
]


def rank_program(cfg: gpt.GPTConfig, params: dict, batch: dict) -> dict:
    """Every plan in one world of 4 processes: the loss and the full gradients, per plan."""
    out = {}
    for name, plan, shape in PLANS:
        mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
        sharded = tree.map(
            lambda p: p.detach().requires_grad_(), shard_params(params, cfg, plan, mesh)
        )
        loss = make_loss(cfg, plan, mesh)(sharded, batch)
        grads = torch.autograd.grad(loss.to_local(), tree.leaves(sharded))
        out[name] = (loss.to_local().item(), [g.full_tensor() for g in grads])
    return out


@pytest.mark.gloo
def test_plans_on_gloo_processes():
    cfg = gpt.config("tiny", n_layers=2, pos="rotary", dtype=torch.float64)
    params = gpt.init(random.key(0), cfg)
    t = random.randint(random.key(1), (4, 9), 0, cfg.vocab_size)
    batch = {"tokens": t[:, :-1], "targets": t[:, 1:]}
    leaf = tree.map(lambda p: p.detach().requires_grad_(), params)
    want = gpt.loss(leaf, batch, cfg)
    want_grads = torch.autograd.grad(want, tree.leaves(leaf))
    results = colofn.launch(
        rank_program, cfg, params, batch, world_size=4, backend="gloo", timeout=120
    )
    for rank, per_plan in enumerate(results):
        for name, (loss, grads) in per_plan.items():
            assert abs(loss - want.item()) < 1e-10, (rank, name)
            for g, w in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(
                    g, w, rtol=1e-8, atol=1e-10, msg=lambda m, n=name, r=rank: f"{n} rank {r}: {m}"
                )
