"""colofn.zero stages 0-3 versus torch DDP and FSDP2 (``fully_shard``), side by side in one run.

The same MLP, data and AdamW (fp32) in every framework, on real gloo processes
(world 2 and 4) and on colofn's simulated world. Per framework and rank:

* step time: median wall time of a training step after warm-up (each step
  starts at a barrier), slowest rank; one intra-op thread per rank;
* bytes sent per step per rank, by ring volume (colofn: ``comm_trace``; DDP: a
  comm hook counting its gradient buckets; FSDP2: counting wrappers around the
  ``torch.distributed`` calls it makes);
* model states: bytes of the distinct storages of params, grads and optimizer
  state a rank holds at the optimizer step (not DDP's internal gradient buckets);
* peak allocated (gloo only: needs one process per rank): the peak of the
  bytes allocated from setup through two steps, from ``torch.profiler``'s
  memory events.

Every figure is also printed as a ratio to DDP's. Run it with::

    python benchmarks/bench_zero.py            # about 1-2 minutes on 2 CPU cores
    python benchmarks/bench_zero.py --quick    # smaller model, fewer steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import colofn
from colofn import optim, zero
from colofn import tracing as ct
from colofn import tree as jt
from colofn.zero.memory import storage_bytes

LR = 1e-3


# ----------------------------------------------------------------------------- the model


def make_params(width: int, depth: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "layers": [
            {"w": torch.randn(width, width, generator=g) / width**0.5, "b": torch.zeros(width)}
            for _ in range(depth)
        ]
    }


def loss_fn(params: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    layers = params["layers"]
    for i, layer in enumerate(layers):
        x = x @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            x = torch.tanh(x)
    return ((x - y) ** 2).mean()


def make_module(params: dict[str, Any]) -> nn.Sequential:
    mods: list[nn.Module] = []
    layers = params["layers"]
    for i, layer in enumerate(layers):
        lin = nn.Linear(*layer["w"].shape)
        with torch.no_grad():
            lin.weight.copy_(layer["w"].T)
            lin.bias.copy_(layer["b"])
        mods.append(lin)
        if i < len(layers) - 1:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


def make_batches(width: int, rows: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g)) for _ in range(count)]


# ----------------------------------------------------------------------------- counting torch's traffic


class _Counter(threading.local):  # per rank: simulated ranks are threads
    sent = 0
    active = False


COUNTER = _Counter()


def _count(op: str, t: torch.Tensor, group: Any) -> None:
    if COUNTER.active:
        n = dist.get_world_size(group)
        COUNTER.sent += ct.volume(op, t.numel() * t.element_size(), n)[0]


def _install_counters() -> None:
    if getattr(dist, "_bench_zero_counting", False):
        return
    ag, rs, ar = dist.all_gather_single, dist.reduce_scatter_single, dist.all_reduce

    def all_gather_single(output, input, group=None, async_op=False):  # noqa: A002
        _count("all_gather", input, group)
        return ag(output, input, group=group, async_op=async_op)

    def reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):  # noqa: A002
        _count("reduce_scatter", input, group)
        return rs(output, input, op=op, group=group, async_op=async_op)

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        _count("all_reduce", tensor, group)
        return ar(tensor, op=op, group=group, async_op=async_op)

    dist.all_gather_single, dist.reduce_scatter_single, dist.all_reduce = all_gather_single, reduce_scatter_single, all_reduce
    dist._bench_zero_counting = True  # type: ignore[attr-defined]


def _ddp_hook(state, bucket):  # no annotations: DDP checks them at runtime
    buf = bucket.buffer()
    n = dist.get_world_size()
    _count("all_reduce", buf, None)
    return dist.distributed_c10d.all_reduce(buf.div_(n), async_op=True).get_future().then(lambda f: f.value()[0])


# ----------------------------------------------------------------------------- one framework on this rank


def _shard(batch: Any, n: int, r: int) -> Any:
    return jt.map(lambda x: x.chunk(n)[r], batch)


def _peak_allocated(fn: Any) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


class ColofnRun:
    def __init__(self, stage: int, params: Any, batches: list[Any]) -> None:
        self.name = f"colofn stage {stage}"
        self.stage, self.params, self.batches = stage, params, batches

    def setup(self) -> None:
        mesh = colofn.Mesh((colofn.process_count(),), ("dp",))
        self.opt = optim.adamw(LR, weight_decay=0.0)
        self.state = zero.init(self.params, self.opt, mesh, stage=self.stage)

    def step(self, i: int) -> tuple[int, int]:
        with colofn.comm_trace() as records:
            self.state, info = zero.train_step(loss_fn, self.opt, self.state, self.batches[i % len(self.batches)])
        return sum(r.bytes_sent for r in records), info.memory.model_states


class TorchRun:
    def __init__(self, kind: str, params: Any, batches: list[Any]) -> None:
        self.name = {"ddp": "torch DDP", "fsdp": "torch FSDP2"}[kind]
        self.kind, self.params, self.batches = kind, params, batches

    def setup(self) -> None:
        _install_counters()
        model = make_module(self.params)
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model)
            model.register_comm_hook(None, _ddp_hook)
        else:
            from torch.distributed.fsdp import fully_shard

            mesh = colofn.Mesh((colofn.process_count(),), ("dp",))
            for m in model:
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh.device_mesh)
            fully_shard(model, mesh=mesh.device_mesh)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, foreach=True)

    def step(self, i: int) -> tuple[int, int]:
        n, r = colofn.process_count(), colofn.process_index()
        x, y = _shard(self.batches[i % len(self.batches)], n, r)
        COUNTER.sent, COUNTER.active = 0, True
        try:
            loss = ((self.model(x) - y) ** 2).mean()
            loss.backward()
            self.opt.step()
        finally:
            COUNTER.active = False
        held = self._model_states()
        self.opt.zero_grad(set_to_none=True)
        return COUNTER.sent, held

    def _model_states(self) -> int:
        def local(t: torch.Tensor) -> torch.Tensor:
            return t.to_local() if hasattr(t, "to_local") else t

        ps = list(self.model.parameters())
        grads = [local(p.grad) for p in ps if p.grad is not None]
        states = [local(v) for s in self.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        seen: set[tuple[str, int]] = set()
        return sum(storage_bytes(t, seen) for t in ([local(p) for p in ps], grads, states))


def run_rank(width: int, depth: int, rows: int, warmup: int, steps: int, peaks: bool) -> dict[str, dict[str, float]]:
    """Every framework on this rank; returns {name: {ms, bytes, states, peak}}."""
    torch.set_num_threads(1)  # one intra-op thread per rank, as torchrun's OMP_NUM_THREADS=1
    params = make_params(width, depth)
    batches = make_batches(width, rows * colofn.process_count(), 4)
    runs: list[Any] = [ColofnRun(s, params, batches) for s in range(4)]
    runs += [TorchRun("ddp", params, batches), TorchRun("fsdp", params, batches)]
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        try:
            run.setup()
            for i in range(warmup):
                run.step(i)
            times = []
            for i in range(steps):
                dist.barrier()
                t0 = time.perf_counter()
                sent, states = run.step(i)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            row = {"ms": ms, "bytes": float(sent), "states": float(states), "peak": float("nan")}
            if peaks:

                def two_steps(run: Any = run) -> None:
                    run.setup()
                    run.step(0)
                    run.step(1)

                dist.barrier()
                row["peak"] = float(_peak_allocated(two_steps))
            out[run.name] = row
        except Exception as e:  # noqa: BLE001 - reported in the table
            out[run.name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"}  # type: ignore[dict-item]
        del run
    return out


# ----------------------------------------------------------------------------- report


def _merge(per_rank: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    merged = {}
    for name, row in per_rank[0].items():
        if "error" in row:
            merged[name] = row
            continue
        merged[name] = {
            "ms": max(r[name]["ms"] for r in per_rank),
            "bytes": max(r[name]["bytes"] for r in per_rank),
            "states": max(r[name]["states"] for r in per_rank),
            "peak": max(r[name]["peak"] for r in per_rank),
        }
    return merged


def _fmt_bytes(b: float) -> str:
    if b != b:  # nan
        return "-"
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def table(title: str, rows: dict[str, dict[str, float]]) -> str:
    base = rows.get("torch DDP", {})
    lines = [
        f"### {title}",
        "",
        "| framework | step ms | / DDP | sent per step | / DDP | model states | / DDP | peak allocated | / DDP |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def ratio(row: dict[str, float], key: str) -> str:
        if key not in base or base[key] != base[key] or not base[key]:
            return "-"
        return f"{row[key] / base[key]:.2f}"

    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | {row['error']} |  |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {name} | {row['ms']:.2f} | {ratio(row, 'ms')} | {_fmt_bytes(row['bytes'])} | {ratio(row, 'bytes')} "
            f"| {_fmt_bytes(row['states'])} | {ratio(row, 'states')} | {_fmt_bytes(row['peak'])} | {ratio(row, 'peak')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    p.add_argument("--worlds", default="2,4", help="gloo world sizes (comma-separated)")
    args = p.parse_args(argv)
    width, depth, rows, warmup, steps = (64, 3, 8, 1, 3) if args.quick else (256, 4, 16, 2, 8)
    n_params = depth * (width * width + width)
    print(f"MLP {depth} x Linear({width}, {width}) = {n_params:,} params ({n_params * 4 / 2**20:.2f} MiB fp32), "
          f"AdamW fp32, {rows} rows per rank, {steps} timed steps after {warmup} warm-up, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    t0 = time.perf_counter()
    for n in [int(w) for w in args.worlds.split(",") if w]:
        per_rank = colofn.launch(run_rank, width, depth, rows, warmup, steps, True, world_size=n, backend="gloo")
        print(table(f"gloo, {n} processes", _merge(per_rank)), "\n", flush=True)
    for n in (2, 4):
        per_rank = colofn.launch(run_rank, width, depth, rows, warmup, steps, False, world_size=n)
        print(table(f"simulated world, {n} ranks (threads; peak allocation not separable per rank)", _merge(per_rank)), "\n", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
