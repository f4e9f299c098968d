"""A decoder-only transformer (GPT-2 style, optional RoPE, RMSNorm and mixture of experts).

The model is pure functions over a parameter pytree of nested dicts of tensors;
randomness (init, dropout) comes only from explicit :mod:`colofn.random` keys.
Every piece (``embed``, ``qkv``, ``attention_core``, ``attention_out``, ``mlp``,
``moe``, ``block``, ``final_norm_and_logits``, ``cross_entropy``) takes its own
weights, so tensor-, sequence-, pipeline- and expert-parallel code composes
them on local shards. ``docs/models.md`` lists the parameter layout.

>>> import torch
>>> from colofn import random
>>> from colofn.models import gpt
>>> cfg = gpt.config("tiny")
>>> params = gpt.init(random.key(0), cfg)
>>> tokens = random.randint(random.key(1), (2, 9), 0, cfg.vocab_size)
>>> logits = gpt.apply(params, tokens[:, :-1], cfg)
>>> logits.shape
torch.Size([2, 8, 256])
>>> loss = gpt.loss(params, {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}, cfg)
>>> grads = torch.func.grad(gpt.loss)(params, {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}, cfg)
>>> grads["layers"][1]["mlp"]["w2"].shape
torch.Size([128, 32])
"""

from colofn.models.gpt._config import PRESETS, GPTConfig, Norm, Pos, config
from colofn.models.gpt._layers import (
    attention,
    attention_core,
    attention_out,
    dropout,
    embed,
    mlp,
    norm,
    qkv,
    rotary,
)
from colofn.models.gpt._model import (
    apply,
    block,
    cross_entropy,
    final_norm_and_logits,
    forward,
    head_weight,
    loss,
)
from colofn.models.gpt._moe import Routing, moe, route
from colofn.models.gpt._params import abstract_params, count_params, init

__all__ = [
    "PRESETS",
    "GPTConfig",
    "Norm",
    "Pos",
    "Routing",
    "abstract_params",
    "apply",
    "attention",
    "attention_core",
    "attention_out",
    "block",
    "config",
    "count_params",
    "cross_entropy",
    "dropout",
    "embed",
    "final_norm_and_logits",
    "forward",
    "head_weight",
    "init",
    "loss",
    "mlp",
    "moe",
    "norm",
    "qkv",
    "rotary",
    "route",
]
