"""Mixture of experts: routing against a naive per-token loop, capacity, the aux loss, and the MoE model."""

import math

import pytest
import torch
import torch.nn.functional as F

from colofn import random, tree
from colofn.models import gpt


def _cfg(**kw):
    return gpt.GPTConfig(d_model=16, n_heads=2, d_ff=24, n_experts=4, dtype=torch.float64, **kw)


def _moe_params(cfg, seed=0):
    e, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff
    k = random.split(random.key(seed), 3)
    return {
        "router": random.normal(k[0], (d, e), torch.float64),
        "w1": random.normal(k[1], (e, d, f), torch.float64) / math.sqrt(d),
        "w2": random.normal(k[2], (e, f, d), torch.float64) / math.sqrt(f),
    }


def _naive(params, x, cfg):
    """One token at a time; capacity counted in GShard's order (all first choices, then seconds)."""
    tokens = x.reshape(-1, x.shape[-1])
    n, e = tokens.shape[0], cfg.n_experts
    choices = []
    for t in range(n):
        probs = torch.softmax(tokens[t] @ params["router"], -1)
        order = sorted(range(e), key=lambda i: -float(probs[i]))[: cfg.top_k]
        choices.append([(i, probs[i]) for i in order])
    capacity = (
        n * cfg.top_k
        if cfg.capacity_factor is None
        else math.ceil(cfg.capacity_factor * n * cfg.top_k / e)
    )
    used, keep = [0] * e, {}
    for j in range(cfg.top_k):
        for t in range(n):
            i = choices[t][j][0]
            keep[t, j] = used[i] < capacity
            used[i] += 1
    out = torch.zeros_like(tokens)
    for t in range(n):
        for j, (i, gate) in enumerate(choices[t]):
            if keep[t, j]:
                h = F.gelu(tokens[t] @ params["w1"][i], approximate="tanh") @ params["w2"][i]
                out[t] += gate * h
    return out.reshape(x.shape)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_matches_naive_loop(top_k):
    cfg = _cfg(top_k=top_k)
    params = _moe_params(cfg)
    x = random.normal(random.key(1), (3, 5, 16), torch.float64)
    y, _ = gpt.moe(params, x, cfg)
    torch.testing.assert_close(y, _naive(params, x, cfg))


@pytest.mark.parametrize(("top_k", "capacity_factor"), [(1, 0.5), (2, 0.75), (2, 1.0)])
def test_capacity_drops_like_gshard(top_k, capacity_factor):
    cfg = _cfg(top_k=top_k, capacity_factor=capacity_factor)
    params = _moe_params(cfg, seed=2)
    x = random.normal(random.key(3), (2, 9, 16), torch.float64)
    y, _ = gpt.moe(params, x, cfg)
    torch.testing.assert_close(y, _naive(params, x, cfg))
    r = gpt.route(params["router"], x.reshape(-1, 16), cfg)
    capacity = math.ceil(capacity_factor * 18 * top_k / 4)
    kept = torch.bincount(r.expert_index[r.keep], minlength=4)
    assert int(kept.max()) <= capacity and not bool(r.keep.all())


def test_large_capacity_is_no_capacity():
    x = random.normal(random.key(4), (2, 6, 16), torch.float64)
    params = _moe_params(_cfg(top_k=2))
    a, _ = gpt.moe(params, x, _cfg(top_k=2))
    b, _ = gpt.moe(params, x, _cfg(top_k=2, capacity_factor=4.0))
    torch.testing.assert_close(a, b)


def test_aux_loss_formula():
    cfg = _cfg(top_k=2)
    params = _moe_params(cfg, seed=5)
    x = random.normal(random.key(6), (10, 16), torch.float64)
    r = gpt.route(params["router"], x, cfg)
    probs = torch.softmax(x @ params["router"], -1)
    counts = torch.zeros(4, dtype=torch.float64)
    for t in range(10):
        for i in probs[t].topk(2).indices.tolist():
            counts[i] += 1
    expected = 4 * ((counts / 20) * probs.mean(0)).sum()
    torch.testing.assert_close(r.aux_loss, expected)
    torch.testing.assert_close(r.gates, probs.topk(2).values)


def test_aux_loss_by_hand():
    """Two experts, top-1: both tokens pick expert 1 with probabilities 3/4 and 1/2 + eps."""
    cfg = gpt.GPTConfig(d_model=2, n_heads=1, n_experts=2, dtype=torch.float64)
    router = torch.tensor([[0.0, math.log(3)], [0.0, 1e-9]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    r = gpt.route(router, x, cfg)
    assert r.expert_index.tolist() == [[1], [1]]
    # f = (0, 1); P_1 = (3/4 + 1/2) / 2; aux = 2 * P_1.
    torch.testing.assert_close(r.aux_loss, torch.tensor(1.25, dtype=torch.float64))
    balanced = gpt.route(torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
                         torch.tensor([[1.0, -1.0], [1.0, 1.0]], dtype=torch.float64), cfg)  # fmt: skip
    assert balanced.expert_index.tolist() == [[0], [1]]
    torch.testing.assert_close(balanced.aux_loss, torch.tensor(1.0, dtype=torch.float64))


def test_expert_weights_split_on_dim_0():
    """Expert parallel: each rank's experts give the sum of the tokens routed to them."""
    cfg = _cfg(top_k=2)
    params = _moe_params(cfg, seed=7)
    x = random.normal(random.key(8), (12, 16), torch.float64)
    full, _ = gpt.moe(params, x, cfg)
    r = gpt.route(params["router"], x, cfg)
    total = torch.zeros_like(x)
    for lo in (0, 2):  # two ranks holding experts [0, 2) and [2, 4)
        for e in range(lo, lo + 2):
            tok, slot = torch.nonzero(r.expert_index == e, as_tuple=True)
            h = gpt.mlp({"w1": params["w1"][e], "w2": params["w2"][e]}, x[tok], cfg)
            total = total.index_add(0, tok, h * r.gates[tok, slot, None])
    torch.testing.assert_close(total, full)


def test_moe_model_layout_loss_and_gradients():
    cfg = gpt.config("tiny", n_layers=4, n_experts=4, top_k=2, moe_every=2, aux_loss_coef=0.5)
    params = gpt.init(random.key(0), cfg)
    assert ["moe" in layer for layer in params["layers"]] == [False, True, False, True]
    assert params["layers"][1]["moe"]["w1"].shape == (4, 32, 128)
    assert params["layers"][1]["moe"]["router"].shape == (32, 4)
    t = random.randint(random.key(1), (4, 17), 0, 256)
    batch = {"tokens": t[:, :-1], "targets": t[:, 1:]}
    logits, aux = gpt.forward(params, batch["tokens"], cfg)
    assert 2.0 <= float(aux) <= 8.0  # two MoE layers, each in [1, n_experts]
    ce = gpt.cross_entropy(logits, batch["targets"])
    torch.testing.assert_close(gpt.loss(params, batch, cfg), ce + 0.5 * aux)
    grads = torch.func.grad(gpt.loss)(params, batch, cfg)
    for path, g in tree.leaves_with_path(grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, tree.keystr(path)
