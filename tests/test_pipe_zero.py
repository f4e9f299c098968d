"""ZeRO inside pipeline stages: the bytes per step are the pipeline's plus ZeRO's, and what is refused says why.

The equivalence with one device is in ``property_tests/test_pipe_zero_props.py``
and, through ``colofn train --check``, in ``tests/test_train.py``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import colofn
from colofn import optim, zero
from colofn.errors import ConfigError, TreeError
from colofn.mesh import Mesh
from colofn.models import gpt
from colofn.train import TrainConfig, parse_mesh, validate
from colofn.train.trainers import PipelineTrainer

MCFG = gpt.config("tiny", vocab_size=64, seq_len=8, d_model=16, n_heads=2, d_ff=32, tie_embeddings=False)
M = 4  # microbatches


def _traced_step(zero_stage):
    mesh = Mesh((2, 2), ("pp", "dp"))
    opt = optim.adamw(1e-2)
    params = gpt.init(colofn.random.key(0), MCFG)
    from colofn.parallel import Plan

    trainer = PipelineTrainer(MCFG, Plan(dp="dp", pp="pp"), mesh, opt, params, opt.init(params), "1f1b", M, zero_stage=zero_stage)
    tokens = torch.randint(0, MCFG.vocab_size, (8, MCFG.seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    trainer.step(batch)  # the first step also exchanges activation shapes
    with colofn.comm_trace() as records:
        trainer.step(batch)
    psi = sum(s.plan.layout.nbytes() for s in trainer.states.values()) if zero_stage is not None else 0
    last = 1 in trainer.mine
    return [(r.op, r.axes, r.shape, r.bytes_sent) for r in records], psi, last


@pytest.mark.parametrize("stage", [1, 2])
def test_comm_per_step_is_the_pipelines_plus_zeros_formula(stage):
    zero_runs = colofn.launch(_traced_step, stage, world_size=4)
    plain_runs = colofn.launch(_traced_step, None, world_size=4)
    n = 2
    for (recs, psi, _), (plain, _, _) in zip(zero_runs, plain_runs, strict=True):
        p2p = [r for r in recs if r[0] in ("send", "recv")]
        assert p2p == [r for r in plain if r[0] in ("send", "recv")]  # the pipeline's own traffic, unchanged
        by_op = {op: sum(r[3] for r in recs if r[0] == op and r[1] == ("dp",)) for op in ("reduce_scatter", "all_gather")}
        assert by_op == {"reduce_scatter": psi * (n - 1) // n, "all_gather": psi * (n - 1) // n}  # 2Ψ(n-1)/n in all
        # Over dp besides: only the step's loss shares (one per microbatch), summed once on every rank
        # after the pipeline (no psum in the last stage's forward; colofn.train.pipe_loss).
        sums = [r for r in recs if r[0] == "all_reduce"]
        assert sums == [("all_reduce", ("dp",), (M,), 2 * (4 * M) * (n - 1) // n)], sums  # float32, a ring
        assert {r[0] for r in recs} <= {"send", "recv", "reduce_scatter", "all_gather", "all_reduce"}


def _traced_axes_step(sizes, zero_stage, sp, experts):
    """Records of one traced step of ``PipelineTrainer`` and, per stage of this rank, its buckets as (axes, padded bytes)."""
    cfg = TrainConfig(mesh=tuple(sizes.items()), sp=sp, experts=experts, zero=zero_stage, microbatches=2)
    mcfg = gpt.config("tiny", **{**MODEL, "n_experts": experts})
    mesh = Mesh(tuple(sizes.values()), tuple(sizes))
    opt = optim.adamw(1e-2)
    params = gpt.init(colofn.random.key(0), mcfg)
    trainer = PipelineTrainer(mcfg, cfg.plan(), mesh, opt, params, opt.init(params), "1f1b", 2, zero_stage=zero_stage)
    rows = 2 * sizes.get("dp", 1) * sizes.get("ep", 1)
    tokens = torch.randint(0, mcfg.vocab_size, (rows, mcfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    trainer.step(batch)  # the first step also exchanges activation shapes
    with colofn.comm_trace() as records:
        trainer.step(batch)
    buckets = []
    if zero_stage is not None:
        for st in trainer.states.values():
            buckets += [(st.plan.bucket_axes(k), b.padded * b.dtype.itemsize) for k, b in enumerate(st.plan.layout.buckets)]
    return [(r.op, r.axes, r.shape, r.bytes_sent) for r in records], buckets


MODEL = dict(vocab_size=64, seq_len=8, d_model=16, n_heads=2, d_ff=32, tie_embeddings=False)
AXES_CASES = [
    ({"pp": 2, "dp": 2, "sp": 2}, 1, "ring", 0),  # dense buckets over dp x sp
    ({"pp": 2, "dp": 2, "ep": 2}, 2, "none", 2),  # dense buckets over dp x ep, expert buckets over dp
]


@pytest.mark.parametrize("sizes,stage,sp,experts", AXES_CASES, ids=["dp2xring2", "dp2xep2"])
def test_comm_per_step_over_several_data_axes_is_the_pipeline_less_its_gradient_sums_plus_zero_per_group(sizes, stage, sp, experts):
    world = 8
    zero_runs = colofn.launch(_traced_axes_step, sizes, stage, sp, experts, world_size=world)
    plain_runs = colofn.launch(_traced_axes_step, sizes, None, sp, experts, world_size=world)
    for (recs, buckets), (plain, _) in zip(zero_runs, plain_runs, strict=True):
        want: dict[tuple[str, tuple[str, ...]], int] = {}
        for axes, padded in buckets:  # ZeRO, once per step and bucket: 2Ψ(g-1)/g over the bucket's own group
            g = 1
            for a in axes:
                g *= sizes[a]
            for op in ("reduce_scatter", "all_gather"):
                want[(op, axes)] = want.get((op, axes), 0) + padded * (g - 1) // g
        assert {axes for axes, _ in buckets} == ({("dp", "ep"), ("dp",)} if experts else {("dp", "sp")})
        zero_part = [r for r in recs if r[0] in ("reduce_scatter", "all_gather") and any(r[1] == a for a, _ in buckets)]
        got: dict[tuple[str, tuple[str, ...]], int] = {}
        for r in zero_part:
            got[(r[0], r[1])] = got.get((r[0], r[1]), 0) + r[3]
        assert got == want
        # Everything else is the plain pipeline's traffic (ring attention's own all-gathers over sp
        # included) less its per-microbatch gradient all-reduces, which ZeRO defers to the step's.
        rest = Counter(recs) - Counter(zero_part)
        deferred = Counter(plain) - rest
        assert not rest - Counter(plain), rest - Counter(plain)
        assert deferred and {r[0] for r in deferred} == {"all_reduce"}, deferred


def test_pipeline_zero_and_experts_pass_validation_and_zero3_is_refused_with_the_reason():
    def cfg(mesh, **kw):
        return TrainConfig(mesh=tuple(parse_mesh(mesh).items()), **kw)

    validate(cfg("pp=2,dp=2", zero=1))
    validate(cfg("pp=2,dp=2,tp=2", zero=2, sp="megatron"))
    validate(cfg("pp=2,dp=2,ep=2", experts=2, microbatches=2))
    validate(cfg("pp=2,dp=2,ep=2", experts=2, microbatches=2, zero=2))  # dense over dp x ep, experts over dp
    validate(cfg("pp=2,dp=2,sp=2", sp="ulysses", zero=1))  # over dp x sp
    validate(cfg("pp=2,dp=2,sp=2", sp="ring", zero=0))
    with pytest.raises(ConfigError) as e:
        validate(cfg("pp=2,dp=2", zero=3))
    assert "--zero 3 with pp is not supported: ZeRO-3 all-gathers a unit's parameters for each use" in str(e.value)
    assert "Use --zero 1 or 2 with pp" in str(e.value)


@pytest.mark.parametrize("mesh,extra", [
    ("pp=2,dp=2,sp=2", {"sp": "ulysses", "zero": 2}),  # ZeRO over dp x sp inside the stages
    ("pp=2,dp=2,ep=2", {"experts": 2, "zero": 1}),  # dense buckets over dp x ep, expert buckets over dp
])
def test_colofn_train_pipeline_zero_over_sp_or_ep_equals_single_device(tmp_path, capsys, mesh, extra):
    import json

    from colofn.train import train

    cfg = TrainConfig(mesh=tuple(parse_mesh(mesh).items()), steps=3, warmup=1, check=True, microbatches=2,
                      schedule="1f1b", out=str(tmp_path / "out"), **extra)
    assert train(cfg) == 0
    assert "OK: parallel training equals single-device training" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert all(abs(a - b) < 1e-5 for a, b in zip(record["loss"], record["single"], strict=True))


def test_apply_gradients_refuses_stage_3_and_a_wrong_tree():
    def program():
        mesh = Mesh((2,), ("dp",))
        opt = optim.sgd(0.1)
        out = []
        for stage, grads in ((3, {"w": torch.ones(4)}), (1, {"v": torch.ones(4)}), (1, {"w": torch.ones(3)})):
            state = zero.init({"w": torch.ones(4)}, opt, mesh, stage=stage)
            try:
                zero.apply_gradients(opt, state, grads)
            except (ConfigError, TreeError) as err:
                out.append(f"{type(err).__name__}: {err}")
        return out

    stage3, other_tree, other_shape = colofn.launch(program, world_size=2)[0]
    assert stage3.startswith("ConfigError: zero.apply_gradients: this state cannot take gradients computed elsewhere: stage 3")
    assert other_tree.startswith("TreeError: zero.apply_gradients: grads must be shaped like the params")
    assert "shapes [(3,)]" in other_shape


def test_apply_gradients_holds_the_full_gradient_at_the_update_in_stage_1_only():
    def program(stage):
        mesh = Mesh((2,), ("dp",))
        opt = optim.adam(0.1)
        state = zero.init({"a": torch.ones(6), "b": torch.ones(10)}, opt, mesh, stage=stage)
        _, memory = zero.apply_gradients(opt, state, {"a": torch.ones(6), "b": torch.ones(10)})
        return memory.grads, state.plan.layout.nbytes()

    for stage, share in ((1, 1), (2, 2)):
        grads, psi = colofn.launch(program, stage, world_size=2)[0]
        assert grads == psi // share, (stage, grads, psi)
