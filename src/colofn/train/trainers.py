"""The three ways ``colofn train`` takes a step, behind one interface.

Each trainer starts from the *global* training state (``params`` and the AdamW
state as full tensors, the same on every rank: a fresh init or a checkpoint),
lays it out on the mesh its own way, and can ``export`` it back to the global
form (collective), which is what checkpoints store; so a run saved on one mesh
resumes on any other.

* :class:`DenseTrainer`: every strategy of :mod:`colofn.parallel` (dp, tp,
  Megatron-SP, Ulysses, ring, ep) as the body of one ``shard_map``
  (:func:`~colofn.parallel.make_local_value_and_grad`); params and optimizer
  state are this rank's blocks (plain tensors) between steps, DTensors only
  on export.
* :class:`ZeroTrainer`: the same loss without the dp mean, under
  :mod:`colofn.zero` (stages 0-3 over ``dp``).
* :class:`PipelineTrainer`: the layers cut into stages run by a
  :mod:`colofn.pipeline` schedule over ``pp``; each stage is
  :func:`colofn.parallel.stage_forward` under :func:`colofn.per_device`, so tp,
  Megatron-SP and dp work inside stages. The last stage returns its rank's
  share of each microbatch's mean (no ``psum`` in the forward), summed once per
  step after the optimizer (:mod:`colofn.train.pipe_loss`); small dense stages'
  parameters vary along the data axes and the pipeline sums their accumulated
  gradients once per step (``Pipeline(grad_sum_axes=...)``), larger ones get
  the dp sum from varying/invariant tracking. With ``zero`` (stages 0-2) each stage's
  parameters are a :mod:`colofn.zero` state over ``dp`` instead: they vary
  along ``dp`` inside the stage (no sum per microbatch), and
  :func:`colofn.zero.apply_gradients` reduces the gradients accumulated over
  the microbatches once per step. A mixture-of-experts model sends each
  stage's balancing loss along with the activations (``{"h", "aux"}``), and
  the last stage adds it to the microbatch's loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from colofn import optim, zero
from colofn import tree as jt
from colofn.mesh import Mesh
from colofn.models import gpt
from colofn.optim.adam import AdamState
from colofn.parallel import (
    Plan,
    batch_specs,
    make_local_value_and_grad,
    param_specs,
    shard_params,
    stage_slice,
)
from colofn.parallel.gpt import local_loss, splits_only_the_batch, stage_forward
from colofn.partition_spec import P, PartitionSpec, dim_axes
from colofn.sharding import from_local_block, gather, local_block
from colofn.train import pipe_loss

Tree = Any


def nbytes(tree: Tree) -> int:
    """Bytes of tensor storage this rank holds for ``tree`` (a DTensor counts its local block)."""
    total = 0
    for x in jt.leaves(tree):
        if isinstance(x, DTensor):
            x = x.to_local()
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
    return total


def _map_adam(state: AdamState, fn: Any) -> AdamState:
    return AdamState(state.count, fn(state.mu), fn(state.nu))


class DenseTrainer:
    def __init__(self, mcfg: gpt.GPTConfig, plan: Plan, mesh: Mesh, opt: optim.GradientTransformation, params: Tree, opt_state: AdamState) -> None:
        self.mcfg, self.plan, self.mesh, self.opt = mcfg, plan, mesh, opt
        self.specs = param_specs(mcfg, plan)
        # placed (and checked) as DTensors once, then held as the blocks: no DTensor per leaf per step
        place = lambda t: jt.map(lambda d: d.to_local().clone(), shard_params(t, mcfg, plan, mesh))  # noqa: E731
        # the params are leaves (requires_grad) that live across steps, as an nn.Module's: the gradient buckets
        # and hooks of plain dp are made once, and the gradients are views of them (DDP's gradient_as_bucket_view)
        self.params = jt.map(torch.Tensor.requires_grad_, place(params))
        self.opt_state = _map_adam(opt_state, place)
        self.value_and_grad = make_local_value_and_grad(mcfg, plan, mesh, grads_as_bucket_views=True)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss, grads = self.value_and_grad(self.params, batch)
        # the trainer owns its blocks and state: torch.optim's in-place step (its kernels, its numbers)
        self.opt_state = optim.update_in_place(self.opt, grads, self.opt_state, self.params)
        return float(loss)

    def export(self) -> tuple[Tree, AdamState]:
        wrap = lambda t: jt.map(lambda x, spec: from_local_block(x.detach(), spec, self.mesh), t, self.specs)  # noqa: E731
        return gather(wrap(self.params)), gather(_map_adam(self.opt_state, wrap))

    def local_bytes(self) -> int:
        return nbytes((self.params, self.opt_state))


class ZeroTrainer:
    def __init__(self, mcfg: gpt.GPTConfig, plan: Plan, mesh: Mesh, opt: optim.GradientTransformation, params: Tree, opt_state: AdamState, stage: int) -> None:
        from colofn.parallel.data_axes import zero_axes, zero_loss_plan

        self.opt = opt
        inner = zero_loss_plan(plan, mcfg)
        self.loss_fn = lambda p, b: local_loss(p, b, mcfg, inner)
        self.batch_spec = batch_specs(plan)["tokens"]
        placed = shard_params(params, mcfg, inner, mesh)
        place_state = _map_adam(opt_state, lambda t: shard_params(t, mcfg, inner, mesh))
        self.state = zero.init(placed, opt, mesh, axis=zero_axes(plan), stage=stage, opt_state=place_state)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        # The trainer owns its state: the step updates its shards and moments in place.
        self.state, self.info = zero.train_step(self.loss_fn, self.opt, self.state, batch, batch_spec=self.batch_spec, donate=True)
        return float(self.info.loss)

    def export(self) -> tuple[Tree, AdamState]:
        out = zero.export_state(self.state)
        return gather(out["params"]), gather(out["opt_state"])

    def local_bytes(self) -> int:
        s = self.state
        return nbytes((s.params, s.master, s.opt_state))


class PipelineTrainer:
    def __init__(self, mcfg: gpt.GPTConfig, plan: Plan, mesh: Mesh, opt: optim.GradientTransformation, params: Tree, opt_state: AdamState, schedule_name: str, microbatches: int, zero_stage: int | None = None) -> None:
        from colofn.pipeline import Pipeline, make_schedule

        self.mcfg, self.plan, self.mesh, self.opt = mcfg, plan, mesh, opt
        self.zero_stage = zero_stage
        from colofn.parallel.data_axes import zero_axes

        self._zero_axes = zero_axes(plan)  # ZeRO's data axes inside the stages: dp, and sp (Ulysses/ring) or ep
        self.moe = mcfg.n_experts > 0
        sched = make_schedule(schedule_name, mesh.shape["pp"], microbatches)
        n = sched.num_stages
        if mcfg.n_layers % n:
            from colofn.errors import ConfigError

            raise ConfigError(
                f"schedule {schedule_name!r} has {n} stages but the model has {mcfg.n_layers} layers; "
                f"use a preset (or --pp size) whose layer count divides into {n} stages"
            )
        per = mcfg.n_layers // n
        self.ranges = [range(s * per, (s + 1) * per) for s in range(n)]
        full_specs = param_specs(mcfg, plan)
        self.specs = {s: stage_slice(full_specs, mcfg, self.ranges[s]) for s in range(n)}
        self.mine = sched.stages_of(mesh.axis_index("pp"))
        if zero_stage is not None:
            from colofn.train.pipe_zero import stage_states

            part = lambda t, s: stage_slice(t, mcfg, self.ranges[s])  # noqa: E731
            self.states = stage_states(opt, mesh, zero_stage, self.specs, {
                s: (part(params, s), part(opt_state.mu, s), part(opt_state.nu, s)) for s in self.mine}, opt_state.count,
                axis=self._zero_axes)
        else:
            self.params = {s: self._local(stage_slice(params, mcfg, self.ranges[s]), s) for s in self.mine}
            self.opt_states = {
                s: AdamState(opt_state.count, self._local(stage_slice(opt_state.mu, mcfg, self.ranges[s]), s),
                             self._local(stage_slice(opt_state.nu, mcfg, self.ranges[s]), s))
                for s in self.mine
            }
        bs = batch_specs(plan)
        self.batch_specs = bs
        # The last stage returns this rank's share of each microbatch's mean (no psum in the forward); the
        # step's shares are summed in one asynchronous all-reduce after the optimizer (train/pipe_loss.py).
        # A MoE model's last stage adds the (invariant) balancing loss to it, so it keeps the psum'd mean.
        self.shares = self._loss_in_shares()
        self.loss_group = pipe_loss.loss_group(mesh, plan.token_axes) if self.shares else None
        self.microbatches = sched.num_microbatches
        self.blocks = pipe_loss.data_blocks(bs["targets"], mesh)
        self._sum_axes = self._grad_sum_axes(full_specs)
        act = P(plan.batch_axes or None, plan.seq_axis)
        stages = [self._stage_fn(s, act, bs["tokens"], last=s == n - 1) for s in range(n)]
        self.pipe = Pipeline(stages, sched, mesh=mesh, axis_name="pp", grad_sum_axes=self._sum_axes or None)

    def _local(self, tree: Tree, s: int) -> Tree:
        return jt.map(lambda x, spec: local_block(x, spec, self.mesh).clone(), tree, self.specs[s])

    def _grad_sum_axes(self, full_specs: Tree) -> tuple[str, ...]:
        """The axes the pipeline sums this rank's stages' accumulated gradients over once per step, or ``()``.

        Then the stages' parameters vary along the token axes inside the stages (no implicit pvary, gradient
        hook and stash per parameter per microbatch: ``Pipeline(grad_sum_axes=...)``), where tracking would
        sum them over the same axes once per step. Only where that changes no communication: without ZeRO
        (which sums them itself), no parameter split over a token axis (an expert weight over ``ep``), and
        each stage's parameters within the first gradient bucket (1 MiB), which tracking fills during the
        last backward but launches only when it ends: larger stages keep tracking's buckets launched during
        that backward (the totals are complete only after it).
        """
        from colofn import _dist_comm

        if not self._loss_in_shares() or self.zero_stage is not None:
            return ()
        axes = self.plan.token_axes
        split = {a for spec in jt.leaves(full_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
                 for e in spec for a in dim_axes(e)}
        small = all(nbytes(self.params[s]) <= _dist_comm.FIRST_BUCKET_BYTES for s in self.mine)
        return axes if small and not split & set(axes) else ()

    def _loss_in_shares(self) -> bool:
        """Whether the last stage returns this rank's share of the mean (tokens split, and no balancing loss added)."""
        return bool(self.plan.token_axes) and not self.moe

    def _stage_fn(self, s: int, act: PartitionSpec, tok: PartitionSpec, last: bool) -> Any:
        from colofn.shard_map import per_device

        mcfg, plan, layers = self.mcfg, self.plan, self.ranges[s]
        if self.moe:
            from colofn.train.pipe_moe import moe_stage

            return moe_stage(self, s, act, tok, last)
        x_spec = tok if s == 0 else act
        vary = self._vary
        check = not self._untracked_stages()
        if last and self.shares:  # t: {"count": [1], the microbatch's token count over the token axes, "targets"}
            return per_device(
                lambda p, x, t: stage_forward(vary(p), x, mcfg, plan, layers=layers, targets=t["targets"],
                                              count=t["count"].reshape(()))[0],
                mesh=self.mesh, in_specs=(self.specs[s], x_spec, {"count": P(), "targets": tok}), check_vma=check,
            )
        if last:
            return per_device(
                lambda p, x, t: stage_forward(vary(p), x, mcfg, plan, layers=layers, targets=t)[0],
                mesh=self.mesh, in_specs=(self.specs[s], x_spec, tok), check_vma=check,
            )
        return per_device(lambda p, x: stage_forward(vary(p), x, mcfg, plan, layers=layers)[0], mesh=self.mesh,
                          in_specs=(self.specs[s], x_spec), check_vma=check)

    def _untracked_stages(self) -> bool:
        """Whether the stages can run untracked (``check_vma=False``), as plain dp's body does.

        When the pipeline sums the parameters' accumulated gradients itself (``grad_sum_axes``), the loss is
        this rank's share (no ``psum``) and nothing but the batch is split (no tp, sp, ep, experts or grid),
        a stage's body calls no collective and every value in it varies along the data axes alike: the
        tracking mode would only confirm it, op by op.
        """
        return bool(self._sum_axes) and self.shares and splits_only_the_batch(self.mcfg, self.plan)

    def _vary(self, params: Tree) -> Tree:
        """Inside a stage: the params vary along the data axes, whose sum ZeRO (or the pipeline) does once per step."""
        axes = self._zero_axes if self.zero_stage is not None else self._sum_axes
        if not axes:
            return params
        from colofn.train.pipe_zero import varying

        return varying(params, axes)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        tokens = local_block(batch["tokens"], self.batch_specs["tokens"], self.mesh)
        targets: Any = local_block(batch["targets"], self.batch_specs["targets"], self.mesh)
        if self.shares:
            targets = {"count": pipe_loss.microbatch_counts(batch["targets"], self.blocks, self.microbatches),
                       "targets": targets}
        if self.zero_stage is not None:
            from colofn.train.pipe_zero import zero_step

            return zero_step(self.pipe, self.opt, self.states, tokens, targets, loss_group=self.loss_group)
        result = self.pipe(self.params, tokens, targets)
        self.events = result.events  # the step's compute per action, for the report's measured bubble
        loss = pipe_loss.LossSum(result.losses, self.loss_group)  # on the wire during the update
        for s in self.mine:  # the trainer owns its stages' params and state: updated in place, the same bits
            self.opt_states[s] = optim.update_in_place(self.opt, result.grads[s], self.opt_states[s], self.params[s])
        return loss.wait()

    def _global(self, tree: Tree, s: int) -> Tree:
        return jt.map(lambda x, spec: from_local_block(x, spec, self.mesh).full_tensor(), tree, self.specs[s])

    def export(self) -> tuple[Tree, AdamState]:
        from colofn.pipeline import gather_stages

        if self.zero_stage is not None:
            from colofn.train.pipe_zero import export_stages

            mine, count = export_stages(self.states)
        else:
            mine = {s: (self._global(self.params[s], s), self._global(self.opt_states[s].mu, s), self._global(self.opt_states[s].nu, s)) for s in self.mine}
            count = self.opt_states[self.mine[0]].count
        stages = gather_stages(mine, mesh=self.mesh, axis_name="pp")
        params, mu, nu = (self._merge([st[i] for st in stages]) for i in range(3))
        return params, AdamState(count, mu, nu)

    def _merge(self, per_stage: list[Tree]) -> Tree:
        """The inverse of ``stage_slice`` over all stages."""
        out: dict[str, Any] = {"layers": [layer for st in per_stage for layer in st["layers"]]}
        out["embed"] = per_stage[0]["embed"]
        out["final_norm"] = per_stage[-1]["final_norm"]
        if "head" in per_stage[-1]:
            out["head"] = per_stage[-1]["head"]
        return out

    def local_bytes(self) -> int:
        if self.zero_stage is not None:
            from colofn.train import pipe_zero

            return pipe_zero.local_bytes(self.states)
        return nbytes((self.params, self.opt_states))
