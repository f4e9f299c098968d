"""GPTConfig validation, presets and parameter counts."""

import dataclasses

import pytest
import torch

from colofn import random, tree
from colofn.errors import ConfigError
from colofn.models import gpt


def test_presets_sizes():
    assert gpt.count_params(gpt.config("tiny")) < 50_000
    assert 200_000 < gpt.count_params(gpt.config("small")) < 1_000_000
    big = gpt.config("gpt2-124m")
    assert (big.vocab_size, big.seq_len, big.d_model, big.n_heads, big.n_layers, big.d_ff) == (
        50257,
        1024,
        768,
        12,
        12,
        3072,
    )
    # GPT-2 small's 124,439,808 less its 82,944 linear biases, which this model omits.
    assert gpt.count_params(big) == 124_439_808 - 82_944


def test_abstract_params_allocate_nothing_and_match_init():
    cfg = gpt.config("tiny", n_experts=4, moe_every=2, tie_embeddings=False, pos="rotary")
    abstract = gpt.abstract_params(cfg)
    real = gpt.init(random.key(0), cfg)
    assert tree.structure(abstract) == tree.structure(real)
    for a, r in zip(tree.leaves(abstract), tree.leaves(real), strict=True):
        assert a.device.type == "meta" and a.shape == r.shape and a.dtype == r.dtype


def test_config_is_frozen_and_is_moe():
    cfg = gpt.config("tiny", n_layers=4, n_experts=2, moe_every=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 8  # type: ignore[misc]
    assert [cfg.is_moe(i) for i in range(4)] == [False, True, False, True]
    assert not any(gpt.config("tiny").is_moe(i) for i in range(2))


def test_n_heads_must_divide_d_model():
    with pytest.raises(ConfigError) as e:
        gpt.GPTConfig(d_model=30, n_heads=4)
    assert str(e.value) == (
        "Invalid GPTConfig:\n"
        "  * n_heads=4 does not divide d_model=30; choose n_heads from 1, 2, 3, 5, 6, 10, 15, 30"
    )
    assert isinstance(e.value, ValueError)


def test_unknown_pos_lists_options():
    with pytest.raises(ConfigError) as e:
        gpt.config("tiny", pos="absolute")
    assert (
        str(e.value) == "Invalid GPTConfig:\n  * pos='absolute' is not one of 'learned', 'rotary'"
    )


def test_top_k_larger_than_n_experts():
    with pytest.raises(ConfigError) as e:
        gpt.config("tiny", n_experts=2, top_k=3)
    assert str(e.value) == "Invalid GPTConfig:\n  * top_k=3 is larger than n_experts=2"


def test_every_failure_reported_at_once():
    with pytest.raises(ConfigError) as e:
        gpt.GPTConfig(d_model=0, pos="alibi", norm="batchnorm", dropout=1.0, dtype=torch.int64)
    assert str(e.value) == (
        "Invalid GPTConfig:\n"
        "  * d_model=0 must be a positive int\n"
        "  * pos='alibi' is not one of 'learned', 'rotary'\n"
        "  * norm='batchnorm' is not one of 'layernorm', 'rmsnorm'\n"
        "  * dropout=1.0 must be in [0, 1)\n"
        "  * dtype=torch.int64 must be a floating torch.dtype"
    )


def test_rotary_needs_even_head_dim_and_capacity_positive():
    with pytest.raises(ConfigError) as e:
        gpt.GPTConfig(d_model=12, n_heads=4, pos="rotary", n_experts=2, capacity_factor=0.0)
    assert str(e.value) == (
        "Invalid GPTConfig:\n"
        "  * pos='rotary' needs an even head_dim, got d_model // n_heads = 3\n"
        "  * capacity_factor=0.0 must be > 0, or None to route every token"
    )


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError) as e:
        gpt.config("huge")
    assert str(e.value) == "Unknown preset 'huge'; the presets are 'tiny', 'small', 'gpt2-124m'"
    with pytest.raises(ConfigError) as e:
        gpt.config("tiny", d_modle=8)
    assert str(e.value) == (
        "config('tiny', ...) got fields GPTConfig does not have:\n"
        "  * 'd_modle' (did you mean 'd_model'?)"
    )


def test_overrides_are_validated():
    with pytest.raises(ConfigError, match="n_heads=5 does not divide d_model=32"):
        gpt.config("tiny", n_heads=5)
