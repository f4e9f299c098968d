"""One pipeline step on one rank: the action loop of :class:`~colofn.pipeline.Pipeline`.

:class:`Step` walks this rank's program (:func:`~colofn.pipeline._program.programs`):
receives what an action needs (:class:`~colofn.pipeline._p2p.Wire`), runs it
(``F``: the stage function; ``B``/``I``/``W``: ``torch.autograd.grad``), hands
results to stages of this rank in memory or posts them as sends, and at the end
shares the losses and returns the summed gradients. The module docstring of
:mod:`colofn.pipeline.runtime` states the contract this implements.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange

from colofn import _comm, _step_sums
from colofn import tree as jt
from colofn.errors import ShapeError, TreeError, TreeTypeError
from colofn.pipeline._p2p import Meta, Pending, Wire, meta_of
from colofn.pipeline._program import LOSS_LINK, Link, Msg, Op, loss_tag
from colofn.pipeline._split_backward import WeightWork, backward_input, backward_weight
from colofn.pipeline.comm import Payload
from colofn.pipeline.ir import ActionKind
from colofn.pipeline.simulation import Event

if TYPE_CHECKING:
    from colofn.pipeline.runtime import Pipeline, PipelineResult

_PREFETCH = 2
"""Once shapes are known, the receives of the next ``_PREFETCH`` actions are posted early,
so that a rendezvous transport (gloo) can move the data while this rank computes."""


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
    per_leaf = [rearrange(x, "(m b) ... -> m b ...", m=num_microbatches).unbind(0) for _, x in pairs]
    return [jt.unflatten(treedef, [c[m] for c in per_leaf]) for m in range(num_microbatches)], signature


# ----------------------------------------------------------------------------- one step


class _Saved:
    """What a (stage, microbatch) keeps from its forward for its backward."""

    __slots__ = ("inputs", "outputs", "pending")

    def __init__(self, inputs: dict[int, list[torch.Tensor]], outputs: dict[int, list[torch.Tensor]]) -> None:
        self.inputs = inputs  # incoming link -> the stage input's floating leaves (requires_grad)
        self.outputs = outputs  # outgoing link (or LOSS_LINK) -> the output's floating leaves
        self.pending: WeightWork | None = None  # I -> W


def _floating(leaves: Sequence[Any]) -> list[torch.Tensor]:
    return [t for t in leaves if t.is_floating_point()]


class Step:
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
        self.into, self.out_of, self.routed = pipe._into, pipe._out_of, pipe._routed  # precomputed per pipeline
        self.send_of = pipe._send_of  # action -> link -> the message its result goes out in
        self.grad_metas: dict[int, Meta] = {}  # link -> the shapes of its gradient messages, this step
        self.acts: dict[tuple[int, int], Any] = {}  # (link, microbatch) -> activation pytree
        self.grads_in: dict[tuple[int, int], list[torch.Tensor]] = {}  # (link, mb) -> grads
        self.saved: dict[tuple[int, int], _Saved] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.acc = {st: [torch.zeros_like(p) for p in self.param_leaves[st]] for st in self.params}
        self.sums = _step_sums.StepSums()  # the stages' dp gradient sums, once per step
        for st in self.params:
            self.sums.register(st, self.param_leaves[st])
            if pipe._grad_sum is not None:  # parameters varying along these axes: their totals summed once
                self.sums.sum_totals(st, *pipe._grad_sum)
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
        with _step_sums.active(self.sums):
            return self._run()

    def _run(self) -> PipelineResult:
        from colofn.pipeline.runtime import PipelineResult

        program = self.pipe._program
        last_pass = self.pipe._last_param_pass
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
            stage = last_pass.get(k)
            if stage is not None:
                self.sums.begin_last(stage)
            start = time.perf_counter()
            sends = self._compute(op)
            end = time.perf_counter()
            if stage is not None:
                self.sums.end_last(stage)
            events.append(Event(self.me, op.action, start - t0, end - t0))
            if sends:
                self.wire.send(sends)
            if stage is not None and stage in self.sums.totals:  # its sends are out: now its sum
                self.sums.launch_totals(stage, self.acc[stage])
        losses = self._share_losses(loss)
        self.wire.wait_sends()
        self.sums.finish(self.acc)
        if self.discovery:
            self.pipe._metas[self.signature] = self.metas
        grads = {st: jt.unflatten(self.param_defs[st], self.acc[st]) for st in self.params}
        return PipelineResult(losses.mean(), losses, grads, tuple(events))

    def _meta(self, msg: Msg) -> Meta:
        """The shapes of ``msg``: of the link's activations, or their floating leaves for gradients."""
        meta = self.metas[msg.link]
        if msg.payload is Payload.GRADIENT:
            grad = self.grad_metas.get(msg.link)
            if grad is None:
                grad = self.grad_metas[msg.link] = (None, tuple(sp for sp in meta[1] if sp[1].is_floating_point))
            return grad
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
        routed = self.routed[s]
        for link in self.out_of[s]:
            value = _route(y, link, routed, s)
            leaves, treedef = jt.flatten(value)
            outputs[link.key] = _floating(leaves)
            if self.rank_of[link.dst] == self.me:
                self.acts[(link.key, m)] = value
                continue
            meta = meta_of(treedef, leaves)
            self._check_meta(link.key, meta, f"stage {s}'s output for microbatch {m}")
            msg = self.send_of[op.action][link.key]
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
        if full:
            found = _grad(outs, ins + self.param_leaves[s], grads, retain=False)
            self._accumulate(s, found[len(ins):])
            del self.saved[(s, m)]
        else:
            found, saved.pending = backward_input(outs, grads, ins, self.param_leaves[s])
            saved.outputs = {}  # W starts from what I recorded: the graph above the joins can go
        sends: list[tuple[Msg, list[torch.Tensor], Meta | None]] = []
        k = 0
        for link, leaves in saved.inputs.items():
            part, k = list(found[k:k + len(leaves)]), k + len(leaves)
            src = self.pipe.links[link].src
            if self.rank_of[src] == self.me:
                self.grads_in[(link, m)] = part
            else:
                msg = self.send_of[op.action][link]
                sends.append((msg, part, None))
        return sends

    def _weight(self, s: int, m: int) -> None:
        saved = self.saved.pop((s, m))
        assert saved.pending is not None
        self._accumulate(s, backward_weight(saved.pending, self.param_leaves[s]))

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

