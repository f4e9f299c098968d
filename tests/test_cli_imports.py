"""``colofn run script.py`` imports modules next to the script, and ``--schedule module:function``
imports from the working directory, as ``python script.py`` / ``python -m`` would; ``sys.path`` is
restored after."""

from __future__ import annotations

import sys
import textwrap

import pytest

from colofn import cli


@pytest.fixture
def forget_modules():
    names: list[str] = []
    yield names
    for name in names:
        sys.modules.pop(name, None)


def test_run_imports_a_module_next_to_the_script(tmp_path, monkeypatch, capfd, forget_modules):
    forget_modules.append("colofn_test_helper_next_to_script")
    (tmp_path / "colofn_test_helper_next_to_script.py").write_text("VALUE = 41\n")
    script = tmp_path / "uses_helper.py"
    script.write_text(
        "import colofn, colofn_test_helper_next_to_script as h\n"
        "print(f'rank {colofn.process_index()} value {h.VALUE + 1}')\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the script's directory
    path_before = list(sys.path)
    assert cli.main(["run", "--devices", "2", str(script)]) == 0
    assert sorted(capfd.readouterr().out.split("\n")[:2]) == ["rank 0 value 42", "rank 1 value 42"]
    assert sys.path == path_before


def test_schedule_module_is_found_in_the_working_directory(tmp_path, monkeypatch, capsys, forget_modules):
    forget_modules.append("colofn_test_cwd_schedules")
    (tmp_path / "colofn_test_cwd_schedules.py").write_text(textwrap.dedent("""
        from colofn.pipeline import get_schedule

        def mine(num_ranks, num_microbatches):
            return get_schedule("gpipe")(num_ranks, num_microbatches)
    """))
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    argv = ["pipeline", "show", "colofn_test_cwd_schedules:mine", "--stages", "2", "--microbatches", "2"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "bubble" in capsys.readouterr().out
    assert sys.path == path_before
    # and in colofn train's validation, which loads the schedule before any world
    forget_modules.append("colofn_test_cwd_schedules")
    sys.modules.pop("colofn_test_cwd_schedules", None)
    assert cli.main(["train", "--mesh", "pp=2", "--schedule", "colofn_test_cwd_schedules:mine", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps must be" in err and "--schedule" not in err
