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

Collectives that DTensor issues (inside :func:`colofn.jit`, at
:func:`colofn.with_sharding_constraint`, in ``redistribute``/``full_tensor``,
in their backward passes) are PyTorch's functional collectives
(``torch.ops._c10d_functional``); while a trace is open a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` records each of them
with the same byte accounting (see :class:`_FunctionalRecorder`). colofn's own
collectives go through ``torch.distributed``'s c10d ops and record themselves,
so nothing is counted twice; code that records its own op and issues it as a
functional collective wraps the call in :func:`own` for the same reason.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CommRecord", "comm_trace", "note_mesh", "own", "record"]


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
def comm_trace(*, dtensor: bool = True) -> Iterator[list[CommRecord]]:
    """Record this rank's communication inside the block (nested traces all record).

    Args:
      dtensor: also record the functional collectives DTensor issues (under
        ``jit``, ``with_sharding_constraint``, ``redistribute``, ...). That takes
        a dispatch mode, so every torch op in the block pays a Python call,
        which shows on small steps; pass False around timed code that issues
        none, to record only colofn's own collectives at no extra cost.
    """
    records: list[CommRecord] = []
    stack = _stack()
    # one recorder per thread, however the traces nest: it records into every open trace
    recorder = _FunctionalRecorder() if dtensor and getattr(_local, "recorder", None) is None else None
    stack.append(records)
    try:
        if recorder is None:
            yield records
        else:
            _local.recorder = recorder
            try:
                with recorder:
                    yield records
            finally:
                _local.recorder = None
    finally:
        stack.pop()


def note_mesh(device_mesh: Any) -> None:
    """Tell an open trace the axis names of ``device_mesh``'s groups (for DTensor's collectives on it)."""
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder.learn(device_mesh)


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


@contextmanager
def own() -> Iterator[None]:
    """Functional collectives issued inside are not recorded: the caller records them itself."""
    prev = getattr(_local, "own", False)
    _local.own = True
    try:
        yield
    finally:
        _local.own = prev


# ----------------------------------------------------------------------------- DTensor's collectives

_funcol = torch.ops._c10d_functional


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _FunctionalRecorder(TorchDispatchMode):
    """Records the functional collectives (``torch.ops._c10d_functional``) issued while it is active.

    Like torch's ``CommDebugMode`` it lets DTensor desugar first (returns
    ``NotImplemented`` for DTensor operands), then sees the collectives on local
    tensors. Each becomes a :class:`CommRecord` with the volumes of
    :func:`volume`; a broadcast is counted as a chain moves it (every rank but
    the source receives ``B``, every rank but the source's predecessor sends
    ``B``). The group's mesh axis comes from the meshes seen so far: of the
    DTensors dispatched, the ambient mesh, and those :func:`note_mesh` was
    told of (``shard_map``'s, ``jit``'s, ``device_put``'s and ``gather``'s); a group over several axes of one of them (a
    flattened mesh) is matched by its ranks; ``("",)`` for any other group.
    """

    def __init__(self) -> None:
        super().__init__()
        self.axes_of_group: dict[str, tuple[str, ...]] = {}
        self.meshes: dict[int, Any] = {}  # id -> DeviceMesh, each learned once
        self.rules: dict[Any, Callable[..., list[tuple[str, torch.Tensor, str, int | None]]]] = {
            _funcol.all_reduce.default: lambda x, op, g: [("all_reduce", x, g, None)],
            _funcol.all_reduce_coalesced.default: lambda xs, op, g: [("all_reduce", x, g, None) for x in xs],
            _funcol.all_gather_into_tensor.default: lambda x, n, g: [("all_gather", x, g, None)],
            _funcol.all_gather_into_tensor_coalesced.default: lambda xs, n, g: [("all_gather", x, g, None) for x in xs],
            _funcol.reduce_scatter_tensor.default: lambda x, op, n, g: [("reduce_scatter", x, g, None)],
            _funcol.reduce_scatter_tensor_coalesced.default: lambda xs, op, n, g: [("reduce_scatter", x, g, None) for x in xs],
            _funcol.all_to_all_single.default: lambda x, out_splits, in_splits, g: [("all_to_all", x, g, None)],
            _funcol.broadcast.default: lambda x, src, g: [("broadcast", x, g, src)],
        }

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            for a in args:
                if isinstance(a, DTensor):
                    self.learn(a.device_mesh)
            return NotImplemented
        kwargs = kwargs or {}
        rule = self.rules.get(func)
        if rule is not None and not getattr(_local, "own", False):
            for op, x, group_name, src in rule(*args, **kwargs):
                self._record(op, x, group_name, src)
        return func(*args, **kwargs)

    def learn(self, device_mesh: Any) -> None:
        if id(device_mesh) in self.meshes:
            return
        self.meshes[id(device_mesh)] = device_mesh
        for i, name in enumerate(device_mesh.mesh_dim_names or ()):
            if device_mesh.size(i) > 1:
                self.axes_of_group.setdefault(device_mesh.get_group(i).group_name, (name,))

    def _axes_by_ranks(self, pg: Any) -> tuple[str, ...] | None:
        """The mesh axes (in mesh order) whose group through this rank has ``pg``'s ranks (a flattened group)."""
        ranks = sorted(dist.get_process_group_ranks(pg))
        me = dist.get_rank()
        for dm in self.meshes.values():
            names, grid = dm.mesh_dim_names or (), dm.mesh
            if not names or me not in grid.flatten().tolist():
                continue
            coord = [int(c[0]) for c in (grid == me).nonzero(as_tuple=True)]
            for k in range(2, len(names) + 1):
                for dims in itertools.combinations(range(len(names)), k):
                    index = tuple(slice(None) if d in dims else coord[d] for d in range(len(names)))
                    if sorted(grid[index].flatten().tolist()) == ranks:
                        return tuple(names[d] for d in dims)
        return None

    def _record(self, op: str, x: torch.Tensor, group_name: str, src: int | None) -> None:
        from torch.distributed.distributed_c10d import _resolve_process_group

        pg = _resolve_process_group(group_name)  # type: ignore[arg-type]
        n = pg.size()
        if n <= 1:
            return
        nbytes = _nbytes(x)
        if op == "broadcast" and src is not None:  # as a chain moves it, like colofn's own broadcast
            me = dist.get_rank(pg)
            sent, received = (0 if me == (src - 1) % n else nbytes), (0 if me == src else nbytes)
        else:
            sent, received = volume(op, nbytes, n)
        phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        if group_name not in self.axes_of_group:
            from colofn.mesh import current_mesh

            mesh = current_mesh()
            if mesh is not None:
                self.learn(mesh.device_mesh)
            if group_name not in self.axes_of_group:
                found = self._axes_by_ranks(pg)
                if found is not None:
                    self.axes_of_group[group_name] = found
        axes = self.axes_of_group.get(group_name, ("",))
        record(CommRecord(op, axes, n, tuple(x.shape), x.dtype, sent, received, phase))
