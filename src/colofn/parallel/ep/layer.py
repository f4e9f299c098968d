"""A mixture-of-experts layer under a plan: global routing, then local or expert-parallel experts."""

from __future__ import annotations

import torch
from einops import rearrange

from colofn.collectives import pmean
from colofn.models import gpt
from colofn.parallel.ep._untracked import tag, untracked, vma_of
from colofn.parallel.ep.experts import expert_parallel, local_experts
from colofn.parallel.ep.routing import route_and_count
from colofn.parallel.plan import Plan

__all__ = ["moe"]


def moe(
    params: dict[str, torch.Tensor], x: torch.Tensor, config: gpt.GPTConfig, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, aux_loss)`` for this rank's tokens ``x`` ``[b, s, d]`` (already inside the TP region).

    Routing and the load-balancing loss equal the single-device model's over
    the whole batch (see :mod:`~colofn.parallel.ep.routing`). With ``plan.ep``
    the experts are split over that axis; with ``plan.tp`` each expert's
    ``d_ff`` is split over ``tp`` and ``y`` is a partial sum (the caller leaves
    the region). Every ``tp`` rank routes the same tokens identically, so the
    loss is their ``pmean``: invariant, with each rank's share of the gradient.
    The expert-parallel buffer sizes ride in the routing statistics' ``psum``
    (:func:`~colofn.parallel.ep.routing.route_and_count`).
    """
    seq_axis = plan.sp_axis if plan.sp in ("ulysses", "ring") else None
    r, table = route_and_count(
        params["router"], x, config, batch_axes=plan.batch_axes, seq_axis=seq_axis,
        seq_layout=plan.seq_layout, count_axis=plan.ep,
    )  # fmt: skip
    with untracked(x):
        tokens = rearrange(x, "b s d -> (b s) d")
    tag(vma_of(x), tokens)
    if plan.ep is None:
        y = local_experts(params, tokens, r, config)
    else:
        y = expert_parallel(params, tokens, r, config, plan.ep, table)
    aux = r.aux_loss if plan.tp is None else pmean(r.aux_loss, plan.tp)
    with untracked(y):
        out = rearrange(y, "(b s) d -> b s d", b=x.shape[0])
    tag(vma_of(y), out)
    return out, aux
