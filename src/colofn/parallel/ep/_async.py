"""A tiled all-to-all started now and read later, so this rank's work that does not need it runs meanwhile.

Inside ``shard_map``, :class:`AllToAll` launches ``all_to_all(blocks, axis, 0, 0,
tiled=True)`` asynchronously; :meth:`AllToAll.wait` returns what
:func:`colofn.collectives.all_to_all` would have returned, with the same
varying/invariant tag, the same ``comm_trace`` record (op, bytes, phase, at the
launch) and the same differentiable transpose (an all-to-all of the cotangent,
blocking, in the backward). Only the waiting moves. Where that cannot be done
as cheaply and soundly (a ``torch.func`` transform or forward-mode AD, a
group whose ranks are not in process-group order, the serial reference
backend, an operand not yet varying along ``axis``) it is the blocking
collective, issued at :meth:`AllToAll.wait`.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist

from colofn import _comm, _vma
from colofn._dist_comm import DistComm, op
from colofn.collectives import all_to_all

__all__ = ["AllToAll"]


class AllToAll:
    """``all_to_all(blocks, axis, 0, 0, tiled=True)`` in flight; :meth:`wait` for the result."""

    def __init__(self, blocks: torch.Tensor, axis: str) -> None:
        self.blocks, self.axis = blocks, axis
        self.work: dist.Work | None = None
        ctx = _vma.current()
        comm = ctx.comm if ctx is not None else None
        if not isinstance(comm, DistComm) or torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0:
            return
        if ctx is None or (ctx.check_vma and axis not in ctx.vma(blocks)):
            return
        grp = comm.group((axis,))
        if grp.size == 1 or not grp.identity_order:
            return
        self.ctx, self.comm = ctx, comm
        _comm._rec("all_to_all", grp, blocks, _comm._phase())
        self.src = blocks.detach().contiguous()  # alive until the op is done
        self.out = torch.empty_like(self.src)
        self.work = dist.all_to_all_single(self.out, self.src, group=grp.group, async_op=True)

    def wait(self) -> torch.Tensor:
        """The blocks this rank received (block ``p`` from rank ``p``), differentiable."""
        if self.work is None:
            return all_to_all(self.blocks, self.axis, 0, 0, tiled=True)  # type: ignore[no-any-return]
        work, received, axes, comm = self.work, self.out, (self.axis,), self.comm
        self.work = None

        def arrived(_: torch.Tensor) -> torch.Tensor:
            work.wait()
            return received

        with _vma.suspended():
            out = op(self.blocks, arrived, lambda g: comm.all_to_all(g, axes, 0, 0), name="all_to_all")
        return self.ctx.set_vma(out, self.ctx.vma(self.blocks) | set(axes))
