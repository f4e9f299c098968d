"""Run the optimizer math with ``torch._foreach_*`` kernels, one call per group of leaves.

A foreach kernel takes lists whose tensors share a device and a dtype (like
``torch.optim``, which groups with ``_group_tensors_by_device_and_dtype``);
DTensors go in their own groups, one per device mesh. The math is elementwise,
so where every list's DTensors at a position share their placements and shape
(none ``Partial``), it runs on the local blocks and the results are wrapped
back with the same layout: the same numbers as DTensor's foreach ops, without
their sharding propagation per tensor (which cost more than the math itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from colofn.optim._checks import is_dtensor

Tensors = list[torch.Tensor] | tuple[torch.Tensor, ...]


def _key(x: torch.Tensor) -> tuple[Any, ...]:
    mesh = x.device_mesh if is_dtensor(x) else None  # type: ignore[attr-defined]
    return (mesh, x.device, x.dtype)


def groups(
    lists: Sequence[Sequence[torch.Tensor]],
) -> list[tuple[list[int], list[list[torch.Tensor]]]]:
    """Split parallel ``lists`` by the kind, device and dtype of the first list's tensors.

    Returns ``[(indices, [sublist for each list]), ...]`` in order of first appearance.
    """
    by_key: dict[tuple[Any, ...], list[int]] = {}
    for i, x in enumerate(lists[0]):
        by_key.setdefault(_key(x), []).append(i)
    return [(idx, [[lst[i] for i in idx] for lst in lists]) for idx in by_key.values()]


def run_grouped(
    fn: Callable[..., Sequence[Tensors]], lists: Sequence[Sequence[torch.Tensor]], n_out: int
) -> list[list[torch.Tensor]]:
    """``fn(*group_lists) -> n_out lists``, run per group and put back in leaf order."""
    n = len(lists[0])
    outs: list[list[Any]] = [[None] * n for _ in range(n_out)]
    for idx, group in groups(lists):
        local = [same_layout_locals(xs) for xs in zip(*group, strict=True)] if is_dtensor(group[0][0]) else None
        if local is not None and all(xs is not None for xs in local):
            blocks = [list(col) for col in zip(*local, strict=True)]  # type: ignore[misc]
            results: Sequence[Tensors] = [[rewrap(x, like) for x, like in zip(res, group[0], strict=True)] for res in fn(*blocks)]
        else:
            results = fn(*group)
        for out, res in zip(outs, results, strict=True):
            for i, x in zip(idx, res, strict=True):
                out[i] = x
    return outs


def same_layout_locals(xs: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """The local blocks of DTensors ``xs`` that share mesh, placements and global shape, none ``Partial``; else None."""
    first = xs[0]
    if not all(is_dtensor(x) for x in xs):
        return None
    spec = first._spec  # type: ignore[attr-defined]
    if any(p.is_partial() for p in spec.placements):
        return None
    for x in xs[1:]:
        other = x._spec  # type: ignore[attr-defined]
        if other.mesh != spec.mesh or other.placements != spec.placements or other.shape != spec.shape:
            return None
    return [x._local_tensor for x in xs]  # type: ignore[attr-defined]


def rewrap(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local``, an elementwise result of ``like``'s local block, as a DTensor laid out as ``like``."""
    from torch.distributed.tensor import DTensor

    spec = like._spec  # type: ignore[attr-defined]
    if local.dtype == spec.tensor_meta.dtype and local.stride() == like._local_tensor.stride():  # type: ignore[attr-defined]
        return DTensor(local, spec, requires_grad=False)
    return DTensor.from_local(local, spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride)
