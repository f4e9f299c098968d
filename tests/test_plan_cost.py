"""colofn.plan on a host whose ranks share cores: the op counts, the calls, and what each term moves."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

import colofn
from colofn import comm_trace, data, random
from colofn.errors import ConfigError
from colofn.mesh import Mesh
from colofn.plan import (
    FP32_ADAM,
    OP_COUNTS,
    Candidate,
    Cluster,
    count_step_ops,
    from_gpt,
    model,
    predict,
    step_collectives,
    step_ops,
)
from colofn.plan._ops import _FLAT, _PIPE, recount
from colofn.train import TrainConfig, parse_mesh

HOST = Cluster("host", 4, 4, 16e9, 1e10, 1e9, 1e9, 1e-3, 1e-3)


def _cand(mesh, **kw):
    return Candidate(tuple(parse_mesh(mesh).items()), **kw)


# --------------------------------------------------------------------- operations per step, counted


def test_op_counts_are_what_colofn_train_runs_without_a_pipeline():
    """The stored counts are what the trainers run today (if this fails: python -m colofn.plan._ops, paste)."""
    for key, mesh, sp, zero in _FLAT:  # at two layers (the slow run below recounts the lines' two points)
        per_step, per_layer = OP_COUNTS[key]
        assert count_step_ops(mesh, sp=sp, zero=zero, n_layers=2)[0] == per_step + 2 * per_layer, (
            key, "python -m colofn.plan._ops recounts them")


def test_op_counts_of_a_pipeline_are_what_colofn_train_runs():
    key, mesh, _ = _PIPE[0]
    for layers, mb in ((1, 3), (2, 6)):
        got = count_step_ops(mesh, microbatches=mb, n_layers=3 * layers)
        for stage, role in enumerate(("first", "middle", "last")):
            a, b, c, d = OP_COUNTS[f"{key} {role}"]
            assert got[stage] == a + b * layers + c * mb + d * layers * mb, (role, layers, mb)


@pytest.mark.slow
def test_every_op_count_is_what_colofn_train_runs():
    assert recount() == OP_COUNTS  # python -m colofn.plan._ops prints a fresh table


@pytest.mark.parametrize(("mesh", "kw"), [
    ("tp=4", {}), ("pp=2,dp=2", {"microbatches": 2}),
    # A known limit, documented in docs/plan.md (Limits): step_ops composes ZeRO's per-step machinery with the
    # strategy's layers as "strategy key less plain dp's", and plain dp's key is now counted untracked while
    # ZeRO's and tp's bodies are tracked, so this composition counts 15% high (885 counted, 1016 composed).
    # A count taken by the same counter for both would fix it; count_step_ops gives the exact figure meanwhile.
    pytest.param("dp=2,tp=2", {"sp": "megatron", "zero": 1}, marks=pytest.mark.xfail(
        strict=True, reason="known limit (docs/plan.md): ZeRO + tp composed against untracked plain dp, 15% high")),
])
def test_step_ops_composes_the_counts_within_five_percent_of_a_direct_count(mesh, kw):
    """Compositions not in the table: the strategy's layers plus the data axes' machinery."""
    got = count_step_ops(mesh, sp=kw.get("sp", "none"), zero=kw.get("zero"), microbatches=kw.get("microbatches"),
                         n_layers=2)
    shape = dataclasses.replace(model("tiny"), n_layers=2)
    for stage, n in got.items():
        assert abs(step_ops(shape, _cand(mesh, **kw), stage) / n - 1) <= 0.05, (stage, n)


# --------------------------------------------------------------------- collective calls, traced


def _calls_program(preset, mesh, sp, zero, microbatches):
    from colofn.train.loop import _trainer, initial_state, make_optimizer

    cfg = TrainConfig(preset=preset, mesh=mesh, batch_size=8, sp=sp, zero=zero, microbatches=microbatches)
    shape = cfg.device_mesh_shape
    dmesh = Mesh(tuple(shape.values()), tuple(shape))
    opt = make_optimizer(cfg)
    _, params, state = initial_state(cfg, cfg.model_config(), opt)
    trainer = _trainer(cfg, cfg.model_config(), dmesh, opt, params, state)
    batch = data.sample_batch(random.key(1), data.encode(data.text()), 8, cfg.model_config().seq_len)
    trainer.step(batch)
    with comm_trace() as records:
        trainer.step(batch)
    calls: Counter = Counter()
    for r in records:  # a pipeline's metadata (1-d int tensors) aside, as trainer_step_bytes does
        if r.op not in ("send", "recv") or len(r.shape) in (0, 3):
            calls[("send" if r.op == "recv" else r.op, "+".join(r.axes), r.phase if r.op not in ("send", "recv") else "")] += 1
    return (dmesh.axis_index("pp") if "pp" in shape else 0), calls


@pytest.mark.parametrize(("preset", "mesh", "kw"), [
    ("small", "dp=2", {}),  # two gradient buckets (1 MiB, then the rest)
    ("tiny", "dp=2", {"zero": 1}), ("tiny", "dp=2", {"zero": 3}),  # one message per ZeRO unit
    ("tiny", "dp=2,tp=2", {"sp": "megatron"}), ("tiny", "sp=2", {"sp": "ulysses"}),
    ("tiny", "pp=2,dp=2", {"microbatches": 2}),  # a send and its receive
])
def test_messages_per_step_equal_the_calls_comm_trace_records(preset, mesh, kw):
    """What per_call_s is charged on: every call a rank makes (Collective.n_messages)."""
    pairs = tuple(parse_mesh(mesh).items())
    n = 1
    for _, v in pairs:
        n *= v
    got = colofn.launch(_calls_program, preset, pairs, kw.get("sp", "none"), kw.get("zero"), kw.get("microbatches"),
                        world_size=n)
    m = from_gpt(TrainConfig(preset=preset).model_config(), preset)
    cand = _cand(mesh, **kw)
    for stage, calls in got:
        want: Counter = Counter()
        for c in step_collectives(m, cand, global_batch=8, precision=FP32_ADAM, stage=stage):
            want[(c.op, c.axis, c.phase if c.op != "send" else "")] += c.n_messages
        assert calls == want, (stage, calls, want)


# --------------------------------------------------------------------- what each term moves


def test_defaults_give_every_rank_a_core_and_no_software_cost():
    c = Cluster("x", 8, 8, 1e9, 1e12, 1e9, 1e9)
    assert (c.cores, c.per_call_s, c.per_op_s, c.ranks_per_core) == (None, 0.0, 0.0, 1.0)
    p = predict(model("tiny"), _cand("pp=2,dp=4", microbatches=4), c, global_batch=16)
    assert p.step_s == pytest.approx(p.compute_s / (1 - p.bubble) + p.comm_s)


def test_fewer_cores_than_ranks_hand_a_pipelines_bubble_to_the_other_ranks():
    m = from_gpt(TrainConfig(preset="small").model_config(), "small")
    pp, dp = _cand("pp=4", microbatches=4), _cand("dp=4")

    def ratio(cl):
        return (predict(m, pp, cl, global_batch=16, precision=FP32_ADAM).step_s
                / predict(m, dp, cl, global_batch=16, precision=FP32_ADAM).step_s)

    alone, shared = ratio(HOST), ratio(dataclasses.replace(HOST, cores=1))
    assert alone > 1.3 > shared  # a core per rank: the bubble costs; one core: it is free
    p = predict(m, pp, dataclasses.replace(HOST, cores=1), global_batch=16, precision=FP32_ADAM)
    assert p.step_s == pytest.approx(4 * p.busy_s)  # the node's busy time over its core: no wait added with pp


def test_per_call_cost_adds_messages_times_the_cost_to_the_critical_path():
    m = from_gpt(TrainConfig(preset="small").model_config(), "small")
    # (dp's gradient collectives in the backward overlap the backward's compute: left out here)
    for mesh, kw in (("tp=4", {}), ("tp=4", {"sp": "megatron"}), ("sp=4", {"sp": "ulysses"}), ("pp=4", {"microbatches": 4})):
        cand = _cand(mesh, **kw)
        base = predict(m, cand, HOST, global_batch=16, precision=FP32_ADAM)
        costly = predict(m, cand, dataclasses.replace(HOST, per_call_s=1e-3), global_batch=16, precision=FP32_ADAM)
        messages = sum(c.n_messages for c in base.collectives)
        assert costly.step_s - base.step_s == pytest.approx(messages * 1e-3), mesh


def test_each_term_moves_the_compositions_it_should():
    """Cores lift pipelines; per-call cost sinks ZeRO-3, tp=4 and Ulysses against dp; per-op cost sinks the op-heavy ones."""
    m = from_gpt(TrainConfig(preset="small").model_config(), "small")
    names = {"dp": _cand("dp=4"), "zero3": _cand("dp=4", zero=3), "tp4": _cand("tp=4"),
             "ulysses": _cand("dp=2,sp=2", sp="ulysses"), "pp4": _cand("pp=4", microbatches=4)}

    def steps(cl):
        return {k: predict(m, c, cl, global_batch=16, precision=FP32_ADAM, efficiency=1.0).step_s for k, c in names.items()}

    base = steps(HOST)
    cores = steps(dataclasses.replace(HOST, cores=2))
    calls = steps(dataclasses.replace(HOST, per_call_s=5e-4))
    ops = steps(dataclasses.replace(HOST, per_op_s=1e-5))
    assert cores["pp4"] / cores["dp"] < base["pp4"] / base["dp"]
    for k in ("zero3", "tp4", "ulysses"):
        assert calls[k] / calls["dp"] > base[k] / base["dp"], k
    assert ops["pp4"] / ops["dp"] < base["pp4"] / base["dp"]  # a pipeline stage runs a quarter of the layers
    assert step_ops(m, names["zero3"]) < step_ops(m, names["dp"])  # ZeRO updates flat buffers: fewer calls


def test_a_cluster_file_carries_the_host_terms_and_refuses_bad_ones():
    text = ('{"name": "mine", "devices": 4, "devices_per_node": 4, "memory": 16e9, "peak_flops": 5e10, '
            '"intra_bw": 1e9, "inter_bw": 1e9, "cores": 2, "per_call_s": 3e-4, "per_op_s": 1e-5}')
    c = Cluster.from_json(text)
    assert (c.cores, c.per_call_s, c.per_op_s, c.ranks_per_core) == (2, 3e-4, 1e-5, 2.0)
    with pytest.raises(ConfigError) as e:
        Cluster.from_json(text.replace('"cores": 2', '"cores": 0').replace("3e-4", "-1"))
    assert str(e.value) == ("cluster 'mine': cores=0 must be a positive int (or null: one per device); "
                            "per_call_s=-1 must be >= 0")


def test_cli_plans_a_calibrated_host_and_says_its_cores_bound_the_step(tmp_path, capsys):
    """The cluster of docs/plan.md's run A: on 2 cores, 4 ranks of small rank the pipelines first."""
    from colofn.cli import main

    f = tmp_path / "host.json"
    f.write_text('{"name": "this-host", "devices": 4, "devices_per_node": 4, "memory": 16e9, "peak_flops": 5.57e10, '
                 '"intra_bw": 5.53e8, "inter_bw": 5.53e8, "intra_latency": 8.88e-4, "inter_latency": 8.88e-4, '
                 '"cores": 2, "per_call_s": 1.70e-4, "per_op_s": 6.2e-6}')
    assert main(["plan", "--model", "small", "--devices", "4", "--cluster", str(f), "--batch", "16",
                 "--recompute", "none", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "Best: pp=4 1f1b m=4." in out
    assert "Its 4 ranks share 2 cores, which bound the step: each rank is busy" in out
