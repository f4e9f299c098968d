"""Memory per rank: measured from the tensors a rank holds, and the ZeRO paper's formulas.

:func:`measure` adds up the bytes of the distinct storages behind the tensors
each category holds (``untyped_storage().nbytes()``, each storage counted once,
in the first category that holds it), so views and aliases are not counted
twice and padding is counted. The ZeRO paper (Rajbhandari et al., 2020,
section 3) models the memory of the *model states* with ``Ψ`` parameters,
fp16/bf16 params and grads (2 + 2 bytes each) and ``K = 12`` bytes of fp32
master weights and Adam moments per parameter, on ``N`` data-parallel ranks:

======  ====================  ==================
stage   shards                bytes per rank
======  ====================  ==================
0 (DP)  nothing               (2 + 2 + K) Ψ
1       optimizer state       4Ψ + KΨ/N
2       + gradients           2Ψ + (2 + K)Ψ/N
3       + parameters          (2 + 2 + K)Ψ/N
======  ====================  ==================

>>> paper_bytes(stage=3, numel=1000, n=4)
4000.0
>>> formula_bytes(stage=1, params=2000, grads=2000, states=12000, n=4)
7000.0
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from colofn import tree as jt

__all__ = ["LiveBytes", "MemoryReport", "formula_bytes", "measure", "paper_bytes", "storage_bytes"]


@dataclass(frozen=True)
class MemoryReport:
    """Bytes one rank holds, by category, measured from actual tensor storage.

    Attributes:
      params: the parameters ``loss_fn`` computes with (full copies in stages
        0-2, shards in stage 3), in the compute dtype.
      grads: the gradients held when the optimizer runs, in the compute dtype
        (full in stages 0-1, shards in 2-3).
      master: master weights (with mixed precision or offload; else 0, the
        params are the master).
      opt_state: the optimizer state's tensors.
      workspace: the master-dtype copy of the gradients the update reads (not
        a model state; the paper does not count it).
      gathered_peak: stage 3: the largest number of bytes of gathered units
        alive at once during the step (the current unit and a prefetched one).
    """

    params: int
    grads: int
    master: int
    opt_state: int
    workspace: int = 0
    gathered_peak: int = 0

    @property
    def model_states(self) -> int:
        """params + grads + master + opt_state: what the paper's formulas count."""
        return self.params + self.grads + self.master + self.opt_state


def _tensors(tree: Any) -> Iterable[torch.Tensor]:
    for x in jt.leaves(tree):
        if isinstance(x, DTensor):
            yield x.to_local()
        elif isinstance(x, torch.Tensor):
            yield x


def storage_bytes(tree: Any, seen: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the distinct storages behind the tensors of ``tree`` (DTensors: their local part)."""
    seen = set() if seen is None else seen
    total = 0
    for t in _tensors(tree):
        s = t.untyped_storage()
        key = (str(t.device), s.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += s.nbytes()
    return total


def measure(*, params: Any, grads: Any, master: Any, opt_state: Any, workspace: Any = (), gathered_peak: int = 0) -> MemoryReport:
    """A :class:`MemoryReport` of these trees, each storage counted once (in the first category holding it)."""
    seen: set[tuple[str, int]] = set()
    p = storage_bytes(params, seen)
    m = storage_bytes(master, seen)
    g = storage_bytes(grads, seen)
    o = storage_bytes(opt_state, seen)
    w = storage_bytes(workspace, seen)
    return MemoryReport(params=p, grads=g, master=m, opt_state=o, workspace=w, gathered_peak=gathered_peak)


def formula_bytes(*, stage: int, params: float, grads: float, states: float, n: int) -> float:
    """The paper's per-rank model-state bytes for total ``params``, ``grads`` and ``states`` bytes.

    ``states`` is the master weights plus the optimizer state.
    """
    if stage == 0:
        return params + grads + states
    if stage == 1:
        return params + grads + states / n
    if stage == 2:
        return params + (grads + states) / n
    return (params + grads + states) / n


def paper_bytes(*, stage: int, numel: int, n: int, k: int = 12) -> float:
    """The paper's formula for mixed-precision Adam: 2 + 2 bytes of params and grads, ``k`` of states."""
    return formula_bytes(stage=stage, params=2 * numel, grads=2 * numel, states=k * numel, n=n)


class LiveBytes:
    """Tracks the bytes of registered tensors while they are alive; keeps the peak."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        nbytes = t.untyped_storage().nbytes()
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes
