"""Does ``colofn plan`` rank compositions as they measure? Spearman's rho on a gloo world of 4.

The model is ``colofn train``'s ``small`` preset (4 layers, d_model 96, 4 heads,
seq 64, untied), global batch 16, AdamW in fp32, the shipped corpus. Each
composition runs as ``colofn train`` runs it (``colofn.train.loop.rank_program``
on a gloo world of 4 processes, one intra-op thread each; one world runs every
composition in turn); its step time is the slowest rank's wall time of a step,
the median over the steps after the first two (warm-up). Every round measures
all compositions once, in a shuffled order.

The planner predicts the same compositions on a cluster calibrated on this
machine first (the ``--cluster FILE`` fields, printed as JSON):

* ``peak_flops``: one rank's share of the host, the model's FLOPs per step of
  a single-process forward and backward of the per-rank batch, over its time,
  times ``min(1, cores / 4)`` (four ranks share the cores); efficiency 1;
* ``intra_bw`` and ``intra_latency``: a gloo all-reduce over the 4 ranks of 8
  bytes (the latency) and of 4 MB (the bandwidth, by ``tracing.volume``'s bytes;
  the large call's time less the small one's, or all of it when the two are
  within 1.5x, as a loaded host makes them), the fastest of 3 rounds.

Then Spearman's rank correlation of predicted and measured step times, per
round. Run with::

    python benchmarks/bench_plan_rank.py               # 2 rounds, about 2-3 minutes
    python benchmarks/bench_plan_rank.py --rounds 1 --steps 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random as pyrandom
import statistics
import sys
import time
from typing import Any

import torch

import colofn
from colofn import plan
from colofn.models import gpt
from colofn.tracing import volume
from colofn.train import TrainConfig

BATCH = 16
COMPOSITIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("dp=4", {}),
    ("dp=4", {"zero": 1}),
    ("dp=4", {"zero": 3}),
    ("dp=2,tp=2", {}),
    ("dp=2,tp=2", {"sp": "megatron"}),
    ("tp=4", {}),
    ("pp=2,dp=2", {"microbatches": 2}),
    ("pp=4", {"microbatches": 4}),
    ("dp=2,sp=2", {"sp": "ulysses"}),
)


def _mesh(text: str) -> tuple[tuple[str, int], ...]:
    return tuple((a, int(n)) for a, n in (p.split("=") for p in text.split(",")))


def _train_cfg(mesh: str, extra: dict[str, Any], steps: int, out: str) -> TrainConfig:
    return TrainConfig(preset="small", mesh=_mesh(mesh), steps=steps, warmup=1, batch_size=BATCH, out=out,
                       backend="gloo", **extra)


def _candidate(mesh: str, extra: dict[str, Any]) -> plan.Candidate:
    return plan.Candidate(_mesh(mesh), sp=extra.get("sp", "none"), zero=extra.get("zero"),
                          microbatches=extra.get("microbatches", 1))


def _rank(jobs: list[tuple[int, TrainConfig]]) -> list[tuple[int, list[float]]]:
    """Run each job's training on this rank, in order; its step times (seconds)."""
    from colofn.train.loop import rank_program

    torch.set_num_threads(1)
    out = []
    for i, cfg in jobs:
        t0 = time.perf_counter()
        with open(os.devnull, "w") as null:
            stdout, sys.stdout = sys.stdout, null
            try:
                record = rank_program(cfg)
            finally:
                sys.stdout = stdout
        out.append((i, [BATCH * 64 / tps for tps in record["tokens_per_s"]]))
        if colofn.process_index() == 0:
            print(f"  {i}: {cfg.mesh} {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def _collective_program(sizes: list[int], reps: int, rounds: int = 3) -> list[float]:
    """Seconds per all-reduce of each size: the fastest of ``rounds`` interleaved rounds of ``reps`` calls."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    best = [float("inf")] * len(sizes)
    xs = [torch.ones(n // 4) for n in sizes]
    for x in xs:
        dist.all_reduce(x)
    for _ in range(rounds):
        for i, x in enumerate(xs):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                dist.all_reduce(x)
            best[i] = min(best[i], (time.perf_counter() - t0) / reps)
    return best


def calibrate() -> plan.Cluster:
    """A :class:`colofn.plan.Cluster` of this host as 4 gloo ranks see it (see the module docstring)."""
    cfg = gpt.config("small", tie_embeddings=False)
    torch.set_num_threads(1)
    params = gpt.init(colofn.random.key(0), cfg)
    for p in colofn.tree.leaves(params):
        p.requires_grad_(True)
    rows = BATCH // 4
    t = colofn.random.randint(colofn.random.key(1), (rows, cfg.seq_len + 1), 0, cfg.vocab_size)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        gpt.loss(params, {"tokens": t[:, :-1], "targets": t[:, 1:]}, cfg).backward()
        times.append(time.perf_counter() - t0)
    flops = plan.from_gpt(cfg).flops_per_token() * rows * cfg.seq_len
    rate = flops / statistics.median(times[2:]) * min(1.0, (os.cpu_count() or 1) / 4)
    small, large = 8, 4 << 20
    lat, big = (max(r) for r in zip(*colofn.launch(_collective_program, [small, large], 10, world_size=4,
                                                    backend="gloo"), strict=True))
    # Under load the small call can take as long as the large one: then bandwidth alone explains the large.
    bw = volume("all_reduce", large, 4)[0] / (big - lat if big > 1.5 * lat else big)
    return plan.Cluster("this-host", 4, 4, 16e9, rate, bw, bw, lat, lat, source="bench_plan_rank.py calibration")


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho (ties get their average rank)."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="steps per run; the first two are not timed (>= 3)")
    ap.add_argument("--out", default="/tmp/colofn-bench-plan-rank")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    load = os.getloadavg()
    cl = calibrate()
    print(f"cores {os.cpu_count()}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print("calibrated cluster:", json.dumps(dataclasses.asdict(cl)))
    m = plan.from_gpt(gpt.config("small", tie_embeddings=False), "small")
    preds = {i: plan.predict(m, _candidate(mesh, extra), cl, global_batch=BATCH, efficiency=1.0)
             for i, (mesh, extra) in enumerate(COMPOSITIONS)}
    jobs = []
    for r in range(args.rounds):
        order = list(range(len(COMPOSITIONS)))
        pyrandom.Random(r).shuffle(order)
        jobs += [(i, _train_cfg(*COMPOSITIONS[i], args.steps, args.out)) for i in order]
    # One world for every run: starting a gloo world costs more than a run.
    per_rank = colofn.launch(_rank, jobs, world_size=4, backend="gloo")
    rounds: list[dict[int, float]] = [{} for _ in range(args.rounds)]
    for k, (i, _) in enumerate(jobs):
        steps = zip(*(r[k][1] for r in per_rank), strict=True)  # each step: every rank's time
        rounds[k // len(COMPOSITIONS)][i] = statistics.median(max(t) for t in list(steps)[2:])
    names = [str(preds[i].candidate) for i in range(len(COMPOSITIONS))]
    print()
    print("| composition | predicted ms | " + " | ".join(f"measured ms (round {r + 1})" for r in range(len(rounds))) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in rounds) + " |")
    for i, name in enumerate(names):
        print(f"| {name} | {preds[i].step_s * 1e3:.1f} | " + " | ".join(f"{m_[i] * 1e3:.1f}" for m_ in rounds) + " |")
    pred = [preds[i].step_s for i in range(len(names))]
    for r, m_ in enumerate(rounds):
        print(f"round {r + 1}: Spearman rho (predicted vs measured step time, {len(names)} compositions) = "
              f"{spearman(pred, [m_[i] for i in range(len(names))]):.2f}")
    if len(rounds) > 1:
        print(f"round 1 vs round 2 (measurement noise): rho = "
              f"{spearman([rounds[0][i] for i in range(len(names))], [rounds[1][i] for i in range(len(names))]):.2f}")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
