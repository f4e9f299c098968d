"""The data dependencies between actions, shared by validation, comm and simulation.

Rules (``S`` stages, microbatch ``m``):

* ``sFm`` needs ``(s-1)Fm`` (the activation), except stage 0 (the data).
* ``sBm`` / ``sIm`` need ``sFm`` (the saved activations) and the backward of
  ``(s+1)`` for ``m`` (the output gradient), except the last stage, where the loss
  is computed from its own forward.
* ``sWm`` needs ``sIm``.
"""

from __future__ import annotations

from typing import NamedTuple

from colofn.pipeline.ir import Action, ActionKind, Schedule

F, B, I, W = ActionKind.F, ActionKind.B, ActionKind.I, ActionKind.W  # noqa: E741


class Location(NamedTuple):
    """Where an action sits: ``schedule.actions[rank][step]``."""

    rank: int
    step: int


def locate(schedule: Schedule) -> dict[Action, list[Location]]:
    """Every occurrence of every action."""
    where: dict[Action, list[Location]] = {}
    for rank, row in enumerate(schedule.actions):
        for step, action in enumerate(row):
            if action is not None:
                where.setdefault(action, []).append(Location(rank, step))
    return where


def backward_kinds(schedule: Schedule) -> dict[tuple[int, int], ActionKind]:
    """``(stage, microbatch) -> B or I``: which pass sends the input gradient back."""
    kinds: dict[tuple[int, int], ActionKind] = {}
    for row in schedule.actions:
        for action in row:
            if action is not None and action.kind.is_backward_input:
                kinds.setdefault((action.stage, action.microbatch), action.kind)
    return kinds


def inputs(
    action: Action, num_stages: int, bwd: dict[tuple[int, int], ActionKind]
) -> tuple[Action, ...]:
    """The actions whose results ``action`` consumes (see the module docstring)."""
    s, kind, m = action.stage, action.kind, action.microbatch
    if kind is F:
        return (Action(s - 1, F, m),) if s > 0 else ()
    if kind is W:
        return (Action(s, I, m),)
    deps = [Action(s, F, m)]
    if s + 1 < num_stages and (s + 1, m) in bwd:
        deps.append(Action(s + 1, bwd[(s + 1, m)], m))
    return tuple(deps)


def describe_input(needed: Action, consumer: Action) -> str:
    """Name what flows from ``needed`` to ``consumer``, for messages."""
    if needed.kind is F and consumer.kind is F:
        return f"the activation of {needed}"
    if needed.kind is F:
        return f"its own forward {needed}"
    if consumer.kind is W:
        return f"its input-grad pass {needed}"
    return f"the gradient of {needed}"
