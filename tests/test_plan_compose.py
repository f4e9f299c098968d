"""colofn.plan on the compositions colofn train runs beyond the basic ones: ZeRO inside pipeline stages,
ZeRO over several data axes (dp x sp, dp x ep), experts inside pipeline stages. Predicted bytes per
(collective, axis, phase) equal comm_trace, and model-state bytes equal what ``colofn train`` reports."""

from __future__ import annotations

from collections import Counter

import pytest

import colofn
from colofn import random
from colofn.models import gpt
from colofn.plan import Candidate, from_gpt
from colofn.plan._comm import step_collectives
from colofn.plan._memory import FP32_ADAM, model_state_bytes
from colofn.train import TrainConfig, parse_mesh
from colofn.train.loop import make_optimizer, rank_program

TRAIN_CFG = gpt.config("tiny", tie_embeddings=False)  # what `colofn train --preset tiny` builds


def _pairs(text):
    return tuple(parse_mesh(text).items())


def _world(text):
    n = 1
    for v in parse_mesh(text).values():
        n *= v
    return n


def _traced(records):
    out: Counter = Counter()
    for r in records:
        if r.op in ("send", "recv") and len(r.shape) != 3:  # the schedule's metadata (a few ints): not predicted
            continue
        out[(r.op, "+".join(r.axes), r.phase)] += r.bytes_sent
    return out


def _predicted(mcfg, cand, batch, stage=0, **kw):
    out: Counter = Counter()
    for c in step_collectives(from_gpt(mcfg), cand, global_batch=batch, precision=FP32_ADAM, stage=stage, **kw):
        out[(c.op, c.axis, c.phase)] += c.bytes_sent
    return out


def _batch(mcfg, b):
    t = random.randint(random.key(1), (b, mcfg.seq_len + 1), 0, mcfg.vocab_size)
    return {"tokens": t[:, :-1], "targets": t[:, 1:]}


def _pipeline_zero_program(mesh_text, sp, zero, microbatches, b):
    from colofn.train.trainers import PipelineTrainer

    shape = parse_mesh(mesh_text)
    mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
    cfg = TrainConfig(preset="tiny", mesh=tuple(shape.items()), zero=zero, sp=sp)
    opt = make_optimizer(cfg)
    params = gpt.init(random.key(0), TRAIN_CFG)
    trainer = PipelineTrainer(TRAIN_CFG, cfg.plan(), mesh, opt, params, opt.init(params), "1f1b", microbatches,
                              zero_stage=zero)
    with colofn.comm_trace() as records:
        trainer.step(_batch(TRAIN_CFG, b))
    return _traced(records), mesh.axis_index("pp")


@pytest.mark.parametrize(("mesh", "sp", "zero"), [("pp=2,dp=2", "none", 0), ("pp=2,dp=2", "none", 1),
                                                  ("pp=2,dp=2", "none", 2), ("pp=2,dp=2,tp=2", "megatron", 1)])
def test_zero_inside_pipeline_stages_bytes_per_collective_equal_comm_trace(mesh, sp, zero):
    cand = Candidate(_pairs(mesh), sp=sp, zero=zero, microbatches=2)
    for traced, stage in colofn.launch(_pipeline_zero_program, mesh, sp, zero, 2, 8, world_size=_world(mesh)):
        want = _predicted(TRAIN_CFG, cand, 8, stage)
        assert traced - Counter() == want - Counter(), (stage, traced, want)


@pytest.mark.parametrize(("mesh", "zero"), [("pp=2,dp=2", 1), ("pp=2,dp=2", 2), ("pp=2,dp=2", 0)])
def test_zero_inside_pipeline_stages_model_state_bytes_equal_what_colofn_train_reports(mesh, zero, tmp_path):
    cfg = TrainConfig(preset="tiny", mesh=_pairs(mesh), steps=1, warmup=1, zero=zero, batch_size=8, microbatches=2,
                      out=str(tmp_path))
    record = colofn.launch(rank_program, cfg, world_size=cfg.world_size)[0]
    predicted = model_state_bytes(from_gpt(cfg.model_config()), Candidate(cfg.mesh, zero=zero, microbatches=2), FP32_ADAM)
    assert predicted == max(record["bytes_per_rank"][-1])
