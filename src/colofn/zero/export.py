"""Checkpoints in *global* form: a ZeRO state as plain pytrees that any mesh and stage can resume from.

:func:`export_state` turns a :class:`~colofn.zero.ZeroState` into a dict of
global values (the params, the optimizer state as ``optimizer.init(params)``
would lay it out for the global params, and the step counters), the same on
every rank. :func:`~colofn.zero.init` takes them back (``opt_state=``,
``step=``, ``loss_scale=``, ``good_steps=``, ``skipped=``: the dict's own keys),
so a run checkpointed on ``dp=2 x tp=2`` at stage 3 resumes on ``dp=4`` at
stage 1, or without ZeRO at all (``optimizer.update`` on the global state),
taking the same steps.

Inside a ZeRO state the optimizer ran on a tuple of flat buckets, so each
per-parameter buffer of the optimizer state (``mu``, ``nu``, ``momentum``) is a
tuple with one 1-D buffer per bucket (a shard of it in stages 1-3). Export
gathers those tuples and unflattens them into trees shaped like the params;
import flattens and shards them again. Scalars (``count``) pass through.

>>> import torch, colofn
>>> from colofn import optim, zero
>>> def program():
...     mesh = colofn.Mesh((2,), ("dp",))
...     opt = optim.adam(0.1)
...     state = zero.init({"w": torch.ones(3)}, opt, mesh, stage=3)
...     state, _ = zero.train_step(lambda p, b: (b @ p["w"]).mean(), opt, state, torch.eye(3)[:2])
...     ckpt = zero.export_state(state)
...     return ckpt["opt_state"].mu["w"].tolist(), int(ckpt["opt_state"].count), ckpt["step"]
>>> colofn.launch(program, world_size=2)[0]
([0.05000000074505806, 0.05000000074505806, 0.0], 1, 1)
"""

from __future__ import annotations

import math
from typing import Any

import optree
import torch
from torch.distributed.tensor import DTensor, Replicate

from colofn import tree as jt
from colofn.errors import ConfigError, TreeError, format_failures
from colofn.sharding import NamedSharding, local_block
from colofn.zero import _checks
from colofn.zero.offload import to_device
from colofn.zero.state import ZeroPlan, ZeroState, global_leaves
from colofn.zero.state import params as global_params

__all__ = ["export_state"]

KEYS = ("params", "opt_state", "step", "loss_scale", "good_steps", "skipped")


def export_state(state: ZeroState) -> dict[str, Any]:
    """The state as global values, to save, or to resume from on any mesh and stage.

    Collective: every rank calls it (it all-gathers the shards over the data
    axis, and model-axis-split leaves over their axes); every rank gets the
    same values, as new tensors on the mesh's device (a ``count`` stays where
    the optimizer keeps it).

    Returns:
      ``{"params", "opt_state", "step", "loss_scale", "good_steps", "skipped"}``:

      * ``params``: the global params, master values in the params' original
        dtypes (:func:`~colofn.zero.params`);
      * ``opt_state``: the optimizer state laid out as ``optimizer.init(params)``
        lays it out for the global params: every per-parameter buffer a tree of
        global tensors mirroring ``params`` (in the dtype the optimizer keeps
        it: the master dtype), scalars such as ``count`` as they are;
      * ``step``, ``good_steps``, ``skipped``: ints; ``loss_scale``: a float.

      ``zero.init(optimizer=opt, mesh=mesh, stage=s, **exported)`` resumes from it.
    """
    _checks.check_state("zero.export_state", state)
    plan = state.plan
    is_buckets = _bucket_test(plan)
    nodes = [x for x in jt.leaves(state.opt_state, is_leaf=is_buckets) if is_buckets(x)]
    nb = len(plan.layout.buckets)
    locals_ = [t.to_local() for node in nodes for t in node]
    if plan.stage >= 1 and locals_:
        locals_ = plan.gather_shards(locals_)
    trees = iter([plan.layout.rebuild(global_leaves(plan, locals_[k * nb : (k + 1) * nb], cast=False)) for k in range(len(nodes))])

    def one(x: Any) -> Any:
        if is_buckets(x):
            return next(trees)
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    return {
        "params": global_params(state),
        "opt_state": jt.map(one, state.opt_state, is_leaf=is_buckets),
        "step": int(state.step),
        "loss_scale": float(state.loss_scale),
        "good_steps": int(state.good_steps),
        "skipped": int(state.skipped),
    }


# ----------------------------------------------------------------------------- import (zero.init)


def check_counters(step: Any, loss_scale: Any, good_steps: Any, skipped: Any) -> tuple[int, float | None, int, int]:
    """``step``, ``good_steps``, ``skipped`` ints >= 0 (or 0-d integer tensors); ``loss_scale`` None or a float > 0."""
    bad = []
    ints = []
    for name, v in (("step", step), ("good_steps", good_steps), ("skipped", skipped)):
        if isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point() and v.dtype != torch.bool:
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            bad.append(f"{name}={v!r}: an int >= 0")
            v = 0
        ints.append(v)
    scale = None
    if loss_scale is not None:
        if isinstance(loss_scale, torch.Tensor) and loss_scale.ndim == 0:
            loss_scale = float(loss_scale)
        if isinstance(loss_scale, bool) or not isinstance(loss_scale, int | float) or not (math.isfinite(loss_scale) and loss_scale > 0):
            bad.append(f"loss_scale={loss_scale!r}: None or a finite float > 0")
        else:
            scale = float(loss_scale)
    if bad:
        raise ConfigError(
            format_failures(
                "zero.init: the counters to resume from are out of range:",
                bad,
                fix="pass the values zero.export_state returned (or leave them out to start at 0)",
            )
        )
    return ints[0], scale, ints[1], ints[2]


def shard_opt_state(plan: ZeroPlan, template: Any, opt_state: Any) -> Any:
    """``opt_state`` (global, as ``optimizer.init(global params)`` lays it out) in ZeRO's layout.

    ``template`` is the fresh ZeRO-layout state (``optimizer.init`` of this
    rank's tuple of buckets): it says where the per-parameter buffers are and
    the dtype and device of each. Returns plain tensors (new storage), laid out
    like ``template``; every mismatch is reported at once, by path.
    """
    is_buckets = _bucket_test(plan)
    layout = plan.layout
    # The params' leaf paths in tree order, each with its leaf's index in layout order.
    index_tree = layout.rebuild(list(range(len(layout.slots))))
    param_paths = [(jt.keystr(p), i) for p, i in jt.flatten_with_path(index_tree)[0]]
    values: list[Any] = []
    failures: list[str] = []

    def rec(z: Any, g: Any, path: str) -> None:
        where = f"opt_state{path}"
        if is_buckets(z):
            values.append(_shard_buffers(plan, z, g, where, param_paths, failures))
            return
        z_level = _one_level(z)
        if z_level is None:  # a leaf: a 0-d scalar such as count (or a non-tensor value)
            if not isinstance(z, torch.Tensor):
                values.append(g)
            elif not isinstance(g, torch.Tensor) or g.numel() != 1:
                got = f"shape {tuple(g.shape)}" if isinstance(g, torch.Tensor) else f"{type(g).__name__} {g!r:.40}"
                failures.append(f"{where}: expected a scalar tensor like {_describe(z)}, got {got}")
                values.append(z)
            else:
                local = g.to_local() if isinstance(g, DTensor) else g
                values.append(local.detach().reshape(z.shape).to(device=z.device, dtype=z.dtype, copy=True))
            return
        g_level = _one_level(g)
        if g_level is None or not _same_kind(z, g):
            failures.append(f"{where}: expected {_describe(z)}, got {_describe(g)}")
            values.extend(jt.leaves(z, is_leaf=is_buckets))
            return
        (z_children, z_keys), (g_children, g_keys) = z_level, g_level
        if z_keys != g_keys:
            missing = [k for k in z_keys if k not in g_keys]
            extra = [k for k in g_keys if k not in z_keys]
            detail = [f"missing {', '.join(missing)}"] if missing else []
            detail += [f"unexpected {', '.join(extra)}"] if extra else []
            failures.append(f"{where}: {type(z).__name__} entries differ: " + "; ".join(detail or [f"{z_keys} vs {g_keys}"]))
            values.extend(jt.leaves(z, is_leaf=is_buckets))
            return
        for zc, gc, key in zip(z_children, g_children, z_keys, strict=True):
            rec(zc, gc, path + key)

    rec(template, opt_state, "")
    if failures:
        raise TreeError(
            format_failures(
                "zero.init: opt_state is not this optimizer's state for these params (the layout of "
                "optimizer.init(params) for the global params):",
                failures,
                fix="pass the opt_state of zero.export_state, or optimizer.init(params) (then updated) for the "
                "same optimizer and params",
            )
        )
    return jt.unflatten(jt.structure(template, is_leaf=is_buckets), values)


def _shard_buffers(plan: ZeroPlan, z: tuple[torch.Tensor, ...], g: Any, where: str, param_paths: list[tuple[str, int]], failures: list[str]) -> tuple[torch.Tensor, ...]:
    """A per-parameter buffer tree ``g`` (global, shaped like the params) as this rank's tuple of buckets."""
    layout = plan.layout
    pairs = jt.flatten_with_path(g)[0] if g is not None else []
    got = {jt.keystr(p): x for p, x in pairs}
    want = {p for p, _ in param_paths}
    missing = [p for p, _ in param_paths if p not in got]
    extra = [p for p in got if p not in want]
    if missing or extra or len(got) != len(pairs):
        detail = [f"missing {', '.join(where + p for p in missing)}"] if missing else []
        detail += [f"unexpected {', '.join(where + p for p in extra)}"] if extra else []
        failures.append(f"{where}: a per-parameter buffer tree must mirror the params; " + "; ".join(detail or ["duplicate paths"]))
        return z
    leaves: list[torch.Tensor | None] = [None] * len(layout.slots)
    bad = len(failures)
    for p, i in param_paths:
        x, s = got[p], layout.slots[i]
        shape = plan.global_shapes[i]
        here = where + p
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            failures.append(f"{here}: expected a floating tensor of shape {shape}, got {_describe(x)}")
            continue
        if tuple(x.shape) != shape:
            failures.append(f"{here}: shape {tuple(x.shape)}, but the param's is {shape}")
            continue
        if isinstance(x, DTensor):
            placements = NamedSharding(plan.mesh, s.spec).to_placements(x.ndim)
            if x.device_mesh != plan.mesh.device_mesh:
                failures.append(f"{here}: a DTensor on another mesh ({x.device_mesh})")
                continue
            if tuple(x.placements) == tuple(placements):
                local = x.to_local()
            elif all(isinstance(pl, Replicate) for pl in x.placements):
                local = local_block(x.to_local(), s.spec, plan.mesh)
            else:
                failures.append(f"{here}: placements {tuple(x.placements)}; expected the param's {tuple(placements)} or replicated")
                continue
        else:
            local = local_block(x, s.spec, plan.mesh) if plan.is_dtensor[i] else x
        leaves[i] = local.detach()
    if len(failures) > bad:
        return z
    out = []
    for b, bucket in enumerate(layout.buckets):
        flat = torch.zeros(bucket.padded, dtype=z[b].dtype, device=plan.compute_device)
        for i in layout.units[bucket.unit].leaves:
            s = layout.slots[i]
            if s.bucket == b:
                leaf = leaves[i]
                assert leaf is not None
                flat[s.offset : s.offset + s.numel].copy_(leaf.reshape(-1))
        mine = layout.shard(flat, plan.bucket_index(b), b) if plan.stage >= 1 else flat
        out.append(to_device(mine, z[b].device, z[b].dtype, copy=True))
    return tuple(out)


def _bucket_test(plan: ZeroPlan) -> Any:
    """``is_buckets(x)``: ``x`` is a per-parameter buffer of a ZeRO optimizer state (one 1-D tensor per bucket)."""
    lengths = [b.shard if plan.stage >= 1 else b.padded for b in plan.layout.buckets]

    def is_buckets(x: Any) -> bool:
        if type(x) is not tuple or len(x) != len(lengths):
            return False
        for t, n in zip(x, lengths, strict=True):
            if not isinstance(t, torch.Tensor) or t.ndim != 1:
                return False
            if (t.to_local() if isinstance(t, DTensor) else t).numel() != n:
                return False
        return True

    return is_buckets


def _one_level(node: Any) -> tuple[list[Any], list[str]] | None:
    """The children of a pytree node and their path texts (``.mu``, ``[0]``, ``['w']``), or None for a leaf."""
    if node is None:
        return [], []
    if optree.treespec_is_leaf(optree.tree_structure(node, namespace=jt.NAMESPACE)):
        return None
    accessors, children, _ = optree.tree_flatten_with_accessor(node, is_leaf=lambda x: x is not node, none_is_leaf=True, namespace=jt.NAMESPACE)
    return children, [a.codify("") for a in accessors]


def _same_kind(z: Any, g: Any) -> bool:
    if isinstance(z, dict) and isinstance(g, dict):
        return True
    return type(z) is type(g)


def _describe(x: Any) -> str:
    if x is None:
        return "None"
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return f"{type(x).__name__}({', '.join(x._fields)})"
    if isinstance(x, list | tuple):
        return f"a {type(x).__name__} of {len(x)}"
    if isinstance(x, dict):
        return f"a dict with keys {sorted(map(repr, x))}"
    return f"{type(x).__name__} {x!r:.40}"
