"""2D (Optimus) and 2.5D (Tesseract) tensor parallelism equal the single-device GPT: loss, gradients, an AdamW step.

Hypothesis draws the composition (2D on a 2 x 2 grid, with or without a data
axis; 2.5D on a 2 x 2 x 2 grid), a small model that fits the grid (learned or
rotary positions, LayerNorm or RMSNorm, tied or untied embeddings, one or two
layers), a batch and a seed. The parallel run (``shard_params`` +
``make_value_and_grad`` + ``colofn.optim.adamw`` on DTensors, simulated world)
must match ``gpt.loss``, ``torch.autograd.grad`` and the same AdamW step on
one device, in float64. ``make_loss`` (the loss summed in the forward) must
give the same bits as ``make_value_and_grad`` (drawn with or without
``tp2d.rematerialize``), and send, per rank and per ``(op, axes, phase)``,
exactly the bytes of ``tp2d.cost.step_bytes``.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import colofn
from colofn import optim, random, tree
from colofn.models import gpt
from colofn.parallel import Plan, make_loss, make_value_and_grad, shard_params, tp2d
from colofn.parallel.tp2d.cost import step_bytes
from colofn.testing import assert_trees_close

GRIDS = {
    "2d": (Plan(tp_mode="2d", tp_grid=("row", "col")), {"row": 2, "col": 2}),
    "dp+2d": (Plan(dp="dp", tp_mode="2d", tp_grid=("row", "col")), {"dp": 2, "row": 2, "col": 2}),
    "2.5d": (Plan(tp_mode="2.5d", tp_grid=("row", "col", "dep")), {"row": 2, "col": 2, "dep": 2}),
}
EXAMPLES = max(2, settings.default.max_examples // 4)  # 3 under the quick profile, 75 under long


@st.composite
def setups(draw):
    name = draw(st.sampled_from(sorted(GRIDS)))
    plan, sizes = GRIDS[name]
    q = sizes["row"]
    n_heads = q * draw(st.sampled_from([1, 2]))
    rows = math.prod(sizes[a] for a in plan.batch_axes)
    b, s = rows * draw(st.sampled_from([1, 2])), draw(st.sampled_from([3, 4, 8]))
    cfg = gpt.config(
        "tiny",
        vocab_size=q * draw(st.sampled_from([8, 12])),
        seq_len=8,
        n_heads=n_heads,
        d_model=n_heads * draw(st.sampled_from([2, 4])),
        n_layers=draw(st.sampled_from([1, 2])),
        d_ff=q * draw(st.sampled_from([2, 6])),
        pos=draw(st.sampled_from(["learned", "rotary"])),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        tie_embeddings=draw(st.booleans()),
        dtype=torch.float64,
    )
    return plan, sizes, cfg, b, s, draw(st.booleans()), draw(st.integers(0, 2**16))


def _program(cfg, plan, sizes, params, batch, opt, remat):
    mesh = colofn.Mesh(tuple(sizes.values()), tuple(sizes))
    placed = shard_params(params, cfg, plan, mesh)
    loss, grads = make_value_and_grad(cfg, plan, mesh)(placed, batch)
    leaves = tree.map(lambda p: p.detach().requires_grad_(), placed)
    with colofn.comm_trace() as records:
        with tp2d.rematerialize() if remat else contextlib.nullcontext():
            again = make_loss(cfg, plan, mesh)(leaves, batch)
        for a, g in zip(torch.autograd.grad(again.to_local(), tree.leaves(leaves)), tree.leaves(grads), strict=True):
            assert torch.equal(a.to_local(), g.to_local())
    assert torch.equal(again.to_local().detach(), loss.to_local())
    sent = Counter()
    for r in records:
        sent[(r.op, r.axes, r.phase)] += r.bytes_sent
    want = step_bytes(cfg, plan, sizes, *batch["tokens"].shape, remat=remat)
    assert +sent == want, (+sent, want)
    updates, _ = opt.update(grads, opt.init(placed), placed)
    stepped = optim.apply_updates(placed, updates)
    full = lambda t: tree.map(lambda x: x.full_tensor(), t)  # noqa: E731
    return loss.to_local(), full(grads), full(stepped)


@settings(max_examples=EXAMPLES)
@given(setup=setups())
def test_grid_tensor_parallel_equals_single_device(setup):
    plan, sizes, cfg, b, s, remat, seed = setup
    params = gpt.init(random.key(seed), cfg)
    tokens = random.randint(random.key(seed + 1), (b, s + 1), 0, cfg.vocab_size)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    leaf = tree.map(lambda p: p.detach().requires_grad_(), params)
    want = gpt.loss(leaf, batch, cfg)
    want_grads = tree.unflatten(tree.structure(params), torch.autograd.grad(want, tree.leaves(leaf)))
    opt = optim.adamw(1e-2, weight_decay=0.1)
    updates, _ = opt.update(want_grads, opt.init(params), params)
    want_params = optim.apply_updates(params, updates)
    results = colofn.launch(
        _program, cfg, plan, sizes, params, batch, opt, remat, world_size=math.prod(sizes.values())
    )
    for rank, (loss, grads, stepped) in enumerate(results):
        assert_trees_close(loss, want.detach(), what=f"loss (rank {rank})", rtol=1e-9, atol=1e-10)
        assert_trees_close(grads, want_grads, what=f"gradient (rank {rank})", rtol=1e-7, atol=1e-9)
        assert_trees_close(stepped, want_params, what=f"AdamW step (rank {rank})", rtol=1e-7, atol=1e-9)
