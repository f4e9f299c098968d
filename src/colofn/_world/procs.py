"""The real world: every rank a process in a ``torch.distributed`` job on this machine.

Used by ``colofn.launch(fn, world_size=N, backend="gloo")``. Processes are started
with the ``spawn`` method, meet through a ``FileStore`` in a private temporary
directory (no ports to race for) and run with a collective timeout, so a hang
becomes an error instead of gloo's default 30-minute wait.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import re
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from colofn.errors import CollectiveTimeoutError


def _worker(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rank: int,
    size: int,
    store_path: str,
    backend: str,
    timeout: float,
    results: Any,
) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size))
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            value = fn(*args, **kwargs)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))
    except BaseException as e:  # noqa: BLE001 - sent to the launcher
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(e)
        except Exception:  # noqa: BLE001 - an unpicklable exception
            payload = pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"))
        results.put((rank, False, (payload, tb)))


_SECONDARY = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|[Tt]imed out|Read error|Write error|"
    r"NCCL communicator was aborted"
)


def _secondary(e: BaseException) -> bool:
    """Whether ``e`` is a transport error that another rank's failure can cause."""
    return isinstance(e, RuntimeError) and bool(_SECONDARY.search(str(e)))


def run(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    world_size: int,
    timeout: float,
    backend: str,
) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="colofn-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, args, kwargs, r, world_size, store, backend, timeout, results),
                name=f"colofn-rank-{r}",
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        values: dict[int, Any] = {}
        failures: list[tuple[int, BaseException, str]] = []
        deadline: float | None = None
        try:
            while len(values) + len(failures) < world_size:
                try:
                    rank, ok, payload = results.get(timeout=0.5)
                except queue.Empty:
                    dead = [
                        r for r, p in enumerate(procs)
                        if not p.is_alive() and r not in values and r not in {f[0] for f in failures}
                    ]
                    for r in dead:  # died without reporting (killed, segfault, os._exit)
                        failures.append((r, RuntimeError(f"rank {r} exited with code {procs[r].exitcode} without a result"), ""))
                    if deadline is None and (failures or values):
                        deadline = time.monotonic() + timeout + 10
                    if deadline is not None and time.monotonic() > deadline:
                        missing = sorted(set(range(world_size)) - set(values) - {f[0] for f in failures})
                        raise CollectiveTimeoutError(
                            f"Ranks {missing} of a gloo world of {world_size} did not finish within "
                            f"{timeout:g} s after the others stopped; they were killed."
                        ) from (failures[0][1] if failures else None)
                    continue
                if ok:
                    values[rank] = pickle.loads(payload)
                else:
                    exc_bytes, tb = payload
                    failures.append((rank, pickle.loads(exc_bytes), tb))
                if deadline is None:
                    deadline = time.monotonic() + timeout + 10
        finally:
            for p in procs:
                p.join(timeout=5 if not failures else 0.5)
                if p.is_alive():
                    p.kill()
                    p.join()
    if failures:
        # Prefer a user error over the collective errors it caused in the other ranks
        # (a peer that raised closes its sockets: the others read "Connection reset by
        # peer", "Connection closed by peer", "Broken pipe" or time out).
        failures.sort(key=lambda f: (_secondary(f[1]), f[0]))
        rank, exc, tb = failures[0]
        if hasattr(exc, "add_note"):
            exc.add_note(f"(raised on rank {rank} of a {backend} world of {world_size})")
            if tb:
                exc.add_note("Traceback in that rank:\n" + tb)
        raise exc
    return [values[r] for r in range(world_size)]
