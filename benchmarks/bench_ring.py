"""Per-rank attention work of causal ring attention: the contiguous split against the zig-zag one.

    python benchmarks/bench_ring.py                  # about 30 s on 2 cores
    python benchmarks/bench_ring.py --sp 8 --seq 4096

For each rank ``i`` of a ring of ``--sp`` ranks, prints the blocks it computes
and the scores they evaluate (``computed``) and keep under the causal mask
(``useful``), from :func:`colofn.parallel.sp.ring.work`, and the measured time
of that rank's attention compute for one layer, forward and backward: the
blocks of :func:`~colofn.parallel.sp.ring.schedule`, run in this process by
:func:`~colofn.parallel.sp.ring.attend_step` on random tensors of the rank's
shapes (no communication, one rank at a time, so the ranks do not share the
cores). Three layouts:

* ``contiguous``: the paper's split as colofn runs it (future blocks masked,
  so every rank computes ``n`` full blocks);
* ``contig-skip``: the same split if future blocks were skipped: the causal
  work each rank needs, the imbalance the zig-zag layout removes;
* ``zigzag``: what ``Plan(sp="ring")`` runs.

The step of a ring waits for its slowest rank, so ``max`` is the time that
counts. Best of ``--repeats`` runs taken round-robin over the ranks and
layouts (so a busy machine slows them alike), float32. Never gates tests.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from colofn.parallel.sp import ring
from colofn.parallel.sp.chunks import Layout, chunk_ids


def _layout(name: str) -> tuple[Layout, bool | None]:
    return ("contiguous", True) if name == "contig-skip" else (name, None)  # type: ignore[return-value]


def _rank_run(layout: str, n: int, i: int, b: int, h: int, seq: int, hd: int) -> Callable[[], float]:
    """A closure timing one forward + backward of rank ``i``'s attention compute (seconds)."""
    base, skip = _layout(layout)
    s = seq // n
    m = len(chunk_ids(base, n, i))
    c = s // m
    gen = torch.Generator().manual_seed(i)
    q = torch.randn(b, h, s, hd, generator=gen, requires_grad=True)
    kvs = [torch.randn(2, b, h, s, hd, generator=gen, requires_grad=True) for _ in range(n)]
    steps = ring.schedule(base, n, i, skip)

    def run() -> float:
        t0 = time.perf_counter()
        acc: ring.Partials = [None] * m
        for kv, step in zip(kvs, steps, strict=True):
            acc = ring.attend_step(acc, q, kv, step, c)
        torch.cat([p[0] for p in acc if p is not None], dim=-2).sum().backward()
        return time.perf_counter() - t0

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sp", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    n = a.sp
    print(
        f"ring attention, sp={n}, seq={a.seq}, batch={a.batch}, heads={a.heads}, head_dim={a.head_dim}, "
        f"float32, forward+backward of one layer's attention per rank, best of {a.repeats}, 1 thread"
    )
    print("| layout | rank | blocks | scores computed | scores useful | time (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    layouts = ("contiguous", "contig-skip", "zigzag")
    runs = {(lay, i): _rank_run(lay, n, i, a.batch, a.heads, a.seq, a.head_dim) for lay in layouts for i in range(n)}
    times: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    for r in range(a.repeats + 1):  # round-robin, so load on the machine hits every rank alike; run 0 warms up
        for key, run in runs.items():
            t = run()
            if r:
                times[key].append(t)
    summary = []
    for layout in layouts:
        ms = []
        for i in range(n):
            base, skip = _layout(layout)
            w = ring.work(base, n, i, a.seq, skip)
            t = 1e3 * min(times[layout, i])
            ms.append(t)
            print(f"| {layout} | {i} | {w['blocks']} | {w['computed']} | {w['useful']} | {t:.1f} |")
        summary.append((layout, min(ms), max(ms)))
    print()
    print("| layout | min rank time (ms) | max rank time (ms) | max / min |")
    print("| --- | --- | --- | --- |")
    for layout, lo, hi in summary:
        print(f"| {layout} | {lo:.1f} | {hi:.1f} | {hi / lo:.2f} |")


if __name__ == "__main__":
    main()
