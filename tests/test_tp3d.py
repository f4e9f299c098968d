"""3D tensor parallelism: ``colofn train --tp-mode 3d`` equals one device, and every misfit is refused with its reason.

The equivalence of the loss, gradients, AdamW step and the bytes sent, for
random models and grids, is in ``property_tests/test_tp3d_props.py``.
"""

from __future__ import annotations

import json

import pytest

from colofn import cli
from colofn.models import gpt
from colofn.parallel import Plan, PlanError, check_batch, check_plan, param_specs
from colofn.parallel.tp3d import volume
from colofn.train import tp3d as train_tp3d
from test_train_flags import no_world  # noqa: F401 - the fixture: any world started fails the test

PLAN = Plan(tp_mode="3d", tp_grid=("i", "w", "o"))
CUBE = {"i": 2, "w": 2, "o": 2}


def test_train_3d_check_equals_single_device(tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--mesh", "tp=8", "--tp-mode", "3d", "--steps", "3", "--warmup", "1", "--batch-size", "4", "--check", "--out", str(out)]
    assert cli.main(["train", *flags]) == 0
    text = capsys.readouterr().out
    assert "OK: parallel training equals single-device training" in text
    assert "tp_mode='3d', tp_grid=('tp_in', 'tp_w', 'tp_out')" in text
    record = json.loads((out / "record.json").read_text())
    assert all(abs(a - b) < 1e-5 for a, b in zip(record["loss"], record["single"], strict=True))


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--mesh", "tp=4"], "tp=4 is not a cube: use tp=1 or tp=8 (2^3)"),
        (["--mesh", "dp=2"], "--tp-mode 3d splits the tp axis into a cube: add tp=8 (2^3) to --mesh"),
        (["--mesh", "dp=2,tp=8", "--zero", "1"], "--tp-mode 3d composes with dp only in this release: drop --zero"),
        (["--mesh", "tp=8", "--sp", "megatron"], "drop --sp"),
        (["--mesh", "tp=8", "--batch-size", "6"], "batch 6 is not divisible by 4: tp_mode='3d' splits it"),
        (["--mesh", "tp=8,dp=2"], "list dp before tp in --mesh (--mesh dp=2,tp=8)"),
        (["--mesh", "tp=27", "--preset", "tiny"], "d_model=32 is not divisible by output=3"),
    ],
)
@pytest.mark.usefixtures("no_world")
def test_bad_3d_flags_exit_2_before_any_world(capsys, flags, needle):
    assert cli.main(["train", "--tp-mode", "3d", *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err, err


def test_check_plan_names_every_misfit_of_the_grid():
    cfg = gpt.config("tiny", vocab_size=250, d_ff=126, n_heads=2, d_model=34)
    with pytest.raises(PlanError) as e:
        check_plan(PLAN, cfg, {"i": 4, "w": 2, "o": 4})
    text = str(e.value)
    assert "Plan(dp=None, tp=None, sp='none', sp_axis=None, ep=None, pp=None, tp_mode='3d', tp_grid=('i', 'w', 'o'))" in text
    for needle in (
        "d_model=34 is not divisible by output=4 (the residual stream splits d_model over the output axis)",
        "n_heads=2 is not divisible by input=4 (attention splits heads over the input axis)",
        "d_ff=126 is not divisible by input * weight = 8",
        "vocab_size=250 is not divisible by input * weight = 8 (the embedding and head split the vocabulary over both); pad it: vocab_size=256",
    ):
        assert needle in text, text
    with pytest.raises(PlanError, match="needs tp_grid=\\(input, weight, output\\), three mesh axis names; got \\('i', 'w'\\)"):
        check_plan(Plan(tp_mode="3d", tp_grid=("i", "w")), cfg, CUBE)
    with pytest.raises(PlanError, match="tp='tp' is set with tp_mode='3d'; the grid .* replaces it: set tp=None"):
        check_plan(Plan(tp="tp", tp_mode="3d", tp_grid=("i", "w", "o")), cfg, {**CUBE, "tp": 1})
    with pytest.raises(PlanError, match="tp_mode='4d' is not one of '1d', '2d', '2.5d', '3d'"):
        check_plan(Plan(tp_mode="4d"), cfg, {})  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="the mesh \\('w', 'i', 'o'\\) must list the grid's axes in the order input 'i', weight 'w', output 'o'"):
        check_plan(PLAN, gpt.config("tiny"), {"w": 2, "i": 2, "o": 2})
    with pytest.raises(PlanError, match="batch 2 is not divisible by 4"):
        check_batch(PLAN, CUBE, (2, 8), 32)


def test_every_weight_matrix_is_split_over_the_whole_cube():
    cfg = gpt.config("tiny")
    specs = param_specs(cfg, PLAN)
    layer = specs["layers"][0]
    for spec in (layer["attn"]["wq"], layer["attn"]["wo"], layer["mlp"]["w1"], layer["mlp"]["w2"], specs["embed"]["tok"]):
        named = {a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())}
        assert named == {"i", "w", "o"}, spec
    m = volume.memory(cfg, PLAN, CUBE, batch=8, seq=32)
    assert m["stream"] == 8 * 32 * 32 // 8
    norms_and_pos = (2 * 2 * 2 + 2) * 32 // 2 + 32 * 32 // 2  # 2 layers x 2 norms + final, scale and bias; positions
    assert m["weights"] == (gpt.count_params(cfg) - (2 * 2 * 2 + 2) * 32 - 32 * 32) // 8 + norms_and_pos


def test_device_mesh_factors_tp_in_place():
    assert train_tp3d.device_mesh_shape({"dp": 2, "tp": 27}, "3d") == {"dp": 2, "tp_in": 3, "tp_w": 3, "tp_out": 3}
    assert train_tp3d.device_mesh_shape({"dp": 2, "tp": 8}, "1d") == {"dp": 2, "tp": 8}
    assert [train_tp3d.cube_side(n) for n in (1, 8, 27, 64, 9)] == [1, 2, 3, 4, None]
