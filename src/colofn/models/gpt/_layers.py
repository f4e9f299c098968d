"""The dense pieces of a GPT block, each a pure function of explicit weights.

Tensor-parallel code reuses these on local shards: the number of heads is read
from the weights (``wq.shape[1]``), never from the config, so a rank holding
``n_heads / tp`` heads runs the same code. ``attention_out`` and ``mlp`` then
return partial sums that the caller reduces over the ``tp`` axis (Megatron-LM).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum

from colofn import random
from colofn.models.gpt._config import GPTConfig

__all__ = [
    "attention",
    "attention_core",
    "attention_out",
    "dropout",
    "embed",
    "mlp",
    "norm",
    "qkv",
    "rotary",
]

Params = dict[str, torch.Tensor]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (float64 stays float64): for norms, softmaxes and losses."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dropout(x: torch.Tensor, rate: float, key: torch.Tensor | None) -> torch.Tensor:
    """Inverted dropout with an explicit key; the identity when ``key`` is None or ``rate`` is 0.

    >>> x = torch.ones(1000)
    >>> y = dropout(x, 0.5, random.key(0))
    >>> sorted(set(y.tolist()))
    [0.0, 2.0]
    >>> bool((dropout(x, 0.5, None) == x).all())
    True
    """
    if key is None or rate == 0.0:
        return x
    keep = random.bernoulli(key, 1.0 - rate, x.shape, device=x.device)
    return x * keep.to(x.dtype) / (1.0 - rate)


def norm(params: Params, x: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """LayerNorm (``params`` has ``scale`` and ``bias``) or RMSNorm (``scale`` only) over the last dim."""
    if config.norm == "layernorm":
        return F.layer_norm(x, x.shape[-1:], params["scale"], params["bias"], config.norm_eps)
    wide = upcast(x)
    rms = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + config.norm_eps)
    return (wide * rms).to(x.dtype) * params["scale"]


def _positions(positions: torch.Tensor | None, seq: int, device: torch.device) -> torch.Tensor:
    return torch.arange(seq, device=device) if positions is None else positions


def embed(
    params: Params,
    tokens: torch.Tensor,
    config: GPTConfig,
    *,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token embeddings, plus learned position embeddings when ``config.pos == "learned"``.

    Args:
        params: ``{"tok": [vocab_size, d_model]}``, and ``"pos": [seq_len, d_model]`` for learned positions.
        tokens: integer ids ``[batch, seq]``.
        config: the model config.
        positions: absolute positions ``[seq]`` of the tokens (default ``arange(seq)``);
            a sequence-parallel rank passes its chunk's positions.

    Returns:
        ``[batch, seq, d_model]``.
    """
    x = F.embedding(tokens, params["tok"])
    if config.pos == "learned":
        x = x + params["pos"][_positions(positions, tokens.shape[-1], tokens.device)]
    return x


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoPE, Su et al. 2021) of ``x`` ``[..., seq, head_dim]``.

    Uses the half-split layout (GPT-NeoX, Llama): dim ``i`` is rotated with dim
    ``i + head_dim // 2``. Computed in at least float32, returned in ``x.dtype``.

    >>> q = random.normal(random.key(0), (1, 2, 5, 8))
    >>> torch.allclose(rotary(q, torch.arange(5)).norm(dim=-1), q.norm(dim=-1), atol=1e-6)
    True
    """
    half = x.shape[-1] // 2
    wide = upcast(x)
    inv_freq = base ** (-torch.arange(half, dtype=wide.dtype, device=x.device) / half)
    angles = positions.to(wide.dtype)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = wide[..., :half], wide[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def qkv(
    params: Params, x: torch.Tensor, config: GPTConfig, *, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project ``x`` ``[batch, seq, d_model]`` to queries, keys and values ``[batch, heads, seq, head_dim]``.

    ``wq``, ``wk``, ``wv`` are ``[d_model, heads, head_dim]``; ``heads`` is
    whatever the weights hold (all heads, or a tensor-parallel rank's share).
    Rotary embeddings are applied here when ``config.pos == "rotary"``.
    """
    # einsum "b s d, d heads hd -> b heads s hd" as a tensordot: the same matmul (and the same bits), less work
    # per call; one op with the weight as an operand, so under tracking its implicit pvary is the weight's own
    q, k, v = (torch.tensordot(x, params[w], dims=([2], [0])).transpose(1, 2) for w in ("wq", "wk", "wv"))
    if config.pos == "rotary":
        pos = _positions(positions, x.shape[1], x.device)
        q, k = rotary(q, pos, config.rope_base), rotary(k, pos, config.rope_base)
    return q, k, v


def attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_offset: int = 0,
    kv_offset: int = 0,
    dropout_rate: float = 0.0,
    key: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention of local ``q`` ``[b, h, sq, hd]`` over ``k``, ``v`` ``[b, h, sk, hd]``.

    Query ``i`` sits at absolute position ``q_offset + i`` and key ``j`` at
    ``kv_offset + j``; a query sees the keys at positions ``<=`` its own. With
    equal offsets and lengths this is ``scaled_dot_product_attention(is_causal=True)``.
    Ring attention and Ulysses reuse it on their chunks. A query that sees no
    key gets a zero row (torch's SDPA does the same on CPU; other kernels may
    not, so chunked code should skip key chunks wholly in a query chunk's future).

    Attention-probability dropout needs a key (torch's own dropout would use
    the global RNG), so it takes the explicit-softmax path.

    >>> q = k = v = random.normal(random.key(0), (1, 2, 4, 8))
    >>> full = attention_core(q, k, v)
    >>> torch.allclose(attention_core(q[:, :, 2:], k, v, q_offset=2), full[:, :, 2:], atol=1e-6)
    True
    """
    sq, sk = q.shape[-2], k.shape[-2]
    dropping = key is not None and dropout_rate > 0.0
    if q_offset == kv_offset and sq == sk and not dropping:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    q_pos = torch.arange(sq, device=q.device) + q_offset
    kv_pos = torch.arange(sk, device=q.device) + kv_offset
    mask = q_pos[:, None] >= kv_pos[None, :]
    if not dropping:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = upcast(einsum(q, k, "... sq hd, ... sk hd -> ... sq sk")) / math.sqrt(q.shape[-1])
    # A finite fill and the mask product keep a fully masked row at zero, not NaN.
    probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=-1) * mask
    return einsum(dropout(probs.to(q.dtype), dropout_rate, key), v, "... sq sk, ... sk hd -> ... sq hd")


def attention_out(params: Params, o: torch.Tensor) -> torch.Tensor:
    """Merge heads: ``o`` ``[b, heads, s, head_dim]`` times ``wo`` ``[heads, head_dim, d_model]``.

    On a tensor-parallel rank this is a partial sum over its heads.
    """
    return torch.tensordot(o, params["wo"], dims=([1, 3], [0, 1]))  # einsum "b heads s hd, heads hd d -> b s d"


def attention(
    params: Params,
    x: torch.Tensor,
    config: GPTConfig,
    *,
    positions: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal multi-head self-attention: :func:`qkv`, :func:`attention_core`, :func:`attention_out`.

    ``key`` (optional) drives attention-probability dropout at ``config.dropout``.
    """
    q, k, v = qkv(params, x, config, positions=positions)
    return attention_out(params, attention_core(q, k, v, dropout_rate=config.dropout, key=key))


def mlp(params: Params, x: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """``gelu(x @ w1) @ w2`` with ``w1`` ``[d_model, d_ff]`` and ``w2`` ``[d_ff, d_model]``.

    GELU is the tanh approximation, as GPT-2. Column-parallel ``w1`` and
    row-parallel ``w2`` give a partial sum to reduce over ``tp``.
    """
    del config  # the same signature as the other pieces; nothing to read yet
    return F.gelu(x @ params["w1"], approximate="tanh") @ params["w2"]
