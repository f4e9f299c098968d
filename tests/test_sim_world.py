"""The simulated world: plain torch.distributed on rank threads over the colofn_sim backend.

Every collective is checked against values computed serially (tests/_programs.py,
shared with the real gloo tests); every failure mode against its error text;
and hundreds of consecutive random worlds against wrong results, hangs and leaks.
"""

from __future__ import annotations

import gc
import random
import re
import sys
import threading
import time
import weakref
from typing import Any

import pytest
import torch
import torch.distributed as dist

import _programs  # a module of tests/ (on sys.path under pytest), shared with the gloo tests
import colofn
from colofn._world import sim, sim_backend
from colofn.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    DeadlockError,
    WorldError,
)

SIZES = (1, 2, 3, 4, 8)
FAST = 5.0  # seconds: "reported immediately" means well under this (the timeout is 60)


def _launch(fn: Any, *args: Any, world_size: int, timeout: float = 60, **kw: Any) -> list[Any]:
    return colofn.launch(fn, *args, world_size=world_size, timeout=timeout, **kw)


# ----------------------------------------------------------------------------- every collective


@pytest.mark.parametrize("world_size", SIZES)
@pytest.mark.parametrize("check", list(_programs.CHECKS))
def test_collective(check: str, world_size: int) -> None:
    assert _launch(_programs.run_checks, [check], world_size=world_size) == [[check]] * world_size


def test_world_basics() -> None:
    assert _launch(_programs.world_info, world_size=3) == [(r, 3, "colofn_sim") for r in range(3)]
    assert _launch(lambda: (colofn.process_index(), colofn.process_count()), world_size=2) == [
        (0, 2),
        (1, 2),
    ]
    assert _launch(lambda a, *, b: a + b + dist.get_rank(), 10, b=5, world_size=2) == [15, 16]
    # outside any world
    assert (colofn.process_index(), colofn.process_count()) == (0, 1)


def test_default_timeout_and_env() -> None:
    from colofn.world import DEFAULT_TIMEOUT

    assert DEFAULT_TIMEOUT > 0
    seen = _launch(lambda: sim_backend.current()[0].timeout, world_size=2, timeout=7.5)
    assert seen == [7.5, 7.5]


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2", None])
def test_bad_world_size(bad: Any) -> None:
    with pytest.raises(WorldError) as e:
        colofn.launch(lambda: 0, world_size=bad)
    assert str(e.value) == f"launch needs world_size to be an int >= 1, got {bad!r}"
    assert isinstance(e.value, ValueError)


def test_bad_backend_timeout_and_fn() -> None:
    with pytest.raises(WorldError) as e:
        colofn.launch(lambda: 0, world_size=2, backend="mpi")  # type: ignore[arg-type]
    assert str(e.value) == "launch: unknown backend 'mpi'; choose one of 'sim', 'gloo', 'nccl'"
    with pytest.raises(WorldError, match=r"launch needs timeout > 0 seconds, got 0"):
        colofn.launch(lambda: 0, world_size=2, timeout=0)
    with pytest.raises(TypeError, match="launch needs a callable, got int"):
        colofn.launch(3, world_size=2)  # type: ignore[arg-type]


def test_sim_backend_outside_a_world() -> None:
    sim._install()
    with pytest.raises(
        RuntimeError, match="The colofn_sim backend only works inside a simulated world"
    ):
        dist.init_process_group(
            sim_backend.BACKEND_NAME, rank=0, world_size=1, store=dist.HashStore()
        )
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------- failures


def _raise_on_2() -> None:
    if dist.get_rank() == 2:
        raise KeyError("boom")
    dist.barrier()


def test_rank_exception_is_reraised_with_rank_named() -> None:
    t0 = time.perf_counter()
    with pytest.raises(KeyError) as e:
        _launch(_raise_on_2, world_size=4)
    assert time.perf_counter() - t0 < FAST
    assert e.value.args == ("boom",)
    assert e.value.__notes__ == ["(raised on rank 2 of a simulated world of 4)"]


def test_rank_raising_after_others_returned() -> None:
    def f() -> int:
        if dist.get_rank() == 1:
            raise ValueError("late")
        return 0

    with pytest.raises(ValueError, match="late") as e:
        _launch(f, world_size=3)
    assert e.value.__notes__ == ["(raised on rank 1 of a simulated world of 3)"]


def test_ranks_diverging_raise_collective_mismatch() -> None:
    def f() -> None:
        t = torch.ones(2)
        if dist.get_rank() == 0:
            dist.all_reduce(t)
        else:
            dist.broadcast(t, src=0)

    t0 = time.perf_counter()
    with pytest.raises(CollectiveMismatchError) as e:
        _launch(f, world_size=3)
    assert time.perf_counter() - t0 < FAST
    assert re.fullmatch(
        r"rank \d: Ranks diverged at call #0 on group \[0, 1, 2\]: rank 0 called all_reduce, "
        r"rank 1 called broadcast\(root=0\), rank 2 called broadcast\(root=0\)\. Every rank of a "
        r"group must call the same collectives in the same order\.",
        str(e.value),
    )
    assert isinstance(e.value, RuntimeError)


def test_different_roots_and_shapes_are_mismatches() -> None:
    with pytest.raises(
        CollectiveMismatchError,
        match=r"rank 0 called broadcast\(root=0\), rank 1 called broadcast\(root=1\)",
    ):
        _launch(lambda: dist.broadcast(torch.ones(2), src=dist.get_rank()), world_size=2)
    with pytest.raises(
        CollectiveMismatchError,
        match=r"all_reduce on group \[0, 1\] failed: RuntimeError: stack expects each tensor to be equal size",
    ):
        _launch(lambda: dist.all_reduce(torch.ones(dist.get_rank() + 1)), world_size=2)

    def p2p() -> None:
        if dist.get_rank() == 0:
            dist.send(torch.ones(2), 1)
        else:
            dist.recv(torch.ones(3), 0)

    with pytest.raises(CollectiveMismatchError) as e:
        _launch(p2p, world_size=2)
    assert str(e.value).endswith(
        "p2p from rank 0 to rank 1 (tag 0): sent (2,) torch.float32 into a recv buffer of (3,) torch.float32"
    )


def test_recv_without_send_is_a_deadlock_reported_at_once() -> None:
    def f() -> None:
        if dist.get_rank() == 1:
            dist.recv(torch.ones(2), 0)

    t0 = time.perf_counter()
    with pytest.raises(DeadlockError) as e:
        _launch(f, world_size=2, timeout=60)
    assert time.perf_counter() - t0 < FAST
    assert str(e.value) == (
        "rank 1: recv from rank 0 (tag 0, (2,) torch.float32) cannot complete. Simulated world "
        "deadlocked (every live rank is blocked and none can proceed). What each rank was doing:\n"
        "  rank 0: exited (returned)\n"
        "  rank 1: waiting in recv from rank 0 (tag 0, (2,) torch.float32)\n"
        "Every rank must call the same collectives on the same groups in the same order, and "
        "every recv needs a matching send."
    )
    assert e.value.__notes__ == ["(raised on rank 1 of a simulated world of 2)"]


def test_mutual_blocking_sends_deadlock_at_once() -> None:
    def f() -> None:
        peer = 1 - dist.get_rank()
        dist.send(torch.ones(2), peer)  # rendezvous semantics, like gloo: never completes
        dist.recv(torch.ones(2), peer)

    t0 = time.perf_counter()
    with pytest.raises(DeadlockError) as e:
        _launch(f, world_size=2, timeout=60)
    assert time.perf_counter() - t0 < FAST
    text = str(e.value)
    assert "Simulated world deadlocked (every live rank is blocked and none can proceed)" in text
    assert "  rank 0: waiting in send to rank 1 (tag 0, (2,) torch.float32)\n" in text
    assert "  rank 1: waiting in send to rank 0 (tag 0, (2,) torch.float32)\n" in text


def test_deadlock_report_when_a_peer_raised() -> None:
    reports: dict[int, str] = {}

    def f() -> None:
        try:
            _raise_on_2()
        except DeadlockError as e:
            reports[dist.get_rank()] = str(e)
            raise

    with pytest.raises(KeyError):
        _launch(f, world_size=3)
    assert sorted(reports) == [0, 1]
    assert "Simulated world deadlocked (because rank 2 raised KeyError)" in reports[0]
    assert "  rank 2: exited (raised KeyError)\n" in reports[0]


def test_rank_stuck_in_user_code_times_out() -> None:
    release = threading.Event()
    old = sim._rank_threads(2)[1]

    def f() -> None:
        if dist.get_rank() == 1:
            release.wait(60)  # "user code" that never reaches the collective (until released)
        else:
            dist.all_reduce(torch.ones(2))

    t0 = time.perf_counter()
    try:
        with pytest.raises(CollectiveTimeoutError) as e:
            _launch(f, world_size=2, timeout=0.3)
        elapsed = time.perf_counter() - t0
    finally:
        release.set()
    assert 0.5 <= elapsed < FAST  # rank 0 waits 0.3 s in all_reduce, then the launcher 0.3 s more
    assert str(e.value) == (
        "Ranks [1] of a simulated world of 2 were still running user code 0.3 s after the other "
        "ranks stopped (rank 0 raised CollectiveTimeoutError). They were left behind; check them "
        "for an infinite loop or a missing collective."
    )
    assert str(e.value.__cause__) == (
        "rank 0: all_reduce on group [0, 1] (call #0) did not complete within 0.3 s. What each "
        "rank was doing:\n"
        "  rank 0: waiting in all_reduce on group [0, 1] (call #0)\n"
        "  rank 1: running (not in a collective)"
    )
    # The stuck thread was replaced; once released it finishes and exits.
    assert sim._rank_threads(2)[1] is not old
    old.thread.join(10)
    assert not old.thread.is_alive()
    # ...and the next world runs normally.
    assert _launch(_programs.run_checks, ["all_reduce"], world_size=2) == [["all_reduce"]] * 2


def test_nested_launch_is_an_error_not_a_hang() -> None:
    def f() -> list[Any]:
        return colofn.launch(lambda: 1, world_size=2)

    t0 = time.perf_counter()
    with pytest.raises(WorldError) as e:
        _launch(f, world_size=2)
    assert time.perf_counter() - t0 < FAST
    assert re.fullmatch(
        r"colofn\.launch\(backend='sim'\) cannot be nested inside a simulated world \(called from "
        r"rank [01]\); call the function directly, or launch the worlds one after the other",
        str(e.value),
    )


# ----------------------------------------------------------------------------- isolation and leaks


def _extra_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    ranks = {t.thread for t in sim._threads}
    return [t for t in threading.enumerate() if t not in before and t not in ranks]


def test_no_leaks_after_worlds() -> None:
    sim._rank_threads(8)  # the persistent rank threads exist from here on (more if a larger world ran before)
    kept = len(sim._threads)
    before = set(threading.enumerate())
    hook = sys.excepthook
    for n in (8, 3, 1, 4):
        _launch(_programs.run_checks, None, world_size=n)
        with pytest.raises(KeyError):
            _launch(_raise_on_2, world_size=max(n, 3))
    assert _extra_threads(before) == []
    assert len(sim._threads) == kept and all(t.thread.is_alive() for t in sim._threads)
    assert sys.excepthook is hook
    assert not dist.is_initialized()
    assert sim_backend.current() is None
    assert dist.distributed_c10d._world.pg_map == {}  # the main thread's registry is untouched


def _dtensor_world(refs: list[tuple[int, str, Any]]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2))
    d = distribute_tensor(torch.ones(5, 3), mesh, [Shard(0), Shard(1)])
    d = (d * 2).redistribute(mesh, [Replicate(), Shard(0)])
    r = dist.get_rank()
    refs += [
        (r, "mesh", weakref.ref(mesh)),
        (r, "dtensor", weakref.ref(d)),
        (r, "group", weakref.ref(dist.group.WORLD)),
        (r, "world", weakref.ref(sim_backend.current()[0])),
    ]


def test_worlds_are_garbage_after_they_end() -> None:
    # Nothing of a finished world stays reachable: not its meshes, DTensors, process
    # groups or SimWorld (DTensor's caches and torch.distributed.nn's default arguments
    # used to keep them, ~140 KB a world).
    refs: list[tuple[int, str, Any]] = []
    for _ in range(3):
        _launch(_dtensor_world, refs, world_size=4)
    gc.collect()
    assert len(refs) == 48
    assert [(r, what) for r, what, ref in refs if ref() is not None] == []


def _group_identity() -> tuple[Any, ...]:
    pg = dist.group.WORLD
    return pg, pg._gid, pg._world.serial, len(dist.distributed_c10d._world.pg_map)


def test_consecutive_worlds_share_no_process_groups() -> None:
    first = _launch(_group_identity, world_size=2)
    second = _launch(_group_identity, world_size=2)
    # every world starts with an empty registry per rank: only the default group
    assert [f[3] for f in first + second] == [1, 1, 1, 1]
    # ranks of one world share a group id; consecutive worlds never do
    assert first[0][1] == first[1][1] and second[0][1] == second[1][1]
    assert first[0][1] != second[0][1] and first[0][2] != second[0][2]
    assert first[0][0] is not second[0][0] and first[0][0] is not first[1][0]


def _meshes() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))


def test_device_meshes_of_other_ranks_and_worlds_never_compare_equal() -> None:
    w1 = _launch(_meshes, world_size=4)
    w2 = _launch(_meshes, world_size=4)
    everyone = w1 + w2
    for i, m in enumerate(everyone):
        for j, other in enumerate(everyone):
            assert (m == other) == (i == j)
    assert len({hash(m) for m in everyone}) == 8


def _cache_program(shift: int) -> bool:
    """Shifts the group names, then runs a DTensor op that DTensor's caches remember."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    for _ in range(shift):
        dist.new_group([0, 1])
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
    x = torch.arange(12.0).reshape(6, 2)
    y = distribute_tensor(x, mesh, [Shard(0), Replicate()]) * 2
    assert y.device_mesh is mesh, "a cached output spec carried a DeviceMesh of an earlier world"
    z = y.redistribute(mesh, [Replicate(), Replicate()]).to_local()
    return torch.equal(z, 2 * x)


def test_dtensor_caches_are_not_shared_across_worlds() -> None:
    # Regression: rank r of every world runs on the same thread, and DeviceMesh equality
    # used only the thread id, so a world hit the sharding cache of an earlier world and
    # got that world's mesh back ("Could not resolve the process group ..." or wrong data).
    for shift in (0, 1, 0, 2, 0):
        assert _launch(_cache_program, shift, world_size=4) == [True] * 4


def test_ambient_state_is_per_rank_thread() -> None:
    # torch's global RNG is shared, but process-group state is per rank
    def f() -> tuple[int, int, str]:
        g = dist.new_group([dist.get_rank()], use_local_synchronization=True)
        return dist.get_rank(), dist.get_world_size(g), dist.get_backend(g)

    assert _launch(f, world_size=3) == [(r, 1, "colofn_sim") for r in range(3)]


# ----------------------------------------------------------------------------- stress


@pytest.mark.stress
def test_stress_200_random_worlds() -> None:
    """The issue's acceptance test: at least 200 consecutive worlds of random sizes (1-8)
    with random collectives, p2p rings and an uneven DTensor redistribute, every result
    checked exactly, without a wrong result, hang or leak."""
    rng = random.Random(20240601)
    sim._rank_threads(8)
    before = set(threading.enumerate())
    hook = sys.excepthook
    sizes = []
    t0 = time.perf_counter()
    for i in range(200):
        n = rng.randint(1, 8)
        sizes.append(n)
        counts = _launch(_programs.stress_program, 1000 + i, world_size=n, timeout=30)
        assert len(counts) == n and len(set(counts)) == 1 and counts[0] >= 5
    elapsed = time.perf_counter() - t0
    assert set(sizes) == set(range(1, 9))
    assert _extra_threads(before) == []
    assert sys.excepthook is hook and not dist.is_initialized()
    assert elapsed < 120, f"200 worlds took {elapsed:.1f} s"
