"""``train_step``: one ZeRO step (forward, backward, gradient reduction, sharded update, param gather).

Per step and rank, with ``Ψ`` the bytes of the (padded) compute-dtype params
this rank's buckets hold and ``n`` ranks on the data axis:

=====  =========================================================  ===================
stage  communication over the data axis                           bytes sent per rank
=====  =========================================================  ===================
0      all-reduce of the gradients                                2Ψ(n-1)/n
1      reduce-scatter of each bucket's gradients during the       2Ψ(n-1)/n
       backward, all-gather of the updated params
2      reduce-scatter of each unit's gradients during the         2Ψ(n-1)/n
       backward, all-gather of the updated params
3      all-gather of each unit in the forward, again in the       3Ψ(n-1)/n at most
       backward, reduce-scatter of its gradients
=====  =========================================================  ===================

plus one all-reduce of the loss (a scalar; with mixed precision a 2-vector,
the loss and the count of non-finite gradient shards, over every mesh axis).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.distributed.tensor import DTensor

from colofn import _comm, _vma, tracing
from colofn import tree as jt
from colofn._dist_comm import BUCKET_BYTES, FIRST_BUCKET_BYTES, _plain_autograd
from colofn.collectives import pmean, psum
from colofn.optim.base import GradientTransformation, update_in_place
from colofn.partition_spec import P, PartitionSpec
from colofn.shard_map import per_device
from colofn.sharding import NamedSharding, local_block
from colofn.world import in_simulated_world
from colofn.zero import _checks
from colofn.zero.gather import BucketReduceScatters, Gatherer, unit_grad
from colofn.zero.memory import LiveBytes, MemoryReport, measure
from colofn.zero.offload import to_device
from colofn.zero.precision import next_loss_scale
from colofn.zero.state import ZeroPlan, ZeroState, local_tree, rewrap, wrap_opt_state

__all__ = ["StepInfo", "make_train_step", "train_step"]


class StepInfo(NamedTuple):
    """What a step reports (the same on every rank, except ``memory`` and ``schedule``).

    Attributes:
      loss: the mean of the ranks' losses (0-d, float32 or float64).
      skipped: the step was skipped: a gradient was not finite (mixed precision only).
      loss_scale: the loss scale this step used.
      memory: the bytes this rank held, measured when the optimizer ran
        (on a skipped step: without the optimizer's workspace).
      offload_bytes: ``(to host, to device)`` bytes this rank moved for the
        offloaded update (0, 0 without offload).
      schedule: stage 3: this rank's gather/release/reduce-scatter events in order.
    """

    loss: torch.Tensor
    skipped: bool
    loss_scale: float
    memory: MemoryReport
    offload_bytes: tuple[int, int]
    schedule: tuple[str, ...]


def train_step(
    loss_fn: Callable[[Any, Any], torch.Tensor],
    optimizer: GradientTransformation,
    state: ZeroState,
    batch: Any,
    *,
    batch_spec: PartitionSpec | None = None,
    donate: bool = False,
) -> tuple[ZeroState, StepInfo]:
    """One training step of ZeRO: returns the new state and a :class:`StepInfo`.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss``, per device: it runs inside
        ``shard_map`` with this rank's blocks of the params (model-axis-split
        leaves are local blocks) and this rank's shard of ``batch`` (split on
        dim 0 over the data axis, or by ``batch_spec``), and returns the *mean*
        loss over that shard as a 0-d tensor, invariant along the model axes
        (psum over them as needed). ZeRO reduces the gradients itself over the
        data axes (below: a loss that sums over a data axis itself). In stage 3 ``params`` is a
        lazy read-only view: index it (``params["w"]``, ``params["layers"][i]``)
        or iterate ``params["layers"]``; each access gathers that unit.
      optimizer: the transformation given to :func:`~colofn.zero.init`.
      state: the :class:`ZeroState` from ``init`` or the previous step.
      batch: a pytree of global tensors (the same on every rank) or DTensors
        split over the data axis; every leaf's dim 0 must divide by its size.
      batch_spec: how every batch leaf is split (default: dim 0 over the data
        axes), e.g. ``P("dp", "sp")`` to split a ``[batch, seq]`` leaf's
        sequence over a sequence-parallel data axis.
      donate: give ``state``'s buffers to the step (JAX's ``donate_argnums``):
        the master shards (or the params' own shards) and the optimizer state
        are updated in place (:func:`~colofn.optim.update_in_place`: the same
        bits, no new moments, updates or params allocated per step), and the
        returned state holds them. ``state`` must not be used afterwards (its
        buffers hold the new values). For a caller that owns its state, such as
        ``colofn train``'s trainer; the default leaves ``state`` untouched.

    The step minimises the mean of ``loss_fn`` over the data axes, differentiated
    as ``shard_map`` differentiates :func:`~colofn.pmean`: along an axis where
    ``loss_fn``'s result varies (it did not reduce over it) ZeRO averages the
    ranks' losses and gradients; along one where it is invariant (it summed over
    that axis itself, as a sequence- or expert-parallel loss does, or as the
    global mean over every data axis does) its value is already the mean, and
    each rank's gradient is its part of the sum ZeRO takes over the axis.

    Raises:
      ShapeError: a batch leaf whose dim 0 does not divide by the data-axis size
        (before any communication), or a ``loss_fn`` result that is not a 0-d
        floating tensor.
    """
    _checks.check_state("zero.train_step", state)
    _checks.check_optimizer("zero.train_step", optimizer)
    if not callable(loss_fn):
        raise TypeError(f"zero.train_step: loss_fn must be callable, got {type(loss_fn).__name__}")
    plan = state.plan
    if batch_spec is None and len(plan.data_axes) == 1:
        batch_spec = P(plan.axis)
        _checks.check_batch(batch, plan.n, plan.axis)
    else:
        batch_spec = P(plan.data_axes) if batch_spec is None else batch_spec
        _checks.check_batch_spec(batch, batch_spec, plan.mesh)
    scale = float(state.loss_scale)
    live = LiveBytes()
    events: list[str] = []
    held: dict[str, Any] = {}
    body = functools.partial(_body, loss_fn, plan, scale, held, live, events)
    body.__name__ = getattr(loss_fn, "__name__", "loss_fn")  # type: ignore[attr-defined]
    # The body of a shard_map over (params, batch), run on this rank's blocks: the params'
    # blocks are the state's local buffers, and the results are wanted as local tensors, so
    # no DTensor is built or unwrapped per step (the body checks its loss's vma itself).
    run = per_device(body, mesh=plan.mesh, in_specs=(plan.param_specs, batch_spec))
    grads_t, m = run(tuple(p.to_local() for p in state.params), _local_batch(batch, batch_spec, plan.mesh))
    grads: list[torch.Tensor] = list(grads_t)
    loss, overflow = m[0], bool(m[1] > 0)
    new_scale, good = next_loss_scale(plan.precision, scale, int(state.good_steps), overflow)
    step = state.step + 1
    loss_scale = torch.tensor(new_scale, dtype=torch.float32)
    good_steps = torch.tensor(good, dtype=torch.int64)
    if overflow:
        memory = measure(params=state.params, grads=[grads, held.get("full")], master=state.master, opt_state=state.opt_state, gathered_peak=live.peak)
        skipped = dataclasses.replace(state, step=step, skipped=state.skipped + 1, loss_scale=loss_scale, good_steps=good_steps)
        return skipped, StepInfo(loss, True, scale, memory, (0, 0), tuple(events))
    new_state, memory, moved = _update(optimizer, state, grads, held, scale, live.peak, donate=bool(donate))
    new_state = dataclasses.replace(new_state, step=step, loss_scale=loss_scale, good_steps=good_steps)
    return new_state, StepInfo(loss, False, scale, memory, moved, tuple(events))


def make_train_step(
    loss_fn: Callable[[Any, Any], torch.Tensor],
    optimizer: GradientTransformation,
    *,
    batch_spec: PartitionSpec | None = None,
    donate: bool = False,
) -> Callable[[ZeroState, Any], tuple[ZeroState, StepInfo]]:
    """``step(state, batch) -> (state, info)``: :func:`train_step` with ``loss_fn``, ``optimizer``, ``batch_spec`` and ``donate`` bound."""
    _checks.check_optimizer("zero.make_train_step", optimizer)

    def step(state: ZeroState, batch: Any) -> tuple[ZeroState, StepInfo]:
        return train_step(loss_fn, optimizer, state, batch, batch_spec=batch_spec, donate=donate)

    return step


def _local_batch(batch: Any, spec: PartitionSpec, mesh: Any) -> Any:
    """This rank's block of every batch leaf under ``spec``: what ``shard_map`` hands its body."""

    def one(x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, DTensor):
            placements = NamedSharding(mesh, spec).to_placements(x.ndim)
            if tuple(x.placements) != placements:
                tracing.note_mesh(mesh.device_mesh)  # the redistribution is recorded with axis names
                x = x.redistribute(mesh.device_mesh, placements)
            return x.to_local()
        block = local_block(x.to(mesh.device), spec, mesh)
        # Simulated ranks are threads sharing the caller's tensor: each gets its own block, as a process has.
        return block.clone() if in_simulated_world() else block

    return jt.map(one, batch)


# ----------------------------------------------------------------------------- inside shard_map


def _body(loss_fn: Callable[..., Any], plan: ZeroPlan, scale: float, held: dict[str, Any], live: LiveBytes, events: list[str], params: tuple[torch.Tensor, ...], batch: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    ctx = _vma.current()
    assert ctx is not None
    layout = plan.layout
    name = getattr(loss_fn, "__name__", "loss_fn")
    vmas = [frozenset({*plan.data_axes, *s.spec.axes}) for s in layout.slots]

    def tag(i: int, view: torch.Tensor) -> torch.Tensor:
        # Every rank holds its own copy of the params' blocks: varying along the data
        # axes (so no implicit pvary sums their gradients; ZeRO reduces them itself)
        # and along the model axes the leaf's own spec splits.
        return ctx.set_vma(view, vmas[i])

    def loss_of(tree: Any) -> torch.Tensor:
        loss = loss_fn(tree, batch)
        _checks.check_loss(loss, name)
        varying = ctx.vma(loss)
        if not plan.check_finite:  # (with check_finite, _metrics sums the loss over every axis)
            _checks.check_loss_axes(varying, plan.model_axes, name, plan.mesh)
        held["mean_over"] = tuple(a for a in plan.data_axes if a in varying)  # the axes ZeRO averages over
        held["loss_sum"] = _start_loss_sum(plan, loss, held["mean_over"])  # over the backward, not after it
        return loss

    def backward(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        target = loss if scale == 1.0 else loss.float() * scale
        with _vma.suspended():
            got = torch.autograd.grad(target, inputs, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs, strict=True)]

    prec = plan.precision
    if prec is not None and prec.cast_batch:
        batch = jt.map(lambda x: x.to(prec.compute_dtype) if x.is_floating_point() else x, batch)
    mine = [plan.bucket_index(b) for b in range(len(params))]
    if plan.stage == 0:
        fulls = [p.detach().requires_grad_(True) for p in params]
        tree = layout.rebuild([tag(k, v) for k, v in enumerate(layout.views(fulls))])
        loss = loss_of(tree)
        del tree
        grads = [psum(g, plan.bucket_axes(b)) for b, g in enumerate(backward(loss, fulls))]
    elif plan.stage == 1:
        fulls = [p.detach().requires_grad_(True) for p in params]
        launch = _InOrder(BucketReduceScatters(plan, in_place=True), len(fulls))  # overlaps the rest of the backward
        inputs = [unit_grad(f, f.detach(), functools.partial(launch.ready, b)) for b, f in enumerate(fulls)]
        tree = layout.rebuild([tag(k, v) for k, v in enumerate(layout.views(inputs))])
        loss = loss_of(tree)
        del tree, inputs
        try:
            local = backward(loss, fulls)
            summed = launch.finish(local)
        finally:
            launch.rs.wait()
        grads = []
        for b, g in enumerate(local):
            own = layout.shard(g, mine[b], b)
            if not _same_view(own, summed[b]):  # (a host backend summed it in place already)
                with torch.no_grad():
                    own.copy_(summed[b])  # reduced in place: the full buffer is the grad storage
            grads.append(own)
        held["full"] = local
    elif plan.stage == 2:
        shard_leaves = [layout.shard(p, mine[b], b).detach().requires_grad_(True) for b, p in enumerate(params)]
        rs = BucketReduceScatters(plan)  # each unit's reduce-scatter overlaps the rest of the backward
        fulls = [unit_grad(s, p.detach(), functools.partial(rs.hook, b)) for b, (s, p) in enumerate(zip(shard_leaves, params, strict=True))]
        tree = layout.rebuild([tag(k, v) for k, v in enumerate(layout.views(fulls))])
        loss = loss_of(tree)
        del tree, fulls
        try:
            grads = backward(loss, shard_leaves)
        finally:
            rs.wait()
    else:
        g3 = Gatherer(plan, params, tag, live, events)
        with torch.autograd.graph.saved_tensors_hooks(g3.pack, g3.unpack):
            try:
                loss = loss_of(g3.params())
            finally:
                g3.end_forward()
        leaves = [g3.leaves.get(b) for b in range(len(params))]
        used = [x for x in leaves if x is not None]
        got = iter(backward(loss, used))
        g3.end_backward()
        grads = [next(got) if x is not None else torch.zeros_like(params[b]) for b, x in enumerate(leaves)]
    return tuple(grads), _metrics(plan, loss, grads, held["mean_over"], held.pop("loss_sum"))


class _InOrder:
    """ZeRO-1's reduce-scatters started during the backward, in one order on every rank.

    :meth:`ready` (bucket ``b``'s full gradient is complete) starts the
    reduce-scatters of the last bucket down to the first as soon as each and all
    after it are complete; autograd usually completes them in that order. A
    bucket no gradient reached on this rank (unused, or used only on another)
    is summed, with the rest, by :meth:`finish` after the backward, so every
    rank issues the same reduce-scatters in the same order whatever its graph.
    """

    def __init__(self, rs: BucketReduceScatters, n: int) -> None:
        self.rs, self.next = rs, n - 1
        self.grads: dict[int, torch.Tensor] = {}
        self.summed: dict[int, torch.Tensor] = {}
        # Completed buckets are started together once they reach DDP's bucket caps (1 MiB
        # for the first, then 25 MiB) or the first bucket is done: a fixed cut of the fixed
        # order, so every rank starts the same groups (one coalesced all-reduce each on a
        # host backend, where a collective's fixed cost is what a small one costs).
        self.open: list[tuple[int, torch.Tensor]] = []
        self.caps = (FIRST_BUCKET_BYTES, BUCKET_BYTES) if rs.coalesces else (0, 0)  # (else: each at once)
        self.open_bytes, self.cap = 0, self.caps[0]

    def ready(self, b: int, g: torch.Tensor) -> torch.Tensor:
        g = self.grads[b] = g.detach().contiguous()  # read by the reduce-scatter until rs.wait(); nothing writes it before
        while self.next in self.grads:
            self._add(self.next, self.grads.pop(self.next))
            self.next -= 1
        return g

    def _add(self, b: int, g: torch.Tensor) -> None:
        self.open.append((b, g))
        self.open_bytes += g.numel() * g.element_size()
        if self.open_bytes >= self.cap or b == 0:
            self.summed.update(self.rs.start(self.open))
            self.open, self.open_bytes, self.cap = [], 0, self.caps[1]

    def finish(self, local: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        for b in range(self.next, -1, -1):
            self._add(b, local[b].detach().contiguous())
        self.next = -1
        return self.summed


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device


def _loss_dtype(loss: torch.Tensor) -> torch.dtype:
    return torch.float64 if loss.dtype == torch.float64 else torch.float32


def _start_loss_sum(plan: ZeroPlan, loss: torch.Tensor, mean_over: tuple[str, ...]) -> _comm.AsyncAllReduce | None:
    """The sum of the ranks' losses over ``mean_over``, started before the backward (as
    ``pmean``'s all-reduce, the same op, bytes and phase), so no rank waits for it after."""
    if plan.check_finite or not mean_over or not _plain_autograd():
        return None  # (with check_finite the loss is summed with the gradients' count, after)
    return _comm.AsyncAllReduce(loss.detach().to(_loss_dtype(loss)), _comm.axis_group(plan.mesh, mean_over))


def _metrics(plan: ZeroPlan, loss: torch.Tensor, grads: list[torch.Tensor], mean_over: tuple[str, ...], started: _comm.AsyncAllReduce | None = None) -> torch.Tensor:
    """``[mean loss, non-finite gradient shards]``: one small all-reduce (none for a loss already invariant)."""
    dtype = _loss_dtype(loss)
    value = loss.detach().to(dtype)
    if not plan.check_finite:
        if started is not None:
            value = started.wait() / math.prod(plan.mesh.shape[a] for a in mean_over)
        elif mean_over:
            value = pmean(value, mean_over if len(mean_over) > 1 else mean_over[0])
        return torch.stack([value, torch.zeros((), dtype=dtype)])
    bad = torch.zeros((), dtype=dtype)
    for g in grads:
        bad = bad + (~torch.isfinite(g)).any().to(dtype)
    axes = tuple(plan.mesh.axis_names)
    total = psum(torch.stack([value, bad]), axes)
    return torch.stack([total[0] / plan.mesh.size, total[1]])


# ----------------------------------------------------------------------------- the sharded update


def _update(optimizer: GradientTransformation, state: ZeroState, grads: list[torch.Tensor], held: dict[str, Any], scale: float, gathered_peak: int, *, donate: bool = False) -> tuple[ZeroState, MemoryReport, tuple[int, int]]:
    plan = state.plan
    layout = plan.layout
    divisor = math.prod(plan.mesh.shape[a] for a in held.pop("mean_over", (plan.axis,))) * scale
    params = [p.to_local() for p in state.params]
    master_dt = plan.master_dtypes
    to_host = 0
    g_upd = []
    with torch.no_grad():
        for b, g in enumerate(grads):
            if plan.offload:
                to_host += g.numel() * g.element_size()
            # In place: either our own gradient buffer or a fresh master-dtype copy (the workspace).
            g_upd.append(to_device(g, plan.state_device, master_dt[b]).div_(divisor))
        if state.master is not None:
            p_upd = [m.to_local() for m in state.master]
        else:
            p_upd = [layout.shard(p, plan.bucket_index(b), b) if plan.stage in (1, 2) else p for b, p in enumerate(params)]
        opt_local = local_tree(state.opt_state)
        memory = measure(
            params=params,
            grads=[grads, held.get("full")],
            master=p_upd if state.master is not None else (),
            opt_state=opt_local,
            workspace=g_upd,
            gathered_peak=gathered_peak,
        )
        if not donate:  # the step takes copies, so the state passed in stays valid (JAX without donation)
            p_upd, opt_local = [p.clone() for p in p_upd], jt.map(torch.clone, opt_local)
        # one optimizer path whether donated or not, so both give the same bits (torch.optim's, for AdamW)
        new_opt = update_in_place(optimizer, tuple(g_upd), opt_local, tuple(p_upd))
        new_master = list(p_upd)
        held.clear()
        del g_upd, grads
        compute = plan.compute_dtypes
        to_dev = 0
        new_compute = []
        for b, x in enumerate(new_master):
            y = to_device(x, plan.compute_device, compute[b])
            if plan.offload:
                to_dev += y.numel() * y.element_size()
            p = params[b]
            if donate and y.shape == p.shape and y.dtype == p.dtype and y.device == p.device:
                if not _same_view(y, p):
                    p.copy_(y)  # the cast master, written into the donated params buffer
                y = p
            new_compute.append(y)
    if plan.stage in (1, 2):  # donated: gathered into the state's own full buffers
        new_params = plan.gather_shards(new_compute, into=params if donate else None)
    else:
        new_params = new_compute
    new_state = dataclasses.replace(
        state,
        params=rewrap(plan, new_params, plan.param_specs, state.params),
        master=None if state.master is None else rewrap(plan, new_master, plan.master_specs, state.master),
        opt_state=wrap_opt_state(plan, new_opt, like=state.opt_state),
    )
    return new_state, memory, (to_host, to_dev)
