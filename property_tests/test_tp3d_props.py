"""3D tensor parallelism equals the single-device GPT, and sends what its formula says.

Hypothesis draws the grid's three axis sizes (a cube or a cuboid, 1 to 4 each,
at most 8 ranks with an optional dp axis), a small model that fits them
(learned or rotary positions, LayerNorm or RMSNorm, tied or untied
embeddings, 1 or 2 layers), a batch and a seed. On a simulated world:

* the loss, the gradient of every parameter and one AdamW step under
  ``Plan(tp_mode="3d")`` match ``colofn.models.gpt`` on one device (float64);
* the bytes :func:`colofn.comm_trace` records for a loss-and-gradient step,
  op by op (collective, axes, forward/backward), equal
  :func:`colofn.parallel.tp3d.volume.step_ops`;
* the 3D product itself (:func:`colofn.parallel.tp3d.matmul`, plain and
  flipped, on random cuboids) equals ``X @ W``, and its backward ``dY W^T``
  and ``X^T dY``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import colofn
from colofn import optim, random, tree
from colofn.models import gpt
from colofn.parallel import Plan, make_loss, make_value_and_grad, shard_params, tp3d
from colofn.parallel.tp3d import volume
from colofn.partition_spec import P
from colofn.sharding import gather
from colofn.testing import assert_trees_close

EXAMPLES = max(2, settings.default.max_examples // 3)  # 4 under the quick profile, 100 under long
AXES = ("i", "w", "o")  # (input, weight, output): in mesh order, as the 3D layout needs


@st.composite
def setups(draw, dtype=torch.float64):
    dp = draw(st.sampled_from([1, 1, 2]))
    sizes = {"dp": dp} if dp > 1 else {}
    for a in AXES:
        room = 8 // math.prod(sizes.values() or [1])
        sizes[a] = draw(st.sampled_from([s for s in (2, 1, 4) if s <= room]))
    pi, pw, po = (sizes[a] for a in AXES)
    heads = pi * draw(st.sampled_from([1, 2]))
    head_dim = 2 * pw * draw(st.sampled_from([1, 2]))  # even for rotary
    d_model = heads * head_dim
    if d_model % po:
        d_model, head_dim = d_model * po, head_dim * po
    b = dp * pw * math.lcm(pi, po) * draw(st.sampled_from([1, 2]))
    s = draw(st.sampled_from([1, 3, 4]))
    cfg = gpt.config(
        "tiny",
        vocab_size=pi * pw * draw(st.sampled_from([4, 6])),
        seq_len=max(s, 4),
        n_heads=heads,
        d_model=d_model,
        n_layers=draw(st.sampled_from([1, 2])),
        d_ff=pi * pw * draw(st.sampled_from([2, 4])),
        pos=draw(st.sampled_from(["learned", "rotary"])),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        tie_embeddings=draw(st.sampled_from([True, False])),
        dtype=dtype,
    )
    plan = Plan(dp="dp" if dp > 1 else None, tp_mode="3d", tp_grid=AXES)
    return plan, sizes, cfg, b, s, draw(st.integers(0, 2**16))


def _batch(cfg, b, s, seed):
    t = random.randint(random.key(seed + 1), (b, s + 1), 0, cfg.vocab_size)
    return {"tokens": t[:, :-1], "targets": t[:, 1:]}


def _program(cfg, plan, sizes, params, batch, opt):
    mesh = colofn.Mesh(tuple(sizes.values()), tuple(sizes))
    sharded = shard_params(params, cfg, plan, mesh)
    loss, grads = make_value_and_grad(cfg, plan, mesh)(sharded, batch)
    updates, _ = opt.update(grads, opt.init(sharded), sharded)
    stepped = optim.apply_updates(sharded, updates)
    return loss.to_local().detach(), gather(grads), gather(tree.map(torch.Tensor.detach, stepped))


@settings(max_examples=EXAMPLES)
@given(setup=setups())
def test_3d_equals_single_device(setup):
    plan, sizes, cfg, b, s, seed = setup
    params = gpt.init(random.key(seed), cfg)
    batch = _batch(cfg, b, s, seed)
    leaf = tree.map(lambda p: p.detach().requires_grad_(), params)
    want = gpt.loss(leaf, batch, cfg)
    want_grads = tree.unflatten(tree.structure(params), torch.autograd.grad(want, tree.leaves(leaf)))
    opt = optim.adamw(lr=1e-2, weight_decay=0.1)
    updates, _ = opt.update(want_grads, opt.init(params), params)
    want_params = optim.apply_updates(params, updates)
    results = colofn.launch(_program, cfg, plan, sizes, params, batch, opt, world_size=math.prod(sizes.values()))
    for rank, (loss, grads, stepped) in enumerate(results):
        assert_trees_close(loss, want.detach(), what=f"loss (rank {rank})", rtol=1e-9, atol=1e-10)
        assert_trees_close(grads, want_grads, what=f"gradient (rank {rank})", rtol=1e-7, atol=1e-9)
        assert_trees_close(stepped, want_params, what=f"AdamW step (rank {rank})", rtol=1e-7, atol=1e-9)


def _traced(cfg, plan, sizes, params, batch):
    mesh = colofn.Mesh(tuple(sizes.values()), tuple(sizes))
    sharded = tree.map(lambda p: p.detach().requires_grad_(), shard_params(params, cfg, plan, mesh))
    with colofn.comm_trace() as records:
        loss = make_loss(cfg, plan, mesh)(sharded, batch)
        torch.autograd.grad(loss.to_local(), tree.leaves(sharded))
    out: Counter = Counter()
    for r in records:
        out[(r.op, r.axes, r.phase)] += r.bytes_sent
    return out


@settings(max_examples=EXAMPLES)
@given(setup=setups(dtype=torch.float32))
def test_3d_comm_volume_matches_formula(setup):
    plan, sizes, cfg, b, s, seed = setup
    params = gpt.init(random.key(seed), cfg)
    got = colofn.launch(_traced, cfg, plan, sizes, params, _batch(cfg, b, s, seed), world_size=math.prod(sizes.values()))
    want = volume.step_ops(cfg, plan, sizes, b, s)
    for rank, ops in enumerate(got):
        assert ops == want, f"rank {rank}: traced {dict(ops)}\nformula {dict(want)}"
    deeper = dataclasses.replace(cfg, n_layers=cfg.n_layers + 1)  # one layer more costs layer_bytes
    assert volume.step_bytes(deeper, plan, sizes, b, s) - volume.step_bytes(cfg, plan, sizes, b, s) == volume.layer_bytes(cfg, plan, sizes, b, s)


def _product(x, w, sizes, flip):
    g = tp3d.Grid(*AXES)
    mesh = colofn.Mesh(tuple(sizes.values()), tuple(sizes))
    xa, ya = ("o", "i") if flip else ("i", "o")
    f = colofn.shard_map(
        lambda x, w: tp3d.matmul(x, w, g, flip=flip, w_dim=1), mesh=mesh,
        in_specs=(P(("w", xa), ya), P(ya, (xa, "w"))), out_specs=P(("w", ya), xa),
    )
    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = f(xs, ws)
    dy = random.normal(random.key(7), tuple(y.shape), torch.float64)
    gx, gw = torch.autograd.grad(y.to_local(), (xs, ws), colofn.device_put(dy, P(("w", ya), xa), mesh=mesh).to_local())
    return y.full_tensor().detach(), dy, gx, gw


@settings(max_examples=max(2, EXAMPLES // 2))  # the GPT tests above use every product too
@example(sizes=(2, 2, 2), m=1, k=2, n=1, flip=False)  # the cube, both directions, whatever is drawn
@example(sizes=(2, 1, 4), m=2, k=1, n=2, flip=True)
@given(sizes=st.tuples(*[st.sampled_from([1, 2])] * 3), m=st.integers(1, 2), k=st.integers(1, 2), n=st.integers(1, 2), flip=st.booleans())
def test_3d_product_equals_matmul_forward_and_backward(sizes, m, k, n, flip):
    shape = dict(zip(AXES, sizes, strict=True))
    pi, pw, po = sizes
    px, py = (po, pi) if flip else (pi, po)
    x = random.normal(random.key(m), (pw * px * py * m, py * k), torch.float64)  # rows over (w, x-axis), k over the y-axis
    w = random.normal(random.key(n), (py * k, px * pw * n), torch.float64)
    for y, dy, gx, gw in colofn.launch(_product, x, w, shape, flip, world_size=math.prod(sizes)):
        assert_trees_close(y, x @ w, what="X W", rtol=1e-12, atol=1e-12)
        assert_trees_close((gx, gw), (dy @ w.T, x.T @ dy), what="(dX, dW)", rtol=1e-12, atol=1e-12)
