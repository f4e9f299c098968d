"""``PartitionSpec`` (``P``): how each tensor dim is split over mesh axes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final, final

__all__ = ["P", "PartitionSpec"]

Entry = None | str | tuple[str, ...]


@final
class PartitionSpec:
    """How each dim of a tensor is split over named mesh axes.

    Entry ``i`` is for tensor dim ``i``: ``None`` (not split), an axis name, or a
    tuple of axis names (split over their product, the first name major).
    Trailing dims may be omitted; mesh axes not named are replicated over.
    Immutable, hashable, a pytree leaf, and not a tuple.

    >>> P("dp", None)
    P('dp', None)
    >>> P(("dp", "tp")).axes
    ('dp', 'tp')
    >>> P("dp") == P("dp", None)
    True
    """

    __slots__ = ("_entries",)
    _entries: tuple[Entry, ...]

    def __init__(self, *entries: Any) -> None:
        norm: list[Entry] = []
        for i, e in enumerate(entries):
            if e is None or isinstance(e, str):
                norm.append(e)
            elif isinstance(e, tuple | list) and all(isinstance(a, str) for a in e):
                t = tuple(e)
                norm.append(None if len(t) == 0 else t[0] if len(t) == 1 else t)
            else:
                raise TypeError(
                    f"P entry {i} must be None, an axis name or a tuple of axis names; got "
                    f"{type(e).__name__} {e!r}"
                )
        object.__setattr__(self, "_entries", tuple(norm))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("PartitionSpec is immutable")

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries)

    def __getitem__(self, i: int) -> Entry:
        return self._entries[i]

    def _trimmed(self) -> tuple[Entry, ...]:
        e = list(self._entries)
        while e and e[-1] is None:
            e.pop()
        return tuple(e)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PartitionSpec) and self._trimmed() == other._trimmed()

    def __hash__(self) -> int:
        return hash(("P", self._trimmed()))

    def __repr__(self) -> str:
        return "P(" + ", ".join(repr(e) for e in self._entries) + ")"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PartitionSpec, self._entries)

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self._entries

    @property
    def axes(self) -> tuple[str, ...]:
        """Every mesh axis named, in order of appearance."""
        return tuple(a for e in self._entries for a in dim_axes(e))

    def dim_axes(self, dim: int) -> tuple[str, ...]:
        """The axes that split tensor dim ``dim`` (``()`` when not split or omitted)."""
        return dim_axes(self._entries[dim]) if dim < len(self._entries) else ()

    def padded(self, ndim: int) -> tuple[Entry, ...]:
        return self._entries + (None,) * max(0, ndim - len(self._entries))


def dim_axes(entry: Entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


P: Final = PartitionSpec
