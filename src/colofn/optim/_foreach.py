"""Run the optimizer math with ``torch._foreach_*`` kernels, one call per group of leaves.

A foreach kernel takes lists whose tensors share a device and a dtype (like
``torch.optim``, which groups with ``_group_tensors_by_device_and_dtype``);
DTensors go in their own groups, one per device mesh, since DTensor implements
the foreach ops by sharding propagation over the lists.
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
        results = fn(*group)
        for out, res in zip(outs, results, strict=True):
            for i, x in zip(idx, res, strict=True):
                out[i] = x
    return outs
