"""``colofn pipeline show``: draw a schedule, simulate it, print bubble and memory.

The top-level ``colofn`` command calls :func:`add_subparser` and then
``args.func(args)``. On its own: ``python -m colofn.pipeline.cli show zb_h1``.

    colofn pipeline show 1f1b --stages 4 --microbatches 8
    colofn pipeline show interleaved_1f1b --stages 4 --microbatches 8 --chunks 2
    colofn pipeline show my_schedules:wave --stages 4 --microbatches 6 --svg wave.svg
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from colofn.errors import ColofnError
from colofn.pipeline.registry import SCHEDULES, make_schedule
from colofn.pipeline.render import format_grid, format_timeline, save_timeline
from colofn.pipeline.simulation import Costs, simulate

__all__ = ["add_subparser", "main", "show"]


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``pipeline`` command (with its ``show`` subcommand) to ``subparsers``."""
    parser = subparsers.add_parser(
        "pipeline", help="pipeline schedules: show, validate and simulate them",
        description="Pipeline schedules: show, validate and simulate them.",
    )
    commands = parser.add_subparsers(dest="pipeline_command", metavar="COMMAND", required=True)
    show_parser = commands.add_parser(
        "show", help="print a schedule's grid, bubble and peak memory",
        description="Build a schedule, validate it, simulate it and print the grid, "
        "makespan, bubble and peak memory per rank.",
    )
    show_parser.add_argument(
        "schedule", help=f"a built-in name ({', '.join(SCHEDULES)}) or 'module:function'")
    show_parser.add_argument(
        "--stages", "--ranks", dest="ranks", type=int, default=4,
        help="pipeline ranks (stages of the pp axis; with --chunks each holds several "
             "model stages) (default 4)")
    show_parser.add_argument("--microbatches", type=int, default=8, help="(default 8)")
    show_parser.add_argument(
        "--chunks", type=int, default=None,
        help="model stages per rank (default: the schedule's own default)")
    show_parser.add_argument("--svg", metavar="PATH", help="write the simulated timeline here "
                             "(.svg, or .png when matplotlib is installed)")
    show_parser.add_argument("--timeline", action="store_true",
                             help="also print the simulated timeline as a grid")
    costs = show_parser.add_argument_group("costs (time units per action)")
    costs.add_argument("--forward", type=float, default=1.0, help="T_F (default 1)")
    costs.add_argument("--backward", type=float, default=None,
                       help="T_B, a whole backward (default T_I + T_W)")
    costs.add_argument("--input-grad", type=float, default=1.0, help="T_I (default 1)")
    costs.add_argument("--weight-grad", type=float, default=1.0, help="T_W (default 1)")
    costs.add_argument("--latency", type=float, default=0.0,
                       help="point-to-point latency (default 0)")
    show_parser.set_defaults(func=show)
    return parser


def show(args: argparse.Namespace) -> int:
    """Run ``pipeline show``; return the exit code (1 when the schedule is invalid)."""
    try:
        schedule = make_schedule(args.schedule, args.ranks, args.microbatches, chunks=args.chunks)
        costs = Costs(forward=args.forward, backward=args.backward, input_grad=args.input_grad,
                      weight_grad=args.weight_grad, latency=args.latency)
        result = simulate(schedule, costs)
        print(format_grid(schedule))
        if args.timeline:
            print()
            print(format_timeline(result))
        print()
        print(result.summary())
        if args.svg:
            save_timeline(result, args.svg)
            print(f"wrote {args.svg}")
    except (ColofnError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m colofn.pipeline.cli ...``: the ``pipeline`` command on its own."""
    parser = argparse.ArgumentParser(prog="colofn")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
