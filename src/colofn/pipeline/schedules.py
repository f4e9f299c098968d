"""Built-in schedules without split backward: GPipe, 1F1B and interleaved 1F1B.

Every schedule is a plain function ``(num_ranks, num_microbatches, *, chunks)``
returning a :class:`~colofn.pipeline.Schedule`; ``chunks`` is the number of
stages per rank, so ``num_stages == num_ranks * chunks``. Fewer microbatches
than stages is fine wherever the schedule allows it.

>>> print(one_f_one_b(3, 4))
step     0   1   2   3   4   5   6   7
rank 0 0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3
rank 1 1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3
rank 2 2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from colofn.errors import ScheduleError
from colofn.pipeline.ir import Action, ActionKind, Schedule, looped_placement

__all__ = ["gpipe", "interleaved_1f1b", "one_f_one_b"]

F, B = ActionKind.F, ActionKind.B


def check_sizes(name: str, num_ranks: int, num_microbatches: int, chunks: int,
                allowed_chunks: Sequence[int] | None = None) -> None:
    """Raise :class:`~colofn.errors.ScheduleError` for sizes ``name`` cannot take."""
    for arg, value in (("num_ranks", num_ranks), ("num_microbatches", num_microbatches),
                       ("chunks", chunks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name}: {arg} must be an int >= 1, got {value!r}.")
    if allowed_chunks is not None and chunks not in allowed_chunks:
        want = " or ".join(str(c) for c in allowed_chunks)
        raise ScheduleError(
            f"{name} needs chunks={want} (stages per rank), got chunks={chunks}; "
            "'gpipe' and 'interleaved_1f1b' take any chunks, 'zbv' and 'dualpipev' take 2."
        )


def build(name: str, rows: list[list[Action]], num_stages: int, num_microbatches: int,
          stage_to_rank: tuple[int, ...]) -> Schedule:
    """Make a :class:`Schedule`, dropping actions on microbatches ``>= num_microbatches``.

    Generators that need a minimum number of microbatches build for that many and
    let this drop the extra ones: removing every action of some microbatches
    keeps a valid schedule valid (their dependencies only involve themselves, and
    a cycle among the rest would have been one before).
    """
    return Schedule(
        actions=tuple(tuple(a for a in row if a.microbatch < num_microbatches) for row in rows),
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        stage_to_rank=stage_to_rank,
        name=name,
    )


def gpipe(num_ranks: int, num_microbatches: int, *, chunks: int = 1) -> Schedule:
    """GPipe (Huang et al. 2019): all forwards, then all backwards.

    With ``chunks > 1`` each rank holds ``chunks`` stages placed round-robin
    (looped placement) and runs every forward of its first stage, then of its
    next, and the backwards in reverse (PyTorch's "looped BFS"). Peak memory:
    ``num_microbatches * chunks`` activations per rank.

    >>> print(gpipe(2, 3))
    step     0   1   2   3   4   5
    rank 0 0F0 0F1 0F2 0B0 0B1 0B2
    rank 1 1F0 1F1 1F2 1B0 1B1 1B2
    """
    check_sizes("gpipe", num_ranks, num_microbatches, chunks)
    p, m = num_ranks, num_microbatches
    rows = []
    for r in range(p):
        stages = [c * p + r for c in range(chunks)]
        row = [Action(s, F, j) for s in stages for j in range(m)]
        row += [Action(s, B, j) for s in reversed(stages) for j in range(m)]
        rows.append(row)
    return build("gpipe", rows, p * chunks, m, looped_placement(p, chunks))


def one_f_one_b(num_ranks: int, num_microbatches: int, *, chunks: int = 1) -> Schedule:
    """1F1B (PipeDream-Flush, Narayanan et al. 2021): warm up, then alternate F and B.

    Rank ``r`` runs ``min(p - 1 - r, m)`` warm-up forwards, then one forward and
    one backward at a time, then the remaining backwards. Same bubble as GPipe,
    ``(p-1)/(m+p-1)`` of the step, but at most ``min(p, m)`` activations in flight.
    ``chunks`` must be 1.
    """
    check_sizes("1f1b", num_ranks, num_microbatches, chunks, allowed_chunks=(1,))
    p, m = num_ranks, num_microbatches
    rows = []
    for r in range(p):
        warmup = min(p - 1 - r, m)
        row = [Action(r, F, j) for j in range(warmup)]
        for j in range(m - warmup):
            row += [Action(r, F, warmup + j), Action(r, B, j)]
        row += [Action(r, B, j) for j in range(m - warmup, m)]
        rows.append(row)
    return build("1f1b", rows, p, m, looped_placement(p))


def interleaved_1f1b(num_ranks: int, num_microbatches: int, *, chunks: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron-LM, Narayanan et al. 2021): ``chunks`` stages per rank.

    Stages are placed round-robin (stage ``s`` on rank ``s % p``). Each rank walks
    its virtual microbatches in groups of ``p``: forward op ``k`` is microbatch
    ``(k // (p*v)) * p + k % p`` on local chunk ``(k // p) % v`` (the backward uses
    the chunks in reverse), after ``min(2 (p - 1 - r) + (v - 1) p, v m)`` warm-up
    forwards, as Megatron-LM (and PyTorch's ``ScheduleInterleaved1F1B``). The
    bubble shrinks to ``(p-1)/(v m)`` of the compute time.

    Raises:
        ScheduleError: if ``num_microbatches`` is not a multiple of ``num_ranks``
            (Megatron-LM's grouping needs that). ``chunks=1`` gives 1F1B.
    """
    check_sizes("interleaved_1f1b", num_ranks, num_microbatches, chunks)
    p, m, v = num_ranks, num_microbatches, chunks
    if v == 1:
        return dataclasses.replace(one_f_one_b(p, m), name="interleaved_1f1b")
    if m % p:
        lower, upper = (m // p) * p, (m // p + 1) * p
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        raise ScheduleError(
            f"interleaved_1f1b needs num_microbatches to be a multiple of num_ranks "
            f"(Megatron-LM runs microbatches in groups of num_ranks), got {m} microbatches "
            f"on {p} ranks; use {hint} microbatches, or 'gpipe' with chunks={v}, or 'zbv'."
        )
    total = m * v

    def stage(k: int, forward: bool, r: int) -> int:
        chunk = (k // p) % v
        return (chunk if forward else v - 1 - chunk) * p + r

    def microbatch(k: int) -> int:
        return (k // (p * v)) * p + k % p

    rows = []
    for r in range(p):
        warmup = min(2 * (p - 1 - r) + (v - 1) * p, total)
        row = [Action(stage(k, True, r), F, microbatch(k)) for k in range(warmup)]
        for k in range(total - warmup):
            row.append(Action(stage(k + warmup, True, r), F, microbatch(k + warmup)))
            row.append(Action(stage(k, False, r), B, microbatch(k)))
        row += [Action(stage(k, False, r), B, microbatch(k)) for k in range(total - warmup, total)]
        rows.append(row)
    return build("interleaved_1f1b", rows, p * v, m, looped_placement(p, v))
