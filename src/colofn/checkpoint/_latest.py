"""``latest``: the newest complete checkpoint in a directory of steps."""

from __future__ import annotations

import os
import re

from colofn.checkpoint._manifest import is_complete

__all__ = ["latest"]

_STEP = re.compile(r"(\d+)$")


def latest(directory: str | os.PathLike[str]) -> str | None:
    """The complete checkpoint under ``directory`` whose name ends in the largest number, or None.

    Names like ``step_000100`` (or ``ckpt-7``) are read as steps. Directories
    without a completion marker (a save that crashed) and hidden temporary
    directories (``.step_000200.tmp-...``) are skipped, so a crash mid-save
    makes this return the previous checkpoint.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        return None
    found: list[tuple[int, str]] = []
    for name in os.listdir(directory):
        m = _STEP.search(name)
        full = os.path.join(directory, name)
        if m and not name.startswith(".") and os.path.isdir(full) and is_complete(full):
            found.append((int(m.group(1)), name))
    if not found:
        return None
    return os.path.join(directory, max(found)[1])
