"""ZeRO over dp x sp and dp x ep: what each bucket is sharded over, the bytes a step sends (the strategy's
own collectives plus ZeRO's formula per group of data axes), the model-state bytes per rank (the
ZeRO formulas per group), and the errors of the new arguments.

Equality with one device is ``property_tests/test_zero_sp_ep_props.py``'s.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import colofn
from colofn import P, optim, random, zero
from colofn.errors import ShapeError, SpecError
from colofn.models import gpt
from colofn.parallel import Plan, batch_specs, local_loss, shard_params, zero_axes, zero_loss_plan
from colofn.tracing import volume

ULYSSES = (Plan(dp="dp", sp="ulysses", sp_axis="sp"), {"dp": 2, "sp": 2}, gpt.config("tiny", seq_len=16, tie_embeddings=False))
EP = (Plan(dp="dp", ep="ep"), {"dp": 2, "ep": 2}, gpt.config("tiny", seq_len=16, n_experts=2, tie_embeddings=False))
B, S = 4, 16


def _batch(cfg):
    tokens = random.randint(random.key(1), (B, S + 1), 0, cfg.vocab_size)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


def _program(plan, sizes, cfg, stages):
    """One traced ZeRO step per stage: (records, memory, buckets as (unit name, axes, n, padded bytes), schedule)."""
    mesh = colofn.Mesh(tuple(sizes.values()), tuple(sizes))
    params = gpt.init(random.key(0), cfg)
    inner = zero_loss_plan(plan, cfg)
    opt = optim.adam(1e-3)
    out = {}
    for stage in stages:
        state = zero.init(shard_params(params, cfg, inner, mesh), opt, mesh, axis=zero_axes(plan), stage=stage)
        with colofn.comm_trace() as records:
            state, info = zero.train_step(lambda p, b: local_loss(p, b, cfg, inner), opt, state, _batch(cfg), batch_spec=batch_specs(plan)["tokens"])
        layout = state.plan.layout
        buckets = [(layout.units[b.unit].name, state.plan.bucket_axes(k), b.n, b.padded * b.dtype.itemsize) for k, b in enumerate(layout.buckets)]
        out[stage] = (list(records), info.memory, buckets, info.schedule)
    return out


def _zero_expected(stage, buckets, sizes, schedule):
    """ZeRO's bytes per (op, axes, phase): the paper's volume on each group's padded buckets."""
    want: dict[tuple[str, tuple[str, ...], str], int] = {}

    def add(op, axes, phase, nbytes):
        want[(op, axes, phase)] = want.get((op, axes, phase), 0) + nbytes

    regathered = {m.group(1) for e in schedule if (m := re.match(r"backward gather (.*) start", e))}
    for unit, axes, n, padded in buckets:
        group = 1
        for a in axes:
            group *= sizes[a]
        if stage == 0:
            add("all_reduce", axes, "forward", volume("all_reduce", padded, group)[0])
            continue
        shard = padded // n
        if stage in (1, 2):
            add("reduce_scatter", axes, "backward", volume("reduce_scatter", padded, n)[0])
            add("all_gather", axes, "forward", volume("all_gather", shard, n)[0])
        else:
            add("all_gather", axes, "forward", volume("all_gather", shard, n)[0])
            add("reduce_scatter", axes, "backward", volume("reduce_scatter", padded, n)[0])
            if unit in regathered:
                add("all_gather", axes, "backward", volume("all_gather", shard, n)[0])
    return want


def _split(records, buckets):
    """(ZeRO's records by (op, axes, phase), the rest): ZeRO's are 1-D bucket-sized collectives over a bucket's axes."""
    sizes = {(axes, n, padded) for _, axes, n, padded in buckets}
    zero_part: dict[tuple[str, tuple[str, ...], str], int] = {}
    rest = []
    for r in records:
        nbytes = r.shape[0] * r.dtype.itemsize if len(r.shape) == 1 else -1
        mine = any(
            r.axes == axes and ((r.op != "all_gather" and nbytes == padded) or (r.op == "all_gather" and nbytes * n == padded))
            for axes, n, padded in sizes
        )
        if mine and r.op in ("all_reduce", "reduce_scatter", "all_gather"):
            zero_part[(r.op, r.axes, r.phase)] = zero_part.get((r.op, r.axes, r.phase), 0) + r.bytes_sent
        else:
            rest.append((r.op, r.axes, r.phase, r.shape, r.bytes_sent))
    return zero_part, rest


@pytest.mark.parametrize("setup", [ULYSSES, EP], ids=["dp2xulysses2", "dp2xep2"])
def test_bytes_per_step_and_model_states_per_rank_are_the_formulas_per_group(setup):
    plan, sizes, cfg = setup
    stages = (0, 1, 2, 3)
    results = colofn.launch(_program, plan, sizes, cfg, stages, world_size=4)
    for rank_result in results:
        for stage, (_, memory, buckets, _) in rank_result.items():
            # fp32 Adam without a master copy: params 4, grads 4, mu + nu 8 bytes per element, each group
            # by the ZeRO formula over its own ranks; plus Adam's int32 count.
            want = 4 + sum(zero.formula_bytes(stage=stage, params=padded, grads=padded, states=2 * padded, n=n) for _, _, n, padded in buckets)
            assert memory.model_states == want, f"ZeRO-{stage}"
    per_stage = results[0]
    model_parts = []
    for stage in stages:
        records, _, buckets, schedule = per_stage[stage]
        groups = {axes for _, axes, _, _ in buckets}
        # dense weights over every data axis; expert weights (split over ep) over dp alone
        assert groups == ({("dp", "sp")} if "sp" in sizes else {("dp", "ep"), ("dp",)})
        zero_part, rest = _split(records, buckets)
        assert zero_part == _zero_expected(stage, buckets, sizes, schedule), f"ZeRO-{stage}"
        model_parts.append(rest)
    # What the strategy itself sends does not depend on the stage.
    assert all(part == model_parts[0] for part in model_parts)
    if "sp" in sizes:  # Ulysses: the table of docs/strategies.md, plus the loss
        b, s = B // sizes["dp"], S // sizes["sp"]
        block = b * s * cfg.d_model * 4
        per_layer = volume("all_to_all", 3 * block, 2)[0] + volume("all_to_all", block, 2)[0]  # q, k, v stacked; the output
        want = 2 * cfg.n_layers * per_layer  # forward and backward
        want += volume("all_reduce", 8, 2)[0]  # [nll, count] over sp, in the loss
        want += volume("all_reduce", 4, 2)[0]  # ZeRO's mean of the dp ranks' losses
        assert sum(r[-1] for r in model_parts[0]) == want
        assert {(op, axes) for op, axes, *_ in model_parts[0]} == {("all_to_all", ("sp",)), ("all_reduce", ("sp",)), ("all_reduce", ("dp",))}
    else:  # ep: the MoE layers' all-to-alls and routing; the loss is already the whole step's (no ZeRO mean)
        ops = {(op, axes) for op, axes, *_ in model_parts[0]}
        assert ("all_to_all", ("ep",)) in ops and ("all_reduce", ("dp",)) not in ops


def _error(kind, **kw):
    def program():
        mesh = colofn.Mesh((2, 2), ("dp", "sp"))
        opt = optim.sgd(0.1)
        if kind == "init":
            zero.init({"w": torch.ones(4)}, opt, mesh, stage=1, **kw)
        state = zero.init({"w": torch.ones(4)}, opt, mesh, axis=("dp", "sp"), stage=1)
        zero.train_step(lambda p, b: (b * p["w"]).sum(), opt, state, torch.ones(2, 3), **kw)

    with pytest.raises((SpecError, ShapeError)) as e:
        colofn.launch(program, world_size=4)
    return str(e.value)


def test_errors_of_several_data_axes_name_the_axis_and_the_fix():
    assert "names an axis twice" in _error("init", axis=("dp", "dp"))
    assert "axis='xx' is not an axis of" in _error("init", axis=("dp", "xx"))
    text = _error("step", batch_spec=P("dp", "sp"))
    assert "dim 1 of shape (2, 3) is not divisible by the 2 ranks of ('sp',)" in text
    assert "batch_spec=P('dp', 'tp') names 'tp', not an axis of Mesh(dp=2, sp=2)" in _error("step", batch_spec=P("dp", "tp"))


@pytest.mark.parametrize(
    "mesh,extra",
    [
        ("dp=2,sp=2", {"sp": "ring", "zero": 3}),  # ZeRO over dp x sp
        ("dp=2,ep=2", {"experts": 2, "zero": 2}),  # dense buckets over dp x ep, expert buckets over dp
        # MoE without ep: routing over the whole batch (each dp rank's own routing was 4e-5 off by step 3)
        ("dp=2", {"experts": 4, "zero": 1}),
    ],
)
def test_colofn_train_zero_with_sp_and_ep_equals_single_device(tmp_path, capsys, mesh, extra):
    from colofn.train import TrainConfig, parse_mesh, train

    cfg = TrainConfig(mesh=tuple(parse_mesh(mesh).items()), steps=3, warmup=1, check=True, out=str(tmp_path / "out"), **extra)
    assert train(cfg) == 0
    assert "OK: parallel training equals single-device training" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert all(abs(a - b) < 1e-5 for a, b in zip(record["loss"], record["single"], strict=True))


def _resume_program(plan, sizes, cfg, stage, to):
    """Train a step, export, resume at stage ``to``, export again: the same global state."""
    mesh = colofn.Mesh(tuple(sizes.values()), tuple(sizes))
    inner = zero_loss_plan(plan, cfg)
    opt = optim.adam(1e-2)
    state = zero.init(shard_params(gpt.init(random.key(0), cfg), cfg, inner, mesh), opt, mesh, axis=zero_axes(plan), stage=stage)
    state, _ = zero.train_step(lambda p, b: local_loss(p, b, cfg, inner), opt, state, _batch(cfg), batch_spec=batch_specs(plan)["tokens"])
    first = zero.export_state(state)
    again = zero.export_state(zero.init(optimizer=opt, mesh=mesh, axis=zero_axes(plan), stage=to, **first))
    return [(a - b).abs().max().item() for a, b in zip(colofn.tree.leaves((first["params"], first["opt_state"])), colofn.tree.leaves((again["params"], again["opt_state"])), strict=True)]


def test_export_and_resume_at_another_stage_keep_every_groups_shards():
    plan, sizes, cfg = EP  # two groups: dense buckets over dp x ep, expert buckets over dp
    for errors in colofn.launch(_resume_program, plan, sizes, cfg, 2, 1, world_size=4):
        assert max(errors) == 0.0
