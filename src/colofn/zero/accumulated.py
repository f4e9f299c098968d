"""``apply_gradients``: ZeRO's reduction and sharded update for gradients computed elsewhere.

:func:`~colofn.zero.train_step` runs the forward and backward itself. A
pipeline stage cannot hand its loss to it: its forward and backward are the
schedule's actions, one per microbatch, spread over the step. So the stage
accumulates its gradients over the microbatches (:class:`colofn.pipeline.Pipeline`
does) with its parameters marked *varying* along the data axis, so that no
backward sums them over it, and then :func:`apply_gradients` does, once per
step, what ZeRO does after its backward:

=====  =====================================================  ===================
stage  over the data axis, once per step                      bytes sent per rank
=====  =====================================================  ===================
0      all-reduce of the accumulated gradients                2Ψ(n-1)/n
1      reduce-scatter of the accumulated gradients (into the  2Ψ(n-1)/n
       full buffer, which holds them through the update);
       sharded update; all-gather of the updated params
2      reduce-scatter into a new shard (the full buffer is    2Ψ(n-1)/n
       freed before the update); sharded update; all-gather
=====  =====================================================  ===================

``Ψ`` is the bytes of the state's (padded) buckets, as in
:mod:`colofn.zero.stages`. Stage 2 saves the full gradient only during the
update: the pipeline accumulates full gradients over the microbatches, since
a reduce-scatter per microbatch would send ``M`` times as much (the reason
DeepSpeed and ColossalAI's hybrid plugin allow only stages 0-1 with pipelines).
Stage 3 is refused: its parameters would have to be gathered for every
microbatch's forward and backward, at times only the schedule knows.

>>> import torch, colofn
>>> from colofn import optim, zero
>>> def program():
...     mesh = colofn.Mesh((2,), ("dp",))
...     opt = optim.sgd(0.5)
...     state = zero.init({"w": torch.ones(4)}, opt, mesh, stage=1)
...     mine = torch.full((4,), float(colofn.process_index()))  # this rank's share of the gradient
...     state, _ = zero.apply_gradients(opt, state, {"w": mine})
...     return zero.params(state)["w"].tolist()
>>> colofn.launch(program, world_size=2)[0]
[0.5, 0.5, 0.5, 0.5]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from colofn import tree as jt
from colofn.collectives import psum, psum_scatter
from colofn.errors import ConfigError, TreeError
from colofn.optim.base import GradientTransformation
from colofn.shard_map import shard_map
from colofn.zero import _checks
from colofn.zero.memory import MemoryReport
from colofn.zero.stages import _update
from colofn.zero.state import ZeroPlan, ZeroState

__all__ = ["apply_gradients", "stage_params"]


def stage_params(state: ZeroState) -> Any:
    """The full parameters a stage computes with: views into this rank's compute buckets (stages 0-2)."""
    _checks.check_state("zero.stage_params", state)
    _check_stage(state.plan, "zero.stage_params")
    return state.plan.layout.unflatten([p.to_local() for p in state.params])


def apply_gradients(optimizer: GradientTransformation, state: ZeroState, grads: Any) -> tuple[ZeroState, MemoryReport]:
    """One ZeRO update of ``state`` from ``grads``, this rank's share of the step's gradient.

    Args:
      optimizer: the transformation given to :func:`~colofn.zero.init`.
      state: a stage 0, 1 or 2 :class:`~colofn.zero.ZeroState` without mixed
        precision or offload.
      grads: a pytree shaped like the params given to ``init`` (this rank's
        blocks over the model axes), whose **sum over the data axis** is the
        gradient of the step's loss: the gradients of a loss that is already
        the mean over the whole batch (say the ``psum``'d mean of a pipeline
        stage), taken with the parameters varying along the data axis.

    Returns:
      The new state (``step`` advanced) and the bytes this rank held at the update.

    Raises:
      ConfigError: stage 3, mixed precision or offload (before any communication).
      TreeError: ``grads`` is not shaped like the params.
    """
    _checks.check_state("zero.apply_gradients", state)
    _checks.check_optimizer("zero.apply_gradients", optimizer)
    plan = state.plan
    _check_stage(plan, "zero.apply_gradients")
    layout = plan.layout
    leaves = layout.local_leaves(grads) if jt.structure(grads) == layout.treedef else None
    shapes = None if leaves is None else [tuple(x.shape) for x in leaves]
    if shapes != [s.shape for s in layout.slots]:
        raise TreeError(
            f"zero.apply_gradients: grads must be shaped like the params of the state (structure "
            f"{layout.treedef}, local shapes {[s.shape for s in layout.slots]}); got structure "
            f"{jt.structure(grads)}" + ("" if shapes is None else f", shapes {shapes}")
        )
    assert leaves is not None
    with torch.no_grad():
        fulls = layout.flatten(leaves)
    del leaves
    held: dict[str, Any] = {}
    if plan.stage == 0:
        reduced = _collective(plan, fulls, "all_reduce")
    else:
        summed = _collective(plan, fulls, "reduce_scatter")
        if plan.stage == 1:  # reduced in place: the full buffer is the gradients' storage, as in train_step
            reduced = []
            for b, (full, mine) in enumerate(zip(fulls, summed, strict=True)):
                shard = layout.shard(full, plan.bucket_index(b), b)
                with torch.no_grad():
                    shard.copy_(mine)
                reduced.append(shard)
            held["full"] = fulls
        else:
            reduced = summed
    del fulls
    # ``_update`` divides by the sizes of ``mean_over`` times ``scale`` (train_step's gradients are
    # of each rank's own mean over those axes); these already sum to the gradient of the step's
    # mean over every data axis, so nothing is averaged and the divisor is exactly 1.
    held["mean_over"] = ()
    new_state, memory, _ = _update(optimizer, state, reduced, held, 1.0, 0)
    return dataclasses.replace(new_state, step=state.step + 1), memory


def _check_stage(plan: ZeroPlan, where: str) -> None:
    problems = []
    if plan.stage == 3:
        problems.append("stage 3 gathers the parameters for each use inside train_step's own forward and "
                        "backward; here they are used outside it (use stage 0, 1 or 2)")
    if plan.precision is not None:
        problems.append("mixed precision (a loss scale, fp32 master weights) is train_step's alone here")
    if plan.offload:
        problems.append("offload is train_step's alone here")
    if problems:
        raise ConfigError(f"{where}: this state cannot take gradients computed elsewhere: " + "; ".join(problems))


def _collective(plan: ZeroPlan, fulls: list[torch.Tensor], op: str) -> list[torch.Tensor]:
    """Sum this rank's full buckets over each bucket's data axes: all of each (``all_reduce``) or its shard.

    With several data axes (``zero.init(axis=("dp", "ep"))``) each bucket has its own group
    (:meth:`~colofn.zero.state.ZeroPlan.bucket_axes`): dense weights over all of them, expert
    weights (split over ``ep``) over ``dp`` alone.
    """
    groups = [plan.bucket_axes(b) for b in range(len(fulls))]
    sizes = [math.prod(plan.mesh.shape[a] for a in g) for g in groups]
    if max(sizes, default=1) == 1:
        return fulls if op == "all_reduce" else [plan.layout.shard(f, 0, b) for b, f in enumerate(fulls)]

    def one(x: torch.Tensor, g: tuple[str, ...]) -> torch.Tensor:
        axes = g if len(g) > 1 else g[0]
        return psum(x, axes) if op == "all_reduce" else psum_scatter(x, axes, tiled=True)

    def body(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(one(x, g) for x, g in zip(xs, groups, strict=True))

    if op == "all_reduce":
        out_specs = tuple(plan.bucket_full_spec(b) for b in range(len(fulls)))
    else:
        out_specs = tuple(plan.shard_spec for _ in fulls)
    # Each rank's buffer enters as its block of an array split over every axis: varying along all of them.
    fn = shard_map(body, mesh=plan.mesh, in_specs=(plan.shard_spec,), out_specs=out_specs)
    out: Any = fn(tuple(plan.wrap(f, plan.shard_spec) for f in fulls))
    return [o.to_local() for o in out]
