"""What a world and its collectives cost: simulated (threads) next to real gloo processes.

    python benchmarks/bench_world.py            # about 1-2 minutes on 2 idle cores

Prints one table: the cost of starting a world (a whole ``colofn.launch`` of a
function that returns at once) and the time of each collective for a few sizes,
simulated and gloo side by side, with the ratio sim/gloo. Both columns are
measured in the same run on the same machine. Never gates tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist

import colofn

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send/recv ring")


def _noop() -> int:
    return dist.get_rank()


def _one(op: str, x: torch.Tensor, out: torch.Tensor, r: int, n: int) -> None:
    if op == "all_reduce":
        dist.all_reduce(x)
    elif op == "all_gather":
        dist.all_gather_into_tensor(out, x)
    elif op == "reduce_scatter":
        dist.reduce_scatter_tensor(out[: x.numel() // n], x)
    elif op == "all_to_all":
        dist.all_to_all_single(out[: x.numel()], x)
    elif op == "broadcast":
        dist.broadcast(x, src=0)
    elif op == "send/recv ring":
        recv = out[: x.numel()]
        ops = [dist.P2POp(dist.isend, x, (r + 1) % n), dist.P2POp(dist.irecv, recv, (r - 1) % n)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()


def time_collectives(sizes: list[int], iters: int) -> dict[tuple[str, int], float]:
    """Seconds per op, as rank 0 sees it (the median of 3 runs of ``iters`` ops each)."""
    r, n = dist.get_rank(), dist.get_world_size()
    out: dict[tuple[str, int], float] = {}
    warnings.simplefilter("ignore", FutureWarning)  # 2.13 renames some collectives
    for size in sizes:
        x = torch.ones(size)
        buf = torch.empty(size * n)
        k = max(3, iters if size <= 4096 else iters // 4)
        for op in OPS:
            for _ in range(3):  # warm up
                _one(op, x, buf, r, n)
            runs = []
            for _ in range(3):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(k):
                    _one(op, x, buf, r, n)
                runs.append((time.perf_counter() - t0) / k)
            out[(op, size)] = statistics.median(runs)
    return out


def world_start(world_size: int, backend: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        colofn.launch(_noop, world_size=world_size, backend=backend, timeout=120)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 65536], help="floats per rank")
    parser.add_argument(
        "--iters", type=int, default=40, help="ops per timed run (a quarter for large sizes)"
    )
    parser.add_argument(
        "--gloo-starts", type=int, default=2, help="gloo world starts timed per size"
    )
    args = parser.parse_args()

    print(f"$ python benchmarks/bench_world.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average before: "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    rows = []
    colofn.launch(_noop, world_size=max(args.worlds))  # start the persistent rank threads
    for n in args.worlds:
        sim_start = world_start(n, "sim", 20)
        gloo_start = world_start(n, "gloo", args.gloo_starts)
        rows.append(("world start", "-", n, sim_start, gloo_start))
        sim_t = colofn.launch(time_collectives, args.sizes, args.iters, world_size=n)[0]
        gloo_t = colofn.launch(
            time_collectives, args.sizes, args.iters, world_size=n, backend="gloo", timeout=300
        )[0]
        for op in OPS:
            for size in args.sizes:
                rows.append((op, str(size), n, sim_t[(op, size)], gloo_t[(op, size)]))

    print()
    print("| what | floats per rank | world | sim | gloo | sim/gloo |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for what, size, n, s, g in sorted(
        rows,
        key=lambda row: (
            row[0] != "world start",
            OPS.index(row[0]) if row[0] in OPS else -1,
            row[2],
            row[1],
        ),
    ):
        print(f"| {what} | {size} | {n} | {_fmt(s)} | {_fmt(g)} | {s / g:.2f} |")
    print(f"\nload average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
