"""Starting worlds and asking where we are in one.

A *world* is a set of ranks running the same program (multi-controller SPMD).

* ``launch(fn, *args, world_size=N)`` runs ``fn`` on a *simulated* world: each
  rank a thread of this process, over colofn's in-process backend.
* ``launch(fn, *args, world_size=N, backend="gloo")`` runs ``fn`` in N real
  processes (``fn`` and its arguments must be picklable: a module-level function).
* Under ``torchrun`` a script calls :func:`initialize` (or just builds a
  :class:`~colofn.Mesh`, which calls it) and runs unchanged.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist

from colofn.errors import WorldError

__all__ = ["DEFAULT_TIMEOUT", "initialize", "launch", "process_count", "process_index"]

Backend = Literal["sim", "gloo", "nccl"]
_BACKENDS = ("sim", "gloo", "nccl")

DEFAULT_TIMEOUT = float(os.environ.get("COLOFN_TIMEOUT", "120"))
"""Seconds a rank may wait in one collective (env ``COLOFN_TIMEOUT``; default 120)."""


def launch(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int,
    backend: Backend = "sim",
    timeout: float | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on every rank of a new world; return the per-rank results.

    Args:
      fn: the program every rank runs.
      world_size: number of ranks (>= 1).
      backend: ``"sim"`` (threads of this process, the default), ``"gloo"`` or
        ``"nccl"`` (one process per rank on this machine).
      timeout: seconds a rank may wait in one collective (default
        :data:`DEFAULT_TIMEOUT`); in the simulated world a deadlock is reported
        as soon as it is certain, without waiting for the timeout.

    Returns:
      Each rank's return value, by rank. On ``gloo``/``nccl`` the values travel
      as data (``torch.save`` read back with ``weights_only=True``): tensors,
      numbers, str, None, torch dtypes and sizes, and lists, tuples and dicts
      of them; anything else is a :class:`~colofn.errors.TreeTypeError` in the
      rank.

    Raises:
      WorldError: before anything starts, for a bad argument, a world larger
        than the machine can hold, or (``gloo``) a function new processes
        cannot import (define it at module level).
      The first rank's exception (its notes name the rank; on ``gloo`` only
      builtin and :mod:`colofn.errors` types are rebuilt, others become a
      :class:`~colofn.errors.RankError` keeping the text). Ranks that diverge
      (wait in collectives the others never call) raise
      :class:`~colofn.errors.DeadlockError` or
      :class:`~colofn.errors.CollectiveMismatchError`; a hang raises
      :class:`~colofn.errors.CollectiveTimeoutError` after ``timeout``.

    >>> import colofn
    >>> colofn.launch(lambda: colofn.process_index() * 10, world_size=3)
    [0, 10, 20]
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise WorldError(f"launch needs world_size to be an int >= 1, got {world_size!r}")
    if backend not in _BACKENDS:
        raise WorldError(f"launch: unknown backend {backend!r}; choose one of {', '.join(map(repr, _BACKENDS))}")
    if not callable(fn):
        raise TypeError(f"launch needs a callable, got {type(fn).__name__}")
    t = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if not t > 0:
        raise WorldError(f"launch needs timeout > 0 seconds, got {timeout!r}")
    from colofn._world import limits

    if backend == "sim":
        from colofn._world import sim
        from colofn.nn import _guard

        _guard.install()  # report one nn.Module reparametrized by two ranks at once

        limits.check_world_size(world_size, backend, existing_threads=sim.rank_thread_count())
        return sim.run(fn, args, kwargs, world_size, t)
    from colofn._world import procs

    limits.check_world_size(world_size, backend)
    return procs.run(fn, args, kwargs, world_size, t, backend)


def in_simulated_world() -> bool:
    from colofn._world import sim_backend

    return sim_backend.current() is not None


def initialize(backend: str | None = None, timeout: float | None = None) -> None:
    """Join the world this process was started in, if not joined yet (like ``jax.distributed.initialize``).

    Inside ``launch`` this does nothing. Under ``torchrun`` (``RANK``/``WORLD_SIZE``
    set) it calls ``init_process_group`` with ``backend`` (default: NCCL when CUDA
    is available, else gloo) and a timeout. Otherwise it starts a world of one
    process, so a script also runs as plain ``python script.py``.
    """
    if dist.is_initialized():
        return
    atexit.register(_leave_world)
    t = datetime.timedelta(seconds=DEFAULT_TIMEOUT if timeout is None else timeout)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=t)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _install_board(t.total_seconds())
        return
    # A world of one meets only itself: an in-memory store, nothing left on disk
    # (a FileStore here left a colofn-single-* directory behind every run).
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=t)


def _install_board(timeout: float) -> None:
    """Publish what this rank is doing to the job's store, for readable collective failures."""
    from colofn._world import board

    if dist.get_world_size() < 2:
        return
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private torch API: diagnostics only
        return
    b = board.from_store(store, dist.get_rank(), dist.get_world_size(), timeout)
    b.backend = str(dist.get_backend())
    board.install(b)


def _leave_world() -> None:
    """At exit, leave the world :func:`initialize` joined, all ranks together.

    A process that exits with a live gloo group while a peer is still tearing
    down can abort ("terminate called without an active exception"), which
    torchrun reports as a failed run: synchronise, then destroy the group.
    """
    if not dist.is_initialized():
        return
    from colofn._world import board

    b = board.current()
    if b is not None:
        b.exited("left the world at exit")
    try:
        if dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _in_world() -> bool:
    """Whether this process is in a world, joining the one ``torchrun`` started first if need be.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) a process that has not joined
    yet joins now, as :func:`initialize` does, so that it never answers as a
    world of one while its peers are ranks of a larger world.
    """
    if dist.is_initialized():
        return True
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        initialize()
        return True
    return False


def process_index() -> int:
    """This rank's index in the world (0 outside any world).

    Under ``torchrun``, called before any :class:`~colofn.Mesh`, it joins the
    world first (as :func:`initialize` does), or raises if it cannot.
    """
    return dist.get_rank() if _in_world() else 0


def process_count() -> int:
    """The number of ranks in the world (1 outside any world; under ``torchrun`` it joins first)."""
    return dist.get_world_size() if _in_world() else 1
