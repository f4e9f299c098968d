"""colofn's pipeline runtime versus ``torch.distributed.pipelining``, side by side in one run.

The same MLP (8 tanh layers of width 512, split evenly over the stages, so every
schedule computes the same model), data, schedule and microbatches in both, on real gloo processes (world 2 and 4) and on colofn's
simulated world. For each pair of equivalent schedules:

* step time: median over the timed steps of the slowest rank's wall time (all
  ranks start a step together after a barrier), and torch's time as a ratio to
  colofn's;
* the largest gradient difference between the two (they run the same math);
* idle fraction per rank, measured: ``1 - compute / step time``, where compute
  is the sum of colofn's per-action perf-counter intervals
  (``PipelineResult.events``), and predicted: :func:`colofn.pipeline.simulate`'s
  bubble with the measured median cost of each kind of action on each stage
  (no latency). The difference is communication and Python overhead.

torch's pipelining on the simulated world is tried too and reported with its error.

    python benchmarks/bench_pipeline.py            # about 1-2 minutes on 2 CPU cores
    python benchmarks/bench_pipeline.py --quick    # a smaller model, fewer steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import colofn
from colofn import pipeline
from colofn._comm import axis_group
from colofn.pipeline.measured import measured_costs

PAIRS = [  # colofn schedule, chunks, torch.distributed.pipelining class
    ("gpipe", 1, "ScheduleGPipe"),
    ("1f1b", 1, "Schedule1F1B"),
    ("interleaved_1f1b", 2, "ScheduleInterleaved1F1B"),
    ("zb_h1", 1, "ScheduleInterleavedZeroBubble"),
    ("zbv", 2, "ScheduleZBVZeroBubble"),
]


# ----------------------------------------------------------------------------- the model


def make_params(num_stages: int, cfg: dict) -> list[list[dict[str, torch.Tensor]]]:
    """``cfg["depth"]`` layers in all, ``depth / num_stages`` per stage."""
    g = torch.Generator().manual_seed(0)
    w = cfg["width"]
    per_stage = cfg["depth"] // num_stages
    return [[{"w": torch.randn(w, w, generator=g) / w**0.5, "b": torch.randn(w, generator=g) / 10}
             for _ in range(per_stage)] for _ in range(num_stages)]


def stage_fn(layers: list[dict[str, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = torch.tanh(x @ layer["w"] + layer["b"])
    return x


def mse(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((y - t) ** 2).mean()


def make_module(layers: list[dict[str, torch.Tensor]]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for layer in layers:
        lin = nn.Linear(*layer["w"].shape)
        with torch.no_grad():
            lin.weight.copy_(layer["w"].T)
            lin.bias.copy_(layer["b"])
        mods += [lin, nn.Tanh()]
    return nn.Sequential(*mods)


def make_batch(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = cfg["microbatches"] * cfg["microbatch_size"]
    return torch.randn(n, cfg["width"], generator=g), torch.randn(n, cfg["width"], generator=g)


# ----------------------------------------------------------------------------- one framework


def colofn_step(schedule: pipeline.Schedule, params: list, mesh: colofn.Mesh, cfg: dict) -> Any:
    """A function running one colofn step; it keeps each step's result in ``step.outputs``."""
    x, t = make_batch(cfg)
    pipe = pipeline.Pipeline([stage_fn] * schedule.num_stages, schedule, loss_fn=mse, mesh=mesh)
    outputs: list[Any] = []

    def step() -> None:
        outputs.append(pipe(params, x, t))

    step.outputs = outputs  # type: ignore[attr-defined]
    return step


def torch_step(cls_name: str, schedule: pipeline.Schedule, params: list, mesh: colofn.Mesh,
               cfg: dict) -> Any:
    """A function running one step of ``torch.distributed.pipelining``'s ``cls_name``."""
    from torch.distributed import pipelining as tpp

    x, t = make_batch(cfg)
    rank = mesh.axis_index("pp")
    group = axis_group(mesh, ("pp",)).group
    mine = schedule.stages_of(rank)
    modules = {s: make_module(params[s]) for s in mine}
    stages = [tpp.PipelineStage(modules[s], s, schedule.num_stages, torch.device("cpu"), group=group)
              for s in mine]
    cls = getattr(tpp, cls_name)
    sched = (cls(stages[0], cfg["microbatches"], loss_fn=mse)
             if issubclass(cls, tpp.schedules.PipelineScheduleSingle)
             else cls(stages, cfg["microbatches"], loss_fn=mse))
    first, last = 0 in mine, schedule.num_stages - 1 in mine

    def step() -> None:
        for m in modules.values():
            m.zero_grad(set_to_none=True)
        args = (x,) if first else ()
        kwargs = {"target": t, "losses": []} if last else {}
        sched.step(*args, **kwargs)

    def grads() -> dict:
        return {s: [{"w": m[2 * i].weight.grad.T, "b": m[2 * i].bias.grad}
                    for i in range(len(m) // 2)] for s, m in modules.items()}

    step.grads = grads  # type: ignore[attr-defined]
    return step


def rank_program(world: int, cfg: dict, with_torch: bool = True) -> dict:
    """Per schedule: warm both up, then time them alternately, step by step, from a barrier."""
    torch.set_num_threads(1)
    mesh = colofn.Mesh((world,), ("pp",))
    group = axis_group(mesh, ("pp",)).group
    results = {}
    for name, chunks, cls_name in PAIRS:
        schedule = pipeline.make_schedule(name, world, cfg["microbatches"], chunks=chunks)
        params = make_params(schedule.num_stages, cfg)
        steps = {"colofn": colofn_step(schedule, params, mesh, cfg)}
        entry: dict[str, Any] = {}
        if with_torch:
            try:
                steps["torch"] = torch_step(cls_name, schedule, params, mesh, cfg)
                steps["torch"]()
            except Exception as e:  # noqa: BLE001 - reported in the table
                steps.pop("torch")
                entry["torch_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                entry["torch_trace"] = traceback.format_exc()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for k in range(cfg["warmup"] + cfg["steps"]):
            for fw, step in steps.items():
                dist.barrier(group=group)
                t0 = time.perf_counter()
                step()
                if k >= cfg["warmup"]:
                    times[fw].append(time.perf_counter() - t0)
        outs = steps["colofn"].outputs[-cfg["steps"]:]
        entry["colofn"] = {"times": times["colofn"], "events": [[plain(e) for e in o.events] for o in outs],
                           "grads": outs[-1].grads}
        if "torch" in steps:
            entry["torch"] = {"times": times["torch"], "grads": steps["torch"].grads()}
        results[name] = entry
    return results


# ----------------------------------------------------------------------------- the report


def plain(e: pipeline.Event) -> list[Any]:
    """An event as data (ranks return data to the launcher, never pickled objects)."""
    return [e.rank, e.action.stage, e.action.kind.value, e.action.microbatch, e.start, e.end]


def event(x: list[Any]) -> pipeline.Event:
    return pipeline.Event(x[0], pipeline.Action(x[1], x[2], x[3]), x[4], x[5])


def costs_from(events: list[list[Any]], num_stages: int) -> pipeline.Costs:
    """Median measured time of each kind on each stage, over every rank's steps."""
    return measured_costs(num_stages, [e for rank_events in events for step in rank_events for e in step])


def summarize(world: int, backend: str, per_rank: list[dict], cfg: dict) -> list[dict]:
    rows = []
    for name, chunks, cls_name in PAIRS:
        schedule = pipeline.make_schedule(name, world, cfg["microbatches"], chunks=chunks)
        c = [r[name]["colofn"] for r in per_rank]
        for x in c:
            x["events"] = [[event(e) for e in step] for step in x["events"]]
        step_c = [max(ts) for ts in zip(*(x["times"] for x in c), strict=True)]
        idle = []
        for r in range(world):
            fr = []
            for k, span in enumerate(step_c):
                busy = sum(e.end - e.start for e in c[r]["events"][k])
                fr.append(1 - busy / span)
            idle.append(statistics.median(fr))
        costs = costs_from([x["events"] for x in c], schedule.num_stages)
        sim = pipeline.simulate(schedule, costs)
        row = {"costs": costs, "world": world, "backend": backend, "schedule": name, "chunks": chunks,
               "torch": cls_name, "colofn_ms": 1e3 * statistics.median(step_c),
               "idle": idle, "predicted": list(sim.bubble), "torch_ms": None, "diff": None,
               "error": per_rank[0][name].get("torch_error")}
        if "torch" in per_rank[0][name]:
            t = [r[name]["torch"] for r in per_rank]
            step_t = [max(ts) for ts in zip(*(x["times"] for x in t), strict=True)]
            row["torch_ms"] = 1e3 * statistics.median(step_t)
            row["diff"] = max(float((a - b).abs().max())
                              for x, y in zip(c, t, strict=True) for s in x["grads"]
                              for la, lb in zip(x["grads"][s], y["grads"][s], strict=True)
                              for a, b in ((la["w"], lb["w"]), (la["b"], lb["b"])))
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| world | backend | colofn schedule | torch schedule | colofn ms | torch ms | torch / colofn "
          "| max grad diff | idle per rank, measured | idle per rank, simulate() |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        fmt = " ".join(f"{v:.2f}" for v in r["idle"])
        pred = " ".join(f"{v:.2f}" for v in r["predicted"])
        torch_ms = f"{r['torch_ms']:.1f}" if r["torch_ms"] is not None else "failed"
        ratio = f"{r['torch_ms'] / r['colofn_ms']:.2f}" if r["torch_ms"] is not None else "-"
        diff = f"{r['diff']:.1e}" if r["diff"] is not None else "-"
        name = f"{r['schedule']}" + (f" (chunks {r['chunks']})" if r["chunks"] > 1 else "")
        print(f"| {r['world']} | {r['backend']} | {name} | {r['torch']} | {r['colofn_ms']:.1f} | "
              f"{torch_ms} | {ratio} | {diff} | {fmt} | {pred} |")
    groups: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["torch_ms"] is not None:
            groups[(r["world"], r["backend"])].append(r["torch_ms"] / r["colofn_ms"])
    for (world, backend), ratios in groups.items():
        print(f"\ngeometric mean of torch / colofn, world {world} {backend}: "
              f"{statistics.geometric_mean(ratios):.2f}", end="")
    print()
    print_split(rows)
    errors = {(r["backend"], r["error"]) for r in rows if r["error"]}
    for backend, err in sorted(errors):
        print(f"\ntorch.distributed.pipelining on {backend}: {err}")


def print_split(rows: list[dict]) -> None:
    """Per stage: ``B`` as 1F1B measured it, ``I`` and ``W`` as ZB-H1 measured them, and ``(I + W) / B``."""
    print("\nThe split backward, median ms per action (B from the 1f1b row, I and W from the zb_h1 row):\n")
    print("| world | backend | stage | B | I | W | (I + W) / B |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r["schedule"] != "zb_h1":
            continue
        full = next(x for x in rows if x["schedule"] == "1f1b" and x["world"] == r["world"]
                    and x["backend"] == r["backend"])
        for s, (b, i, w) in enumerate(zip(full["costs"].backward, r["costs"].input_grad,
                                          r["costs"].weight_grad, strict=True)):
            print(f"| {r['world']} | {r['backend']} | {s} | {1e3 * b:.2f} | {1e3 * i:.2f} | {1e3 * w:.2f} | "
                  f"{(i + w) / b:.2f} |")


def split_backward_costs(cfg: dict, stages: int = 2, repeats: int = 30) -> None:
    """One middle stage in this process, no communication: ``B`` against ``I`` + ``W``, the split's two ways.

    ``I`` + ``W`` as colofn runs it (``_split_backward``: ``W`` starts from the
    gradients ``I`` recorded) and as it ran before (``W`` differentiates the
    stage outputs again), alternating, median of ``repeats``.
    """
    from colofn.pipeline._split_backward import backward_input, backward_weight

    torch.set_num_threads(1)
    params = make_params(stages, cfg)[0]
    leaves = [t.requires_grad_() for layer in params for t in layer.values()]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(cfg["microbatch_size"], cfg["width"], generator=g).requires_grad_()
    dy = torch.randn(cfg["microbatch_size"], cfg["width"], generator=g)

    def split() -> tuple[float, float]:
        y = stage_fn(params, x)
        t0 = time.perf_counter()
        _, work = backward_input([y], [dy], [x], leaves)
        del y
        t1 = time.perf_counter()
        backward_weight(work, leaves)
        return t1 - t0, time.perf_counter() - t1

    def again() -> tuple[float, float]:
        y = stage_fn(params, x)
        t0 = time.perf_counter()
        torch.autograd.grad([y], [x], [dy], retain_graph=True)
        t1 = time.perf_counter()
        torch.autograd.grad([y], leaves, [dy])
        return t1 - t0, time.perf_counter() - t1

    times: dict[str, list[float]] = defaultdict(list)
    for k in range(repeats + 3):
        stage_fn(params, x)  # the forward, outside the timed backward (as in an action)
        y = stage_fn(params, x)
        t0 = time.perf_counter()
        torch.autograd.grad([y], [x, *leaves], [dy])
        b = time.perf_counter() - t0
        (i, w), (i0, w0) = split(), again()
        if k >= 3:
            for key, v in (("B", b), ("I", i), ("W", w), ("I (before)", i0), ("W (before)", w0)):
                times[key].append(v)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"\nOne stage ({cfg['depth'] // stages} layers of width {cfg['width']}, microbatch "
          f"{cfg['microbatch_size']}), backward only, median of {repeats}, ms:\n")
    print("| B | I | W | (I + W) / B | I, W recomputing (before) | (I + W) / B before |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {med['B']:.2f} | {med['I']:.2f} | {med['W']:.2f} | {(med['I'] + med['W']) / med['B']:.2f} | "
          f"{med['I (before)']:.2f}, {med['W (before)']:.2f} | "
          f"{(med['I (before)'] + med['W (before)']) / med['B']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    ap.add_argument("--worlds", default="2,4", help="gloo world sizes (comma separated)")
    ap.add_argument("--sim-torch", action="store_true", default=True,
                    help="also try torch's pipelining on the simulated world")
    ap.add_argument("--split-only", action="store_true",
                    help="only the in-process B versus I + W comparison (seconds)")
    ap.add_argument("--width", type=int, default=None, help="the layers' width (default 512; --quick 64)")
    args = ap.parse_args()
    cfg = {"width": 512, "depth": 8, "microbatches": 8, "microbatch_size": 32, "warmup": 2,
           "steps": 8}
    if args.quick:
        cfg.update(width=64, microbatch_size=8, steps=3, warmup=1)
    if args.width is not None:
        cfg.update(width=args.width)
    print(f"# bench_pipeline: {cfg}, torch {torch.__version__}, 1 intra-op thread per rank, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    start = time.perf_counter()
    if args.split_only:
        split_backward_costs(cfg)
        return
    rows = []
    for world in [int(w) for w in args.worlds.split(",") if w]:
        per_rank = colofn.launch(rank_program, world, cfg, world_size=world, backend="gloo")
        rows += summarize(world, "gloo", per_rank, cfg)
        sim = colofn.launch(rank_program, world, cfg, args.sim_torch, world_size=world)
        rows += summarize(world, "sim", sim, cfg)
        if any("torch_trace" in r[n] for r in sim for n in r):
            trace = next(r[n]["torch_trace"] for r in sim for n in r if "torch_trace" in r[n])
            print(f"# torch pipelining on the simulated world failed; first traceback:\n{trace}",
                  file=sys.stderr)
    print_table(rows)
    split_backward_costs(cfg)
    print(f"\n# total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
