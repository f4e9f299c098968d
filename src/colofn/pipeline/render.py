"""Pictures of schedules: text grids and an SVG timeline.

* :func:`format_grid`: rank x step, the order each rank runs its actions in
  (``.`` is an idle slot the schedule wrote).
* :func:`format_timeline`: rank x time from a simulation; an action spans
  ``duration / unit`` cells: its label, then ``-`` for the rest; ``.`` is idle.
* :func:`timeline_svg` / :func:`save_timeline`: the same as a hand-written SVG, one
  colour per kind (PNG too, when matplotlib happens to be installed).

>>> from colofn.pipeline.schedules import gpipe
>>> print(format_grid(gpipe(2, 2)))
step     0   1   2   3
rank 0 0F0 0F1 0B0 0B1
rank 1 1F0 1F1 1B0 1B1
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

from colofn.errors import ScheduleError
from colofn.pipeline.ir import ActionKind, Schedule

if TYPE_CHECKING:
    from colofn.pipeline.simulation import SimulationResult

__all__ = ["KIND_COLORS", "format_grid", "format_timeline", "save_timeline", "timeline_svg"]

KIND_COLORS = {
    ActionKind.F: "#4c78a8",
    ActionKind.B: "#e45756",
    ActionKind.I: "#f58518",
    ActionKind.W: "#54a24b",
}


def _table(
    cells: list[list[str]], *, start: int, mark: tuple[int, int] | None, indent: str,
    more_left: bool, more_right: bool,
) -> str:
    width = max([len(c) for row in cells for c in row] + [len(str(start + len(cells[0]) - 1))])
    label = len(f"rank {len(cells) - 1}")
    ncols = len(cells[0])
    head = [str(start + j).rjust(width) for j in range(ncols)]
    left = "..." if more_left else ""
    right = " ..." if more_right else ""
    pad = " " * len(left)
    lines = [indent + "step".ljust(label) + " " + left + " ".join(head) + right]
    for r, row in enumerate(cells):
        text = " ".join(c.rjust(width) for c in row)
        lines.append(indent + f"rank {r}".ljust(label) + " " + pad + text)
        if mark is not None and mark[0] == r:
            col = mark[1] - start
            offset = label + 1 + len(pad) + col * (width + 1)
            lines.append(indent + " " * offset + "^" * width)
    return "\n".join(line.rstrip() for line in lines)


def format_grid(
    schedule: Schedule,
    *,
    start: int = 0,
    stop: int | None = None,
    mark: tuple[int, int] | None = None,
    indent: str = "",
) -> str:
    """Rank x step grid of ``schedule``: cell ``[r][k]`` is ``schedule.actions[r][k]``.

    Args:
        schedule: what to draw.
        start, stop: the steps to show (clipped to the schedule).
        mark: ``(rank, step)`` to underline with ``^``.
        indent: a prefix for every line.

    Steps are positions in each rank's list, not times: ranks wait for their
    inputs, so the same column of two ranks need not run at the same time (use
    :func:`format_timeline` for times).
    """
    longest = max((len(row) for row in schedule.actions), default=0)
    start = max(0, start)
    stop = longest if stop is None else min(stop, longest)
    stop = max(stop, start + 1)
    cells = [
        [
            "" if k >= len(row) else "." if row[k] is None else str(row[k])
            for k in range(start, stop)
        ]
        for row in schedule.actions
    ]
    return _table(cells, start=start, mark=mark, indent=indent,
                  more_left=start > 0, more_right=stop < longest)


def _default_unit(result: SimulationResult) -> float:
    durations = [e.end - e.start for e in result.timeline if e.end > e.start]
    return min(durations, default=1.0)


def format_timeline(result: SimulationResult, *, unit: float | None = None) -> str:
    """Rank x time grid of a simulation, one cell per ``unit`` of time.

    ``unit`` defaults to the shortest action. Times that are not multiples of
    ``unit`` are rounded to the nearest cell.

    >>> from colofn.pipeline.schedules import gpipe
    >>> from colofn.pipeline.simulation import simulate
    >>> print(format_timeline(simulate(gpipe(2, 2))))
    step     0   1   2   3   4   5   6   7   8
    rank 0 0F0 0F1   .   .   . 0B0   - 0B1   -
    rank 1   . 1F0 1F1 1B0   - 1B1   -   .   .
    """
    unit = _default_unit(result) if unit is None else unit
    if not unit > 0:
        raise ScheduleError(f"format_timeline: unit must be > 0, got {unit!r}.")
    ncols = max(1, round(result.makespan / unit))
    cells = [["."] * ncols for _ in range(result.schedule.num_ranks)]
    for e in result.timeline:
        first, last = round(e.start / unit), max(round(e.end / unit), round(e.start / unit) + 1)
        for k in range(first, min(last, ncols)):
            cells[e.rank][k] = str(e.action) if k == first else "-"
    return _table(cells, start=0, mark=None, indent="", more_left=False, more_right=False)


def timeline_svg(result: SimulationResult, *, px_per_unit: float | None = None) -> str:
    """An SVG picture of a simulation: one row per rank, one box per action.

    Boxes are coloured by kind (:data:`KIND_COLORS`) and labelled with the action
    text when they are wide enough.

    >>> from colofn.pipeline.schedules import one_f_one_b
    >>> from colofn.pipeline.simulation import simulate
    >>> svg = timeline_svg(simulate(one_f_one_b(2, 2)))
    >>> svg.startswith("<svg") and svg.count("<rect") == 8 + 1 + 4
    True
    """
    unit = _default_unit(result)
    scale = px_per_unit if px_per_unit is not None else max(4.0, min(40.0, 1200 / max(
        result.makespan / unit, 1))) / unit
    row_h, left, top, legend = 24, 64, 28, 22
    width = left + result.makespan * scale + 16
    height = top + row_h * result.schedule.num_ranks + 24 + legend
    s = result.schedule
    title = (f"{s.name}: {s.num_ranks} ranks, {s.num_stages} stages, {s.num_microbatches} "
             f"microbatches; makespan {result.makespan:g}, bubble {result.bubble_ratio:.1%}")
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'font-family="monospace" font-size="11">',
        f'<rect x="0" y="0" width="{width:.0f}" height="{height:.0f}" fill="white"/>',
        f'<text x="4" y="16" font-size="13">{escape(title)}</text>',
    ]
    for r in range(s.num_ranks):
        y = top + r * row_h
        out.append(f'<text x="4" y="{y + 16}">rank {r}</text>')
    for e in result.timeline:
        x, y, w = left + e.start * scale, top + e.rank * row_h, (e.end - e.start) * scale
        color = KIND_COLORS[e.action.kind]
        out.append(
            f'<rect x="{x:.2f}" y="{y + 2}" width="{w:.2f}" height="{row_h - 4}" fill="{color}" '
            f'stroke="white" stroke-width="1"><title>{e.action} {e.start:g}-{e.end:g}</title></rect>'
        )
        label = str(e.action)
        if w >= 7 * len(label) + 2:
            out.append(f'<text x="{x + w / 2:.2f}" y="{y + 16}" fill="white" '
                       f'text-anchor="middle">{label}</text>')
    y_axis = top + row_h * s.num_ranks
    step = 10 ** math.floor(math.log10(max(result.makespan, 1e-9)))
    step = step / 2 if result.makespan / step < 4 else step
    t = 0.0
    while t <= result.makespan + 1e-9:
        x = left + t * scale
        out.append(f'<line x1="{x:.2f}" y1="{y_axis}" x2="{x:.2f}" y2="{y_axis + 4}" stroke="black"/>')
        out.append(f'<text x="{x:.2f}" y="{y_axis + 15}" text-anchor="middle">{t:g}</text>')
        t += step
    x = left
    y = y_axis + 22
    for kind, color in KIND_COLORS.items():
        out.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{x + 16}" y="{y + 10}">{kind.value}</text>')
        x += 40
    out.append("</svg>")
    return "\n".join(out) + "\n"


def save_timeline(result: SimulationResult, path: str | os.PathLike[str]) -> None:
    """Write :func:`timeline_svg` to ``path`` (``.svg``), or a PNG (``.png``, needs matplotlib)."""
    path = os.fspath(path)
    if path.lower().endswith(".png"):
        _save_png(result, path)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(timeline_svg(result))


def _save_png(result: SimulationResult, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ScheduleError(
            f"Writing {path!r} needs matplotlib, which is not installed; write an .svg "
            "instead, or pip install matplotlib."
        ) from None
    s = result.schedule
    fig, ax = plt.subplots(figsize=(max(6.0, result.makespan * 0.25), 0.5 * s.num_ranks + 1))
    for e in result.timeline:
        ax.barh(e.rank, e.end - e.start, left=e.start, color=KIND_COLORS[e.action.kind],
                edgecolor="white")
    ax.set_yticks(range(s.num_ranks), [f"rank {r}" for r in range(s.num_ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(f"{s.name}: makespan {result.makespan:g}, bubble {result.bubble_ratio:.1%}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
