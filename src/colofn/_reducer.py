"""The sum of leaves' gradients over data axes, bucketed and started during the backward: DDP's reducer.

For a body that needs no varying/invariant tracking (``check_vma=False``, as
JAX: "the backward sums cotangents of replicated inputs over the axes they are
replicated on"), this is where those sums happen. :meth:`LeafSums.grad` is
``torch.autograd.grad(output, leaves)`` whose leaves' gradients come back
summed over ``group``:

* each leaf gets a gradient hook that copies its gradient into its slot of a
  flat bucket (and returns the slot, so autograd hands the caller that view);
* a bucket's all-reduce starts, asynchronously, the moment its last gradient
  arrives, so the sums travel while the backward computes the earlier layers;
* buckets are filled in reverse order of the leaves (about the order a
  backward produces them; a parameter tree lists the first layer first), with
  DDP's caps (1 MiB for the first bucket, 25 MiB after), and launched strictly
  in bucket order, as DDP's reducer does: a bucket that fills early waits for
  the ones before it, so every rank issues the same all-reduces in the same
  order whatever order its hooks fire in (DDP also rebuilds its buckets once
  from the first iteration's order, which takes a broadcast to agree on; this
  layout is a function of the leaves alone, so every rank computes it);
* the flat buffers are fresh each call, so the returned gradients belong to the
  caller (no view is overwritten by the next step).

The numbers are those of the tracked path (:class:`colofn._dist_comm.GradBucket`
sums the same per-leaf gradients with the same all-reduce); a leaf the output
does not depend on gets a zero gradient, summed like the others.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist

from colofn import _comm, _dist_comm


class LeafSums:
    """``grad(output, leaves)`` with the leaves' gradients summed over ``group`` (an :class:`~colofn._comm.AxisGroup`)."""

    def __init__(self, group: _comm.AxisGroup) -> None:
        self.group = group

    @staticmethod
    def buckets(leaves: list[torch.Tensor]) -> list[list[int]]:
        """Leaf indices per bucket: reverse leaf order, a new bucket at a dtype/device change or when the cap is reached."""
        buckets: list[list[int]] = []
        cap, size, key = _dist_comm.FIRST_BUCKET_BYTES, 0, None  # read per call: tests patch the caps
        for i in reversed(range(len(leaves))):
            t = leaves[i]
            k = (t.dtype, t.device)
            if not buckets or k != key or size >= cap:
                if buckets:
                    cap = _dist_comm.BUCKET_BYTES
                buckets.append([])
                size, key = 0, k
            buckets[-1].append(i)
            size += t.numel() * t.element_size()
        return buckets

    def grad(self, output: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """``torch.autograd.grad(output, leaves)``, each gradient summed over the group (started during the backward)."""
        buckets = self.buckets(leaves)
        where: dict[int, tuple[int, torch.Tensor]] = {}  # leaf -> (bucket, its slot)
        flats: list[torch.Tensor] = []
        for b, idx in enumerate(buckets):
            flat = torch.empty(sum(leaves[i].numel() for i in idx), dtype=leaves[idx[0]].dtype, device=leaves[idx[0]].device)
            flats.append(flat)
            for i, piece in zip(idx, flat.split([leaves[i].numel() for i in idx]), strict=True):
                where[i] = (b, piece.view(leaves[i].shape))
        pending = [len(idx) for idx in buckets]
        works: list[Any] = []  # bucket b's all-reduce is works[b]: launched in bucket order

        def launch_ready() -> None:
            while len(works) < len(buckets) and pending[len(works)] == 0:
                flat = flats[len(works)]
                if self.group.size > 1:
                    _comm._rec("all_reduce", self.group, flat, "backward")
                    works.append(dist.all_reduce(flat, group=self.group.group, async_op=True))
                else:
                    works.append(None)

        def hook(i: int, g: torch.Tensor) -> torch.Tensor:
            b, slot = where[i]
            slot.copy_(g)
            pending[b] -= 1
            if pending[b] == 0:
                launch_ready()
            return slot

        handles = [t.register_hook(functools.partial(hook, i)) for i, t in enumerate(leaves)]
        try:
            grads = torch.autograd.grad(output, leaves, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for i, g in enumerate(grads):
            if g is None:  # the output does not depend on this leaf: a zero gradient, summed as the others
                b, slot = where[i]
                slot.zero_()
                pending[b] -= 1
        launch_ready()  # what the backward left open
        for work in works:
            if work is not None:
                work.wait()
        return [where[i][1] for i in range(len(leaves))]
