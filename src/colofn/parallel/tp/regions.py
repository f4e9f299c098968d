"""Entering and leaving a tensor-parallel region: the communication of Megatron TP and SP.

A *region* is the part of a block whose weights are split over ``tp`` (the
heads of attention, ``d_ff`` of the MLP, the vocabulary of the head). Inside
it every rank computes a partial result from its slice of the weights.

* Tensor parallel (Shoeybi et al. 2019, "Megatron-LM", arXiv:1909.08053, sec. 3,
  the ``f`` and ``g`` operators): the residual stream is replicated over
  ``tp``. Entering is ``pvary`` (identity forward, all-reduce backward: ``f``);
  leaving is ``psum`` (all-reduce forward, identity backward: ``g``).
* Sequence parallel (Korthikanti et al. 2022, "Reducing Activation Recomputation
  in Large Transformer Models", arXiv:2205.05198, sec. 4.2.2, ``g`` and ``g-bar``):
  the residual stream (and so the norms and dropout) is split over ``tp``
  along the sequence. Entering all-gathers the sequence (reduce-scatter
  backward); leaving reduce-scatters the partial sums back into sequence
  shards (all-gather backward). Same bytes as one all-reduce each, and the
  activations outside the region are ``1/tp`` the size.

Both are colofn's differentiable collectives, so the backward collectives above
are their transposes, not hand-written.
"""

from __future__ import annotations

import torch

from colofn.collectives import psum, pvary
from colofn.parallel.plan import Plan
from colofn.parallel.sp import megatron

__all__ = ["enter", "leave"]


def enter(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``x`` as the input of a TP region: ``pvary`` (TP), all-gather of the sequence (Megatron-SP), or ``x``."""
    if plan.tp is None:
        return x
    if plan.sp == "megatron":
        return megatron.gather(x, plan.tp)
    return pvary(x, plan.tp)


def leave(y: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Sum a TP region's partial results: ``psum`` (TP) or a reduce-scatter into sequence shards (Megatron-SP)."""
    if plan.tp is None:
        return y
    if plan.sp == "megatron":
        return megatron.scatter(y, plan.tp)
    return psum(y, plan.tp)
