"""Whether a process is provably gone, from ``/proc`` (Linux): the one test behind every clean-up of
what a dead process left (a killed checkpoint save's temporary directory, a dead launcher's world
directory).

A pid alone proves nothing (pids are reused), so a process is named by its pid and its start time in
clock ticks since boot; it is gone when no process has that pid, when that process is a zombie, or when
the pid now belongs to a process that started at another time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

__all__ = ["gone", "pid_namespace", "remove_dirs", "stat"]


def stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of process ``pid``, from ``/proc``; None if unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_namespace() -> int:
    """This process's pid namespace (an inode number; 0 when unknown): pids mean nothing across them."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def gone(pid: int, start: int) -> bool:
    """Whether process ``pid`` that started at ``start`` (clock ticks; 0: unknown) is provably not running.

    The caller makes sure ``pid`` is from this machine's boot and pid namespace.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    s = stat(pid)
    return s is not None and (s[0] in ("Z", "X") or (start != 0 and s[1] != start))


def remove_dirs(parent: str, dead: Callable[[str], bool]) -> list[str]:
    """Remove each entry ``name`` of ``parent`` for which ``dead(name)``; the names removed (none if unreadable)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = [name for name in names if dead(name)]
    for name in removed:
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return removed
