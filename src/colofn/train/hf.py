"""``colofn train --hf``: a Hugging Face causal LM trained with colofn's strategies.

The model comes from a size preset (``--hf llama`` / ``--hf gpt2``, randomly
initialised from ``--seed``) or a local directory with ``config.json`` and
safetensors weights (``--hf ./my-model``; nothing is downloaded, no pickle is
read). :mod:`colofn.nn.hf` gives its plan; dp, Megatron TP, Megatron-SP, ZeRO
1-3 and pipelines over ``model.layers`` apply. Checkpoints hold the global
parameters and AdamW state in the model's own layout, so a run resumes on any
mesh. ``--data FILE`` trains on the bytes of a text file (byte-level tokens,
the last 10% held out); the report gives the held-out loss.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch
import torch.nn.functional as F

from colofn import data, optim, random, zero
from colofn import tree as jt
from colofn.errors import ConfigError
from colofn.mesh import Mesh
from colofn.nn import _stages, functionalize, hf, parallelize, to_state_dict
from colofn.nn._plan import ModulePlan, Parallelized
from colofn.optim.adam import AdamState
from colofn.partition_spec import P
from colofn.sharding import from_local_block, local_block
from colofn.train import pipe_loss
from colofn.train.trainers import nbytes

HELD_OUT = 0.1
SEQ_LEN = 32
Tree = Any


_LOADED: dict[tuple[str, str, int], Any] = {}
_LOAD_LOCK = threading.Lock()


def load_model(spec: str, preset: str, seed: int) -> Any:
    """The model of ``--hf``: a kind with a preset (untied, so every mesh and pipeline fits), or a local directory.

    Loaded once per process: simulated ranks (threads) share it, read-only
    (colofn never mutates it), and ``from_pretrained`` is not thread-safe (it
    builds on the ``meta`` device by patching ``nn.Module`` globally).
    """
    key = (spec, preset, seed)
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED.clear()
            _LOADED[key] = _load(spec, preset, seed)
        return _LOADED[key]


def _load(spec: str, preset: str, seed: int) -> Any:
    if os.path.isdir(spec):
        import transformers

        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ConfigError(f"--hf {spec}: no config.json in that directory")
        return transformers.AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, use_safetensors=True)
    return hf.build(hf.config(spec, preset, tie_word_embeddings=False), seed=seed)


def seq_len(model: Any) -> int:
    c = model.config
    return min(SEQ_LEN, int(getattr(c, "max_position_embeddings", None) or c.n_positions))


def token_streams(path: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held-out)`` byte-level token streams of ``--data`` (default: the shipped corpus)."""
    raw = open(path, "rb").read() if path else data.text().encode("ascii")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1 - HELD_OUT))
    return tokens[:cut], tokens[cut:]


def plan_of(model: Any, mesh_shape: dict[str, int], sp: str, *, dp: bool) -> ModulePlan:
    return hf.plan_for(model, dp="dp" if dp and "dp" in mesh_shape else None,
                       tp="tp" if "tp" in mesh_shape else None, sp=sp == "megatron")


def _map_adam(state: AdamState, fn: Any) -> AdamState:
    return AdamState(state.count, fn(state.mu), fn(state.nu))


class Dense:
    """dp / tp / Megatron-SP as one ``shard_map``; params and AdamW state are DTensors."""

    def __init__(self, model: Any, plan: ModulePlan, mesh: Mesh, opt: optim.GradientTransformation, params: Tree, state: AdamState) -> None:
        self.opt = opt
        self.loss_fn, self.par = hf.make_loss(model, plan, mesh)
        place = lambda t: self.par.shard(plan.pack(t))  # noqa: E731
        self.params, self.opt_state = place(params), _map_adam(state, place)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        p = jt.map(lambda t: t.detach().requires_grad_(), self.params)
        loss = self.loss_fn(p, batch)
        grads = jt.unflatten(jt.structure(p), torch.autograd.grad(loss.to_local(), jt.leaves(p)))
        updates, self.opt_state = self.opt.update(grads, self.opt_state, p)
        self.params = jt.map(torch.Tensor.detach, optim.apply_updates(p, updates))
        return float(loss.to_local().detach())

    def export(self) -> tuple[Tree, AdamState]:
        unpack = self.par.module_params
        return unpack(self.params), _map_adam(self.opt_state, unpack)

    def local_bytes(self) -> int:
        return nbytes((self.params, self.opt_state))


class Zero:
    """ZeRO 0-3 over ``dp`` around the tp / Megatron-SP loss."""

    def __init__(self, model: Any, plan: ModulePlan, mesh: Mesh, opt: optim.GradientTransformation, params: Tree, state: AdamState, stage: int) -> None:
        self.opt = opt
        self.par = parallelize(model, plan, mesh)
        place = lambda t: self.par.shard(plan.pack(t))  # noqa: E731
        self.state = zero.init(place(params), opt, mesh, axis="dp", stage=stage, opt_state=_map_adam(state, place))
        self.loss_fn = hf.causal_lm_loss(self.par, dp_mean=False)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        self.state, info = zero.train_step(self.loss_fn, self.opt, self.state, batch)
        return float(info.loss)

    def export(self) -> tuple[Tree, AdamState]:
        out = zero.export_state(self.state)
        unpack = self.par.module_params
        return unpack(out["params"]), _map_adam(out["opt_state"], unpack)

    def local_bytes(self) -> int:
        s = self.state
        return nbytes((s.params, s.master, s.opt_state))


class Pipelined:
    """``model.layers`` cut into the schedule's stages over ``pp``; dp, tp and Megatron-SP inside each stage."""

    def __init__(self, model: Any, plan: ModulePlan, mesh: Mesh, opt: optim.GradientTransformation, params: Tree, state: AdamState, schedule: str, microbatches: int, zero_stage: int | None = None) -> None:
        from colofn.pipeline import Pipeline, make_schedule
        from colofn.shard_map import per_device
        from colofn.train import pipe_zero

        self.opt, self.mesh, self.plan = opt, mesh, plan
        sched = make_schedule(schedule, mesh.shape["pp"], microbatches)
        n = sched.num_stages
        _stages.check_stages(model, n)
        per = _stages.n_layers(model.config) // n
        self.ranges = [range(s * per, (s + 1) * per) for s in range(n)]
        self.par: Parallelized = parallelize(model, plan, mesh)
        self.specs = _stages.stage_params(self.par.specs, self.ranges)
        self.mine = sched.stages_of(mesh.axis_index("pp"))
        split = lambda t: _stages.stage_params(plan.pack(t), self.ranges)  # noqa: E731
        mu, nu = split(state.mu), split(state.nu)
        self.zero_stage = zero_stage
        if zero_stage is not None:  # ZeRO over dp inside each stage (colofn.train.pipe_zero)
            whole = split(params)
            self.states = pipe_zero.stage_states(opt, mesh, zero_stage, self.specs, {s: (whole[s], mu[s], nu[s]) for s in self.mine}, state.count)
        else:
            self.params = {s: self._local(split(params)[s], s) for s in self.mine}
            self.opt_states = {s: AdamState(state.count, self._local(mu[s], s), self._local(nu[s], s)) for s in self.mine}
        tok = P(plan.dp) if plan.dp else P()
        act = P(plan.dp, plan.tp if plan.sp else None) if plan.dp or plan.sp else P()
        dp = (plan.dp,) if isinstance(plan.dp, str) else tuple(plan.dp or ())
        # As PipelineTrainer (colofn.train.pipe_loss): the last stage returns its rank's share of each
        # microbatch's mean, summed once per step after the optimizer; small stages' parameters vary along dp
        # and the pipeline sums their accumulated gradients once per step.
        self.loss_group = pipe_loss.loss_group(mesh, dp)
        self.blocks, self.microbatches = pipe_loss.data_blocks(tok, mesh), sched.num_microbatches
        sum_axes = dp if zero_stage is None and self._small_and_replicated(dp) else ()
        vary_axes = "dp" if zero_stage is not None else sum_axes
        vary = (lambda p: pipe_zero.varying(p, vary_axes)) if vary_axes else (lambda p: p)
        self.tok = tok
        par, ranges = self.par, self.ranges

        def make(s: int) -> Any:
            first, last = s == 0, s == n - 1
            if last and dp:
                return per_device(
                    lambda p, x, t: _share(par, _stages.stage_forward(par, vary(p), x, ranges[s], first=first, last=True), t),
                    mesh=mesh, in_specs=(self.specs[s], tok if first else act, {"count": P(), "targets": tok}))
            if last:
                return per_device(
                    lambda p, x, t: _stages.stage_loss(par, _stages.stage_forward(par, vary(p), x, ranges[s], first=first, last=True), t, dp),
                    mesh=mesh, in_specs=(self.specs[s], tok if first else act, tok))
            return per_device(lambda p, x: _stages.stage_forward(par, vary(p), x, ranges[s], first=first, last=False),
                              mesh=mesh, in_specs=(self.specs[s], tok if first else act))

        self.pipe = Pipeline([make(s) for s in range(n)], sched, mesh=mesh, axis_name="pp", grad_sum_axes=sum_axes or None)

    def _small_and_replicated(self, dp: tuple[str, ...]) -> bool:
        """No parameter split over ``dp``, and each of this rank's stages within the first gradient bucket."""
        from colofn import _dist_comm
        from colofn.partition_spec import PartitionSpec, dim_axes

        if not dp or self.zero_stage is not None:
            return False
        specs = jt.leaves(self.specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        if any(a in dp for spec in specs for e in spec for a in dim_axes(e)):
            return False
        return all(nbytes(self.params[s]) <= _dist_comm.FIRST_BUCKET_BYTES for s in self.mine)

    def _local(self, tree: Tree, s: int) -> Tree:
        return jt.map(lambda x, spec: local_block(x, spec, self.mesh).clone(), tree, self.specs[s])

    def _global(self, tree: Tree, s: int) -> Tree:
        return jt.map(lambda x, spec: from_local_block(x, spec, self.mesh).full_tensor(), tree, self.specs[s])

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        tokens = local_block(batch["tokens"], self.tok, self.mesh)
        targets: Any = local_block(batch["targets"], self.tok, self.mesh)
        if self.loss_group is not None:
            targets = {"count": pipe_loss.microbatch_counts(batch["targets"], self.blocks, self.microbatches),
                       "targets": targets}
        if self.zero_stage is not None:
            from colofn.train.pipe_zero import zero_step

            return zero_step(self.pipe, self.opt, self.states, tokens, targets, loss_group=self.loss_group)
        result = self.pipe(self.params, tokens, targets)
        loss = pipe_loss.LossSum(result.losses, self.loss_group)  # on the wire during the update
        for s in self.mine:
            updates, self.opt_states[s] = self.opt.update(result.grads[s], self.opt_states[s], self.params[s])
            self.params[s] = jt.map(torch.Tensor.detach, optim.apply_updates(self.params[s], updates))
        return loss.wait()

    def export(self) -> tuple[Tree, AdamState]:
        from colofn.pipeline import gather_stages

        if self.zero_stage is not None:
            from colofn.train.pipe_zero import export_stages

            mine, count = export_stages(self.states)
        else:
            mine = {s: (self._global(self.params[s], s), self._global(self.opt_states[s].mu, s),
                        self._global(self.opt_states[s].nu, s)) for s in self.mine}
            count = self.opt_states[self.mine[0]].count
        stages = gather_stages(mine, mesh=self.mesh, axis_name="pp")
        params, mu, nu = (self.plan.unpack(_stages.merge_stages([st[i] for st in stages])) for i in range(3))
        return params, AdamState(count, mu, nu)

    def local_bytes(self) -> int:
        if self.zero_stage is not None:
            from colofn.train import pipe_zero

            return pipe_zero.local_bytes(self.states)
        return nbytes((self.params, self.opt_states))


def _share(par: Parallelized, logits: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """``nn._stages.stage_loss`` without its ``psum`` over dp: this rank's share ``nll / count`` of the microbatch's mean."""
    nll, _ = _stages.tp_regions.cross_entropy_sums(logits, t["targets"], par.plan.tp)
    return nll / t["count"].reshape(()).to(nll.dtype)


def trainer(cfg: Any, model: Any, mesh: Mesh, opt: optim.GradientTransformation, params: Tree, state: AdamState) -> Any:
    m = cfg.mesh_shape
    if cfg.pp > 1:
        return Pipelined(model, plan_of(model, m, cfg.sp, dp=True), mesh, opt, params, state, cfg.schedule, cfg.num_microbatches, zero_stage=cfg.zero)
    if cfg.zero is not None:
        return Zero(model, plan_of(model, m, cfg.sp, dp=False), mesh, opt, params, state, cfg.zero)
    return Dense(model, plan_of(model, m, cfg.sp, dp=True), mesh, opt, params, state)


class SingleDevice:
    """The unmodified model (its own forward, functionalized) and the same optimizer on one device, for ``--check``."""

    def __init__(self, model: Any, opt: optim.GradientTransformation, params: Tree, state: AdamState) -> None:
        self.apply, _ = functionalize(model)
        self.opt = opt
        self.params = jt.map(lambda t: t.detach().clone(), params)
        self.state = jt.map(lambda t: t.clone(), state)

    def loss(self, params: Tree, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.apply(params, input_ids=batch["tokens"], use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        p = jt.map(lambda t: t.detach().requires_grad_(), self.params)
        loss = self.loss(p, batch)
        grads = jt.unflatten(jt.structure(p), torch.autograd.grad(loss, jt.leaves(p)))
        updates, self.state = self.opt.update(grads, self.state, p)
        self.params = jt.map(torch.Tensor.detach, optim.apply_updates(p, updates))
        return float(loss.detach())


def initial_state(cfg: Any, model: Any, opt: optim.GradientTransformation) -> tuple[int, Tree, AdamState]:
    _, params = functionalize(model)
    params = jt.map(lambda t: t.detach().clone(), params)
    from colofn.train.loop import resume

    return resume(cfg, params, opt.init(params))


def eval_loss(model: Any, params: Tree, held_out: torch.Tensor, seq: int, key: torch.Tensor, batches: int = 4) -> float:
    """Mean loss of the trained ``params`` (global) on ``batches`` held-out windows, with the unmodified model."""
    checker = SingleDevice.__new__(SingleDevice)
    checker.apply, _ = functionalize(model)
    with torch.no_grad():
        losses = [float(checker.loss(params, data.sample_batch(random.fold_in(key, i), held_out, 8, seq))) for i in range(batches)]
    return sum(losses) / len(losses)


def describe(model: Any) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} ({n:,} params)"


def params_count(tree: Tree) -> int:
    return sum(t.numel() for t in to_state_dict(tree).values())
