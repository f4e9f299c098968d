"""Where a step of one ``bench_train.py`` row goes: cProfile of rank 0, colofn or native, on gloo.

Builds the row's trainer exactly as ``bench_train.py`` does (same model, data,
optimizer, mesh), runs 2 warm-up steps, then profiles ``--steps`` steps on
every rank and prints rank 0's profile (sorted by ``--sort``) and its mean step
time. Run the same row for both sides, one after the other, and compare::

    python benchmarks/profile_train.py dp colofn
    python benchmarks/profile_train.py dp native
    python benchmarks/profile_train.py "pp+dp (1f1b)" colofn --sort cumtime --lines 60
    python benchmarks/profile_train.py "pp+dp (1f1b)" colofn --rank 2   # a rank of the last stage
    python benchmarks/profile_train.py dp colofn --clock thread   # CPU time: comparable under load

Absolute times on a shared machine are noisy (say the load next to them); the
number of Python calls per step and the share of each entry are not, and nor,
much, is the CPU time per step it prints first (the main thread's
``time.thread_time`` over the same number of unprofiled steps; a thread that
waits for a collective burns little of it).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import bench_train as bt  # noqa: E402
import colofn  # noqa: E402
from colofn import data, random  # noqa: E402
from colofn.models import gpt  # noqa: E402


def row(name: str) -> tuple[Any, ...]:
    """``(strategy, config, model config, mesh, params, batch)`` of ``bench_train.py``'s row ``name``, world 4 (one thread)."""
    torch.set_num_threads(1)
    s = next(x for x in bt.STRATEGIES if x.name == name)
    cfg = bt.train_config(s, 4)
    mcfg = cfg.model_config()
    mesh = colofn.Mesh(tuple(cfg.mesh_shape.values()), tuple(cfg.mesh_shape))
    params = gpt.init(random.key(0), mcfg)
    batch = data.sample_batch(random.key(100), data.encode(data.text()), bt.BATCH, mcfg.seq_len)
    return s, cfg, mcfg, mesh, params, batch


def rank_program(name: str, side: str, steps: int, sort: str, lines: int, show: int = 0, clock: str = "wall") -> str | None:
    s, cfg, mcfg, mesh, params, batch = row(name)
    run = bt.Colofn(cfg, mcfg, params, mesh) if side == "colofn" else bt.Native(s, cfg, mcfg, params, mesh, True)
    for _ in range(2):
        run.step(batch)
    dist.barrier()
    c0 = time.thread_time()  # the same steps without the profiler: CPU time, which load does not inflate
    for _ in range(steps):
        run.step(batch)
    cpu = (time.thread_time() - c0) / steps
    dist.barrier()
    prof = cProfile.Profile(time.thread_time) if clock == "thread" else cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        run.step(batch)
    prof.disable()
    step = (time.perf_counter() - t0) / steps
    if dist.get_rank() != show:
        return None
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(sort).print_stats(lines)
    unit = " (profile times: this thread's CPU time)" if clock == "thread" else ""
    return (f"# {name}, {side}: {step * 1e3:.1f} ms per step under cProfile (rank {show}), load average "
            f"{os.getloadavg()[0]:.1f}{unit}; without the profiler {cpu * 1e3:.1f} ms of CPU per step "
            f"(rank {show}'s main thread)\n{out.getvalue()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("strategy", help="a row of bench_train.py: " + ", ".join(s.name for s in bt.STRATEGIES))
    p.add_argument("side", choices=("colofn", "native"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--sort", default="tottime", help="a pstats sort key (tottime, cumtime, ncalls)")
    p.add_argument("--lines", type=int, default=35)
    p.add_argument("--rank", type=int, default=0, help="whose profile to print (pp+dp: 0-1 hold stage 0, 2-3 stage 1)")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: time entries by the main thread's CPU time (time.thread_time), which the "
                   "machine's load does not inflate; waits then cost only what the waiting thread burns")
    a = p.parse_args()
    print(colofn.launch(rank_program, a.strategy, a.side, a.steps, a.sort, a.lines, a.rank, a.clock, world_size=4,
                        backend="gloo")[a.rank])


if __name__ == "__main__":
    main()
