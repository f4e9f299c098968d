"""Worlds that cannot start are refused before anything starts (issue 10, section 3)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import colofn
from colofn import cli
from colofn._world import limits
from colofn.errors import WorldError


@pytest.mark.parametrize("backend", ["sim", "gloo"])
def test_a_world_larger_than_the_machine_is_refused_up_front(backend: str) -> None:
    before = threading.active_count()
    t0 = time.perf_counter()
    with pytest.raises(WorldError) as e:
        colofn.launch(time.sleep, 60, world_size=10**6, backend=backend)
    assert time.perf_counter() - t0 < 2  # no thread or process was started, nothing waited for
    assert threading.active_count() == before
    text = str(e.value)
    assert text.startswith(f"launch(world_size=1000000) refused: this machine cannot hold a {backend}" if backend == "gloo"
                           else "launch(world_size=1000000) refused: this machine cannot hold a simulated world")
    # whichever limit binds first on this machine: tasks (threads/processes) or free memory
    assert ("1000000 new " in text and "can be started" in text) or ("are free, enough for" in text), text
    assert text.endswith("Fix: use a smaller world_size (or mesh), or run across machines with torchrun.")


def test_gloo_worlds_are_limited_by_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "free_memory", lambda: 10 * limits.GLOO_RANK_BYTES)
    monkeypatch.setattr(limits, "free_tasks", lambda: (10**6, "test"))
    limits.check_world_size(10, "gloo")  # fits exactly
    with pytest.raises(WorldError, match=r"11 of them need 1\.6 GiB but 1\.5 GiB are free, enough for 10"):
        limits.check_world_size(11, "gloo")


def test_sim_threads_already_running_are_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "free_memory", lambda: None)
    monkeypatch.setattr(limits, "free_tasks", lambda: (300, "test"))  # 44 above the 256 kept free
    limits.check_world_size(60, "sim", existing_threads=16)
    limits.check_world_size(16, "sim", existing_threads=16)  # nothing new: not even looked at
    monkeypatch.setattr(limits, "free_tasks", lambda: (0, "test"))
    limits.check_world_size(16, "sim", existing_threads=16)
    monkeypatch.setattr(limits, "free_tasks", lambda: (300, "test"))
    with pytest.raises(WorldError, match=r"45 new threads are needed but only 44 can be started \(test;"):
        limits.check_world_size(61, "sim", existing_threads=16)


def test_train_mesh_larger_than_the_machine_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    before = threading.active_count()
    assert cli.main(["train", "--mesh", "dp=100000", "--batch-size", "100000", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("colofn train: error: launch(world_size=100000) refused")
    assert threading.active_count() == before


def test_run_of_a_missing_script_exits_2_before_starting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_launch(*a: object, **k: object) -> None:
        raise AssertionError("the world was started")

    monkeypatch.setattr(colofn, "launch", no_launch)
    assert cli.main(["run", "--devices", "2", "missing.py"]) == 2
    assert capsys.readouterr().err.startswith("colofn run: script 'missing.py' does not exist (from ")
    assert cli.main(["run", "--devices", "2", str(tmp_path)]) == 2
    assert f"script {str(tmp_path)!r} is a directory" in capsys.readouterr().err


MESH_OUTSIDE_A_WORLD = """
import torch.distributed as dist
import colofn
try:
    colofn.Mesh((3,), ("x",))
except colofn.errors.MeshError as e:
    print("refused:", str(e).splitlines()[1].strip())
print("initialized after a bad mesh:", dist.is_initialized())
mesh = colofn.Mesh((1,), ("x",))
print("mesh:", mesh, colofn.process_index(), colofn.process_count())
"""


def test_mesh_outside_a_world_leaves_no_temp_dirs(tmp_path: Path) -> None:
    # A Mesh outside any world starts a world of one; it used to leave a
    # colofn-single-* FileStore directory behind every run.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("RANK", None)
    out = subprocess.run([sys.executable, "-c", MESH_OUTSIDE_A_WORLD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "refused: * shape (3,) has 3 devices but the world has 1 ranks",
        "initialized after a bad mesh: False",
        "mesh: Mesh(x=1) 0 1",
    ]
    assert os.listdir(tmp_path) == []
