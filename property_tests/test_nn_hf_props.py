"""Hugging Face LLaMA and GPT-2 under colofn's plans equal the unmodified model on one device.

Hypothesis draws the model (LLaMA with grouped-query attention, tied or not;
GPT-2), a small config that fits the mesh (hidden size, heads, key/value heads,
layers, vocabulary, sequence length), the mesh (dp and tp sizes 1, 2 or 4) and
Megatron-SP on or off. The parallel loss and the gradient of every parameter
must equal ``model(input_ids=x, labels=x).loss`` (computed in float64: HF casts
the logits to float32 for it) and its ``torch.autograd.grad`` on one device; three AdamW steps (``colofn.optim`` on the mesh vs
``torch.optim.AdamW`` on the module) must stay equal. In float64, but HF's
RMSNorm and rotary embeddings compute in float32 inside, so differences of a few
float32 ulps are rounding (RTOL, ATOL); a wrong collective is off by whole factors.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

import colofn  # noqa: E402
from _nn_steps import loss_grads_and_adamw_steps  # noqa: E402  # a module of property_tests/ (on sys.path under pytest)
from colofn import optim  # noqa: E402
from colofn.nn import functionalize, hf, to_state_dict  # noqa: E402
from colofn.testing import assert_trees_close  # noqa: E402

EXAMPLES = max(2, settings.default.max_examples // 4)  # 3 under the quick profile, 75 under long
RTOL, ATOL = 1e-5, 1e-8


@st.composite
def setups(draw):
    kind = draw(st.sampled_from(["llama", "gpt2"]))
    dp = draw(st.sampled_from([1, 2]))
    tp = draw(st.sampled_from([s for s in (2, 1, 4) if dp * s <= 4]))
    sp = tp > 1 and draw(st.booleans())
    heads = tp * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([2, 4]))
    layers = draw(st.integers(1, 3))
    vocab = tp * draw(st.integers(3, 9))
    seq = tp * draw(st.integers(1, 3)) if sp else draw(st.integers(2, 6))
    over: dict = {"vocab_size": vocab}
    if kind == "llama":
        kv = tp * draw(st.sampled_from([d for d in (1, 2) if (heads // tp) % d == 0]))
        over.update(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv,
                    intermediate_size=tp * draw(st.integers(1, 4)), num_hidden_layers=layers,
                    max_position_embeddings=16, tie_word_embeddings=draw(st.booleans()))
    else:
        over.update(n_embd=heads * head_dim, n_head=heads, n_layer=layers, n_positions=16,
                    tie_word_embeddings=draw(st.booleans()))
    cfg = hf.config(kind, **over)
    seed = draw(st.integers(0, 2**16))
    return kind, cfg, {"dp": dp, "tp": tp}, sp, dp * draw(st.integers(1, 2)), seq, seed


def _mesh_axes(shape):
    return {a: n for a, n in shape.items() if n > 1} or {"dp": 1}


def _loss64(model, ids):
    """``model(input_ids=ids, labels=ids).loss`` without its cast of the logits to float32."""
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def _reference(model, ids, steps, lr):
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    loss = _loss64(model, ids)
    assert abs(float(loss) - float(model(input_ids=ids, labels=ids).loss)) < 1e-5  # HF's own loss, in float32
    grads = dict(zip(names, torch.autograd.grad(loss, params), strict=True))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        _loss64(model, ids).backward()
        opt.step()
    return float(loss), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("check", ["loss_and_grads", "adamw_steps"])
@settings(max_examples=EXAMPLES)
@given(setup=setups())
def test_hf_model_under_plan_equals_one_device(check, setup):
    kind, cfg, shape, sp, batch, seq, seed = setup
    model = hf.build(cfg, seed=seed, dtype=torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    steps = 3 if check == "adamw_steps" else 0
    axes = _mesh_axes(shape)

    def program():
        mesh = colofn.Mesh(tuple(axes.values()), tuple(axes))
        plan = hf.plan_for(model, dp="dp" if "dp" in axes else None, tp="tp" if "tp" in axes else None, sp=sp)
        loss_fn, par = hf.make_loss(model, plan, mesh)
        return loss_grads_and_adamw_steps(par, loss_fn, hf.batch(ids), steps, 1e-2)

    got = colofn.launch(program, world_size=math.prod(axes.values()))[0]
    ref_loss, ref_grads, ref_params = _reference(model, ids, steps, 1e-2)
    assert abs(got["loss"] - ref_loss) <= RTOL * abs(ref_loss)
    assert_trees_close(got["grads"], ref_grads, rtol=RTOL, atol=ATOL, what=f"{kind} gradient on {axes} sp={sp}")
    if steps:
        assert_trees_close(got["params"], ref_params, rtol=RTOL, atol=ATOL,
                           what=f"{kind} params after {steps} AdamW steps on {axes} sp={sp}")


@st.composite
def pipeline_setups(draw):
    kind = draw(st.sampled_from(["llama", "gpt2"]))
    schedule = draw(st.sampled_from(["gpipe", "1f1b"]))
    other = draw(st.sampled_from([("dp", 2), ("tp", 2), (None, 1)]))
    tp = other[1] if other[0] == "tp" else 1
    sp = tp > 1 and draw(st.booleans())
    heads, layers = 2 * draw(st.sampled_from([1, 2])), 2 * draw(st.integers(1, 2))
    over: dict = {"vocab_size": 2 * draw(st.integers(3, 6)), "tie_word_embeddings": False}
    if kind == "llama":
        over.update(hidden_size=heads * 2, num_attention_heads=heads, num_key_value_heads=heads // 2,
                    intermediate_size=4, num_hidden_layers=layers, max_position_embeddings=16)
        if over["num_key_value_heads"] % tp:
            over["num_key_value_heads"] = heads
    else:
        over.update(n_embd=heads * 2, n_head=heads, n_layer=layers, n_positions=16)
    mesh = {"pp": 2, **({other[0]: other[1]} if other[0] else {})}
    return kind, hf.config(kind, **over), mesh, sp, schedule, draw(st.integers(0, 2**16))


@settings(max_examples=max(2, EXAMPLES - 1))
@given(setup=pipeline_setups())
def test_hf_pipeline_over_layers_trains_like_one_device(setup):
    """pp=2 (model.layers cut into 2 stages) with dp or tp (+ Megatron-SP): two AdamW steps equal one device."""
    from colofn.train import hf as hft

    kind, cfg, shape, sp, schedule, seed = setup
    model = hf.build(cfg, seed=seed, dtype=torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (4, 4), generator=torch.Generator().manual_seed(seed))
    b = hf.batch(ids)

    def program():
        mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
        plan = hf.plan_for(model, dp="dp" if "dp" in shape else None, tp="tp" if "tp" in shape else None, sp=sp)
        opt = optim.adamw(1e-2, weight_decay=0.01)
        _, params = functionalize(model)
        trainer = hft.Pipelined(model, plan, mesh, opt, params, opt.init(params), schedule, 2)
        losses = [trainer.step(b) for _ in range(2)]
        return losses, to_state_dict(trainer.export()[0])

    losses, params = colofn.launch(program, world_size=math.prod(shape.values()))[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    ref_losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = _loss64(model, ids)
        loss.backward()
        opt.step()
        ref_losses.append(float(loss))
    assert losses == pytest.approx(ref_losses, rel=RTOL)
    assert_trees_close(params, {n: p.detach() for n, p in model.named_parameters()}, rtol=RTOL, atol=ATOL,
                       what=f"{kind} params after 2 pipelined AdamW steps on {shape} sp={sp} {schedule}")
