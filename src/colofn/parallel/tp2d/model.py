"""The GPT's pieces under a 2D (Optimus) or 2.5D (Tesseract) plan: per-device code on grid blocks.

Layout on rank ``(i, j)`` of the ``row x col`` grid (and depth ``z`` under 2.5D):

* the residual stream ``[b, s, d_model]``: batch over ``(dp, row, depth)``,
  ``d_model`` over ``col`` (block ``[b / (dp q z), s, d_model / q]``);
* every weight matrix ``[k, n]``: ``k`` over ``row``, ``n`` over ``col``
  (``wq``/``wk``/``wv`` ``[d, heads, hd]``: ``d`` and heads; ``wo``
  ``[heads, hd, d]``: heads and ``d``); the token table ``[vocab, d]``
  likewise; norms and the position table: ``d`` over ``col``.

Linear layers are :func:`~colofn.parallel.tp2d.summa.matmul`; attention runs on
whole sequences of the rank's batch rows and its ``heads / q`` heads; norms sum
their statistics over ``col``; the logits stay split by vocabulary over
``col`` and the loss is the vocabulary-parallel one of ``colofn.parallel.tp``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from colofn._vma import vary_over
from colofn.collectives import psum
from colofn.models import gpt
from colofn.models.gpt._layers import upcast
from colofn.parallel.plan import Plan
from colofn.parallel.tp import cross_entropy_sums
from colofn.parallel.tp2d.summa import Grid, matmul, matmul_nt, panel, weight_panel
from colofn.partition_spec import P, PartitionSpec

__all__ = ["attention", "block", "embed", "head_sums", "mlp", "norm", "rules"]

Params = dict[str, Any]


def rules(plan: Plan) -> dict[str, PartitionSpec]:
    """The ``{path pattern: spec}`` rules of a 2D / 2.5D plan (the depth and data axes replicate every weight).

    >>> for pattern, spec in rules(Plan(tp_mode="2d", tp_grid=("r", "c"))).items():
    ...     print(f"{pattern:18} {spec}")
    embed.tok          P('r', 'c')
    embed.pos          P(None, 'c')
    layers.*.norm*     P('c')
    layers.*.attn.wq   P('r', 'c')
    layers.*.attn.wk   P('r', 'c')
    layers.*.attn.wv   P('r', 'c')
    layers.*.attn.wo   P('r', None, 'c')
    layers.*.mlp.w1    P('r', 'c')
    layers.*.mlp.w2    P('r', 'c')
    final_norm.*       P('c')
    head               P('r', 'c')
    """
    g = Grid.of(plan)
    r, c = g.row, g.col
    return {
        "embed.tok": P(r, c),  # vocabulary over rows, d_model over columns (and the tied head: A B^T)
        "embed.pos": P(None, c),
        "layers.*.norm*": P(c),
        "layers.*.attn.wq": P(r, c),  # d_model over rows, heads over columns
        "layers.*.attn.wk": P(r, c),
        "layers.*.attn.wv": P(r, c),
        "layers.*.attn.wo": P(r, None, c),  # heads over rows, d_model over columns
        "layers.*.mlp.w1": P(r, c),
        "layers.*.mlp.w2": P(r, c),
        "final_norm.*": P(c),
        "head": P(r, c),
    }


def norm(params: Params, x: torch.Tensor, config: gpt.GPTConfig, plan: Plan) -> torch.Tensor:
    """LayerNorm / RMSNorm of ``x`` ``[..., d_model / q]``: the statistics summed over ``col`` (two or one all-reduce of ``[..., 1]``)."""
    g = Grid.of(plan)
    p = {k: vary_over(v, g.token_axes) for k, v in params.items()}
    wide = upcast(x)
    d = config.d_model
    if config.norm == "layernorm":
        centred = wide - psum(wide.sum(-1, keepdim=True), g.col) / d
        var = psum(centred.pow(2).sum(-1, keepdim=True), g.col) / d
        return (centred * torch.rsqrt(var + config.norm_eps)).to(x.dtype) * p["scale"] + p["bias"]
    ms = psum(wide.pow(2).sum(-1, keepdim=True), g.col) / d
    return (wide * torch.rsqrt(ms + config.norm_eps)).to(x.dtype) * p["scale"]


def embed(params: Params, tokens: torch.Tensor, config: gpt.GPTConfig, plan: Plan) -> torch.Tensor:
    """Embeddings of this rank's token rows, ``d_model`` split over ``col``: the table's column panel gathered over ``row``."""
    g = Grid.of(plan)
    x = F.embedding(tokens, weight_panel(params["tok"], g))
    if config.pos == "learned":
        x = x + vary_over(params["pos"], g.token_axes)[: tokens.shape[-1]]
    return x


def attention(params: Params, x: torch.Tensor, config: gpt.GPTConfig, plan: Plan) -> torch.Tensor:
    """Causal self-attention: SUMMA projections, then whole sequences of this rank's heads ``n_heads / q``."""
    g = Grid.of(plan)
    xp = panel(x, g)  # one gather of the row panel for q, k and v
    q, k, v = gpt.qkv({w: weight_panel(params[w], g) for w in ("wq", "wk", "wv")}, xp, config)
    o = panel(gpt.attention_core(q, k, v).transpose(1, 2), g, dim=2)  # all heads [b, s, heads, hd]
    wo = weight_panel(params["wo"], g)  # [heads, hd, d / q]
    return o.flatten(2) @ wo.flatten(0, 1)


def mlp(params: Params, x: torch.Tensor, config: gpt.GPTConfig, plan: Plan) -> torch.Tensor:
    """``gelu(x @ w1) @ w2`` as two SUMMA products."""
    g = Grid.of(plan)
    return matmul(F.gelu(matmul(x, params["w1"], g), approximate="tanh"), params["w2"], g)


def block(layer: Params, x: torch.Tensor, config: gpt.GPTConfig, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm block on this rank's block of the residual stream; ``(x, zero aux loss)`` (dense only)."""
    x = x + attention(layer["attn"], norm(layer["norm1"], x, config, plan), config, plan)
    x = x + mlp(layer["mlp"], norm(layer["norm2"], x, config, plan), config, plan)
    return x, torch.zeros((), device=x.device)


def head_sums(
    params: Params, x: torch.Tensor, targets: torch.Tensor, config: gpt.GPTConfig, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of token losses, token count)`` of this rank's token rows, invariant along the grid's columns.

    The logits ``[..., vocab / q]`` are split by vocabulary over ``col``: the
    head is a SUMMA product (untied) or ``x tok^T`` (tied); the loss is
    vocabulary-parallel over ``col``.
    """
    g = Grid.of(plan)
    h = norm(params["final_norm"], x, config, plan)
    if config.tie_embeddings:
        logits = matmul_nt(h, params["embed"]["tok"], g)
    else:
        logits = matmul(h, params["head"], g)
    return cross_entropy_sums(logits, targets, g.col)
