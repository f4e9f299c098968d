"""Keep blocks, not gathered panels, for the backward: SUMMA's memory, at SUMMA's communication.

:func:`~colofn.parallel.tp2d.summa.matmul` gathers row and column panels
(``X_i*``, ``W_*j``); autograd saves them for the backward, ``q`` times the
blocks. Optimus and Tesseract instead keep the ``1/q^2`` blocks and broadcast
them again in the backward. Inside :func:`rematerialize`, a panel saved for
the backward is stored as the rank's block, and gathered again (the same
all-gather, recorded by ``comm_trace`` in the backward phase) when the backward
needs it: activations held drop towards the papers' ``1/q^2``, and each
linear layer's backward sends ``4 (q - 1) / q`` units instead of ``2 (q - 1) / q``.

Only first-order gradients: a backward that builds a graph
(``create_graph=True``) through a rematerialised panel raises.

>>> import colofn, torch
>>> from colofn import random, tree
>>> from colofn.models import gpt
>>> from colofn.parallel import Plan, make_loss, shard_params, tp2d
>>> cfg = gpt.config("tiny", n_layers=1)
>>> params = gpt.init(random.key(0), cfg)
>>> t = random.randint(random.key(1), (4, 9), 0, cfg.vocab_size)
>>> batch = {"tokens": t[:, :-1], "targets": t[:, 1:]}
>>> plan = Plan(tp_mode="2d", tp_grid=("row", "col"))
>>> def program():
...     mesh = colofn.Mesh((2, 2), ("row", "col"))
...     p = tree.map(lambda x: x.requires_grad_(), shard_params(params, cfg, plan, mesh))
...     with tp2d.rematerialize():
...         loss = make_loss(cfg, plan, mesh)(p, batch)
...     with colofn.comm_trace() as records:
...         torch.autograd.grad(loss.to_local(), tree.leaves(p))
...     return sum(r.op == "all_gather" for r in records)
>>> colofn.launch(program, world_size=4)[0]  # 7 weight and 4 activation panels again, and the logits' gradient
12
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from colofn import _comm, _vma

__all__ = ["register", "rematerialize"]


@dataclasses.dataclass(eq=False)
class _Panel:
    """A gathered panel: its storage (weakly), its block, and the panel gathered again while saved views need it."""

    storage: StorageWeakRef
    block: torch.Tensor
    group: _comm.AxisGroup
    dim: int
    pending: int = 0  # saved views not yet unpacked
    full: torch.Tensor | None = None

    def gather(self) -> torch.Tensor:
        """The panel, gathered again once for all the views saved of it (dropped after the last)."""
        full = self.full if self.full is not None else _comm.all_gather(self.block, self.group, self.dim)
        self.pending -= 1
        self.full = full if self.pending > 0 else None
        return full


@dataclasses.dataclass(frozen=True)
class _Saved:
    """A saved view of a panel: the panel to gather again and the view to take of it."""

    panel: _Panel
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


_panels: contextvars.ContextVar[dict[int, _Panel] | None] = contextvars.ContextVar("colofn_tp2d_panels", default=None)


def register(panel: torch.Tensor, block: torch.Tensor, axis: str, dim: int) -> None:
    """Under :func:`rematerialize`, note that ``panel`` is ``block`` all-gathered (tiled) along ``dim`` over ``axis``."""
    panels = _panels.get()
    ctx = _vma.current()
    if panels is None or ctx is None or not hasattr(ctx.comm, "group"):
        return  # not asked for, or the serial reference (nothing to save there)
    if not panel.is_contiguous() or panel.storage_offset() != 0:
        return
    storage = panel.untyped_storage()
    panels[storage.data_ptr()] = _Panel(StorageWeakRef(storage), block.detach(), ctx.comm.group((axis,)), dim)


def _pack(t: torch.Tensor) -> Any:
    panels = _panels.get()
    if panels is None or t.device.type == "meta":
        return t
    hit = panels.get(t.untyped_storage().data_ptr())
    if hit is None or hit.storage.expired():  # not a panel, or a freed one whose memory was reused
        return t
    hit.pending += 1
    return _Saved(hit, t.size(), t.stride(), int(t.storage_offset()))


def _unpack(saved: Any) -> torch.Tensor:
    if not isinstance(saved, _Saved):
        return saved  # type: ignore[no-any-return]
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "colofn.parallel.tp2d.rematerialize: a backward with create_graph=True (higher-order gradients) "
            "through a rematerialised SUMMA panel is not supported; run the forward outside rematerialize()"
        )
    return saved.panel.gather().as_strided(saved.size, saved.stride, saved.offset)


@contextlib.contextmanager
def rematerialize() -> Iterator[None]:
    """Run a 2D / 2.5D forward keeping blocks instead of gathered panels for its backward (see the module)."""
    token = _panels.set({})
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _panels.reset(token)
