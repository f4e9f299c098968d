"""ZeRO over ``dp`` inside pipeline stages (``PipelineTrainer`` and the ``--hf`` ``Pipelined`` trainer).

Each stage this rank holds is a :class:`colofn.zero.ZeroState` of the stage's
parameters over ``dp`` (stages 0, 1, 2). A step:

1. the pipeline runs every microbatch with the stage's full parameters
   (:func:`colofn.zero.stage_params`), marked *varying* along ``dp`` inside
   the stage (:func:`varying`), so no backward sums their gradients over
   ``dp``: each rank accumulates the gradients of its own tokens' share of
   the loss (its share of the mean over all of them, :mod:`colofn.train.pipe_loss`);
2. :func:`colofn.zero.apply_gradients` sums the accumulated gradients over
   ``dp`` once (a reduce-scatter for stages 1-2, an all-reduce for 0),
   updates this rank's shard and all-gathers the parameters.

The sum over ``dp`` of each rank's gradient is the gradient of the mean loss,
so the step equals one device's (``property_tests/test_pipe_zero_props.py``).
Per step and stage the ``dp`` traffic is ``2Ψ(n-1)/n`` (``Ψ`` the stage's
padded bucket bytes), instead of that per *microbatch* for plain dp.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from colofn import _comm, _vma, zero
from colofn import tree as jt
from colofn.optim.adam import AdamState
from colofn.optim.base import GradientTransformation
from colofn.sharding import from_local_block, local_block

if TYPE_CHECKING:
    from colofn.mesh import Mesh
    from colofn.pipeline import Pipeline

Tree = Any


def varying(params: Tree, axis: str | tuple[str, ...]) -> Tree:
    """``params`` (a stage's, inside its ``per_device`` body) marked varying along ``axis`` (one or several); no data moves.

    Each rank then differentiates only its own tokens' share of the loss, and
    the sum over the axes is left to ZeRO. A leaf already split over one of
    them (an expert weight over ``ep``) is varying along it anyway.
    """
    ctx = _vma.current()
    assert ctx is not None, "varying() runs inside a per_device stage"
    axes = {axis} if isinstance(axis, str) else set(axis)
    # The tensors are per_device's own entries (never the caller's), so tagging them in place is safe.
    return jt.map(lambda t: ctx.set_vma(t, ctx.vma(t) | axes), params)


def stage_states(opt: GradientTransformation, mesh: Mesh, stage: int, specs: Mapping[int, Tree] | Sequence[Tree],
                 per_stage: dict[int, tuple[Tree, Tree, Tree]], count: torch.Tensor,
                 axis: str | tuple[str, ...] = "dp") -> dict[int, zero.ZeroState]:
    """A ZeRO state over ``axis`` for each stage of this rank, from its global ``(params, mu, nu)`` and AdamW's ``count``.

    ``specs[s]`` lays stage ``s``'s params out over the model axes (``tp``, ``ep``): a dict or a list by stage.
    ``axis`` is the data axes (:func:`colofn.parallel.data_axes.zero_axes`): with ``("dp", "ep")``
    dense weights shard over ``dp x ep`` and expert weights over ``dp``.
    """

    def placed(tree: Tree, s: int) -> Tree:
        return jt.map(lambda x, spec: from_local_block(local_block(x, spec, mesh).clone(), spec, mesh), tree, specs[s])

    return {
        s: zero.init(placed(p, s), opt, mesh, axis=axis, stage=stage, opt_state=AdamState(count, placed(mu, s), placed(nu, s)))
        for s, (p, mu, nu) in per_stage.items()
    }


def zero_step(pipe: Pipeline, opt: GradientTransformation, states: dict[int, zero.ZeroState], tokens: torch.Tensor,
              targets: Any, loss_group: _comm.AxisGroup | None = None) -> float:
    """One step: the pipeline's accumulated gradients, then each stage's ZeRO update (in stage order on every rank).

    Updates ``states`` in place; returns the step's loss. With ``loss_group``
    the last stage's losses are this rank's shares of each microbatch's mean
    (:mod:`colofn.train.pipe_loss`), summed over the group asynchronously
    during the updates.
    """
    from colofn.train.pipe_loss import LossSum

    params = {s: zero.stage_params(z) for s, z in states.items()}
    result = pipe(params, tokens, targets)
    del params
    loss = LossSum(result.losses, loss_group)
    for s in sorted(states):
        states[s], _ = zero.apply_gradients(opt, states[s], result.grads[s])
    return loss.wait()


def export_stages(states: dict[int, zero.ZeroState]) -> tuple[dict[int, tuple[Tree, Tree, Tree]], torch.Tensor]:
    """``({stage: (params, mu, nu)}, count)``: this rank's stages as global trees (collective over ``dp`` and ``tp``)."""
    mine = {}
    count = None
    for s in sorted(states):
        out = zero.export_state(states[s])
        opt = out["opt_state"]
        mine[s] = (out["params"], opt.mu, opt.nu)
        count = opt.count
    assert count is not None
    return mine, count


def local_bytes(states: dict[int, zero.ZeroState]) -> int:
    """Bytes of params, master weights and optimizer state this rank holds for its stages."""
    from colofn.train.trainers import nbytes

    return sum(nbytes((z.params, z.master, z.opt_state)) for z in states.values())
