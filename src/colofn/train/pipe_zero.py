"""ZeRO over ``dp`` inside the stages of :class:`~colofn.train.trainers.PipelineTrainer`.

Each stage this rank holds is a :class:`colofn.zero.ZeroState` of the stage's
parameters over ``dp`` (stages 0, 1, 2). A step:

1. the pipeline runs every microbatch with the stage's full parameters
   (:func:`colofn.zero.stage_params`), marked *varying* along ``dp`` inside
   the stage (:func:`varying`), so no backward sums their gradients over
   ``dp``: each rank accumulates the gradients of its own tokens' share of
   the loss (the loss is the ``psum``'d mean over all of them);
2. :func:`colofn.zero.apply_gradients` sums the accumulated gradients over
   ``dp`` once (a reduce-scatter for stages 1-2, an all-reduce for 0),
   updates this rank's shard and all-gathers the parameters.

The sum over ``dp`` of each rank's gradient is the gradient of the mean loss,
so the step equals one device's (``property_tests/test_pipe_zero_props.py``).
Per step and stage the ``dp`` traffic is ``2Ψ(n-1)/n`` (``Ψ`` the stage's
padded bucket bytes), instead of that per *microbatch* for plain dp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from colofn import _vma, zero
from colofn import tree as jt
from colofn.optim.adam import AdamState
from colofn.parallel import stage_slice
from colofn.sharding import from_local_block, local_block

if TYPE_CHECKING:
    from colofn.train.trainers import PipelineTrainer

Tree = Any


def varying(params: Tree, axis: str) -> Tree:
    """``params`` (a stage's, inside its ``per_device`` body) marked varying along ``axis``; no data moves.

    Each rank then differentiates only its own tokens' share of the loss, and
    the sum over ``axis`` is left to ZeRO.
    """
    ctx = _vma.current()
    assert ctx is not None, "varying() runs inside a per_device stage"
    # The tensors are per_device's own entries (never the caller's), so tagging them in place is safe.
    return jt.map(lambda t: ctx.set_vma(t, ctx.vma(t) | {axis}), params)


def stage_states(tr: PipelineTrainer, params: Tree, opt_state: AdamState, stage: int) -> dict[int, zero.ZeroState]:
    """A ZeRO state over ``dp`` for each stage of this rank, from the global params and AdamW state."""

    def placed(tree: Tree, s: int) -> Tree:
        sliced = stage_slice(tree, tr.mcfg, tr.ranges[s])
        return jt.map(lambda x, spec: from_local_block(local_block(x, spec, tr.mesh).clone(), spec, tr.mesh), sliced, tr.specs[s])

    return {
        s: zero.init(placed(params, s), tr.opt, tr.mesh, axis="dp", stage=stage,
                     opt_state=AdamState(opt_state.count, placed(opt_state.mu, s), placed(opt_state.nu, s)))
        for s in tr.mine
    }


def zero_step(tr: PipelineTrainer, tokens: torch.Tensor, targets: torch.Tensor) -> float:
    """One step: the pipeline's accumulated gradients, then each stage's ZeRO update (in stage order on every rank)."""
    params = {s: zero.stage_params(tr.states[s]) for s in tr.mine}
    result = tr.pipe(params, tokens, targets)
    del params
    for s in tr.mine:
        tr.states[s], _ = zero.apply_gradients(tr.opt, tr.states[s], result.grads[s])
    return float(result.loss)


def export_stages(tr: PipelineTrainer) -> tuple[dict[int, tuple[Tree, Tree, Tree]], torch.Tensor]:
    """``({stage: (params, mu, nu)}, count)``: this rank's stages as global trees (collective over ``dp`` and ``tp``)."""
    mine = {}
    count = None
    for s in tr.mine:
        out = zero.export_state(tr.states[s])
        opt = out["opt_state"]
        mine[s] = (out["params"], opt.mu, opt.nu)
        count = opt.count
    assert count is not None
    return mine, count
