"""``colofn train``: composed strategies equal single-device training; resume across meshes; clear flag errors."""

from __future__ import annotations

import json
import os

import pytest

from colofn.errors import ConfigError
from colofn.train import TrainConfig, parse_mesh, train, validate


def cfg(mesh: str, tmp_path, **kw) -> TrainConfig:
    # Three steps, warmup 1: the learning rate starts at 0, so only the third loss
    # depends on the gradients (and optimizer update) of a step.
    kw.setdefault("steps", 3)
    kw.setdefault("warmup", 1)
    kw.setdefault("check", True)
    return TrainConfig(mesh=tuple(parse_mesh(mesh).items()), out=str(tmp_path / "out"), **kw)


def losses(tmp_path) -> tuple[list[float], list[float]]:
    with open(tmp_path / "out" / "record.json") as f:
        r = json.load(f)
    return r["loss"], r["single"]


@pytest.mark.parametrize(
    "mesh,extra",
    [
        ("dp=2,tp=2", {}),
        ("dp=2,tp=2", {"sp": "megatron", "zero": 2}),
        ("pp=2,dp=2,tp=2", {"schedule": "1f1b"}),
        ("pp=2,dp=2", {"schedule": "gpipe", "microbatches": 2}),
        ("dp=2,ep=2", {"experts": 2}),
        ("dp=2,sp=2", {"sp": "ring"}),
        ("pp=2,sp=2", {"sp": "ring", "schedule": "1f1b", "microbatches": 2}),  # zig-zag tokens/targets per stage
        ("pp=2,dp=2", {"zero": 1, "schedule": "1f1b"}),  # ZeRO inside stages: one reduce-scatter per step
        ("pp=2,dp=2", {"zero": 2, "schedule": "zb_h1", "microbatches": 2}),
        ("pp=2,dp=2", {"experts": 2, "schedule": "1f1b", "microbatches": 2}),  # the balancing loss rides the activations
    ],
)
def test_composed_strategies_equal_single_device(tmp_path, capsys, mesh, extra):
    assert train(cfg(mesh, tmp_path, **extra)) == 0
    out = capsys.readouterr().out
    assert "OK: parallel training equals single-device training" in out
    par, single = losses(tmp_path)
    assert len(par) == 3
    assert all(abs(a - b) < 1e-5 for a, b in zip(par, single, strict=True))
    assert (tmp_path / "out" / "loss_curve.svg").read_text().startswith("<svg")
    assert "max |loss difference|" in (tmp_path / "out" / "report.md").read_text()


def test_resume_on_another_mesh_continues_the_loss_curve(tmp_path):
    first = cfg("dp=2,tp=2", tmp_path / "a", steps=4, checkpoint_every=2, check=False)
    assert train(first) == 0
    full, _ = losses(tmp_path / "a")
    ckpt = os.path.join(first.out, "checkpoints", "step_000002")
    for i, (mesh, extra) in enumerate([("pp=2,dp=2", {}), ("dp=4", {"zero": 3})]):
        resumed = cfg(mesh, tmp_path / f"b{i}", steps=4, resume=ckpt, check=False, **extra)
        assert train(resumed) == 0
        tail, _ = losses(tmp_path / f"b{i}")
        assert tail == pytest.approx(full[2:], abs=1e-5)


def test_bad_flags_get_one_message_before_any_work(tmp_path):
    bad = cfg("pp=3,dp=2,tp=3", tmp_path, zero=5, schedule="nope", batch_size=6)
    with pytest.raises(ConfigError) as e:
        validate(bad)
    text = str(e.value)
    assert text.startswith("colofn train: the run cannot start:")
    for needle in [
        "--zero 5: the stages are 0, 1, 2, 3",
        "--schedule 'nope' is unknown; the built-in schedules are gpipe, 1f1b",
        "--microbatches 6 must divide each dp rank's batch (3 = --batch-size 6 / dp 2)",
        "n_heads=4 is not divisible by tp=3",
    ]:
        assert needle in text
    assert not (tmp_path / "out").exists()


def test_mesh_flag_errors():
    with pytest.raises(ConfigError, match="unknown axis 'xx'; the axes are pp, dp, sp, tp, ep"):
        parse_mesh("dp=2,xx=2")
    with pytest.raises(ConfigError, match="'dp=0' is not NAME=SIZE with SIZE >= 1"):
        parse_mesh("dp=0")
    with pytest.raises(ConfigError, match="axis 'dp' given twice"):
        parse_mesh("dp=2,dp=2")


def test_layers_must_split_into_stages(tmp_path):
    with pytest.raises(ConfigError, match="has 4 stages but preset 'tiny' has 2 layers"):
        validate(cfg("pp=2,dp=2", tmp_path, schedule="zbv"))


def test_cli_reports_errors_with_exit_code_2(capsys):
    from colofn.cli import main

    assert main(["train", "--mesh", "dp=2,sp=2"]) == 2
    assert "--mesh has an sp axis but --sp is none" in capsys.readouterr().err
