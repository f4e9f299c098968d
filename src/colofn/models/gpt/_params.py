"""The parameter pytree: its layout, ``init``, and shapes without allocation."""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Literal

import torch

from colofn import random, tree
from colofn.models.gpt._config import GPTConfig

__all__ = ["abstract_params", "count_params", "init"]

STD = 0.02  # GPT-2's initialiser scale


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """How to make one parameter (a pytree leaf: not registered as a node)."""

    shape: tuple[int, ...]
    fill: Literal["normal", "ones", "zeros"] = "normal"
    std: float = STD


def _norm(config: GPTConfig) -> dict[str, _Leaf]:
    out = {"scale": _Leaf((config.d_model,), "ones")}
    if config.norm == "layernorm":
        out["bias"] = _Leaf((config.d_model,), "zeros")
    return out


def _layer(config: GPTConfig, i: int) -> dict[str, Any]:
    d, h, hd, ff = config.d_model, config.n_heads, config.head_dim, config.d_ff
    # Residual-branch outputs scaled by 1/sqrt(2 n_layers), as GPT-2.
    out_std = STD / math.sqrt(2 * config.n_layers)
    layer: dict[str, Any] = {
        "norm1": _norm(config),
        "attn": {
            "wq": _Leaf((d, h, hd)),
            "wk": _Leaf((d, h, hd)),
            "wv": _Leaf((d, h, hd)),
            "wo": _Leaf((h, hd, d), std=out_std),
        },
        "norm2": _norm(config),
    }
    if config.is_moe(i):
        e = config.n_experts
        layer["moe"] = {
            "router": _Leaf((d, e)),
            "w1": _Leaf((e, d, ff)),
            "w2": _Leaf((e, ff, d), std=out_std),
        }
    else:
        layer["mlp"] = {"w1": _Leaf((d, ff)), "w2": _Leaf((ff, d), std=out_std)}
    return layer


def _layout(config: GPTConfig) -> dict[str, Any]:
    embed = {"tok": _Leaf((config.vocab_size, config.d_model))}
    if config.pos == "learned":
        embed["pos"] = _Leaf((config.seq_len, config.d_model))
    layout: dict[str, Any] = {
        "embed": embed,
        "layers": [_layer(config, i) for i in range(config.n_layers)],
        "final_norm": _norm(config),
    }
    if not config.tie_embeddings:
        layout["head"] = _Leaf((config.d_model, config.vocab_size))
    return layout


def init(
    key: torch.Tensor, config: GPTConfig, *, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Fresh parameters: weights ``N(0, 0.02)``, residual outputs ``N(0, 0.02 / sqrt(2 n_layers))``, norms 1 and 0.

    Each leaf's key is ``fold_in(key, crc32(path))``, so a parameter's value
    depends only on ``key`` and its path: layer 3 is the same in a 4-layer and
    a 12-layer model of the same widths.

    Args:
        key: a key from :func:`colofn.random.key`.
        config: the model config.
        device: where to create the tensors (default CPU).

    Returns:
        ``{"embed": {"tok", "pos"?}, "layers": [{"norm1", "attn", "norm2", "mlp" | "moe"}, ...],
        "final_norm": {"scale", "bias"?}, "head"?}``; see ``docs/models.md`` for every shape.

    >>> from colofn.models import gpt
    >>> params = gpt.init(random.key(0), gpt.config("tiny"))
    >>> params["layers"][0]["attn"]["wq"].shape
    torch.Size([32, 4, 8])
    """

    def make(path: Any, leaf: _Leaf) -> torch.Tensor:
        if leaf.fill == "ones":
            return torch.ones(leaf.shape, dtype=config.dtype, device=device)
        if leaf.fill == "zeros":
            return torch.zeros(leaf.shape, dtype=config.dtype, device=device)
        k = random.fold_in(key, zlib.crc32(tree.keystr(path).encode()))
        return random.normal(k, leaf.shape, config.dtype, device) * leaf.std

    return tree.map_with_path(make, _layout(config))


def abstract_params(config: GPTConfig) -> dict[str, Any]:
    """The parameter pytree as ``meta`` tensors: shapes and dtypes, no memory (like ``jax.eval_shape``).

    >>> from colofn.models import gpt
    >>> abstract_params(gpt.config("gpt2-124m"))["embed"]["tok"].shape
    torch.Size([50257, 768])
    """
    return tree.map(
        lambda leaf: torch.empty(leaf.shape, dtype=config.dtype, device="meta"), _layout(config)
    )


def count_params(config: GPTConfig) -> int:
    """Number of parameters (tied embeddings counted once).

    >>> from colofn.models import gpt
    >>> count_params(gpt.config("gpt2-124m"))
    124356864
    """
    return sum(math.prod(leaf.shape) for leaf in tree.leaves(_layout(config)))
