"""The pipeline trainer's loss without a rendezvous in the forward: shares of the mean, summed once per step.

A last stage that takes the mean cross-entropy of its microbatch over the token
axes (``dp``, and the Ulysses/ring ``sp``) ``psum``'s ``[nll, count]`` in the
forward: one blocking rendezvous of the data ranks per microbatch, in the middle
of the schedule, where ``Schedule1F1B`` + DDP has none (each of its data ranks
takes its own mean). Here, as in the dense trainer
(:func:`colofn.parallel.make_local_value_and_grad`):

* each microbatch's global token count comes from the global batch the
  trainer already holds (:func:`microbatch_counts`; no communication) and
  rides with the targets (``{"count", "targets"}``, both cut by microbatch), so the last stage returns this
  rank's share ``nll / count`` (:func:`colofn.parallel.stage_forward` with
  ``count=``). Its gradient is this rank's part of the mean's, the same
  ``1 / count`` cotangent the psum's transpose gave: the same gradients;
* the step's shares (one per microbatch, shared along ``pp`` by the pipeline
  as its losses) are summed over the token axes by one asynchronous
  all-reduce (:class:`LossSum`), started when the pipeline returns and waited
  for after the optimizer. The reported loss is the mean over microbatches of
  those sums: the same value as before up to float reassociation
  (``Σ_r nll_r / count`` rather than ``(Σ_r nll_r) / count``).
"""

from __future__ import annotations

import math

import torch

from colofn import _comm
from colofn.mesh import Mesh
from colofn.parallel.tp import vocab
from colofn.partition_spec import PartitionSpec, dim_axes

__all__ = ["LossSum", "data_blocks", "loss_group", "microbatch_counts"]


def data_blocks(spec: PartitionSpec, mesh: Mesh) -> int:
    """How many blocks ``spec`` cuts a batch's dim 0 into on ``mesh`` (1 where it is not split)."""
    return math.prod(mesh.shape[a] for a in dim_axes(spec[0])) if len(spec) else 1


def microbatch_counts(targets: torch.Tensor, blocks: int, microbatches: int) -> torch.Tensor:
    """``[microbatches]``: each microbatch's token count over all ranks, from the *global* ``targets`` ``[batch, seq]``.

    The batch's dim 0 is cut into ``blocks`` contiguous blocks (:func:`data_blocks`
    of its :func:`~colofn.parallel.batch_specs` entry), and the pipeline cuts each
    rank's block into ``microbatches`` contiguous chunks, so microbatch ``m`` is
    chunk ``m`` of every block (the sequence dim, however split or laid out,
    only moves tokens between ranks of the same microbatch).

    >>> t = torch.tensor([[1, 2], [3, -100], [5, 6], [-100, -100]])  # 4 rows; -100 is not a token
    >>> microbatch_counts(t, 1, 2).tolist(), microbatch_counts(t, 2, 2).tolist()  # [rows 0-1, 2-3]; [rows 0+2, 1+3]
    ([3, 2], [4, 1])
    """
    kept = (targets != vocab.IGNORE).reshape(blocks, microbatches, -1)
    return kept.sum(dim=(0, 2))


class LossSum:
    """The step's loss shares (``[microbatches]``, every rank) summed over ``group`` asynchronously.

    Start it as soon as the pipeline returns; :meth:`wait` (after the optimizer)
    gives the step's loss, the mean over microbatches of the summed shares.
    ``group`` is ``None`` where the tokens are not split (the shares are the
    losses): no communication.
    """

    def __init__(self, shares: torch.Tensor, group: _comm.AxisGroup | None) -> None:
        self._sum = _comm.AsyncAllReduce(shares, group) if group is not None else None
        self._shares = shares

    def wait(self) -> float:
        return float((self._sum.wait() if self._sum is not None else self._shares).mean())


def loss_group(mesh: Mesh, axes: tuple[str, ...]) -> _comm.AxisGroup | None:
    """The group the shares are summed over (built now: creating a group is collective over the world)."""
    return _comm.axis_group(mesh, axes) if axes else None
