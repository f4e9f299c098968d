"""Plans, their checks and the specs derived from them (no world needed)."""

from __future__ import annotations

import pytest
import torch

from colofn import P
from colofn.models import gpt
from colofn.parallel import (
    Plan,
    PlanError,
    batch_specs,
    check_batch,
    check_plan,
    layer_specs,
    param_specs,
    rules,
    spec_for,
)
from colofn.parallel.specs import dotted


def test_plan_is_frozen_and_hashable():
    plan = Plan(dp="dp", tp="tp")
    with pytest.raises(AttributeError):
        plan.tp = "x"  # type: ignore[misc]
    assert plan == Plan(dp="dp", tp="tp") and len({plan, Plan(dp="dp", tp="tp")}) == 1


@pytest.mark.parametrize(
    ("plan", "batch", "seq", "tokens"),
    [
        (Plan(), (), None, ()),
        (Plan(dp=("dp", "fsdp")), ("dp", "fsdp"), None, ("dp", "fsdp")),
        (Plan(dp="dp", tp="tp", sp="megatron"), ("dp",), "tp", ("dp",)),
        (Plan(dp="dp", sp="ring", sp_axis="sp"), ("dp",), "sp", ("dp", "sp")),
        (Plan(dp="dp", ep="ep"), ("dp", "ep"), None, ("dp", "ep")),
        (Plan(dp="dp", ep="dp"), ("dp",), None, ("dp",)),
        (Plan(sp="ulysses", sp_axis="sp", ep="sp"), (), "sp", ("sp",)),
    ],
)
def test_derived_axes(plan, batch, seq, tokens):
    assert (plan.batch_axes, plan.seq_axis, plan.token_axes) == (batch, seq, tokens)


def test_rules_are_data_and_first_match_wins():
    table = rules(Plan(tp="tp", ep="ep"))
    assert spec_for("layers.3.attn.wq", table) == P(None, "tp")
    assert spec_for("layers.0.moe.w2", table) == P("ep", "tp")
    assert spec_for("layers.0.moe.router", table) == P()
    assert spec_for("layers.0.norm1.scale", table) == P()
    assert spec_for("x", {"*": P("a"), "x": P("b")}) == P("a")
    assert dotted("['layers'][0]['attn']['wq']") == "layers.0.attn.wq"


def test_param_specs_cover_every_leaf_and_fit_shapes():
    cfg = gpt.config(
        "tiny", n_experts=4, moe_every=2, tie_embeddings=False, pos="rotary", norm="rmsnorm"
    )
    specs = param_specs(cfg, Plan(dp="dp", tp="tp", ep="dp"))
    shapes = gpt.abstract_params(cfg)
    assert specs["embed"] == {"tok": P("tp")}
    assert specs["head"] == P(None, "tp")
    assert specs["layers"][1]["moe"] == {
        "router": P(),
        "w1": P("dp", None, "tp"),
        "w2": P("dp", "tp"),
    }
    assert specs["layers"][0]["mlp"] == {"w1": P(None, "tp"), "w2": P("tp")}
    from colofn import tree

    for (path, spec), (_, leaf) in zip(
        tree.leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P)),
        tree.leaves_with_path(shapes),
        strict=True,
    ):
        assert len(spec) <= leaf.ndim, tree.keystr(path)


def test_plan_without_tp_replicates_everything():
    specs = param_specs(gpt.config("tiny"), Plan(dp="dp"))
    from colofn import tree

    assert all(s == P() for s in tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def test_layer_specs_is_a_slice_for_pipeline_stages():
    cfg = gpt.config("tiny", n_layers=4, n_experts=2, moe_every=2)
    stage = layer_specs(cfg, Plan(tp="tp", ep="ep"), range(1, 3))
    assert len(stage) == 2 and "moe" in stage[0] and "mlp" in stage[1]
    assert stage == param_specs(cfg, Plan(tp="tp", ep="ep"))["layers"][1:3]


def test_batch_specs():
    assert batch_specs(Plan())["tokens"] == P()
    assert batch_specs(Plan(dp="dp", tp="tp", sp="megatron"))["targets"] == P("dp")
    assert batch_specs(Plan(dp="dp", sp="ring", sp_axis="sp"))["tokens"] == P("dp", "sp")
    assert batch_specs(Plan(dp="dp", ep="ep"))["tokens"] == P(("dp", "ep"))


def test_check_plan_collects_every_problem():
    cfg = gpt.config("tiny", vocab_size=255, n_heads=2, d_ff=126, dropout=0.1, n_experts=4)
    plan = Plan(dp="dp", tp="tp", sp="ulysses", sp_axis="sp", ep="ep")
    with pytest.raises(PlanError) as e:
        check_plan(plan, cfg, {"dp": 2, "tp": 4, "ep": 3, "sp": 2})
    msg = str(e.value)
    assert msg.splitlines()[0].endswith(
        "does not fit the model or mesh {'dp': 2, 'tp': 4, 'ep': 3, 'sp': 2}:"
    )
    for part in [
        "n_heads=2 is not divisible by tp=4",
        "vocab_size=255 is not divisible by tp=4 (vocabulary-parallel embedding and loss); pad it: vocab_size=256",
        "d_ff=126 is not divisible by tp=4",
        "needs n_heads=2 divisible by tp * sp = 8",
        "n_experts=4 is not divisible by ep=3",
        "dropout=0.1 is not implemented",
    ]:
        assert part in msg, part
    assert msg.count("\n  * ") == 6
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    ("plan", "mesh", "text"),
    [
        (Plan(tp="tp"), {"dp": 2}, "tp='tp' is not a mesh axis; the mesh axes are ('dp',)"),
        (Plan(dp="x", tp="x"), {"x": 2}, "axis 'x' is used for both dp and tp"),
        (
            Plan(tp="tp", sp="ulysses", sp_axis="tp"),
            {"tp": 2},
            "axis 'tp' is used for both tp and sp_axis",
        ),
        (Plan(ep="tp", tp="tp"), {"tp": 2}, "axis 'tp' is used for both tp and ep"),
        (
            Plan(sp="megatron"),
            {"tp": 2},
            "sp='megatron' splits the sequence over the tp axis, but tp is None",
        ),
        (Plan(sp="ring"), {"sp": 2}, "sp='ring' needs sp_axis"),
        (Plan(sp_axis="sp"), {"sp": 2}, "sp_axis='sp' is set but sp='none'"),
        (
            Plan(sp="zigzag", sp_axis="sp"),
            {"sp": 2},
            "sp='zigzag' is not one of 'none', 'megatron', 'ulysses', 'ring'",
        ),
        (
            Plan(dp="dp", ep="ep"),
            {"ep": 2, "dp": 2},
            "the batch is split over ('dp', 'ep'), which must be listed in mesh order ('ep', 'dp')",
        ),
        (Plan(ep="ep"), {"ep": 2}, "ep='ep' is set but the model has no experts"),
        (Plan(pp="dp", dp="dp"), {"dp": 2}, "axis 'dp' is used for both dp and pp"),
    ],
)
def test_check_plan_messages(plan, mesh, text):
    with pytest.raises(PlanError, match="does not fit") as e:
        check_plan(plan, gpt.config("tiny"), mesh)
    assert text in str(e.value)


def test_ep_may_share_the_data_or_sequence_axis():
    moe = gpt.config("tiny", n_experts=4)
    check_plan(Plan(dp="dp", ep="dp"), moe, {"dp": 2})
    check_plan(Plan(sp="ring", sp_axis="sp", ep="sp"), moe, {"sp": 2})
    check_plan(Plan(tp="tp", sp="megatron", sp_axis="tp"), moe, {"tp": 2})


def test_check_plan_rejects_other_types():
    with pytest.raises(TypeError, match="Plan"):
        check_plan({"dp": "dp"}, gpt.config("tiny"), {"dp": 2})  # type: ignore[arg-type]


def test_check_batch():
    plan = Plan(dp="dp", sp="ring", sp_axis="sp")
    check_batch(plan, {"dp": 2, "sp": 4}, (4, 8), 8)
    with pytest.raises(PlanError) as e:
        check_batch(plan, {"dp": 2, "sp": 4}, (3, 10), 8)
    msg = str(e.value)
    assert "batch 3 is not divisible by the 2 ranks of ('dp',)" in msg
    assert (
        "seq 10 is not divisible by 2 * sp = 8 (sp='ring' splits the sequence over 'sp' "
        "into 2 zig-zag chunks per rank, one from each end); use a seq length that is a multiple of 8"
    ) in msg
    assert "seq 10 is longer than config.seq_len=8" in msg
    with pytest.raises(PlanError, match=r"tokens must be \[batch, seq\]"):
        check_batch(plan, {"dp": 2, "sp": 4}, (4,), 8)
    check_batch(Plan(dp="dp", tp="tp", sp="megatron"), {"dp": 1, "tp": 2}, torch.Size([1, 6]), 8)
    with pytest.raises(PlanError, match=r"seq 6 is not divisible by sp=4 \(sp='ulysses'"):
        check_batch(Plan(sp="ulysses", sp_axis="sp"), {"sp": 4}, (1, 6), 8)
