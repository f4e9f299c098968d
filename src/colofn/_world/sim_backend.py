# mypy: disable-error-code="override,assignment,call-arg,method-assign"
# (the ProcessGroup methods are overridden with the signatures torch's trampoline calls)
"""An in-process collective backend: ranks are threads of one process.

Registered with ``torch.distributed`` as backend ``"colofn_sim"`` so that
``torch.distributed``, ``DeviceMesh``, sub-groups, functional collectives and
DTensor run unchanged on it.

How it works
------------
* Each collective call on a group takes the next *sequence number* of that group
  on the calling rank; the ranks' calls with the same (group, sequence number)
  meet in a :class:`_Meeting`. Posting never blocks; the last rank to arrive
  computes every rank's result and completes everyone's :class:`SimWork`.
  Ranks that call different collectives at the same point fail at once, each
  naming what the others called.
* Point-to-point ops meet in per-(group, src, dst, tag) FIFO mailboxes with
  rendezvous semantics (like gloo): a send completes when the matching recv is
  posted, so a program that would deadlock on gloo deadlocks here too.
* Creating a group (``new_group``, ``DeviceMesh``) waits for the other members
  as a :class:`SimWork` too, never in a blocking store read.
* Blocking happens only in :meth:`SimWork.wait`. The world knows which ranks
  are blocked and on what; when every live rank is blocked on something that
  cannot complete (or on a rank that has exited), it fails all of them at once
  with a :class:`~colofn.errors.DeadlockError` naming each rank's operation and
  group. A wait that outlives ``timeout`` raises
  :class:`~colofn.errors.CollectiveTimeoutError` with the same report.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from colofn.errors import CollectiveMismatchError, CollectiveTimeoutError, DeadlockError

BACKEND_NAME = "colofn_sim"

class _RankLocal(threading.local):
    """The simulated world and global rank of the current thread (class defaults: none)."""

    world: SimWorld | None = None  # a class default makes the miss cheap (the board reads it per collective)
    rank: int = -1


_tls = _RankLocal()
_world_serials = itertools.count(1)


def current() -> tuple[SimWorld, int] | None:
    """The simulated world and global rank of the calling thread, or None outside one."""
    w = getattr(_tls, "world", None)
    return None if w is None else (w, _tls.rank)


# ----------------------------------------------------------------------------- world


class SimWorld:
    """Shared state of one simulated world: meetings, mailboxes, who waits on what."""

    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self.timeout = timeout
        self.cond = threading.Condition()
        self.store = dist.HashStore()
        self.meetings: dict[tuple[str, int], _Meeting] = {}
        self.mailboxes: dict[tuple[str, int, int, int], _Mailbox] = {}
        self.blocked: dict[int, SimWork] = {}  # global rank -> the work it waits on
        self.exited: dict[int, str] = {}  # global rank -> "returned" / "raised ValueError"
        self.failure: str | None = None  # set once the world is known to be dead
        self.id = uuid.uuid4().hex[:8]
        self.serial = next(_world_serials)  # distinct for every world of this process

    # Called by launch when a rank's function ends (normally or not).
    def rank_exited(self, rank: int, how: str) -> None:
        with self.cond:
            self.exited[rank] = how
            self._check_deadlock()
            self.cond.notify_all()

    def abort(self, reason: str) -> None:
        with self.cond:
            if self.failure is None:
                self.failure = reason
            self.cond.notify_all()

    def describe(self) -> str:
        """One line per rank: what it is doing (caller holds the lock)."""
        lines = []
        for r in range(self.size):
            if r in self.exited:
                lines.append(f"rank {r}: exited ({self.exited[r]})")
            elif r in self.blocked:
                lines.append(f"rank {r}: waiting in {self.blocked[r].describe()}")
            else:
                lines.append(f"rank {r}: running (not in a collective)")
        return "\n".join("  " + ln for ln in lines)

    def _check_deadlock(self) -> None:
        """Fail the world if no blocked rank can ever be woken (caller holds the lock)."""
        if self.failure is not None or not self.blocked:
            return
        live = [r for r in range(self.size) if r not in self.exited]
        if any(r not in self.blocked for r in live):
            return  # someone is still running and may yet post what the others wait for
        if any(w._ready() for w in self.blocked.values()):
            return
        failed = {r: h for r, h in self.exited.items() if h != "returned"}
        cause = (
            "because " + ", ".join(f"rank {r} {h}" for r, h in sorted(failed.items()))
            if failed
            else "every live rank is blocked and none can proceed"
        )
        self.failure = (
            f"Simulated world deadlocked ({cause}). What each rank was doing:\n{self.describe()}\n"
            "Every rank must call the same collectives on the same groups in the same order, "
            "and every recv needs a matching send."
        )
        self.cond.notify_all()


# ----------------------------------------------------------------------------- work


class SimWork(dist.Work):
    """A pending operation; :meth:`wait` blocks until it completes or the world fails."""

    def __init__(self, world: SimWorld, rank: int, what: str, result: Any = None) -> None:
        super().__init__()
        self.world = world
        self.rank = rank
        self.what = what
        self.result = result
        self.done = False
        self.error: str | None = None
        self._future: torch.futures.Future[Any] | None = None
        self.poll: Callable[[], bool] | None = None  # completes the work when it returns True

    def _ready(self) -> bool:  # caller holds world.cond
        if not self.done and self.poll is not None and self.poll():
            self.done = True
        return self.done

    def describe(self) -> str:
        return self.what

    def _complete(self, error: str | None = None) -> None:  # caller holds world.cond
        self.done = True
        self.error = error
        if self._future is not None and not self._future.done():
            if error is None:
                self._future.set_result(self.result)
            else:
                self._future.set_exception(RuntimeError(error))

    def wait(self, timeout: datetime.timedelta | float | None = None) -> bool:
        w = self.world
        limit = w.timeout
        deadline = time.monotonic() + limit
        with w.cond:
            if not self._ready():
                w.blocked[self.rank] = self
                try:
                    w._check_deadlock()
                    while not self._ready() and w.failure is None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            report = w.describe()
                            raise CollectiveTimeoutError(
                                f"rank {self.rank}: {self.what} did not complete within "
                                f"{limit:g} s. What each rank was doing:\n{report}"
                            )
                        w.cond.wait(remaining)
                finally:
                    w.blocked.pop(self.rank, None)
            if not self.done:
                assert w.failure is not None
                raise DeadlockError(f"rank {self.rank}: {self.what} cannot complete. {w.failure}")
        if self.error is not None:
            raise CollectiveMismatchError(f"rank {self.rank}: {self.error}")
        return True

    def is_completed(self) -> bool:
        return self.done

    def is_success(self) -> bool:
        return self.done and self.error is None

    def get_future(self) -> torch.futures.Future[Any]:
        with self.world.cond:
            if self._future is None:
                self._future = torch.futures.Future()
                if self.done:
                    self._complete(self.error)
        return self._future


# ----------------------------------------------------------------------------- collectives


@dataclass
class _Meeting:
    op: str
    size: int
    arrivals: dict[int, tuple[str, Any, SimWork]] = field(default_factory=dict)


def _reduce(op: Any, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack([t.detach() for t in tensors])
    if op == dist.ReduceOp.SUM:
        return stacked.sum(0)
    if op == dist.ReduceOp.AVG:
        return stacked.sum(0) / len(tensors) if stacked.is_floating_point() else stacked.sum(0) // len(tensors)
    if op == dist.ReduceOp.MAX:
        return stacked.amax(0)
    if op == dist.ReduceOp.MIN:
        return stacked.amin(0)
    if op == dist.ReduceOp.PRODUCT:
        return stacked.prod(0)
    if op == dist.ReduceOp.BAND:
        out = stacked[0].clone()
        for t in stacked[1:]:
            out &= t
        return out
    if op == dist.ReduceOp.BOR:
        out = stacked[0].clone()
        for t in stacked[1:]:
            out |= t
        return out
    raise NotImplementedError(f"colofn_sim: reduce op {op} is not supported")


def _split(t: torch.Tensor, sizes: Sequence[int] | None, n: int) -> list[torch.Tensor]:
    """Rows of ``t`` split by ``sizes`` (even split into ``n`` when empty, as torch does)."""
    if not sizes:
        sizes = [t.shape[0] // n] * n
    return list(t.split(list(sizes)))


class SimProcessGroup(dist.ProcessGroup):
    """One rank's view of one group of a :class:`SimWorld`."""

    def __init__(self, world: SimWorld, rank: int, size: int, gid: str, global_ranks: tuple[int, ...]) -> None:
        super().__init__(rank, size)
        self._world = world
        self._rank = rank
        self._size = size
        self._gid = gid
        self._global_ranks = global_ranks
        self._seq = 0

    # ---- identity
    def size(self) -> int:
        return self._size

    def getBackendName(self) -> str:  # noqa: N802  (torch's name)
        return BACKEND_NAME

    @property
    def group_name(self) -> str:
        return dist.distributed_c10d._world.pg_names[self]

    def __repr__(self) -> str:
        return f"SimProcessGroup(ranks={list(self._global_ranks)}, rank={self._rank})"

    def _label(self, op: str) -> str:
        return f"{op} on group {list(self._global_ranks)} (call #{self._seq})"

    # ---- the meeting mechanism
    def _collective(self, op: str, payload: Any, finish: Callable[[list[Any]], None], result: Any = None) -> SimWork:
        w = self._world
        work = SimWork(w, self._global_ranks[self._rank], self._label(op), result)
        key = (self._gid, self._seq)
        self._seq += 1
        with w.cond:
            if w.failure is not None:
                raise DeadlockError(f"rank {work.rank}: cannot start {work.what}. {w.failure}")
            m = w.meetings.get(key)
            if m is None:
                m = w.meetings[key] = _Meeting(op, self._size)
            m.arrivals[self._rank] = (op, payload, work)
            if len(m.arrivals) == self._size:
                del w.meetings[key]
                ops = {r: a[0] for r, a in m.arrivals.items()}
                error = None
                if len(set(ops.values())) > 1:
                    calls = ", ".join(
                        f"rank {self._global_ranks[r]} called {o}" for r, o in sorted(ops.items())
                    )
                    error = (
                        f"Ranks diverged at call #{key[1]} on group {list(self._global_ranks)}: {calls}. "
                        "Every rank of a group must call the same collectives in the same order."
                    )
                else:
                    try:
                        with torch.no_grad():
                            finish([m.arrivals[r][1] for r in range(self._size)])
                    except Exception as e:  # a shape mismatch between ranks, say
                        error = f"{op} on group {list(self._global_ranks)} failed: {type(e).__name__}: {e}"
                for _, _, wk in m.arrivals.values():
                    wk._complete(error)
                w.cond.notify_all()
        return work

    # ---- collectives (the names torch's ProcessGroup trampoline calls)
    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> SimWork:
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM

        def finish(per_rank: list[list[torch.Tensor]]) -> None:
            for i in range(len(per_rank[0])):
                total = _reduce(op, [p[i] for p in per_rank])
                for p in per_rank:
                    p[i].copy_(total)

        return self._collective("all_reduce", tensors, finish, tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> SimWork:
        return self.allreduce(tensors, opts)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> SimWork:
        def finish(per_rank: list[tuple[list[list[torch.Tensor]], list[torch.Tensor]]]) -> None:
            for outs, _ in per_rank:
                for i, out_list in enumerate(outs):
                    for src, (_, ins) in enumerate(per_rank):
                        out_list[src].copy_(ins[i])

        return self._collective("all_gather", (outputs, inputs), finish, outputs)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> SimWork:  # noqa: A002
        def finish(per_rank: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            cat = torch.cat([i.reshape(-1) for _, i in per_rank])
            for out, _ in per_rank:
                out.view(-1).copy_(cat)

        return self._collective("all_gather_into_tensor", (output, input), finish, [output])

    _allgather_base = all_gather_single

    def allgather_into_tensor_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> SimWork:
        def finish(per_rank: list[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> None:
            for i in range(len(per_rank[0][0])):
                cat = torch.cat([ins[i].reshape(-1) for _, ins in per_rank])
                for outs, _ in per_rank:
                    outs[i].view(-1).copy_(cat)

        return self._collective("all_gather_into_tensor_coalesced", (outputs, inputs), finish, outputs)

    def reduce_scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None) -> SimWork:
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM

        def finish(per_rank: list[tuple[list[torch.Tensor], list[list[torch.Tensor]]]]) -> None:
            for i in range(len(per_rank[0][0])):
                for dst, (outs, _) in enumerate(per_rank):
                    outs[i].copy_(_reduce(op, [ins[i][dst] for _, ins in per_rank]))

        return self._collective("reduce_scatter", (outputs, inputs), finish, outputs)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> SimWork:  # noqa: A002
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        n = self._size

        def finish(per_rank: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            chunks = [i.reshape(-1).chunk(n) for _, i in per_rank]
            for dst, (out, _) in enumerate(per_rank):
                out.view(-1).copy_(_reduce(op, [c[dst] for c in chunks]))

        return self._collective("reduce_scatter_tensor", (output, input), finish, [output])

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_tensor_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> SimWork:
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        n = self._size

        def finish(per_rank: list[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> None:
            for i in range(len(per_rank[0][0])):
                chunks = [ins[i].reshape(-1).chunk(n) for _, ins in per_rank]
                for dst, (outs, _) in enumerate(per_rank):
                    outs[i].view(-1).copy_(_reduce(op, [c[dst] for c in chunks]))

        return self._collective("reduce_scatter_tensor_coalesced", (outputs, inputs), finish, outputs)

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> SimWork:
        def finish(per_rank: list[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> None:
            for dst, (outs, _) in enumerate(per_rank):
                for src, (_, ins) in enumerate(per_rank):
                    outs[src].copy_(ins[dst])

        return self._collective("all_to_all", (outputs, inputs), finish, outputs)

    def alltoall_base(
        self,
        output: torch.Tensor,
        input: torch.Tensor,  # noqa: A002
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: Any = None,
    ) -> SimWork:
        n = self._size

        def finish(per_rank: list[tuple[torch.Tensor, torch.Tensor, list[int], list[int]]]) -> None:
            pieces = [_split(i, isz, n) for _, i, _, isz in per_rank]
            for dst, (out, _, osz, _) in enumerate(per_rank):
                outs = _split(out, osz, n)
                for src in range(n):
                    outs[src].copy_(pieces[src][dst])

        return self._collective(
            "all_to_all_single", (output, input, output_split_sizes, input_split_sizes), finish, [output]
        )

    all_to_all_single = alltoall_base

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> SimWork:
        root = opts.rootRank if opts is not None else 0

        def finish(per_rank: list[list[torch.Tensor]]) -> None:
            for i, src in enumerate(per_rank[root]):
                for p in per_rank:
                    if p is not per_rank[root]:
                        p[i].copy_(src)

        return self._collective(f"broadcast(root={root})", tensors, finish, tensors)

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> SimWork:
        root, op = (opts.rootRank, opts.reduceOp) if opts is not None else (0, dist.ReduceOp.SUM)

        def finish(per_rank: list[list[torch.Tensor]]) -> None:
            for i in range(len(per_rank[0])):
                per_rank[root][i].copy_(_reduce(op, [p[i] for p in per_rank]))

        return self._collective(f"reduce(root={root})", tensors, finish, tensors)

    def gather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> SimWork:
        root = opts.rootRank if opts is not None else 0

        def finish(per_rank: list[tuple[list[list[torch.Tensor]], list[torch.Tensor]]]) -> None:
            outs = per_rank[root][0][0]
            for src, (_, ins) in enumerate(per_rank):
                outs[src].copy_(ins[0])

        return self._collective(f"gather(root={root})", (outputs, inputs), finish, outputs)

    def scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None) -> SimWork:
        root = opts.rootRank if opts is not None else 0

        def finish(per_rank: list[tuple[list[torch.Tensor], list[list[torch.Tensor]]]]) -> None:
            ins = per_rank[root][1][0]
            for dst, (outs, _) in enumerate(per_rank):
                outs[0].copy_(ins[dst])

        return self._collective(f"scatter(root={root})", (outputs, inputs), finish, outputs)

    def barrier(self, opts: Any = None) -> SimWork:
        return self._collective("barrier", None, lambda per_rank: None)

    def monitored_barrier(self, timeout: Any = None, wait_all_ranks: bool = False) -> None:
        self.barrier().wait()

    # ---- point to point
    def _p2p(self, kind: str, tensor: torch.Tensor, peer: int, tag: int) -> SimWork:
        w = self._world
        me_g, peer_g = self._global_ranks[self._rank], self._global_ranks[peer]
        src, dst = (me_g, peer_g) if kind == "send" else (peer_g, me_g)
        what = f"{kind} {'to' if kind == 'send' else 'from'} rank {peer_g} (tag {tag}, {tuple(tensor.shape)} {tensor.dtype})"
        work = SimWork(w, me_g, what, [tensor])
        key = (self._gid, src, dst, tag)
        with w.cond:
            if w.failure is not None:
                raise DeadlockError(f"rank {me_g}: cannot start {what}. {w.failure}")
            box = w.mailboxes.setdefault(key, _Mailbox())
            mine, theirs = (box.sends, box.recvs) if kind == "send" else (box.recvs, box.sends)
            if theirs:
                other_t, other_w = theirs.popleft()
                send_t, recv_t = (tensor, other_t) if kind == "send" else (other_t, tensor)
                error = None
                if send_t.shape != recv_t.shape or send_t.dtype != recv_t.dtype:
                    error = (
                        f"p2p from rank {src} to rank {dst} (tag {tag}): sent "
                        f"{tuple(send_t.shape)} {send_t.dtype} into a recv buffer of "
                        f"{tuple(recv_t.shape)} {recv_t.dtype}"
                    )
                else:
                    with torch.no_grad():
                        recv_t.copy_(send_t)
                work._complete(error)
                other_w._complete(error)
                w.cond.notify_all()
            else:
                mine.append((tensor, work))
        return work

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> SimWork:
        return self._p2p("send", tensors[0], dst, tag)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> SimWork:
        return self._p2p("recv", tensors[0], src, tag)


@dataclass
class _Mailbox:
    sends: deque[tuple[torch.Tensor, SimWork]] = field(default_factory=deque)
    recvs: deque[tuple[torch.Tensor, SimWork]] = field(default_factory=deque)


# ----------------------------------------------------------------------------- registration


def _create(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta) -> SimProcessGroup:
    cur = current()
    if cur is None:
        raise RuntimeError(
            "The colofn_sim backend only works inside a simulated world: start one with "
            "colofn.launch(fn, world_size=N) or `colofn run --devices N script.py`."
        )
    world, grank = cur
    # The store is private to this group: agree on an id and learn the members' global ranks.
    store.set(f"colofn/member/{rank}", str(grank))
    if rank == 0:
        store.set("colofn/gid", uuid.uuid4().hex)
    with world.cond:
        world.cond.notify_all()  # members waiting for these keys re-check them
    # Wait for the other members as a SimWork, not in a blocking store.get: a member that
    # never comes (it diverged, raised or hangs) is then a deadlock or a timeout the world
    # reports, instead of an invisible wait of the store's 30-minute default.
    keys = ["colofn/gid"] + [f"colofn/member/{r}" for r in range(size)]
    if not store.check(keys):
        work = SimWork(
            world, grank, f"creating a process group of {size} ranks (as its rank {rank}); "
            "every member must create it"
        )
        work.poll = lambda: store.check(keys)
        work.wait()
    gid = store.get("colofn/gid").decode()
    members = tuple(int(store.get(f"colofn/member/{r}").decode()) for r in range(size))
    return SimProcessGroup(world, rank, size, gid, members)


_registered = False
_register_lock = threading.Lock()


def register() -> None:
    global _registered
    with _register_lock:
        if not _registered:
            dist.Backend.register_backend(BACKEND_NAME, _create, devices=["cpu", "cuda"])
            _registered = True
