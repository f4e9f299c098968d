"""``colofn pipeline show`` through add_subparser, as the top-level CLI will call it."""

import argparse
import sys
import textwrap

import pytest

from colofn.pipeline import cli


def run(argv):
    parser = argparse.ArgumentParser(prog="colofn")
    cli.add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_show_prints_grid_and_summary(capsys):
    assert run(["pipeline", "show", "1f1b", "--stages", "2", "--microbatches", "3"]) == 0
    out = capsys.readouterr().out
    assert out == "\n".join([
        "step     0   1   2   3   4   5",
        "rank 0 0F0 0F1 0B0 0F2 0B1 0B2",
        "rank 1 1F0 1B0 1F1 1B1 1F2 1B2",
        "",
        "1f1b: 2 ranks, 2 stages, 3 microbatches",
        "makespan 12, bubble 25.0% of all rank time",
        "rank      busy      idle  bubble  peak act  peak W stash",
        "   0         9         3   25.0%         2             0",
        "   1         9         3   25.0%         1             0",
        "",
    ])


def test_show_options(tmp_path, capsys):
    svg = tmp_path / "zbv.svg"
    code = run(["pipeline", "show", "zbv", "--ranks", "2", "--microbatches", "4", "--chunks", "2",
                "--forward", "1", "--input-grad", "1", "--weight-grad", "0.5", "--latency", "0.1",
                "--timeline", "--svg", str(svg)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("rank 0 ") == 2  # the schedule grid and the timeline grid
    assert f"wrote {svg}" in out
    assert svg.read_text().startswith("<svg")


def test_show_reports_errors(capsys):
    assert run(["pipeline", "show", "interleaved_1f1b", "--stages", "4", "--microbatches", "6"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: interleaved_1f1b needs num_microbatches to be a multiple")
    assert run(["pipeline", "show", "nope"]) == 1
    assert "Unknown pipeline schedule 'nope'" in capsys.readouterr().err


def test_show_user_schedule(tmp_path, monkeypatch, capsys):
    (tmp_path / "cli_pipes.py").write_text(textwrap.dedent("""
        from colofn.pipeline import Schedule

        def backwards_first(num_ranks, num_microbatches):
            return Schedule([["0B0", "0F0"]], 1, 1, (0,), name="backwards_first")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run(["pipeline", "show", "cli_pipes:backwards_first"]) == 1
    err = capsys.readouterr().err
    assert "error: Schedule 'backwards_first' (1 ranks, 1 stages, 1 microbatches) is not valid:" in err
    assert "order: needs its own forward 0F0" in err
    sys.modules.pop("cli_pipes", None)


def test_main_and_required_subcommand(capsys):
    assert cli.main(["pipeline", "show", "gpipe", "--stages", "2", "--microbatches", "2"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["pipeline"])
