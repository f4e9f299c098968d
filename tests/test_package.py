"""The package as a user meets it: ``python -m colofn``, lazy subpackages, the README's commands in ``.ci/run``."""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import colofn

ROOT = Path(__file__).resolve().parents[1]
LAZY = ("models", "nn", "optim", "parallel", "pipeline", "plan", "testing", "zero")


def python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_import_colofn_does_not_import_the_subpackages():
    probe = (
        "import json, sys, colofn\n"
        "before = sorted(m for m in sys.modules if m.split('.')[:2][-1] in colofn._LAZY_SUBMODULES "
        "and m.startswith('colofn.'))\n"
        "mods = {name: getattr(colofn, name).__name__ for name in colofn._LAZY_SUBMODULES}\n"
        "print(json.dumps([before, mods, 'pipeline' in dir(colofn)]))\n"
    )
    out = python("-c", probe)
    assert out.returncode == 0, out.stderr
    before, mods, listed = json.loads(out.stdout)
    assert before == []
    assert mods == {name: f"colofn.{name}" for name in LAZY}
    assert listed


def test_lazy_subpackages_are_listed_and_reachable():
    assert set(LAZY) <= set(colofn.__all__) <= set(dir(colofn))
    assert colofn.pipeline.make_schedule is not None and colofn.optim.sgd is not None
    try:
        colofn.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "module 'colofn' has no attribute 'no_such_thing'" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_python_dash_m_colofn_is_the_colofn_command(monkeypatch, capsys):
    # In this process (a subprocess would import torch again: seconds): run the
    # package as ``python -m colofn train --steps 0`` does.
    monkeypatch.setattr(sys, "argv", ["colofn", "train", "--steps", "0"])
    try:
        runpy.run_module("colofn", run_name="__main__", alter_sys=False)
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("python -m colofn did not exit")
    assert "colofn train: error: the run cannot start:" in capsys.readouterr().err


def readme_commands() -> list[str]:
    """The commands of the README's "Try it" section, one per ```bash block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Try it", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_ci_runs_the_readme_commands_as_written():
    first, second = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    # The install part of the first command, exactly; its run part with fewer steps.
    install, run = first.split(" && ")
    assert install == "pip install torch==2.13.0 -e ."
    assert re.search(r"^\s*" + re.escape(install) + r"\s*$", ci, re.M), "the README's install is not in .ci/run"
    short = re.sub(r"--steps \d+", "--steps 3", run)
    assert short != run and re.search(r"^\s*" + re.escape(short) + r"\s*$", ci, re.M), (
        f".ci/run does not run {short!r}"
    )
    # The second command, exactly.
    assert re.search(r"^\s*" + re.escape(second) + r"\s*$", ci, re.M), f".ci/run does not run {second!r}"
    # Each in a fresh virtual environment of its own.
    assert "python -m venv" in ci and "mktemp -d" in ci
    lines = ci.splitlines()
    for command in (install, second):
        at = next(i for i, ln in enumerate(lines) if ln.strip() == command)
        assert any(ln.startswith("fresh_env ") for ln in lines[at - 3 : at]), f"{command!r} is not run in a fresh env"
