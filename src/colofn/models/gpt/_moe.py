"""Mixture of experts: a top-k router and stacked expert MLPs (Switch Transformer, GShard).

Expert weights are stacked on dim 0 (``w1`` ``[n_experts, d_model, d_ff]``,
``w2`` ``[n_experts, d_ff, d_model]``), so expert parallelism is a spec on that
dim; the router ``[d_model, n_experts]`` stays replicated. Routing math runs in
at least float32 whatever the model dtype (Switch Transformer's selective precision).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from colofn.models.gpt._config import GPTConfig
from colofn.models.gpt._layers import mlp, upcast

__all__ = ["Routing", "moe", "route"]


class Routing(NamedTuple):
    """Where each token goes.

    Attributes:
        expert_index: ``[tokens, top_k]`` int64, the chosen experts, best first.
        gates: ``[tokens, top_k]``, their router probabilities (softmax over all
            experts, not renormalised over the top k), in the input's dtype.
        keep: ``[tokens, top_k]`` bool, False where the expert's capacity was
            full and the assignment is dropped (all True without a capacity).
        aux_loss: the load-balancing loss, a float32 (or float64) scalar (see :func:`route`).
    """

    expert_index: torch.Tensor
    gates: torch.Tensor
    keep: torch.Tensor
    aux_loss: torch.Tensor


def route(router: torch.Tensor, x: torch.Tensor, config: GPTConfig) -> Routing:
    """Route tokens ``x`` ``[tokens, d_model]`` with ``router`` ``[d_model, n_experts]``.

    The load-balancing loss is Switch Transformer's, generalised to top-k:
    ``n_experts * sum_e f_e * P_e``, where ``f_e`` is the fraction of the
    ``tokens * top_k`` assignments that chose expert ``e`` (before any capacity
    drop) and ``P_e`` the mean router probability of ``e``. It is 1 when routing
    is perfectly balanced and ``n_experts`` when every token picks one expert.
    It is computed over the tokens given: in a parallel run, over each shard.

    With ``config.capacity_factor`` set, each expert takes at most
    ``ceil(capacity_factor * tokens * top_k / n_experts)`` assignments, first
    come first served in GShard's order: every token's first choice (in token
    order), then every token's second choice, and so on.

    >>> from colofn import random
    >>> cfg = GPTConfig(d_model=8, n_heads=2, n_experts=4, top_k=2)
    >>> r = route(random.normal(random.key(0), (8, 4)), random.normal(random.key(1), (5, 8)), cfg)
    >>> r.expert_index.shape, bool(r.keep.all()), float(r.aux_loss) >= 1.0
    (torch.Size([5, 2]), True, True)
    """
    n_tokens, n_experts, k = x.shape[0], router.shape[1], config.top_k
    probs = torch.softmax(upcast(x) @ upcast(router), dim=-1)
    gates, expert_index = probs.topk(k, dim=-1)
    chosen = F.one_hot(expert_index, n_experts).to(probs.dtype)  # [tokens, k, experts]
    fraction = chosen.sum(dim=(0, 1)) / (n_tokens * k)
    aux_loss = n_experts * (fraction * probs.mean(dim=0)).sum()
    if config.capacity_factor is None:
        keep = torch.ones_like(expert_index, dtype=torch.bool)
    else:
        capacity = math.ceil(config.capacity_factor * n_tokens * k / n_experts)
        slot_major = rearrange(chosen, "tokens k experts -> (k tokens) experts")
        rank_in_expert = ((slot_major.cumsum(dim=0) - 1) * slot_major).sum(dim=-1)
        keep = rearrange(rank_in_expert < capacity, "(k tokens) -> tokens k", k=k)
    return Routing(expert_index, gates.to(x.dtype), keep, aux_loss)


def moe(
    params: dict[str, torch.Tensor], x: torch.Tensor, config: GPTConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixture-of-experts MLP: ``y_t = sum_j gate_tj * mlp_(e_tj)(x_t)`` over the kept assignments.

    Args:
        params: ``{"router": [d_model, n_experts], "w1": [n_experts, d_model, d_ff],
            "w2": [n_experts, d_ff, d_model]}``.
        x: ``[..., d_model]``.
        config: the model config (``top_k``, ``capacity_factor``).

    Returns:
        ``(y, aux_loss)``: ``y`` shaped like ``x`` (zero for a token whose every
        assignment was dropped; the residual connection carries it), and the
        unweighted load-balancing loss of :func:`route`.
    """
    tokens = x.reshape(-1, x.shape[-1])
    r = route(params["router"], tokens, config)
    y = torch.zeros_like(tokens)
    for e in range(params["w1"].shape[0]):
        tok, slot = torch.nonzero((r.expert_index == e) & r.keep, as_tuple=True)
        h = mlp({"w1": params["w1"][e], "w2": params["w2"][e]}, tokens[tok], config)
        y = y.index_add(0, tok, h * r.gates[tok, slot, None])
    return y.reshape(x.shape), r.aux_loss
