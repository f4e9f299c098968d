"""The schedule IR: actions, schedules and stage placements.

A pipeline splits a model into ``num_stages`` consecutive stages and a batch into
``num_microbatches`` microbatches. An :class:`Action` is one unit of work on one
stage for one microbatch, written like PyTorch's ``"2F0"`` (stage 2, forward,
microbatch 0). A :class:`Schedule` lists, for every rank of the ``pp`` axis, the
actions that rank runs, in order, and says which rank holds each stage. Which
activations and gradients travel between ranks is *derived* from that
(:func:`colofn.pipeline.transfers`), never written by hand.

>>> a = Action.from_str("2F0")
>>> a.stage, a.kind, a.microbatch
(2, ActionKind.F, 0)
>>> str(a)
'2F0'
>>> looped_placement(2, chunks=2), v_placement(2)
((0, 1, 0, 1), (0, 1, 1, 0))
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from enum import Enum

from colofn.errors import ScheduleError

__all__ = [
    "Action",
    "ActionKind",
    "Schedule",
    "looped_placement",
    "v_placement",
]


class ActionKind(Enum):
    """What an action computes.

    ``B`` is a whole backward pass. Zero-bubble schedules split it in two: ``I``
    computes the gradient with respect to the stage input (what the previous
    stage waits for) and ``W`` the gradient with respect to the weights (what
    nobody waits for, so it can fill bubbles). The Zero Bubble paper calls our
    ``I`` its ``B``.
    """

    F = "F"
    B = "B"
    I = "I"  # noqa: E741  (the name the literature uses)
    W = "W"

    def __repr__(self) -> str:
        return f"ActionKind.{self.name}"

    @property
    def is_backward_input(self) -> bool:
        """True for ``B`` and ``I``: the passes that produce the input gradient."""
        return self in (ActionKind.B, ActionKind.I)


_ACTION_RE = re.compile(r"^\s*(\d+)\s*([FBIW])\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Action:
    """One unit of work: ``kind`` on ``stage`` for ``microbatch``.

    ``kind`` may be given as its letter; ``Action(2, "F", 0)`` equals
    ``Action(2, ActionKind.F, 0)``. Unpacks like a tuple.

    >>> Action(1, "B", 3)
    Action(1, 'B', 3)
    >>> stage, kind, mb = Action.from_str("0W2"); kind
    ActionKind.W
    """

    stage: int
    kind: ActionKind
    microbatch: int

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ActionKind):
            try:
                object.__setattr__(self, "kind", ActionKind(self.kind))
            except ValueError:
                raise ScheduleError(
                    f"Unknown action kind {self.kind!r}; expected one of "
                    "'F' (forward), 'B' (backward), 'I' (input-grad backward), "
                    "'W' (weight-grad backward)."
                ) from None
        for field in ("stage", "microbatch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ScheduleError(
                    f"Action {field} must be an int >= 0, got {value!r}."
                )

    @classmethod
    def from_str(cls, text: str) -> Action:
        """Parse ``"<stage><kind><microbatch>"``, e.g. ``"2F0"`` or ``"11W3"``.

        >>> Action.from_str("3I12")
        Action(3, 'I', 12)
        >>> Action.from_str("F0")
        Traceback (most recent call last):
        ...
        colofn.errors.ScheduleError: Cannot parse action 'F0': expected <stage><kind><microbatch> with kind one of F, B, I, W, e.g. '2F0'.
        """
        match = _ACTION_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ScheduleError(
                f"Cannot parse action {text!r}: expected <stage><kind><microbatch> "
                "with kind one of F, B, I, W, e.g. '2F0'."
            )
        stage, kind, microbatch = match.groups()
        return cls(int(stage), ActionKind(kind), int(microbatch))

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    def __repr__(self) -> str:
        return f"Action({self.stage}, {self.kind.value!r}, {self.microbatch})"

    def __iter__(self) -> Iterator[int | ActionKind]:
        return iter((self.stage, self.kind, self.microbatch))


def _to_action(item: object, rank: int, step: int) -> Action | None:
    if item is None or isinstance(item, Action):
        return item
    if isinstance(item, str):
        return None if item.strip() in ("", ".") else Action.from_str(item)
    raise ScheduleError(
        f"rank {rank}, step {step}: expected an Action, its text (like '2F0') or None "
        f"(an idle slot), got {type(item).__name__} {item!r}."
    )


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Every rank's list of actions, and where each stage lives.

    Args:
        actions: one sequence per rank of the ``pp`` axis, run in order. Items are
            :class:`Action`, their text (``"2F0"``), or ``None``: an idle slot.
            Idle slots only line up the grid for people to read; execution,
            :func:`~colofn.pipeline.validate` and :func:`~colofn.pipeline.simulate`
            skip them (ranks wait exactly as long as their inputs need).
        num_stages: stages the model is cut into (``num_ranks * chunks``).
        num_microbatches: microbatches per step.
        stage_to_rank: ``stage_to_rank[s]`` is the rank holding stage ``s``; see
            :func:`looped_placement` and :func:`v_placement`.
        name: a label for grids and messages.

    Building a schedule only checks its shape; :func:`~colofn.pipeline.validate`
    checks its rules.

    >>> s = Schedule([["0F0", "0B0"], [None, "1F0", "1B0"]], num_stages=2,
    ...              num_microbatches=1, stage_to_rank=(0, 1))
    >>> s.num_ranks, s.stages_of(1), s.actions[1]
    (2, (1,), (None, Action(1, 'F', 0), Action(1, 'B', 0)))
    """

    actions: tuple[tuple[Action | None, ...], ...]
    num_stages: int
    num_microbatches: int
    stage_to_rank: tuple[int, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        if isinstance(self.actions, (str, bytes)) or not isinstance(self.actions, Iterable):
            raise ScheduleError(
                f"Schedule.actions must be one sequence of actions per rank, got {self.actions!r}."
            )
        rows = []
        for rank, row in enumerate(self.actions):
            if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
                raise ScheduleError(
                    f"Schedule.actions[{rank}] must be a sequence of actions, got {row!r}."
                )
            rows.append(tuple(_to_action(item, rank, step) for step, item in enumerate(row)))
        object.__setattr__(self, "actions", tuple(rows))
        object.__setattr__(self, "stage_to_rank", tuple(self.stage_to_rank))
        for field in ("num_stages", "num_microbatches"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ScheduleError(f"Schedule.{field} must be an int >= 1, got {value!r}.")
        if not rows:
            raise ScheduleError("Schedule.actions is empty: give one list of actions per rank.")
        if len(self.stage_to_rank) != self.num_stages:
            raise ScheduleError(
                f"Schedule.stage_to_rank has {len(self.stage_to_rank)} entries but there are "
                f"{self.num_stages} stages; give one rank per stage, e.g. "
                f"looped_placement({len(rows)}, chunks={max(1, self.num_stages // len(rows))})."
            )
        bad = [
            f"stage {s} -> {r!r}"
            for s, r in enumerate(self.stage_to_rank)
            if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < len(rows)
        ]
        if bad:
            raise ScheduleError(
                f"Schedule.stage_to_rank must map stages to ranks 0..{len(rows) - 1} "
                f"(one action list per rank): {', '.join(bad)}."
            )

    @property
    def num_ranks(self) -> int:
        """Ranks on the ``pp`` axis (one action list each)."""
        return len(self.actions)

    def rank_of(self, stage: int) -> int:
        """The rank holding ``stage``."""
        return self.stage_to_rank[stage]

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages ``rank`` holds, in increasing order."""
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

    def __str__(self) -> str:
        from colofn.pipeline.render import format_grid

        return format_grid(self)


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name} must be an int >= 1, got {value!r}.")


def looped_placement(num_ranks: int, chunks: int = 1) -> tuple[int, ...]:
    """Stage ``s`` on rank ``s % num_ranks``: each rank holds ``chunks`` stages.

    The placement of GPipe and 1F1B (``chunks=1``) and of interleaved 1F1B.

    >>> looped_placement(3, chunks=2)
    (0, 1, 2, 0, 1, 2)
    """
    _check_sizes(num_ranks=num_ranks, chunks=chunks)
    return tuple(s % num_ranks for s in range(num_ranks * chunks))


def v_placement(num_ranks: int, chunks: int = 2) -> tuple[int, ...]:
    """Zigzag placement: rank ``r`` holds stages ``r`` and ``2p - 1 - r``.

    The "V" of ZBV and DualPipeV: the first and last stages share rank 0, so the
    loss turns around on the rank where the data came in. With more than two
    chunks the zigzag continues (even chunks go down the ranks, odd chunks up).

    >>> v_placement(3)
    (0, 1, 2, 2, 1, 0)
    """
    _check_sizes(num_ranks=num_ranks, chunks=chunks)
    return tuple(
        s % num_ranks if (s // num_ranks) % 2 == 0 else num_ranks - 1 - s % num_ranks
        for s in range(num_ranks * chunks)
    )
