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
  caller (no view is overwritten by the next step); or, with ``reuse=True``,
  made once with the hooks, DDP's ``gradient_as_bucket_view``, for a trainer
  that consumes each step's gradients before the next.

The numbers are those of the tracked path (:class:`colofn._dist_comm.GradBucket`
sums the same per-leaf gradients with the same all-reduce); a leaf the output
does not depend on gets a zero gradient, summed like the others.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import torch
import torch.distributed as dist

from colofn import _comm, _dist_comm


class LeafSums:
    """``grad(output, leaves)`` with the leaves' gradients summed over ``group`` (an :class:`~colofn._comm.AxisGroup`).

    With ``reuse=True`` (DDP's ``gradient_as_bucket_view``), for a caller that
    passes the same leaf tensors every call and is done with a call's gradients
    before the next: the bucket layout, the flat buffers and the gradient hooks
    are made once, and each call's gradients are views of the same buffers (the
    next call overwrites them). Otherwise every call gets fresh buffers and its
    hooks are removed when it returns.
    """

    def __init__(self, group: _comm.AxisGroup, reuse: bool = False) -> None:
        self.group = group
        self.reuse = reuse
        self._layout: _Layout | None = None  # reuse: the layout of the leaves last seen, hooks attached
        self._local = threading.local()  # reuse: this thread's call in progress (simulated ranks are threads)

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

    def _hook(self, call: _Call | None, i: int, g: torch.Tensor) -> torch.Tensor:
        if call is None:  # a persistent hook: the call in progress on this thread, if any
            call = getattr(self._local, "call", None)
            if call is None:  # somebody else differentiates through this leaf
                return g
        b, slot = call.layout.where[i]
        slot.copy_(g)
        call.pending[b] -= 1
        if call.pending[b] == 0:
            self._launch_ready(call)
        return slot

    def _launch_ready(self, call: _Call) -> None:
        while len(call.works) < len(call.pending) and call.pending[len(call.works)] == 0:
            flat = call.layout.flats[len(call.works)]
            if self.group.size > 1:
                _comm._rec("all_reduce", self.group, flat, "backward")
                call.works.append(dist.all_reduce(flat, group=self.group.group, async_op=True))
            else:
                call.works.append(None)

    def _layout_for(self, leaves: list[torch.Tensor], extra: torch.Tensor | None) -> _Layout:
        old = self._layout
        if (old is not None and len(old.leaves) == len(leaves) and old.fits(extra)
                and all(r() is t for r, t in zip(old.leaves, leaves, strict=True))):
            return old
        if old is not None:
            for h in old.handles:
                h.remove()
        layout = _Layout(self.buckets(leaves), leaves, extra)
        if self.reuse:
            layout.handles = [t.register_hook(functools.partial(self._hook, None, i)) for i, t in enumerate(leaves)]
            self._layout = layout
        return layout

    def grad(self, output: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """``torch.autograd.grad(output, leaves)``, each gradient summed over the group (started during the backward)."""
        return self.grad_and_sum(output, leaves, None)[0]

    def grad_and_sum(self, output: torch.Tensor, leaves: list[torch.Tensor], extra: torch.Tensor | None
                     ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """:meth:`grad`, and the sum over the group of ``extra`` (a small tensor known before the backward).

        ``extra`` rides at the end of the last bucket when it has that bucket's
        dtype and device (a step's loss statistics: one rendezvous fewer per
        step, which on a host with fewer cores than ranks is not free); else it
        is summed on its own, started before the backward.
        """
        layout = self._layout_for(leaves, extra)
        call = _Call(layout)
        alone = None
        if extra is not None:
            if layout.tail is not None:
                layout.tail.copy_(extra.detach().reshape(-1))
            else:
                alone = _comm.AsyncAllReduce(extra, self.group)
        if self.reuse:
            self._local.call, handles = call, []
        else:
            handles = [t.register_hook(functools.partial(self._hook, call, i)) for i, t in enumerate(leaves)]
        try:
            grads = torch.autograd.grad(output, leaves, allow_unused=True)
        finally:
            self._local.call = None
            for h in handles:
                h.remove()
        for i, g in enumerate(grads):
            if g is None:  # the output does not depend on this leaf: a zero gradient, summed as the others
                b, slot = layout.where[i]
                slot.zero_()
                call.pending[b] -= 1
        self._launch_ready(call)  # what the backward left open
        for work in call.works:
            if work is not None:
                work.wait()
        if alone is not None:
            return layout.grads, alone.wait()
        return layout.grads, None if extra is None or layout.tail is None else layout.tail.view(extra.shape)


class _Layout:
    """Buckets of a list of leaves: each bucket's flat buffer and each leaf's slot (a view of it).

    With ``extra`` of the last bucket's dtype and device, that bucket's buffer
    ends with ``extra.numel()`` more elements (:attr:`tail`) for it to ride in.
    """

    def __init__(self, buckets: list[list[int]], leaves: list[torch.Tensor], extra: torch.Tensor | None = None) -> None:
        self.buckets = buckets
        self.leaves = [weakref.ref(t) for t in leaves]
        self.handles: list[Any] = []
        self.flats: list[torch.Tensor] = []
        self.where: dict[int, tuple[int, torch.Tensor]] = {}  # leaf -> (bucket, its slot)
        self.tail: torch.Tensor | None = None
        self.extra_key = None if extra is None else (extra.numel(), extra.dtype, extra.device)
        for b, idx in enumerate(buckets):
            dtype, device = leaves[idx[0]].dtype, leaves[idx[0]].device
            rides = b == len(buckets) - 1 and extra is not None and (extra.dtype, extra.device) == (dtype, device)
            n = sum(leaves[i].numel() for i in idx)
            flat = torch.empty(n + (extra.numel() if rides and extra is not None else 0), dtype=dtype, device=device)
            self.flats.append(flat)
            for i, piece in zip(idx, flat[:n].split([leaves[i].numel() for i in idx]), strict=True):
                self.where[i] = (b, piece.view(leaves[i].shape))
            if rides:
                self.tail = flat[n:]
        self.grads = [self.where[i][1] for i in range(len(leaves))]

    def fits(self, extra: torch.Tensor | None) -> bool:
        return self.extra_key == (None if extra is None else (extra.numel(), extra.dtype, extra.device))


class _Call:
    """One ``grad`` call: how many gradients each bucket still waits for, and the all-reduces launched."""

    def __init__(self, layout: _Layout) -> None:
        self.layout = layout
        self.pending = [len(idx) for idx in layout.buckets]
        self.works: list[Any] = []  # bucket b's all-reduce is works[b]: launched in bucket order
