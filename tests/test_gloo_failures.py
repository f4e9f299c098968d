"""Real gloo worlds fail cleanly (issue 10, section 3): readable errors, no orphans, no litter.

Gloo worlds cost seconds to start, so each test packs several faults into as few
worlds as is sound (a gloo group is dead after a failure), and worlds that spend
their time waiting run side by side.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import _fault_programs as fp  # a module of tests/ (on sys.path under pytest)
import colofn
from colofn.errors import CollectiveMismatchError

TESTS = str(Path(__file__).parent)


@pytest.mark.gloo
def test_gloo_collective_failures_say_what_each_rank_was_doing(tmp_path: Path) -> None:
    faults_out, diverge_out = tmp_path / "faults", tmp_path / "diverge"
    faults_out.mkdir()
    diverge_out.mkdir()
    diverged: dict[str, object] = {}

    def diverge() -> None:  # the launcher stops it, long before the 60 s timeout
        try:
            colofn.launch(fp.diverge, str(diverge_out), world_size=2, backend="gloo", timeout=60)
        except BaseException as e:  # noqa: BLE001 - checked below
            diverged["error"], diverged["at"] = e, time.time()

    side = threading.Thread(target=diverge)
    side.start()
    try:
        with pytest.raises(CollectiveMismatchError) as shape:
            colofn.launch(fp.faults, str(faults_out), 2.0, world_size=2, backend="gloo", timeout=2.0)
        shape_at = time.time()
    finally:
        side.join()

    # 1. rank 1 away in its own code: rank 0 times out after the timeout and says where rank 1 was
    away = (faults_out / "away.0.txt").read_text()
    assert away == (
        "CollectiveTimeoutError\n"
        "rank 0: all_reduce over ('x',) on group [0, 1] (call #1: (4,) float32) did not complete within 2 s "
        "(gloo: Timed out waiting 2000ms for recv operation to complete). What each rank was doing:\n"
        "  rank 0: failed in all_reduce over ('x',) on group [0, 1] (call #1: (4,) float32)\n"
        "  rank 1: running (not in a colofn collective; the last was all_reduce over ('x',) on group [0, 1] "
        "(call #0: (4,) float32))"
    )
    away_s = float((faults_out / "away.seconds").read_text())
    assert 2.0 <= away_s < 6.0  # time to error: the timeout

    # 2. another shape: gloo aborts rank 0 from its own thread; rank 1 reads rank 0's last report
    text = str(shape.value)
    assert text.startswith(
        "rank 1: ranks diverged at call #0 on group [0, 1]: rank 0 called all_reduce over ('x',) ((4,) float32), "
        "rank 1 called all_reduce over ('x',) ((8,) float32). Every rank of a group must call the same "
        "collectives with the same shapes in the same order (gloo: "
    ), text
    assert text.endswith(
        "What each rank was doing:\n"
        "  rank 0: waiting in all_reduce over ('x',) on group [0, 1] (call #0: (4,) float32)\n"
        "  rank 1: failed in all_reduce over ('x',) on group [0, 1] (call #0: (8,) float32)"
    ), text
    notes = shape.value.__notes__
    assert notes[0] == "(raised on rank 1 of a gloo world of 2)"
    assert notes[-1] == (
        "The other ranks that failed:\n  rank 0: RankError: rank 0 was killed by SIGABRT without a result; its last "
        "report: waiting in all_reduce over ('x',) on group [0, 1] (call #0: (4,) float32)"
    )
    started = max(float((faults_out / f"shape.{r}.start").read_text()) for r in (0, 1))
    shape_s = shape_at - started
    assert shape_s < 10  # time to error: no timeout involved

    # 3. different collectives at the same call: they would wait out the 60 s timeout; the launcher stops them
    e = diverged["error"]
    assert isinstance(e, CollectiveMismatchError), e
    assert str(e) == (
        "Ranks diverged at call #1 on group [0, 1]: rank 0 called all_reduce over ('x',) ((6,) float32), "
        "rank 1 called all_gather over ('x',) ((3,) float32). Every rank of a group must call the same "
        "collectives with the same shapes in the same order. What each rank was doing:\n"
        "  rank 0: waiting in all_reduce over ('x',) on group [0, 1] (call #1: (6,) float32)\n"
        "  rank 1: waiting in all_gather over ('x',) on group [0, 1] (call #1: (3,) float32)\n"
        "(seen by the launcher on the world's status board; the ranks were stopped)"
    )
    started = max(float((diverge_out / f"diverge.{r}.start").read_text()) for r in (0, 1))
    diverge_s = diverged["at"] - started  # type: ignore[operator]
    assert diverge_s < 10
    print(f"\ntime to error: away {away_s:.2f} s (timeout 2 s), shape {shape_s:.2f} s, diverge {diverge_s:.2f} s (timeout 60 s)")


LAUNCHER = """
import sys
sys.path.insert(0, {tests!r})
import colofn, _fault_programs as fp
colofn.launch(fp.forever, sys.argv[1], world_size=1, backend="gloo")
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # exited, not yet reaped
    except OSError:
        return True


def _poll(what: str, done: object, limit: float) -> float:
    t0 = time.monotonic()
    while not done():  # type: ignore[operator]
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"{what}: not within {limit} s")
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.mark.gloo
def test_ranks_end_and_the_world_dir_goes_when_the_launcher_dies(tmp_path: Path) -> None:
    # Two launchers side by side, one per signal, each of a world of one (a rank of a
    # larger world watches its launcher the same way; each process costs seconds to start).
    launchers = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        out, tmp = tmp_path / sig.name, tmp_path / sig.name / "tmp"
        tmp.mkdir(parents=True)
        env = {**os.environ, "TMPDIR": str(tmp)}
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER.format(tests=TESTS), str(out)], env=env)
        launchers[sig] = (proc, out, tmp)
    try:
        for sig, (_, out, _) in launchers.items():
            _poll(f"{sig.name} world started", lambda out=out: any(out.glob("rank*.pid")), 240)
        pids = {sig: [int(p.name.split(".")[1]) for p in out.glob("rank*.pid")] for sig, (_, out, _) in launchers.items()}
        killed = {}
        for sig, (proc, _, tmp) in launchers.items():
            assert [p.name for p in tmp.iterdir() if p.name.startswith("colofn-world-")], "the world's dir exists"
            proc.send_signal(sig)
            killed[sig] = time.monotonic()
        for sig, (proc, _, tmp) in launchers.items():
            _poll(f"ranks of the {sig.name}ed launcher ended", lambda s=sig: all(_gone(p) for p in pids[s]), 20)
            took = time.monotonic() - killed[sig]  # an upper bound: the other launcher's wait counts too
            assert took < 5, f"ranks outlived their {sig.name}ed launcher by {took:.1f} s"
            print(f"\n{sig.name}: the rank ended within {took:.2f} s of its launcher")
            _poll("the world's dir removed", lambda t=tmp: not any(p.name.startswith("colofn-") for p in t.iterdir()), 5)
            assert proc.wait(10) == -sig
    finally:
        for proc, _, _ in launchers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
