"""colofn.plan on the compositions colofn train runs beyond the basic ones: ZeRO inside pipeline stages,
ZeRO over several data axes (dp x sp, dp x ep), experts inside pipeline stages. Predicted bytes per
(collective, axis, phase) equal comm_trace, and model-state bytes equal what ``colofn train`` reports."""

from __future__ import annotations

from collections import Counter

import pytest

import colofn
from colofn.models import gpt
from colofn.plan import Candidate, from_gpt, trainer_step_bytes
from colofn.plan._comm import step_collectives
from colofn.plan._memory import FP32_ADAM, model_state_bytes
from colofn.train import TrainConfig, parse_mesh
from colofn.train.loop import rank_program

TRAIN_CFG = gpt.config("tiny", tie_embeddings=False)  # what `colofn train --preset tiny` builds


def _pairs(text):
    return tuple(parse_mesh(text).items())


def _world(text):
    n = 1
    for v in parse_mesh(text).values():
        n *= v
    return n


def _predicted(mcfg, cand, batch, stage=0, **kw):
    out: Counter = Counter()
    for c in step_collectives(from_gpt(mcfg), cand, global_batch=batch, precision=FP32_ADAM, stage=stage, **kw):
        out[(c.op, c.axis, c.phase)] += c.bytes_sent
    return out


def _step_program(mesh_text, sp, zero, microbatches, b, experts=0):
    mcfg = TrainConfig(preset="tiny", experts=experts).model_config()
    return trainer_step_bytes(mcfg, _pairs(mesh_text), b, sp=sp, zero=zero, microbatches=microbatches)


# ZeRO 1-2 in stages, ZeRO over dp x sp and dp x ep, experts in stages: also for random small GPTs in
# property_tests/test_plan_props.py; here one case of each, and what the property does not draw.
@pytest.mark.parametrize(("mesh", "sp", "zero"), [("pp=2,dp=2", "none", 0), ("pp=2,dp=2", "none", 2),
                                                  ("pp=2,dp=2,tp=2", "megatron", 1)])
def test_zero_inside_pipeline_stages_bytes_per_collective_equal_comm_trace(mesh, sp, zero):
    cand = Candidate(_pairs(mesh), sp=sp, zero=zero, microbatches=2)
    for traced, stage, _ in colofn.launch(_step_program, mesh, sp, zero, 2, 8, world_size=_world(mesh)):
        want = _predicted(TRAIN_CFG, cand, 8, stage)
        assert traced - Counter() == want - Counter(), (stage, traced, want)


@pytest.mark.parametrize(("mesh", "zero"), [("pp=2,dp=2", 1), ("pp=2,dp=2", 2), ("pp=2,dp=2", 0)])
def test_zero_inside_pipeline_stages_model_state_bytes_equal_what_colofn_train_reports(mesh, zero, tmp_path):
    cfg = TrainConfig(preset="tiny", mesh=_pairs(mesh), steps=1, warmup=1, zero=zero, batch_size=8, microbatches=2,
                      out=str(tmp_path))
    record = colofn.launch(rank_program, cfg, world_size=cfg.world_size)[0]
    predicted = model_state_bytes(from_gpt(cfg.model_config()), Candidate(cfg.mesh, zero=zero, microbatches=2), FP32_ADAM)
    assert predicted == max(record["bytes_per_rank"][-1])


@pytest.mark.parametrize(("mesh", "sp", "zero", "experts"), [
    ("dp=2,sp=2", "ulysses", 3, 0), ("dp=2,sp=2", "ring", 1, 0),  # one group: dp x sp
    ("dp=2,ep=2", "none", 3, 4),  # two: dense over dp x ep, experts over dp
    ("dp=2", "none", 1, 4),  # experts over dp alone: one bucket per block
])
def test_zero_over_several_data_axes_bytes_per_collective_equal_comm_trace(mesh, sp, zero, experts):
    mcfg = TrainConfig(preset="tiny", experts=experts).model_config()
    cand = Candidate(_pairs(mesh), sp=sp, zero=zero)
    for traced, _, rooms in colofn.launch(_step_program, mesh, sp, zero, 1, 8, experts, world_size=_world(mesh)):
        assert traced == _predicted(mcfg, cand, 8, ep_rooms=rooms or None)


@pytest.mark.parametrize(("mesh", "zero", "microbatches"), [("pp=2,ep=2", None, 4)])
def test_experts_inside_pipeline_stages_bytes_per_collective_equal_comm_trace(mesh, zero, microbatches):
    mcfg = TrainConfig(preset="tiny", experts=4).model_config()
    cand = Candidate(_pairs(mesh), zero=zero, microbatches=microbatches)
    for traced, stage, rooms in colofn.launch(_step_program, mesh, "none", zero, microbatches, 8, 4,
                                              world_size=_world(mesh)):
        want = _predicted(mcfg, cand, 8, stage, ep_rooms=rooms or None)
        assert traced - Counter() == want - Counter(), (stage, traced, want)


@pytest.mark.parametrize(("mesh", "sp", "zero", "experts", "microbatches"), [
    ("dp=2,sp=2", "ulysses", 3, 0, None), ("dp=2,ep=2", "none", 1, 4, None), ("pp=2,ep=2", "none", None, 4, 2),
])
def test_model_state_bytes_of_the_new_compositions_equal_what_colofn_train_reports(mesh, sp, zero, experts,
                                                                                    microbatches, tmp_path):
    cfg = TrainConfig(preset="tiny", mesh=_pairs(mesh), steps=1, warmup=1, zero=zero, sp=sp, experts=experts,
                      batch_size=8, microbatches=microbatches, out=str(tmp_path))
    record = colofn.launch(rank_program, cfg, world_size=cfg.world_size)[0]
    cand = Candidate(cfg.mesh, sp=sp, zero=zero, microbatches=microbatches or 1)
    assert model_state_bytes(from_gpt(cfg.model_config()), cand, FP32_ADAM) == max(record["bytes_per_rank"][-1])


@pytest.mark.parametrize("experts", [0, 4])
def test_every_candidate_the_planner_enumerates_is_one_colofn_train_accepts(experts):
    from colofn.plan import candidates, cluster, model, search
    from colofn.train import validate

    m = from_gpt(TrainConfig(preset="tiny", experts=experts).model_config(), "tiny") if experts else model("tiny")
    cands = list(candidates(m, cluster("cpu-local", 8), devices=8, global_batch=16, recompute=("none",)))
    seen = {(c.size("pp") > 1, c.zero is not None, c.sp, c.size("ep") > 1) for c in cands}
    if experts:  # experts inside pipeline stages (with ep, and with ZeRO over dp), ZeRO over dp x ep
        assert {(True, False, "none", True), (True, True, "none", False), (False, True, "none", True)} <= seen
    else:  # ZeRO inside pipeline stages, ZeRO over dp x sp, the tp grids
        assert {(True, True, "none", False), (True, True, "megatron", False), (False, True, "ulysses", False),
                (False, True, "ring", False)} <= seen
        assert {str(c) for c in cands if c.tp_mode != "1d"} == {"dp=2,tp=4 tp=2d", "tp=8 tp=2.5dx2", "tp=8 tp=3d"}
    assert not any(c.zero == 3 and c.size("pp") > 1 for c in cands)
    for c in cands:
        pp = c.size("pp") > 1
        validate(TrainConfig(preset="tiny", mesh=c.mesh, sp=c.sp, zero=c.zero, experts=experts, batch_size=16,
                             schedule=c.schedule if pp else "1f1b", microbatches=c.microbatches if pp else None,
                             tp_mode=c.tp_mode, tp_depth=c.tp_depth))
    ranked, refused = search(m, cluster("cpu-local", 8), devices=8, global_batch=16, recompute=("none",))
    assert len(ranked) + len(refused) == len(cands)


@pytest.mark.parametrize(("mesh", "mode", "depth"), [("dp=2,tp=4", "2d", 1), ("tp=8", "2.5d", 2), ("tp=8", "3d", 1)])
def test_tp_grids_bytes_and_model_states_equal_what_colofn_train_records(mesh, mode, depth, tmp_path):
    cfg = TrainConfig(preset="tiny", mesh=_pairs(mesh), steps=1, warmup=1, tp_mode=mode, tp_depth=depth, batch_size=8,
                      out=str(tmp_path))
    record = colofn.launch(rank_program, cfg, world_size=cfg.world_size)[0]  # rank 0's comm_per_step
    m, cand = from_gpt(cfg.model_config()), Candidate(cfg.mesh, tp_mode=mode, tp_depth=depth)
    want: Counter = Counter()
    for c in step_collectives(m, cand, global_batch=8, precision=FP32_ADAM):
        want[f"{c.op} over {c.axis.replace('+', ',')}, {c.phase}"] += c.bytes_sent
    assert {k: b for k, (_, b) in record["comm_per_step"].items() if b} == dict(want)
    assert model_state_bytes(m, cand, FP32_ADAM) == max(record["bytes_per_rank"][-1])


def test_a_plan_file_carries_the_tp_grid_to_colofn_train(tmp_path):
    from colofn.plan import plan_json, plan_train, read_plan

    c = Candidate((("tp", 8),), tp_mode="2.5d", tp_depth=2)
    f = tmp_path / "plan.json"
    f.write_text(plan_json(c, model="tiny"))
    assert read_plan(f.read_text())[0] == c
    cfg, why = plan_train(str(f), TrainConfig(preset="tiny", out=str(tmp_path)))
    assert (cfg.tp_mode, cfg.tp_depth, cfg.mesh) == ("2.5d", 2, (("tp", 8),))
    assert why.endswith("Running --mesh tp=8 --tp-mode 2.5d --tp-depth 2.")
