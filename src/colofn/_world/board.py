"""The status board of a real world: what each rank is doing, so failures can say it.

On gloo a rank that enters a different collective than its peers, or the same
one with another shape, gets a raw transport error ("Timed out waiting 3000ms
for recv operation", "Connection reset by peer") that names no collective, and
a size mismatch even aborts the receiving process from a gloo thread. The
simulated world reports what every rank was doing; this board gives real
worlds the same report.

Every collective colofn issues (:mod:`colofn._comm`) writes one line into this
rank's *slot* before it starts: the op, the group's ranks, the call number on
that group, the axes, and the local shape and dtype; and flips one state byte
when it ends. That costs a few microseconds (a formatted string copied into a
buffer; no communication). When a collective fails, the rank reads every
slot and raises a :class:`~colofn.errors.CollectiveMismatchError` (members of
its group at the same call number called something else),
:class:`~colofn.errors.CollectiveTimeoutError` or
:class:`~colofn.errors.CollectiveError`, each listing what every rank was
last doing.

Where the slots live:

* ``launch(backend="gloo")``: a file in the world's private directory, mapped
  by every rank (``mmap``), so a slot outlives its process (a rank that gloo
  aborted still says where it was) and the launcher reads it too.
* ``torchrun`` (ranks may be on other machines): a buffer per rank, published
  to the job's store by a background thread when it changed (at most five
  times a second), and synchronously when the rank fails or exits.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from colofn._world import sim_backend
from colofn.errors import CollectiveError, CollectiveMismatchError, CollectiveTimeoutError

SLOT = 512  # bytes per rank: state (1), call number (4), text length (2), text
_TEXT = 7
WAITING, RUNNING, FAILED, EXITED = b"w", b"r", b"f", b"x"
_W, _R, _F = WAITING[0], RUNNING[0], FAILED[0]
PUBLISH_PERIOD = 0.2  # seconds between a torchrun rank's store updates


@dataclass(frozen=True)
class Status:
    """One rank's slot, decoded."""

    state: str  # "waiting", "running", "failed", "exited" or "unknown"
    op: str = ""
    group: str = ""  # the group's global ranks, sorted, as text: "[0, 1]"
    call: int = -1  # the call number on that group (colofn's collectives only)
    axes: str = ""
    detail: str = ""  # local shape and dtype, or how the rank exited
    gid: str = ""  # the process group's name (the same on every member)

    @property
    def what(self) -> str:
        return f"{self.op} over {self.axes} on group {self.group} (call #{self.call}: {self.detail})"

    def describe(self) -> str:
        if self.state == "exited":
            return f"exited ({self.detail})"
        if self.state == "unknown":
            return "no report (not started, or has not reached a colofn collective)"
        if self.state == "waiting":
            return f"waiting in {self.what}"
        if self.state == "failed":
            return f"failed in {self.what}"
        return f"running (not in a colofn collective; the last was {self.what})"

    def call_key(self) -> tuple[str, str, int] | None:
        # The name alone is not enough: sub-groups split from one mesh axis may share it.
        return (self.gid, self.group, self.call) if self.state in ("waiting", "failed", "running") else None


_STATES = {WAITING: "waiting", RUNNING: "running", FAILED: "failed", EXITED: "exited"}


def decode(slot: bytes | None) -> Status:
    if not slot or slot[:1] not in _STATES:
        return Status("unknown")
    state = _STATES[slot[:1]]
    text = slot[_TEXT : _TEXT + int.from_bytes(slot[5:7], "little")].decode("utf-8", "replace")
    if state == "exited":
        return Status(state, detail=text)
    parts = text.split("\t")
    if len(parts) != 5:
        return Status("unknown")
    return Status(state, parts[0], parts[1], int.from_bytes(slot[1:5], "little"), parts[2], parts[3], parts[4])


class Board:
    """This rank's writer and everyone's reader of one world's status board."""

    def __init__(self, rank: int, size: int, timeout: float, slot: Any, read: Callable[[int], bytes | None]) -> None:
        self.rank = rank
        self.size = size
        self.timeout = timeout
        self._slot = slot  # writable, SLOT bytes
        self._read = read
        self._groups: dict[Any, list[Any]] = {}  # process group -> [ranks as text, calls made, its name]
        self._texts: dict[tuple[Any, ...], bytes] = {}  # (op, group, axes, shape, dtype) -> slot text
        self._last: bytes | None = None  # the text in the slot now
        self.publish: Callable[[], None] = lambda: None  # push this slot to where peers read it
        self.wait_for_peers: Callable[[], None] = lambda: None  # let peers publish theirs
        self.closed = threading.Event()  # set: stop publishing
        self.backend = "gloo"  # named in reports: "(gloo: Connection reset by peer.)"

    # ---- written on the hot path: a few dict lookups and three small copies
    def begin(self, op: str, g: Any, shape: tuple[int, ...], dtype: Any) -> None:
        """``g``: the :class:`colofn._comm.AxisGroup` the collective runs on."""
        entry = self._groups.get(g.group)
        if entry is None:  # one counter per process group, as gloo's own sequence numbers
            name = getattr(g.group, "group_name", "") or str(len(self._groups))
            entry = self._groups[g.group] = [str(sorted(g.ranks)), 0, name]
        key = (op, g.group, g.axes, shape, dtype)
        text = self._texts.get(key)
        if text is None:
            if len(self._texts) > 4096:  # programs with ever-new shapes: keep the cache small
                self._texts.clear()
            detail = f"{tuple(shape)} {str(dtype).removeprefix('torch.')}"
            text = self._texts[key] = f"{op}\t{entry[0]}\t{g.axes}\t{detail}\t{entry[2]}".encode()[: SLOT - _TEXT]
        n = entry[1]
        entry[1] = n + 1
        s = self._slot
        s[0] = 0  # readers see "unknown" rather than a torn line
        if text is not self._last:  # a loop repeats its collectives: most calls copy only the number
            s[_TEXT : _TEXT + len(text)] = text
            s[5:7] = len(text).to_bytes(2, "little")
            self._last = text
        s[1:5] = n.to_bytes(4, "little")
        s[0] = _W

    def end(self, failed: bool = False) -> None:
        self._slot[0] = _F if failed else _R

    def forget_groups(self) -> None:
        """Start the call numbers again (this process left its world and joined a new one)."""
        self._groups.clear()
        self._texts.clear()

    def _write(self, state: bytes, text: str) -> None:
        data = text.encode()[: SLOT - _TEXT]
        s = self._slot
        s[0] = 0
        s[_TEXT : _TEXT + len(data)] = data
        s[5:7] = len(data).to_bytes(2, "little")
        self._last = None
        s[0] = state[0]

    def exited(self, how: str) -> None:
        self._write(EXITED, how)
        self.publish()

    # ---- read on failure
    def statuses(self) -> list[Status]:
        return [decode(bytes(self._slot) if r == self.rank else self._read(r)) for r in range(self.size)]

    def explain(self, exc: BaseException) -> BaseException:
        """The readable error for ``exc``, raised by a collective this rank was in."""
        self.end(failed=True)
        self.publish()
        self.wait_for_peers()
        states = self.statuses()
        me = states[self.rank]
        cause = transport_text(exc)
        report = describe(states)
        diverged = mismatch(states, me)
        if diverged is not None:
            return CollectiveMismatchError(f"rank {self.rank}: {diverged} ({self.backend}: {cause}). What each rank was doing:\n{report}")
        if re.search(r"[Tt]imed? ?out", cause):
            return CollectiveTimeoutError(
                f"rank {self.rank}: {me.what} did not complete within {self.timeout:g} s ({self.backend}: {cause}). "
                f"What each rank was doing:\n{report}"
            )
        return CollectiveError(f"rank {self.rank}: {me.what} failed ({self.backend}: {cause}). What each rank was doing:\n{report}")


def describe(states: list[Status]) -> str:
    return "\n".join(f"  rank {r}: {s.describe()}" for r, s in enumerate(states))


def mismatch(states: list[Status], me: Status) -> str | None:
    """Text naming the ranks that called something else at ``me``'s call on its group, or None."""
    key = me.call_key()
    if key is None:
        return None
    at = {r: s for r, s in enumerate(states) if s.call_key() == key}
    if len({(s.op, s.axes, s.detail) for s in at.values()}) < 2:
        return None
    calls = ", ".join(f"rank {r} called {s.op} over {s.axes} ({s.detail})" for r, s in at.items())
    return (
        f"ranks diverged at call #{me.call} on group {me.group}: {calls}. Every rank of a group must call "
        "the same collectives with the same shapes in the same order"
    )


def transport_text(exc: BaseException) -> str:
    """The first line of a gloo error, without its source-file prefix."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)
    return re.split(r"(?<=\.)\s+(?=[A-Z])", line)[0]  # gloo's advice after the first sentence adds nothing


# ----------------------------------------------------------------------------- boards


def create_file(path: str, size: int) -> None:
    """The launcher's side: an empty board for ``size`` ranks."""
    with open(path, "wb") as f:
        f.truncate(size * SLOT)


def read_file(path: str, size: int) -> list[Status]:
    """Every rank's slot of a file board (the launcher reads it when a rank dies)."""
    try:
        with open(path, "rb") as f:
            data = f.read(size * SLOT)
    except OSError:
        return [Status("unknown")] * size
    return [decode(data[r * SLOT : (r + 1) * SLOT]) for r in range(size)]


def from_file(path: str, rank: int, size: int, timeout: float) -> Board:
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, size * SLOT)
    finally:
        os.close(fd)
    view = memoryview(mm)
    return Board(rank, size, timeout, view[rank * SLOT : (rank + 1) * SLOT], lambda r: bytes(view[r * SLOT : (r + 1) * SLOT]))


def from_store(store: Any, rank: int, size: int, timeout: float) -> Board:
    """A board over a ``torch.distributed`` store (torchrun: ranks may be on other machines)."""
    slot = bytearray(SLOT)
    key = "colofn/board/{}".format

    def read(r: int) -> bytes | None:
        try:
            return store.get(key(r)) if store.check([key(r)]) else None
        except Exception:  # noqa: BLE001 - the store is gone: no report from that rank
            return None

    board = Board(rank, size, timeout, slot, read)
    last = [b""]
    lock = threading.Lock()

    def publish() -> None:
        with lock:
            snap = bytes(slot)
            if snap != last[0]:
                try:
                    store.set(key(rank), snap)
                except Exception:  # noqa: BLE001 - diagnostics only
                    return
                last[0] = snap

    def loop() -> None:
        while not board.closed.wait(PUBLISH_PERIOD):
            publish()

    board.publish = publish
    board.wait_for_peers = lambda: time.sleep(2 * PUBLISH_PERIOD)  # their publishers run meanwhile
    threading.Thread(target=loop, name="colofn-board", daemon=True).start()
    return board


# ----------------------------------------------------------------------------- this process's board

_board: Board | None = None


def install(board: Board | None) -> None:
    global _board
    _board = board


def current() -> Board | None:
    """This process's board, or None (no real world joined, or inside a simulated rank)."""
    b = _board
    if b is None:
        return None
    return None if sim_backend._tls.world is not None else b
