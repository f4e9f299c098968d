"""Plans for Hugging Face LLaMA and GPT-2, and for stacks of ``nn.TransformerEncoderLayer``.

The plans are data (:class:`~colofn.nn.ModulePlan`): which parameters are split
over ``tp`` and which submodules get a forward-side change. Nothing here imports
``transformers``; the plans read the model's ``config``.

* LLaMA (grouped-query attention, RoPE, SwiGLU, RMSNorm): ``q/k/v_proj`` and
  ``gate/up_proj`` column parallel (heads and ``intermediate_size`` over ``tp``;
  the attention reshapes with ``-1`` heads, so local head counts need no
  change), ``o_proj`` and ``down_proj`` row parallel, the embedding and
  ``lm_head`` split by vocabulary (vocabulary-parallel cross-entropy).
* GPT-2: its ``Conv1D`` weights are ``[in, out]`` (transposed against
  ``nn.Linear``), so column parallel splits dim 1 and row parallel dim 0;
  ``c_attn`` packs q, k and v along dim 1, carried as ``(3, n_embd)`` so each is
  split over ``tp``; the attention's ``split_size`` and ``num_heads`` become local.
* ``nn.TransformerEncoderLayer`` stacks: the self-attention's packed
  ``in_proj`` carried as ``(3, d_model)`` rows and split by heads (column
  parallel), ``out_proj`` row parallel, the attention run as a functional
  computation with ``nhead / tp`` local heads; the MLP (``linear1`` column,
  ``linear2`` row) over ``tp``. ``batch_first`` either way.

With ``sp=True`` (Megatron-SP over ``tp``) the residual stream between
the first and the last block is split along the sequence: norms run on
``1/tp`` of the tokens, each region opens with an all-gather and closes with a
reduce-scatter. The embedding and the final norm stay on whole sequences.
"""

from __future__ import annotations

import re
import threading
import typing
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from colofn.collectives import psum
from colofn.errors import format_failures
from colofn.mesh import Mesh
from colofn.nn._plan import ModulePlan, Parallelized, Rewrite, parallelize
from colofn.parallel import tp as tp_regions
from colofn.parallel.plan import PlanError
from colofn.partition_spec import P, PartitionSpec
from colofn.shard_map import shard_map

__all__ = ["PRESETS", "batch", "batch_specs", "build", "causal_lm_loss", "config", "encoder", "gpt2", "llama", "make_loss", "plan_for"]

_ANY = r"(?:.*\.)?"
IGNORE = -100


def _seq_ends(layers: str, n: int, sp: bool) -> tuple[tuple[str, Rewrite], ...]:
    if not sp:
        return ()
    return (
        (rf"{_ANY}{layers}\.0", Rewrite("split_seq")),
        (rf"{_ANY}{layers}\.{n - 1}", Rewrite("gather_seq")),
    )


def llama(config: Any, *, dp: str | tuple[str, ...] | None = None, tp: str | None = None, sp: bool = False) -> ModulePlan:
    """The plan of a Hugging Face ``LlamaForCausalLM`` (or ``LlamaModel``) with ``config``.

    >>> from types import SimpleNamespace
    >>> plan = llama(SimpleNamespace(num_hidden_layers=2), dp="dp", tp="tp")
    >>> plan.spec_for("model.layers.1.self_attn.k_proj.weight"), plan.spec_for("model.layers.1.mlp.down_proj.weight")
    (P('tp'), P(None, 'tp'))
    >>> plan.spec_for("model.layers.1.input_layernorm.weight")
    P()
    """
    rules: tuple[tuple[str, PartitionSpec], ...] = (
        (rf"{_ANY}embed_tokens\.weight", P(tp)),  # vocabulary parallel
        (rf"{_ANY}self_attn\.[qkv]_proj\.(weight|bias)", P(tp)),  # column parallel: heads
        (rf"{_ANY}self_attn\.o_proj\.weight", P(None, tp)),  # row parallel
        (rf"{_ANY}mlp\.(gate|up)_proj\.(weight|bias)", P(tp)),  # column parallel: intermediate
        (rf"{_ANY}mlp\.down_proj\.weight", P(None, tp)),  # row parallel
        (r"lm_head\.weight", P(tp)),  # vocabulary-parallel logits
    )
    rewrites: tuple[tuple[str, Rewrite], ...] = ()
    if tp is not None:
        rewrites = (
            (rf"{_ANY}embed_tokens", Rewrite("vocab_embed")),
            (rf"{_ANY}self_attn\.o_proj", Rewrite("row")),
            (rf"{_ANY}mlp\.down_proj", Rewrite("row")),
            (rf"{_ANY}layers\.\d+\.(input|post_attention)_layernorm", Rewrite("enter")),
        ) + _seq_ends("layers", config.num_hidden_layers, sp)
    checks = (
        ("config.num_attention_heads", "attention heads"),
        ("config.num_key_value_heads", "key/value heads"),
        ("config.vocab_size", "the vocabulary rows of the embedding and the logits"),
        ("config.intermediate_size", "the MLP's intermediate columns"),
    )
    return ModulePlan(rules=rules, rewrites=rewrites, dp=dp, tp=tp, sp=sp, checks=checks, name="the LLaMA plan")


def gpt2(config: Any, *, dp: str | tuple[str, ...] | None = None, tp: str | None = None, sp: bool = False) -> ModulePlan:
    """The plan of a Hugging Face ``GPT2LMHeadModel`` (or ``GPT2Model``) with ``config``.

    >>> from types import SimpleNamespace
    >>> plan = gpt2(SimpleNamespace(n_layer=2), tp="tp")
    >>> plan.spec_for("transformer.h.0.attn.c_attn.weight"), plan.spec_for("transformer.h.0.mlp.c_proj.weight")
    (P(None, None, 'tp'), P('tp'))
    """
    rules: tuple[tuple[str, PartitionSpec], ...] = (
        (rf"{_ANY}wte\.weight", P(tp)),
        (rf"{_ANY}attn\.c_attn\.weight", P(None, None, tp)),  # [in, (q k v), out]
        (rf"{_ANY}attn\.c_attn\.bias", P(None, tp)),
        (rf"{_ANY}attn\.c_proj\.weight", P(tp)),  # Conv1D [in, out]: row parallel splits dim 0
        (rf"{_ANY}mlp\.c_fc\.weight", P(None, tp)),  # column parallel splits dim 1
        (rf"{_ANY}mlp\.c_fc\.bias", P(tp)),
        (rf"{_ANY}mlp\.c_proj\.weight", P(tp)),
        (r"lm_head\.weight", P(tp)),  # untied (tie_word_embeddings=False): vocabulary-parallel logits
    )
    rewrites: tuple[tuple[str, Rewrite], ...] = ()
    packed: tuple[tuple[str, int, int], ...] = ()
    if tp is None:
        rules = ()  # the packed layout and its specs exist for tp only
    else:
        packed = ((rf"{_ANY}attn\.c_attn\.(weight|bias)", -1, 3),)
        rewrites = (
            (rf"{_ANY}wte", Rewrite("vocab_embed")),
            (rf"{_ANY}attn\.c_attn", Rewrite("packed")),
            (rf"{_ANY}h\.\d+\.attn", Rewrite("local", ("split_size", "num_heads", "embed_dim"))),
            (rf"{_ANY}mlp\.c_fc", Rewrite("local", ("nf",))),  # Conv1D shapes its output with nf
            (rf"{_ANY}(attn|mlp)\.c_proj", Rewrite("row")),
            (rf"{_ANY}h\.\d+\.ln_[12]", Rewrite("enter")),
        ) + _seq_ends("h", config.n_layer, sp)
    checks = (
        ("config.n_head", "attention heads"),
        ("config.vocab_size", "the vocabulary rows of the embedding and the logits"),
        ("config.n_inner", "the MLP's inner columns"),
    )
    return ModulePlan(rules=rules, rewrites=rewrites, packed=packed, dp=dp, tp=tp, sp=sp, checks=checks, name="the GPT-2 plan")


def encoder(
    *, dp: str | tuple[str, ...] | None = None, tp: str | None = None, sp: bool = False,
    layers: tuple[str, ...] = (), batch_first: bool = True,
) -> ModulePlan:
    """A plan for modules built of ``nn.TransformerEncoderLayer``s: attention and MLP over ``tp``.

    The self-attention's packed ``in_proj_weight`` ``[3 * d_model, d_model]`` is
    carried as ``[3, d_model, d_model]`` and split over ``tp`` by heads (each
    rank holds its heads' q, k and v rows), ``out_proj`` row parallel, the
    attention run with ``num_heads / tp`` local heads; ``linear1`` column and
    ``linear2`` row parallel. Torch's and the user's module source are unchanged:
    the plan rewrites the forward of colofn's private copy.

    Args:
      dp, tp, sp: the data axis, the tensor axis, Megatron-SP over ``tp``.
      layers: the dotted paths of the encoder layers in order (as
        :func:`plan_for` finds them); needed for ``sp=True``, whose sequence
        split begins at the first and ends after the last. Modules between them
        must act on each token alone.
      batch_first: the layers' layout (``[batch, seq, d]`` or ``[seq, batch, d]``).

    >>> plan = encoder(tp="tp")
    >>> plan.spec_for("layers.3.linear2.weight"), plan.spec_for("layers.3.self_attn.in_proj_weight")
    (P(None, 'tp'), P(None, 'tp'))
    """
    failures = []
    if sp and tp is None:
        failures.append("sp=True splits the sequence over the tp axis, but tp is None; set tp=...")
    if sp and not layers:
        failures.append("sp=True needs layers=(the encoder layers' dotted paths, in order): use hf.plan_for(model, ...)")
    if failures:
        raise PlanError(format_failures("cannot plan the nn.TransformerEncoderLayer stack:", failures))
    pre = "(?:" + "|".join(re.escape(f"{n}.") if n else "" for n in layers) + ")" if layers else _ANY
    if tp is None:
        return ModulePlan(dp=dp, name="the TransformerEncoderLayer plan")  # dp alone: nothing is split or rewritten
    seq = 1 if batch_first else 0
    rules = (
        (rf"{pre}self_attn\.in_proj_(weight|bias)", P(None, tp)),  # carried [3, d_model(, d_model)]: heads over tp
        (rf"{pre}self_attn\.out_proj\.weight", P(None, tp)),  # row parallel
        (rf"{pre}linear1\.(weight|bias)", P(tp)),
        (rf"{pre}linear2\.weight", P(None, tp)),
    )
    rewrites: tuple[tuple[str, Rewrite], ...] = (
        (rf"{pre}self_attn", Rewrite("mha", dim=seq)),
        (rf"{pre}linear1", Rewrite("enter_input", dim=seq)),
        (rf"{pre}linear2", Rewrite("row", dim=seq)),
    )
    if sp:
        rewrites += ((re.escape(layers[0]), Rewrite("split_seq", dim=seq)), (re.escape(layers[-1]), Rewrite("gather_seq", ("invariant",), dim=seq)))
    return ModulePlan(rules=rules, rewrites=rewrites, packed=((rf"{pre}self_attn\.in_proj_(weight|bias)", 0, 3),),
                      dp=dp, tp=tp, sp=sp, name="the TransformerEncoderLayer plan")  # parallelize checks the heads against tp


def _encoder_plan(model: nn.Module, dp: str | tuple[str, ...] | None, tp: str | None, sp: bool) -> ModulePlan:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.TransformerEncoderLayer)]
    firsts = {m.self_attn.batch_first for _, m in layers}
    if len(firsts) > 1:
        raise PlanError(
            f"cannot plan {type(model).__name__}: its nn.TransformerEncoderLayers mix batch_first=True and False "
            "(the sequence dim must be the same in every layer); build them with one layout"
        )
    return encoder(dp=dp, tp=tp, sp=sp, layers=tuple(n for n, _ in layers), batch_first=firsts.pop())


def plan_for(model: nn.Module, *, dp: str | tuple[str, ...] | None = None, tp: str | None = None, sp: bool = False) -> ModulePlan:
    """The shipped plan for ``model``: by ``model.config.model_type`` (``"llama"``, ``"gpt2"``), or an encoder stack."""
    config: Any = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    failures = []
    if kind == "llama":
        if getattr(config, "attention_dropout", 0.0):
            failures.append(f"config.attention_dropout={config.attention_dropout}: set it to 0.0 (dropout is not reproduced across ranks)")
        if getattr(config, "pretraining_tp", 1) != 1:
            failures.append(f"config.pretraining_tp={config.pretraining_tp}: set it to 1")
        plan = llama(config, dp=dp, tp=tp, sp=sp)
    elif kind == "gpt2":
        plan = gpt2(config, dp=dp, tp=tp, sp=sp)
    elif config is None and any(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules()):
        return _encoder_plan(model, dp, tp, sp)
    else:
        failures.append(
            f"no shipped plan for {type(model).__name__} (model_type={kind!r}); the shipped plans are "
            "Hugging Face 'llama' and 'gpt2', and nn.TransformerEncoderLayer stacks: write a colofn.nn.ModulePlan"
        )
        plan = ModulePlan()
    if failures:
        raise PlanError(format_failures(f"cannot plan {type(model).__name__}:", failures))
    return plan


# ----------------------------------------------------------------------------- causal LM loss


def batch(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"tokens": input_ids, "targets": the next token, -100 at the end}``: what ``labels=input_ids`` trains on.

    >>> batch(torch.tensor([[5, 6, 7]]))["targets"].tolist()
    [[6, 7, -100]]
    """
    ends = torch.full_like(input_ids[:, :1], IGNORE)
    return {"tokens": input_ids, "targets": torch.cat([input_ids[:, 1:], ends], dim=1)}


def _dp_axes(dp: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if dp is None else (dp,) if isinstance(dp, str) else tuple(dp)


def causal_lm_loss(par: Parallelized, *, dp_mean: bool = True) -> Any:
    """The per-device mean next-token cross-entropy of a causal LM under its plan (call inside ``shard_map``).

    Equals ``model(input_ids=tokens, labels=tokens).loss`` of the whole batch. The
    logits stay split by vocabulary over ``tp`` (vocabulary-parallel cross-entropy).
    With ``dp_mean=False`` it is this rank's mean (for :mod:`colofn.zero`, which
    takes the mean over the data axis itself).
    """
    plan = par.plan
    dp = _dp_axes(plan.dp) if dp_mean else ()

    def loss(params: Any, b: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = par.apply(params, input_ids=b["tokens"], use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        nll, count = tp_regions.cross_entropy_sums(logits, b["targets"], plan.tp)
        if dp:
            nll, count = psum(nll, dp), psum(count, dp)
        return nll / count

    return loss


def batch_specs(plan: ModulePlan) -> dict[str, PartitionSpec]:
    """Specs of ``{"tokens", "targets"}``: the batch dim over ``dp``, whole sequences."""
    spec = P(plan.dp) if plan.dp else P()
    return {"tokens": spec, "targets": spec}


def make_loss(model: nn.Module, plan: ModulePlan, mesh: Mesh | None = None) -> tuple[Any, Parallelized]:
    """``(loss, par)``: ``loss(params, batch)`` the global causal-LM loss (a replicated DTensor) of ``model`` under ``plan``.

    ``params`` are ``par.params`` (global tensors) or ``par.shard()`` (DTensors);
    ``batch`` is :func:`batch` of the input ids.
    """
    par = parallelize(model, plan, mesh)
    mapped = shard_map(causal_lm_loss(par), mesh=par.mesh, in_specs=(par.specs, batch_specs(plan)), out_specs=P())
    return mapped, par


# ----------------------------------------------------------------------------- models from configs (no download)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "llama": {
        "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        "small": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128),
    },
    "gpt2": {
        "tiny": dict(vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=64),
        "small": dict(vocab_size=256, n_embd=128, n_layer=4, n_head=8, n_positions=128),
    },
}
"""Size presets of ``colofn train --hf llama|gpt2`` (a byte-level vocabulary of 256)."""

_NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "llama": dict(attention_dropout=0.0)}


def config(kind: str, preset: str = "tiny", **overrides: Any) -> Any:
    """A ``transformers`` config for ``kind`` (``"llama"``, ``"gpt2"``) at ``preset`` size, dropout off.

    Needs ``transformers`` (``pip install colofn[hf]``); nothing is downloaded.
    """
    import transformers

    if kind not in PRESETS:
        raise PlanError(f"unknown Hugging Face model kind {kind!r}; the kinds are {', '.join(PRESETS)}")
    if preset not in PRESETS[kind]:
        raise PlanError(f"unknown {kind} preset {preset!r}; the presets are {', '.join(PRESETS[kind])}")
    cls = transformers.LlamaConfig if kind == "llama" else transformers.GPT2Config
    values = {**PRESETS[kind][preset], **_NO_DROPOUT[kind], "bos_token_id": None, "eos_token_id": None,
              "pad_token_id": None, **overrides}
    return cls(**values)


_GLOBAL_RNG = threading.Lock()


def build(config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM (``LlamaForCausalLM`` / ``GPT2LMHeadModel``) from ``config``, randomly initialised from ``seed``.

    The same ``seed`` gives the same weights in every rank, thread or process.
    """
    import transformers

    cls = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel}[config.model_type]
    with _GLOBAL_RNG:  # HF initialises from torch's global generator, which simulated ranks (threads) share
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = cls(config)
        finally:
            torch.random.set_rng_state(state)
    return typing.cast(nn.Module, model).to(dtype)
