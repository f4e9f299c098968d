"""``GPTConfig``, the named presets and ``config(name, **overrides)``."""

from __future__ import annotations

import dataclasses
import difflib
import types
from typing import Literal, get_args

import torch

from colofn.errors import ConfigError, format_failures

__all__ = ["PRESETS", "GPTConfig", "Norm", "Pos", "config"]

Pos = Literal["learned", "rotary"]
Norm = Literal["layernorm", "rmsnorm"]


def _options(literal: object) -> str:
    return ", ".join(repr(o) for o in get_args(literal))


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The sizes and options of a decoder-only transformer.

    Every field is checked when the config is built; all failures are reported
    together in one :class:`colofn.errors.ConfigError`.

    Attributes:
        vocab_size: number of token ids (256 for the byte-level tokenizer).
        seq_len: the longest sequence :func:`apply` takes (the learned position table's size).
        d_model: width of the residual stream.
        n_heads: attention heads; must divide ``d_model``.
        n_layers: transformer blocks.
        d_ff: hidden width of the MLP (and of each MoE expert).
        pos: ``"learned"`` (a ``[seq_len, d_model]`` table added to the token
            embeddings, as GPT-2) or ``"rotary"`` (RoPE on queries and keys).
        norm: ``"layernorm"`` (scale and bias) or ``"rmsnorm"`` (scale only).
        norm_eps: epsilon of the norms.
        tie_embeddings: the output projection is the token embedding, transposed.
        dropout: dropout rate on the embeddings, the attention probabilities and
            both residual branches; applied only when :func:`apply` gets a key.
        rope_base: base of the rotary frequencies.
        n_experts: experts per MoE layer; ``0`` means every layer has a dense MLP.
        top_k: experts each token is sent to.
        moe_every: layer ``i`` is MoE when ``(i + 1) % moe_every == 0``
            (``1``: every layer; ``2``: every other layer, as GShard).
        aux_loss_coef: weight of the load-balancing loss in :func:`loss`.
        capacity_factor: ``None`` routes every token (exact, no token dropped);
            a number caps each expert at ``ceil(capacity_factor * tokens * top_k
            / n_experts)`` assignments and drops the rest (GShard/Switch).
        dtype: dtype of the parameters and activations.

    >>> GPTConfig(d_model=64, n_heads=4).head_dim
    16
    """

    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    pos: Pos = "learned"
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_base: float = 10000.0
    n_experts: int = 0
    top_k: int = 1
    moe_every: int = 1
    aux_loss_coef: float = 0.01
    capacity_factor: float | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        failures = _check(self)
        if failures:
            raise ConfigError(format_failures("Invalid GPTConfig:", failures))

    @property
    def head_dim(self) -> int:
        """``d_model // n_heads``."""
        return self.d_model // self.n_heads

    def is_moe(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) has a mixture of experts instead of a dense MLP.

        >>> [GPTConfig(n_layers=4, n_experts=4, moe_every=2).is_moe(i) for i in range(4)]
        [False, True, False, True]
        """
        return self.n_experts > 0 and (layer + 1) % self.moe_every == 0


def _check(c: GPTConfig) -> list[str]:
    failures = []
    bad = set()
    for name in (
        "vocab_size",
        "seq_len",
        "d_model",
        "n_heads",
        "n_layers",
        "d_ff",
        "moe_every",
        "top_k",
    ):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            failures.append(f"{name}={value!r} must be a positive int")
            bad.add(name)
    heads_ok = not bad & {"d_model", "n_heads"} and c.d_model % c.n_heads == 0
    if not bad & {"d_model", "n_heads"} and not heads_ok:
        divisors = ", ".join(str(d) for d in range(1, c.d_model + 1) if c.d_model % d == 0)
        failures.append(
            f"n_heads={c.n_heads} does not divide d_model={c.d_model}; "
            f"choose n_heads from {divisors}"
        )
    if c.pos not in get_args(Pos):
        failures.append(f"pos={c.pos!r} is not one of {_options(Pos)}")
    elif c.pos == "rotary" and heads_ok and c.head_dim % 2:
        failures.append(
            f"pos='rotary' needs an even head_dim, got d_model // n_heads = {c.head_dim}"
        )
    if c.norm not in get_args(Norm):
        failures.append(f"norm={c.norm!r} is not one of {_options(Norm)}")
    if not c.norm_eps > 0:
        failures.append(f"norm_eps={c.norm_eps!r} must be > 0")
    if not 0.0 <= c.dropout < 1.0:
        failures.append(f"dropout={c.dropout!r} must be in [0, 1)")
    if not isinstance(c.n_experts, int) or c.n_experts < 0:
        failures.append(f"n_experts={c.n_experts!r} must be an int >= 0 (0 means dense MLPs)")
    elif c.n_experts > 0 and "top_k" not in bad and c.top_k > c.n_experts:
        failures.append(f"top_k={c.top_k} is larger than n_experts={c.n_experts}")
    if c.aux_loss_coef < 0:
        failures.append(f"aux_loss_coef={c.aux_loss_coef!r} must be >= 0")
    if c.capacity_factor is not None and not c.capacity_factor > 0:
        failures.append(
            f"capacity_factor={c.capacity_factor!r} must be > 0, or None to route every token"
        )
    if not isinstance(c.dtype, torch.dtype) or not c.dtype.is_floating_point:
        failures.append(f"dtype={c.dtype!r} must be a floating torch.dtype")
    return failures


PRESETS: types.MappingProxyType[str, GPTConfig] = types.MappingProxyType(
    {
        # ~35K parameters: for unit tests.
        "tiny": GPTConfig(vocab_size=256, seq_len=32, d_model=32, n_heads=4, n_layers=2, d_ff=128),
        # ~470K parameters: a visible loss decrease on the shipped corpus in a CPU minute.
        "small": GPTConfig(vocab_size=256, seq_len=64, d_model=96, n_heads=4, n_layers=4, d_ff=384),
        # GPT-2 small's sizes (124,356,864 parameters: GPT-2 less its linear biases).
        "gpt2-124m": GPTConfig(
            vocab_size=50257, seq_len=1024, d_model=768, n_heads=12, n_layers=12, d_ff=3072
        ),
    }
)


def config(name: str, **overrides: object) -> GPTConfig:
    """The preset ``name`` with some fields replaced.

    Args:
        name: a key of :data:`PRESETS`.
        **overrides: fields of :class:`GPTConfig` to change.

    Raises:
        ConfigError: an unknown preset or field, or a resulting config that is invalid.

    >>> config("tiny", pos="rotary").pos
    'rotary'
    >>> config("tiny", n_experts=4, top_k=2).is_moe(0)
    True
    """
    if name not in PRESETS:
        raise ConfigError(
            f"Unknown preset {name!r}; the presets are {', '.join(repr(p) for p in PRESETS)}"
        )
    fields = [f.name for f in dataclasses.fields(GPTConfig)]
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise ConfigError(
            format_failures(
                f"config({name!r}, ...) got fields GPTConfig does not have:",
                [f"{k!r}{_did_you_mean(k, fields)}" for k in unknown],
            )
        )
    return dataclasses.replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
