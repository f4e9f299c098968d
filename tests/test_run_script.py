"""One script, unchanged, on a simulated world and on real torchrun worlds (one and two nodes).

tests/scripts/world_script.py builds Mesh((2, 2), ("dp", "tp")), device_puts,
all_reduces (whole world and one mesh axis), gathers, and prints one VERDICT
line per rank. Each way of running it must produce four OK lines, one per rank.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from colofn import cli

SCRIPT = Path(__file__).parent / "scripts" / "world_script.py"
VERDICT = re.compile(
    r"^VERDICT rank=(\d) world=4 dp=(\d) tp=(\d) backend=(\S+) early_index=True block=True all_reduce=True "
    r"tp_reduce=True gather=True OK$",
    re.M,
)
TIMEOUT = 240  # seconds per command; a loaded 2-core machine starts 4 processes slowly


def check_verdicts(output: str, backend: str) -> None:
    found = VERDICT.findall(output)
    assert sorted(found) == [(str(r), str(r // 2), str(r % 2), backend) for r in range(4)], output[
        -3000:
    ]
    assert "FAIL" not in output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def start(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
        cwd=SCRIPT.parents[2],
    )


def finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    """Wait for every command; on a timeout or an error, fail with all their output."""
    outs: list[str] = []
    try:
        for p in procs:
            try:
                out, _ = p.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                tails = [q.communicate()[0][-2500:] for q in procs]
                pytest.fail(f"timed out after {TIMEOUT} s; output:\n" + "\n-----\n".join(tails))
            assert p.returncode == 0, f"exit code {p.returncode}; output:\n{out[-5000:]}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


def run(cmd: list[str]) -> str:
    return finish([start(cmd)])[0]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def test_colofn_run_in_process(capfd: pytest.CaptureFixture[str]) -> None:
    main_before = sys.modules["__main__"]
    assert cli.main(["run", "--devices", "4", str(SCRIPT)]) == 0
    check_verdicts(capfd.readouterr().out, "colofn_sim")
    # The script ran as __main__ in its own namespace: the process's __main__ is
    # untouched (else processes spawned later, e.g. a gloo world, re-run the script).
    assert sys.modules["__main__"] is main_before


@pytest.mark.gloo
def test_colofn_run_command() -> None:
    exe = shutil.which("colofn")
    cmd = [exe] if exe else [sys.executable, "-m", "colofn.cli"]
    check_verdicts(run([*cmd, "run", "--devices", "4", str(SCRIPT)]), "colofn_sim")


@pytest.mark.gloo
def test_torchrun_one_node() -> None:
    out = run(
        torchrun(
            "--nnodes",
            "1",
            "--nproc-per-node",
            "4",
            "--rdzv-backend",
            "c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "--rdzv-id",
            "one-node",
            str(SCRIPT),
        )
    )
    check_verdicts(out, "gloo")


@pytest.mark.gloo
def test_torchrun_two_nodes_on_loopback() -> None:
    port = free_port()

    def node(rank: int) -> subprocess.Popen[str]:
        host = "true" if rank == 0 else "false"
        return start(
            torchrun(
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "2",
                "--rdzv-backend",
                "c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id",
                "two-nodes",
                f"--rdzv-conf=is_host={host},read_timeout=200",
                str(SCRIPT),
            )
        )

    outs = finish([node(0), node(1)])
    check_verdicts("".join(outs), "gloo")
    # each node ran two of the ranks
    assert len(VERDICT.findall(outs[0])) == len(VERDICT.findall(outs[1])) == 2


def test_colofn_run_never_interleaves_lines(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "printer.py"
    script.write_text(
        "import colofn\n"
        "r = colofn.process_index()\n"
        "for i in range(200):\n"
        "    print(f'line rank={r} i={i} ' + 'x' * 40, flush=i % 2 == 0)\n"
        "print(f'partial {r}', end='')\n"
    )
    argv = list(sys.argv)
    assert cli.main(["run", "--devices", "8", str(script)]) == 0
    assert sys.argv == argv
    out = capfd.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("line")]
    assert len(lines) == 1600
    assert all(re.fullmatch(r"line rank=[0-7] i=\d+ x{40}", ln) for ln in lines)
    assert sorted(re.findall(r"partial \d", out)) == [f"partial {r}" for r in range(8)]
