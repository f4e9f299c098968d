"""Hugging Face models under colofn: ZeRO 1-3 with tensor parallelism, errors, and a gloo run.

The dp/tp/Megatron-SP equivalence over random configs and meshes is in
``property_tests/test_nn_hf_props.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import colofn  # noqa: E402
from colofn import optim, zero  # noqa: E402
from colofn import tree as jt  # noqa: E402
from colofn.nn import hf, parallelize, to_state_dict  # noqa: E402
from colofn.parallel import PlanError  # noqa: E402
from colofn.testing import assert_trees_close  # noqa: E402

SMALL = dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16)


def _reference_sgd(model, ids, steps, lr):
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_llama_tp_under_zero_stages_trains_like_one_device(stage):
    model = hf.build(hf.config("llama", **SMALL), seed=stage)
    ids = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(stage))
    opt = optim.sgd(0.1, momentum=0.9)

    def program():
        mesh = colofn.Mesh((2, 2), ("dp", "tp"))
        par = parallelize(model, hf.plan_for(model, tp="tp"), mesh)  # ZeRO owns dp
        state = zero.init(par.shard(), opt, mesh, axis="dp", stage=stage)
        losses = []
        for _ in range(3):
            state, info = zero.train_step(hf.causal_lm_loss(par, dp_mean=False), opt, state, hf.batch(ids))
            losses.append(float(info.loss))
        return losses, to_state_dict(par.module_params(zero.export_state(state)["params"]))

    losses, params = colofn.launch(program, world_size=4)[0]
    ref_losses, ref_params = _reference_sgd(model, ids, 3, 0.1)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_trees_close(params, ref_params, rtol=1e-4, atol=1e-6)


def test_llama_plan_errors_name_the_config_fields():
    model = hf.build(hf.config("llama", **{**SMALL, "num_key_value_heads": 1, "vocab_size": 15}))

    def program():
        parallelize(model, hf.plan_for(model, dp="dp", tp="tp"), colofn.Mesh((2,), ("tp",)))

    with pytest.raises(PlanError) as e:
        colofn.launch(program, world_size=2)
    text = str(e.value)
    assert "config.num_key_value_heads=1 is not divisible by tp=2; key/value heads are split over tp" in text
    assert "config.vocab_size=15 is not divisible by tp=2" in text
    assert "axis 'dp' is not a mesh axis; the mesh axes are ('tp',)" in text
    dropout = hf.build(hf.config("llama", **SMALL, attention_dropout=0.1))
    with pytest.raises(PlanError, match=r"config.attention_dropout=0.1: set it to 0.0"):
        hf.plan_for(dropout, tp="tp")


def _gloo_program(model, ids):
    mesh = colofn.Mesh((2,), ("tp",))
    plan = hf.plan_for(model, tp="tp", sp=True)
    loss_fn, par = hf.make_loss(model, plan, mesh)
    params = jt.map(torch.Tensor.requires_grad_, par.shard())
    loss = loss_fn(params, hf.batch(ids))
    grads = torch.autograd.grad(loss.to_local(), jt.leaves(params))
    return float(loss.to_local()), to_state_dict(par.module_params(jt.unflatten(jt.structure(params), grads)))


@pytest.mark.gloo
def test_llama_tp_megatron_sp_on_gloo_processes():
    model = hf.build(hf.config("llama", **SMALL), seed=1)
    ids = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(1))
    # world 2: each process imports transformers (seconds); dp adds nothing the simulated tests miss
    loss, grads = colofn.launch(_gloo_program, model, ids, world_size=2, backend="gloo", timeout=120)[0]
    ref = model(input_ids=ids, labels=ids).loss
    ref_grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(ref, list(model.parameters())), strict=True))
    assert loss == pytest.approx(float(ref), rel=1e-5)
    assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
