"""A pipeline step's gradient sums of its stage parameters over the data axes: once per step.

Inside a pipeline stage run by :func:`colofn.shard_map.per_device`, a
parameter replicated along ``dp`` and used with ``dp``-varying activations is
``pvary``'d, and its gradient is summed over ``dp`` by the transpose: through
:class:`~colofn._dist_comm.GradBucket`, one bucketed all-reduce per call, so
once per microbatch. The sum is linear, so summing each microbatch's part is
the same as summing their total (up to float reassociation), which is what
DDP's ``no_sync`` plus a last synchronised microbatch does, and what this
module does for :class:`~colofn.pipeline.Pipeline`:

* the step registers its parameter leaves (:meth:`StepSums.register`) and makes
  the sums active for its thread (:func:`active`); a ``GradBucket`` built
  while they are active hands the stash of a registered leaf to them
  (:meth:`StepSums.stash`) instead of bucketing it;
* before a stage's *last* parameter backward (``B`` or ``W``) of the step,
  :meth:`StepSums.begin_last`: until then each stash is added to a local
  partial sum (no communication); during that pass each stash completes its
  partial sum and joins a flat bucket, launched as an asynchronous all-reduce
  as soon as the bucket reaches the caps of ``GradBucket`` (DDP's); after it,
  :meth:`StepSums.end_last` launches what is still open;
* :meth:`StepSums.finish` waits for every bucket (once, before the optimizer
  needs the gradients) and adds the sums to the step's gradients.

A stage whose parameters are marked *varying* along the data axes inside it
(``Pipeline(..., grad_sum_axes=...)``; ``colofn train``'s pipeline trainer)
has no implicit ``pvary``, no hook and no stash per microbatch: the runtime
accumulates each rank's own gradients as for any stage, and
:meth:`StepSums.launch_totals` hands those totals to the same flat buckets right
after the stage's last parameter backward (:meth:`StepSums.sum_totals` says
which stages). The same sums in the same order (each microbatch's part added
locally, then one all-reduce), without a Python hook per parameter per
microbatch; but nothing goes on the wire *during* that last backward: the
parameters enter a stage through one view each, made at the stage's entry, and
autograd runs the oldest nodes last, so no total is complete before the pass
ends. Tracked sums are complete at each parameter's last use, so their full
buckets (1 MiB, then 25 MiB) start during the pass; for stages whose
parameters fit in the first bucket both launch the same all-reduce at the same
point, and the choice is only one of CPU cost.
A parameter of such a stage left invariant along those axes still gets
tracking's per-use stash; its gradient then stays in the totals (summed once,
with them), so marking is a fast path, not a condition of correctness.

Every dp replica of a stage runs the same program and graph, so every rank
stashes, fills and launches in the same order.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

Handle = tuple[int, int]
"""(stage, index of the leaf among the stage's parameter leaves)."""

_local = threading.local()


def current() -> StepSums | None:
    """The sums active on this thread (a pipeline step's), or None."""
    return getattr(_local, "sums", None)


@contextmanager
def active(sums: StepSums) -> Iterator[StepSums]:
    """Make ``sums`` the ones ``GradBucket`` hands registered parameters to, on this thread."""
    before = current()
    _local.sums = sums
    try:
        yield sums
    finally:
        _local.sums = before


class StepSums:
    """The deferred dp sums of one pipeline step's parameters (see the module docstring)."""

    def __init__(self) -> None:
        self.handles: dict[int, Handle] = {}  # id(parameter leaf) -> handle
        self.leaves: list[torch.Tensor] = []  # keeps the registered leaves (and so their ids) alive
        self.partial: dict[tuple[Handle, tuple[str, ...]], tuple[Any, torch.Tensor]] = {}  # -> (comm, sum)
        self.final: int | None = None  # the stage in its last parameter backward of the step
        self.open: dict[tuple[Any, ...], list[tuple[Handle, torch.Tensor]]] = {}  # (axes, dtype, device)
        self.open_bytes: dict[tuple[Any, ...], int] = {}
        self.comm_of: dict[tuple[Any, ...], Any] = {}
        self.launched: list[tuple[Any, torch.Tensor, list[tuple[Handle, torch.Size]]]] = []
        self.cap: int | None = None  # the first bucket's cap until one is launched
        self.totals: dict[int, tuple[tuple[str, ...], Any]] = {}  # stage -> (axes, group): sum its totals
        self.summed_axes: dict[int, tuple[str, ...]] = {}  # stage -> the axes its totals are summed over

    def register(self, stage: int, leaves: Sequence[torch.Tensor]) -> None:
        for i, t in enumerate(leaves):
            self.handles[id(t)] = (stage, i)
            self.leaves.append(t)

    def handle(self, t: torch.Tensor) -> Handle | None:
        return self.handles.get(id(t))

    def sum_totals(self, stage: int, axes: tuple[str, ...], group: Any) -> None:
        """Stage ``stage``'s parameters vary along ``axes`` inside it: sum its accumulated gradients over ``group`` once."""
        self.totals[stage] = (axes, group)
        self.summed_axes[stage] = axes

    def launch_totals(self, stage: int, acc: list[torch.Tensor]) -> None:
        """After ``stage``'s last parameter backward: its totals ``acc`` join the buckets (launched now); ``acc`` restarts at zero."""
        axes, group = self.totals.pop(stage)
        comm = _Fixed(group)
        for i, total in enumerate(acc):
            acc[i] = torch.zeros_like(total)  # finish adds the sum back into it
            self._add(comm, (stage, i), axes, total)
        for key in [k for k in self.open if k[0] == axes]:
            self._launch(key)

    def stash(self, comm: Any, h: Handle, axes: tuple[str, ...], g: torch.Tensor) -> torch.Tensor:
        """Take one use's gradient of parameter ``h`` to be summed over ``axes``; returns the zeros autograd adds."""
        summed = self.summed_axes.get(h[0])
        if summed is not None and set(axes) & set(summed):
            if set(axes) == set(summed):  # the stage's totals are summed over these axes: leave g in them
                return g
            from colofn.errors import ShardingError

            raise ShardingError(
                f"Pipeline(grad_sum_axes={summed}) sums the gradients of stage {h[0]}'s parameters over those "
                f"axes once per step, but its parameter leaf {h[1]} is used invariant along some of them and "
                f"with data varying along {axes}, so its gradient must be summed over {axes} only. Fix: mark the "
                "stage's parameters varying along the grad_sum_axes inside the stage "
                "(colofn.train.pipe_zero.varying), or leave grad_sum_axes out and let tracking sum them.")
        key = (h, axes)
        g = g.detach()
        prev = self.partial.pop(key, None)
        total = g if prev is None else prev[1] + g
        if h[0] == self.final:
            self._add(comm, h, axes, total)
        else:
            self.partial[key] = (comm, total)
        return torch.zeros_like(g)

    def begin_last(self, stage: int) -> None:
        """``stage``'s last parameter backward of the step starts: its sums complete from now on."""
        self.final = stage

    def end_last(self, stage: int) -> None:
        """``stage``'s last parameter backward is over: launch its remaining sums."""
        for (h, axes) in [k for k in self.partial if k[0][0] == stage]:
            comm, total = self.partial.pop((h, axes))
            self._add(comm, h, axes, total)
        for key in list(self.open):
            self._launch(key)
        self.final = None

    def finish(self, acc: dict[int, list[torch.Tensor]]) -> None:
        """Wait for every sum and add it to ``acc[stage][leaf]`` (the step's gradients)."""
        for stage in sorted({h[0] for h, _ in self.partial}):  # a stage never marked last: now
            self.end_last(stage)
        for stage in sorted(self.totals):
            self.launch_totals(stage, acc[stage])
        for work, flat, items in self.launched:
            if work is not None:
                work.wait()
            for ((stage, i), shape), piece in zip(items, flat.split([math.prod(s) for _, s in items]), strict=True):
                acc[stage][i].add_(piece.view(shape))
        self.launched = []

    def _add(self, comm: Any, h: Handle, axes: tuple[str, ...], total: torch.Tensor) -> None:
        from colofn import _dist_comm

        key = (axes, total.dtype, total.device)
        self.open.setdefault(key, []).append((h, total))
        self.comm_of[key] = comm
        self.open_bytes[key] = self.open_bytes.get(key, 0) + total.numel() * total.element_size()
        if self.open_bytes[key] >= (_dist_comm.FIRST_BUCKET_BYTES if self.cap is None else self.cap):
            self._launch(key)

    def _launch(self, key: tuple[Any, ...]) -> None:
        from colofn import _comm, _dist_comm

        items = self.open.pop(key)
        del self.open_bytes[key]
        grp = self.comm_of[key].group(key[0])
        flat = torch.cat([t.reshape(-1) for _, t in items])
        work = None
        if grp.size > 1:
            _comm._rec("all_reduce", grp, flat, "backward")
            work = dist.all_reduce(flat, group=grp.group, async_op=True)
        self.launched.append((work, flat, [(h, t.shape) for h, t in items]))
        self.cap = _dist_comm.BUCKET_BYTES


class _Fixed:
    """A group for :meth:`StepSums._launch` where the runtime, not a ``GradBucket``'s comm, names it."""

    def __init__(self, group: Any) -> None:
        self._group = group

    def group(self, axes: tuple[str, ...]) -> Any:
        return self._group
