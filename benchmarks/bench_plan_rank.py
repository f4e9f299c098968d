"""Does ``colofn plan`` rank compositions as they measure? Spearman's rho on a gloo world of 4.

The model is ``colofn train``'s ``small`` preset (4 layers, d_model 96, 4 heads,
seq 64, untied), global batch 16, AdamW in fp32, the shipped corpus. Each
composition runs as ``colofn train`` runs it (``colofn.train.loop.rank_program``
on a gloo world of 4 processes, one intra-op thread each; one world runs every
composition in turn); its step time is the slowest rank's wall time of a step,
the fastest over the steps after the first two (warm-up; other processes on
the host only ever add time). Every round measures all compositions once, in
a shuffled order, after an untimed run of each composition that takes the
one-time costs.

The planner predicts the same compositions (fp32 Adam, efficiency 1) on a
cluster calibrated on this machine first (the ``--cluster FILE`` fields,
printed as JSON; ``--cluster FILE`` reuses one):

* ``cores``: the processors this process may run on (``os.sched_getaffinity``);
* ``peak_flops`` and ``per_op_s``: a single-process step (forward, backward,
  AdamW: ``SingleDevice``, what ``--check`` runs) of 4 and of 16 sequences, in
  processor time (``time.process_time``, so other processes' load does not
  count); both run the same torch calls (counted by ``plan.count_ops``), so
  the difference is FLOPs: its rate is ``peak_flops``, and what the FLOPs do
  not explain of the small step, over its calls, is ``per_op_s``;
* ``per_call_s``: the processor time of an 8-byte gloo all-reduce over the 4
  ranks (the process's, gloo's threads included);
* ``intra_latency``: that call's wall time less its processor time times the
  ranks per core (the model's own formula for a step of one collective);
  ``intra_bw``: a 4 MB all-reduce (by ``tracing.volume``'s bytes; its wall
  time less the small one's, or all of it when the two are within 1.5x, as a
  loaded host makes them); the fastest of 3 rounds.

It prints the calibrated cluster, each composition's predicted torch calls,
messages, busy and step time next to the measured step times, Spearman's rank
correlation per round, and the same predictions without each new term
(``per_op_s``, ``per_call_s``, ``cores``; and without all three, the model
before them), with each composition's place, to show what each term moves.
Run with::

    python benchmarks/bench_plan_rank.py               # 2 rounds, about 1-3 minutes
    python benchmarks/bench_plan_rank.py --calibrate-only
    python benchmarks/bench_plan_rank.py --cluster host.json --rounds 1 --steps 4
    python benchmarks/bench_plan_rank.py --calls     # one gloo call's cost by op and size
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


def _collective_program(sizes: list[int], reps: int, rounds: int = 3) -> list[tuple[float, float]]:
    """``(wall, processor)`` seconds per all-reduce of each size on this rank: the fastest of ``rounds`` rounds of ``reps`` calls.

    Processor time is the process's (``time.process_time``: gloo's own threads included).
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    best = [(float("inf"), float("inf"))] * len(sizes)
    xs = [torch.ones(max(1, n // 4)) for n in sizes]
    for x in xs:
        dist.all_reduce(x)
    for _ in range(rounds):
        for i, x in enumerate(xs):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                dist.all_reduce(x)
            wall, cpu = (time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps
            best[i] = min(best[i], (wall, cpu))
    return best


def _calls_program(sizes: list[int], reps: int) -> dict[str, list[tuple[float, float]]]:
    """``{op: [(wall, processor) seconds per call, per size]}`` of gloo's all-reduce, all-gather and reduce-scatter."""
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13 renames the two *_tensor calls
    torch.set_num_threads(1)
    n = dist.get_world_size()
    out: dict[str, list[tuple[float, float]]] = {}
    for nbytes in sizes:
        full = torch.ones(max(n, nbytes // 4 // n * n))
        shard = torch.empty(full.numel() // n)
        calls = {"all_reduce": (dist.all_reduce, (full,)),
                 "all_gather": (dist.all_gather_into_tensor, (full, shard)),
                 "reduce_scatter": (dist.reduce_scatter_tensor, (shard, full))}
        for name, (call, args) in calls.items():
            call(*args)
            best = (float("inf"), float("inf"))
            for _ in range(3):
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(reps):
                    call(*args)
                best = min(best, ((time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps))
            out.setdefault(name, []).append(best)
    return out


def print_calls() -> None:
    """What one gloo call costs over 4 ranks, by op and size: wall and processor ms (the slowest rank's)."""
    sizes = [8, 128 << 10, 512 << 10]
    per_rank = colofn.launch(_calls_program, sizes, 20, world_size=4, backend="gloo")
    print("| op | " + " | ".join(f"{n:,} B: wall, processor ms" for n in sizes) + " |")
    print("| --- | " + " | ".join("---" for _ in sizes) + " |")
    for op in per_rank[0]:
        cells = [(max(r[op][i][0] for r in per_rank), max(r[op][i][1] for r in per_rank)) for i in range(len(sizes))]
        print(f"| {op} | " + " | ".join(f"{w * 1e3:.2f}, {c * 1e3:.2f}" for w, c in cells) + " |")


def _single_step_s(cfg: gpt.GPTConfig, rows: int, reps: int = 7) -> tuple[float, int]:
    """``(processor seconds, torch calls)`` of one warm single-device step (forward, backward, AdamW) on ``rows`` sequences.

    Processor time, not wall time: what the step costs its core, whatever else the host runs.
    """
    from colofn.train.loop import SingleDevice, make_optimizer

    opt = make_optimizer(TrainConfig(preset="small"))
    params = gpt.init(colofn.random.key(0), cfg)
    single = SingleDevice(cfg, opt, params, opt.init(params))
    t = colofn.random.randint(colofn.random.key(1), (rows, cfg.seq_len + 1), 0, cfg.vocab_size)
    batch = {"tokens": t[:, :-1], "targets": t[:, 1:]}
    single.step(batch)
    ops = plan.count_ops(lambda: single.step(batch))[1]
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        single.step(batch)
        times.append(time.process_time() - t0)
    return statistics.median(times), ops


def calibrate() -> plan.Cluster:
    """A :class:`colofn.plan.Cluster` of this host as 4 gloo ranks see it (see the module docstring)."""
    cfg = gpt.config("small", tie_embeddings=False)
    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # A step is ops x per_op + FLOPs / rate: the same ops on 4 and 16 rows give both.
    small_rows, large_rows = BATCH // 4, BATCH
    (t_small, ops), (t_large, _) = (_single_step_s(cfg, r) for r in (small_rows, large_rows))
    per_row = plan.from_gpt(cfg).flops_per_token() * cfg.seq_len
    rate = per_row * (large_rows - small_rows) / (t_large - t_small) if t_large > t_small else per_row * large_rows / t_large
    per_op = max(0.0, t_small - per_row * small_rows / rate) / ops
    small, large = 8, 4 << 20
    (w_small, c_small), (w_large, _) = (max(r) for r in zip(*colofn.launch(_collective_program, [small, large], 20,
                                                                          world_size=4, backend="gloo"), strict=True))
    per_call = c_small
    ranks_per_core = max(1.0, 4 / cores)
    # The small call's wall time: every rank's processor time (shared) plus the wait.
    lat = max(1e-6, w_small - per_call * ranks_per_core)
    # Under load the small call can take as long as the large one: then bandwidth alone explains the large.
    bw = volume("all_reduce", large, 4)[0] / (w_large - w_small if w_large > 1.5 * w_small else w_large)
    return plan.Cluster("this-host", 4, 4, 16e9, rate, bw, bw, lat, lat, source="bench_plan_rank.py calibration",
                        cores=cores, per_call_s=per_call, per_op_s=per_op)


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
    ap.add_argument("--steps", type=int, default=8, help="steps per run; the first two are not timed (>= 3)")
    ap.add_argument("--out", default="/tmp/colofn-bench-plan-rank")
    ap.add_argument("--cluster", help="a cluster JSON file (as printed) instead of calibrating")
    ap.add_argument("--measured", action="append", default=[], metavar="MS,MS,...",
                    help="a round measured before (ms per composition, in COMPOSITIONS order) to compare with "
                         "instead of running (repeatable)")
    ap.add_argument("--calls", action="store_true",
                    help="only print what one gloo call costs by op and size (wall and processor time)")
    ap.add_argument("--calibrate-only", action="store_true", help="print the calibrated cluster and the predictions, run nothing")
    args = ap.parse_args(argv)
    if args.calls:
        print(f"load average {os.getloadavg()[0]:.1f}")
        print_calls()
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        return 0
    if args.calibrate_only or args.measured:
        args.rounds = 0
    t_start = time.perf_counter()
    load = os.getloadavg()
    if args.cluster:
        with open(args.cluster) as f:
            cl = plan.Cluster.from_json(f.read())
    else:
        cl = calibrate()
    print(f"cores {os.cpu_count()}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print("calibrated cluster:", json.dumps(dataclasses.asdict(cl)))
    m = plan.from_gpt(gpt.config("small", tie_embeddings=False), "small")
    cands = [_candidate(mesh, extra) for mesh, extra in COMPOSITIONS]

    def predict_all(c: plan.Cluster) -> list[plan.Prediction]:
        return [plan.predict(m, x, c, global_batch=BATCH, efficiency=1.0, precision=plan.FP32_ADAM) for x in cands]

    # The model, and the model less each term: which compositions each term moves.
    variants = {
        "all terms": cl,
        "no per_op": dataclasses.replace(cl, per_op_s=0.0),
        "no per_call": dataclasses.replace(cl, per_call_s=0.0),
        "no cores": dataclasses.replace(cl, cores=None),
        "none of the three": dataclasses.replace(cl, cores=None, per_call_s=0.0, per_op_s=0.0),
    }
    predicted = {name: predict_all(c) for name, c in variants.items()}
    preds = dict(enumerate(predicted["all terms"]))
    # A first run of each composition, not timed: one-time costs (first calls on each group and between
    # each pair of ranks, lazy imports) fall on it, not on round 1 (its first pipeline measured 1.4-2.8x round 2's).
    warm = [(-1, _train_cfg(*c, 3, args.out)) for c in COMPOSITIONS] if args.rounds else []
    jobs = list(warm)
    for r in range(args.rounds):
        order = list(range(len(COMPOSITIONS)))
        pyrandom.Random(r).shuffle(order)
        jobs += [(i, _train_cfg(*COMPOSITIONS[i], args.steps, args.out)) for i in order]
    # One world for every run: starting a gloo world costs more than a run.
    per_rank = colofn.launch(_rank, jobs, world_size=4, backend="gloo") if jobs else []
    rounds: list[dict[int, float]] = [{} for _ in range(args.rounds)]
    for k, (i, _) in enumerate(jobs[len(warm):], len(warm)):
        steps = zip(*(r[k][1] for r in per_rank), strict=True)  # each step: every rank's time
        rounds[(k - len(warm)) // len(COMPOSITIONS)][i] = min(max(t) for t in list(steps)[2:])
    for text in args.measured:
        values = [float(x) / 1e3 for x in text.split(",")]
        if len(values) != len(COMPOSITIONS):
            ap.error(f"--measured needs {len(COMPOSITIONS)} values, got {len(values)}")
        rounds.append(dict(enumerate(values)))
    names = [str(preds[i].candidate) for i in range(len(COMPOSITIONS))]
    print()
    print("| composition | ops | messages | busy ms | predicted ms | "
          + " | ".join(f"measured ms (round {r + 1})" for r in range(len(rounds))) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in rounds) + " |")
    for i, name in enumerate(names):
        p = preds[i]
        print(f"| {name} | {p.ops} | {sum(x.n_messages for x in p.collectives)} | {p.busy_s * 1e3:.1f} | "
              f"{p.step_s * 1e3:.1f} | " + " | ".join(f"{m_[i] * 1e3:.1f}" for m_ in rounds) + " |")
    print()
    print("| model | " + " | ".join(names) + " | " + " | ".join(f"rho round {r + 1}" for r in range(len(rounds))) + " |")
    print("| --- | " + " | ".join("---" for _ in names) + " | " + " | ".join("---" for _ in rounds) + " |")
    for variant, ps in predicted.items():
        pred = [x.step_s for x in ps]
        order = sorted(range(len(pred)), key=lambda i: pred[i])
        place = {i: k + 1 for k, i in enumerate(order)}
        rhos = [spearman(pred, [m_[i] for i in range(len(names))]) for m_ in rounds]
        print(f"| {variant} | " + " | ".join(f"{x.step_s * 1e3:.0f} ({place[i]})" for i, x in enumerate(ps))
              + " | " + " | ".join(f"{r:.2f}" for r in rhos) + " |")
    for r, m_ in enumerate(rounds):
        print(f"round {r + 1}: Spearman rho (predicted vs measured step time, {len(names)} compositions) = "
              f"{spearman([preds[i].step_s for i in range(len(names))], [m_[i] for i in range(len(names))]):.2f}")
    if len(rounds) > 1:
        print(f"round 1 vs round 2 (measurement noise): rho = "
              f"{spearman([rounds[0][i] for i in range(len(names))], [rounds[1][i] for i in range(len(names))]):.2f}")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
