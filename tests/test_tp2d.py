"""2D / 2.5D tensor parallelism: the plan's and the flags' refusals, and ``colofn train --tp-mode 2d --check``.

Equality with one device (loss, gradients, AdamW step) and the bytes sent are
proven by ``property_tests/test_tp2d_props.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

import colofn
from colofn import cli, random, tree, world
from colofn.models import gpt
from colofn.parallel import Plan, PlanError, check_plan, make_loss, shard_params, tp2d
from colofn.train import TrainConfig, parse_mesh, train

GRID = Plan(tp_mode="2d", tp_grid=("r", "c"))


def plan_error(plan, cfg, shape) -> str:
    with pytest.raises(PlanError) as e:
        check_plan(plan, cfg, shape)
    return str(e.value)


def test_plan_refuses_what_the_grid_cannot_split():
    text = plan_error(GRID, gpt.config("tiny", n_heads=2, d_model=32), {"r": 3, "c": 3})
    assert text.count("\n  * ") == 4, text  # every failure at once
    assert "n_heads=2 is not divisible by q=3 (r x c grid); attention splits heads over the grid's columns" in text
    assert "d_model=32 is not divisible by q=3 (r x c grid)" in text
    assert "d_ff=128 is not divisible by q=3 (r x c grid)" in text
    assert "vocab_size=256 is not divisible by q=3 (the embedding and the logits are split by vocabulary over the grid); pad it: vocab_size=258" in text
    assert "needs a square q x q grid, but r=2 and c=4" in plan_error(GRID, gpt.config("tiny"), {"r": 2, "c": 4})
    assert "mixture-of-experts layers are not implemented under tp_mode='2d'" in plan_error(
        GRID, gpt.config("tiny", n_experts=2), {"r": 2, "c": 2}
    )


def test_plan_refuses_a_malformed_grid():
    text = plan_error(Plan(tp="tp", pp="pp", tp_mode="2.5d", tp_grid=("r", "c"), sp="megatron"), gpt.config("tiny"), {"tp": 2, "r": 2, "c": 2, "pp": 2})
    assert "pp='pp': pipeline stages pass the residual stream split by batch and sequence only" in text
    assert "tp_mode='2.5d' needs tp_grid=(row, col, depth), 3 mesh axes; got tp_grid=('r', 'c')" in text
    assert "tp_mode='2.5d' splits the weights over tp_grid; tp='tp' must be None" in text
    assert "sp='megatron' does not compose with tp_mode='2.5d' yet; use sp='none'" in text
    assert "tp_mode='4d' is not one of '1d', '2d', '2.5d', '3d'" in plan_error(Plan(tp_mode="4d"), gpt.config("tiny"), {})
    assert "tp_grid=('r', 'c') is set but tp_mode='1d'" in plan_error(Plan(tp_grid=("r", "c")), gpt.config("tiny"), {"r": 2, "c": 2})
    text = plan_error(Plan(dp="r", tp_mode="2d", tp_grid=("r", "x")), gpt.config("tiny"), {"r": 2, "c": 2})
    assert "tp_grid='x' is not a mesh axis" in text
    assert "axis 'r' is used for both dp and tp_grid" in text


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--mesh", "tp=6", "--tp-mode", "2d"], "--tp-mode 2d needs tp = q * q (a square grid), but tp=6; use tp=4 or tp=9"),
        (["--mesh", "tp=8", "--tp-mode", "2.5d", "--tp-depth", "3"], "--tp-mode 2.5d needs tp = q * q * depth, but tp=8 with --tp-depth 3 is not"),
        (["--mesh", "dp=2", "--tp-mode", "2d"], "--tp-mode 2d splits the tp axis into a grid: add tp=N to --mesh"),
        (["--mesh", "tp=4", "--tp-depth", "2"], "--tp-depth 2 is the depth of --tp-mode 2.5d"),
        (["--mesh", "tp=4", "--tp-remat"], "--tp-remat keeps SUMMA blocks instead of panels: it needs --tp-mode 2d or 2.5d"),
        (["--mesh", "pp=2,tp=4", "--tp-mode", "2d"], "--tp-mode 2d does not compose with pp (pipeline stages) in this release"),
        (["--mesh", "dp=2,tp=4", "--tp-mode", "2d", "--zero", "1"], "--tp-mode 2d does not compose with --zero"),
        (["--mesh", "tp=4", "--tp-mode", "2d", "--preset", "gpt2-124m"], "vocab_size=50257 is not divisible by q=2"),
    ],
)
def test_bad_grid_flags_exit_2_before_any_world(monkeypatch, tmp_path, capsys, flags, needle):
    monkeypatch.setattr(world, "launch", lambda *a, **k: pytest.fail("a world was started"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *flags]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("remat", [False, True])
def test_train_tp_mode_2d_equals_single_device(tmp_path, capsys, remat):
    cfg = TrainConfig(mesh=tuple(parse_mesh("tp=4").items()), tp_mode="2d", tp_remat=remat, steps=3, warmup=1,
                      batch_size=4, check=True, out=str(tmp_path / "out"))
    assert cfg.device_mesh_shape == {"tp_row": 2, "tp_col": 2}
    assert train(cfg) == 0
    out = capsys.readouterr().out
    assert "tp_mode='2d', tp_grid=('tp_row', 'tp_col')" in out
    assert "OK: parallel training equals single-device training" in out
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert all(abs(a - b) < 1e-5 for a, b in zip(record["loss"], record["single"], strict=True))


def _second_order_program(params, batch, cfg):
    mesh = colofn.Mesh((2, 2), ("r", "c"))
    p = tree.map(lambda x: x.requires_grad_(), shard_params(params, cfg, GRID, mesh))
    with tp2d.rematerialize():
        loss = make_loss(cfg, GRID, mesh)(p, batch)
    torch.autograd.grad(loss.to_local(), tree.leaves(p), create_graph=True)


def test_rematerialize_refuses_higher_order_gradients():
    cfg = gpt.config("tiny", n_layers=1)
    t = random.randint(random.key(1), (2, 5), 0, cfg.vocab_size)
    with pytest.raises(NotImplementedError, match="create_graph=True .* through a rematerialised SUMMA panel is not supported"):
        colofn.launch(_second_order_program, gpt.init(random.key(0), cfg), {"tokens": t[:, :-1], "targets": t[:, 1:]}, cfg, world_size=4)
