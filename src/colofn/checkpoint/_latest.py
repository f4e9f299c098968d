"""``latest``: the newest complete, undamaged checkpoint in a directory of steps."""

from __future__ import annotations

import os
import re
import warnings

from colofn.checkpoint import _manifest
from colofn.errors import CheckpointError

__all__ = ["latest"]

_STEP = re.compile(r"(\d+)$")


def latest(directory: str | os.PathLike[str]) -> str | None:
    """The newest usable checkpoint under ``directory`` (the largest number at the end of its name), or None.

    Names like ``step_000100`` (or ``ckpt-7``) are read as steps. Directories
    without a completion marker (a save that crashed) and hidden temporary
    directories (``.step_000200.tmp-...``) are skipped, so a crash mid-save
    makes this return the previous checkpoint. A checkpoint that is damaged
    (its manifest unreadable, or a data file missing or of another size than
    the manifest says: cheap checks, no hashing) is skipped with a
    ``UserWarning`` naming it and what is wrong.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        return None
    found: list[tuple[int, str]] = []
    for name in os.listdir(directory):
        m = _STEP.search(name)
        if m and not name.startswith(".") and os.path.isdir(os.path.join(directory, name)):
            found.append((int(m.group(1)), name))
    for _, name in sorted(found, reverse=True):
        full = os.path.join(directory, name)
        if not os.path.exists(os.path.join(full, _manifest.MARKER)):
            continue  # a save that did not finish: normal after a crash, not damage
        try:
            damage = _manifest.damaged_files(full, _manifest.read(full)["files"])
        except CheckpointError as e:
            damage = [str(e)]
        if not damage:
            return full
        warnings.warn(
            f"colofn.checkpoint.latest: skipping the damaged checkpoint {full}: "
            + "; ".join(damage[:3]) + ("; ..." if len(damage) > 3 else ""),
            UserWarning,
            stacklevel=2,
        )
    return None
