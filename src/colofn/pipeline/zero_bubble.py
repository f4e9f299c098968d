"""Built-in schedules with split backward: ZB-H1, ZB-H2, ZBV and DualPipeV.

The backward is split into ``I`` (input gradient, which the previous stage waits
for) and ``W`` (weight gradient, which nobody waits for), so ``W`` can be moved
into bubbles. Zero Bubble is Qi et al. 2023 (arXiv 2401.10241); its ``B`` is our
``I``. DualPipeV is the "cut-in-half" V variant of DeepSeek's DualPipe
(DeepSeek-V3 report, arXiv 2412.19437; github.com/deepseek-ai/DualPipe).

>>> print(zb_h1(2, 3))
step     0   1   2   3   4   5   6   7   8
rank 0 0F0 0F1 0I0 0W0 0F2 0I1 0W1 0I2 0W2
rank 1 1F0 1I0 1F1 1I1 1W0 1F2 1I2 1W1 1W2
"""

from __future__ import annotations

from collections import deque

from colofn.pipeline.ir import Action, ActionKind, Schedule, looped_placement, v_placement
from colofn.pipeline.schedules import build, check_sizes

__all__ = ["dualpipev", "zb_h1", "zb_h2", "zbv"]

F, B, I, W = ActionKind.F, ActionKind.B, ActionKind.I, ActionKind.W  # noqa: E741


class _Row:
    """One rank's list under construction, with per-stage counters and a W queue."""

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self.next: dict[tuple[int, ActionKind], int] = {}
        self.pending_w: deque[Action] = deque()

    def add(self, stage: int, kind: ActionKind) -> None:
        """Append ``kind`` on ``stage`` for that stage's next microbatch of that kind.

        ``B`` and ``I`` share a counter (both are "the backward"); ``I`` queues
        its ``W``.
        """
        key = (stage, I if kind is B else kind)
        m = self.next.get(key, 0)
        self.next[key] = m + 1
        self.actions.append(Action(stage, kind, m))
        if kind is I:
            self.pending_w.append(Action(stage, W, m))

    def weight(self, stage: int | None = None) -> None:
        """Append the oldest pending ``W`` (of ``stage``, if given), if any."""
        pending = [a for a in self.pending_w if stage is None or a.stage == stage]
        if pending:
            action = pending[0]
            self.pending_w.remove(action)
            self.actions.append(action)
            self.next[(action.stage, W)] = self.next.get((action.stage, W), 0) + 1

    def count(self, stage: int, kind: ActionKind) -> int:
        """How many ``kind`` (``B`` counted as ``I``) this row has on ``stage``."""
        return self.next.get((stage, kind), 0)


def zb_h1(num_ranks: int, num_microbatches: int, *, chunks: int = 1) -> Schedule:
    """ZB-H1: 1F1B with split backward and late ``W`` s; 1F1B's memory, 1/3 of its bubble.

    Rank ``r`` runs 1F1B's ``p - 1 - r`` warm-up forwards, then ``F``, ``I``
    pairs; the ``W`` after the ``k``-th ``I`` is held back ``r`` places, so the
    later ranks keep ``r`` weight gradients pending and run them in the tail,
    where 1F1B idles. Bubble ``(p-1)(T_F + T_I - T_W)``, peak ``p`` activations.
    """
    check_sizes("zb_h1", num_ranks, num_microbatches, chunks, allowed_chunks=(1,))
    p, m = num_ranks, num_microbatches
    rows = []
    for r in range(p):
        row = _Row()
        warmup = min(p - 1 - r, m)
        for _ in range(warmup):
            row.add(r, F)
        for k in range(m):
            if k < m - warmup:
                row.add(r, F)
            row.add(r, I)
            if k >= r:
                row.weight()
        while row.pending_w:
            row.weight()
        rows.append(row.actions)
    return build("zb_h1", rows, p, m, looped_placement(p))


def zb_h2(num_ranks: int, num_microbatches: int, *, chunks: int = 1) -> Schedule:
    """ZB-H2: more warm-up forwards and late ``W`` s turn the pipeline into a parallelogram.

    The order is what list scheduling with unit costs produces: each rank, when
    idle, runs the first ready item of (1) its next ``I``; (2) its next ``F``, if
    fewer than ``2 (p - 1 - r) + 1`` activations are in flight and fewer than
    ``2p - 1`` microbatches are between their ``F`` and their ``W``; (3) its oldest
    pending ``W``. Rank 0 thus warms up with ``2p - 1`` forwards, the later ranks
    push their ``W`` s to the tail, and with ``T_F = T_I = T_W`` every rank computes
    without a gap from its first action to its last, as in the paper's figure.
    Bubble ``(p-1)(T_F + T_I - 2 T_W)`` per iteration when the optimizer step does
    not synchronise the ranks (the paper's setting; see ``SimulationResult.spans``)
    and ``m >= 2p - 1``; at most ``2p - 1`` activations in flight.
    """
    check_sizes("zb_h2", num_ranks, num_microbatches, chunks, allowed_chunks=(1,))
    p, m = num_ranks, num_microbatches
    rows = [_Row() for _ in range(p)]
    finish: dict[Action, int] = {}

    def ready(action: Action, t: int) -> bool:
        return all(finish.get(d, t + 1) <= t for d in _inputs_1d(action, p))

    t = 0
    while any(row.count(r, W) < m for r, row in enumerate(rows)):
        started = []
        for r, row in enumerate(rows):
            f, i, w = row.count(r, F), row.count(r, I), row.count(r, W)
            if i < m and ready(Action(r, I, i), t):
                row.add(r, I)
            elif (f < m and f - i < 2 * (p - 1 - r) + 1 and f - w < 2 * p - 1
                  and ready(Action(r, F, f), t)):
                row.add(r, F)
            elif row.pending_w:
                row.weight()
            else:
                continue
            started.append(row.actions[-1])
        if not started and all(v <= t for v in finish.values()):  # pragma: no cover
            raise AssertionError("zb_h2 list scheduling stalled; please report this")
        finish.update((a, t + 1) for a in started)
        t += 1
    return build("zb_h2", [row.actions for row in rows], p, m, looped_placement(p))


def _inputs_1d(action: Action, num_stages: int) -> tuple[Action, ...]:
    s, kind, m = action.stage, action.kind, action.microbatch
    if kind is F:
        return (Action(s - 1, F, m),) if s else ()
    return (Action(s, F, m),) + ((Action(s + 1, I, m),) if s + 1 < num_stages else ())


def zbv(num_ranks: int, num_microbatches: int, *, chunks: int = 2) -> Schedule:
    """ZB-V (Zero Bubble paper, section 6): two stages per rank in a V, 1F1B's memory.

    Rank ``r`` holds stages ``r`` and ``2p - 1 - r`` (:func:`v_placement`), so the
    forward runs down the ranks and back up, and rank 0 computes the loss. The
    order follows the paper's handcrafted schedule (and PyTorch's
    ``ScheduleZBVZeroBubble``): warm-up forwards on the first chunk, then ``F`` +
    ``I`` + ``W`` of the second, a steady state alternating chunks, a cool-down
    of ``I`` s and the remaining ``W`` s. Built for ``max(m, 2p - 1)`` microbatches
    and trimmed (see :func:`~colofn.pipeline.schedules.build`), so any ``m``
    works. ``chunks`` must be 2.
    """
    check_sizes("zbv", num_ranks, num_microbatches, chunks, allowed_chunks=(2,))
    p, m = num_ranks, num_microbatches
    n = max(2 * p - 1, m)
    rows = []
    for r in range(p):
        row = _Row()
        s0, s1 = r, 2 * p - 1 - r
        for _ in range(2 * (p - r) - 1):
            row.add(s0, F)
        for _ in range(r):
            row.add(s1, F)
            row.add(s0, F)
        for _ in range(p - r):
            row.add(s1, F)
            row.add(s1, I)
            row.weight(s1)
        while row.count(s1, F) < row.count(s0, F) or row.count(s0, F) < n:
            if row.count(s0, F) < n:
                row.add(s0, F)
            row.add(s0, I)
            row.weight(s0)
            row.add(s1, F)
            row.add(s1, I)
            row.weight(s1)
        # Cool-down: the remaining input grads, then the weight grads, chunk 1 first.
        for _ in range(r):
            row.add(s0, I)
            row.add(s1, I)
        for _ in range(p - r):
            row.add(s0, I)
            row.weight(s0)
        for stage in (s1, s0):
            while row.count(stage, W) < row.count(stage, I):
                row.weight(stage)
        rows.append(row.actions)
    return build("zbv", rows, 2 * p, m, v_placement(p))


def dualpipev(num_ranks: int, num_microbatches: int, *, chunks: int = 2) -> Schedule:
    """DualPipeV: DeepSeek's DualPipe cut in half, on a V of two stages per rank.

    Rank ``r`` holds stages ``r`` and ``2p - 1 - r``. Its eight phases follow
    DeepSeek's ``dualpipev.py`` (and PyTorch's ``ScheduleDualPipeV``):
    ``2(p-1-r)`` forwards of chunk 0; ``r + 1`` pairs ``F0 F1``; ``p - 1 - r``
    zero-bubble ``I1 W1 F1``; the main phase of overlapped pairs ``F0 B1``,
    ``F1 B0``; ``p - 1 - r`` of ``B1`` then ``F1 B0``; ``r + 1`` pairs ``B1 B0``
    (the second half as ``I``, deferring ``W``); ``p - 1 - r`` of ``W`` then
    ``B0``/``I0``; and the remaining ``W`` s.

    DualPipe overlaps the compute of an ``F`` with a ``B`` of the other chunk to
    hide communication; this IR has no overlapped action, so each pair is an
    ``F`` followed by a ``B`` (simulated times are therefore an upper bound).
    Built for ``max(m, 2p)`` microbatches and trimmed, so any ``m`` works.
    ``chunks`` must be 2.
    """
    check_sizes("dualpipev", num_ranks, num_microbatches, chunks, allowed_chunks=(2,))
    p, m = num_ranks, num_microbatches
    n = max(m, 2 * p)
    rows = []
    for r in range(p):
        row = _Row()
        s0, s1 = r, 2 * p - 1 - r
        for _ in range(2 * (p - r - 1)):
            row.add(s0, F)
        for _ in range(r + 1):
            row.add(s0, F)
            row.add(s1, F)
        for _ in range(p - r - 1):
            row.add(s1, I)
            row.weight()
            row.add(s1, F)
        for _ in range(n - 2 * p + r + 1):
            row.add(s0, F)
            row.add(s1, B)
            row.add(s1, F)
            row.add(s0, B)
        for _ in range(p - r - 1):
            row.add(s1, B)
            row.add(s1, F)
            row.add(s0, B)
        split = False
        for i in range(r + 1):
            if i == (r + 1) // 2 and r % 2 == 1:
                split = True
            row.add(s1, I if split else B)
            if i == (r + 1) // 2 and r % 2 == 0:
                split = True
            row.add(s0, I if split else B)
        for _ in range(p - r - 1):
            row.weight()
            row.add(s0, I if split else B)
        while row.pending_w:
            row.weight()
        rows.append(row.actions)
    return build("dualpipev", rows, 2 * p, m, v_placement(p))
