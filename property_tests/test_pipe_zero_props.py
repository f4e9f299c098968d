"""ZeRO inside pipeline stages, and mixture-of-experts stages, equal one device.

Random small GPTs (dense or MoE, with or without capacity dropping), meshes
within world 8 (``pp x dp``, with ``tp``, ``ep`` or a Ulysses/ring ``sp``
axis), schedules, microbatch counts and ZeRO stages 0-2 (over ``dp``,
``dp x sp`` or ``dp x ep``, experts over ``dp``): two AdamW steps of
:class:`~colofn.train.trainers.PipelineTrainer` against
:class:`~colofn.train.loop.SingleDevice` on the same batches. The losses of
both steps, then the exported parameters (the updates) and AdamW moments (the
gradients) must agree. A pipelined MoE model routes each microbatch on its
own, so the single device runs the same microbatches (the ``m``-th chunk of
each data rank's rows) and averages their losses.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import colofn
from colofn import tree as jt
from colofn.mesh import Mesh
from colofn.models import gpt
from colofn.train import TrainConfig, parse_mesh
from colofn.train.loop import SingleDevice, _microbatch_rows, make_optimizer
from colofn.train.trainers import PipelineTrainer

DENSE_MESHES = ["pp=2,dp=2", "dp=2,pp=2", "pp=2,dp=2,tp=2", "pp=2,dp=2,sp=2", "pp=2,sp=2,dp=2"]
MOE_MESHES = ["pp=2,dp=2", "pp=2,dp=2,ep=2", "pp=2,ep=2,dp=2", "pp=2,ep=2,tp=2"]


# ZeRO over several data axes inside the stages: dense weights over dp x sp / dp x ep, experts over dp.
SEVERAL_AXES = {0: ["pp=2,dp=2,sp=2", "pp=2,sp=2,dp=2"], 1: ["pp=2,dp=2,ep=2", "pp=2,ep=2,dp=2"]}


@st.composite
def runs(draw, several_axes=False):
    experts = draw(st.sampled_from([0, 2, 4]))
    if several_axes:
        mesh = draw(st.sampled_from(SEVERAL_AXES[bool(experts)]))
    else:
        mesh = draw(st.sampled_from(MOE_MESHES if experts else DENSE_MESHES))
    if "dp" not in mesh:  # --zero needs dp
        zero = None
    else:  # with sp or ep, ZeRO shards dense weights over dp x sp / dp x ep, experts over dp
        zero = draw(st.sampled_from([0, 1, 2] if not experts or several_axes else [None, 0, 1, 2]))
    sp = draw(st.sampled_from(["ulysses", "ring"])) if "sp" in mesh else "none"
    schedule = draw(st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv"]))
    stages = 2 * (2 if schedule in ("interleaved_1f1b", "zbv") else 1)
    layers = stages * (draw(st.sampled_from([1, 2])) if stages == 2 else 1)
    m = parse_mesh(mesh)
    microbatches = draw(st.sampled_from([2, 4]))
    data_ranks = m.get("dp", 1) * m.get("ep", 1)
    model = dict(
        vocab_size=64, seq_len=8, d_model=16, n_heads=2, n_layers=layers, d_ff=32, tie_embeddings=False,
    )
    if experts:
        model.update(n_experts=experts, moe_every=draw(st.sampled_from([1, 2])),
                     top_k=draw(st.sampled_from([1, 2])), capacity_factor=draw(st.sampled_from([None, 1.0])))
    return mesh, schedule, zero, microbatches, data_ranks * microbatches, model, sp


def program(mesh_text, schedule, zero, microbatches, batch_size, model, seed, sp="none"):
    cfg = TrainConfig(mesh=tuple(parse_mesh(mesh_text).items()), steps=2, warmup=0, lr=1e-2, batch_size=batch_size,
                      schedule=schedule, microbatches=microbatches, zero=zero, experts=model.get("n_experts", 0), sp=sp)
    mesh = Mesh(tuple(cfg.mesh_shape.values()), tuple(cfg.mesh_shape))
    mcfg = gpt.config("tiny", **model)
    opt = make_optimizer(cfg)
    params = gpt.init(colofn.random.key(seed), mcfg)
    state = opt.init(params)
    trainer = PipelineTrainer(mcfg, cfg.plan(), mesh, opt, params, state, schedule, microbatches, zero_stage=zero)
    single = SingleDevice(mcfg, opt, params, state, _microbatch_rows(cfg, mesh))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(cfg.steps):
        tokens = torch.randint(0, mcfg.vocab_size, (batch_size, mcfg.seq_len + 1), generator=gen)
        batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
        losses.append((trainer.step(batch), single.step(batch)))
    got_params, got_state = trainer.export()
    return losses, (got_params, got_state.mu, got_state.nu), (single.params, single.state.mu, single.state.nu)


@settings(max_examples=5)
@given(runs(), st.integers(0, 3))
def test_pipeline_zero_and_moe_steps_equal_single_device(run, seed):
    check(run, seed)


@settings(max_examples=5)
@given(runs(several_axes=True), st.integers(0, 3))
def test_pipeline_zero_over_dp_and_sp_or_ep_equals_single_device(run, seed):
    check(run, seed)


def check(run, seed):
    mesh, schedule, zero, microbatches, batch_size, model, sp = run
    world = dataclasses.replace(TrainConfig(), mesh=tuple(parse_mesh(mesh).items())).world_size
    losses, got, want = colofn.launch(program, mesh, schedule, zero, microbatches, batch_size, model, seed, sp,
                                      world_size=world)[0]
    for step, (par, one) in enumerate(losses):
        assert abs(par - one) < 1e-5, (step, par, one)
    # AdamW's update mu / sqrt(nu) turns float noise in a tiny gradient (an expert few tokens
    # reach) into up to ~1e-3 of a step (lr 1e-2) of a parameter: hence its absolute tolerance.
    for name, g, w, atol in zip(("params", "mu", "nu"), got, want, (1e-5, 1e-6, 1e-6), strict=True):
        for (path, a), b in zip(jt.leaves_with_path(g), jt.leaves(w), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=lambda m, p=path, n=name: f"{n}{jt.keystr(p)}: {m}")
