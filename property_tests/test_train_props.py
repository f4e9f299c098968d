"""Pipelined GPT training (pp composed with dp, tp, Megatron-SP) equals single-device training.

Random schedule, mesh and small model; three steps with a one-step warmup (the
learning rate starts at 0), so the third loss also checks the gradients and
the optimizer update of the second.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from colofn.train import TrainConfig, parse_mesh, train

MESHES = ["pp=2,dp=2", "pp=2,tp=2", "pp=4", "dp=2,pp=2"]


@st.composite
def runs(draw):
    mesh = draw(st.sampled_from(MESHES))
    schedule = draw(st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv"]))
    pp = parse_mesh(mesh)["pp"]
    stages = pp * (2 if schedule in ("interleaved_1f1b", "zbv") else 1)
    preset = "tiny" if stages <= 2 else "small"  # tiny has 2 layers, small 4
    if stages > 4:
        schedule, stages = "1f1b", pp
    sp = "megatron" if "tp" in mesh and draw(st.booleans()) else "none"
    microbatches = draw(st.sampled_from([pp, 2 * pp]))
    return mesh, schedule, preset, sp, microbatches


@settings(max_examples=8)
@given(runs(), st.integers(0, 3))
def test_pipelined_training_equals_single_device(tmp_path_factory, run, seed):
    mesh, schedule, preset, sp, microbatches = run
    out = tmp_path_factory.mktemp("train")
    cfg = TrainConfig(
        preset=preset, mesh=tuple(parse_mesh(mesh).items()), steps=3, warmup=1, batch_size=8, seed=seed,
        schedule=schedule, sp=sp, microbatches=microbatches, check=True, out=str(out),
    )
    assert train(cfg) == 0
    record = json.loads((out / "record.json").read_text())
    for step, (par, single) in enumerate(zip(record["loss"], record["single"], strict=True)):
        assert abs(par - single) < 1e-5, (step, par, single)
