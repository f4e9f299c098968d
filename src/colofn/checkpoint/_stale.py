"""Temporary directories of killed saves: who owns one, and when it is provably dead.

Rank 0 writes an owner file into each temporary directory it makes: its pid,
host name, the kernel's boot id and the process start time (from
``/proc/<pid>/stat``). A later successful save to the same parent removes a
``.<name>.tmp-*`` directory only when its owner is provably gone: the same
host and boot, and no process with that pid and start time (the pid may have
been reused, hence the start time); or the same host after a reboot. A
directory without a readable owner file, from another host, or whose owner
still runs is kept: a live save's directory is never removed.
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

from colofn import _procinfo
from colofn.checkpoint._manifest import MARKER

__all__ = ["OWNER", "is_dead", "remove_dead", "remove_owner", "write_owner"]

OWNER = MARKER + ".owner"
_TMP = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def owner() -> dict[str, Any]:
    pid = os.getpid()
    stat = _procinfo.stat(pid)
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start": str(stat[1]) if stat else ""}


def write_owner(tmp: str) -> None:
    with open(os.path.join(tmp, OWNER), "w") as f:
        json.dump(owner(), f)


def remove_owner(tmp: str) -> None:
    try:
        os.remove(os.path.join(tmp, OWNER))
    except OSError:
        pass


def is_dead(info: Any) -> bool:
    """Whether the save described by owner data ``info`` is provably not running any more."""
    if not isinstance(info, dict) or type(info.get("pid")) is not int or info["pid"] <= 0:
        return False
    if info.get("host") != socket.gethostname() or not info.get("boot_id") or not _boot_id():
        return False
    if info["boot_id"] != _boot_id():
        return True  # the machine rebooted since
    if not os.path.isdir("/proc/self"):  # pragma: no cover - no procfs: cannot prove anything
        return False
    start = info.get("start")
    return _procinfo.gone(info["pid"], int(start) if isinstance(start, str) and start.isdigit() else 0)


def remove_dead(parent: str) -> list[str]:
    """Remove the temporary directories in ``parent`` whose save is provably dead; their names."""

    def dead(name: str) -> bool:
        full = os.path.join(parent, name)
        if not _TMP.match(name) or not os.path.isdir(full):
            return False
        try:
            with open(os.path.join(full, OWNER)) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return False
        return is_dead(info)

    return _procinfo.remove_dirs(parent, dead)
