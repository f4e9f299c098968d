"""Validation of ``ppermute``'s ``perm``: (source, destination) pairs of axis indices."""

from __future__ import annotations

from collections import Counter
from typing import Any

from colofn.errors import SpecError, format_failures


def _is_index(i: Any) -> bool:
    return isinstance(i, int) and not isinstance(i, bool)


def check_perm(perm: Any, axes: tuple[str, ...], n: int) -> list[tuple[int, int]]:
    """``perm`` as a list of ``(source, destination)`` int pairs, or a ``SpecError`` listing every problem.

    Each index must be in ``[0, n)``, and no source nor destination may repeat
    (a destination that is nobody's gets zeros).

    >>> check_perm([(0, 1), [1, 0]], ("i",), 2)
    [(0, 1), (1, 0)]
    >>> check_perm((0, 1), ("i",), 2)
    Traceback (most recent call last):
    ...
    colofn.errors.SpecError: ppermute over ('i',) (size 2): perm=(0, 1) is not a list of (source, destination) pairs:
      * perm is one pair, not a list of pairs: for one pair write perm=[(0, 1)]
    Fix: give each source and each destination at most once, as axis indices in [0, 2); e.g. a ring: perm=[(i, (i + 1) % 2) for i in range(2)]
    """
    failures: list[str] = []
    pairs: list[tuple[int, int]] = []
    if isinstance(perm, (str, bytes)) or not hasattr(perm, "__iter__"):
        failures.append(f"perm is {perm!r} ({type(perm).__name__}), not a list of pairs")
        items: list[Any] = []
    else:
        items = list(perm)
    if len(items) == 2 and all(_is_index(i) for i in items):
        failures.append(f"perm is one pair, not a list of pairs: for one pair write perm=[{tuple(items)}]")
        items = []
    for k, p in enumerate(items):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or len(p) != 2:
            failures.append(f"perm[{k}] is {p!r}, not a (source, destination) pair")
            continue
        src, dst = p[0], p[1]
        bad = [f"{role} {i!r}" for role, i in (("source", src), ("destination", dst)) if not _is_index(i) or not 0 <= i < n]
        if bad:
            failures.append(f"perm[{k}] = {tuple(p)!r}: {' and '.join(bad)} not an axis index in [0, {n})")
            continue
        pairs.append((src, dst))
    for role, column in (("source", 0), ("destination", 1)):
        counts = Counter(p[column] for p in pairs)
        for i, c in sorted(counts.items()):
            if c > 1:
                failures.append(f"{role} {i} appears {c} times ({', '.join(str(p) for p in pairs if p[column] == i)})")
    if failures:
        raise SpecError(
            format_failures(
                f"ppermute over {axes} (size {n}): perm={perm!r} is not a list of (source, destination) pairs:",
                failures,
                fix=f"give each source and each destination at most once, as axis indices in [0, {n}); "
                f"e.g. a ring: perm=[(i, (i + 1) % {n}) for i in range({n})]",
            )
        ) from None
    return pairs
