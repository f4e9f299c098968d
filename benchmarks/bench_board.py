"""What the status board adds to each collective of a real world.

    python benchmarks/bench_board.py            # about 20 s on 2 idle cores

Every collective colofn issues on a real world writes one line into this rank's
slot of the world's status board before it starts, and flips a byte after, so
that a failure can say what every rank was doing. Prints, measured in one run:

1. the bookkeeping alone (``_comm._Watch`` around nothing), with and without a
   board installed, in this process;
2. ``_comm.all_reduce`` of 64 and 65536 floats on a gloo world of 2, the board
   on and off in alternating rounds (median of rounds, as rank 0 sees it).

Never gates tests.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import types

import torch

import colofn
from colofn import _comm
from colofn._world import board


def _watch_loop(n: int) -> float:
    g = types.SimpleNamespace(group=None, ranks=(0, 1), axes=("dp",))
    x = torch.ones(64)
    t0 = time.perf_counter()
    for _ in range(n):
        with _comm._Watch("all_reduce", g, x):  # type: ignore[arg-type]
            pass
    return (time.perf_counter() - t0) / n


def bookkeeping(n: int = 200_000) -> tuple[float, float]:
    board.install(None)
    off = min(_watch_loop(n) for _ in range(3))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "board")
        board.create_file(path, 2)
        board.install(board.from_file(path, 0, 2, 60.0))
        try:
            on = min(_watch_loop(n) for _ in range(3))
        finally:
            board.install(None)
    return off, on


def gloo_rounds(rounds: int = 7, per_round: int = 300) -> dict[str, dict[str, float]]:
    """Runs in each rank of a gloo world: all_reduce timings with the board on and off."""
    mesh = colofn.Mesh((2,), ("dp",))
    g = _comm.axis_group(mesh, ("dp",))
    installed = board.current()
    out: dict[str, dict[str, float]] = {}
    for n in (64, 65536):
        x = torch.ones(n)
        for _ in range(50):
            _comm.all_reduce(x, g)
        times: dict[str, list[float]] = {"on": [], "off": []}
        for r in range(rounds):
            for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                board.install(installed if mode == "on" else None)
                t0 = time.perf_counter()
                for _ in range(per_round):
                    _comm.all_reduce(x, g)
                times[mode].append((time.perf_counter() - t0) / per_round)
        board.install(installed)
        out[str(n)] = {m: statistics.median(v) for m, v in times.items()}
    return out


def main() -> None:
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average before: "
          + " ".join(f"{v:.1f}" for v in os.getloadavg()))
    off, on = bookkeeping()
    print("\n| what | no board | board | added |\n| --- | ---: | ---: | ---: |")
    print(f"| bookkeeping around one collective | {off * 1e6:.2f} µs | {on * 1e6:.2f} µs | {(on - off) * 1e6:.2f} µs |")
    res = colofn.launch(gloo_rounds, world_size=2, backend="gloo", timeout=120)[0]
    for n, t in res.items():
        print(f"| gloo all_reduce, {n} floats, world 2 | {t['off'] * 1e6:.0f} µs | {t['on'] * 1e6:.0f} µs | "
              f"{(t['on'] - t['off']) * 1e6:+.0f} µs |")
    print("\nload average after: " + " ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
