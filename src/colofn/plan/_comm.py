"""Bytes each device sends per step, collective by collective.

Every entry is ``calls`` collectives of ``nbytes`` input each over one mesh
axis; its bytes are :func:`colofn.tracing.volume` of that input, the rule
:func:`colofn.comm_trace` records with, so a prediction can be compared with a
trace entry by entry (``tests/test_plan.py`` does, on the simulated world).

What each strategy sends (``b`` microbatch rows per dp rank, ``s`` sequence,
``h`` width, ``L`` layers on the device, ``P`` parameter bytes on the device):

* dp: one all-reduce of the gradients (``P``) in the backward (overlapped,
  in buckets); ZeRO 0 the
  same after the backward; ZeRO 1 and 2: a reduce-scatter of the gradients
  (overlapped with the backward) and an all-gather of the updated
  parameter shards; ZeRO 3: an all-gather in the forward, another in the
  backward (less an untied embedding, which the backward does not read) and
  a reduce-scatter (Rajbhandari et al. 2020, section 7). Phases are
  :func:`colofn.comm_trace`'s: ``"backward"`` inside autograd's backward,
  ``"forward"`` anything else (the optimizer step included).
  The loss mean adds one all-reduce of two fp32 scalars (one under ZeRO); in
  plain dp (``colofn train``'s untracked path) those two ride at the end of
  the last gradient bucket instead.
* tp (Megatron, Shoeybi et al. 2019): ``2L + 1`` all-reduces of ``b*s*h``
  activations in the forward (attention, MLP, vocabulary-parallel
  embedding) and as many in the backward, plus the vocabulary-parallel
  cross-entropy's all-reduces of ``b*s`` and ``2*b*s`` fp32 statistics.
* tp with Megatron sequence parallelism (Korthikanti et al. 2022): each
  all-reduce becomes an all-gather of ``b*s*h/t`` and a reduce-scatter of
  ``b*s*h``; the gradients of the replicated parameters (norms, position
  table) are all-reduced over tp in the backward (with dp, the norms' over
  dp and tp at once, axis ``"dp+tp"``).
* sp with Ulysses (Jacobs et al. 2023): per layer, one all-to-all of the
  stacked queries, keys and values (``3 b s h / sp``) and one of the attention
  output (``b s h / sp``), and their transposes in the backward; the loss and
  the gradients are all-reduced over dp and sp at once (``"dp+sp"``).
* sp with ring attention (Liu et al. 2023, zig-zag): per layer ``sp - 1``
  sends of the stacked keys and values (``2 b s h / sp``) and as many of
  their gradients in the backward; the token ids and targets are gathered
  over sp once; the loss and the gradients as under Ulysses.
* ep (GShard, Lepikhin et al. 2020): per MoE layer, the router's statistics
  all-reduced over the tokens' axes, an all-gather of per-expert counts over
  ep, and two all-to-alls (dispatch, combine) of ``ep x room x h`` each way;
  the experts' gradients are all-reduced over dp, the rest over dp and ep.
* pp: each microbatch's ``b*s*h`` activation is sent to the next stage and its
  gradient to the previous one (``/t`` with Megatron-SP), with experts also the
  running balancing loss (a 4-byte scalar each way); the schedule's small
  metadata messages are not counted. With pp, dp all-reduces each stage's
  gradients once per step (summed locally over the microbatches first) and
  every rank the step's loss shares once, and the tp collectives of the
  embedding (forward) and head (backward) run on the first and last stage.

>>> from colofn.plan import Candidate, model
>>> [str(c) for c in step_collectives(model("tiny"), Candidate((("dp", 2),)), global_batch=8)]
['grads all_reduce dp backward: 1 x 68232 B']
>>> [str(c) for c in step_collectives(model("tiny"), Candidate((("dp", 2),), zero=1), global_batch=8)][0]
'loss all_reduce dp forward: 1 x 4 B'
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from colofn.plan._candidate import Candidate
from colofn.plan._memory import (
    MIXED_ADAM,
    Precision,
    device_params,
    expert_device_params,
    zero_groups,
)
from colofn.plan._model import ModelShape
from colofn.tracing import volume

__all__ = ["Collective", "buckets", "step_collectives"]

Phase = Literal["forward", "backward"]


@dataclasses.dataclass(frozen=True)
class Collective:
    """``calls`` collectives ``op`` of ``nbytes`` input each, over mesh axis ``axis`` of ``n`` devices."""

    what: str
    op: str
    axis: str
    n: int
    phase: Phase
    calls: int
    nbytes: int
    sent: int | None = None  # bytes sent, when a strategy's own formula gives them (the tp grids)
    messages: int | None = None  # separate calls on the wire, when not ``calls`` (buckets, ZeRO units)

    @property
    def bytes_sent(self) -> int:
        """Bytes one device sends for all the calls (the rule of :func:`colofn.tracing.volume`)."""
        if self.sent is not None:
            return self.sent
        if self.op == "send":
            return self.calls * self.nbytes
        return self.calls * volume(self.op, self.nbytes, self.n)[0]

    @property
    def n_messages(self) -> int:
        """Collective calls this device makes for it: each bucket or ZeRO unit is one; a send is also a receive.

        A pipeline stage receives as many messages as it sends (activations from
        the previous stage for its gradients to it, gradients from the next for
        the activations it sent). This is what :attr:`Cluster.per_call_s
        <colofn.plan.Cluster>` charges; the latency is charged per message
        (``messages``, else ``calls``: a send and its receive are one message).
        """
        if self.messages is not None:
            return self.messages
        return 2 * self.calls if self.op == "send" else self.calls

    def __str__(self) -> str:
        return f"{self.what} {self.op} {self.axis} {self.phase}: {self.calls} x {self.nbytes} B"


def buckets(nbytes: int) -> int:
    """All-reduces a gradient sum of ``nbytes`` is launched as: DDP's caps (:class:`colofn._dist_comm.GradBucket`).

    The first bucket closes at :data:`~colofn._dist_comm.FIRST_BUCKET_BYTES`, the
    others at :data:`~colofn._dist_comm.BUCKET_BYTES` (a bucket closes on the
    parameter that reaches its cap, so this is exact up to where the last parameter falls).

    >>> buckets(2_000_000), buckets(100 << 20)
    (2, 5)
    """
    from colofn._dist_comm import BUCKET_BYTES, FIRST_BUCKET_BYTES

    return 1 + max(0, -(-(nbytes - FIRST_BUCKET_BYTES) // BUCKET_BYTES))


def _replicated(m: ModelShape, c: Candidate, stage: int) -> tuple[int, int]:
    """(norm parameters, position-table parameters) of pipeline stage ``stage``: what tp replicates."""
    pp = c.size("pp")
    norms = 2 * (m.n_layers // pp) * m._norm + (m._norm if stage == pp - 1 else 0)
    return norms, m.pos_params if stage == 0 else 0


def plain_dp(m: ModelShape, c: Candidate) -> bool:
    """Whether ``colofn train`` runs ``c`` as plain data parallelism: untracked, DDP's buckets, the loss in the last.

    (``colofn.parallel.gpt``'s dense trainer on a plan that splits only the batch, over ``dp``.)
    """
    return (c.size("dp") > 1 and c.zero is None and c.sp == "none" and c.tp_mode == "1d" and not m.n_experts
            and all(c.size(a) == 1 for a in ("tp", "sp", "ep", "pp")))


def tokens_axis(c: Candidate) -> tuple[str, int]:
    """The axes the tokens are split over (``"dp"``, ``"sp"``, ``"ep"`` or several, ``"dp+ep"``) and their size."""
    axes = [a for a in ("dp", "sp", "ep") if c.size(a) > 1] or ["dp"]
    return "+".join(axes), c.size("dp") * c.size("sp") * c.size("ep")


def _dp(m: ModelShape, c: Candidate, pr: Precision, stage: int) -> list[Collective]:
    axis, n = tokens_axis(c)
    if n == 1:
        return []
    p = device_params(m, c, stage)
    grads = p * pr.comm_grad
    calls = 1  # with pp too: a stage sums its microbatches' gradients locally first (StepSums), as Megatron-LM does
    if c.zero is None and c.sp == "megatron" and c.size("tp") > 1:
        # Norm gradients are summed over dp and tp at once; the position table is
        # summed whole over tp (in _tp) and whole over dp (varied before it is sliced).
        t, (norms, _) = c.size("tp"), _replicated(m, c, stage)
        dp_grads = (p - norms) * pr.comm_grad
        return [Collective("grads", "all_reduce", "dp", n, "backward", calls, dp_grads, messages=buckets(dp_grads)),
                Collective("norm grads", "all_reduce", "dp+tp", n * t, "backward", calls, norms * pr.comm_grad,
                           messages=buckets(norms * pr.comm_grad))]
    if c.size("ep") > 1 and c.zero is None:  # the experts' gradients over dp, everything else over dp and ep
        experts = expert_device_params(m, c, stage)
        dense = (p - experts) * pr.comm_grad
        out = [Collective("grads", "all_reduce", axis, n, "backward", calls, dense, messages=buckets(dense))]
        if c.size("dp") > 1:
            out.append(Collective("expert grads", "all_reduce", "dp", c.size("dp"), "backward", calls,
                                  experts * pr.comm_grad, messages=buckets(experts * pr.comm_grad)))
        return out
    if c.zero is None:  # plain dp: all-reduced inside the backward (with Ulysses, over dp and sp at once)
        if plain_dp(m, c):  # the loss's (sum, count) rides at the end of the last bucket (colofn._reducer)
            grads += 8
        return [Collective("grads", "all_reduce", axis, n, "backward", calls, grads, messages=buckets(grads))]
    return _zero(m, c, pr, stage)


def _zero(m: ModelShape, c: Candidate, pr: Precision, stage: int) -> list[Collective]:
    """ZeRO's collectives, group by group (:func:`~colofn.plan._memory.zero_groups`), on the padded buckets."""
    # Overlapped with the backward; inside pipeline stages, once after the schedule's last action.
    rs_phase: Phase = "forward" if c.size("pp") > 1 else "backward"
    out = []
    for i, (axis, n, units) in enumerate(zero_groups(m, c, stage)):
        if n == 1:
            continue
        padded = sum(-(-u // n) * n for u in units)
        grads, shard, k = padded * pr.comm_grad, padded * pr.param // n, len(units)  # one message per unit
        if c.stage == 0:  # ZeRO's stage 0 reduces after the backward
            out.append(Collective("grads", "all_reduce", axis, n, "forward", 1, grads, messages=k))
        elif c.stage in (1, 2):
            out += [Collective("grads", "reduce_scatter", axis, n, rs_phase, 1, grads, messages=k),
                    Collective("params", "all_gather", axis, n, "forward", 1, shard, messages=k)]
        else:
            # The backward does not read an untied embedding (its gradient is a scatter of
            # the output gradient), so stage 3 does not gather it again.
            first = -(-units[0] // n) * n if i == 0 and not m.tie_embeddings else 0
            out += [Collective("params", "all_gather", axis, n, "forward", 1, shard, messages=k),
                    Collective("params", "all_gather", axis, n, "backward", 1, (padded - first) * pr.param // n,
                               messages=k - (first > 0)),
                    Collective("grads", "reduce_scatter", axis, n, "backward", 1, grads, messages=k)]
    return out


def _tp(m: ModelShape, c: Candidate, pr: Precision, b: int, stage: int) -> list[Collective]:
    t, pp = c.size("tp"), c.size("pp")
    mb = c.microbatches if pp > 1 else 1
    if t == 1:
        return []
    first, last = stage == 0, stage == pp - 1
    act = b * m.seq_len * m.d_model * pr.activation
    layers = m.n_layers // pp
    # Two per block each way; the vocabulary-parallel embedding's in the forward
    # (first stage), the head's input in the backward (last stage).
    calls = {"forward": (2 * layers + first) * mb, "backward": (2 * layers + last) * mb}
    # Megatron-SP: the embedding's output is reduce-scattered (its transpose all-gathers in the
    # backward), the head's input all-gathered (reduce-scattered in the backward).
    gathers = {"forward": (2 * layers + last) * mb, "backward": (2 * layers + first) * mb}
    out = []
    for phase in ("forward", "backward"):
        if c.sp == "megatron":
            out += [Collective("activations", "all_gather", "tp", t, phase, gathers[phase], act // t),  # type: ignore[arg-type]
                    Collective("activations", "reduce_scatter", "tp", t, phase, calls[phase], act)]  # type: ignore[arg-type]
        else:
            out.append(Collective("activations", "all_reduce", "tp", t, phase, calls[phase], act))  # type: ignore[arg-type]
    if last:
        out += [Collective("loss max", "all_reduce", "tp", t, "forward", mb, b * m.seq_len * 4),
                Collective("loss sums", "all_reduce", "tp", t, "forward", mb, 2 * b * m.seq_len * 4)]
    if c.sp == "megatron":
        norms, pos = _replicated(m, c, stage)
        # Plain dp sums the norms' gradients over dp and tp at once (in _dp); ZeRO owns dp itself.
        replicated = pos if c.size("dp") > 1 and c.zero is None else norms + pos
        # In a pipeline a stage's parameter sums wait for the step's end (StepSums): once per step.
        out.append(Collective("replicated grads", "all_reduce", "tp", t, "backward", 1, replicated * pr.comm_grad))
    return out


def _pp(m: ModelShape, c: Candidate, pr: Precision, b: int, stage: int) -> list[Collective]:
    pp = c.size("pp")
    if pp == 1:
        return []
    act = b * m.seq_len * m.d_model * pr.activation // (c.size("tp") if c.sp == "megatron" else 1)
    out = []
    if stage < pp - 1:
        out.append(Collective("activations", "send", "pp", pp, "forward", c.microbatches, act))
    if stage > 0:
        out.append(Collective("activation grads", "send", "pp", pp, "backward", c.microbatches, act))
    if m.n_experts:  # the running balancing loss travels with the activations (train/pipe_moe.py): fp32 scalars
        out += [Collective("aux loss" + g, "send", "pp", pp, ph, c.microbatches, 4)  # type: ignore[arg-type]
                for g, ph, on in (("", "forward", stage < pp - 1), (" grad", "backward", stage > 0)) if on]
    return out


def _ulysses(m: ModelShape, c: Candidate, pr: Precision, b: int) -> list[Collective]:
    n = c.size("sp")
    if n == 1:
        return []
    act = b * m.seq_len // n * m.d_model * pr.activation
    return [Collective(what, "all_to_all", "sp", n, phase, m.n_layers, k * act)  # type: ignore[arg-type]
            for phase in ("forward", "backward") for what, k in (("q,k,v", 3), ("attention out", 1))]


def _ring(m: ModelShape, c: Candidate, pr: Precision, b: int) -> list[Collective]:
    """Ring attention (zig-zag): per layer ``sp - 1`` hops of the stacked keys and values, and of their
    gradients back; the token ids and targets gathered over sp once (int64) to cut them zig-zag."""
    n = c.size("sp")
    if n == 1:
        return []
    kv = 2 * b * (m.seq_len // n) * m.d_model * pr.activation
    return [Collective("k,v", "send", "sp", n, "forward", m.n_layers * (n - 1), kv),
            Collective("k,v grads", "send", "sp", n, "backward", m.n_layers * (n - 1), kv),
            Collective("token ids, targets", "all_gather", "sp", n, "forward", 2, b * (m.seq_len // n) * 8)]


def balanced_room(m: ModelShape, c: Candidate, global_batch: int) -> int:
    """Rows per destination of an ep all-to-all when the router spreads tokens evenly: ``b s k / ep``."""
    return -(-microbatch_rows(c, global_batch) * m.seq_len * m.top_k // c.size("ep"))


def _moe(m: ModelShape, c: Candidate, pr: Precision, global_batch: int,
         rooms: tuple[int, ...] | None, stage: int) -> list[Collective]:
    axis, n = tokens_axis(c)
    per = m.n_layers // c.size("pp")
    mb = c.microbatches if c.size("pp") > 1 else 1
    layers = sum(1 for i in range(stage * per, (stage + 1) * per) if (i + 1) % m.moe_every == 0) * mb
    out = []
    ep = c.size("ep")
    # With ep the per-expert counts ride in the statistics' all-reduce as a [ranks, experts]
    # table, while every partial sum of counts is an exact float32 (parallel/ep/routing.py);
    # past 2**24 assignments routing all-gathers them instead.
    routed = microbatch_rows(c, global_batch) * m.seq_len * n * m.top_k
    counted = ep > 1 and routed <= 2**24
    if n > 1:  # the router's statistics: assignments and probabilities per expert, summed over the tokens' axes
        rows = 2 + (n if counted else 0)
        out.append(Collective("router stats", "all_reduce", axis, n, "forward", layers, rows * m.n_experts * 4))
    if ep == 1:
        return out
    if not counted:
        out.append(Collective("expert counts", "all_gather", "ep", ep, "forward", layers, m.n_experts * 8))
    for room in rooms or (balanced_room(m, c, global_batch),) * layers:
        for phase in ("forward", "backward"):  # dispatch and combine, and their transposes
            out.append(Collective("tokens", "all_to_all", "ep", ep, phase, 2, ep * room * m.d_model * pr.activation))  # type: ignore[arg-type]
    return out


def _grid(m: ModelShape, c: Candidate, pr: Precision, global_batch: int) -> list[Collective]:
    """A tp grid's step (2d, 2.5d: :func:`colofn.parallel.tp2d.cost.step_bytes`; 3d:
    :func:`colofn.parallel.tp3d.volume.step_ops`), the gradient sums over dp and the loss's included."""
    import math

    from colofn.parallel.tp2d.cost import step_bytes
    from colofn.parallel.tp3d.volume import step_ops
    from colofn.plan._model import gpt_config
    from colofn.train.config import TrainConfig

    cfg = TrainConfig(mesh=c.mesh, tp_mode=c.tp_mode, tp_depth=c.tp_depth)
    plan, shape, config = cfg.plan(), cfg.device_mesh_shape, gpt_config(m, pr.activation)
    formula = step_ops if c.tp_mode == "3d" else step_bytes
    return [Collective(f"{c.tp_mode} grid", op, "+".join(axes), math.prod(shape[a] for a in axes), phase,  # type: ignore[arg-type]
                       1, nbytes, sent=nbytes)
            for (op, axes, phase), nbytes in formula(config, plan, shape, global_batch, m.seq_len).items()]


def microbatch_rows(c: Candidate, global_batch: int) -> int:
    """Rows of one microbatch on one dp (and ep) rank."""
    mb = c.microbatches if c.size("pp") > 1 else 1
    return global_batch // (c.size("dp") * c.size("ep") * mb)


def step_collectives(m: ModelShape, c: Candidate, *, global_batch: int, precision: Precision = MIXED_ADAM,
                     stage: int = 0, ep_rooms: tuple[int, ...] | None = None
                     ) -> list[Collective]:
    """The collectives a device of pipeline stage ``stage`` runs in a step (pipeline metadata aside).

    ``ep_rooms``: rows per destination of each MoE layer's (and microbatch's) all-to-alls (colofn pads
    them to the most any rank sends any other in the step, which depends on the
    routing); ``None``: :func:`balanced_room`, a router that spreads tokens evenly.
    """
    if c.tp_mode != "1d":
        return _grid(m, c, precision, global_batch)
    b = microbatch_rows(c, global_batch)
    out = []
    axis, n = tokens_axis(c)
    if n > 1 and c.size("pp") > 1 and not m.n_experts:
        # every stage's ranks sum the step's loss shares ([microbatches] fp32) once, after the schedule
        # (train/pipe_loss.py): no psum in the last stage's forward
        out.append(Collective("loss", "all_reduce", axis, n, "forward", 1, 4 * c.microbatches))
    elif n > 1 and stage == c.size("pp") - 1 and not plain_dp(m, c):
        calls = c.microbatches if c.size("pp") > 1 else 1
        if c.zero is not None and c.size("pp") == 1 and not m.n_experts:
            # ZeRO averages each dp rank's own mean (one scalar); the loss psums its (sum, count) over sp itself.
            out += [Collective("loss", "all_reduce", a, c.size(a), "forward", 1, k)
                    for a, k in (("dp", 4), ("sp", 8)) if c.size(a) > 1]
        else:  # the (sum, count) psum of the whole step's (or microbatch's) tokens
            out.append(Collective("loss", "all_reduce", axis, n, "forward", calls, 8))
    moe = _moe(m, c, precision, global_batch, ep_rooms, stage) if m.n_experts else []
    seq = _ring(m, c, precision, b) if c.sp == "ring" else _ulysses(m, c, precision, b)
    return (out + _tp(m, c, precision, b, stage) + seq + moe
            + _pp(m, c, precision, b, stage) + _dp(m, c, precision, stage))
