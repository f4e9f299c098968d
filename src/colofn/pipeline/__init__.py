"""Pipeline parallelism: schedules as data.

A schedule is a plain function returning a :class:`Schedule` (each rank's list
of :class:`Action` s and the stage placement). :func:`validate` proves it
complete and deadlock-free or says where it is not; :func:`simulate` gives its
makespan, bubbles and peak memory; :func:`format_grid` and :func:`timeline_svg`
draw it; :func:`plan` lists the sends and receives a runtime performs (see
:mod:`colofn.pipeline.comm` for the execution contract); :class:`Pipeline`
runs a schedule over a mesh axis (:mod:`colofn.pipeline.runtime`).

>>> from colofn import pipeline
>>> s = pipeline.validate(pipeline.zb_h1(4, 8))
>>> r = pipeline.simulate(s, pipeline.Costs(forward=1, input_grad=1, weight_grad=1))
>>> r.makespan, r.peak_activations[0]
(27.0, 4)
"""

from colofn.errors import ScheduleError
from colofn.pipeline.comm import Payload, Step, Transfer, fifo_conflicts, plan, transfers
from colofn.pipeline.ir import Action, ActionKind, Schedule, looped_placement, v_placement
from colofn.pipeline.measured import BubbleComparison, compare_to_simulation
from colofn.pipeline.registry import SCHEDULES, ScheduleFn, get_schedule, make_schedule
from colofn.pipeline.render import (
    KIND_COLORS,
    format_grid,
    format_timeline,
    save_timeline,
    timeline_svg,
)
from colofn.pipeline.runtime import (
    Pipeline,
    PipelineResult,
    StageFn,
    gather_stages,
    run_pipeline,
)
from colofn.pipeline.schedules import gpipe, interleaved_1f1b, one_f_one_b
from colofn.pipeline.simulation import Costs, Event, SimulationResult, simulate
from colofn.pipeline.validation import Rule, Violation, check, validate
from colofn.pipeline.zero_bubble import dualpipev, zb_h1, zb_h2, zbv

__all__ = [
    # IR
    "Action",
    "ActionKind",
    "Schedule",
    "ScheduleError",
    "looped_placement",
    "v_placement",
    # built-in schedules and the registry
    "SCHEDULES",
    "ScheduleFn",
    "dualpipev",
    "get_schedule",
    "gpipe",
    "interleaved_1f1b",
    "make_schedule",
    "one_f_one_b",
    "zb_h1",
    "zb_h2",
    "zbv",
    # validation
    "Rule",
    "Violation",
    "check",
    "validate",
    # communication derived from a schedule (the runtime contract)
    "Payload",
    "Step",
    "Transfer",
    "fifo_conflicts",
    "plan",
    "transfers",
    # simulation
    "Costs",
    "Event",
    "SimulationResult",
    "simulate",
    # the runtime, and its measured idle against simulate()
    "BubbleComparison",
    "compare_to_simulation",
    "Pipeline",
    "PipelineResult",
    "StageFn",
    "gather_stages",
    "run_pipeline",
    # rendering
    "KIND_COLORS",
    "format_grid",
    "format_timeline",
    "save_timeline",
    "timeline_svg",
]
