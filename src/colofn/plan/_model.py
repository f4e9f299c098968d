"""Model shapes the planner reasons about: the colofn GPT presets and published large models.

A :class:`ModelShape` is only sizes. Parameter counts are split into the part
tensor parallelism shards (attention and MLP matrices, the vocabulary-parallel
embedding and head) and the part every tp rank replicates (norms, the learned
position table), exactly as :func:`colofn.parallel.param_specs` places the
colofn GPT.

>>> m = model("gpt2-124m")
>>> m.params
124356864
>>> model("llama-7b").params / 1e9  # Touvron et al. 2023 report "6.7B"
6.738415616
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal

from colofn.errors import ConfigError

__all__ = ["MODELS", "ModelShape", "from_gpt", "model"]


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer.

    Attributes:
        name: how tables name it.
        n_layers, d_model, n_heads, d_ff, vocab_size, seq_len: the usual sizes
            (``seq_len`` is the training sequence length).
        n_kv_heads: key/value heads (grouped-query attention); ``None``: ``n_heads``.
        gated_mlp: SwiGLU (three ``d_model x d_ff`` matrices) instead of two.
        norm_params: parameters of one norm (``2 * d_model`` LayerNorm, ``d_model`` RMSNorm).
        learned_pos: a ``seq_len x d_model`` position table (GPT-2), else rotary.
        tie_embeddings: the head is the token embedding.
        n_experts, top_k, moe_every: mixture of experts (colofn's GPT): layer ``i``
            is MoE when ``(i + 1) % moe_every == 0``, with ``n_experts`` MLPs of
            two ``d_model x d_ff`` matrices and a ``d_model x n_experts`` router;
            each token goes to ``top_k`` of them. ``n_experts = 0``: dense.
        activation_layout: what a layer keeps for the backward: ``"korthikanti"``
            (Megatron-LM as Korthikanti et al. 2022 count it: dropout masks, the
            softmax materialized, sequence-parallel matmul inputs kept sharded) or
            ``"colofn"`` (colofn's GPT without dropout: SDPA keeps only its
            log-sum-exp, gathered matmul inputs kept whole; see
            :func:`~colofn.plan.colofn_activation_bytes_per_layer`).
        source: where the sizes come from.
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    vocab_size: int
    seq_len: int
    n_kv_heads: int | None = None
    gated_mlp: bool = False
    norm_params: int | None = None
    learned_pos: bool = False
    tie_embeddings: bool = True
    n_experts: int = 0
    top_k: int = 1
    moe_every: int = 1
    activation_layout: Literal["korthikanti", "colofn"] = "korthikanti"
    source: str = ""

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def _norm(self) -> int:
        return 2 * self.d_model if self.norm_params is None else self.norm_params

    @property
    def moe_layers(self) -> int:
        """How many blocks are mixture-of-experts."""
        return self.n_layers // self.moe_every if self.n_experts else 0

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (its two matrices)."""
        return 2 * self.d_model * self.d_ff

    @property
    def attn_params(self) -> int:
        h, hd = self.d_model, self.d_model // self.n_heads
        return 2 * h * h + 2 * h * self.kv_heads * hd

    @property
    def layer_tp_params(self) -> int:
        """Matrix parameters of one dense block (what tensor parallelism shards)."""
        return self.attn_params + (3 if self.gated_mlp else 2) * self.d_model * self.d_ff

    @property
    def tp_params(self) -> int:
        """All parameters tensor parallelism shards: blocks, embedding and (untied) head (MoE: every expert)."""
        emb = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        moe = self.moe_layers * (self.attn_params + self.n_experts * self.expert_params - self.layer_tp_params)
        return self.n_layers * self.layer_tp_params + moe + emb

    @property
    def pos_params(self) -> int:
        """The learned position table's parameters (0 with rotary positions)."""
        return self.seq_len * self.d_model if self.learned_pos else 0

    @property
    def replicated_params(self) -> int:
        """Parameters every tp rank holds whole: norms, the learned position table (and MoE routers)."""
        return (2 * self.n_layers + 1) * self._norm + self.pos_params + self.moe_layers * self.d_model * self.n_experts

    @property
    def params(self) -> int:
        """Total parameters (tied embeddings counted once)."""
        return self.tp_params + self.replicated_params

    def flops_per_token(self) -> float:
        """Training FLOPs per token: ``6 * params`` plus attention scores, ``12 * L * s * h``.

        Kaplan et al. 2020 (section 2.1) count ``2N + 2 L s d`` forward FLOPs per
        token; training is three times the forward (backward = 2x forward).
        With experts, ``N`` counts the ``top_k`` experts a token visits.
        """
        idle = self.moe_layers * (self.n_experts - self.top_k) * self.expert_params  # experts a token skips
        return 6 * (self.params - idle) + 12 * self.n_layers * self.seq_len * self.d_model


def from_gpt(config: object, name: str = "gpt") -> ModelShape:
    """The shape of a :class:`colofn.models.gpt.GPTConfig` (dense models only).

    >>> from colofn.models import gpt
    >>> from_gpt(gpt.config("tiny")).params == gpt.count_params(gpt.config("tiny"))
    True
    """
    c = config
    if getattr(c, "n_experts", 0) and getattr(c, "capacity_factor", None) is not None:
        raise ConfigError(f"the planner models mixture-of-experts without a capacity factor ({name}: "
                          f"capacity_factor={c.capacity_factor})")  # type: ignore[attr-defined]
    return ModelShape(
        name=name, n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff,  # type: ignore[attr-defined]
        vocab_size=c.vocab_size, seq_len=c.seq_len,  # type: ignore[attr-defined]
        norm_params=(2 if c.norm == "layernorm" else 1) * c.d_model,  # type: ignore[attr-defined]
        learned_pos=c.pos == "learned", tie_embeddings=c.tie_embeddings,  # type: ignore[attr-defined]
        activation_layout="colofn" if not c.dropout else "korthikanti",  # type: ignore[attr-defined]
        n_experts=c.n_experts, top_k=c.top_k, moe_every=c.moe_every,  # type: ignore[attr-defined]
        source="colofn.models.gpt.PRESETS",
    )


def _published() -> dict[str, ModelShape]:
    return {
        # Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1 (GPT-3 175B:
        # n_layers 96, d_model 12288, n_heads 96, context 2048); d_ff = 4 d_model; GPT-2 BPE vocabulary.
        "gpt3-175b": ModelShape("gpt3-175b", 96, 12288, 96, 4 * 12288, 50257, 2048, learned_pos=True,
                                source="Brown et al. 2020, Table 2.1"),
        # Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models", Table 2
        # (6.7B: dim 4096, 32 heads, 32 layers; 2048 context); d_ff 11008 and vocab 32000 from the
        # released params.json/tokenizer; SwiGLU, RMSNorm, RoPE, untied head.
        "llama-7b": ModelShape("llama-7b", 32, 4096, 32, 11008, 32000, 2048, gated_mlp=True,
                               norm_params=4096, tie_embeddings=False, source="Touvron et al. 2023, Table 2"),
        # Touvron et al. 2023b, "Llama 2", Table 1 and section 2.2 (70B: 80 layers, dim 8192, 64 heads,
        # GQA with 8 key/value heads, 4096 context); d_ff 28672 from the released config.
        "llama-70b": ModelShape("llama-70b", 80, 8192, 64, 28672, 32000, 4096, n_kv_heads=8, gated_mlp=True,
                                norm_params=8192, tie_embeddings=False, source="Touvron et al. 2023b, Table 1"),
    }


def _models() -> dict[str, ModelShape]:
    from colofn.models.gpt import PRESETS

    out = {name: from_gpt(c, name) for name, c in PRESETS.items()}
    out.update(_published())
    return out


MODELS: types.MappingProxyType[str, ModelShape] = types.MappingProxyType(_models())


def model(name: str) -> ModelShape:
    """The model named ``name`` (a key of :data:`MODELS`)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; the planner knows {', '.join(MODELS)}")
    return MODELS[name]


def gpt_config(m: ModelShape, element: int = 4) -> Any:
    """A :class:`colofn.models.gpt.GPTConfig` of ``m``'s shape (for the volume formulas of the tp grids).

    ``element``: bytes per parameter and activation element (4: fp32, 2: bf16).
    """
    import torch

    from colofn.models import gpt

    return gpt.config("tiny", n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads, d_ff=m.d_ff,
                      vocab_size=m.vocab_size, seq_len=m.seq_len, tie_embeddings=m.tie_embeddings,
                      pos="learned" if m.learned_pos else "rotary",
                      norm="layernorm" if m._norm == 2 * m.d_model else "rmsnorm",
                      dtype=torch.float32 if element == 4 else torch.bfloat16)
