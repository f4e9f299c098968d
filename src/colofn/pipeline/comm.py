"""The communication a schedule implies, and the execution contract for runtimes.

Nothing here communicates: it derives, from the actions and the placement, which
tensor goes from which rank to which, and when.

* ``sFm`` on rank ``a`` with stage ``s+1`` on rank ``b != a``: the **activation**
  goes from ``a`` to ``b``, consumed by ``(s+1)Fm``.
* ``sBm`` or ``sIm`` on rank ``a`` with stage ``s-1`` on rank ``b != a``: the
  **gradient** of the stage input goes from ``a`` to ``b``, consumed by the
  backward (``B`` or ``I``) of ``s-1`` for ``m``.
* Everything else (``F`` -> own backward, ``I`` -> ``W``, neighbours on the same
  rank) stays on the rank.

Execution contract
------------------
This is what :func:`~colofn.pipeline.validate` proves deadlock-free, and what a
runtime must do with :func:`plan`:

1. Each rank runs its :class:`Step` s in order, one at a time.
2. Before a step's action, the rank receives every transfer in ``step.recvs``;
   a receive **blocks** until the sender has run the producing action and posted
   its send. (Receives may be posted earlier as ``irecv``; the action waits for
   them.)
3. The rank runs the action.
4. After it, the rank posts every transfer in ``step.sends`` as a **non-blocking**
   send (``isend``) and goes on at once. A send completes when the receiver
   receives it; a rank waits for its own sends only at the end of the training
   step (before the optimizer), never between actions.
5. Messages are matched by ``(src, dst, tag)`` (:attr:`Transfer.tag` is unique
   within a schedule). A backend that matches only by order on each pair (NCCL
   ignores tags) needs the sender's and receiver's orders to agree:
   :func:`fifo_conflicts` lists the pairs where they do not.

Under this contract a schedule deadlocks exactly when its wait-for graph (each
rank's order plus the data dependencies) has a cycle, which
:func:`~colofn.pipeline.validate` detects by executing it step by step. Sends
that block until the matching receive (rendezvous) are *not* safe: they deadlock
textbook 1F1B, where rank 0 sends its second activation while rank 1 sends its
first gradient.

>>> from colofn.pipeline.schedules import one_f_one_b
>>> [str(t) for t in transfers(one_f_one_b(2, 1))]
['activation 0F0 -> 1F0 (rank 0 -> rank 1, tag 0)', 'gradient 1B0 -> 0B0 (rank 1 -> rank 0, tag 3)']
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from colofn.pipeline._graph import backward_kinds, inputs, locate
from colofn.pipeline.ir import Action, ActionKind, Schedule
from colofn.pipeline.validation import validate

__all__ = ["Payload", "Step", "Transfer", "fifo_conflicts", "plan", "transfers"]


class Payload(Enum):
    """What a :class:`Transfer` carries."""

    ACTIVATION = "activation"
    GRADIENT = "gradient"


class Transfer(NamedTuple):
    """``producer``'s result, sent from rank ``src`` to rank ``dst`` for ``consumer``."""

    payload: Payload
    producer: Action
    consumer: Action
    src: int
    dst: int
    tag: int

    @property
    def microbatch(self) -> int:
        """The microbatch the tensor belongs to."""
        return self.producer.microbatch

    def __str__(self) -> str:
        return (f"{self.payload.value} {self.producer} -> {self.consumer} "
                f"(rank {self.src} -> rank {self.dst}, tag {self.tag})")


class Step(NamedTuple):
    """One action of a rank's program, with the receives before it and sends after it."""

    action: Action
    recvs: tuple[Transfer, ...]
    sends: tuple[Transfer, ...]


def _tag(payload: Payload, producer: Action, num_microbatches: int) -> int:
    return (2 * producer.stage + (payload is Payload.GRADIENT)) * num_microbatches + (
        producer.microbatch
    )


def _edges(schedule: Schedule) -> list[Transfer]:
    bwd = backward_kinds(schedule)
    rank_of = {a: locs[0].rank for a, locs in locate(schedule).items()}
    found = []
    for row in schedule.actions:
        for consumer in row:
            if consumer is None:
                continue
            for producer in inputs(consumer, schedule.num_stages, bwd):
                if producer.stage == consumer.stage:
                    continue  # own forward, or I -> W: always on the same rank
                src, dst = rank_of[producer], rank_of[consumer]
                if src != dst:
                    payload = (Payload.ACTIVATION if producer.kind is ActionKind.F
                               else Payload.GRADIENT)
                    found.append(Transfer(payload, producer, consumer, src, dst,
                                          _tag(payload, producer, schedule.num_microbatches)))
    return found


def transfers(schedule: Schedule) -> tuple[Transfer, ...]:
    """Every cross-rank transfer ``schedule`` implies, in the senders' order.

    Validates ``schedule`` first.
    """
    validate(schedule)
    order = {a: (r, k) for r, row in enumerate(schedule.actions)
             for k, a in enumerate(row) if a is not None}
    return tuple(sorted(_edges(schedule), key=lambda t: order[t.producer]))


def plan(schedule: Schedule) -> tuple[tuple[Step, ...], ...]:
    """Each rank's program: its actions in order with their receives and sends.

    Idle slots (``None``) are dropped. Validates ``schedule`` first.

    >>> from colofn.pipeline.schedules import one_f_one_b
    >>> step = plan(one_f_one_b(2, 1))[1][1]
    >>> str(step.action), [str(t.producer) for t in step.recvs], [str(t.consumer) for t in step.sends]
    ('1B0', [], ['0B0'])
    """
    sends: dict[Action, list[Transfer]] = {}
    recvs: dict[Action, list[Transfer]] = {}
    for t in transfers(schedule):
        sends.setdefault(t.producer, []).append(t)
        recvs.setdefault(t.consumer, []).append(t)
    return tuple(
        tuple(Step(a, tuple(recvs.get(a, ())), tuple(sends.get(a, ())))
              for a in row if a is not None)
        for row in schedule.actions
    )


def fifo_conflicts(schedule: Schedule) -> list[str]:
    """Rank pairs whose send order differs from the receive order (empty if none).

    Only matters for backends that match messages by order instead of by tag.
    """
    program = plan(schedule)
    sent: dict[tuple[int, int], list[Transfer]] = {}
    received: dict[tuple[int, int], list[Transfer]] = {}
    for steps in program:
        for step in steps:
            for t in step.sends:
                sent.setdefault((t.src, t.dst), []).append(t)
            for t in step.recvs:
                received.setdefault((t.src, t.dst), []).append(t)
    found = []
    for pair, order in sorted(sent.items()):
        if order != received[pair]:
            k = next(i for i, (a, b) in enumerate(zip(order, received[pair], strict=True))
                     if a != b)
            found.append(
                f"rank {pair[0]} -> rank {pair[1]}: message {k} is sent as "
                f"{order[k].payload.value} {order[k].producer} but received as "
                f"{received[pair][k].payload.value} {received[pair][k].producer}"
            )
    return found
