"""Event-driven simulation of a schedule: makespan, bubbles and peak memory.

Each rank runs its actions in order, one at a time. An action starts when its
rank is free and every input it needs has arrived: at once when the producer ran
on the same rank, ``costs.latency`` after the producer finished when it ran on
another (transfers themselves do not occupy a rank, and sends never block, as
in the execution contract of :mod:`colofn.pipeline.comm`).

Memory is counted from the order alone (a rank's counters only change with its
own actions): *in-flight activations* are the (stage, microbatch) pairs of the
rank's stages whose ``F`` has finished but whose ``B``/``I`` has not; the
*weight-grad stash* counts pairs whose ``I`` has finished but whose ``W`` has not.

>>> from colofn.pipeline.schedules import gpipe
>>> r = simulate(gpipe(4, 8), Costs(forward=1, backward=2))
>>> r.makespan, round(r.bubble[0], 4), r.peak_activations
(33.0, 0.2727, (8, 8, 8, 8))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

from colofn.errors import ScheduleError
from colofn.pipeline._graph import backward_kinds, inputs
from colofn.pipeline.ir import Action, ActionKind, Schedule
from colofn.pipeline.validation import validate

__all__ = ["Costs", "Event", "SimulationResult", "simulate"]

Cost = float | tuple[float, ...]


def _as_cost(name: str, value: float | Sequence[float]) -> Cost:
    values = tuple(value) if isinstance(value, Sequence) else (value,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ScheduleError(f"Costs.{name} must be finite numbers >= 0, got {value!r}.")
    return tuple(float(v) for v in values) if isinstance(value, Sequence) else float(value)


@dataclasses.dataclass(frozen=True)
class Costs:
    """Compute time of each kind of action, and the point-to-point latency.

    Each time is a number, or a sequence with one number per stage. ``backward``
    (a whole ``B``) defaults to ``input_grad + weight_grad``. Defaults are the
    textbook ``T_F = 1, T_B = 2`` with ``T_I = T_W = 1`` and no latency.

    >>> Costs().time(ActionKind.B, stage=0)
    2.0
    >>> Costs(forward=(1, 2)).time(ActionKind.F, stage=1)
    2.0
    """

    forward: float | Sequence[float] = 1.0
    input_grad: float | Sequence[float] = 1.0
    weight_grad: float | Sequence[float] = 1.0
    backward: float | Sequence[float] | None = None
    latency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("forward", "input_grad", "weight_grad", "backward"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _as_cost(name, value))
        latency = _as_cost("latency", self.latency)
        if isinstance(latency, tuple):
            raise ScheduleError(f"Costs.latency must be one number, got {self.latency!r}.")
        object.__setattr__(self, "latency", latency)

    def time(self, kind: ActionKind, stage: int) -> float:
        """How long ``kind`` takes on ``stage``."""
        if kind is ActionKind.B and self.backward is None:
            return self.time(ActionKind.I, stage) + self.time(ActionKind.W, stage)
        value = {
            ActionKind.F: self.forward,
            ActionKind.B: self.backward,
            ActionKind.I: self.input_grad,
            ActionKind.W: self.weight_grad,
        }[kind]
        return value[stage] if isinstance(value, tuple) else float(value)  # type: ignore[arg-type]

    def _check(self, num_stages: int) -> None:
        for name in ("forward", "input_grad", "weight_grad", "backward"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != num_stages:
                raise ScheduleError(
                    f"Costs.{name} has {len(value)} per-stage entries but the schedule has "
                    f"{num_stages} stages; give one number, or one per stage."
                )


class Event(NamedTuple):
    """``action`` ran on ``rank`` from ``start`` to ``end``."""

    rank: int
    action: Action
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate` found. Per-rank tuples are indexed by rank.

    Attributes:
        schedule, costs: the inputs.
        timeline: every action, sorted by start time then rank.
        makespan: when the last action ends (everything starts at 0).
        busy: compute time per rank.
        peak_activations: most in-flight activations per rank, in (stage,
            microbatch) units, summed over the rank's stages.
        peak_weight_stash: most pending weight gradients (``I`` done, ``W`` not).
    """

    schedule: Schedule
    costs: Costs
    timeline: tuple[Event, ...]
    makespan: float
    busy: tuple[float, ...]
    peak_activations: tuple[int, ...]
    peak_weight_stash: tuple[int, ...]

    @property
    def idle(self) -> tuple[float, ...]:
        """``makespan - busy`` per rank."""
        return tuple(self.makespan - b for b in self.busy)

    @property
    def bubble(self) -> tuple[float, ...]:
        """Bubble ratio per rank: ``idle / makespan``."""
        return tuple(i / self.makespan if self.makespan else 0.0 for i in self.idle)

    @property
    def bubble_ratio(self) -> float:
        """Idle share of all ranks together: ``sum(idle) / (num_ranks * makespan)``."""
        total = self.makespan * len(self.busy)
        return sum(self.idle) / total if total else 0.0

    @property
    def spans(self) -> tuple[float, ...]:
        """Per rank, from the start of its first action to the end of its last.

        Without a synchronising optimizer step (the Zero Bubble paper's setting)
        one training iteration costs ``max(spans)``, not ``makespan``.
        """
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        for e in self.timeline:
            first[e.rank] = min(first.get(e.rank, e.start), e.start)
            last[e.rank] = max(last.get(e.rank, e.end), e.end)
        return tuple(last.get(r, 0.0) - first.get(r, 0.0) for r in range(len(self.busy)))

    def summary(self) -> str:
        """A short table: makespan, then per rank busy, idle, bubble and peak memory."""
        s = self.schedule
        lines = [
            f"{s.name}: {s.num_ranks} ranks, {s.num_stages} stages, "
            f"{s.num_microbatches} microbatches",
            f"makespan {self.makespan:g}, bubble {self.bubble_ratio:.1%} of all rank time",
            "rank      busy      idle  bubble  peak act  peak W stash",
        ]
        for r in range(s.num_ranks):
            lines.append(
                f"{r:>4} {self.busy[r]:>9g} {self.idle[r]:>9g} {self.bubble[r]:>7.1%} "
                f"{self.peak_activations[r]:>9} {self.peak_weight_stash[r]:>13}"
            )
        return "\n".join(lines)


def simulate(schedule: Schedule, costs: Costs | None = None) -> SimulationResult:
    """Run ``schedule`` on a model of the hardware; see the module docstring.

    Validates ``schedule`` first (:func:`~colofn.pipeline.validate`), so an invalid
    schedule raises :class:`~colofn.errors.ScheduleError`.
    """
    costs = Costs() if costs is None else costs
    validate(schedule)
    costs._check(schedule.num_stages)
    bwd = backward_kinds(schedule)
    rows = [[a for a in row if a is not None] for row in schedule.actions]
    rank_of = {a: r for r, row in enumerate(rows) for a in row}
    end: dict[Action, float] = {}
    free = [0.0] * len(rows)
    pos = [0] * len(rows)
    events = []
    progressed = True
    while progressed:
        progressed = False
        for r, row in enumerate(rows):
            while pos[r] < len(row):
                a = row[pos[r]]
                deps = inputs(a, schedule.num_stages, bwd)
                if any(d not in end for d in deps):
                    break
                start = max([free[r]] + [
                    end[d] + (costs.latency if rank_of[d] != r else 0.0) for d in deps
                ])
                end[a] = free[r] = start + costs.time(a.kind, a.stage)
                events.append(Event(r, a, start, end[a]))
                pos[r] += 1
                progressed = True
    events.sort(key=lambda e: (e.start, e.rank))
    busy = tuple(sum(e.end - e.start for e in events if e.rank == r) for r in range(len(rows)))
    return SimulationResult(
        schedule=schedule,
        costs=costs,
        timeline=tuple(events),
        makespan=max((e.end for e in events), default=0.0),
        busy=busy,
        peak_activations=tuple(_peak(row, ActionKind.F, (ActionKind.B, ActionKind.I))
                               for row in rows),
        peak_weight_stash=tuple(_peak(row, ActionKind.I, (ActionKind.W,)) for row in rows),
    )


def _peak(row: list[Action], up: ActionKind, down: tuple[ActionKind, ...]) -> int:
    level = peak = 0
    for a in row:
        if a.kind is up:
            level += 1
            peak = max(peak, level)
        elif a.kind in down:
            level -= 1
    return peak
