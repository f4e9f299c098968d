"""The simulated world: every rank a persistent thread of this process.

Three pieces of torch state are per *process*, and a simulated world needs them
per *rank*:

1. ``torch.distributed``'s Python registry of process groups (``c10d._world``):
   replaced, once, by :class:`_PerRankC10dWorld`, which keeps one registry per
   rank thread and falls through to the process's own registry everywhere else
   (so a real ``init_process_group`` in the main thread keeps working).
2. The C++ registry that resolves group names for functional collectives:
   torch's "thread isolation mode" gives each thread its own.
3. ``DeviceMesh`` equality/hash, which DTensor's sharding-propagation and
   redistribute caches key on: torch adds the thread id only for its own
   test backend. We set it for ours to a value unique to the (world, rank
   thread) pair, so a cached plan is only ever reused by the rank and the world
   it was computed for. (The thread id alone is not enough: rank ``r`` of every
   world runs on the same persistent thread, and a cached output spec from an
   earlier world carried that world's ``DeviceMesh``, whose group names then
   resolved to other groups of the new world.) ``tests/test_sim_world.py`` runs
   hundreds of consecutive worlds with uneven redistributes to prove it.
"""

from __future__ import annotations

import importlib
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from colofn._world import sim_backend
from colofn._world.sim_backend import SimWorld
from colofn.errors import CollectiveTimeoutError, DeadlockError, WorldError

# ----------------------------------------------------------------------------- per-rank c10d state


class _RankState:
    def __init__(self) -> None:
        self.default_pg: Any = None
        self.pg_map: dict[Any, Any] = {}
        self.pg_names: dict[Any, str] = {}
        self.pg_group_ranks: dict[Any, dict[int, int]] = {}
        self.pg_backend_config: dict[Any, str] = {}
        self.group_count = 0
        self.tags_to_pg: dict[str, list[Any]] = {}
        self.pg_to_tag: dict[Any, str] = {}
        self.pg_coalesce_state: dict[Any, list[Any]] = {}
        self.comms: list[Any] = []


def _delegating(name: str, settable: bool = False) -> property:
    def get(self: _PerRankC10dWorld) -> Any:
        s = self._state()
        return getattr(s, name) if s is not None else getattr(self._fallback, name)

    def set_(self: _PerRankC10dWorld, value: Any) -> None:
        s = self._state()
        setattr(s if s is not None else self._fallback, name, value)

    return property(get, set_ if settable else None)


class _PerRankC10dWorld(c10d._World):
    """``c10d._world`` with one registry per simulated rank thread."""

    def __init__(self, fallback: c10d._World) -> None:
        super().__init__()
        self._fallback = fallback
        self._local = threading.local()

    def _state(self) -> _RankState | None:
        if sim_backend.current() is None:
            return None
        s = getattr(self._local, "state", None)
        if s is None:
            s = self._local.state = _RankState()
        return s

    def reset_rank(self) -> None:
        self._local.state = None

    default_pg = _delegating("default_pg", settable=True)
    pg_map = _delegating("pg_map")
    pg_names = _delegating("pg_names")
    pg_group_ranks = _delegating("pg_group_ranks")
    pg_backend_config = _delegating("pg_backend_config")
    group_count = _delegating("group_count", settable=True)
    tags_to_pg = _delegating("tags_to_pg")
    pg_to_tag = _delegating("pg_to_tag")
    pg_coalesce_state = _delegating("pg_coalesce_state")
    comms = _delegating("comms")


_install_lock = threading.Lock()
_installed: _PerRankC10dWorld | None = None


def _install() -> _PerRankC10dWorld:
    """Make torch.distributed rank-aware for simulated worlds (idempotent)."""
    global _installed
    with _install_lock:
        if _installed is not None and c10d._world is _installed:
            return _installed
        sim_backend.register()
        # torch.distributed.nn.functional binds group=group.WORLD as a default argument at
        # import. Imported first inside a rank, it would keep that rank's group (and its
        # world) alive and hand it to later worlds; imported here, the default is None.
        importlib.import_module("torch.distributed.nn")

        _installed = _PerRankC10dWorld(c10d._world)
        c10d._world = _installed
        torch._C._distributed_c10d._set_thread_isolation_mode(True)  # type: ignore[attr-defined]
        _patch_device_mesh()
        return _installed


def _patch_device_mesh() -> None:
    from torch.distributed.device_mesh import DeviceMesh

    if getattr(DeviceMesh.__init__, "_colofn", False):
        return
    original = DeviceMesh.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        cur = sim_backend.current()
        if cur is not None:
            # Unique per (world, thread): meshes of other ranks and of earlier worlds
            # never compare equal, so DTensor's caches never hand one their entries.
            self._thread_id = (cur[0].serial << 64) | threading.get_ident()
            self._hash = None

    __init__._colofn = True  # type: ignore[attr-defined]
    DeviceMesh.__init__ = __init__  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- rank threads


@dataclass
class _Outcome:
    value: Any = None
    error: BaseException | None = None
    failed_at: float = 0.0
    done: threading.Event = None  # type: ignore[assignment]


class _RankThread:
    """A daemon thread that runs rank ``index`` of every simulated world."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self.retired = False  # set when abandoned: the thread ends after its current job
        self.thread = threading.Thread(target=self._loop, name=f"colofn-rank-{index}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.retired:
            self.jobs.get()()


_threads: list[_RankThread] = []
_threads_lock = threading.Lock()
_launch_lock = threading.Lock()


def _rank_threads(n: int) -> list[_RankThread]:
    with _threads_lock:
        while len(_threads) < n:
            _threads.append(_RankThread(len(_threads)))
        return _threads[:n]


def rank_thread_count() -> int:
    """Rank threads started so far (every later world reuses them)."""
    with _threads_lock:
        return len(_threads)


def _abandon(index: int) -> None:
    """Replace a rank thread stuck in user code (it can't be killed; it is left behind)."""
    with _threads_lock:
        old = _threads[index]
        old.retired = True
        old.jobs.put(lambda: None)  # wakes it if its job ended after all, so it can exit
        _threads[index] = _RankThread(index)


def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], world_size: int, timeout: float) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on every rank of a new simulated world; see ``colofn.launch``."""
    # Checked before taking the lock: the outer launch holds it while it waits for this rank.
    outer = sim_backend.current()
    if outer is not None:
        raise WorldError(
            "colofn.launch(backend='sim') cannot be nested inside a simulated world "
            f"(called from rank {outer[1]}); call the function directly, "
            "or launch the worlds one after the other"
        )
    c10d_world = _install()
    with _launch_lock:  # one simulated world at a time per process
        world = SimWorld(world_size, timeout)
        outcomes = [_Outcome(done=threading.Event()) for _ in range(world_size)]
        saved_hook = sys.excepthook
        threads = _rank_threads(world_size)
        try:
            for r, t in enumerate(threads):
                t.jobs.put(_job(fn, args, kwargs, world, r, outcomes[r], c10d_world))
            stuck = _join(world, outcomes, timeout)
        finally:
            sys.excepthook = saved_hook
        for r in stuck:
            _abandon(r)
        _forget_dtensor_caches(this_thread=False)
    return _results(world, outcomes, stuck)


def _job(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    world: SimWorld,
    rank: int,
    out: _Outcome,
    c10d_world: _PerRankC10dWorld,
) -> Callable[[], None]:
    def job() -> None:
        sim_backend._tls.world, sim_backend._tls.rank = world, rank
        c10d_world.reset_rank()
        how = "returned"
        try:
            dist.init_process_group(
                sim_backend.BACKEND_NAME, rank=rank, world_size=world.size, store=world.store
            )
            out.value = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the launcher
            out.error, out.failed_at = e, time.monotonic()
            how = f"raised {type(e).__name__}"
        finally:
            world.rank_exited(rank, how)
            try:
                if dist.is_initialized():
                    dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - teardown of a failed world
                pass
            c10d_world.reset_rank()
            _forget_dtensor_caches(this_thread=True)
            sim_backend._tls.world = None
            out.done.set()

    return job


def _forget_dtensor_caches(this_thread: bool) -> None:
    """Drop DTensor's cache entries of a finished world.

    They can never hit again (every world's meshes are distinct) and they keep the
    world's meshes and process groups alive: about 140 KB per world otherwise.
    The sharding-propagation caches are per thread (clear them in each rank
    thread); the redistribute planner's are global (clear them from the launcher).
    """
    if "torch.distributed.tensor" not in sys.modules:
        return  # DTensor never used in this process: nothing cached
    try:
        if this_thread:
            from torch.distributed.tensor.debug import _clear_sharding_prop_cache

            _clear_sharding_prop_cache()
        else:
            from torch.distributed.tensor._collective_utils import MeshTopoInfo
            from torch.distributed.tensor._redistribute import (
                _gen_transform_infos,
                clear_redistribute_planner_cache,
            )

            _gen_transform_infos.cache_clear()
            clear_redistribute_planner_cache()
            MeshTopoInfo.build_from_mesh.cache_clear()
    except (ImportError, AttributeError):  # private torch API moved: only memory is at stake
        pass


def _join(world: SimWorld, outcomes: list[_Outcome], timeout: float) -> list[int]:
    """Wait for every rank; returns the ranks still running ``timeout`` after the first exit."""
    with world.cond:
        deadline: float | None = None
        while len(world.exited) < world.size:
            if world.exited and deadline is None:
                deadline = time.monotonic() + timeout
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                stuck = [r for r in range(world.size) if r not in world.exited]
                if world.failure is None:
                    world.failure = "the launcher gave up waiting for ranks " + str(stuck)
                world.cond.notify_all()
                return stuck
            world.cond.wait(remaining)
    for o in outcomes:
        o.done.wait()  # teardown after the exit was recorded; never blocks on peers
    return []


def _results(world: SimWorld, outcomes: list[_Outcome], stuck: list[int]) -> list[Any]:
    errors = [(r, o) for r, o in enumerate(outcomes) if o.error is not None]
    if stuck:
        raise CollectiveTimeoutError(
            f"Ranks {stuck} of a simulated world of {world.size} were still running user code "
            f"{world.timeout:g} s after the other ranks stopped"
            + (f" (rank {errors[0][0]} raised {type(errors[0][1].error).__name__})" if errors else "")
            + ". They were left behind; check them for an infinite loop or a missing collective."
        ) from (errors[0][1].error if errors else None)
    if not errors:
        return [o.value for o in outcomes]
    # The root cause: the earliest failure that is not a consequence of another rank's failure.
    primary = [(r, o) for r, o in errors if not isinstance(o.error, DeadlockError | CollectiveTimeoutError)]
    r, o = min(primary or errors, key=lambda ro: ro[1].failed_at)
    exc = o.error
    assert exc is not None
    note = f"(raised on rank {r} of a simulated world of {world.size})"
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    raise exc
