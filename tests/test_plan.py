"""colofn.plan: predictions equal what colofn measures (model-state bytes, bytes per collective)."""

from __future__ import annotations

from collections import Counter

import pytest

import colofn
from colofn import random, tree
from colofn.models import gpt
from colofn.parallel import Plan, make_value_and_grad, param_specs, shard_params
from colofn.plan import Candidate, from_gpt
from colofn.plan._comm import step_collectives
from colofn.plan._memory import FP32_ADAM, model_state_bytes
from colofn.train import TrainConfig, parse_mesh
from colofn.train.loop import make_optimizer, rank_program
from colofn.train.trainers import ZeroTrainer

TRAIN_CFG = gpt.config("tiny", tie_embeddings=False)  # what `colofn train --preset tiny` builds


def _mesh(text):
    return tuple(parse_mesh(text).items())


@pytest.mark.parametrize("name", ["tiny", "small", "gpt2-124m"])
def test_shapes_count_the_presets_parameters_and_split_them_as_param_specs(name):
    cfg = gpt.config(name, tie_embeddings=name != "small")
    shape = from_gpt(cfg)
    assert shape.params == gpt.count_params(cfg)
    specs = param_specs(cfg, Plan(tp="tp"))
    leaves = zip(tree.leaves(gpt.abstract_params(cfg)), tree.leaves(specs), strict=True)
    sharded = sum(p.numel() for p, s in leaves if any(a is not None for a in s))
    assert (shape.tp_params, shape.replicated_params) == (sharded, shape.params - sharded)


@pytest.mark.parametrize(("mesh", "zero"), [
    ("dp=2", None), ("dp=2", 1), ("dp=2", 2), ("dp=2", 3), ("tp=2", None), ("dp=2,tp=2", 1),
    ("dp=2,tp=2", 3), ("pp=2,dp=2", None), ("pp=2,tp=2", None),
])
def test_model_state_bytes_equal_what_colofn_train_reports(mesh, zero, tmp_path):
    cfg = TrainConfig(preset="tiny", mesh=_mesh(mesh), steps=1, warmup=1, zero=zero, batch_size=8, out=str(tmp_path))
    record = colofn.launch(rank_program, cfg, world_size=cfg.world_size)[0]
    predicted = model_state_bytes(from_gpt(cfg.model_config()), Candidate(cfg.mesh, zero=zero), FP32_ADAM)
    assert predicted == max(record["bytes_per_rank"][-1])


def _traced(records):
    out: Counter = Counter()
    for r in records:
        out[(r.op, "+".join(r.axes), r.phase)] += r.bytes_sent
    return out


def _predicted(cand, batch):
    out: Counter = Counter()
    for c in step_collectives(from_gpt(TRAIN_CFG), cand, global_batch=batch, precision=FP32_ADAM):
        out[(c.op, c.axis, c.phase)] += c.bytes_sent
    return out


def _batch(b):
    t = random.randint(random.key(1), (b, TRAIN_CFG.seq_len + 1), 0, TRAIN_CFG.vocab_size)
    return {"tokens": t[:, :-1], "targets": t[:, 1:]}


def _dense_program(mesh_text, sp, b):
    shape = parse_mesh(mesh_text)
    mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
    plan = Plan(dp="dp" if "dp" in shape else None, tp="tp" if "tp" in shape else None, sp=sp)
    params = shard_params(gpt.init(random.key(0), TRAIN_CFG), TRAIN_CFG, plan, mesh)
    with colofn.comm_trace() as records:
        make_value_and_grad(TRAIN_CFG, plan, mesh)(params, _batch(b))
    return _traced(records)


@pytest.mark.parametrize(("mesh", "sp"), [("dp=2", "none"), ("tp=2", "none"), ("tp=2", "megatron"),
                                          ("dp=2,tp=2", "none"), ("dp=2,tp=2", "megatron")])
def test_bytes_per_collective_equal_comm_trace(mesh, sp):
    n = 1
    for v in parse_mesh(mesh).values():
        n *= v
    got = colofn.launch(_dense_program, mesh, sp, 4, world_size=n)
    want = _predicted(Candidate(_mesh(mesh), sp=sp), 4)
    assert all(g == want for g in got), (got[0], want)


def _zero_program(mesh_text, stage, b):
    shape = parse_mesh(mesh_text)
    mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
    cfg = TrainConfig(preset="tiny", mesh=tuple(shape.items()), zero=stage)
    opt = make_optimizer(cfg)
    params = gpt.init(random.key(0), TRAIN_CFG)
    trainer = ZeroTrainer(TRAIN_CFG, cfg.plan(), mesh, opt, params, opt.init(params), stage)
    with colofn.comm_trace() as records:
        trainer.step(_batch(b))
    return _traced(records)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_bytes_per_collective_equal_comm_trace(stage):
    got = colofn.launch(_zero_program, "dp=2", stage, 4, world_size=2)
    want = _predicted(Candidate(_mesh("dp=2"), zero=stage), 4)
    assert all(g == want for g in got), (got[0], want)
