"""``comm_trace()``: record every collective and point-to-point op colofn issues.

Each record says what this rank sent and received, by the volume a
bandwidth-optimal (ring) algorithm moves per rank, so tests and benchmarks can
assert communication exactly:

============================  =====================  =======================
op (over a group of n ranks)  bytes_sent             bytes_received
============================  =====================  =======================
all_reduce of B bytes         2 (n-1)/n B            2 (n-1)/n B
all_gather, B bytes in        (n-1) B                (n-1) B
reduce_scatter, B bytes in    (n-1)/n B              (n-1)/n B
all_to_all of B bytes         (n-1)/n B              (n-1)/n B
send / recv of B bytes        B / 0                  0 / B
broadcast of B bytes          B (0 at the chain end) B (0 at the source)
reduce of B bytes             B (0 at the dest)      B (0 at the chain start)
============================  =====================  =======================

A broadcast or reduce (``pbroadcast`` and its transpose) is counted as a
pipelined chain moves it, from the source round the group in index order
(the chain end is the rank before the source; a reduce's chain starts at the
rank after its destination): ``(n-1) B`` in all, no rank more than ``B``.

>>> import colofn, torch
>>> from colofn import P
>>> def f():
...     mesh = colofn.Mesh((2,), ("dp",))
...     with colofn.comm_trace() as records:
...         colofn.shard_map(lambda x: colofn.psum(x, "dp"), mesh=mesh, in_specs=P("dp"), out_specs=P())(torch.ones(4))
...     return [(r.op, r.axes, r.bytes_sent) for r in records]
>>> colofn.launch(f, world_size=2)[0]
[('all_reduce', ('dp',), 8)]
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["CommRecord", "comm_trace", "record"]


@dataclass(frozen=True)
class CommRecord:
    """One communication op as this rank saw it."""

    op: str  # all_reduce, all_gather, reduce_scatter, all_to_all, send, recv, ...
    axes: tuple[str, ...]  # mesh axes of the group ("" entries for raw groups)
    group_size: int
    shape: tuple[int, ...]  # shape of this rank's input
    dtype: torch.dtype
    bytes_sent: int
    bytes_received: int
    phase: str  # "forward" or "backward"
    peer: int | None = None  # for send/recv: the peer's rank in the group


_local = threading.local()


def _stack() -> list[list[CommRecord]]:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


@contextmanager
def comm_trace() -> Iterator[list[CommRecord]]:
    """Record this rank's communication inside the block (nested traces all record)."""
    records: list[CommRecord] = []
    _stack().append(records)
    try:
        yield records
    finally:
        _stack().pop()


def active() -> bool:
    return bool(getattr(_local, "stack", None))


def record(rec: CommRecord) -> None:
    for records in _stack():
        records.append(rec)


def volume(op: str, nbytes: int, n: int) -> tuple[int, int]:
    """(bytes_sent, bytes_received) per rank for ``op`` on ``nbytes`` of input over ``n`` ranks."""
    if n <= 1:
        return 0, 0
    if op == "all_reduce":
        v = 2 * (n - 1) * nbytes // n
        return v, v
    if op == "all_gather":
        return (n - 1) * nbytes, (n - 1) * nbytes
    if op in ("reduce_scatter", "all_to_all"):
        v = (n - 1) * nbytes // n
        return v, v
    raise ValueError(f"no volume rule for {op}")
