"""Optimizers as pure functions over pytrees (optax's design, torch.optim's numbers).

An optimizer is a :class:`GradientTransformation`: ``init(params) -> state`` and
``update(grads, state, params=None) -> (updates, new_state)``. States are
NamedTuples of tensors (a 0-d ``count`` and buffers shaped like the params), so
they can be sharded, offloaded and checkpointed like any other pytree.

>>> import torch
>>> from colofn import optim
>>> params = {"w": torch.ones(3)}
>>> opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2))
>>> state = opt.init(params)
>>> grads = {"w": torch.tensor([1.0, -2.0, 0.5])}
>>> updates, state = opt.update(grads, state, params)
>>> params = optim.apply_updates(params, updates)
>>> params["w"]
tensor([0.9899, 1.0099, 0.9899])
"""

from colofn.optim.adam import AdamState, adam, adamw
from colofn.optim.base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Schedule,
    TransformInitFn,
    TransformUpdateFn,
    Updates,
    apply_updates,
    register_in_place,
    update_in_place,
)
from colofn.optim.clipping import clip_by_global_norm, global_norm
from colofn.optim.combine import chain
from colofn.optim.schedules import (
    constant_schedule,
    cosine_decay_schedule,
    join_schedules,
    linear_schedule,
    linear_warmup,
    piecewise_constant_schedule,
    warmup_cosine_decay_schedule,
    warmup_linear_decay_schedule,
)
from colofn.optim.sgd import SgdState, sgd

__all__ = [
    "AdamState",
    "EmptyState",
    "GradientTransformation",
    "OptState",
    "Params",
    "ScalarOrSchedule",
    "Schedule",
    "SgdState",
    "TransformInitFn",
    "TransformUpdateFn",
    "Updates",
    "adam",
    "adamw",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "global_norm",
    "join_schedules",
    "linear_schedule",
    "linear_warmup",
    "piecewise_constant_schedule",
    "register_in_place",
    "sgd",
    "update_in_place",
    "warmup_cosine_decay_schedule",
    "warmup_linear_decay_schedule",
]
