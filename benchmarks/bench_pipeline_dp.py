"""The pp+dp row of ``bench_train.py``, colofn as it is and as it was, next to torch's, in the same processes.

Builds the row's colofn trainer three times and torch's (Schedule1F1B + DDP) once,
from the same parameters, on 4 gloo processes, and times them step by step in
turn (each step from a barrier; the slowest rank's wall time; the median), so
machine load hits all four alike:

* "colofn": :class:`~colofn.train.trainers.PipelineTrainer` as it is: the last
  stage returns its rank's share of each microbatch's mean, summed once per
  step after the optimizer (:mod:`colofn.train.pipe_loss`), and the stages'
  parameters vary along ``dp``, their accumulated gradients summed once per
  step by the pipeline (``Pipeline(grad_sum_axes=...)``);
* "loss shares, tracked sums": the loss as "colofn", the parameters' sums as
  the next line (what the first change alone gives);
* "psum'd loss, tracked sums": the same trainer with the last stage's
  ``psum``'d mean in each microbatch's forward, and the parameters' dp sums
  derived by tracking (an implicit ``pvary`` and a gradient hook per parameter
  per microbatch, summed once per step by :class:`colofn._step_sums.StepSums`),
  as before issue 12 §3's second pipeline round;
* "torch": Schedule1F1B + DDP.

Also prints each side's CPU time per step (the process's, median) and, for a
few more steps, the measured idle per pipeline rank next to ``simulate()``'s
(:func:`colofn.pipeline.compare_to_simulation`)::

    python benchmarks/bench_pipeline_dp.py              # 16 timed steps, about two minutes on 2 busy cores
    python benchmarks/bench_pipeline_dp.py --steps 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import bench_train as bt  # noqa: E402
import colofn  # noqa: E402
import profile_train  # noqa: E402
from colofn.pipeline import Pipeline  # noqa: E402
from colofn.pipeline.measured import compare_to_simulation, gather_events  # noqa: E402
from colofn.train.trainers import PipelineTrainer  # noqa: E402

ROW = "pp+dp (1f1b)"


def rank_program(steps: int, compare: int) -> dict[str, Any]:
    s, cfg, mcfg, mesh, params, batch = profile_train.row(ROW)
    with mock.patch.object(PipelineTrainer, "_grad_sum_axes", lambda self, specs: ()):  # loss shares, tracked sums
        tracked = bt.Colofn(cfg, mcfg, params, mesh)
    with mock.patch.object(PipelineTrainer, "_loss_in_shares", lambda self: False):  # the psum'd mean, tracked sums
        before = bt.Colofn(cfg, mcfg, params, mesh)
    runs: dict[str, Any] = {"colofn": bt.Colofn(cfg, mcfg, params, mesh), "loss shares, tracked sums": tracked,
                            "psum'd loss, tracked sums": before, "torch": bt.Native(s, cfg, mcfg, params, mesh, True)}

    def step(side: str) -> None:
        runs[side].step(batch)

    for side in runs:
        for _ in range(2):
            step(side)
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(steps):
        for side in runs:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            step(side)
            cpu[side].append(time.process_time() - c0)
            slowest = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            wall[side].append(float(slowest))
    trainer = runs["colofn"].trainer
    pipe = trainer.pipe if isinstance(trainer.pipe, Pipeline) else next(  # bench_train wraps it to count bytes
        c.cell_contents for c in trainer.pipe.__closure__ if isinstance(c.cell_contents, Pipeline))
    sched = pipe.schedule
    length = max(sum(a is not None for a in row) for row in sched.actions)
    idle = []
    for _ in range(compare):
        dist.barrier()
        step("colofn")
        idle.append(compare_to_simulation(sched, gather_events(trainer.events, pipe.rank, sched.num_ranks, length)).summary())
    return {"wall_ms": {k: 1e3 * statistics.median(v) for k, v in wall.items()},
            "cpu_ms": {k: 1e3 * statistics.median(v) for k, v in cpu.items()}, "idle": idle}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--compare", type=int, default=3, help="steps whose measured idle is compared with simulate()")
    a = p.parse_args()
    print(f"# {ROW}, world 4 gloo, {a.steps} timed steps per side, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    out = colofn.launch(rank_program, a.steps, a.compare, world_size=4, backend="gloo")
    wall = out[0]["wall_ms"]
    print("| colofn | step ms (median, slowest rank) | torch / this | CPU ms per step, ranks 0-3 |")
    print("| --- | ---: | ---: | --- |")
    for side, ms in wall.items():
        cpus = " ".join(f"{r['cpu_ms'][side]:.1f}" for r in out)
        print(f"| {side} | {ms:.1f} | {wall['torch'] / ms:.2f} | {cpus} |")
    for line in out[0]["idle"]:
        print(f"# {line}")
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
