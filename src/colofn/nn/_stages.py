"""Pipeline stages of Hugging Face causal LMs: ``model.layers`` (GPT-2: ``transformer.h``) cut into ranges.

A stage runs, on this thread's planned copy of the model (see
:func:`colofn.nn.parallelize`), the embedding (first stage), its decoder
layers, and the final norm and head (last stage), calling the model's own
submodules: the model's source is not edited, but the loop over the layers is
colofn's, so the stage code knows each supported architecture's wiring
(``embed_tokens`` -> rotary position embeddings -> ``layers[i](h, ...)`` ->
``norm`` -> ``lm_head`` for LLaMA; ``wte + wpe`` -> ``h[i](h)`` -> ``ln_f`` ->
``lm_head`` for GPT-2). Attention is causal with no padding mask.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.nn.utils import stateless

from colofn.collectives import psum
from colofn.errors import format_failures
from colofn.nn._functionalize import from_state_dict, to_state_dict
from colofn.nn._plan import Parallelized
from colofn.parallel import tp as tp_regions
from colofn.parallel.plan import PlanError

__all__ = ["check_stages", "merge_stages", "stage_loss", "stage_of", "stage_params", "stage_forward"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
_FIRST = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe)\.")
_LAST = re.compile(r"^(?:lm_head\.|(?:model\.)?norm\.|(?:transformer\.)?ln_f\.)")


def n_layers(config: Any) -> int:
    return int(config.num_hidden_layers if config.model_type == "llama" else config.n_layer)


def check_stages(model: Any, n_stages: int) -> None:
    """Raise a :class:`PlanError` if ``model`` cannot be cut into ``n_stages`` pipeline stages."""
    config = getattr(model, "config", None)
    failures = []
    if config is None or getattr(config, "model_type", None) not in ("llama", "gpt2"):
        kind = repr(config.model_type) if config is not None and hasattr(config, "model_type") else "a module without a Hugging Face config"
        failures.append(
            f"shipped pipeline stages cover Hugging Face model_type 'llama' and 'gpt2', not {kind}; for another "
            "stack, write its stage functions and run them with colofn.pipeline.Pipeline (docs/pipeline.md)"
        )
    else:
        n = n_layers(config)
        if n % n_stages:
            failures.append(f"{n} layers do not split evenly into {n_stages} stages; pick a layer count divisible by {n_stages}")
        if getattr(config, "tie_word_embeddings", False) and n_stages > 1:
            failures.append(
                "the embedding is tied to the head (config.tie_word_embeddings=True), so the first and the last "
                "stage would share one parameter; untie it: tie_word_embeddings=False"
            )
    if failures:
        raise PlanError(format_failures(f"{type(model).__name__} cannot be pipelined into {n_stages} stages:", failures))


def stage_of(name: str, ranges: list[range]) -> int:
    """The stage holding the dotted parameter ``name``."""
    m = _LAYER.search(name)
    if m:
        i = int(m.group(1))
        return next(s for s, r in enumerate(ranges) if i in r)
    if _FIRST.search(name):
        return 0
    if _LAST.search(name):
        return len(ranges) - 1
    raise PlanError(f"cannot place parameter {name!r} in a pipeline stage")


def stage_params(tree: Any, ranges: list[range]) -> list[Any]:
    """Split a parameter-shaped tree into per-stage trees (the inverse of :func:`merge_stages`)."""
    flat = to_state_dict(tree)
    out: list[dict[str, Any]] = [{} for _ in ranges]
    for name, t in flat.items():
        out[stage_of(name, ranges)][name] = t
    return [from_state_dict(d) for d in out]


def merge_stages(per_stage: list[Any]) -> Any:
    """Per-stage trees -> one tree in the model's parameter order."""
    flat: dict[str, Any] = {}
    for t in per_stage:
        flat.update(to_state_dict(t))
    return from_state_dict(dict(sorted(flat.items(), key=lambda kv: _order(kv[0]))))


def _order(name: str) -> tuple[int, int, str]:
    m = _LAYER.search(name)
    if m:
        return (1, int(m.group(1)), "")
    return (0 if _FIRST.search(name) else 2, 0, name)


def stage_forward(par: Parallelized, params: Any, x: torch.Tensor, layers: range, *, first: bool, last: bool) -> torch.Tensor:
    """Per-device forward of the stage holding ``layers``: the next stage's activations, or the logits on the last."""
    fn = par.apply
    sk = fn.skeleton()  # type: ignore[attr-defined]
    plan, config = par.plan, sk.config
    tp_size = par.mesh.shape[plan.tp] if plan.tp else 1
    flat = to_state_dict(params)
    with stateless._reparametrize_module(sk, flat, tie_weights=True):
        if config.model_type == "llama":
            base = sk.model
            h = base.embed_tokens(x) if first else x
            seq = h.shape[1] * (tp_size if plan.sp and not first else 1)
            pos = torch.arange(seq, device=h.device).unsqueeze(0)
            pe = base.rotary_emb(h, pos)
            for i in layers:
                h = base.layers[i](h, attention_mask=None, position_ids=pos, position_embeddings=pe)
                h = h[0] if isinstance(h, tuple) else h
            return sk.lm_head(base.norm(h)) if last else h
        base = sk.transformer
        if first:
            pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
            h = base.drop(base.wte(x) + base.wpe(pos))
        else:
            h = x
        for i in layers:
            h = base.h[i](h)
            h = h[0] if isinstance(h, tuple) else h
        return sk.lm_head(base.ln_f(h)) if last else h


def stage_loss(par: Parallelized, logits: torch.Tensor, targets: torch.Tensor, dp: tuple[str, ...]) -> torch.Tensor:
    """The mean cross-entropy of a microbatch from the last stage's (vocabulary-parallel) logits."""
    nll, count = tp_regions.cross_entropy_sums(logits, targets, par.plan.tp)
    if dp:
        nll, count = psum(nll, dp), psum(count, dp)
    return nll / count


