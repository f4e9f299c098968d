"""Each rank's program for the runtime: :func:`~colofn.pipeline.plan` plus skip connections.

A *link* carries values from one stage to a later one: the chain link
``s -> s+1`` carries a stage's output (minus the names routed away by skips),
and a skip link ``src -> dst`` carries the named outputs ``names`` of ``src``.
For every link and microbatch the activation goes forward (produced by ``F`` of
``src``, consumed by ``F`` of ``dst``) and its gradient comes back (produced by
the ``B``/``I`` of ``dst``, consumed by the ``B``/``I`` of ``src``).

Only links between different ranks become messages. Chain messages are exactly
the :class:`~colofn.pipeline.Transfer` s of :func:`~colofn.pipeline.plan`, with
their tags; skip messages get tags after the chain's. A skip adds no wait that
the chain does not already imply (``F`` of ``src`` precedes ``F`` of ``dst``
through the chain, and so does the backward of ``dst`` before the backward of
``src``), so every schedule :func:`~colofn.pipeline.validate` accepts stays
deadlock-free with any skips.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from colofn.pipeline.comm import Payload, Step, plan
from colofn.pipeline.ir import Action, ActionKind, Schedule

LOSS_LINK = -1
"""The pseudo-link on which the last stage's rank shares the microbatch losses."""


class Link(NamedTuple):
    """Values flowing from stage ``src`` to stage ``dst``; ``names=None`` is the chain link."""

    key: int  # position in the tuple of links; messages name their link by it
    src: int
    dst: int
    names: tuple[str, ...] | None


class Msg(NamedTuple):
    """One cross-rank message: ``payload`` of ``link`` for ``microbatch``, to or from ``peer``."""

    payload: Payload
    link: int
    microbatch: int
    peer: int  # index along the pipeline axis
    tag: int


class Op(NamedTuple):
    """One action with the messages received before it and sent after it."""

    action: Action
    recvs: tuple[Msg, ...]
    sends: tuple[Msg, ...]


class Slot(Enum):
    """Which part of a message a point-to-point op carries (see :func:`wire_tag`)."""

    META_SIZE = 0
    META = 1
    DATA = 2


def make_links(num_stages: int, skips: dict[tuple[int, int], tuple[str, ...]]) -> tuple[Link, ...]:
    """Chain links ``0..S-2`` (index = source stage), then one link per skip ``(src, dst)``."""
    chain = [Link(s, s, s + 1, None) for s in range(num_stages - 1)]
    extra = [Link(num_stages - 1 + j, src, dst, names)
             for j, ((src, dst), names) in enumerate(sorted(skips.items()))]
    return tuple(chain + extra)


def num_tags(num_stages: int, num_links: int, num_microbatches: int) -> int:
    """Tags used by one step: two per (link, microbatch) plus one for the losses."""
    skips = num_links - (num_stages - 1)
    return 2 * (num_stages + skips) * num_microbatches + 1


def message_tag(link: Link, payload: Payload, microbatch: int, num_stages: int,
                num_microbatches: int) -> int:
    """The tag of a link's message; for chain links, :attr:`Transfer.tag <colofn.pipeline.Transfer.tag>`."""
    grad = payload is Payload.GRADIENT
    if link.names is None:  # the plan's tag: by the producing stage (src for F, dst for B/I)
        producer = link.dst if grad else link.src
        return (2 * producer + grad) * num_microbatches + microbatch
    j = link.key - (num_stages - 1)
    return 2 * num_stages * num_microbatches + (2 * j + grad) * num_microbatches + microbatch


def loss_tag(tags: int) -> int:
    return tags - 1


def wire_tag(tag: int, slot: Slot, leaf: int, tags: int) -> int:
    """The tag of one point-to-point op: message ``tag``, the part ``slot`` (and leaf number)."""
    k = slot.value + (leaf if slot is Slot.DATA else 0)
    return tag + tags * k


def programs(schedule: Schedule, links: tuple[Link, ...]) -> tuple[tuple[Op, ...], ...]:
    """Every rank's ops in order; validates ``schedule`` (via :func:`plan`)."""
    steps = plan(schedule)  # validates
    S, M = schedule.num_stages, schedule.num_microbatches
    rank_of = schedule.stage_to_rank
    into: dict[int, list[Link]] = {}
    out_of: dict[int, list[Link]] = {}
    for link in links:
        into.setdefault(link.dst, []).append(link)
        out_of.setdefault(link.src, []).append(link)

    def msg(payload: Payload, link: Link, m: int, peer: int) -> Msg:
        return Msg(payload, link.key, m, peer, message_tag(link, payload, m, S, M))

    result = []
    for rank, row in enumerate(steps):
        ops = []
        for step in row:
            a = step.action
            s, m = a.stage, a.microbatch
            recvs: list[Msg] = []
            sends: list[Msg] = []
            if a.kind is ActionKind.F:
                recvs = [msg(Payload.ACTIVATION, k, m, rank_of[k.src])
                         for k in into.get(s, ()) if rank_of[k.src] != rank]
                sends = [msg(Payload.ACTIVATION, k, m, rank_of[k.dst])
                         for k in out_of.get(s, ()) if rank_of[k.dst] != rank]
            elif a.kind.is_backward_input:
                recvs = [msg(Payload.GRADIENT, k, m, rank_of[k.dst])
                         for k in out_of.get(s, ()) if rank_of[k.dst] != rank]
                sends = [msg(Payload.GRADIENT, k, m, rank_of[k.src])
                         for k in into.get(s, ()) if rank_of[k.src] != rank]
            _check_against_plan(step, recvs, sends, S)
            ops.append(Op(a, tuple(recvs), tuple(sends)))
        result.append(tuple(ops))
    return tuple(result)


def last_param_passes(program: tuple[Op, ...]) -> dict[int, int]:
    """``{op index: stage}`` for each stage's last parameter backward (``B`` or ``W``) in ``program``."""
    last: dict[int, int] = {}
    for k, op in enumerate(program):
        if op.action.kind in (ActionKind.B, ActionKind.W):
            last[op.action.stage] = k
    return {k: stage for stage, k in last.items()}


def _check_against_plan(step: Step, recvs: list[Msg], sends: list[Msg], num_stages: int) -> None:
    """The chain messages derived here are exactly the plan's transfers (same peers and tags)."""
    def chain(msgs: list[Msg]) -> list[tuple[int, int]]:
        return sorted((x.peer, x.tag) for x in msgs if x.link < num_stages - 1)

    want = (sorted((t.src, t.tag) for t in step.recvs), sorted((t.dst, t.tag) for t in step.sends))
    if want != (chain(recvs), chain(sends)):  # pragma: no cover - an internal invariant
        raise AssertionError(f"runtime program disagrees with plan() at {step.action}")
