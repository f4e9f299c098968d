"""ZeRO over several data axes (dp with Ulysses or ring sp, dp with ep) equals single-device GPT training.

Hypothesis draws the composition (dp x Ulysses, dp x ring, dp x ep, the
first and third also with tp, and dp x ring x ep), the axis sizes (1, 2 or 4, world <= 8), the ZeRO stage
(0-3), a small float64 model that fits the mesh (``test_parallel_props``'s:
learned or rotary positions, LayerNorm or RMSNorm, tied or untied
embeddings, dense or MoE with top-1/2 routing and with or without a
capacity) and the data. Two ZeRO steps (``colofn.zero.train_step`` on the
per-device loss of ``colofn.parallel``, exactly as ``colofn train --zero``
runs it) must give the single-device model's loss at each step, and its
parameters after each step. The optimizer is SGD with momentum: its first step
is ``-lr * gradient``, so ``(before - after) / lr`` is checked against the
single-device gradient of every leaf, and the second step reads the sharded
momentum buffer. (AdamW, which ``colofn train`` runs, is nearly blind to a
gradient's scale; ``tests/test_zero_sp_ep.py`` trains with it.) Failures
shrink to the smallest mesh and model.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import colofn
from colofn import optim, random, zero
from colofn import tree as jt
from colofn.models import gpt
from colofn.parallel import Plan, batch_specs, local_loss, shard_params, zero_axes, zero_loss_plan
from colofn.testing import assert_trees_close
from test_parallel_props import setups  # a sibling test module: the same models

# name: (plan, mesh axes in order, whether the model must have experts)
COMBOS = {
    "dp+ulysses": (Plan(dp="dp", sp="ulysses", sp_axis="sp"), ("dp", "sp"), False),
    "dp+ring": (Plan(dp="dp", sp="ring", sp_axis="sp"), ("dp", "sp"), False),
    "dp+ep": (Plan(dp="dp", ep="ep"), ("dp", "ep"), True),
    "dp+ulysses+tp": (Plan(dp="dp", tp="tp", sp="ulysses", sp_axis="sp"), ("dp", "sp", "tp"), False),
    "dp+ep+tp": (Plan(dp="dp", tp="tp", ep="ep"), ("dp", "ep", "tp"), True),
    "dp+ring+ep": (Plan(dp="dp", sp="ring", sp_axis="sp", ep="ep"), ("dp", "sp", "ep"), True),  # 3 data axes
}
LR = 0.5


def _optimizer() -> optim.GradientTransformation:
    return optim.sgd(LR, momentum=0.9)


@st.composite
def zero_setups(draw, name):
    plan, sizes, cfg, b, s, seed = draw(setups(name, COMBOS))  # the model strategy of test_parallel_props
    return plan, sizes, cfg, b, s, draw(st.integers(0, 3)), seed


def _program(cfg, plan, sizes, params, data, stage):
    mesh = colofn.Mesh(tuple(sizes.values()), tuple(sizes))
    opt = _optimizer()
    inner = zero_loss_plan(plan, cfg)
    state = zero.init(shard_params(params, cfg, inner, mesh), opt, mesh, axis=zero_axes(plan), stage=stage)
    spec = batch_specs(plan)["tokens"]
    out = []
    for batch in data:
        state, info = zero.train_step(lambda p, b: local_loss(p, b, cfg, inner), opt, state, batch, batch_spec=spec)
        out.append((info.loss, zero.params(state)))
    return out


def _single(cfg, params, data):
    opt = _optimizer()
    state = opt.init(params)
    out = []
    for batch in data:
        leaf = jt.map(lambda p: p.detach().requires_grad_(), params)
        loss = gpt.loss(leaf, batch, cfg)
        grads = jt.unflatten(jt.structure(leaf), torch.autograd.grad(loss, jt.leaves(leaf)))
        updates, state = opt.update(grads, state, leaf)
        params = jt.map(torch.Tensor.detach, optim.apply_updates(leaf, updates))
        out.append((loss.detach(), grads, params))
    return out


@pytest.mark.parametrize("name", list(COMBOS))
@settings(max_examples=max(2, settings.default.max_examples // 6))  # 2 under the quick profile, 50 under long
@given(data=st.data())
def test_zero_over_sp_and_ep_equals_single_device(name, data):
    plan, sizes, cfg, b, s, stage, seed = data.draw(zero_setups(name))
    params = gpt.init(random.key(seed), cfg)
    batches = []
    for step in range(2):
        tokens = random.randint(random.key(seed + 1 + step), (b, s + 1), 0, cfg.vocab_size)
        batches.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:]})
    want = _single(cfg, params, batches)
    results = colofn.launch(_program, cfg, plan, sizes, params, batches, stage, world_size=math.prod(sizes.values()))
    for rank, steps in enumerate(results):
        before = params
        for step, ((loss, got), (want_loss, want_grads, want_params)) in enumerate(zip(steps, want, strict=True)):
            where = f"{name} {sizes} ZeRO-{stage} rank {rank} step {step}"
            assert_trees_close(loss, want_loss, what=f"loss ({where})", rtol=1e-9, atol=1e-10)
            if step == 0:  # the step is -lr * gradient: the gradient of every leaf
                implied = jt.map(lambda p, q: (p - q) / LR, before, got)
                assert_trees_close(implied, want_grads, what=f"gradient ({where})", rtol=1e-7, atol=1e-9)
            assert_trees_close(got, want_params, what=f"params ({where})", rtol=1e-7, atol=1e-9)
            before = got
