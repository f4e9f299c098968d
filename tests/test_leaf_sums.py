"""Plain data parallelism without tracking: ``LeafSums`` (DDP's reducer) and the dense trainer on it.

A dp-only step (every parameter replicated, the batch split, no collective in
the body) runs its body with ``check_vma=False`` and sums the parameters'
gradients over the data axes in flat buckets started from gradient hooks
during the backward (:class:`colofn._reducer.LeafSums`). These tests prove, by
the order of events (never by time), that the first bucket is on the wire
before the backward reaches the first layer, that every rank issues the same
all-reduces in the same order, and that the gradients, losses and optimizer
steps equal one device's.
"""

from __future__ import annotations

import math
import threading
from typing import Any
from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import colofn
from colofn import _comm, _dist_comm, optim, random
from colofn import tree as jt
from colofn._reducer import LeafSums
from colofn.models import gpt
from colofn.parallel import Plan, make_local_value_and_grad, shard_params
from colofn.train.trainers import DenseTrainer

F32, F64 = torch.float32, torch.float64


def layers(n: int, width: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(width, width, generator=g, dtype=dtype) / width**0.5 for _ in range(n)]


def mlp(ws: list[torch.Tensor], x: torch.Tensor, on_first: object = None, skip: int | None = None) -> torch.Tensor:
    h = x
    for i, w in enumerate(ws):
        if i == skip:
            continue  # a leaf the loss does not depend on
        h = torch.tanh(h @ w)
        if i == 0 and on_first is not None:
            h.register_hook(on_first)  # fires when dL/dh0 is computed: before w0's gradient can be
    return h.pow(2).mean()


def test_first_bucket_launches_before_the_backward_reaches_the_first_layer():
    """Six 256 x 256 fp32 layers (256 KiB of gradient each) at DDP's caps: the last four layers'
    gradients fill the 1 MiB first bucket, whose all-reduce is recorded before the gradient of the first
    layer's output exists; w1 and w0 follow in a second bucket when the backward is over."""
    n, width = 6, 256
    ws = layers(n, width, F32, seed=0)
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(1))

    def program():
        mesh = colofn.Mesh((2,), ("dp",))
        leaves = [w.clone().requires_grad_() for w in ws]
        mine = x.chunk(2)[colofn.process_index()]
        seen: list[int] = []

        def on_first(g: torch.Tensor) -> None:
            seen.append(sum(r.op == "all_reduce" and r.phase == "backward" for r in rec))

        with colofn.comm_trace() as rec:
            grads = LeafSums(_comm.axis_group(mesh, ("dp",))).grad(mlp(leaves, mine, on_first) / 2, leaves)
        return seen, [r.shape for r in rec], grads

    leaves = [w.clone().requires_grad_() for w in ws]
    want = torch.autograd.grad(sum(mlp(leaves, half) for half in x.chunk(2)) / 2, leaves)
    block = width * width
    for seen, sizes, grads in colofn.launch(program, world_size=2):
        assert seen == [1]  # one bucket was on the wire when the backward got to layer 0
        assert sizes == [(4 * block,), (2 * block,)]  # w5..w2 (1 MiB), then w1, w0
        for g, w in zip(grads, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@given(
    n=st.integers(1, 5),
    width=st.integers(1, 5),
    first_cap=st.integers(1, 400),
    cap=st.integers(1, 800),
    world=st.sampled_from([2, 4]),
    skip=st.one_of(st.none(), st.integers(0, 4)),
    f32_tail=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_buckets_give_the_single_device_gradients_in_one_order_on_every_rank(n, width, first_cap, cap, world, skip, f32_tail, seed):
    """Any caps (one gradient per bucket up to one bucket for all), a dtype change among the leaves
    (a bucket of its own), a leaf the loss does not use (a zero gradient, summed like the others): every
    rank's gradients equal one device's, every element goes over the wire exactly once, and all ranks
    issue the same all-reduces in the same order (bucket order, whatever order the hooks fire in)."""
    ws = layers(n, width, F64, seed)
    if f32_tail:
        ws[-1] = ws[-1].float()
    skip = skip if skip is not None and skip < n else None
    x = torch.randn(2 * world, width, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)

    def loss(leaves: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        return mlp([w.double() for w in leaves], rows, skip=skip) / world

    def program():
        mesh = colofn.Mesh((world,), ("dp",))
        leaves = [w.clone().requires_grad_() for w in ws]
        with colofn.comm_trace() as rec:
            grads = LeafSums(_comm.axis_group(mesh, ("dp",))).grad(loss(leaves, x.chunk(world)[colofn.process_index()]), leaves)
        return [(r.op, r.shape, r.dtype) for r in rec], grads

    leaves = [w.clone().requires_grad_() for w in ws]
    want = torch.autograd.grad(sum(loss(leaves, rows) for rows in x.chunk(world)), leaves, allow_unused=True)
    # patched around the launch, never inside the ranks: threads restoring a shared attribute race
    with mock.patch.object(_dist_comm, "FIRST_BUCKET_BYTES", first_cap), mock.patch.object(_dist_comm, "BUCKET_BYTES", cap):
        results = colofn.launch(program, world_size=world)
    calls = results[0][0]
    assert sum(shape[0] for _, shape, _ in calls) == sum(w.numel() for w in ws)
    for got_calls, grads in results:
        assert got_calls == calls
        for g, w, ref in zip(grads, want, ws, strict=True):
            assert g.dtype == ref.dtype and g.shape == ref.shape
            torch.testing.assert_close(g, torch.zeros_like(ref) if w is None else w.to(ref.dtype), rtol=1e-5, atol=1e-7)


CFG = gpt.config("tiny", n_layers=2, seq_len=16)


def _batch(cfg: gpt.GPTConfig, b: int, seed: int) -> dict[str, torch.Tensor]:
    t = random.randint(random.key(seed), (b, cfg.seq_len + 1), 0, cfg.vocab_size)
    return {"tokens": t[:, :-1], "targets": t[:, 1:]}


def test_a_dp_only_step_takes_the_untracked_path_and_other_plans_do_not():
    """dp (one axis or two) runs its body without the tracking mode and with LeafSums; a plan that
    splits anything else (tp) keeps the tracked path, whose sums the tracking inserts."""
    from colofn import _vma

    counts = {"sums": 0, "tracked": 0}
    lock = threading.Lock()
    real_grad, real_tf = LeafSums.grad_and_sum, _vma._VmaMode.__torch_function__

    def counted(key: str, fn: Any) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            with lock:
                counts[key] += 1
            return fn(*a, **k)

        return wrapped

    def program(plan: Plan, shape: dict[str, int]) -> None:
        mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
        params = gpt.init(random.key(0), CFG)
        blocks = jt.map(lambda d: d.to_local(), shard_params(params, CFG, plan, mesh))
        make_local_value_and_grad(CFG, plan, mesh)(blocks, _batch(CFG, 4, 1))

    # patched around the launch, never inside the ranks: threads restoring a shared attribute race
    with mock.patch.object(LeafSums, "grad_and_sum", counted("sums", real_grad)), \
         mock.patch.object(_vma._VmaMode, "__torch_function__", counted("tracked", real_tf)):
        for plan, shape in [(Plan(dp="dp"), {"dp": 2}), (Plan(dp=("a", "b")), {"a": 2, "b": 2})]:
            counts.update(sums=0, tracked=0)
            colofn.launch(program, plan, shape, world_size=math.prod(shape.values()))
            assert counts == {"sums": math.prod(shape.values()), "tracked": 0}
        counts.update(sums=0, tracked=0)
        colofn.launch(program, Plan(dp="dp", tp="tp"), {"dp": 2, "tp": 2}, world_size=4)
        assert counts["sums"] == 0 and counts["tracked"] > 0


@settings(max_examples=6, deadline=None)
@given(
    layers_=st.integers(1, 2),
    mesh=st.sampled_from([(("dp", 2),), (("dp", 4),), (("a", 2), ("b", 2))]),
    seed=st.integers(0, 2**16),
)
def test_the_dense_dp_trainer_equals_one_device_loss_gradients_and_adamw_steps(layers_, mesh, seed):
    """DenseTrainer on dp (the untracked path, in-place AdamW): three steps' losses and the final
    parameters equal single-device gpt.loss + functional AdamW, and make_local_value_and_grad's
    gradients equal one device's."""
    cfg = gpt.config("tiny", n_layers=layers_, seq_len=8)
    shape = dict(mesh)
    plan = Plan(dp=tuple(shape) if len(shape) > 1 else "dp")
    params = jt.map(lambda t: t.double(), gpt.init(random.key(seed), cfg))  # float64: Adam's sqrt(nu) magnifies rounding
    batches = [_batch(cfg, 4, seed + 1 + k) for k in range(3)]
    opt = optim.adamw(1e-2, weight_decay=0.1)

    def program():
        m = colofn.Mesh(tuple(shape.values()), tuple(shape))
        _, grads = make_local_value_and_grad(cfg, plan, m)(jt.map(torch.clone, params), batches[0])
        trainer = DenseTrainer(cfg, plan, m, opt, params, opt.init(params))
        losses = [trainer.step(b) for b in batches]
        return grads, losses, trainer.export()[0]

    p = jt.map(lambda t: t.detach().requires_grad_(), params)
    want_grads = jt.unflatten(jt.structure(p), torch.autograd.grad(gpt.loss(p, batches[0], cfg), jt.leaves(p)))
    state, ref, want_losses = opt.init(params), params, []
    for b in batches:
        q = jt.map(lambda t: t.detach().requires_grad_(), ref)
        loss = gpt.loss(q, b, cfg)
        want_losses.append(float(loss.detach()))
        updates, state = opt.update(jt.unflatten(jt.structure(q), torch.autograd.grad(loss, jt.leaves(q))), state, ref)
        ref = optim.apply_updates(ref, updates)
    for grads, losses, final in colofn.launch(program, world_size=math.prod(shape.values())):
        for g, w in zip(jt.leaves(grads), jt.leaves(want_grads), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
        assert max(abs(a - b) for a, b in zip(losses, want_losses, strict=True)) < 1e-10
        for a, b in zip(jt.leaves(final), jt.leaves(ref), strict=True):
            torch.testing.assert_close(a.to_local() if hasattr(a, "to_local") else a, b, rtol=1e-9, atol=1e-10)


def test_the_loss_statistics_ride_in_the_last_bucket():
    """A dp step's only collectives are its gradient buckets, started during the backward: the loss's
    (sum, count) all-reduce is two more elements of the last bucket, not a rendezvous of its own."""

    def program():
        mesh = colofn.Mesh((2,), ("dp",))
        params = gpt.init(random.key(0), CFG)
        blocks = jt.map(lambda d: d.to_local(), shard_params(params, CFG, Plan(dp="dp"), mesh))
        with colofn.comm_trace() as rec:
            loss, grads = make_local_value_and_grad(CFG, Plan(dp="dp"), mesh)(blocks, _batch(CFG, 4, 1))
        return float(loss), [(r.op, r.phase, r.shape) for r in rec], sum(g.numel() for g in jt.leaves(grads))

    params = gpt.init(random.key(0), CFG)
    want = float(gpt.loss(params, _batch(CFG, 4, 1), CFG).detach())
    for loss, records, numel in colofn.launch(program, world_size=2):
        assert abs(loss - want) < 1e-5
        assert {(op, phase) for op, phase, _ in records} == {("all_reduce", "backward")}
        assert sum(shape[0] for _, _, shape in records) == numel + 2  # the gradients and (sum, count)
