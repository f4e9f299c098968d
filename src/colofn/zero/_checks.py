"""Argument checks for ``colofn.zero``: every user mistake is found before any communication."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Shard

from colofn import tree as jt
from colofn.errors import (
    ConfigError,
    DTypeError,
    MeshError,
    OptimizerTypeError,
    ShapeError,
    SpecError,
    TreeError,
    TreeTypeError,
    format_failures,
)
from colofn.mesh import Mesh
from colofn.optim.base import GradientTransformation

STAGES = {
    0: "plain data parallel: gradients all-reduced, nothing sharded",
    1: "optimizer state sharded over the data axis",
    2: "optimizer state and gradients sharded",
    3: "optimizer state, gradients and parameters sharded",
}


def check_stage(stage: Any) -> int:
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in STAGES:
        options = "\n".join(f"  {k}: {v}" for k, v in STAGES.items())
        raise ConfigError(
            f"zero.init: stage={stage!r} is not a ZeRO stage. The stages are:\n{options}\n"
            "Fix: pass stage=0, 1, 2 or 3."
        )
    return stage


def check_axis(mesh: Mesh, axis: Any) -> str:
    if not isinstance(axis, str) or axis not in mesh.axis_names:
        raise SpecError(
            f"zero.init: axis={axis!r} is not an axis of {mesh}; the mesh axes are {tuple(mesh.axis_names)}.\n"
            f"Fix: pass axis= one of {tuple(mesh.axis_names)} (the data-parallel axis), or build the mesh "
            f"with an axis named {axis!r}."
        )
    return axis


def check_axes(mesh: Mesh, axis: Any) -> tuple[str, ...]:
    """``axis`` (one data axis, or a tuple of them with the data-parallel one first) as a tuple."""
    if isinstance(axis, tuple) and axis and all(isinstance(a, str) for a in axis):
        if len(set(axis)) != len(axis):
            raise SpecError(
                f"zero.init: axis={axis!r} names an axis twice. Fix: list each data axis once, the "
                "data-parallel one first, e.g. axis=('dp', 'sp')."
            )
        for a in axis:
            check_axis(mesh, a)
        return axis
    return (check_axis(mesh, axis),)


def check_optimizer(where: str, optimizer: Any) -> None:
    if not isinstance(optimizer, GradientTransformation):
        raise OptimizerTypeError(
            f"{where}: optimizer is {type(optimizer).__name__} {optimizer!r:.60}, not a "
            "colofn.optim.GradientTransformation. Fix: pass optim.adamw(...), optim.sgd(...) or a chain of them."
        )


def check_params(params: Any, mesh: Mesh, axis: str) -> None:
    """Every leaf a floating tensor; DTensors on ``mesh``, not split over ``axis``, no pending sums."""
    pairs, _ = jt.flatten_with_path(params)
    if not pairs:
        raise TreeError("zero.init: params has no tensor leaves. Fix: pass the pytree of parameter tensors.")
    not_tensors = [f"params{jt.keystr(p)}: {type(x).__name__} {x!r:.40}" for p, x in pairs if not isinstance(x, torch.Tensor)]
    if not_tensors:
        raise TreeTypeError(
            format_failures(
                f"zero.init: every leaf of params must be a tensor; {len(not_tensors)} are not:",
                not_tensors,
                fix="convert them with torch.as_tensor, or keep non-parameter values out of the params tree",
            )
        )
    not_float = [f"params{jt.keystr(p)}: dtype {x.dtype}" for p, x in pairs if not x.is_floating_point()]
    if not_float:
        raise DTypeError(
            format_failures(
                "zero.init: parameters must be floating-point tensors:",
                not_float,
                fix="keep integer buffers (token ids, step counters) out of the params tree",
            )
        )
    bad = []
    for p, x in pairs:
        if not isinstance(x, DTensor):
            continue
        where = f"params{jt.keystr(p)}"
        if x.device_mesh != mesh.device_mesh:
            bad.append(f"{where} is a DTensor on another mesh ({x.device_mesh})")
            continue
        for name, pl in zip(mesh.axis_names, x.placements, strict=True):
            if isinstance(pl, Partial):
                bad.append(f"{where} has a pending sum (Partial) on axis {name!r}")
            elif isinstance(pl, Shard) and name == axis:
                bad.append(f"{where} is split over the data axis {axis!r} ({pl}); ZeRO does that itself")
            elif isinstance(pl, Shard) and type(pl) is not Shard:
                bad.append(f"{where} has placement {pl} on {name!r}, which has no PartitionSpec")
            elif isinstance(pl, Shard) and x.shape[pl.dim] % mesh.shape[name]:
                bad.append(f"{where} is split unevenly over {name!r}")
    if bad:
        raise SpecError(
            format_failures(
                f"zero.init: DTensor params do not fit {mesh} with data axis {axis!r}:",
                bad,
                fix=f"place params replicated over {axis!r}, sharded (if at all) only over the model axes, "
                "e.g. colofn.device_put(params, {'w': P(None, 'tp')})",
            )
        )


def check_elementwise(optimizer: GradientTransformation, why: str) -> None:
    """Raise if the update of one coordinate depends on other leaves (``clip_by_global_norm``).

    ZeRO runs the optimizer on each rank's shard alone, which is exact only
    for per-coordinate optimizers (sgd, adam, adamw and chains of them).
    """
    f64 = torch.float64
    params = (torch.tensor([0.5, -1.0, 2.0], dtype=f64), torch.tensor([1.0, 3.0], dtype=f64))
    small = (torch.tensor([0.1, -0.2, 0.3], dtype=f64), torch.tensor([0.5, -0.5], dtype=f64))
    large = (small[0], small[1] * 1e6)
    try:
        state = optimizer.init(params)
        u_small, _ = optimizer.update(small, state, params)
        u_large, _ = optimizer.update(large, state, params)
    except Exception:  # noqa: BLE001 - an optimizer that rejects the probe: nothing to conclude
        return
    if not torch.equal(u_small[0], u_large[0]):
        raise ConfigError(
            f"zero.init: the optimizer is not per-coordinate: the update of one parameter depends on the "
            f"gradients of others (clip_by_global_norm does this). {why}, so each rank would see only its "
            "own part. Fix: use sgd/adam/adamw (or chains without global-norm clipping), or stage=0 without "
            "model-parallel axes."
        )


def check_offload(offload: Any) -> bool:
    if not isinstance(offload, bool):
        raise ConfigError(f"zero.init: offload={offload!r}; pass True (optimizer on the CPU) or False")
    return offload


def check_batch(batch: Any, n: int, axis: str) -> None:
    leaves = jt.leaves(batch)
    if all(isinstance(x, torch.Tensor) and x.ndim and not x.shape[0] % n for x in leaves):
        return  # the common case, checked without building any path
    pairs, _ = jt.flatten_with_path(batch)
    not_tensors = [f"batch{jt.keystr(p)}: {type(x).__name__}" for p, x in pairs if not isinstance(x, torch.Tensor)]
    if not_tensors:
        raise TreeTypeError(
            format_failures(
                "zero.train_step: every leaf of batch must be a tensor (split on dim 0 over the data axis):",
                not_tensors,
                fix="convert them with torch.as_tensor, or bind constants into loss_fn with functools.partial",
            )
        )
    bad = []
    for p, x in pairs:
        where = f"batch{jt.keystr(p)}"
        if x.ndim == 0:
            bad.append(f"{where} is 0-d; it has no dim 0 to split over {axis!r}")
        elif x.shape[0] % n:
            bad.append(f"{where} has {x.shape[0]} rows (dim 0 of shape {tuple(x.shape)}), not divisible by the {n} ranks of axis {axis!r}")
    if bad:
        raise ShapeError(
            format_failures(
                f"zero.train_step: the batch is split on dim 0 over axis {axis!r} ({n} ranks):",
                bad,
                fix=f"make every batch leaf's dim 0 a multiple of {n} (drop or pad the last batch)",
            )
        )


def check_batch_spec(batch: Any, spec: Any, mesh: Mesh) -> None:
    """Every batch leaf split by ``spec`` (one spec for all leaves): the dims exist and divide."""
    from colofn.partition_spec import PartitionSpec

    if not isinstance(spec, PartitionSpec):
        raise SpecError(f"zero.train_step: batch_spec={spec!r} is not a PartitionSpec. Fix: pass e.g. batch_spec=P('dp', 'sp').")
    unknown = [a for a in spec.axes if a not in mesh.axis_names]
    if unknown:
        raise SpecError(f"zero.train_step: batch_spec={spec} names {unknown[0]!r}, not an axis of {mesh}; the axes are {tuple(mesh.axis_names)}.")
    pairs, _ = jt.flatten_with_path(batch)
    not_tensors = [f"batch{jt.keystr(p)}: {type(x).__name__}" for p, x in pairs if not isinstance(x, torch.Tensor)]
    if not_tensors:
        raise TreeTypeError(format_failures("zero.train_step: every leaf of batch must be a tensor:", not_tensors, fix="convert them with torch.as_tensor"))
    bad = []
    entries = tuple(spec)
    for p, x in pairs:
        where = f"batch{jt.keystr(p)}"
        for d, entry in enumerate(entries):
            if entry is None:
                continue
            axes = (entry,) if isinstance(entry, str) else tuple(entry)
            size = 1
            for a in axes:
                size *= mesh.shape[a]
            if d >= x.ndim:
                bad.append(f"{where} has {x.ndim} dims; batch_spec {spec} splits dim {d} over {axes}")
            elif x.shape[d] % size:
                bad.append(f"{where}: dim {d} of shape {tuple(x.shape)} is not divisible by the {size} ranks of {axes}")
    if bad:
        raise ShapeError(format_failures(f"zero.train_step: the batch does not split by batch_spec={spec} on {mesh}:", bad, fix="make those dims multiples of the axis sizes"))


def check_loss(loss: Any, name: str) -> None:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.is_floating_point():
        got = f"a tensor of shape {tuple(loss.shape)} and dtype {loss.dtype}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ShapeError(
            f"zero.train_step: loss_fn {name!r} returned {got}; it must return a 0-d floating tensor "
            "(the mean loss over this rank's batch shard). Fix: reduce it with .mean()."
        )


def check_loss_axes(varying: Any, model_axes: tuple[str, ...], name: str, mesh: Mesh) -> None:
    """The loss must be invariant along the model axes: ZeRO averages it over the data axes only."""
    bad = [a for a in model_axes if a in varying]
    if bad:
        raise SpecError(
            f"zero.train_step: loss_fn {name!r} returned a loss that varies along the model "
            f"axis{'es' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} of {mesh}; ZeRO averages the "
            f"loss over the data axes only, so it must already be the same on every rank of the others. "
            f"Fix: psum/pmean the loss over {bad[0]!r} inside loss_fn"
        )


def check_state(where: str, state: Any) -> None:
    from colofn.zero.state import ZeroState

    if not isinstance(state, ZeroState):
        raise TreeTypeError(f"{where}: state is {type(state).__name__}, not a ZeroState. Fix: pass the state from zero.init or the last zero.train_step.")


def check_mesh(mesh: Any) -> Mesh:
    from colofn.mesh import get_mesh

    m = get_mesh(mesh, "zero.init")
    if not isinstance(m, Mesh):  # pragma: no cover - get_mesh checks
        raise MeshError("zero.init: mesh must be a colofn.Mesh")
    return m
