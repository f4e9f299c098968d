"""ZeRO under a :class:`Plan`: which axes it shards over, and the loss it differentiates.

ZeRO (:mod:`colofn.zero`) shards each parameter's optimizer state (stage 1),
gradient (2) and value (3) over the *data axes* it is replicated on: the mesh
axes whose ranks hold the same parameters and see different tokens. Under a
plan those are ``dp``, the Ulysses/ring sequence axis (each rank holds a
chunk of every sequence, and the whole layer: DeepSpeed-Ulysses, Jacobs et al.
2023, sec. 3.3, and ColossalAI's hybrid plugin shard ZeRO over ``dp x sp``
for the same reason) and ``ep`` (dense parameters are replicated over it;
expert weights are split over it, so :func:`colofn.zero.init` shards those
over ``dp`` alone, as ColossalAI's MoE plugin does with its ``moe_dp_group``).
``tp`` and Megatron-SP's sequence split (over ``tp``) split the parameters,
so they are not data axes.

>>> from colofn.parallel import Plan
>>> zero_axes(Plan(dp="dp", sp="ring", sp_axis="sp"))
('dp', 'sp')
>>> zero_axes(Plan(dp="dp", tp="tp", ep="ep"))
('dp', 'ep')
"""

from __future__ import annotations

import dataclasses
from typing import Any

from colofn.parallel.plan import Plan

__all__ = ["zero_axes", "zero_loss_plan"]


def zero_axes(plan: Plan) -> tuple[str, ...]:
    """The data axes of ``plan``, the data-parallel one(s) first: ``axis=`` for :func:`colofn.zero.init`."""
    seq = (plan.sp_axis,) if plan.sp in ("ulysses", "ring") and plan.sp_axis else ()
    ep = (plan.ep,) if plan.ep and plan.ep not in plan.dp_axes + seq else ()
    return plan.dp_axes + seq + ep


def zero_loss_plan(plan: Plan, config: Any) -> Plan:
    """The plan of the per-device loss :func:`colofn.zero.train_step` differentiates under ``plan``.

    Dense models drop ``dp`` from the plan: each ``dp`` rank's loss is its own
    tokens' mean, and ZeRO averages over ``dp`` (one scalar all-reduce); the
    loss still sums over the sequence and expert axes itself. A
    mixture-of-experts model keeps ``dp``: its routing statistics (the
    load-balancing loss and the experts' capacity) are over every token of
    the step, so the loss is the step's whole mean, invariant on every rank,
    and ZeRO only sums each rank's part of the gradient.

    >>> from colofn.models import gpt
    >>> zero_loss_plan(Plan(dp="dp", sp="ulysses", sp_axis="sp"), gpt.config("tiny")).dp is None
    True
    >>> zero_loss_plan(Plan(dp="dp", ep="ep"), gpt.config("tiny", n_experts=2)).dp
    'dp'
    """
    if getattr(config, "n_experts", 0):
        return plan
    return dataclasses.replace(plan, dp=None)
