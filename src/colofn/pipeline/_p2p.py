"""Point-to-point messages of one pipeline step, batched per action and traced.

A message is the list of a pytree's tensor leaves, one ``isend``/``irecv`` per
leaf, each with its own tag (:func:`~colofn.pipeline._program.wire_tag`), so
matching never depends on posting order. When the receiver does not know the
shapes yet (the first step for an input signature) an activation message is
preceded by its metadata: the tree structure, shapes and dtypes as plain
integers (:mod:`colofn.pipeline._wire_meta`; no pickle), as a size (one int64)
and the int64s.

The receives of an action are posted in one :func:`torch.distributed.batch_isend_irecv`
(ahead of time once shapes are known) and waited for before it; the sends
after it are posted in one and waited for only by :meth:`Wire.wait_sends` at
the end of the step, as the execution contract of :mod:`colofn.pipeline.comm`
requires. Every op is recorded in
:func:`colofn.comm_trace` as a ``send`` or ``recv`` (peer: the index along the
pipeline axis; phase: ``forward`` for activations and losses, ``backward`` for
gradients).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from colofn import tracing as ct
from colofn._comm import AxisGroup
from colofn.errors import ShapeError
from colofn.pipeline import _wire_meta
from colofn.pipeline._program import Msg, Slot, wire_tag
from colofn.pipeline.comm import Payload
from colofn.tree import PyTreeSpec

Spec = tuple[tuple[int, ...], torch.dtype]
Meta = tuple[PyTreeSpec | None, tuple[Spec, ...]]
"""What a receiver needs: the tree structure (None for gradients) and each leaf's shape and dtype."""


def meta_of(treedef: PyTreeSpec | None, leaves: Sequence[torch.Tensor]) -> Meta:
    return treedef, tuple((tuple(t.shape), t.dtype) for t in leaves)


class Pending(NamedTuple):
    """Posted receives: ``bufs[i]`` (one tensor per leaf) fills in for ``msgs[i]``."""

    works: list[Any]
    msgs: list[Msg]
    metas: list[Meta]
    bufs: list[list[torch.Tensor]]

    def wait(self) -> None:
        for work in self.works:
            work.wait()


class Wire:
    """The pipeline step's messages over ``group`` (the ranks along the pipeline axis)."""

    def __init__(self, group: AxisGroup, axis_name: str, tags: int, device: torch.device) -> None:
        self.group = group
        self.axis_name = axis_name
        self.tags = tags
        self.device = device
        self._sent: list[tuple[Any, torch.Tensor]] = []  # (work, buffer kept alive until waited)

    def _op(self, send: bool, msg: Msg, slot: Slot, leaf: int, t: torch.Tensor) -> dist.P2POp:
        if ct.active():
            nbytes = t.numel() * t.element_size()
            phase = "backward" if msg.payload is Payload.GRADIENT else "forward"
            ct.record(ct.CommRecord(
                "send" if send else "recv", (self.axis_name,), self.group.size, tuple(t.shape),
                t.dtype, nbytes if send else 0, 0 if send else nbytes, phase, msg.peer))
        tag = wire_tag(msg.tag, slot, leaf, self.tags)
        if tag >= 2**31:
            raise ShapeError(f"Pipeline: a message of {leaf + 1}+ tensors needs p2p tag {tag}, past "
                             "2**31; send fewer leaves per activation (stack them).")
        return dist.P2POp(dist.isend if send else dist.irecv, t, self.group.ranks[msg.peer],
                          self.group.group, tag)

    def send(self, items: Sequence[tuple[Msg, Sequence[torch.Tensor], Meta | None]]) -> None:
        """Post every message in ``items`` (non-blocking), each with its metadata if given."""
        ops = []
        for msg, leaves, meta in items:
            if meta is not None:
                raw = _wire_meta.encode(meta)
                size = torch.tensor([raw.numel()], dtype=torch.int64, device=self.device)
                ops.append(self._op(True, msg, Slot.META_SIZE, 0, size))
                ops.append(self._op(True, msg, Slot.META, 0, raw.to(self.device)))
            for i, t in enumerate(leaves):
                ops.append(self._op(True, msg, Slot.DATA, i, t.detach().contiguous()))
        if ops:
            works = dist.batch_isend_irecv(ops)
            self._sent.extend(zip(works, (o.tensor for o in ops), strict=False))

    def post_recv(self, items: Sequence[tuple[Msg, Meta]]) -> Pending:
        """Post the receives of ``items`` (shapes known) without waiting."""
        ops: list[dist.P2POp] = []
        bufs = []
        for msg, meta in items:
            leaves = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in meta[1]]
            ops += [self._op(False, msg, Slot.DATA, i, b) for i, b in enumerate(leaves)]
            bufs.append(leaves)
        return Pending(dist.batch_isend_irecv(ops) if ops else [], [m for m, _ in items],
                       [meta for _, meta in items], bufs)

    def recv(self, items: Sequence[tuple[Msg, Meta | None]]) -> Pending:
        """Receive ``items`` (blocking); those with ``None`` metadata get it from the sender first."""
        metas: list[Meta | None] = [meta for _, meta in items]
        unknown = [i for i, meta in enumerate(metas) if meta is None]
        if unknown:
            sizes = {i: torch.empty(1, dtype=torch.int64, device=self.device) for i in unknown}
            self._wait([self._op(False, items[i][0], Slot.META_SIZE, 0, sizes[i]) for i in unknown])
            raws = {i: torch.empty(int(sizes[i].item()), dtype=torch.int64, device=self.device)
                    for i in unknown}
            self._wait([self._op(False, items[i][0], Slot.META, 0, raws[i]) for i in unknown])
            for i in unknown:
                metas[i] = _wire_meta.decode(raws[i])
        pending = self.post_recv([(msg, meta) for (msg, _), meta in zip(items, metas, strict=True)
                                  if meta is not None])
        pending.wait()
        return pending

    def wait_sends(self) -> None:
        """Wait for every send posted so far (the end of the step)."""
        sent, self._sent = self._sent, []
        for work, _ in sent:
            work.wait()

    @staticmethod
    def _wait(ops: list[dist.P2POp]) -> None:
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
