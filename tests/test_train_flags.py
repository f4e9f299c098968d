"""``colofn train`` flags: every one documented with its default, every bad one refused with exit 2 before any world."""

from __future__ import annotations

import argparse
import re

import pytest

from colofn import cli, world


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_help_gives_every_flag_a_text_and_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = [a for a in train_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 17
    # One help block per flag: from its option string to the next flag's.
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for action in flags:
        assert action.help, f"{action.option_strings} has no help text"
        block = " ".join(next(b for b in blocks if b.startswith(action.option_strings[-1] + " ")).split())
        assert "default" in block, f"{action.option_strings} does not show its default:\n{block}"
    assert "--warmup WARMUP steps of linear learning-rate warmup from 0 (>= 0) (default: 5)" in " ".join(text.split())


BAD = [
    (["--mesh", "pp=2", "--microbatches", "0"], "--microbatches must be an integer >= 1, got 0"),
    (["--mesh", "pp=2", "--microbatches", "3"], "--microbatches 3 must divide each dp rank's batch (8 = --batch-size 8 / dp 1)"),
    (["--warmup", "-3"], "--warmup must be an integer >= 0, got -3"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--batch-size", "-1"], "--batch-size must be an integer >= 1, got -1"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be an integer >= 0, got -1"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--experts", "-1"], "n_experts=-1 must be an int >= 0"),
    (["--mesh", "dp=0"], "'dp=0' is not NAME=SIZE with SIZE >= 1"),
    (["--mesh", "dp=2,xx=2"], "unknown axis 'xx'; the axes are pp, dp, sp, tp, ep"),
    (["--mesh", "dp=3"], "batch 8 is not divisible by the 3 ranks of ('dp',)"),
    (["--mesh", "dp=2", "--microbatches", "2"], "--microbatches 2 splits the batch of a pipeline: add pp=N to --mesh"),
    (["--mesh", "dp=2", "--schedule", "gpipe"], "--schedule gpipe is a pipeline schedule: add pp=N to --mesh"),
    (["--mesh", "pp=2", "--schedule", "nope"], "--schedule 'nope' is unknown"),
    (["--zero", "4"], "--zero 4: the stages are 0, 1, 2, 3"),
    (["--mesh", "tp=2", "--zero", "1"], "--zero shards over the dp axis: add dp=N to --mesh"),
    (["--mesh", "dp=2,ep=2"], "--mesh has an ep axis: pass --experts N"),
    (["--sp", "ring"], "--sp ring splits the sequence over an sp axis: add sp=N to --mesh"),
    (["--preset", "huge"], "Unknown preset 'huge'"),
    (["--resume", "no/such/dir"], "--resume no/such/dir: no such directory"),
    (["--backend", "env"], "--backend env joins the world torchrun started, but RANK and WORLD_SIZE are not set"),
]


@pytest.fixture
def no_world(monkeypatch, tmp_path):
    """Any world started is a failure; run in an empty directory (so --out is never written)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a world was started")

    monkeypatch.setattr(world, "launch", refuse)
    monkeypatch.setattr(world, "initialize", refuse)
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("flags,needle", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_flag_exits_2_before_any_world(no_world, capsys, flags, needle):
    assert cli.main(["train", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("colofn train: error: the run cannot start:") or err.startswith("colofn train: error: --mesh"), err
    assert needle in err
    assert list(no_world.iterdir()) == []


def test_every_problem_is_listed_at_once(no_world, capsys):
    assert cli.main(["train", "--steps", "0", "--warmup", "-1", "--lr", "-2", "--out", "f"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n  * ") == 3, err


def test_out_must_not_be_a_file(no_world, capsys):
    (no_world / "taken").write_text("x")
    assert cli.main(["train", "--out", "taken"]) == 2
    assert "--out taken is a file: give a directory" in capsys.readouterr().err


def test_bad_types_and_choices_are_argparse_errors(no_world, capsys):
    for flags in (["--steps", "many"], ["--sp", "sideways"], ["--backend", "mpi"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", *flags])
        assert e.value.code == 2
        assert "colofn train: error: argument" in capsys.readouterr().err


def test_resume_needs_a_complete_checkpoint(no_world, capsys):
    (no_world / "ckpts" / "step_000002").mkdir(parents=True)  # a save that never finished: no marker
    assert cli.main(["train", "--resume", "ckpts"]) == 2
    assert "--resume ckpts: no complete checkpoint there" in capsys.readouterr().err


def test_torchrun_world_size_must_match_the_mesh(no_world, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "--mesh", "dp=2,tp=2"]) == 2
    assert "has 4 devices but torchrun started 2 processes: make the mesh sizes multiply to 2" in capsys.readouterr().err
