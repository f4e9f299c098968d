"""Where a training step's time goes on each rank: compute, communication, wait.

What one rank can measure of its own step is the time its thread is
*blocked* on communication: inside ``Work.wait`` of ``torch.distributed``
(every blocking collective waits there too, as do colofn's asynchronous
gradient buckets, reduce-scatters and pipeline transfers when they are
waited for). :class:`BlockedClock` adds those intervals up per thread (each
simulated rank is a thread), so one step's ``blocked`` time is known on
every rank.

Blocked time is two things a rank cannot tell apart alone: the transfer
itself (not hidden behind compute) and waiting for a slower peer to arrive.
:func:`split` separates them across ranks: in each step the rank that was
blocked least waited least for its peers, so its blocked time bounds the
transfers from above; that is the step's *communication*, the same on every
rank, and each rank's blocked time beyond it is its *wait*. The rest of the
step is *compute*: kernels, Python, and launching collectives (copying into
their buffers), everything but being blocked.

What it cannot see: transfers fully overlapped with compute (they cost no
blocked time, only CPU the compute then lacks), a slow peer hidden behind an
asynchronous operation that completed before it was waited for, time a
rank's thread is descheduled by the operating system (counted where it
happens), and waits inside DTensor's functional collectives that finish
without a Python ``wait``.

>>> split([[10.0, 4.0], [12.0, 6.0]], [[3.0, 1.0], [5.0, 2.0]])  # 2 ranks, 2 steps
{'step': [7.0, 9.0], 'compute': [5.0, 5.5], 'communication': [2.0, 2.0], 'wait': [0.0, 1.5]}
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

__all__ = ["BlockedClock", "split"]

_local = threading.local()
_lock = threading.Lock()
_installed: dict[type, Callable[..., Any]] = {}  # class -> its own wait, while timed
_users = 0


def _timed(wait: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(wait)
    def timed_wait(self: Any, *args: Any, **kwargs: Any) -> Any:
        clock = getattr(_local, "clock", None)
        if clock is None:
            return wait(self, *args, **kwargs)
        t0 = time.perf_counter()
        try:
            return wait(self, *args, **kwargs)
        finally:
            clock.blocked += time.perf_counter() - t0

    return timed_wait


def _work_classes() -> list[type]:
    """``dist.Work`` and its subclasses that define their own ``wait`` (a simulated world's)."""
    out: list[type] = []
    todo: list[type] = [dist.Work]
    while todo:
        c = todo.pop()
        todo += c.__subclasses__()
        if "wait" in c.__dict__:
            out.append(c)
    return out


class BlockedClock:
    """Seconds this thread spends blocked in ``torch.distributed``'s ``Work.wait``, while open.

    ``with BlockedClock() as clock: ...`` then ``clock.blocked``. While any
    clock is open, ``Work.wait`` (and a subclass's own) is wrapped to time
    itself for the threads that opened one; other threads pay one attribute
    look-up. The original methods come back when the last clock closes.

    >>> import colofn, torch, torch.distributed as dist
    >>> def f():
    ...     with BlockedClock() as clock:
    ...         dist.all_reduce(torch.ones(1))  # a blocking collective waits in Work.wait
    ...     return clock.blocked > 0
    >>> colofn.launch(f, world_size=2)
    [True, True]
    """

    def __init__(self) -> None:
        self.blocked = 0.0

    def __enter__(self) -> BlockedClock:
        global _users
        with _lock:
            if _users == 0:
                for c in _work_classes():
                    _installed[c] = c.__dict__["wait"]
                    setattr(c, "wait", _timed(c.__dict__["wait"]))  # noqa: B010 - any Work class
            _users += 1
        self._outer = getattr(_local, "clock", None)
        _local.clock = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _users
        _local.clock = self._outer
        with _lock:
            _users -= 1
            if _users == 0:
                for c, wait in _installed.items():
                    setattr(c, "wait", wait)  # noqa: B010
                _installed.clear()


def split(step_s: list[list[float]], blocked_s: list[list[float]]) -> dict[str, list[float]]:
    """Per-rank means of a step's ``compute`` / ``communication`` / ``wait`` (and the ``step``), seconds.

    ``step_s[r][i]`` and ``blocked_s[r][i]``: rank ``r``'s wall time of step
    ``i`` and its blocked part. Each step's communication is the least blocked
    time of any rank; a rank's wait is its blocked time beyond that; compute
    is the rest of its step. Means, so that on each rank the three parts add
    up to its mean step.
    """
    ranks, steps = len(step_s), len(step_s[0])
    comm = [min(blocked_s[r][i] for r in range(ranks)) for i in range(steps)]
    out: dict[str, list[float]] = {"step": [], "compute": [], "communication": [], "wait": []}
    for r in range(ranks):
        out["step"].append(sum(step_s[r]) / steps)
        out["compute"].append(sum(step_s[r][i] - blocked_s[r][i] for i in range(steps)) / steps)
        out["communication"].append(sum(comm) / steps)
        out["wait"].append(sum(blocked_s[r][i] - comm[i] for i in range(steps)) / steps)
    return out
