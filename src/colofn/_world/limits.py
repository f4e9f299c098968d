"""How many ranks this machine can hold, checked before a world starts anything.

A simulated rank is a thread (one kernel task, a pid slot); a gloo rank is a
process (a pid slot, a Python interpreter with torch loaded, and a socket to
every other rank). ``launch(world_size=10**6)`` used to start some 22,000
threads before failing with ``can't start new thread``; now the size is
compared with what the kernel, the cgroup and free memory leave, and refused
up front.
"""

from __future__ import annotations

import resource

from colofn.errors import WorldError, format_failures

# Private memory of one gloo rank: a Python interpreter with torch imported and
# a gloo group joined (about 220 MB resident on torch 2.13 CPU, much of it shared
# library pages; 150 MB is a floor, not a budget).
GLOO_RANK_BYTES = 150 * 2**20
# Memory of one simulated rank thread: its stack pages and per-rank torch state
# (0.09 MB measured after an all-reduce; the program's own tensors come on top).
SIM_RANK_BYTES = 2**20
# Kernel tasks left over for everything else on the machine.
_TASK_MARGIN = 256


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_paths(controller: str) -> list[str]:
    """Directories of this process's cgroup for ``controller`` (v1 and v2 layouts)."""
    out: list[str] = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            out.append("/sys/fs/cgroup" + path.rstrip("/"))
        elif controller in controllers.split(","):
            out.append(f"/sys/fs/cgroup/{controller}" + path.rstrip("/"))
    return out


def free_tasks() -> tuple[int, str] | None:
    """Kernel tasks (threads or processes) this process may still create, and the limit that says so."""
    limits: list[tuple[int, str]] = []
    try:
        with open("/proc/loadavg") as f:
            running_total = f.read().split()[3]
        tasks = int(running_total.split("/")[1])
    except (OSError, IndexError, ValueError):
        tasks = None
    if tasks is not None:
        for path, name in (("/proc/sys/kernel/pid_max", "kernel.pid_max"), ("/proc/sys/kernel/threads-max", "kernel.threads-max")):
            cap = _read_int(path)
            if cap is not None:
                limits.append((cap - tasks, f"{name} is {cap} and {tasks} tasks exist"))
        soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
        if soft != resource.RLIM_INFINITY:
            limits.append((soft - tasks, f"ulimit -u is {soft} and up to {tasks} tasks exist"))
    for d in _cgroup_paths("pids"):
        cap, cur = _read_int(d + "/pids.max"), _read_int(d + "/pids.current")
        if cap is not None and cur is not None:
            limits.append((cap - cur, f"the cgroup allows {cap} tasks and holds {cur}"))
    return min(limits) if limits else None


def free_memory() -> int | None:
    """Bytes of memory this process may still use (MemAvailable, capped by its cgroup)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for d in _cgroup_paths("memory"):
        for cap_f, cur_f in (("/memory.max", "/memory.current"), ("/memory.limit_in_bytes", "/memory.usage_in_bytes")):
            cap, cur = _read_int(d + cap_f), _read_int(d + cur_f)
            if cap is not None and cur is not None and cap < 2**60:
                avail = cap - cur if avail is None else min(avail, cap - cur)
    return avail


def check_world_size(world_size: int, backend: str, existing_threads: int = 0) -> None:
    """Raise :class:`~colofn.errors.WorldError` if this machine cannot hold ``world_size`` ranks.

    ``existing_threads``: simulated rank threads already running (reused, so not
    counted against the limit).
    """
    new = world_size - existing_threads if backend == "sim" else world_size
    if new <= 0:
        return  # every rank thread exists already (reading the limits costs ~0.4 ms: more than a world start)
    problems: list[str] = []
    tasks = free_tasks()
    if tasks is not None and new > tasks[0] - _TASK_MARGIN:
        kind = "threads" if backend == "sim" else "processes"
        problems.append(
            f"{new} new {kind} are needed but only {max(0, tasks[0] - _TASK_MARGIN)} can be started "
            f"({tasks[1]}; {_TASK_MARGIN} are left for the rest of the machine)"
        )
    mem = free_memory()
    per_rank, what = (SIM_RANK_BYTES, "thread") if backend == "sim" else (GLOO_RANK_BYTES, "process with torch loaded")
    if mem is not None and new * per_rank > mem:
        problems.append(
            f"each {backend} rank is a {what} (at least {per_rank >> 20} MiB): "
            f"{new} of them need {new * per_rank / 2**30:.1f} GiB but "
            f"{mem / 2**30:.1f} GiB are free, enough for {mem // per_rank}"
        )
    if backend != "sim":
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and world_size + 64 > soft:
            problems.append(
                f"each {backend} rank opens a connection to every other rank, but ulimit -n is {soft} "
                f"(a world of {world_size} needs more than {world_size})"
            )
    if problems:
        where = "simulated world (threads of this process)" if backend == "sim" else f"{backend} world (processes on this machine)"
        raise WorldError(
            format_failures(
                f"launch(world_size={world_size}) refused: this machine cannot hold a {where} that large:",
                problems,
                fix="use a smaller world_size (or mesh), or run across machines with torchrun.",
            )
        )

