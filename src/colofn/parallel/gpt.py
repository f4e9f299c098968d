"""``colofn.models.gpt`` under a :class:`Plan`: per-device pieces, and the loss as one ``shard_map``.

Per-device functions (call them inside ``shard_map``; every tensor is this
rank's block, laid out by :func:`~colofn.parallel.param_specs` and
:func:`~colofn.parallel.batch_specs`) reuse the single-device model's pieces on
local shards and add each strategy's communication:

* :func:`embed`: tokens -> the residual stream in the plan's layout
  (``[b, s, d]``, the sequence split over :attr:`Plan.seq_axis` if any);
* :func:`block` / :func:`layers_forward`: transformer blocks;
* :func:`head_sums`: final norm, logits and the summed token losses;
* :func:`local_loss`: all of it, the loss of the step (invariant on every rank);
* :func:`stage_forward`: what a pipeline stage holding ``layers`` runs.

Global entry points: :func:`make_loss` (``shard_map`` with the right specs)
and :func:`shard_params`.

>>> import colofn, torch
>>> from colofn import random
>>> from colofn.models import gpt
>>> from colofn.parallel import Plan, make_loss, shard_params
>>> cfg = gpt.config("tiny", n_layers=1)
>>> params = gpt.init(random.key(0), cfg)
>>> t = random.randint(random.key(1), (4, 17), 0, cfg.vocab_size)
>>> batch = {"tokens": t[:, :-1], "targets": t[:, 1:]}
>>> def program():
...     mesh = colofn.Mesh((2, 2), ("dp", "tp"))
...     loss = make_loss(cfg, Plan(dp="dp", tp="tp"), mesh)
...     return float(loss(shard_params(params, cfg, Plan(dp="dp", tp="tp"), mesh), batch).to_local())
>>> got = colofn.launch(program, world_size=4)
>>> abs(got[0] - float(gpt.loss(params, batch, cfg))) < 1e-5
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from colofn import _comm
from colofn import tree as jt
from colofn._reducer import LeafSums
from colofn._vma import vary_over
from colofn.collectives import psum
from colofn.errors import TreeError
from colofn.mesh import Mesh, get_mesh
from colofn.models import gpt
from colofn.parallel import ep, sp, tp, tp2d, tp3d
from colofn.parallel.plan import Plan, check_batch, check_plan
from colofn.parallel.specs import batch_specs, param_specs
from colofn.parallel.tp import vocab
from colofn.partition_spec import P, PartitionSpec
from colofn.shard_map import shard_map
from colofn.sharding import device_put, from_local_block, local_block

__all__ = [
    "block",
    "embed",
    "head_sums",
    "layers_forward",
    "local_loss",
    "make_local_value_and_grad",
    "make_loss",
    "make_value_and_grad",
    "relayout",
    "shard_params",
    "stage_forward",
]

Params = dict[str, Any]


def embed(params: Params, tokens: torch.Tensor, config: gpt.GPTConfig, plan: Plan) -> torch.Tensor:
    """Token (+ learned position) embeddings of this rank's ``tokens`` in the plan's residual layout.

    ``tokens`` are in :attr:`Plan.seq_layout` (under ring attention, zig-zag:
    pass the :func:`~colofn.parallel.batch_specs` block through :func:`relayout`).

    With ``tp`` the table is split by vocabulary: partial embeddings summed
    over ``tp`` (reduce-scattered into sequence shards under Megatron-SP).
    Under a 2D / 2.5D plan, :func:`colofn.parallel.tp2d.embed`.
    """
    if plan.tp_mode in tp2d.GRID_MODES:
        return tp2d.embed(params, tokens, config, plan)
    if config.pos == "learned":  # the table is sliced below: vary it first, so its gradient sum is bucketed
        params = {**params, "pos": vary_over(params["pos"], plan.token_axes)}
    if plan.tp is None:
        positions = sp.local_positions(tokens.shape[1], plan.seq_axis, tokens.device, plan.seq_layout)
        return gpt.embed(params, tokens, config, positions=positions)
    x = tp.leave(tp.embed_partial(params["tok"], tokens, plan.tp), plan)
    if config.pos == "learned":
        x = x + params["pos"][sp.local_positions(x.shape[1], plan.seq_axis, x.device, plan.seq_layout)]
    return x


def relayout(tokens: torch.Tensor, plan: Plan) -> torch.Tensor:
    """This rank's contiguous ``[..., b, s]`` block of token ids (or targets) -> the plan's :attr:`~Plan.seq_layout`.

    Ring attention holds the zig-zag layout (:func:`colofn.parallel.sp.to_zigzag`:
    one tiled all-gather of the ids over ``sp``); the residual stream stays in it
    from the embedding to the loss, a sum over tokens that ignores their order.
    Other plans return ``tokens`` unchanged.
    """
    if plan.seq_layout == "zigzag" and plan.sp_axis is not None:
        return sp.to_zigzag(tokens, plan.sp_axis, dim=-1)
    return tokens


def _attention(params: Params, h: torch.Tensor, config: gpt.GPTConfig, plan: Plan) -> torch.Tensor:
    axis = plan.sp_axis
    if plan.sp in ("ulysses", "ring") and axis is not None:
        positions = sp.local_positions(h.shape[1], axis, h.device, plan.seq_layout)
        if plan.sp == "ring":
            return sp.ring.attention(params, h, config, axis, positions, plan.seq_layout)
        return sp.ulysses.attention(params, h, config, axis, positions)
    return gpt.attention(params, h, config)  # whole sequences (Megatron-SP gathered them)


def block(
    layer: Params, x: torch.Tensor, config: gpt.GPTConfig, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm block on this rank's residual stream ``x``; returns ``(x, unweighted aux loss)``."""
    if plan.tp_mode in tp2d.GRID_MODES:
        return tp2d.block(layer, x, config, plan)
    h = tp.enter(gpt.norm(layer["norm1"], x, config), plan)
    x = x + tp.leave(_attention(layer["attn"], h, config, plan), plan)
    h = tp.enter(gpt.norm(layer["norm2"], x, config), plan)
    if "moe" in layer:
        y, aux = ep.moe(layer["moe"], h, config, plan)
    else:
        y, aux = gpt.mlp(layer["mlp"], h, config), torch.zeros((), device=x.device)
    return x + tp.leave(y, plan), aux


def layers_forward(
    layers: list[Params],
    x: torch.Tensor,
    config: gpt.GPTConfig,
    plan: Plan,
    *,
    first_layer: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``first_layer, first_layer + 1, ...`` of the model; returns ``(x, summed unweighted aux loss)``.

    ``first_layer`` is the model index of ``layers[0]``; each layer's kind
    (dense or MoE) is checked against ``config`` so a wrong slice fails clearly.
    """
    aux = torch.zeros((), device=x.device)
    for i, layer in enumerate(layers):
        want = "moe" if config.is_moe(first_layer + i) else "mlp"
        if want not in layer:
            raise TreeError(
                f"layers_forward: layers[{i}] (model layer {first_layer + i}) has no {want!r} entry "
                f"(it has {sorted(layer)}); is first_layer={first_layer} the index of layers[0]?"
            )
        x, layer_aux = block(layer, x, config, plan)
        aux = aux + layer_aux
    return x, aux


def head_sums(
    params: Params, x: torch.Tensor, targets: torch.Tensor, config: gpt.GPTConfig, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of token losses, token count)`` of this rank's tokens, invariant along ``tp``.

    ``params`` needs ``final_norm`` and ``head`` (or ``embed.tok`` when tied).
    With ``tp`` the logits stay split by vocabulary (vocabulary-parallel loss);
    under a 2D / 2.5D plan, :func:`colofn.parallel.tp2d.head_sums`.
    """
    if plan.tp_mode in tp2d.GRID_MODES:
        return tp2d.head_sums(params, x, targets, config, plan)
    h = tp.enter(gpt.norm(params["final_norm"], x, config), plan)
    if config.tie_embeddings:  # vary the table, not its transpose, so its gradient sum is bucketed
        params = {**params, "embed": {**params["embed"], "tok": vary_over(params["embed"]["tok"], plan.token_axes)}}
    return tp.cross_entropy_sums(h @ gpt.head_weight(params, config), targets, plan.tp)


def _mean(nll: torch.Tensor, count: torch.Tensor, plan: Plan) -> torch.Tensor:
    if plan.token_axes:
        nll, count = psum(torch.stack([nll, count]), plan.token_axes).unbind(0)
    return nll / count


def local_loss(
    params: Params, batch: Mapping[str, torch.Tensor], config: gpt.GPTConfig, plan: Plan
) -> torch.Tensor:
    """The step's loss on this rank's blocks, equal to ``gpt.loss`` of the whole batch (invariant on every rank).

    The blocks are the contiguous ones of :func:`~colofn.parallel.batch_specs`;
    under ring attention the tokens and targets are first re-laid out zig-zag
    (:func:`relayout`).
    """
    if plan.tp_mode == "3d":
        return tp3d.local_loss(params, batch, config, plan)
    tokens, targets = relayout(torch.stack([batch["tokens"], batch["targets"]]), plan).unbind(0)
    x = embed(params["embed"], tokens, config, plan)
    x, aux = layers_forward(params["layers"], x, config, plan)
    nll, count = head_sums(params, x, targets, config, plan)
    return _mean(nll, count, plan) + config.aux_loss_coef * aux


def stage_forward(
    params: Params,
    inputs: torch.Tensor,
    config: gpt.GPTConfig,
    plan: Plan,
    *,
    layers: range,
    targets: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device forward of a pipeline stage holding model layers ``layers`` (a contiguous ``range``).

    Contract:
      * ``params``: ``{"layers": params["layers"][layers.start:layers.stop]}``,
        plus ``"embed"`` on the first stage (``layers.start == 0``), plus
        ``"final_norm"`` and ``"head"`` (or ``"embed"`` with ``"tok"`` when tied)
        on the last (``layers.stop == config.n_layers``). Shard them with
        :func:`~colofn.parallel.layer_specs` / :func:`~colofn.parallel.param_specs`.
      * ``inputs``: this rank's token block on the first stage (contiguous, as
        :func:`~colofn.parallel.batch_specs` lays it out), else the
        previous stage's activations (the residual stream in the plan's layout).
      * Returns ``(out, aux)``: the activations for the next stage, or on the
        last stage the mean cross-entropy of the microbatch (needs ``targets``);
        ``aux`` is the stage's ``config.aux_loss_coef * load-balancing loss``.
        The microbatch's loss is the last stage's ``out`` plus every stage's ``aux``.
      * ``count`` (last stage, optional): the microbatch's token count over
        all of :attr:`Plan.token_axes` (a 0-d tensor, the same on every rank).
        Given, the last stage returns this rank's *share* of the mean,
        ``nll / count``, with no ``psum`` in the forward: the shares sum to
        the mean over the token axes, and each has the gradient this rank's
        part of the mean has (the same ``1 / count`` cotangent the psum's
        transpose gives), so a caller that reports the loss sums the shares
        itself, when it suits it (``colofn train``'s pipeline trainer: one
        asynchronous all-reduce per step, after the optimizer).

    >>> import colofn, torch
    >>> from colofn import random
    >>> from colofn.models import gpt
    >>> from colofn import P
    >>> from colofn.parallel import Plan, param_specs, stage_forward
    >>> cfg, plan = gpt.config("tiny", n_layers=1), Plan(dp="dp")
    >>> params, t = gpt.init(random.key(0), cfg), random.randint(random.key(1), (4, 17), 0, cfg.vocab_size)
    >>> tokens, targets = t[:, :-1], t[:, 1:]
    >>> def program():
    ...     def shares(p, x, y, n):  # this rank's share of the mean: no communication in the forward
    ...         return stage_forward(p, x, cfg, plan, layers=range(1), targets=y, count=n)[0].reshape(1)
    ...     f = colofn.shard_map(shares, mesh=colofn.Mesh((2,), ("dp",)),
    ...                          in_specs=(param_specs(cfg, plan), P("dp"), P("dp"), P()), out_specs=P("dp"))
    ...     return float(f(params, tokens, targets, torch.tensor(targets.numel())).full_tensor().sum())
    >>> abs(colofn.launch(program, world_size=2)[0] - float(gpt.loss(params, {"tokens": tokens, "targets": targets}, cfg))) < 1e-5
    True
    """
    first, last = layers.start == 0, layers.stop == config.n_layers
    x = embed(params["embed"], relayout(inputs, plan), config, plan) if first else inputs
    x, aux = layers_forward(params["layers"], x, config, plan, first_layer=layers.start)
    aux = config.aux_loss_coef * aux
    if not last:
        return x, aux
    if targets is None:
        raise TypeError("stage_forward: the last stage needs targets=... to compute the loss")
    nll, n = head_sums(params, x, relayout(targets, plan), config, plan)
    if count is not None:
        return nll / count.to(nll.dtype), aux
    return _mean(nll, n, plan), aux


def make_loss(
    config: gpt.GPTConfig, plan: Plan, mesh: Mesh | None = None
) -> Callable[[Params, Mapping[str, torch.Tensor]], Any]:
    """``loss(params, batch) -> DTensor`` (a replicated scalar): ``gpt.loss`` run under ``plan`` on ``mesh``.

    ``params`` are global tensors or DTensors (:func:`shard_params`); ``batch``
    is ``{"tokens", "targets"}`` ``[batch, seq]``, global tensors. The plan is
    checked against the config and mesh now, the batch at each call, both
    before any communication. Gradients: ``torch.autograd.grad(loss.to_local(), ...)``
    (DTensor parameters get DTensor gradients with their sharding).
    """
    m = get_mesh(mesh, "make_loss")
    check_plan(plan, config, m.shape)

    def per_device(params: Params, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return local_loss(params, batch, config, plan)

    mapped = shard_map(
        per_device, mesh=m, in_specs=(param_specs(config, plan), batch_specs(plan)), out_specs=P()
    )

    def loss(params: Params, batch: Mapping[str, torch.Tensor]) -> Any:
        _check_batch(batch, config, plan, m)
        return mapped(params, {"tokens": batch["tokens"], "targets": batch["targets"]})

    return loss


def make_value_and_grad(
    config: gpt.GPTConfig, plan: Plan, mesh: Mesh | None = None
) -> Callable[[Params, Mapping[str, torch.Tensor]], tuple[Any, Params]]:
    """``value_and_grad(params, batch) -> (loss, grads)``: :func:`make_loss` and ``torch.autograd.grad``.

    ``grads`` has the structure of ``params``; for DTensor parameters
    (:func:`shard_params`) each gradient is a DTensor with its parameter's
    sharding, ready for ``colofn.optim`` or ZeRO. ``params`` need not require grad.
    """
    if plan.token_axes and plan.tp_mode != "3d":  # 3d: its own local_loss, by make_loss
        return _split_value_and_grad(config, plan, get_mesh(mesh, "make_value_and_grad"))
    loss_fn = make_loss(config, plan, mesh)

    def value_and_grad(params: Params, batch: Mapping[str, torch.Tensor]) -> tuple[Any, Params]:
        params = jt.map(lambda p: p if p.requires_grad else p.detach().requires_grad_(), params)
        loss = loss_fn(params, batch)
        grads = torch.autograd.grad(loss.to_local(), jt.leaves(params))
        return loss, jt.unflatten(jt.structure(params), grads)

    return value_and_grad


def _split_value_and_grad(
    config: gpt.GPTConfig, plan: Plan, m: Mesh
) -> Callable[[Params, Mapping[str, torch.Tensor]], tuple[Any, Params]]:
    """:func:`make_value_and_grad` without a rendezvous in the forward, for plans that split the tokens.

    :func:`local_loss` sums ``[nll, count]`` over the token axes in the forward:
    every rank waits there for the slowest, once more than DDP does. Here the
    global token count comes from the (global) batch, so each rank's part of the
    mean, ``nll / count``, is differentiated locally (its cotangent is the same
    ``1 / count`` the psum's transpose gives, and the parameters' sums over the
    token axes are the usual overlapped gradient buckets), while the same
    ``[nll, count]`` all-reduce runs asynchronously over the backward and is
    waited for only after it, to report the same loss value, computed the same way.
    """
    axes = plan.token_axes
    specs = dict(batch_specs(plan), count=P())

    def parts(params: Params, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _parts(params, batch, config, plan)

    mapped = shard_map(parts, mesh=m, in_specs=(param_specs(config, plan), specs), out_specs=(P(axes), P(), P(axes)))

    def value_and_grad(params: Params, batch: Mapping[str, torch.Tensor]) -> tuple[Any, Params]:
        _check_batch(batch, config, plan, m)
        params = jt.map(lambda p: p if p.requires_grad else p.detach().requires_grad_(), params)
        count = (batch["targets"] != vocab.IGNORE).sum()
        out: Any = mapped(params, {"tokens": batch["tokens"], "targets": batch["targets"], "count": count})
        share, aux, stats = out  # DTensors
        sums = _comm.AsyncAllReduce(stats.to_local().reshape(2), _comm.axis_group(m, axes))
        aux = aux.to_local()
        grads = torch.autograd.grad(share.to_local().sum() + aux, jt.leaves(params))
        nll, total = sums.wait().unbind(0)
        loss = from_local_block(nll / total + aux.detach(), P(), m)
        return loss, jt.unflatten(jt.structure(params), grads)

    return value_and_grad


def _check_batch(batch: Any, config: gpt.GPTConfig, plan: Plan, m: Mesh) -> None:
    if not isinstance(batch, Mapping) or "tokens" not in batch or "targets" not in batch:
        raise TreeError('the batch must be {"tokens": [batch, seq], "targets": [batch, seq]}')
    check_batch(plan, m.shape, tuple(batch["tokens"].shape), config.seq_len)


def _parts(
    params: Params, batch: Mapping[str, torch.Tensor], config: gpt.GPTConfig, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per device, for plans that split the tokens: ``(nll / global count, aux, [nll, count])``.

    :func:`local_loss` without its ``psum``: ``batch["count"]`` is the global
    token count, so the first part's gradient is this rank's share of the mean's.
    """
    tokens, targets = relayout(torch.stack([batch["tokens"], batch["targets"]]), plan).unbind(0)  # as local_loss
    x = embed(params["embed"], tokens, config, plan)
    x, aux = layers_forward(params["layers"], x, config, plan)
    nll, count = head_sums(params, x, targets, config, plan)
    share = nll / batch["count"].to(nll.dtype)
    return share.reshape(1), config.aux_loss_coef * aux, torch.stack([nll, count]).detach().reshape(1, 2)


def splits_only_the_batch(config: gpt.GPTConfig, plan: Plan) -> bool:
    """Whether ``plan`` splits nothing of ``config`` but the tokens over data axes (no tp, sp, ep, experts or grid).

    Then a per-device body of the model (a whole step, or a pipeline stage's)
    calls no collective and every value in it varies along the data axes alike:
    varying/invariant tracking could only confirm it, op by op, so the body can
    run untracked (``check_vma=False``) with the gradients' sums over the data
    axes done at the parameters, as JAX's rule for ``check_vma=False`` puts them
    (:class:`~colofn._reducer.LeafSums` in the dense step, the pipeline's
    ``grad_sum_axes`` in a stage).
    """
    return bool(plan.token_axes) and (plan.tp is None and plan.sp == "none" and plan.ep is None
                                      and plan.tp_mode == "1d" and not plan.tp_grid and not config.n_experts)


def _untracked_dp(config: gpt.GPTConfig, plan: Plan, pspecs: Params) -> bool:
    """Plain data parallelism in one step: :func:`splits_only_the_batch`, no pipeline, every parameter replicated."""
    replicated = all(len(s.axes) == 0 for s in jt.leaves(pspecs, is_leaf=lambda x: isinstance(x, PartitionSpec)))
    return splits_only_the_batch(config, plan) and plan.pp is None and replicated


def make_local_value_and_grad(
    config: gpt.GPTConfig, plan: Plan, mesh: Mesh | None = None, *, grads_as_bucket_views: bool = False
) -> Callable[[Params, Mapping[str, torch.Tensor]], tuple[torch.Tensor, Params]]:
    """:func:`make_value_and_grad` on this rank's blocks: no DTensor in or out.

    ``value_and_grad(blocks, batch) -> (loss, grads)``: ``blocks`` are this
    rank's blocks of the parameters as :func:`shard_params` lays them out (its
    DTensors' ``to_local()``), plain tensors; ``batch`` is the global batch, as
    for :func:`make_value_and_grad`. ``loss`` is a 0-d tensor, the same on every
    rank, and ``grads`` the blocks of :func:`make_value_and_grad`'s gradients:
    the same numbers (the same ops, run by :func:`colofn.per_device`, the body
    of ``shard_map``), without wrapping ~50 parameters and their gradients as
    DTensors on every call. For a trainer that keeps its state as local blocks
    between steps (``colofn.train``'s dense trainer does); checkpoints and
    exports make DTensors of them with :func:`colofn.sharding.from_local_block`.

    A plan that is plain data parallelism (every parameter replicated, only the
    batch split) runs its body untracked (``check_vma=False``) and sums the
    gradients over the data axes in DDP-style buckets launched from gradient
    hooks during the backward. There, ``grads_as_bucket_views=True`` is DDP's
    ``gradient_as_bucket_view``: when the same leaf tensors (blocks with
    ``requires_grad``) come every call, the buckets and hooks are made once and
    the returned gradients are views of the buckets, overwritten by the next
    call; for a trainer that is done with them before its next step.

    >>> import colofn
    >>> from colofn import random
    >>> from colofn.models import gpt
    >>> from colofn.parallel import Plan, make_local_value_and_grad, shard_params
    >>> cfg, plan = gpt.config("tiny", n_layers=1), Plan(dp="dp", tp="tp")
    >>> params, t = gpt.init(random.key(0), cfg), random.randint(random.key(1), (4, 17), 0, cfg.vocab_size)
    >>> batch = {"tokens": t[:, :-1], "targets": t[:, 1:]}
    >>> def program():
    ...     mesh = colofn.Mesh((2, 2), ("dp", "tp"))
    ...     blocks = colofn.tree.map(lambda d: d.to_local(), shard_params(params, cfg, plan, mesh))
    ...     loss, grads = make_local_value_and_grad(cfg, plan, mesh)(blocks, batch)
    ...     return float(loss), tuple(grads["layers"][0]["mlp"]["w1"].shape)
    >>> got = colofn.launch(program, world_size=4)
    >>> abs(got[0][0] - float(gpt.loss(params, batch, cfg))) < 1e-5, got[0][1]  # w1 [32, 128], split over tp
    (True, (32, 64))
    """
    from colofn.shard_map import per_device

    m = get_mesh(mesh, "make_local_value_and_grad")
    check_plan(plan, config, m.shape)
    axes = plan.token_axes
    bspecs = batch_specs(plan)

    def parts(params: Params, batch: Mapping[str, torch.Tensor]) -> Any:
        return _parts(params, batch, config, plan) if axes else local_loss(params, batch, config, plan)

    pspecs = param_specs(config, plan)
    untracked = _untracked_dp(config, plan, pspecs)
    body = per_device(parts, mesh=m, in_specs=(pspecs, dict(bspecs, count=P()) if axes else bspecs), check_vma=not untracked)
    sums = LeafSums(_comm.axis_group(m, axes), reuse=grads_as_bucket_views) if untracked else None

    def value_and_grad(blocks: Params, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Params]:
        _check_batch(batch, config, plan, m)
        leaves, treedef = jt.flatten(blocks)
        leaves = [p if p.requires_grad else p.detach().requires_grad_() for p in leaves]
        mine = {k: local_block(batch[k], bspecs[k], m) for k in ("tokens", "targets")}
        if not axes:
            loss = body(jt.unflatten(treedef, leaves), mine)
            return loss.detach(), jt.unflatten(treedef, torch.autograd.grad(loss, leaves))
        mine["count"] = (batch["targets"] != vocab.IGNORE).sum()
        share, aux, stats = body(jt.unflatten(treedef, leaves), mine)
        if sums is not None:  # replicated params, per-rank data, no collective: DDP's bucketed sums, no tracking;
            # the loss statistics ride in the last bucket (one rendezvous fewer per step)
            grads, summed = sums.grad_and_sum(share.sum() + aux, leaves, stats.reshape(2))
            assert summed is not None
        else:
            loss_sums = _comm.AsyncAllReduce(stats.reshape(2), _comm.axis_group(m, axes))  # as make_value_and_grad
            grads = list(torch.autograd.grad(share.sum() + aux, leaves))
            summed = loss_sums.wait()
        nll, total = summed.unbind(0)
        return nll / total + aux.detach(), jt.unflatten(treedef, grads)

    return value_and_grad


def shard_params(
    params: Params, config: gpt.GPTConfig, plan: Plan, mesh: Mesh | None = None
) -> Params:
    """``device_put`` the parameters by :func:`~colofn.parallel.param_specs` (DTensors, each rank its shards)."""
    m = get_mesh(mesh, "shard_params")
    check_plan(plan, config, m.shape)
    return device_put(params, param_specs(config, plan), mesh=m)
