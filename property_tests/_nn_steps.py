"""What the nn property tests run on every rank: the loss, every gradient, and AdamW steps of a planned module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from colofn import optim
from colofn import tree as jt
from colofn.nn import Parallelized, to_state_dict


def loss_grads_and_adamw_steps(par: Parallelized, loss_fn: Callable[..., Any], batch: Any, steps: int, lr: float) -> dict[str, Any]:
    """``{"loss", "grads"[, "params" after steps of AdamW]}`` of the mapped ``loss_fn`` at ``par.shard()``, in the module's layout."""
    params = jt.map(torch.Tensor.requires_grad_, par.shard())
    loss = loss_fn(params, batch)
    grads = jt.unflatten(jt.structure(params), torch.autograd.grad(loss.to_local(), jt.leaves(params)))
    out = {"loss": float(loss.to_local().detach()), "grads": to_state_dict(par.module_params(grads))}
    if steps:
        opt = optim.adamw(lr, weight_decay=0.01)
        state = opt.init(params)
        for _ in range(steps):
            p = jt.map(lambda t: t.detach().requires_grad_(), params)
            g = torch.autograd.grad(loss_fn(p, batch).to_local(), jt.leaves(p))
            updates, state = opt.update(jt.unflatten(jt.structure(p), g), state, p)
            params = jt.map(torch.Tensor.detach, optim.apply_updates(p, updates))
        out["params"] = to_state_dict(par.module_params(params))
    return out
