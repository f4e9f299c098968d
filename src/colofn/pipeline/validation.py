"""Prove a schedule complete, correctly ordered and deadlock-free, or say where not.

:func:`check` returns every :class:`Violation` found; :func:`validate` raises a
:class:`~colofn.errors.ScheduleError` listing them, with the grid around the
first one. The rules, checked in this order (a later group is only checked once
the earlier ones hold, because its messages would be noise otherwise):

1. **range**: stages ``0..num_stages-1``, microbatches ``0..num_microbatches-1``;
   **placement**: an action sits in the list of the rank holding its stage;
   **duplicate**: no action appears twice.
2. **missing** / **mixed backward**: every (stage, microbatch) has exactly one
   ``F`` and either one ``B`` or one ``I`` and one ``W``.
3. **order**: an action comes after the actions *of its own rank* whose results
   it needs (``F`` of the previous stage, its own ``F``, the backward of the next
   stage, ``I`` before ``W``).
4. **deadlock**: executed under the contract in :mod:`colofn.pipeline.comm` (each
   rank runs its list in order; a receive blocks until the sender has run the
   producing action; sends never block), every rank finishes.

>>> from colofn.pipeline.schedules import one_f_one_b
>>> check(one_f_one_b(4, 8))
[]
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from colofn.errors import ScheduleError, format_failures
from colofn.pipeline._graph import Location, backward_kinds, describe_input, inputs, locate
from colofn.pipeline.ir import Action, ActionKind, Schedule

__all__ = ["Rule", "Violation", "check", "validate"]

_MAX_BULLETS = 20


class Rule(Enum):
    """The rule a :class:`Violation` breaks."""

    RANGE = "range"
    PLACEMENT = "placement"
    DUPLICATE = "duplicate"
    MISSING = "missing"
    MIXED_BACKWARD = "mixed backward"
    ORDER = "order"
    DEADLOCK = "deadlock"


_FIXES = {
    Rule.RANGE: "use stages 0..num_stages-1 and microbatches 0..num_microbatches-1",
    Rule.PLACEMENT: "list each action on the rank that holds its stage (schedule.stage_to_rank)",
    Rule.DUPLICATE: "run each action once",
    Rule.MISSING: "give every (stage, microbatch) one F and either one B or one I and one W",
    Rule.MIXED_BACKWARD: "use either B or the pair I + W for a (stage, microbatch), not both",
    Rule.ORDER: "move each action after the actions of its own rank that it needs",
    Rule.DEADLOCK: "reorder so that no rank waits for a rank that is (transitively) waiting for it",
}


class Violation(NamedTuple):
    """One broken rule; ``str()`` gives the bullet :func:`validate` prints.

    ``rank``/``step`` locate the offending item (``schedule.actions[rank][step]``)
    when there is one.
    """

    rule: Rule
    message: str
    rank: int | None = None
    step: int | None = None
    action: Action | None = None

    def __str__(self) -> str:
        where = []
        if self.rank is not None:
            where.append(f"rank {self.rank}")
        if self.step is not None:
            where.append(f"step {self.step}")
        if self.action is not None:
            where.append(str(self.action))
        prefix = ", ".join(where)
        return f"{prefix}: {self.rule.value}: {self.message}" if prefix else (
            f"{self.rule.value}: {self.message}"
        )


def check(schedule: Schedule) -> list[Violation]:
    """Return every rule ``schedule`` breaks (empty when it is valid).

    See the module docstring for the rules and the order they are checked in.
    """
    found = _check_placement(schedule)
    if not found:
        found = _check_complete(schedule)
    if not found:
        found = _check_order(schedule)
    if not found:
        found = _check_deadlock(schedule)
    return found


def validate(schedule: Schedule) -> Schedule:
    """Return ``schedule`` if it is valid, else raise :class:`~colofn.errors.ScheduleError`.

    The error lists every violation (rank, step, action, rule and why), prints the
    grid around the first one and says how to fix it; ``error.violations`` holds
    the :class:`Violation` objects.

    >>> from colofn.pipeline.ir import Schedule
    >>> bad = Schedule([["0F0", "0B0"], ["1B0", "1F0"]], num_stages=2,
    ...                num_microbatches=1, stage_to_rank=(0, 1))
    >>> validate(bad)
    Traceback (most recent call last):
    ...
    colofn.errors.ScheduleError: Schedule 'custom' (2 ranks, 2 stages, 1 microbatches) is not valid:
      * rank 1, step 0, 1B0: order: needs its own forward 1F0, which this rank runs later, at step 1
    ...
    """
    found = check(schedule)
    if found:
        raise ScheduleError(_message(schedule, found), tuple(found))
    return schedule


def _check_placement(schedule: Schedule) -> list[Violation]:
    found = []
    seen: dict[Action, Location] = {}
    S, M = schedule.num_stages, schedule.num_microbatches
    for rank, row in enumerate(schedule.actions):
        for step, a in enumerate(row):
            if a is None:
                continue
            if a.stage >= S:
                found.append(Violation(
                    Rule.RANGE, f"stage {a.stage} does not exist (stages are 0..{S - 1})",
                    rank, step, a))
                continue
            if a.microbatch >= M:
                found.append(Violation(
                    Rule.RANGE,
                    f"microbatch {a.microbatch} does not exist (microbatches are 0..{M - 1})",
                    rank, step, a))
                continue
            owner = schedule.stage_to_rank[a.stage]
            if owner != rank:
                found.append(Violation(
                    Rule.PLACEMENT,
                    f"stage {a.stage} is on rank {owner} (stage_to_rank[{a.stage}] == {owner}), "
                    f"not on rank {rank}",
                    rank, step, a))
            if a in seen:
                first = seen[a]
                found.append(Violation(
                    Rule.DUPLICATE,
                    f"{a} already runs at rank {first.rank}, step {first.step}", rank, step, a))
            else:
                seen[a] = Location(rank, step)
    return found


def _check_complete(schedule: Schedule) -> list[Violation]:
    found = []
    where = {a: locs[0] for a, locs in locate(schedule).items()}
    for s in range(schedule.num_stages):
        owner = schedule.stage_to_rank[s]
        for m in range(schedule.num_microbatches):
            f, b, i, w = (Action(s, k, m) for k in ActionKind)
            if f not in where:
                found.append(Violation(
                    Rule.MISSING, f"no forward {f}: stage {s} must run F once for microbatch {m}",
                    owner))
            if b in where and (i in where or w in where):
                loc = where[b]
                other = " and ".join(str(x) for x in (i, w) if x in where)
                found.append(Violation(
                    Rule.MIXED_BACKWARD, f"{b} and {other} both compute the backward of stage "
                    f"{s}, microbatch {m}", loc.rank, loc.step, b))
            elif b not in where and i not in where and w not in where:
                found.append(Violation(
                    Rule.MISSING, f"no backward for stage {s}, microbatch {m}: "
                    f"add {b}, or {i} and {w}", owner))
            elif b not in where and w not in where:
                loc = where[i]
                found.append(Violation(
                    Rule.MISSING, f"{i} has no matching {w} (the weight gradient is never "
                    "computed)", loc.rank, loc.step, i))
            elif b not in where and i not in where:
                loc = where[w]
                found.append(Violation(
                    Rule.MISSING, f"{w} has no {i} (the input gradient is never computed)",
                    loc.rank, loc.step, w))
    return found


def _check_order(schedule: Schedule) -> list[Violation]:
    found = []
    where = {a: locs[0] for a, locs in locate(schedule).items()}
    bwd = backward_kinds(schedule)
    for rank, row in enumerate(schedule.actions):
        for step, a in enumerate(row):
            if a is None:
                continue
            for need in inputs(a, schedule.num_stages, bwd):
                loc = where[need]
                if loc.rank == rank and loc.step > step:
                    found.append(Violation(
                        Rule.ORDER, f"needs {describe_input(need, a)}, which this rank runs "
                        f"later, at step {loc.step}", rank, step, a))
    return found


def _check_deadlock(schedule: Schedule) -> list[Violation]:
    rows = schedule.actions
    bwd = backward_kinds(schedule)
    where = {a: locs[0] for a, locs in locate(schedule).items()}
    deps = {a: inputs(a, schedule.num_stages, bwd) for a in where}
    done: set[Action] = set()
    pos = [0] * len(rows)
    progressed = True
    while progressed:
        progressed = False
        for rank, row in enumerate(rows):
            k = pos[rank]
            while k < len(row):
                a = row[k]
                if a is not None:
                    if not all(d in done for d in deps[a]):
                        break
                    done.add(a)
                k += 1
            progressed |= k != pos[rank]
            pos[rank] = k
    found = []
    for rank, row in enumerate(rows):
        if pos[rank] == len(row):
            continue
        a = row[pos[rank]]
        assert a is not None
        need = next(d for d in deps[a] if d not in done)
        other = where[need].rank
        stuck = rows[other][pos[other]]
        found.append(Violation(
            Rule.DEADLOCK,
            f"waits for {describe_input(need, a)} (rank {other}, step {where[need].step}), "
            f"but rank {other} is stuck at step {pos[other]} ({stuck})",
            rank, pos[rank], a))
    return found


def _message(schedule: Schedule, found: list[Violation]) -> str:
    from colofn.pipeline.render import format_grid

    header = (
        f"Schedule {schedule.name!r} ({schedule.num_ranks} ranks, {schedule.num_stages} stages, "
        f"{schedule.num_microbatches} microbatches) is not valid:"
    )
    bullets = [str(v) for v in found[:_MAX_BULLETS]]
    if len(found) > _MAX_BULLETS:
        bullets.append(f"... and {len(found) - _MAX_BULLETS} more")
    lines = [format_failures(header, bullets)]
    first = next((v for v in found if v.rank is not None and v.step is not None), None)
    if first is not None:
        assert first.rank is not None and first.step is not None
        lines.append(f"Around rank {first.rank}, step {first.step}:")
        lines.append(format_grid(
            schedule, start=first.step - 5, stop=first.step + 6, mark=(first.rank, first.step),
            indent="    "))
    rules = dict.fromkeys(v.rule for v in found)
    lines.append("Fix: " + "; ".join(_FIXES[r] for r in rules) + ".")
    return "\n".join(lines)
