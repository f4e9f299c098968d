"""Rank programs that break a real world on purpose (tests/test_gloo_failures.py).

Module-level, so gloo ranks can import them. Each scenario writes the error
text every rank saw to ``<out>/<scenario>.<rank>.txt`` (the world may end in an
error, which would lose return values), and ranks wait for each other through
files in ``out``, with deadlines, never by sleeping a guessed time.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import colofn
from colofn import _comm
from colofn._world import board


def _wait_for(path: Path, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {limit} s")
        time.sleep(0.01)


def _group() -> _comm.AxisGroup:
    return _comm.axis_group(colofn.Mesh((dist.get_world_size(),), ("x",)), ("x",))


def _leave() -> None:
    b = board.current()
    assert b is not None
    b.exited("left its group")
    dist.destroy_process_group()
    b.forget_groups()  # a new world: its groups count their calls from 0


def _join(out: Path, name: str, rank: int, timeout: float) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{out / ('store-' + name)}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=timeout),
    )


def _record(out: Path, scenario: str, e: BaseException) -> None:
    (out / f"{scenario}.{dist.get_rank()}.txt").write_text(f"{type(e).__name__}\n{e}")


def faults(out_dir: str, timeout: float) -> None:
    """Rank 1 away in its own code past the timeout, then a shape mismatch (which ends the world)."""
    out = Path(out_dir)
    rank = dist.get_rank()
    g = _group()
    _comm.all_reduce(torch.ones(4), g)  # call #0 on the group: everyone agrees

    # 1. rank 1 does not come to rank 0's all_reduce until rank 0 has timed out
    if rank == 0:
        t0 = time.monotonic()
        try:
            _comm.all_reduce(torch.ones(4), g)
        except colofn.errors.CollectiveTimeoutError as e:
            _record(out, "away", e)
            (out / "away.seconds").write_text(f"{time.monotonic() - t0:.3f}")
        (out / "away.done").touch()
    else:
        _wait_for(out / "away.done")
    _leave()  # a gloo group is dead after a failure: meet again in a new one
    _join(out, "a", rank, timeout)
    g = _group()

    # 2. the same collective with another shape: gloo aborts the receiving process
    (out / f"shape.{rank}.start").write_text(str(time.time()))
    _comm.all_reduce(torch.ones(4 if rank == 0 else 8), g)


def diverge(out_dir: str) -> None:
    """Rank 0 all-reduces while rank 1 all-gathers: they never meet; the launcher notices."""
    out = Path(out_dir)
    g = _group()
    _comm.all_reduce(torch.ones(3), g)
    (out / f"diverge.{dist.get_rank()}.start").write_text(str(time.time()))
    if dist.get_rank() == 0:
        _comm.all_reduce(torch.ones(6), g)
    else:
        _comm.all_gather(torch.ones(3), g, 0)


def forever(out_dir: str) -> None:
    """Write this rank's pid, then work until killed (what a long training run does)."""
    Path(out_dir, f"rank{dist.get_rank()}.{os.getpid()}.pid").touch()
    while True:
        time.sleep(0.05)  # the work: this rank is busy in its own code, not waiting on anyone
