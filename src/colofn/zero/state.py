"""``ZeroState`` and ``init``: what each rank holds for each ZeRO stage, as sharded flat buffers.

Every bucket of :class:`~colofn.zero.flat.FlatLayout` is a 1-D buffer. With
``dp`` the data axis and ``m`` the model axes (the other mesh axes, in mesh
order), the state's DTensors have these specs:

=========  ====================  =====================  =====================
stage      params (compute)      master weights         optimizer state
=========  ====================  =====================  =====================
0          ``P(m)`` full         ``P(m)`` full          ``P(m)`` full
1, 2       ``P(m)`` full         ``P((dp, m))`` shard   ``P((dp, m))`` shard
3          ``P((dp, m))`` shard  ``P((dp, m))`` shard   ``P((dp, m))`` shard
=========  ====================  =====================  =====================

``P(m)`` leaves are replicated over ``dp``; each rank's block is the flattened
(padded) concatenation of its blocks of the unit's leaves. With several data
axes (``axis=("dp", "ep")``), ``dp`` stands for each bucket's own group (the
data axes its leaves are not split over) and ``m`` for every other mesh axis:
an expert bucket over ``dp`` alone is ``P(("ep", ...))`` when full. Master weights
exist with mixed precision or offload; otherwise the params are the master
and the optimizer reads its shard of them. Gradients are never stored: they
live within a step (full in stages 0-1, sharded in 2-3).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from colofn import _comm
from colofn import tree as jt
from colofn.errors import ConfigError
from colofn.mesh import Mesh
from colofn.optim.base import GradientTransformation
from colofn.partition_spec import P, PartitionSpec
from colofn.sharding import NamedSharding, sharding_of
from colofn.zero import _checks, _host_comm
from colofn.zero.flat import FlatLayout, split_units
from colofn.zero.offload import HOST, storage_mesh, to_device
from colofn.zero.precision import DynamicLossScale, MixedPrecision, as_precision

try:
    from torch.distributed.tensor._dtensor_spec import DTensorSpec as _DTensorSpec
    from torch.distributed.tensor._dtensor_spec import TensorMeta as _TensorMeta
except ImportError:  # pragma: no cover
    _DTensorSpec = _TensorMeta = None  # type: ignore[assignment,misc]

__all__ = ["ZeroPlan", "ZeroState", "init", "params"]


@dataclasses.dataclass(frozen=True, eq=False)
class ZeroPlan:
    """The static part of a :class:`ZeroState`: mesh, stage, layout, dtypes and placements."""

    mesh: Mesh
    axis: str
    stage: int
    layout: FlatLayout
    precision: MixedPrecision | None
    offload: bool
    compute_device: torch.device
    state_device: torch.device
    global_shapes: tuple[tuple[int, ...], ...]  # of every leaf, layout order
    is_dtensor: tuple[bool, ...]
    prefetch: bool = True
    order: list[int] = dataclasses.field(default_factory=list)  # stage 3: last step's sequence of unit reads (a prefetch hint)
    axes: tuple[str, ...] = ()  # every data axis, in mesh order (empty: just ``axis``)

    # ---------------------------------------------------------------- derived
    @property
    def n(self) -> int:
        return self.mesh.shape[self.axis]

    @property
    def index(self) -> int:
        return self.mesh.axis_index(self.axis)

    @property
    def data_axes(self) -> tuple[str, ...]:
        """The axes the params are replicated over and the ranks see different data along, in mesh order."""
        return self.axes or (self.axis,)

    @property
    def model_axes(self) -> tuple[str, ...]:
        return tuple(a for a in self.mesh.axis_names if a not in self.data_axes)

    # ---------------------------------------------------------------- per bucket
    def bucket_axes(self, b: int) -> tuple[str, ...]:
        """The data axes bucket ``b``'s gradient is summed over (and, in stages 1-3, it is sharded over)."""
        return self.layout.buckets[b].axes or (self.axis,)

    def bucket_index(self, b: int) -> int:
        """This rank's shard of bucket ``b``: its index along the bucket's axes (first axis major)."""
        i = 0
        for a in self.layout.buckets[b].axes or (self.axis,):
            i = i * self.mesh.shape[a] + self.mesh.axis_index(a)
        return i

    def bucket_full_spec(self, b: int) -> PartitionSpec:
        """A full bucket's spec: split over every axis but those it is replicated (and sharded) over."""
        axes = self.bucket_axes(b)
        rest = tuple(a for a in self.mesh.axis_names if a not in axes)
        return P(rest) if rest else P()

    @property
    def param_specs(self) -> tuple[PartitionSpec, ...]:
        """The spec of each params bucket (shards in stage 3, full buffers otherwise)."""
        return tuple(self.shard_spec if self.stage == 3 else self.bucket_full_spec(b) for b in range(len(self.layout.buckets)))

    @property
    def master_specs(self) -> tuple[PartitionSpec, ...]:
        """The spec of each master (and optimizer-state) bucket."""
        return tuple(self.shard_spec if self.stage >= 1 else self.bucket_full_spec(b) for b in range(len(self.layout.buckets)))

    @property
    def full_spec(self) -> PartitionSpec:
        """A full bucket's spec when every bucket is over all the data axes (else see :meth:`bucket_full_spec`)."""
        m = self.model_axes
        return P(m) if m else P()

    @property
    def shard_spec(self) -> PartitionSpec:
        return P(tuple(self.mesh.axis_names))

    @property
    def param_spec(self) -> PartitionSpec:
        """One group of data axes only (as :attr:`full_spec`); :attr:`param_specs` holds every bucket's."""
        return self.shard_spec if self.stage == 3 else self.full_spec

    @property
    def master_spec(self) -> PartitionSpec:
        """One group of data axes only (as :attr:`full_spec`); :attr:`master_specs` holds every bucket's."""
        return self.shard_spec if self.stage >= 1 else self.full_spec

    @property
    def has_master(self) -> bool:
        return self.precision is not None or self.offload

    @property
    def compute_dtypes(self) -> tuple[torch.dtype, ...]:
        p = self.precision
        return tuple(b.dtype if p is None else p.compute_dtype for b in self.layout.buckets)

    @property
    def master_dtypes(self) -> tuple[torch.dtype, ...]:
        p = self.precision
        return tuple(b.dtype if p is None else p.master_dtype for b in self.layout.buckets)

    @property
    def check_finite(self) -> bool:
        """Skip steps with non-finite gradients (with mixed precision)."""
        return self.precision is not None

    # ---------------------------------------------------------------- DTensors
    def wrap(self, local: torch.Tensor, spec: PartitionSpec) -> DTensor:
        """A DTensor of the 1-D ``local`` block laid out by ``spec`` (on the mesh of its device)."""
        dm = storage_mesh(self.mesh, local.device)
        key = (spec, dm, local.numel(), local.dtype)
        cache = self.__dict__.setdefault("_specs", {})
        dspec = cache.get(key)
        if dspec is None:
            factor = math.prod(self.mesh.shape[a] for a in spec.axes)
            placements = NamedSharding(self.mesh, spec).to_placements(1)
            shape = torch.Size([local.numel() * factor])
            if _DTensorSpec is None:  # pragma: no cover - torch without the spec classes
                return DTensor.from_local(local, dm, placements, run_check=False, shape=shape, stride=(1,))
            dspec = cache[key] = _DTensorSpec(dm, placements, _TensorMeta(shape, (1,), local.dtype))
        # DTensor.from_local builds the same spec on every call (an autograd op and a cache
        # lookup: ~100x slower); the state's buffers never need its gradient.
        return DTensor(local, dspec, requires_grad=False)

    def on_mesh(self, local: torch.Tensor, spec: PartitionSpec) -> DTensor:
        """Like :meth:`wrap`, first moving ``local`` to the compute device."""
        return self.wrap(local.to(self.compute_device), spec)

    def gather_shards(self, shards: list[torch.Tensor], into: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """All-gather 1-D shards over their buckets' data axes (tiled): this rank's full buckets.

        ``shards`` holds one shard per bucket, or several such runs back to back
        (the optimizer state's buffers): entry ``k`` is of bucket ``k % buckets``.
        Every bucket's all-gather is started before the first is waited for, so
        the buckets pay one round of waiting, not one each (the same ops, bytes
        and phase as one ``all_gather(..., tiled=True)`` per bucket over its group).
        On a host backend (gloo, the simulated world) each is one broadcast per
        shard into the full buffer (:mod:`colofn.zero._host_comm`); ``into``:
        full buffers to gather into there (the caller's to overwrite), one per
        entry, instead of new ones.
        """
        nb = len(self.layout.buckets)
        groups = [self.bucket_axes(k % nb) for k in range(len(shards))]
        sizes = [self.layout.buckets[k % nb].n for k in range(len(shards))]
        if all(n == 1 for n in sizes):
            return list(shards)
        started: list[Any] = []
        together: dict[tuple[int, torch.dtype], list[int]] = {}  # host groups in process-group order: one op each
        for k, (s, axes, n) in enumerate(zip(shards, groups, sizes, strict=True)):
            if n == 1:
                started.append([s, None, None, None, True])
                continue
            g = _comm.axis_group(self.mesh, tuple(axes))
            s = s.detach().to(self.compute_device).contiguous()
            _comm._rec("all_gather", g, s, _comm._phase())
            if _host_comm.in_place(g):
                target = into[k] if into is not None else None
                if target is None or target.numel() != s.numel() * g.size or target.dtype != s.dtype or target.device != s.device:
                    target = torch.empty(s.numel() * g.size, dtype=s.dtype, device=s.device)
                if g.identity_order:
                    together.setdefault((id(g.group), s.dtype), []).append(len(started))
                    started.append([s, target, g, [], True])
                else:
                    started.append([s, target, g, _host_comm.start_gather(target, s, g), True])  # by group index
                continue
            out = torch.empty(s.numel() * g.size, dtype=s.dtype, device=s.device)
            started.append([s, out, g, [_comm._all_gather_into(out, s, group=g.group, async_op=True)], g.identity_order])
        for idx in together.values():
            work = _host_comm.start_gather_coalesced([started[i][1] for i in idx], [started[i][0] for i in idx], started[idx[0]][2])
            started[idx[0]][3].append(work)  # waited with the first; the others wait on nothing more
        fulls = []
        for s, out, g, works, ordered in started:
            if works is None:
                fulls.append(s)
                continue
            with _comm._Watch("all_gather", g, s):
                for work in works:
                    work.wait()
            fulls.append(out if ordered else torch.cat(g.from_group_order(list(out.chunk(g.size)))))
        return fulls


@jt.register_dataclass(meta_fields=("plan",))
@dataclasses.dataclass(frozen=True)
class ZeroState:
    """What one rank holds between ZeRO steps (a pytree; ``plan`` is static).

    Attributes:
      params: compute-dtype parameter buckets, DTensors (full ``P(m)`` in
        stages 0-2, shards ``P((dp, m))`` in stage 3).
      master: master-weight buckets (shards in stages 1-3, full in stage 0),
        or ``None`` when the params are the master (no mixed precision, no offload).
      opt_state: the optimizer's state over the master buckets: per-parameter
        buffers are DTensors laid out like the master; scalars (``count``) stay 0-d tensors.
      step: 0-d int64, steps taken (skipped ones included).
      skipped: 0-d int64, steps skipped because a gradient was not finite (mixed precision).
      loss_scale: 0-d float32, the current loss scale (1 without scaling).
      good_steps: 0-d int64, finite steps since the loss scale last changed.
      plan: the static :class:`ZeroPlan`.
    """

    params: tuple[DTensor, ...]
    master: tuple[DTensor, ...] | None
    opt_state: Any
    step: torch.Tensor
    skipped: torch.Tensor
    loss_scale: torch.Tensor
    good_steps: torch.Tensor
    plan: ZeroPlan


def init(
    params: Any,
    optimizer: GradientTransformation,
    mesh: Mesh | None = None,
    *,
    axis: str | tuple[str, ...] = "dp",
    stage: int,
    offload: bool = False,
    precision: MixedPrecision | torch.dtype | None = None,
    prefetch: bool = True,
    opt_state: Any = None,
    step: int = 0,
    loss_scale: float | None = None,
    good_steps: int = 0,
    skipped: int = 0,
) -> ZeroState:
    """Shard ``params`` and ``optimizer``'s state over the data axis ``axis`` of ``mesh`` for ZeRO ``stage``.

    Every rank calls it with the same values (collective only in that every
    rank must call it; no communication happens).

    To resume, pass the global state back: the keyword arguments ``params``,
    ``opt_state``, ``step``, ``loss_scale``, ``good_steps`` and ``skipped`` are
    the keys of :func:`~colofn.zero.export_state`'s dict, so
    ``init(optimizer=opt, mesh=mesh, stage=s, **exported)`` resumes on any mesh
    and stage.

    Args:
      params: a pytree of floating tensors: global tensors (the same on every
        rank) or DTensors on ``mesh`` split only over the model axes (e.g. tp).
        ``params["layers"]`` elements and the other top-level entries are the
        units stage 3 gathers one at a time (see ``docs/zero.md``).
      optimizer: a per-coordinate ``colofn.optim`` transformation (sgd, adam,
        adamw, chains of them).
      mesh: the mesh (default: the ambient one).
      axis: the data-parallel axis; the batch is split over it on dim 0. Or a
        tuple of data axes, the data-parallel one first: every axis the params
        are replicated over and the ranks see different tokens along, such as
        ``("dp", "sp")`` (sequence parallelism: Ulysses, ring) or ``("dp", "ep")``
        (expert parallelism). Each rank's params are then its own copy along all
        of them; each leaf's gradient is summed, and its state sharded, over
        those of them its own spec does not split (an expert weight split over
        ``ep`` over ``dp`` alone; the dense ones over ``dp`` and ``ep``). See
        :func:`~colofn.zero.train_step` for the loss such axes need.
      stage: 0 (plain DP), 1 (shard optimizer state), 2 (+ gradients), 3 (+ params).
      offload: keep master weights and optimizer state on the CPU and run the update there.
      precision: ``None`` (compute in the params' dtype), a dtype such as
        ``torch.bfloat16``, or a :class:`~colofn.zero.MixedPrecision`.
      prefetch: stage 3: start the next unit's all-gather while the current one computes.
      opt_state: ``None`` (a fresh optimizer state), or the optimizer's state
        for the *global* params to resume from: ``optimizer.init(params)`` (then
        updated) on one device, or ``export_state(...)["opt_state"]``. Its
        per-parameter buffers mirror ``params`` (global tensors; or DTensors
        placed like the params, or replicated); they are sharded like the
        master, in the dtype the optimizer keeps (the master dtype). Scalars
        (``count``) are kept.
      step, good_steps, skipped: the counters to resume from (ints >= 0).
      loss_scale: the loss scale to resume from; used only when ``precision``
        scales the loss dynamically (``None``: its ``init_scale``). Otherwise
        the scale is the precision's own (1, or its static value).

    Returns:
      A :class:`ZeroState`.

    Raises:
      ConfigError: a bad stage (the options are listed), offload or precision,
        or an optimizer that is not per-coordinate where it must be.
      SpecError: ``axis`` is not a mesh axis (or names one twice); a DTensor
        param split over the data-parallel axis (the first).
      TreeTypeError / DTypeError: a params leaf is not a floating tensor.
      TreeError: ``opt_state`` does not match this optimizer's state for
        ``params`` (every differing path, shape or placement is named).
    """
    from colofn.zero.export import check_counters, shard_opt_state

    stage = _checks.check_stage(stage)
    mesh = _checks.check_mesh(mesh)
    given = _checks.check_axes(mesh, axis)
    axis, data_axes = given[0], tuple(a for a in mesh.axis_names if a in given)
    _checks.check_optimizer("zero.init", optimizer)
    offload = _checks.check_offload(offload)
    prec = as_precision(precision)
    _checks.check_params(params, mesh, axis)
    step, restored_scale, good_steps, skipped = check_counters(step, loss_scale, good_steps, skipped)
    model_size = math.prod(s for a, s in mesh.shape.items() if a not in data_axes)
    if stage >= 1 or model_size > 1:
        why = f"stage {stage} shards the optimizer over {axis!r}" if stage >= 1 else "the params are split over model axes"
        _checks.check_elementwise(optimizer, why)

    n = mesh.shape[axis]
    _, _, parts = split_units(params)
    leaves = [x for _, sub in parts for x in jt.leaves(sub)]
    specs = [sharding_of(x, mesh).spec if isinstance(x, DTensor) else P() for x in leaves]
    groups = None
    if len(data_axes) > 1:  # each leaf over the data axes its spec does not split
        groups = []
        for spec in specs:
            g = tuple(a for a in data_axes if a not in spec.axes)
            groups.append((g, math.prod(mesh.shape[a] for a in g) if stage >= 1 else 1))
    layout = FlatLayout.build(params, n if stage >= 1 else 1, specs, groups)
    compute_device = mesh.device
    state_device = HOST if offload else compute_device
    plan = ZeroPlan(
        mesh=mesh,
        axis=axis,
        stage=stage,
        layout=layout,
        precision=prec,
        offload=offload,
        compute_device=compute_device,
        state_device=state_device,
        global_shapes=tuple(tuple(x.shape) for x in leaves),
        is_dtensor=tuple(isinstance(x, DTensor) for x in leaves),
        prefetch=bool(prefetch),
        order=list(range(len(layout.units))),
        axes=data_axes if len(data_axes) > 1 else (),
    )
    with torch.no_grad():
        flats = layout.flatten([x.to(compute_device) for x in layout.local_leaves(params)])
        mine = [plan.bucket_index(b) for b in range(len(flats))]
        compute = plan.compute_dtypes
        master_dt = plan.master_dtypes
        if stage == 3:
            p_local = [layout.shard(f, mine[b], b).to(compute[b]).clone() for b, f in enumerate(flats)]
        else:
            p_local = [f.to(compute[b]) for b, f in enumerate(flats)]
        opt_params: list[torch.Tensor]
        m_local: list[torch.Tensor] | None
        if plan.has_master:
            src = [layout.shard(f, mine[b], b) if stage >= 1 else f for b, f in enumerate(flats)]
            opt_params = [to_device(s, state_device, master_dt[b], copy=True) for b, s in enumerate(src)]
            m_local = opt_params
        else:
            m_local = None
            opt_params = [layout.shard(p, mine[b], b) if stage in (1, 2) else p for b, p in enumerate(p_local)]
        fresh = optimizer.init(tuple(opt_params))
        local_opt = fresh if opt_state is None else shard_opt_state(plan, fresh, opt_state)
    scale = prec.initial_scale if prec is not None else 1.0
    if restored_scale is not None and prec is not None and isinstance(prec.loss_scale, DynamicLossScale):
        scale = restored_scale
    return ZeroState(
        params=tuple(plan.wrap(p, spec) for p, spec in zip(p_local, plan.param_specs, strict=True)),
        master=None if m_local is None else tuple(plan.wrap(m, spec) for m, spec in zip(m_local, plan.master_specs, strict=True)),
        opt_state=wrap_opt_state(plan, local_opt),
        step=torch.tensor(step, dtype=torch.int64),
        skipped=torch.tensor(skipped, dtype=torch.int64),
        loss_scale=torch.tensor(scale, dtype=torch.float32),
        good_steps=torch.tensor(good_steps, dtype=torch.int64),
        plan=plan,
    )


def _shard_lengths(plan: ZeroPlan) -> set[int]:
    b = plan.layout.buckets
    return {x.shard for x in b} if plan.stage >= 1 else {x.padded for x in b}


def rewrap(plan: ZeroPlan, locals_: Sequence[torch.Tensor], specs: Sequence[PartitionSpec], old: Sequence[Any]) -> tuple[DTensor, ...]:
    """``plan.wrap`` of each local buffer, reusing ``old``'s DTensor where it already wraps that very buffer."""
    with torch.no_grad():  # to_local() is the DTensor's own local tensor (no autograd view)
        return tuple(
            o if isinstance(o, DTensor) and o.to_local() is x else plan.wrap(x, spec)
            for x, spec, o in zip(locals_, specs, old, strict=True)
        )


def wrap_opt_state(plan: ZeroPlan, opt_state: Any, like: Any = None) -> Any:
    """Per-parameter optimizer buffers as DTensors laid out like the master; 0-d scalars as they are.

    What each leaf becomes depends only on the state's structure and its leaves' kinds and
    sizes, so a step repeats a known answer (cached on the plan) without walking paths.
    ``like``: the previous state, whose DTensors are reused where they wrap the same buffer
    (an in-place update).
    """
    leaves, treedef = jt.flatten(opt_state)
    kinds = tuple(
        (type(x), x.ndim, x.numel()) if isinstance(x, torch.Tensor) else (type(x), -1, -1) for x in leaves
    )
    cache = plan.__dict__.setdefault("_opt_specs", {})
    key = (treedef, kinds)
    specs = cache.get(key)
    if specs is None:
        specs = cache[key] = _opt_specs(plan, opt_state)
    old = treedef.flatten_up_to(like) if like is not None and jt.structure(like) == treedef else [None] * len(leaves)
    return jt.unflatten(treedef, [x if spec is None else rewrap(plan, (x,), (spec,), (o,))[0] for x, spec, o in zip(leaves, specs, old, strict=True)])


def _opt_specs(plan: ZeroPlan, opt_state: Any) -> list[PartitionSpec | None]:
    """The spec each leaf of ``opt_state`` is wrapped with (``None``: kept as it is), or the error naming the bad ones."""
    lengths = _shard_lengths(plan)
    specs = plan.master_specs
    bad = []

    def spec_of(path: Any) -> PartitionSpec:
        if len(set(specs)) == 1:
            return specs[0]
        # Buckets differ (expert and dense ones): a per-parameter buffer is a tuple, one entry per bucket.
        return specs[path[-1].entry]

    def one(path: Any, x: Any) -> PartitionSpec | None:
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or isinstance(x, DTensor):
            return None
        if x.ndim == 1 and x.numel() in lengths:
            return spec_of(path)
        bad.append(f"opt_state{jt.keystr(path)}: shape {tuple(x.shape)}")
        return None

    out = [one(path, x) for path, x in jt.flatten_with_path(opt_state)[0]]
    if bad:
        raise ConfigError(
            "zero.init: ZeRO shards per-parameter optimizer buffers (shaped like the params) and keeps 0-d "
            "scalars; these optimizer state leaves are neither:\n" + "\n".join(f"  * {b}" for b in bad)
            + "\nFix: use an optimizer whose state mirrors the params (colofn.optim's sgd, adam, adamw)."
        )
    return out


def local_tree(tree: Any) -> Any:
    """DTensor leaves replaced by their local tensors."""
    return jt.map(lambda x: x.to_local() if isinstance(x, DTensor) else x, tree)


def params(state: ZeroState) -> Any:
    """The global parameters (master values in the params' original dtypes), on every rank.

    Collective: every rank must call it (stages 1-3 all-gather the shards over
    the data axis; model-axis-split leaves are gathered too).

    Returns:
      A pytree like the one given to :func:`init`, of plain tensors.
    """
    _checks.check_state("zero.params", state)
    plan = state.plan
    layout = plan.layout
    src = state.master if state.master is not None else state.params
    locals_ = [x.to_local() for x in src]
    sharded = (plan.stage >= 1) if state.master is not None else (plan.stage == 3)
    if sharded:
        locals_ = plan.gather_shards(locals_)
    return layout.rebuild(global_leaves(plan, locals_, cast=True))


def global_leaves(plan: ZeroPlan, fulls: list[torch.Tensor], *, cast: bool) -> list[torch.Tensor]:
    """Every leaf (layout order) as a global plain tensor, from this rank's full buckets ``fulls``.

    New storage. ``cast``: in the params' original dtypes (else in the buckets'
    own). Collective over the model axes when a leaf is split over them.
    """
    layout = plan.layout
    fulls = [x.to(plan.compute_device) for x in fulls]
    out = []
    for i, s in enumerate(layout.slots):
        leaf = layout.leaf_view(i, fulls[s.bucket])
        leaf = (leaf.to(layout.buckets[s.bucket].dtype) if cast else leaf).clone()
        if plan.is_dtensor[i]:
            placements = NamedSharding(plan.mesh, s.spec).to_placements(leaf.ndim)
            dt = DTensor.from_local(leaf, plan.mesh.device_mesh, placements, run_check=False, shape=torch.Size(plan.global_shapes[i]), stride=torch.empty(plan.global_shapes[i], device="meta").stride())
            leaf = dt.full_tensor()
        out.append(leaf)
    return out
