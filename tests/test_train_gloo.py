"""``colofn train`` on real gloo processes: ``--check`` says OK (the loss equals single-device training).

Two ways: ``train(TrainConfig(backend="gloo"))`` (``colofn.launch`` starts 4
processes), and the ``torchrun`` command of ``docs/train.md`` (torchrun starts
them, ``--backend env`` joins its world).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from colofn.train import TrainConfig, parse_mesh, train

pytestmark = pytest.mark.gloo

TIMEOUT = 180  # seconds; 4 processes start slowly on a loaded 2-core machine (about 20 s when idle)


@pytest.mark.parametrize("mesh,extra", [("dp=2,tp=2", {}), ("pp=2,dp=2", {"schedule": "1f1b"}), ("dp=2", {})])  # dp alone: untracked
def test_train_on_gloo_processes_equals_single_device(tmp_path, capsys, mesh, extra):
    cfg = TrainConfig(mesh=tuple(parse_mesh(mesh).items()), steps=3, warmup=1, check=True, backend="gloo",
                      out=str(tmp_path / "out"), **extra)
    assert train(cfg) == 0
    out = capsys.readouterr().out
    assert "OK: parallel training equals single-device training" in out
    with open(tmp_path / "out" / "record.json") as f:
        record = json.load(f)
    assert len(record["loss"]) == 3
    assert all(abs(a - b) < 1e-5 for a, b in zip(record["loss"], record["single"], strict=True))


def test_torchrun_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "-m", "colofn.cli", "train", "--mesh", "dp=2,tp=2", "--steps", "3", "--warmup", "1", "--check", "--out", str(tmp_path / "out")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert out.count("OK: parallel training equals single-device training") == 1, out[-3000:]  # rank 0 only
    assert "on Mesh(dp=2, tp=2)" in out
    assert (tmp_path / "out" / "report.md").exists()
