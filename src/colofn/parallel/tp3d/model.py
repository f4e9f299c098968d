"""``colofn.models.gpt`` under a 3D plan, per device: embedding, blocks, head and loss.

Every tensor is this rank's block (:func:`~colofn.parallel.tp3d.rules` and
:func:`~colofn.parallel.tp3d.batch_specs`). The residual stream is
``[batch / (dp p_w p_in), seq, d_model / p_out]`` between the pieces; each
piece is a pair of :func:`~colofn.parallel.tp3d.matmul` products (the second
flipped), so it returns the stream in the layout it took:

* attention: ``q, k, v`` by one product (rows over (weight, output), heads
  over input, whole sequences), attention on local heads, ``wo`` flipped;
* MLP: ``w1``, GELU, ``w2`` flipped;
* embedding: the flipped product of one-hot ids with ``embed.tok``
  ``[vocab, d_model]``: the table gathered along weight, a lookup of the ids
  in this rank's vocabulary block, reduce-scattered along input (the ids come
  in split over ``(dp..., weight)`` only, so they need no gather);
* head: the product with ``head`` (or ``tok.T``) gives logits with rows over
  (weight, output) and the vocabulary over input: the vocabulary-parallel
  cross-entropy of :mod:`colofn.parallel.tp.vocab` over input.

Parameters are first marked varying over ``dp`` (:func:`colofn._vma.vary_over`),
so their gradients are summed over ``dp`` at their own (sharded) size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import einsum

from colofn._vma import vary_over
from colofn.collectives import all_gather, psum, psum_scatter
from colofn.models import gpt
from colofn.parallel.plan import Plan
from colofn.parallel.tp.vocab import cross_entropy_sums, embed_partial
from colofn.parallel.tp3d.grid import Grid, grid
from colofn.parallel.tp3d.matmul import matmul, norm

__all__ = ["attention", "block", "embed", "head_sums", "local_loss", "mlp"]


Params = dict[str, Any]


def embed(params: Params, tokens: torch.Tensor, config: gpt.GPTConfig, plan: Plan) -> torch.Tensor:
    """Token (+ learned position) embeddings of ``tokens`` ``[batch / (dp p_w), seq]`` as the residual stream."""
    g, dp = grid(plan), plan.dp_axes
    # The flipped product of one-hot ids with the table; the ids are not split over output, so not gathered.
    tok = all_gather(vary_over(params["tok"], dp), g.wt, axis_dim=0, tiled=True)  # this input rank's vocabulary
    x = psum_scatter(embed_partial(tok, tokens, g.inp), g.inp, scatter_dimension=0, tiled=True)
    if config.pos == "learned":
        pos = vary_over(params["pos"], (*dp, g.inp, g.wt))  # sliced below: vary first, as parallel.gpt.embed
        x = x + pos[: x.shape[1]]
    return x


def attention(params: Params, h: torch.Tensor, config: gpt.GPTConfig, g: Grid, dp: tuple[str, ...]) -> torch.Tensor:
    """Causal self-attention of the normed stream ``h``; returns the branch in the stream's layout."""
    w = torch.stack([vary_over(params[n], dp) for n in ("wq", "wk", "wv")])  # [3, d/po, h/pi, hd/pw]
    qkv = matmul(h, w, g, op=lambda x, w: einsum(x, w, "b s d, t d h e -> t b h s e"), out_dim=1)
    q, k, v = qkv.unbind(0)  # [b / (dp pw po), heads / pi, s, hd]
    if config.pos == "rotary":
        pos = torch.arange(h.shape[1], device=h.device)
        q, k = gpt.rotary(q, pos, config.rope_base), gpt.rotary(k, pos, config.rope_base)
    o = gpt.attention_core(q, k, v)
    return matmul(o, vary_over(params["wo"], dp), g, flip=True, w_dim=1, op=lambda o, wo: einsum(o, wo, "b h s e, h e d -> b s d"))


def mlp(params: Params, h: torch.Tensor, g: Grid, dp: tuple[str, ...]) -> torch.Tensor:
    """``gelu(h @ w1) @ w2`` (tanh GELU, as ``gpt.mlp``) as two products; ``d_ff`` is over input between them."""
    a = F.gelu(matmul(h, vary_over(params["w1"], dp), g, w_dim=1), approximate="tanh")
    return matmul(a, vary_over(params["w2"], dp), g, flip=True, w_dim=0)


def block(layer: Params, x: torch.Tensor, config: gpt.GPTConfig, plan: Plan) -> torch.Tensor:
    """One pre-norm dense block on this rank's residual stream."""
    g, dp, eps, d = grid(plan), plan.dp_axes, config.norm_eps, config.d_model
    x = x + attention(layer["attn"], norm(layer["norm1"], x, g, eps, d), config, g, dp)
    return x + mlp(layer["mlp"], norm(layer["norm2"], x, g, eps, d), g, dp)


def head_sums(
    params: Params, x: torch.Tensor, targets: torch.Tensor, config: gpt.GPTConfig, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of token losses, token count)`` of this rank's targets ``[batch / (dp p_w p_out), seq]``, invariant along input."""
    g, dp = grid(plan), plan.dp_axes
    h = norm(params["final_norm"], x, g, config.norm_eps, config.d_model)
    w = vary_over(params["embed"]["tok"], dp).T if config.tie_embeddings else vary_over(params["head"], dp)
    return cross_entropy_sums(matmul(h, w, g, w_dim=1), targets, g.inp)


def local_loss(params: Params, batch: Mapping[str, torch.Tensor], config: gpt.GPTConfig, plan: Plan) -> torch.Tensor:
    """The step's loss on this rank's blocks, equal to ``gpt.loss`` of the whole batch (invariant on every rank)."""
    g = grid(plan)
    x = embed(params["embed"], batch["tokens"], config, plan)
    for layer in params["layers"]:
        x = block(layer, x, config, plan)
    nll, count = head_sums(params, x, batch["targets"], config, plan)
    nll, count = psum(torch.stack([nll, count]), (*plan.dp_axes, g.wt, g.out)).unbind(0)
    return nll / count
