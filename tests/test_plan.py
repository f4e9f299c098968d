"""colofn.plan: predictions equal what colofn measures (model-state bytes, bytes per collective)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import colofn
from colofn import random, tree
from colofn.models import gpt
from colofn.parallel import Plan, param_specs, shard_params
from colofn.plan import Candidate, from_gpt, step_bytes
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
    ("dp=2", None), ("dp=2", 1), ("dp=2", 3), ("tp=2", None), ("dp=2,tp=2", 2),
    ("pp=2,dp=2", None), ("dp=3", 1), ("dp=3", 3),  # dp=3: ZeRO pads the units
])
def test_model_state_bytes_equal_what_colofn_train_reports(mesh, zero, tmp_path):
    batch = 6 if "dp=3" in mesh else 8
    cfg = TrainConfig(preset="tiny", mesh=_mesh(mesh), steps=1, warmup=1, zero=zero, batch_size=batch, out=str(tmp_path))
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
    return step_bytes(TRAIN_CFG, _mesh(mesh_text), b, sp)[0]


@pytest.mark.parametrize(("mesh", "sp"), [("dp=2", "none"), ("tp=2", "none"), ("tp=2", "megatron"),
                                          ("dp=2,tp=2", "none"), ("dp=2,tp=2", "megatron")])
def test_bytes_per_collective_equal_comm_trace(mesh, sp):
    n = 1
    for v in parse_mesh(mesh).values():
        n *= v
    got = colofn.launch(_dense_program, mesh, sp, 4, world_size=n)
    want = _predicted(Candidate(_mesh(mesh), sp=sp), 4)
    assert all(g == want for g in got), (got[0], want)


def _zero_program(mesh_text, stage, b, sp="none"):
    shape = parse_mesh(mesh_text)
    mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
    cfg = TrainConfig(preset="tiny", mesh=tuple(shape.items()), zero=stage, sp=sp)
    opt = make_optimizer(cfg)
    params = gpt.init(random.key(0), TRAIN_CFG)
    trainer = ZeroTrainer(TRAIN_CFG, cfg.plan(), mesh, opt, params, opt.init(params), stage)
    with colofn.comm_trace() as records:
        trainer.step(_batch(b))
    return _traced(records)


@pytest.mark.parametrize(("mesh", "sp", "stage"), [
    ("dp=2", "none", 0), ("dp=2", "none", 1), ("dp=2", "none", 2), ("dp=2", "none", 3),
    ("dp=2,tp=2", "megatron", 0), ("dp=2,tp=2", "megatron", 3),
])
def test_zero_bytes_per_collective_equal_comm_trace(mesh, sp, stage):
    got = colofn.launch(_zero_program, mesh, stage, 4, sp, world_size=2 * parse_mesh(mesh).get("tp", 1))
    want = _predicted(Candidate(_mesh(mesh), zero=stage, sp=sp), 4)
    assert all(g == want for g in got), (got[0], want)


# --------------------------------------------------------------------- formulas, search and CLI


def test_korthikanti_formulas_reduce_to_each_other():
    from colofn.plan import activation_bytes_per_layer as act

    kw = {"s": 2048, "b": 1, "h": 12288, "a": 96}
    base = act(**kw)
    assert base == 2048 * 12288 * (34 + 5 * 96 * 2048 / 12288)
    assert act(**kw, t=1, sp=True) == act(**kw, t=1) == base  # t = 1: every variant is the plain one
    assert act(**kw, t=8, sp=True) == base / 8  # sp shards the whole layer
    assert act(**kw, t=8, sp=True, recompute="selective") == 34 * 2048 * 12288 / 8
    assert act(**kw, t=8, recompute="full") == 2 * 2048 * 12288
    assert act(**kw, element=4) == 2 * base


def test_model_states_are_the_zero_papers_figure():
    # Rajbhandari et al. 2020, Figure 1: a 7.5B model on 64 GPUs, K = 12: 120, 31.4, 16.6 and 1.9 GB (one decimal).
    # Every ZeRO unit divides by 64 (no padding), so the bytes scale with the parameter count.
    from colofn.plan.published import zero_figure1

    got = zero_figure1()
    assert [name for name, _, _ in got] == ["baseline", "P_os", "P_os+g", "P_os+g+p"]
    assert all(abs(pred - paper) <= 0.05 for _, pred, paper in got), got


def test_model_states_are_the_zero_papers_table_1():
    from colofn.plan.published import ZERO_2020_TABLE1, zero_table1

    got = zero_table1()
    for n, paper in ZERO_2020_TABLE1.items():
        assert all(abs(g - p) <= max(1.0, 0.01 * p) for g, p in zip(got[n], paper, strict=True)), (n, got[n], paper)
    assert got[64][:3] == (31.40625, 16.640625, 1.875)  # the 7.5B column of Figure 1


def test_korthikanti_table_and_their_selective_recompute_savings():
    from colofn.plan import published

    rows = {r.config.name: r for r in published.korthikanti_table()}
    gpt3 = rows["175B (GPT-3)"]  # s = 2048, b = 1, h = 12288, a = 96, t = 8
    assert gpt3.none == 2048 * 12288 * (34 + 80) / 2**20 == 2736
    assert (gpt3.tp, gpt3.tp_sp, gpt3.tp_selective, gpt3.tp_sp_selective, gpt3.full) == (552, 342, 312, 102, 48)
    assert [(s.attention_term, round(100 * s.saved)) for s in published.korthikanti_selective_savings()] == [
        (80.0, 70), (64.0, 65)]  # section 5: "70%" for GPT-3, "65%" for MT-NLG


def test_predicted_mfu_against_megatron_lm_table_1():
    # Narayanan et al. 2021, Table 1, the first seven rows (the last three take seconds to simulate):
    # one efficiency (0.5, not fitted) predicts every row within 6 percentage points.
    from colofn.plan import published

    rows = published.NARAYANAN_2021_TABLE1[:7]
    got = [published.megatron_mfu(r) for r in rows]
    assert [round(m.params / 1e9, 1) for m, _, _ in got] == [1.7, 3.6, 7.5, 18.4, 39.1, 76.0, 145.6]  # their sizes
    assert [round(p, 1) for _, _, p in got] == [49.1, 48.2, 46.9, 45.5, 45.4, 44.6, 44.2]
    assert max(abs(p - r.peak_percent) for (_, _, p), r in zip(got, rows, strict=True)) < 6


def test_search_ranks_what_fits_and_refuses_the_rest_with_the_reason():
    from colofn.plan import cluster, model, search

    big = cluster("a100-80g", 16)
    ranked, refused = search(model("llama-7b"), big, devices=16, global_batch=16)
    assert ranked and refused
    assert [p.step_s for p in ranked] == sorted(p.step_s for p in ranked)
    assert all(p.memory <= big.memory for p in ranked)
    worst = refused[-1]
    assert worst.reason.startswith("needs ") and "GiB per device" in worst.reason and "> 74.5 GiB" in worst.reason
    for p in ranked + refused:
        c = p.candidate
        assert c.devices == 16 and c.size("tp") <= 8 and 32 % c.size("tp") == 0 and 32 % c.size("pp") == 0
        assert not (c.zero == 3 and c.size("pp") > 1)
        assert {"none": True, "megatron": c.size("tp") > 1, "ulysses": c.size("sp") > 1, "ring": c.size("sp") > 1}[c.sp]


def test_pipeline_idle_and_in_flight_come_from_simulate():
    from colofn.pipeline.registry import make_schedule
    from colofn.pipeline.simulation import Costs, simulate
    from colofn.plan import pipeline_shape

    r = simulate(make_schedule("1f1b", 4, 8), Costs(forward=1, input_grad=1, weight_grad=1))
    assert pipeline_shape("1f1b", 4, 8) == (max(r.bubble), 4) == ((4 - 1) / (8 + 4 - 1), 4)


def test_links_follow_the_row_major_mesh():
    from colofn.plan import Candidate, cluster, link

    cl = cluster("h100-sxm", 64)
    c = Candidate((("pp", 2), ("dp", 4), ("tp", 8)))
    assert [link(c, a, cl) for a in ("tp", "dp", "pp", "dp+tp")] == ["intra", "inter", "inter", "inter"]
    assert link(Candidate((("dp", 8),)), "dp", cl) == "intra"


def test_cli_plans_gpt2_on_eight_local_devices(capsys):
    from colofn.cli import main

    assert main(["plan", "--model", "gpt2-124m", "--devices", "8", "--cluster", "cpu-local", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-124m (124,356,864 params) on 8 x cpu-local" in out
    assert "  1  dp=8 " in out and "MFU" in out and "Best: dp=8." in out


def test_cli_reads_a_cluster_file_and_names_bad_input(tmp_path, capsys):
    from colofn.cli import main

    f = tmp_path / "mine.json"
    f.write_text('{"name": "mine", "devices": 2, "devices_per_node": 2, "memory": 1e9, '
                 '"peak_flops": 1e12, "intra_bw": 1e10, "inter_bw": 1e9}')
    assert main(["plan", "--model", "tiny", "--devices", "2", "--cluster", str(f)]) == 0
    assert "on 2 x mine" in capsys.readouterr().out
    f.write_text('{"name": "mine", "devices": 2, "memroy": 1}')
    assert main(["plan", "--model", "tiny", "--devices", "2", "--cluster", str(f)]) == 2
    assert "unknown fields ['memroy']" in capsys.readouterr().err
    assert main(["plan", "--model", "gpt5", "--devices", "2"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt5'" in err and "llama-70b" in err
    assert main(["plan", "--model", "tiny", "--devices", "2", "--cluster", "tpu"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def _pipeline_program(mesh_text, microbatches, b):
    from colofn.train.trainers import PipelineTrainer

    shape = parse_mesh(mesh_text)
    mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
    cfg = TrainConfig(preset="tiny", mesh=tuple(shape.items()))
    opt = make_optimizer(cfg)
    params = gpt.init(random.key(0), TRAIN_CFG)
    trainer = PipelineTrainer(TRAIN_CFG, cfg.plan(), mesh, opt, params, opt.init(params), "1f1b", microbatches)
    with colofn.comm_trace() as records:
        trainer.step(_batch(b))
    # The schedule's metadata messages (a few ints) are not predicted.
    return _traced(r for r in records if r.op not in ("send", "recv") or len(r.shape) == 3), mesh.axis_index("pp")


@pytest.mark.parametrize("mesh", ["pp=2", "pp=2,dp=2", "pp=2,tp=2"])
def test_pipeline_bytes_per_collective_equal_comm_trace_stage_by_stage(mesh):
    shape = parse_mesh(mesh)
    got = colofn.launch(_pipeline_program, mesh, 2, 8, world_size=2 * shape.get("dp", 1) * shape.get("tp", 1))
    for traced, stage in got:
        want: Counter = Counter()
        for c in step_collectives(from_gpt(TRAIN_CFG), Candidate(_mesh(mesh), microbatches=2), global_batch=8,
                                  precision=FP32_ADAM, stage=stage):
            want[(c.op, c.axis, c.phase)] += c.bytes_sent
        assert traced - Counter() == want - Counter(), (stage, traced, want)


def test_predict_names_every_reason_a_candidate_cannot_run():
    from colofn.errors import ConfigError
    from colofn.plan import cluster, model, predict

    with pytest.raises(ConfigError) as e:
        predict(model("llama-7b"), Candidate((("pp", 3), ("cp", 2)), sp="megatron", zero=3, recompute="some"),
                cluster("a100-80g", 6), global_batch=8)
    msg = str(e.value)
    assert msg.startswith("Candidate pp=3,cp=2 sp=megatron zero3 1f1b m=1 rc=some cannot run llama-7b (global batch 8):")
    for reason in ("axis 'cp' is not modelled; the planner knows pp, dp, sp, tp, ep",
                   "sp='megatron' splits the sequence over tp: add a tp axis",
                   "recompute='some' is not one of ('none', 'selective', 'full')",
                   "zero=3 with pp: ZeRO-3 gathers a unit for each use",
                   "zero=3 shards over the dp axis (and the other data axes with it): add dp",
                   "pp=3 does not divide n_layers=32"):
        assert f"  * {reason}" in msg
    assert "Fix: pick sizes" in msg


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_padding_is_predicted_in_the_bytes_per_collective(stage):
    got = colofn.launch(_zero_program, "dp=3", stage, 6, world_size=3)
    want = _predicted(Candidate(_mesh("dp=3"), zero=stage), 6)
    assert all(g == want for g in got), (got[0], want)


def test_cli_says_why_nothing_fits(capsys):
    from colofn.cli import main

    assert main(["plan", "--model", "llama-70b", "--devices", "8", "--cluster", "a100-80g"]) == 1
    out = capsys.readouterr().out
    assert "0 compositions fit" in out and "Best:" not in out
    assert "refused: pp=2,tp=4 sp=megatron 1f1b m=8 rc=full: needs 129.9 GiB per device (128.5 model states" in out


# --------------------------------------------------------------------- colofn train --plan


def test_train_plan_auto_runs_the_planners_choice_and_says_why(tmp_path, capsys):
    from colofn.cli import main

    assert main(["train", "--preset", "tiny", "--mesh", "dp=2,tp=2", "--plan", "auto", "--steps", "2", "--check",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "--plan auto: planned tiny on 4 devices (the size of --mesh) of cluster cpu-local, global batch 8:" in out
    assert "Best: dp=4." in out and "Running --mesh dp=4." in out
    assert "on Mesh(dp=4)" in out and "OK: parallel training equals single-device training" in out


def test_train_plan_file_runs_the_composition_it_names(tmp_path, capsys):
    from colofn.cli import main
    from colofn.plan import plan_json, read_plan

    f = tmp_path / "plan.json"
    assert main(["plan", "--model", "tiny", "--devices", "4", "--recompute", "none", "--top", "1",
                 "--out", str(f)]) == 0
    c, context = read_plan(f.read_text())
    assert (str(c), context["model"], context["devices"], context["global_batch"]) == ("dp=4", "tiny", 4, 4)
    assert context["predicted"]["model_states_bytes"] > 0
    f.write_text(plan_json(Candidate((("pp", 2), ("tp", 2)), sp="megatron", schedule="gpipe", microbatches=2),
                           model="tiny"))
    assert main(["train", "--preset", "tiny", "--plan", str(f), "--steps", "2", "--check", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Running --mesh pp=2,tp=2 --sp megatron --schedule gpipe --microbatches 2." in out
    assert "on Mesh(pp=2, tp=2)" in out and "OK: parallel training equals single-device training" in out


def test_train_plan_refuses_bad_files_with_every_reason(tmp_path, capsys):
    from colofn.cli import main

    f = tmp_path / "plan.json"
    f.write_text('{"model": "small", "mesh": {"dp": 2}, "recompute": "full"}')
    assert main(["train", "--preset", "tiny", "--plan", str(f), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--plan {f} cannot run:" in err
    assert "planned for model 'small', not --preset 'tiny': pass --preset small" in err
    assert "recompute='full': colofn train does not recompute activations" in err
    f.write_text('{"mesh": {"dp": 3}, "zero": 1}')  # read, then validated as any flags are
    assert main(["train", "--preset", "tiny", "--plan", str(f), "--batch-size", "8", "--out", str(tmp_path)]) == 2
    assert "colofn train: error: the run cannot start:" in capsys.readouterr().err
    f.write_text('[1, 2]')
    assert main(["train", "--plan", str(f), "--out", str(tmp_path)]) == 2
    assert "is not a plan: a JSON object with a 'mesh' field is, not list" in capsys.readouterr().err
    assert main(["train", "--plan", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert "is neither 'auto' nor a readable plan file" in capsys.readouterr().err


# --------------------------------------------------------------------- activation memory, measured


def _activation_program(preset, mesh_text, sp, b):
    from colofn.parallel import make_loss
    from colofn.plan import saved_activation_bytes

    cfg = gpt.config(preset, tie_embeddings=False)
    shape = parse_mesh(mesh_text)
    mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
    plan = Plan(dp="dp" if "dp" in shape else None, tp="tp" if "tp" in shape else None, sp=sp,
                sp_axis="sp" if "sp" in shape else None)
    params = tree.map(lambda p: p.requires_grad_(), shard_params(gpt.init(random.key(0), cfg), cfg, plan, mesh))
    t = random.randint(random.key(1), (b, cfg.seq_len + 1), 0, cfg.vocab_size)
    batch = {"tokens": t[:, :-1], "targets": t[:, 1:]}
    return saved_activation_bytes(lambda: make_loss(cfg, plan, mesh)(params, batch), exclude=tree.leaves(params))


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize(("mesh", "sp"), [("dp=2", "none"), ("tp=2", "none"), ("tp=2", "megatron"),
                                          ("dp=2,tp=2", "megatron"), ("dp=2,sp=2", "ulysses"),
                                          ("sp=2", "ring"), ("dp=2,sp=2", "ring"), ("sp=4", "ring")])
def test_activation_memory_is_within_ten_percent_of_what_autograd_saves(preset, mesh, sp):
    from colofn.plan import cluster, predict

    n = 1
    for v in parse_mesh(mesh).values():
        n *= v
    measured = max(colofn.launch(_activation_program, preset, mesh, sp, 4, world_size=n))
    m = from_gpt(gpt.config(preset, tie_embeddings=False), preset)
    p = predict(m, Candidate(_mesh(mesh), sp=sp), cluster("cpu-local", n), global_batch=4, precision=FP32_ADAM)
    assert abs(p.activations / measured - 1) <= 0.10, (p.activations, measured)
    # what the formula reaches today (ring: the blockwise kernel's saved blocks, within 4%); 10% is the promise
    assert abs(p.activations / measured - 1) <= (0.05 if sp == "ring" else 0.02)


def _grid_activation_program(preset, mesh_text, mode, depth, b):
    from colofn.parallel import make_loss
    from colofn.plan import saved_activation_bytes

    cfg = TrainConfig(preset=preset, mesh=_mesh(mesh_text), tp_mode=mode, tp_depth=depth)
    mcfg, shape, plan = cfg.model_config(), cfg.device_mesh_shape, cfg.plan()
    mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
    params = tree.map(lambda p: p.requires_grad_(), shard_params(gpt.init(random.key(0), mcfg), mcfg, plan, mesh))
    t = random.randint(random.key(1), (b, mcfg.seq_len + 1), 0, mcfg.vocab_size)
    batch = {"tokens": t[:, :-1], "targets": t[:, 1:]}
    return saved_activation_bytes(lambda: make_loss(mcfg, plan, mesh)(params, batch), exclude=tree.leaves(params))


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize(("mesh", "mode", "depth"), [("tp=4", "2d", 1), ("dp=2,tp=4", "2d", 1), ("tp=8", "2.5d", 2),
                                                     ("tp=8", "3d", 1)])
def test_tp_grid_activation_memory_is_within_ten_percent_of_what_autograd_saves(preset, mesh, mode, depth):
    """SUMMA keeps each matmul's gathered row strip and weight strips (1/q, not 1/q^2): 19-35% low before."""
    from colofn.plan import cluster, predict

    n = 1
    for v in parse_mesh(mesh).values():
        n *= v
    measured = max(colofn.launch(_grid_activation_program, preset, mesh, mode, depth, 8, world_size=n))
    m = from_gpt(gpt.config(preset, tie_embeddings=False), preset)
    p = predict(m, Candidate(_mesh(mesh), tp_mode=mode, tp_depth=depth), cluster("cpu-local", n), global_batch=8,
                precision=FP32_ADAM)
    assert abs(p.activations / measured - 1) <= 0.10, (p.activations, measured)


@pytest.mark.parametrize("mesh", ["sp=2", "dp=2,sp=2", "sp=4"])
def test_ulysses_bytes_per_collective_equal_comm_trace(mesh):
    n = 1
    for v in parse_mesh(mesh).values():
        n *= v
    got = colofn.launch(_dense_program, mesh, "ulysses", 4, world_size=n)
    want = _predicted(Candidate(_mesh(mesh), sp="ulysses"), 4)
    assert all(g == want for g in got), (got[0], want)


# --------------------------------------------------------------------- mixture of experts over ep


MOE_CFG = gpt.config("tiny", tie_embeddings=False, n_experts=4)  # what `colofn train --experts 4` builds


@pytest.mark.parametrize("mesh", ["ep=2", "dp=2,ep=2", "ep=4", "dp=2"])
def test_moe_bytes_per_collective_equal_comm_trace(mesh):
    n = 1
    for v in parse_mesh(mesh).values():
        n *= v
    for got, rooms in colofn.launch(step_bytes, MOE_CFG, _mesh(mesh), 8, world_size=n):
        cand = Candidate(_mesh(mesh))
        want: Counter = Counter()
        for c in step_collectives(from_gpt(MOE_CFG), cand, global_batch=8, precision=FP32_ADAM,
                                  ep_rooms=rooms or None):
            want[(c.op, c.axis, c.phase)] += c.bytes_sent
        assert got == want, (got, want)
    if "ep" in mesh:  # the planner's own guess: every rank sends b s k / ep rows to each other
        from colofn.plan._comm import balanced_room

        assert all(room >= balanced_room(from_gpt(MOE_CFG), cand, 8) for room in rooms)  # a lower bound


def test_moe_model_state_bytes_equal_what_colofn_train_reports(tmp_path):
    cfg = TrainConfig(preset="tiny", mesh=_mesh("dp=2,ep=2"), steps=1, warmup=1, experts=4, batch_size=8,
                      out=str(tmp_path))
    record = colofn.launch(rank_program, cfg, world_size=4)[0]
    shape = from_gpt(cfg.model_config())
    assert shape.params == gpt.count_params(cfg.model_config())
    assert model_state_bytes(shape, Candidate(cfg.mesh), FP32_ADAM) == max(record["bytes_per_rank"][-1])


# --------------------------------------------------------------------- ring attention's saved blocks, exactly


def _ring_saved_program(n, b, a, s, hd):
    import torch

    from colofn.parallel.sp import ring

    q, k, v = (random.normal(random.key(i), (b, a, s, hd)).requires_grad_() for i in range(3))
    out = {}

    def body(q, k, v):
        skip = {t.untyped_storage().data_ptr() for t in (q, k, v)}  # the layer's q, k, v: the base formula's
        seen = {}

        def pack(x):
            st = x.untyped_storage()
            if st.data_ptr() not in skip:
                seen[st.data_ptr()] = st.nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            y = ring.ring_attention(q, k, v, "sp")
        out["bytes"] = sum(seen.values())
        return y

    colofn.shard_map(body, mesh=colofn.Mesh((n,), ("sp",)), in_specs=colofn.P(None, None, "sp"),
                     out_specs=colofn.P(None, None, "sp"))(q, k, v)
    return out["bytes"]


@settings(max_examples=max(2, settings.default.max_examples // 2))  # 6 quick, 150 long
@given(n=st.integers(2, 4), b=st.integers(1, 3), a=st.sampled_from([1, 2, 4]), hd=st.sampled_from([2, 4, 8]),
       c=st.integers(1, 3))
def test_ring_attention_keeps_exactly_the_blocks_the_planner_counts(n, b, a, hd, c):
    """plan.ring_attention_bytes (plus SDPA's log-sum-exp, which it replaces) is what the largest rank saves."""
    from colofn.plan._predict import ring_attention_bytes

    s = 2 * n * c  # zig-zag: two chunks of c tokens per rank
    saved = colofn.launch(_ring_saved_program, n, b, a, s, hd, world_size=n)
    assert max(saved) == ring_attention_bytes(s=s, rows=b, h=a * hd, a=a, n=n) + 4 * a * b * (s // n)
