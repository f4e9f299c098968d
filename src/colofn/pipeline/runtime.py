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
parameters. ``I`` differentiates with respect to the inputs only, keeping the
graph (``retain_graph=True``); the later ``W`` differentiates the same outputs
with respect to the parameters and frees the graph. ``W`` therefore runs the
backward again through the stage's layers (it does not reuse ``I``'s
intermediate gradients), so ``I + W`` costs more than ``B``.

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

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from colofn import _comm
from colofn import tree as jt
from colofn.errors import MeshError, ScheduleError, ShapeError, TreeError, TreeTypeError
from colofn.mesh import Mesh, get_mesh
from colofn.pipeline._p2p import Meta, Pending, Wire, meta_of
from colofn.pipeline._program import (
    LOSS_LINK,
    Link,
    Msg,
    Op,
    loss_tag,
    make_links,
    num_tags,
    programs,
)
from colofn.pipeline.comm import Payload
from colofn.pipeline.ir import ActionKind, Schedule
from colofn.pipeline.simulation import Event
from colofn.pipeline.validation import validate

__all__ = ["Pipeline", "PipelineResult", "StageFn", "gather_stages", "run_pipeline"]

StageFn = Callable[..., Any]
"""``fn(params, x) -> y``; the last stage ``fn(params, x, target) -> loss`` (see the module docstring)."""

Skips = Mapping[tuple[int, int], str | Sequence[str]]

_PREFETCH = 2
"""Once shapes are known, the receives of the next ``_PREFETCH`` actions are posted early,
so that a rendezvous transport (gloo) can move the data while this rank computes."""


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
        self._tags = num_tags(schedule.num_stages, len(self.links), schedule.num_microbatches)
        self._metas: dict[Any, dict[int, Meta]] = {}  # input signature -> link -> metadata

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
        return _Step(self, params, inputs, targets).run()


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

    ``per_stage`` is this rank's ``{stage: value}`` (say ``result.grads``); the
    dicts of all ranks along ``axis_name`` are gathered with
    :func:`torch.distributed.all_gather_object` (pickled: meant for tests and
    small models) and must together hold each stage ``0..n-1`` once.
    """
    m = get_mesh(mesh, "gather_stages")
    if axis_name not in m.shape:
        raise MeshError(f"gather_stages: {m} has no axis {axis_name!r}.")
    g = _comm.axis_group(m, (axis_name,))
    mine = dict(per_stage)
    parts: list[Any] = [mine]
    if g.size > 1:
        parts = [None] * g.size
        dist.all_gather_object(parts, mine, group=g.group)
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


def _split(tree: Any, num_microbatches: int, what: str) -> tuple[list[Any], Any]:
    """Microbatches of ``tree`` along dim 0, and its signature (structure, shapes, dtypes)."""
    pairs, treedef = jt.flatten_with_path(tree)
    failures = []
    for path, x in pairs:
        if not isinstance(x, torch.Tensor):
            failures.append(f"{what}{jt.keystr(path)} is a {type(x).__name__}, not a tensor")
        elif x.ndim == 0 or x.shape[0] % num_microbatches:
            failures.append(f"{what}{jt.keystr(path)} has shape {tuple(x.shape)}: dim 0 (the batch) "
                            f"must be a multiple of num_microbatches={num_microbatches}")
    if failures:
        raise ShapeError(f"Pipeline cannot split {what} into microbatches:\n"
                         + "\n".join(f"  * {f}" for f in failures))
    signature = (treedef, tuple((tuple(x.shape), x.dtype) for _, x in pairs))
    per_leaf = [x.chunk(num_microbatches) for _, x in pairs]
    return [jt.unflatten(treedef, [c[m] for c in per_leaf]) for m in range(num_microbatches)], signature


# ----------------------------------------------------------------------------- one step


class _Saved:
    """What a (stage, microbatch) keeps from its forward for its backward."""

    __slots__ = ("inputs", "outputs", "pending")

    def __init__(self, inputs: dict[int, list[torch.Tensor]], outputs: dict[int, list[torch.Tensor]]) -> None:
        self.inputs = inputs  # incoming link -> the stage input's floating leaves (requires_grad)
        self.outputs = outputs  # outgoing link (or LOSS_LINK) -> the output's floating leaves
        self.pending: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # I -> W


def _floating(leaves: Sequence[Any]) -> list[torch.Tensor]:
    return [t for t in leaves if t.is_floating_point()]


class _Step:
    def __init__(self, pipe: Pipeline, params: Any, inputs: Any, targets: Any) -> None:
        self.pipe = pipe
        s = pipe.schedule
        self.M = s.num_microbatches
        self.last = s.num_stages - 1
        self.rank_of = s.stage_to_rank
        self.me = pipe.rank
        self.params, self.param_leaves, self.param_defs = self._take_params(params)
        if inputs is None:
            raise ShapeError("Pipeline: pass inputs on every rank (ranks without stage 0 use only "
                             "their shapes; meta tensors are fine there).")
        micro, self.signature = _split(inputs, self.M, "inputs")
        self.inputs = micro if 0 in pipe.local_stages else None
        self.targets: list[Any] = [None] * self.M
        if self.last in pipe.local_stages and targets is not None:
            self.targets = _split(targets, self.M, "targets")[0]
        self.discovery = self.signature not in pipe._metas
        self.metas: dict[int, Meta] = dict(pipe._metas.get(self.signature, {}))
        self.into: dict[int, list[Link]] = {}
        self.out_of: dict[int, list[Link]] = {}
        for link in pipe.links:
            self.into.setdefault(link.dst, []).append(link)
            self.out_of.setdefault(link.src, []).append(link)
        self.acts: dict[tuple[int, int], Any] = {}  # (link, microbatch) -> activation pytree
        self.grads_in: dict[tuple[int, int], list[torch.Tensor]] = {}  # (link, mb) -> grads
        self.saved: dict[tuple[int, int], _Saved] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.acc = {st: [torch.zeros_like(p) for p in self.param_leaves[st]] for st in self.params}
        self.wire = Wire(_comm.axis_group(pipe.mesh, (pipe.axis_name,)), pipe.axis_name,
                         pipe._tags, pipe.mesh.device)

    def _take_params(self, params: Any) -> tuple[dict[int, Any], dict[int, list[torch.Tensor]], dict[int, Any]]:
        pipe = self.pipe
        if isinstance(params, Mapping):
            missing = [st for st in pipe.local_stages if st not in params]
            if missing:
                raise TreeError(f"Pipeline: params has no entry for stage(s) {missing}, held by "
                                f"rank {self.me} of axis {pipe.axis_name!r}; pass {{stage: params}} "
                                "for every stage of this rank (or one entry per stage).")
        elif isinstance(params, Sequence) and len(params) == pipe.schedule.num_stages:
            params = dict(enumerate(params))
        else:
            raise TreeError(f"Pipeline: params must be {{stage: params}} or a sequence of "
                            f"{pipe.schedule.num_stages} entries (one per stage), got "
                            f"{type(params).__name__}" + (f" of length {len(params)}"
                                                          if isinstance(params, Sequence) else "") + ".")
        trees, leaves, defs = {}, {}, {}
        for st in pipe.local_stages:
            pairs, treedef = jt.flatten_with_path(params[st])
            bad = [f"params of stage {st} at {jt.keystr(p)}: a {type(x).__name__}"
                   + (f" {x.dtype}" if isinstance(x, torch.Tensor) else "")
                   for p, x in pairs if not isinstance(x, torch.Tensor) or not x.is_floating_point()]
            if bad:
                raise TreeTypeError("Pipeline differentiates every parameter, so parameters must be "
                                    "floating-point tensors:\n" + "\n".join(f"  * {b}" for b in bad)
                                    + "\nFix: keep other values in the stage function's closure.")
            ls = [x.detach().requires_grad_(True) for _, x in pairs]
            trees[st], leaves[st], defs[st] = jt.unflatten(treedef, ls), ls, treedef
        return trees, leaves, defs

    # ------------------------------------------------------------------- the loop
    def run(self) -> PipelineResult:
        program = self.pipe._program
        events = []
        posted: dict[int, Pending] = {}
        ahead = 0  # the next op whose receives are not posted yet
        t0 = time.perf_counter()
        loss = None if self.discovery else self._post_loss()
        for k, op in enumerate(program):
            if not self.discovery:  # shapes known: post the receives of the next ops early
                while ahead < min(k + 1 + _PREFETCH, len(program)):
                    if program[ahead].recvs:
                        posted[ahead] = self.wire.post_recv(
                            [(msg, self._meta(msg)) for msg in program[ahead].recvs])
                    ahead += 1
            if op.recvs:
                if self.discovery:
                    self._deliver(self.wire.recv(
                        [(msg, self._meta(msg) if msg.payload is Payload.GRADIENT else None)
                         for msg in op.recvs]))
                else:
                    pending = posted.pop(k)
                    pending.wait()
                    self._deliver(pending)
            start = time.perf_counter()
            sends = self._compute(op)
            end = time.perf_counter()
            events.append(Event(self.me, op.action, start - t0, end - t0))
            if sends:
                self.wire.send(sends)
        losses = self._share_losses(loss)
        self.wire.wait_sends()
        if self.discovery:
            self.pipe._metas[self.signature] = self.metas
        grads = {st: jt.unflatten(self.param_defs[st], self.acc[st]) for st in self.params}
        return PipelineResult(losses.mean(), losses, grads, tuple(events))

    def _meta(self, msg: Msg) -> Meta:
        """The shapes of ``msg``: of the link's activations, or their floating leaves for gradients."""
        meta = self.metas[msg.link]
        if msg.payload is Payload.GRADIENT:
            return None, tuple(sp for sp in meta[1] if sp[1].is_floating_point)
        return meta

    def _deliver(self, pending: Pending) -> None:
        for msg, meta, leaves in zip(pending.msgs, pending.metas, pending.bufs, strict=True):
            key = (msg.link, msg.microbatch)
            if msg.payload is Payload.GRADIENT:
                self.grads_in[key] = leaves
            else:
                self._check_meta(msg.link, meta, f"the activation received for microbatch {msg.microbatch}")
                assert meta[0] is not None
                self.acts[key] = jt.unflatten(meta[0], leaves)

    def _check_meta(self, link: int, meta: Meta, what: str) -> None:
        known = self.metas.setdefault(link, meta)
        if known != meta:
            k = self.pipe.links[link] if link >= 0 else None
            where = "the losses" if k is None else f"link stage {k.src} -> stage {k.dst}"
            raise ShapeError(
                f"Pipeline: {what} on {where} has leaves {list(meta[1])}, but earlier ones had "
                f"{list(known[1])}; every microbatch must give a stage the same shapes (build a new "
                "Pipeline, or call it with new input shapes, for other shapes).")

    def _compute(self, op: Op) -> list[tuple[Msg, list[torch.Tensor], Meta | None]]:
        a = op.action
        if a.kind is ActionKind.F:
            return self._forward(a.stage, a.microbatch, op)
        if a.kind is ActionKind.W:
            self._weight(a.stage, a.microbatch)
            return []
        return self._backward(a.stage, a.microbatch, a.kind is ActionKind.B, op)

    # ------------------------------------------------------------------- F
    def _forward(self, s: int, m: int, op: Op) -> list[tuple[Msg, list[torch.Tensor], Meta | None]]:
        inputs: dict[int, list[torch.Tensor]] = {}
        if s == 0:
            assert self.inputs is not None
            x = self.inputs[m]
        else:
            x = None
            for link in self.into[s]:
                value = jt.map(_as_input, self.acts.pop((link.key, m)))
                inputs[link.key] = _floating(jt.leaves(value))
                x = value if link.names is None else _merge(x, value, link)
        params = self.params[s]
        fn = self.pipe.stages[s]
        with torch.enable_grad():
            if s == self.last:
                loss_fn = self.pipe.loss_fn
                target = self.targets[m]
                y = fn(params, x, target) if loss_fn is None else loss_fn(fn(params, x), target)
                if not isinstance(y, torch.Tensor) or y.ndim != 0 or not y.is_floating_point():
                    what = "loss_fn" if loss_fn is not None else f"the last stage ({s})"
                    got = (f"shape {tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor)
                           else type(y).__name__)
                    raise ShapeError(f"Pipeline: {what} must return the microbatch's loss as a "
                                     f"floating-point scalar tensor, got {got}.")
                self.losses[m] = y.detach()
                self.saved[(s, m)] = _Saved(inputs, {LOSS_LINK: [y]})
                return []
            y = fn(params, x)
        outputs: dict[int, list[torch.Tensor]] = {}
        sends = []
        routed = [n for link in self.out_of[s] if link.names is not None for n in link.names]
        for link in self.out_of[s]:
            value = _route(y, link, routed, s)
            leaves, treedef = jt.flatten(value)
            outputs[link.key] = _floating(leaves)
            if self.rank_of[link.dst] == self.me:
                self.acts[(link.key, m)] = value
                continue
            meta = meta_of(treedef, leaves)
            self._check_meta(link.key, meta, f"stage {s}'s output for microbatch {m}")
            msg = next(x for x in op.sends if x.link == link.key)
            sends.append((msg, leaves, meta if self.discovery else None))
        self.saved[(s, m)] = _Saved(inputs, outputs)
        return sends

    # ------------------------------------------------------------------- B, I, W
    def _backward(self, s: int, m: int, full: bool, op: Op) -> list[tuple[Msg, list[torch.Tensor], Meta | None]]:
        saved = self.saved[(s, m)]
        outs: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for link, leaves in saved.outputs.items():
            if link == LOSS_LINK:
                g = [torch.full_like(leaves[0], 1.0 / self.M)]
            else:
                g = self.grads_in.pop((link, m))
            for t, gt in zip(leaves, g, strict=True):
                if t.requires_grad:
                    outs.append(t)
                    grads.append(gt)
        ins = [t for leaves in saved.inputs.values() for t in leaves]
        wrt = ins + (self.param_leaves[s] if full else [])
        found = _grad(outs, wrt, grads, retain=not full)
        if full:
            self._accumulate(s, found[len(ins):])
            del self.saved[(s, m)]
        else:
            saved.pending = (outs, grads)
        sends: list[tuple[Msg, list[torch.Tensor], Meta | None]] = []
        k = 0
        for link, leaves in saved.inputs.items():
            part, k = list(found[k:k + len(leaves)]), k + len(leaves)
            src = self.pipe.links[link].src
            if self.rank_of[src] == self.me:
                self.grads_in[(link, m)] = part
            else:
                msg = next(x for x in op.sends if x.link == link)
                sends.append((msg, part, None))
        return sends

    def _weight(self, s: int, m: int) -> None:
        saved = self.saved.pop((s, m))
        assert saved.pending is not None
        outs, grads = saved.pending
        self._accumulate(s, _grad(outs, self.param_leaves[s], grads, retain=False))

    def _accumulate(self, s: int, grads: Sequence[torch.Tensor]) -> None:
        for acc, g in zip(self.acc[s], grads, strict=True):
            acc.add_(g)

    # ------------------------------------------------------------------- losses
    def _loss_msg(self, peer: int) -> Msg:
        return Msg(Payload.ACTIVATION, LOSS_LINK, 0, peer, loss_tag(self.pipe._tags))

    def _post_loss(self) -> Pending | None:
        """On ranks without the last stage, post the receive of the losses (shapes known)."""
        owner = self.rank_of[self.last]
        if owner == self.me:
            return None
        return self.wire.post_recv([(self._loss_msg(owner), self.metas[LOSS_LINK])])

    def _share_losses(self, posted: Pending | None) -> torch.Tensor:
        """The microbatch losses, sent by the last stage's rank to the others."""
        owner = self.rank_of[self.last]
        if owner == self.me:
            losses = torch.stack([self.losses[m] for m in range(self.M)])
            meta = meta_of(None, [losses])
            self._check_meta(LOSS_LINK, meta, "the losses")
            self.wire.send([(self._loss_msg(r), [losses], meta if self.discovery else None)
                            for r in range(self.pipe.schedule.num_ranks) if r != self.me])
            return losses
        if posted is None:
            posted = self.wire.recv([(self._loss_msg(owner), None)])
            self.metas.setdefault(LOSS_LINK, posted.metas[0])
        else:
            posted.wait()
        return posted.bufs[0][0]


def _as_input(t: Any) -> Any:
    """A received or handed-over activation leaf as a stage input (a new autograd leaf)."""
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().requires_grad_(True) if t.is_floating_point() else t.detach()


def _route(y: Any, link: Link, routed: list[str], stage: int) -> Any:
    """The part of stage output ``y`` that ``link`` carries."""
    if routed and not isinstance(y, Mapping):
        raise TreeError(f"Pipeline: stage {stage} has skips ({', '.join(map(repr, routed))}), so it "
                        f"must return a dict holding them; it returned a {type(y).__name__}.")
    if link.names is None:
        value = {k: v for k, v in y.items() if k not in routed} if routed else y
    else:
        missing = [n for n in link.names if n not in y]
        if missing:
            raise TreeError(f"Pipeline: stage {stage} must return {missing} for the skip to stage "
                            f"{link.dst}; it returned keys {sorted(y)}.")
        value = {n: y[n] for n in link.names}
    bad = [jt.keystr(p) for p, v in jt.leaves_with_path(value) if not isinstance(v, torch.Tensor)]
    if bad:
        raise TreeTypeError(f"Pipeline: stage {stage}'s output to stage {link.dst} has leaves that are "
                            f"not tensors at {', '.join(bad)}; activations must be tensors.")
    return value


def _merge(x: Any, skipped: dict[str, Any], link: Link) -> dict[str, Any]:
    """The input of ``link.dst``: the previous stage's dict plus the skipped names."""
    if not isinstance(x, Mapping):
        raise TreeError(f"Pipeline: stage {link.dst} receives skip(s) {list(link.names or ())} from "
                        f"stage {link.src}, so stage {link.dst - 1} must return a dict; it returned "
                        f"a {type(x).__name__}.")
    clash = [n for n in skipped if n in x]
    if clash:
        raise TreeError(f"Pipeline: stage {link.dst} gets {clash} both from stage {link.dst - 1} and "
                        f"by the skip from stage {link.src}; rename one.")
    return {**x, **skipped}


def _grad(outs: list[torch.Tensor], wrt: list[torch.Tensor], grads: list[torch.Tensor],
          retain: bool) -> Sequence[torch.Tensor]:
    if not outs or not wrt:
        return [torch.zeros_like(t) for t in wrt]
    return torch.autograd.grad(outs, wrt, grads, retain_graph=retain, allow_unused=True,
                               materialize_grads=True)

