"""The serial reference for ZeRO: the same optimizer on one device, over the whole batch.

Every ZeRO stage must take the same steps as this (up to the rounding of a
different summation order): ZeRO's loss is the mean of the ranks' losses over
equal batch shards, which is ``loss_fn`` on the whole batch when ``loss_fn``
returns a mean.

>>> import torch
>>> from colofn import optim
>>> params, losses = reference_train(
...     lambda p, b: ((b @ p["w"]) ** 2).mean(), optim.sgd(0.1), {"w": torch.ones(3)}, [torch.eye(3)[:2]]
... )
>>> params["w"].tolist(), losses
([0.8999999761581421, 0.8999999761581421, 1.0], [1.0])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from colofn import tree as jt
from colofn.optim.base import GradientTransformation, apply_updates

__all__ = ["reference_train"]


def reference_train(
    loss_fn: Callable[[Any, Any], torch.Tensor],
    optimizer: GradientTransformation,
    params: Any,
    batches: Iterable[Any],
) -> tuple[Any, list[float]]:
    """Train ``params`` on one device, one optimizer step per batch; returns ``(params, losses)``."""
    p = jt.map(lambda x: x.detach().clone().requires_grad_(True), params)
    state = optimizer.init(p)
    losses = []
    for batch in batches:
        loss = loss_fn(p, batch)
        leaves, treedef = jt.flatten(p)
        grads = jt.unflatten(treedef, torch.autograd.grad(loss, leaves))
        updates, state = optimizer.update(grads, state, p)
        p = apply_updates(p, updates)
        losses.append(float(loss.detach()))
    return jt.map(lambda x: x.detach(), p), losses
