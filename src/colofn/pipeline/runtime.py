"""The pipeline runtime: run any valid :class:`~colofn.pipeline.Schedule` over a mesh axis.

A model is cut into ``num_stages`` stages, each a pure function of its own
parameter pytree. :class:`Pipeline` runs one training step's forward and
backward passes for every microbatch in the order the schedule gives, on the
ranks along ``axis_name`` (one pipeline per coordinate of the other mesh axes),
and returns the loss and this rank's gradients, equal to single-device
``torch.autograd.grad`` of the mean microbatch loss.

The stage-function contract
---------------------------
* ``stages[s](params, x) -> y`` for every stage but the last. ``params`` is the
  stage's parameter pytree (floating-point tensors), ``x`` the stage input:
  on stage 0 the microbatch of ``inputs``, elsewhere the previous stage's ``y``.
  ``x`` and ``y`` are pytrees of tensors (a tensor, a tuple, a dict, ...).
* The last stage returns the microbatch's scalar loss. Either it is called as
  ``stages[-1](params, x, target)``, or, with ``loss_fn`` given, the loss is
  ``loss_fn(stages[-1](params, x), target)``. ``target`` is the microbatch of
  ``targets`` (``None`` when ``targets`` is ``None``).
* The step's loss is the **mean of the microbatch losses**; the gradients are
  those of that mean. With a loss that is a mean over the microbatch's examples
  (and equal microbatches, which the runtime enforces) this equals the loss of
  the whole batch on one device. A loss that is a *sum* over examples gives the
  whole batch's sum divided by ``num_microbatches``.
* Stages run under ``torch.enable_grad()`` and are differentiated with
  ``torch.autograd.grad`` with respect to the parameters and to every
  floating-point leaf of ``x``; integer leaves (token ids, masks) pass along
  without gradients. Stage functions must not mutate their inputs.
* Stage functions get this rank's local tensors; for collectives over other
  mesh axes inside a stage, wrap it in :func:`colofn.shard_map.per_device`.
  The sums over other axes of the stage *parameters*' gradients that
  varying/invariant tracking derives (dp) are then done once per step, during
  the stage's last parameter backward (:mod:`colofn._step_sums`), not once per
  microbatch; with ``grad_sum_axes`` (parameters marked varying along the data
  axes inside the stages), from each stage's accumulated totals right after it.
* Loss terms computed on earlier stages (say a mixture-of-experts balancing
  loss) travel as a leaf of the activations: stage ``s`` returns
  ``{"h": h, "aux": x["aux"] + aux_s}`` and the last stage adds ``x["aux"]``
  to its loss.

Skip connections
----------------
``skips={(src, dst): "name"}`` (or a tuple of names) routes the output
``y["name"]`` of stage ``src`` to stage ``dst > src`` instead of to
``src + 1``: a stage with outgoing skips returns a ``dict`` holding those
names, the next stage gets the dict without them, and stage ``dst`` gets the
dict from ``dst - 1`` with the skipped names added. The sends are derived (none
when both stages live on one rank), and gradients flow back through the skip.
A name may go to several stages (its gradients are summed).

Shapes
------
Receivers learn activation shapes on the first call for an input signature
(the tree structure, shapes and dtypes of ``inputs``): each activation message
of that call is preceded by its metadata (tree structure, shapes, dtypes).
Later calls with the same signature send only the tensors. Every microbatch
must give every stage input the same shapes. Hence **every rank passes
``inputs`` of the same shapes**: ranks without stage 0 read only their shapes
(meta tensors are fine there); ``targets`` is read only on the rank with the
last stage.

Communication
-------------
The execution contract of :mod:`colofn.pipeline.comm`: each rank runs its
actions in order, receives (blocking) what an action needs before it, posts
the results other ranks need as non-blocking sends after it, and waits for its
sends at the end of the step. Receives before an action, and sends after it,
are one :func:`torch.distributed.batch_isend_irecv` each; every tensor has its
own tag (derived from :attr:`Transfer.tag <colofn.pipeline.Transfer.tag>`), so
messages between the same two ranks may arrive in any order, which ZBV and
DualPipeV need. Stages on the same rank hand values over in memory. At the end
the last stage's rank sends the microbatch losses to the others, so ``loss`` is
known on every rank. All of it is recorded by :func:`colofn.comm_trace` as
``send``/``recv`` records. Works on the simulated world and gloo. NCCL ignores
tags and matches by order: untested, and :func:`~colofn.pipeline.fifo_conflicts`
lists the schedules whose orders disagree.

Backward passes
---------------
``B`` is one ``torch.autograd.grad`` with respect to the stage inputs and
parameters. ``I`` differentiates with respect to the inputs only and records
the gradients arriving where the parameters' branches join the input path
(for ``x @ w``, the matmul's node); ``W`` starts from those recorded gradients
and runs only the parameters' branches. Every backward op runs once over ``I``
and ``W`` together, as in ``B`` (see :mod:`colofn.pipeline._split_backward`).

>>> import torch, colofn
>>> from colofn import pipeline
>>> def program():
...     mesh = colofn.Mesh((2,), ("pp",))
...     stage = lambda p, x: torch.tanh(x @ p)
...     pipe = pipeline.Pipeline([stage, stage], pipeline.one_f_one_b(2, 2), mesh=mesh,
...                              loss_fn=lambda y, t: ((y - t) ** 2).mean())
...     w = [torch.eye(3), 2 * torch.eye(3)]
...     out = pipe(w, torch.ones(4, 3), torch.zeros(4, 3))
...     return round(float(out.loss), 4), sorted(out.grads)
>>> colofn.launch(program, world_size=2)
[(0.8267, [0]), (0.8267, [1])]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from colofn import _comm
from colofn import tree as jt
from colofn.errors import MeshError, ScheduleError, TreeError
from colofn.mesh import Mesh, get_mesh
from colofn.pipeline import _wire_meta
from colofn.pipeline._execute import Step
from colofn.pipeline._p2p import Meta
from colofn.pipeline._program import Link, last_param_passes, make_links, num_tags, programs
from colofn.pipeline.ir import Schedule
from colofn.pipeline.simulation import Event
from colofn.pipeline.validation import validate

__all__ = ["Pipeline", "PipelineResult", "StageFn", "gather_stages", "run_pipeline"]

StageFn = Callable[..., Any]
"""``fn(params, x) -> y``; the last stage ``fn(params, x, target) -> loss`` (see the module docstring)."""

Skips = Mapping[tuple[int, int], str | Sequence[str]]


class PipelineResult(NamedTuple):
    """What one pipeline step returns on each rank.

    Attributes:
        loss: the mean of the microbatch losses (a scalar), on every rank.
        losses: each microbatch's loss, shape ``[num_microbatches]``, on every rank.
        grads: ``{stage: gradient pytree}`` for the stages this rank holds, with
            the structure of that stage's parameters: the gradients of ``loss``.
        events: this rank's compute, one :class:`~colofn.pipeline.Event` per
            action (``rank`` is the index along the pipeline axis; ``start`` and
            ``end`` in seconds since the step began). Time not covered is idle:
            waiting for messages, or sending them.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    grads: dict[int, Any]
    events: tuple[Event, ...]


class Pipeline:
    """A training step (loss and gradients) of ``stages`` run by ``schedule`` along ``axis_name``.

    Args:
        stages: one function per stage, ``num_stages`` of them (the module
            docstring gives the contract).
        schedule: any schedule :func:`~colofn.pipeline.validate` accepts, with
            one action list per rank of ``axis_name``.
        loss_fn: ``loss_fn(y, target) -> scalar``, applied to the last stage's
            output; without it the last stage takes ``target`` and returns the loss.
        skips: ``{(src, dst): name or names}``: outputs of stage ``src`` routed
            to stage ``dst`` (see "Skip connections" in the module docstring).
        mesh: the mesh (default: the ambient one); other axes than
            ``axis_name`` each run their own pipeline.
        axis_name: the pipeline axis.
        grad_sum_axes: mesh axes (data axes: ``"dp"``, or several) along
            which the stage functions mark their parameters *varying*
            (:func:`colofn.train.pipe_zero.varying`, inside a
            :func:`~colofn.shard_map.per_device` stage), so each rank
            differentiates only its own tokens' part and tracking sums nothing
            per microbatch. The runtime then sums each stage's accumulated
            gradients over these axes once per step: flat buckets all-reduced
            asynchronously right after the stage's last parameter backward,
            waited for before the step returns. Without it (the default),
            tracking sums invariant parameters' gradients through
            :mod:`colofn._step_sums`'s per-use stashes. A parameter left
            invariant along these axes is still summed once (its per-use
            gradients stay in the totals); one whose uses vary along only
            some of them raises :class:`~colofn.errors.ShardingError` in the
            backward (mark it varying).

    Everything is checked here, before any communication: an invalid schedule
    raises :func:`~colofn.pipeline.validate`'s :class:`~colofn.errors.ScheduleError`.
    Call the pipeline as ``pipe(params, inputs, targets)`` on every rank.
    """

    def __init__(
        self,
        stages: Sequence[StageFn],
        schedule: Schedule,
        *,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        skips: Skips | None = None,
        mesh: Mesh | None = None,
        axis_name: str = "pp",
        grad_sum_axes: str | Sequence[str] | None = None,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"Pipeline needs a colofn.pipeline.Schedule, got {type(schedule).__name__}.")
        validate(schedule)
        stages = tuple(stages)
        bad = [f"stages[{i}] is a {type(f).__name__}" for i, f in enumerate(stages) if not callable(f)]
        if bad or (loss_fn is not None and not callable(loss_fn)):
            raise TypeError("Pipeline needs callable stage functions (and loss_fn): "
                            + ", ".join(bad or [f"loss_fn is a {type(loss_fn).__name__}"]) + ".")
        if len(stages) != schedule.num_stages:
            raise ScheduleError(
                f"Pipeline got {len(stages)} stage functions but schedule {schedule.name!r} has "
                f"{schedule.num_stages} stages ({schedule.num_ranks} ranks x "
                f"{schedule.num_stages // schedule.num_ranks} per rank); give one function per stage.")
        m = get_mesh(mesh, "Pipeline")
        if axis_name not in m.shape:
            raise MeshError(
                f"Pipeline runs along mesh axis {axis_name!r}, but {m} has axes {m.axis_names}; "
                f"build the mesh with a {axis_name!r} axis or pass axis_name=...")
        if m.shape[axis_name] != schedule.num_ranks:
            raise ScheduleError(
                f"Schedule {schedule.name!r} has {schedule.num_ranks} ranks (stage_to_rank="
                f"{schedule.stage_to_rank}) but mesh axis {axis_name!r} of {m} has "
                f"{m.shape[axis_name]}; build the schedule for {m.shape[axis_name]} ranks.")
        self.stages = stages
        self.schedule = schedule
        self.loss_fn = loss_fn
        self.skips = _normalize_skips(skips, schedule.num_stages)
        self.mesh = m
        self.axis_name = axis_name
        self.links = make_links(schedule.num_stages, self.skips)
        self.rank = m.axis_index(axis_name)
        self.local_stages = schedule.stages_of(self.rank)
        self._program = programs(schedule, self.links)[self.rank]
        self._last_param_pass = last_param_passes(self._program)
        # this rank's program, precomputed once: links by stage, names routed away, each action's messages
        self._into: dict[int, list[Link]] = {}
        self._out_of: dict[int, list[Link]] = {}
        for link in self.links:
            self._into.setdefault(link.dst, []).append(link)
            self._out_of.setdefault(link.src, []).append(link)
        self._routed = {s: [n for k in self._out_of.get(s, ()) if k.names is not None for n in k.names]
                        for s in range(schedule.num_stages)}
        self._send_of = {op.action: {msg.link: msg for msg in op.sends} for op in self._program}
        self._tags = num_tags(schedule.num_stages, len(self.links), schedule.num_microbatches)
        self._metas: dict[Any, dict[int, Meta]] = {}  # input signature -> link -> metadata
        self._grad_sum: tuple[tuple[str, ...], _comm.AxisGroup] | None = None
        if grad_sum_axes:
            axes = (grad_sum_axes,) if isinstance(grad_sum_axes, str) else tuple(grad_sum_axes)
            bad = [a for a in axes if a not in m.shape or a == axis_name]
            if bad:
                raise MeshError(f"Pipeline(grad_sum_axes={axes}): {bad} must be axes of {m} other than the "
                                f"pipeline axis {axis_name!r}; name the data axes the stages' parameters vary along.")
            axes = tuple(a for a in m.axis_names if a in axes)  # mesh order: the group's
            self._grad_sum = (axes, _comm.axis_group(m, axes))  # built now, on every rank: creating it is collective

    def __repr__(self) -> str:
        s = self.schedule
        return (f"Pipeline({s.name!r}, {s.num_ranks} ranks, {s.num_stages} stages, "
                f"{s.num_microbatches} microbatches, axis {self.axis_name!r})")

    def __call__(self, params: Mapping[int, Any] | Sequence[Any], inputs: Any,
                 targets: Any = None) -> PipelineResult:
        """Run one step: the loss and this rank's gradients.

        Args:
            params: ``{stage: params}`` holding at least this rank's stages, or a
                sequence with one entry per stage (entries of other ranks' stages
                are ignored and may be ``None``).
            inputs: a pytree of tensors whose dim 0 is the batch, split into
                ``num_microbatches`` equal microbatches; same shapes on every rank.
            targets: likewise, read on the rank holding the last stage.
        """
        return Step(self, params, inputs, targets).run()


def run_pipeline(
    stages: Sequence[StageFn],
    schedule: Schedule,
    params: Mapping[int, Any] | Sequence[Any],
    inputs: Any,
    targets: Any = None,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    skips: Skips | None = None,
    mesh: Mesh | None = None,
    axis_name: str = "pp",
) -> PipelineResult:
    """One step of a new :class:`Pipeline`: ``Pipeline(stages, schedule, ...)(params, inputs, targets)``.

    Build a :class:`Pipeline` once to train, so that activation shapes are
    exchanged only on the first step.
    """
    pipe = Pipeline(stages, schedule, loss_fn=loss_fn, skips=skips, mesh=mesh, axis_name=axis_name)
    return pipe(params, inputs, targets)


def gather_stages(per_stage: Mapping[int, Any], *, mesh: Mesh | None = None,
                  axis_name: str = "pp") -> list[Any]:
    """Every stage's value on every rank: ``[value of stage 0, value of stage 1, ...]``.

    ``per_stage`` is this rank's ``{stage: value}`` (say ``result.grads``), a
    pytree of plain tensors; the dicts of all ranks along ``axis_name`` are
    exchanged as data (each rank in turn broadcasts its structure as int64
    metadata, then its tensors: nothing is pickled) and must together hold each
    stage ``0..n-1`` once. Meant for tests, exports and small models.
    """
    m = get_mesh(mesh, "gather_stages")
    if axis_name not in m.shape:
        raise MeshError(f"gather_stages: {m} has no axis {axis_name!r}.")
    g = _comm.axis_group(m, (axis_name,))
    mine = dict(per_stage)
    parts: list[Any] = [mine]
    if g.size > 1:
        parts = [_broadcast_tree(mine if i == g.index else None, g, i) for i in range(g.size)]
    merged: dict[int, Any] = {}
    for part in parts:
        for stage, value in part.items():
            if stage in merged:
                raise TreeError(f"gather_stages: stage {stage} is given by two ranks.")
            merged[stage] = value
    if sorted(merged) != list(range(len(merged))):
        raise TreeError(f"gather_stages: the ranks hold stages {sorted(merged)}, not 0..n-1.")
    return [merged[s] for s in range(len(merged))]


# ----------------------------------------------------------------------------- checks


def _normalize_skips(skips: Skips | None, num_stages: int) -> dict[tuple[int, int], tuple[str, ...]]:
    if skips is None:
        return {}
    if not isinstance(skips, Mapping):
        raise TypeError(f"skips must be a dict {{(src, dst): name}}, got {type(skips).__name__}.")
    out: dict[tuple[int, int], tuple[str, ...]] = {}
    failures = []
    into: dict[tuple[int, str], tuple[int, int]] = {}
    for key, names in skips.items():
        ok = (isinstance(key, tuple) and len(key) == 2
              and all(isinstance(k, int) and not isinstance(k, bool) for k in key))
        if not ok or not 0 <= key[0] < key[1] < num_stages:
            failures.append(f"key {key!r}: needs (src, dst) stages with 0 <= src < dst < {num_stages}")
            continue
        names_t = (names,) if isinstance(names, str) else tuple(names)
        if not names_t or not all(isinstance(n, str) and n for n in names_t):
            failures.append(f"{key}: {names!r} is not a name or a tuple of names")
            continue
        for n in names_t:
            if (key[1], n) in into:
                failures.append(f"{key}: stage {key[1]} already gets {n!r} from {into[(key[1], n)]}")
            into[(key[1], n)] = key
        out[key] = names_t
    if failures:
        raise ScheduleError("Pipeline: bad skips:\n" + "\n".join(f"  * {f}" for f in failures))
    return out


def _broadcast_tree(tree: Any, g: _comm.AxisGroup, source: int) -> Any:
    """Rank ``source``'s ``tree`` (plain tensors; ``None`` elsewhere) on every rank of ``g``, without pickling."""
    src = g.ranks[source]
    if tree is not None:
        leaves, treedef = jt.flatten(tree)
        leaves = [x.detach().contiguous() for x in leaves]
        wire = _wire_meta.encode((treedef, [(tuple(x.shape), x.dtype) for x in leaves]))
        dist.broadcast(torch.tensor([wire.numel()], dtype=torch.int64), src=src, group=g.group)
        dist.broadcast(wire, src=src, group=g.group)
    else:
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=src, group=g.group)
        wire = torch.empty(int(size), dtype=torch.int64)
        dist.broadcast(wire, src=src, group=g.group)
        received, specs = _wire_meta.decode(wire)
        assert received is not None  # encoded from a tree above, on the source rank
        treedef, leaves = received, [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
    for x in leaves:
        dist.broadcast(x, src=src, group=g.group)
    return jt.unflatten(treedef, leaves)
