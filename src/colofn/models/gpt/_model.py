"""Blocks, the output head, the whole forward pass and the loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from colofn import random
from colofn.errors import DTypeError, ShapeError, TreeError
from colofn.models.gpt._config import GPTConfig
from colofn.models.gpt._layers import attention, dropout, embed, mlp, norm, upcast
from colofn.models.gpt._moe import moe

__all__ = [
    "apply",
    "block",
    "cross_entropy",
    "final_norm_and_logits",
    "forward",
    "head_weight",
    "loss",
]

Params = dict[str, Any]


def _keys(key: torch.Tensor | None, config: GPTConfig, n: int) -> tuple[torch.Tensor | None, ...]:
    """``n`` dropout keys, or ``n`` Nones when there is no dropout to do."""
    if key is None or config.dropout == 0.0:
        return (None,) * n
    return random.split(key, n)


def block(
    params: Params,
    x: torch.Tensor,
    config: GPTConfig,
    *,
    positions: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm transformer block: ``x + attn(norm1(x))``, then ``+ mlp(norm2(x))`` or ``+ moe(...)``.

    Whether the block is dense or MoE is read from ``params`` (an ``"mlp"`` or a
    ``"moe"`` entry), so a pipeline stage runs any slice of ``params["layers"]``.

    Args:
        params: one entry of ``params["layers"]``.
        x: the residual stream ``[batch, seq, d_model]``.
        config: the model config.
        positions: absolute positions ``[seq]`` (rotary only; default ``arange(seq)``).
        key: dropout key; no dropout without one.

    Returns:
        ``(x, aux_loss)``: the new residual stream and the block's unweighted
        load-balancing loss (a float32 zero for a dense block).
    """
    k_attn, k_res1, k_res2 = _keys(key, config, 3)
    h = attention(
        params["attn"], norm(params["norm1"], x, config), config, positions=positions, key=k_attn
    )
    x = x + dropout(h, config.dropout, k_res1)
    h = norm(params["norm2"], x, config)
    if "moe" in params:
        h, aux = moe(params["moe"], h, config)
    else:
        h, aux = mlp(params["mlp"], h, config), torch.zeros((), device=x.device)
    return x + dropout(h, config.dropout, k_res2), aux


def head_weight(params: Params, config: GPTConfig) -> torch.Tensor:
    """The output projection ``[d_model, vocab_size]``: ``params["head"]``, or the token embedding transposed when tied."""
    return params["embed"]["tok"].T if config.tie_embeddings else params["head"]


def final_norm_and_logits(
    params_norm: dict[str, torch.Tensor], w_head: torch.Tensor, x: torch.Tensor, config: GPTConfig
) -> torch.Tensor:
    """``norm(x) @ w_head``: logits ``[batch, seq, vocab]`` from the residual stream.

    ``w_head`` is :func:`head_weight` (``[d_model, vocab_size]``; a vocab-parallel
    rank passes its columns and gets its slice of the logits).
    """
    return norm(params_norm, x, config) @ w_head


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in at least float32; targets equal to -100 are ignored.

    >>> logits = torch.zeros(2, 3, 10)
    >>> round(float(cross_entropy(logits, torch.ones(2, 3, dtype=torch.int64))), 4)  # log(10)
    2.3026
    """
    return F.cross_entropy(upcast(rearrange(logits, "... v -> (...) v")), rearrange(targets, "... -> (...)"))


def _check_tokens(tokens: Any, config: GPTConfig, what: str = "tokens") -> None:
    if not isinstance(tokens, torch.Tensor):
        raise DTypeError(
            f"{what} must be an integer tensor [batch, seq], got {type(tokens).__name__}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise DTypeError(f"{what} must be an integer tensor (token ids), got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ShapeError(f"{what} must be [batch, seq], got shape {tuple(tokens.shape)}")
    if tokens.shape[1] > config.seq_len:
        raise ShapeError(
            f"{what} has seq {tokens.shape[1]}, longer than config.seq_len={config.seq_len}; "
            f"crop the sequence or raise seq_len"
        )


def forward(
    params: Params, tokens: torch.Tensor, config: GPTConfig, *, key: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the summed (unweighted) load-balancing loss of the MoE layers.

    See :func:`apply` for the arguments; ``aux_loss`` is a float32 scalar, zero
    for a dense model.
    """
    _check_tokens(tokens, config)
    k_embed, k_layers = _keys(key, config, 2)
    x = dropout(embed(params["embed"], tokens, config), config.dropout, k_embed)
    aux = torch.zeros((), device=x.device)
    for i, layer in enumerate(params["layers"]):
        x, layer_aux = block(
            layer, x, config, key=None if k_layers is None else random.fold_in(k_layers, i)
        )
        aux = aux + layer_aux
    return final_norm_and_logits(params["final_norm"], head_weight(params, config), x, config), aux


def apply(
    params: Params, tokens: torch.Tensor, config: GPTConfig, *, key: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token logits ``[batch, seq, vocab_size]`` for ``tokens`` ``[batch, seq]``.

    Args:
        params: from :func:`init`.
        tokens: integer ids, ``seq <= config.seq_len``. Ids are not range-checked
            (that would synchronise a GPU); an id ``>= vocab_size`` fails in the embedding.
        config: the model config the params were made for.
        key: dropout key. Dropout at ``config.dropout`` happens only when a key
            is given: pass one to train, none to evaluate.

    >>> from colofn.models import gpt
    >>> cfg = gpt.config("tiny")
    >>> params = gpt.init(random.key(0), cfg)
    >>> gpt.apply(params, torch.zeros(2, 5, dtype=torch.int64), cfg).shape
    torch.Size([2, 5, 256])
    """
    return forward(params, tokens, config, key=key)[0]


def loss(
    params: Params,
    batch: Mapping[str, torch.Tensor],
    config: GPTConfig,
    *,
    key: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy plus ``config.aux_loss_coef`` times the summed MoE load-balancing losses.

    Args:
        params: from :func:`init`.
        batch: ``{"tokens": [batch, seq], "targets": [batch, seq]}``, where
            ``targets[:, t]`` is the token that follows ``tokens[:, t]`` (already
            shifted, as :func:`colofn.data.sample_batch` makes them). Targets
            equal to -100 are ignored.
        config: the model config.
        key: dropout key (see :func:`apply`).

    >>> from colofn.models import gpt
    >>> cfg = gpt.config("tiny")
    >>> params = gpt.init(random.key(0), cfg)
    >>> t = torch.zeros(2, 9, dtype=torch.int64)
    >>> float(gpt.loss(params, {"tokens": t[:, :-1], "targets": t[:, 1:]}, cfg)) > 5.0
    True
    """
    if not isinstance(batch, Mapping) or "tokens" not in batch or "targets" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise TreeError(
            f'loss(params, batch, config) needs batch = {{"tokens": ..., "targets": ...}}, got {got}; '
            f"for a plain token tensor t use {{'tokens': t[:, :-1], 'targets': t[:, 1:]}}"
        )
    _check_tokens(batch["targets"], config, "batch['targets']")
    if batch["targets"].shape != batch["tokens"].shape:
        raise ShapeError(
            f"batch['tokens'] {tuple(batch['tokens'].shape)} and batch['targets'] "
            f"{tuple(batch['targets'].shape)} must have the same shape"
        )
    logits, aux = forward(params, batch["tokens"], config, key=key)
    return cross_entropy(logits, batch["targets"]) + config.aux_loss_coef * aux
