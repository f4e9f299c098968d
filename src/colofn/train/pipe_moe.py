"""Mixture-of-experts stages for :class:`~colofn.train.trainers.PipelineTrainer`: the balancing loss travels with the activations.

The loss of a microbatch is ``cross-entropy + Σ_s aux_s``, where ``aux_s`` is
stage ``s``'s weighted load-balancing loss (:func:`colofn.parallel.stage_forward`).
A middle stage's ``aux_s`` never reaches the last stage's loss on its own, so
every stage but the last returns ``{"h": activations, "aux": aux_in + aux_s}``
(stage 0 starts the sum) and the last returns ``loss + aux_in + aux_s``. The
pipeline differentiates every floating leaf it sends, so the cotangent of each
``aux_s`` is the loss's own: ``1 / num_microbatches``, as on one device with
gradient accumulation. ``aux`` is a scalar, the same on every rank of the
data, expert and tensor axes (routing statistics are ``psum``'d over the
token axes), so it enters each stage invariant (``P()``) and costs 4 bytes
per microbatch and stage boundary in each direction.

Routing (capacity, balancing) covers the microbatch's tokens on every data
rank, so the step equals one device running the same microbatches, with
microbatch ``m`` made of the ``m``-th chunk of each data rank's rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from colofn.parallel.gpt import stage_forward
from colofn.partition_spec import P, PartitionSpec
from colofn.shard_map import per_device

if TYPE_CHECKING:
    from colofn.train.trainers import PipelineTrainer

__all__ = ["microbatch_rows", "moe_stage"]


def moe_stage(tr: PipelineTrainer, s: int, act: PartitionSpec, tok: PartitionSpec, last: bool) -> Any:
    """Stage ``s``'s function: its activations plus the running balancing loss (see the module docstring)."""
    mcfg, plan, layers, vary = tr.mcfg, tr.plan, tr.ranges[s], tr._vary
    x_spec: Any = tok if s == 0 else {"aux": P(), "h": act}

    def run(p: Any, x: Any, t: torch.Tensor | None = None) -> Any:
        h, carried = (x, None) if s == 0 else (x["h"], x["aux"])
        out, aux = stage_forward(vary(p), h, mcfg, plan, layers=layers, targets=t)
        total = aux if carried is None else carried + aux
        return out + total if last else {"aux": total, "h": out}

    if last:
        return per_device(lambda p, x, t: run(p, x, t), mesh=tr.mesh, in_specs=(tr.specs[s], x_spec, tok))
    return per_device(lambda p, x: run(p, x), mesh=tr.mesh, in_specs=(tr.specs[s], x_spec))


def microbatch_rows(batch_size: int, data_ranks: int, microbatches: int) -> list[torch.Tensor]:
    """The global rows of each microbatch: the ``m``-th chunk of every data rank's contiguous block.

    >>> [r.tolist() for r in microbatch_rows(8, 2, 2)]
    [[0, 1, 4, 5], [2, 3, 6, 7]]
    """
    rows = torch.arange(batch_size).reshape(data_ranks, microbatches, -1)
    return [rows[:, m].reshape(-1) for m in range(microbatches)]
