"""Predict one candidate: memory per device, bytes per link class, pipeline bubble, step time, MFU.

Step time is ``compute / (1 - bubble) + exposed communication``:

* compute: the device's share of the step's FLOPs (:meth:`ModelShape.flops_per_token`
  times tokens, over all devices; full recompute adds one forward, a third;
  selective recompute the attention core's forward, ``4 s h`` per token and layer)
  at ``efficiency`` times the cluster's peak;
* bubble: the idle fraction :func:`colofn.pipeline.simulate` finds for the
  schedule with ``T_B = 2 T_F`` (``T_I = T_W = T_F`` for zero-bubble schedules);
* communication: each collective's bytes over its link's bandwidth plus one
  latency per message (each gradient bucket and ZeRO unit is one; a send and
  its receive are one), plus the cluster's ``per_call_s`` per call the rank
  makes (every bucket, ZeRO unit, send and receive). An axis is intra-node when its group fits in a node
  (axes are row-major: the last axis is innermost). Gradient collectives in
  the backward overlap the backward's compute (two thirds of it); tensor
  parallel collectives sit on the critical path.

Compute includes the cluster's ``per_op_s`` per torch operation the rank
calls (:func:`colofn.plan.step_ops`). When a node has fewer ``cores`` than
ranks, the step is also at least the node's busy time over its cores: a
rank's busy time is its compute and its calls' ``per_call_s`` (a bubble, a
latency, bytes on the wire are waits, which hand the core to another rank).
Without a pipeline every rank runs the same program in step, so they wait
at the same time, and those waits add to that bound::

    step = max(compute / (1 - bubble) + comm,  busy x ranks / cores + (waits, without pp))

With a core per rank (the default) the second term is never the larger and
the step is the first, as before.

>>> from colofn.plan import Candidate, cluster, model
>>> p = predict(model("gpt2-124m"), Candidate((("dp", 8),)), cluster("cpu-local"), global_batch=8)
>>> p.fits, round(p.memory / 2**30, 2)
(True, 2.33)
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache

from colofn.plan._candidate import Candidate, check
from colofn.plan._cluster import Cluster
from colofn.plan._comm import Collective, microbatch_rows, step_collectives
from colofn.plan._memory import (
    MIXED_ADAM,
    Precision,
    activation_bytes_per_layer,
    colofn_activation_bytes_per_layer,
    model_state_bytes,
)
from colofn.plan._model import ModelShape
from colofn.plan._ops import step_ops

__all__ = ["Prediction", "link", "pipeline_shape", "predict", "ring_attention_bytes", "summa_activation_bytes_per_layer"]


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What the planner predicts for one candidate (bytes, seconds; per device).

    ``compute_s`` includes the operations' time (``ops`` torch calls of the busiest
    stage at the cluster's ``per_op_s``); ``busy_s`` is a rank's processor time
    (compute and collective calls, averaged over the stages); ``step_s`` is the
    larger of the critical path and the node's busy time over its cores
    (see the module docstring).
    """

    candidate: Candidate
    model_states: float
    activations: float
    collectives: tuple[Collective, ...]
    intra_bytes: int
    inter_bytes: int
    bubble: float
    compute_s: float
    comm_s: float
    step_s: float
    mfu: float
    memory_limit: float
    ops: int = 0
    busy_s: float = 0.0

    @property
    def memory(self) -> float:
        return self.model_states + self.activations

    @property
    def fits(self) -> bool:
        return self.memory <= self.memory_limit

    @property
    def reason(self) -> str:
        """Why it does not fit ("" when it does)."""
        if self.fits:
            return ""
        gib = 2**30
        return (f"needs {self.memory / gib:.1f} GiB per device ({self.model_states / gib:.1f} model states + "
                f"{self.activations / gib:.1f} activations) > {self.memory_limit / gib:.1f} GiB")


@cache
def pipeline_shape(schedule: str, pp: int, microbatches: int) -> tuple[float, int]:
    """``(bubble, peak in-flight microbatches)`` of the schedule, from :func:`colofn.pipeline.simulate`.

    >>> pipeline_shape("gpipe", 4, 8)
    (0.2727272727272727, 8)
    """
    if pp == 1:
        return 0.0, 1
    from colofn.pipeline.registry import make_schedule
    from colofn.pipeline.simulation import Costs, simulate

    r = simulate(make_schedule(schedule, pp, microbatches), Costs(forward=1, input_grad=1, weight_grad=1))
    return max(r.bubble), max(r.peak_activations)


def link(c: Candidate, axis: str, cl: Cluster) -> str:
    """``"intra"`` when the groups of ``axis`` (``"dp+tp"``: both) fit in one node, else ``"inter"``."""
    names = [a for a, _ in c.mesh]
    axes = [a if a in names else "tp" for a in axis.split("+")]  # a tp grid's axes lie inside tp
    first = min(names.index(a) for a in axes)
    span = math.prod(n for _, n in c.mesh[first:])
    return "intra" if span <= cl.devices_per_node else "inter"


def ring_attention_bytes(*, s: int, rows: int, h: int, a: int, n: int, element: int = 4) -> float:
    """What zig-zag ring attention keeps for the backward, per layer and rank, beyond SDPA's (bytes).

    The blockwise kernel (:mod:`colofn.parallel.sp.blockwise`) is not fused: on
    each of the ``2n + 1`` blocks a rank computes (chunks of ``c = s / 2n``
    tokens, :func:`colofn.parallel.sp.ring.schedule`) autograd keeps the masked
    ``c x c`` scores and their softmax, the boolean mask and the log-sum-exp;
    each of the ``2n - 1`` merges keeps both partial outputs and two weights
    (with the merged log-sum-exp); and the stacked keys and values of every
    ring step (this rank's copy and the ``n - 1`` received) stay alive. Less
    SDPA's log-sum-exp, which the base formula counts. Counted from the saved
    tensors (``tests/test_plan.py`` checks the whole model within 10%), in elements:

    ``2 rows s h + 2(2n+1) rows a c^2 + 2(2n-1) rows c h + (8n-5) rows a c``, plus ``(2n+1) c^2`` mask bytes.

    >>> ring_attention_bytes(s=32, rows=4, h=32, a=4, n=2) + 2 * 4 * 4 * 8 * 4  # with SDPA's lse: what tiny's ring keeps
    105280.0
    """
    c = s / (2 * n)
    elements = 2 * rows * s * h + 2 * (2 * n + 1) * rows * a * c * c + 2 * (2 * n - 1) * rows * c * h + (8 * n - 5) * rows * a * c
    return element * elements + (2 * n + 1) * c * c


def summa_activation_bytes_per_layer(m: ModelShape, *, b: float, tp: int, depth: int = 1, element: int = 4) -> float:
    """What one block keeps on a 2D (SUMMA) or 2.5D (Tesseract) grid of ``tp = q^2 depth`` ranks, in bytes.

    Activations are split over the ``q x q`` grid (rows of the batch, columns of
    the width) and the batch over the depth, except what SUMMA gathers: each
    matmul keeps its input's row strip (the ``q`` blocks it received, ``1/q``
    of the activation: the QKV, MLP-in, output and MLP-out inputs) and the
    weight strips it received (``1/q`` of the block's matrices). In elements,
    ``b`` rows per dp rank cut to ``b' = b / depth``:
    ``(2sb'h + 4sb' + 2sb'h + 4sb'h + asb' + sb'd_ff) / q^2 + (3sb'h + sb'd_ff) / q + W / q``
    with ``W`` the block's matrix parameters. Counted from the tensors autograd
    saves (exact for tiny's blocks on ``tp=4``; ``tests/test_plan.py`` checks the whole model).

    >>> from colofn.plan import model
    >>> summa_activation_bytes_per_layer(model("tiny"), b=8, tp=4)  # tiny on a 2 x 2 grid, 8 rows
    239616.0
    """
    q = round((tp // depth) ** 0.5)
    s, h, b = m.seq_len, m.d_model, b / depth
    grid = 2 * s * b * h + 4 * s * b + 2 * s * b * h + 4 * s * b * h + m.n_heads * s * b + s * b * m.d_ff
    strips = 3 * s * b * h + s * b * m.d_ff + m.layer_tp_params
    return element * (grid / q**2 + strips / q)


def _activations(m: ModelShape, c: Candidate, global_batch: int, pr: Precision, in_flight: int) -> float:
    # Ulysses: each rank keeps s/sp tokens, and whole sequences of a/sp heads inside attention,
    # which is the same bytes as s x b/sp.
    b, t, s, h = microbatch_rows(c, global_batch) / c.size("sp"), c.size("tp"), m.seq_len, m.d_model
    # A tp grid splits the rest (the norms, the logits) over its ranks, as Megatron-SP does; 3D its blocks too.
    sp = c.sp == "megatron" or c.tp_mode != "1d"
    if m.activation_layout == "colofn" and c.recompute != "full":
        # Selective recompute saves nothing here: colofn's attention core keeps no s x s matrix.
        if c.tp_mode in ("2d", "2.5d"):
            layer = summa_activation_bytes_per_layer(m, b=b, tp=t, depth=c.tp_depth, element=pr.activation)
        else:
            layer = colofn_activation_bytes_per_layer(s=s, b=b, h=h, a=m.n_heads, d_ff=m.d_ff, t=t, sp=sp,
                                                      element=pr.activation)
        if c.sp == "ulysses":  # the attention output twice: in head shards (SDPA's) and back in sequence shards (wo's)
            layer += pr.activation * s * b * h
        elif c.sp == "ring":
            layer += ring_attention_bytes(s=s, rows=microbatch_rows(c, global_batch), h=h, a=m.n_heads,
                                          n=c.size("sp"), element=pr.activation)
        # The last stage: the final norm's input, statistics and (whole) output; the fp32
        # logits (vocabulary-parallel cross-entropy keeps two copies of its shard); the token ids.
        split = t if sp else 1
        last = pr.activation * ((s * b * h + 2 * s * b) / split + s * b * h) + (2 if t > 1 else 1) * b * s * m.vocab_size * 4 / t
        return layer * (m.n_layers // c.size("pp")) * in_flight + last + 8 * b * s
    layer = activation_bytes_per_layer(s=s, b=b, h=h, a=m.n_heads, t=t, sp=sp, recompute=c.recompute,
                                       element=pr.activation)
    # The logits (fp32, vocabulary-parallel) of the last stage: not in Korthikanti's per-layer formula.
    logits = b * s * m.vocab_size * 4 / t
    return layer * (m.n_layers // c.size("pp")) * in_flight + logits


def predict(m: ModelShape, c: Candidate, cl: Cluster, *, global_batch: int, efficiency: float = 0.5,
            precision: Precision = MIXED_ADAM) -> Prediction:
    """Predict ``c`` for model ``m`` on cluster ``cl`` with ``global_batch`` sequences per step.


    Raises:
        ConfigError: ``c`` cannot run ``m`` (every reason, see :func:`~colofn.plan.check`).
    """
    check(m, c, global_batch)
    bubble, in_flight = pipeline_shape(c.schedule, c.size("pp"), c.microbatches)
    tokens = global_batch * m.seq_len
    flops = m.flops_per_token() * tokens / c.devices
    if c.recompute == "full":  # one more forward: a third of the training FLOPs
        flops *= 4 / 3
    elif c.recompute == "selective":  # the attention core's forward again: 4 s h FLOPs per token and layer
        flops += 4 * m.n_layers * m.seq_len * m.d_model * tokens / c.devices
    flop_s = flops / (cl.peak_flops * efficiency)
    stages = [step_collectives(m, c, global_batch=global_batch, precision=precision, stage=s)
              for s in range(c.size("pp"))]
    ops = [step_ops(m, c, s) if cl.per_op_s else 0 for s in range(c.size("pp"))]
    calls_s = [sum(x.n_messages for x in cs) * cl.per_call_s for cs in stages]
    compute = flop_s + max(ops) * cl.per_op_s  # the slowest stage sets the pace
    # The stage that sends the most bytes sets the pace of communication.
    pace = max(range(len(stages)), key=lambda s: sum(x.bytes_sent for x in stages[s]))
    colls = tuple(stages[pace])
    by_link = {"intra": 0, "inter": 0}
    exposed = hidden = 0.0
    for col in colls:
        where = link(c, col.axis, cl)
        by_link[where] += col.bytes_sent
        bw, lat = (cl.intra_bw, cl.intra_latency) if where == "intra" else (cl.inter_bw, cl.inter_latency)
        # One latency per message on the wire (a bucket, a ZeRO unit; a send and its receive are one).
        secs = col.bytes_sent / bw + (col.messages or col.calls) * lat + col.n_messages * cl.per_call_s
        if col.axis == "dp" and col.phase == "backward":
            hidden += secs
        else:
            exposed += secs
    comm = exposed + max(0.0, hidden - compute * 2 / 3)
    step = compute / (1 - bubble) + comm
    # Ranks sharing cores: a rank's busy time is its compute and its calls; waits hand the core over.
    busy = sum(flop_s + o * cl.per_op_s + k for o, k in zip(ops, calls_s, strict=True)) / len(stages)
    if cl.ranks_per_core > 1:
        waits = max(0.0, comm - calls_s[pace]) if c.size("pp") == 1 else 0.0  # SPMD ranks wait together
        step = max(step, busy * cl.ranks_per_core + waits)
    mfu = m.flops_per_token() * tokens / (step * c.devices * cl.peak_flops)
    return Prediction(c, model_state_bytes(m, c, precision), _activations(m, c, global_batch, precision, in_flight),
                      colls, by_link["intra"], by_link["inter"], bubble, compute, comm, step, mfu, cl.memory,
                      max(ops), busy)
