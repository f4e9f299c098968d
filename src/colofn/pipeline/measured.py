"""A pipeline step's measured idle per rank next to :func:`~colofn.pipeline.simulate`'s prediction.

:class:`~colofn.pipeline.Pipeline` returns each rank's compute as
:class:`~colofn.pipeline.Event` s (``PipelineResult.events``; seconds from the
start of that rank's step). :func:`compare_to_simulation` takes every rank's
events of one step, measures each rank's idle (the step's span minus the
rank's compute), and simulates the same schedule with the *measured* median
time of each kind of action on each stage (:func:`measured_costs`; no latency). The difference is what the
schedule alone does not explain: the time to move activations and gradients,
ranks that start the step at different moments, per-action work outside the
compute (posting and waiting for messages) and machine load.

>>> from colofn.pipeline import Action, Event, one_f_one_b
>>> s = one_f_one_b(2, 2)
>>> ev = [Event(0, Action(0, "F", 0), 0, 1), Event(0, Action(0, "F", 1), 1, 2),
...       Event(1, Action(1, "F", 0), 1.5, 2.5), Event(1, Action(1, "B", 0), 2.5, 4.5),
...       Event(1, Action(1, "F", 1), 4.5, 5.5), Event(0, Action(0, "B", 0), 5, 7),
...       Event(1, Action(1, "B", 1), 5.5, 7.5), Event(0, Action(0, "B", 1), 8, 10)]
>>> c = compare_to_simulation(s, ev)
>>> c.measured_idle, c.simulated_idle, c.measured_makespan, c.simulated_makespan
((4.0, 4.0), (3.0, 3.0), 10.0, 9.0)
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

from colofn.pipeline.ir import Action, ActionKind, Schedule
from colofn.pipeline.simulation import Costs, Event, simulate

__all__ = ["BubbleComparison", "compare_to_simulation", "gather_events", "measured_costs"]

_KINDS = tuple(ActionKind)


class BubbleComparison(NamedTuple):
    """Measured and simulated idle of one step, per pipeline rank (seconds).

    Attributes:
        costs: the measured median time of each kind of action per stage, as
            given to :func:`~colofn.pipeline.simulate`.
        measured_idle: per rank, the step's span (the latest end of any
            rank's last action, each rank timed from the start of its own step)
            minus the rank's compute.
        simulated_idle: per rank, ``simulate(schedule, costs).idle``.
        measured_makespan, simulated_makespan: the spans themselves.
    """

    costs: Costs
    measured_idle: tuple[float, ...]
    simulated_idle: tuple[float, ...]
    measured_makespan: float
    simulated_makespan: float

    @property
    def measured_bubble(self) -> float:
        """Idle share of all ranks together, measured."""
        total = self.measured_makespan * len(self.measured_idle)
        return sum(self.measured_idle) / total if total else 0.0

    @property
    def simulated_bubble(self) -> float:
        """Idle share of all ranks together, as :attr:`SimulationResult.bubble_ratio <colofn.pipeline.SimulationResult.bubble_ratio>`."""
        total = self.simulated_makespan * len(self.simulated_idle)
        return sum(self.simulated_idle) / total if total else 0.0

    def summary(self) -> str:
        """One line: both bubbles and spans, then per rank the measured and simulated idle (ms)."""
        ranks = ", ".join(f"rank {r} {m * 1e3:.1f} vs {s * 1e3:.1f}"
                          for r, (m, s) in enumerate(zip(self.measured_idle, self.simulated_idle, strict=True)))
        return (f"measured bubble {self.measured_bubble:.1%} of {self.measured_makespan * 1e3:.1f} ms, "
                f"simulate() {self.simulated_bubble:.1%} of {self.simulated_makespan * 1e3:.1f} ms "
                f"(idle ms measured vs simulated: {ranks})")


def measured_costs(num_stages: int, events: Sequence[Event]) -> Costs:
    """The median measured time of each kind of action on each stage, as :class:`~colofn.pipeline.Costs`.

    The median, not the mean: one action preempted by another process should
    not move a stage's cost. Kinds a schedule does not use cost 0 (a ``B``-less
    zero-bubble schedule leaves ``backward`` to ``I + W``).
    """
    times: dict[tuple[ActionKind, int], list[float]] = {}
    for e in events:
        times.setdefault((e.action.kind, e.action.stage), []).append(e.end - e.start)

    def per_stage(kind: ActionKind) -> tuple[float, ...] | None:
        if not any(k is kind for k, _ in times):
            return None
        return tuple(statistics.median(times.get((kind, s), [0.0])) for s in range(num_stages))

    split = per_stage(ActionKind.I) is not None
    return Costs(forward=per_stage(ActionKind.F) or 0.0, input_grad=per_stage(ActionKind.I) or 0.0,
                 weight_grad=per_stage(ActionKind.W) or 0.0,
                 backward=per_stage(ActionKind.B) or (None if split else 0.0))


def compare_to_simulation(schedule: Schedule, events: Sequence[Event]) -> BubbleComparison:
    """Every rank's ``events`` of one step (``Event.rank``: the pipeline rank) against ``simulate()``."""
    costs = measured_costs(schedule.num_stages, events)
    sim = simulate(schedule, costs)
    busy = [0.0] * schedule.num_ranks
    for e in events:
        busy[e.rank] += e.end - e.start
    span = float(max((e.end for e in events), default=0.0))
    return BubbleComparison(costs, tuple(span - b for b in busy), sim.idle, span, sim.makespan)


def gather_events(events: Sequence[Event], rank: int, num_ranks: int, length: int) -> list[Event]:
    """Every pipeline rank's ``events`` on every process (a collective over the default group).

    ``rank`` is this process's pipeline rank, ``length`` the most actions any
    rank runs in a step. Where several processes share a pipeline rank (other
    mesh axes), the first one's events are kept. Sent as float64 tensors, not
    pickled.
    """
    row = torch.full((1 + 5 * length,), float("nan"), dtype=torch.float64)
    row[0] = rank
    for i, e in enumerate(events):
        row[1 + 5 * i: 6 + 5 * i] = torch.tensor(
            [e.action.stage, _KINDS.index(e.action.kind), e.action.microbatch, e.start, e.end], dtype=torch.float64)
    rows = [row]
    if dist.is_initialized() and dist.get_world_size() > 1:
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, row)
    out: list[Event] = []
    seen: set[int] = set()
    for r in rows:
        p = int(r[0])
        if p in seen or not 0 <= p < num_ranks:
            continue
        seen.add(p)
        for stage, kind, mb, start, end in r[1:].view(-1, 5).tolist():
            if stage == stage:  # not the nan padding
                out.append(Event(p, Action(int(stage), _KINDS[int(kind)], int(mb)), start, end))
    return out
