"""A/B of ``expert_parallel`` implementations in one gloo run of ``bench_train.py``'s dp+ep row.

Each variant is an ``experts.py`` (``colofn/parallel/ep/experts.py`` of some
commit); the steps of one world-4 run (``dp=2,ep=2``, 4 experts, the same
model, batch and optimizer as ``bench_train.py``) cycle through them, each at
a barrier, so a change in machine load hits every variant alike. Printed per
variant: the median over its steps of the slowest rank's wall time and of the
CPU time of the 4 rank processes together (all their threads), ms::

    git show b73333e:src/colofn/parallel/ep/experts.py > /tmp/sync.py
    git show 574d131:src/colofn/parallel/ep/experts.py > /tmp/gather.py
    python benchmarks/ab_moe.py now=src/colofn/parallel/ep/experts.py sync=/tmp/sync.py gather=/tmp/gather.py

A variant whose ``expert_parallel`` takes no ``table`` gathers the counts itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import bench_train as bt  # noqa: E402
import colofn  # noqa: E402
import colofn.parallel.ep.layer as layer  # noqa: E402
from colofn import data, random  # noqa: E402
from colofn.models import gpt  # noqa: E402


def _variant(name: str, path: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"ab_moe_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = module.expert_parallel
    if "table" in inspect.signature(fn).parameters:
        return fn
    return lambda params, tokens, r, config, axis, table=None: fn(params, tokens, r, config, axis)


def rank_program(paths: dict[str, str], steps: int) -> dict[str, tuple[float, float]]:
    torch.set_num_threads(1)
    variants = {name: _variant(name, path) for name, path in paths.items()}
    s = next(x for x in bt.STRATEGIES if x.name == "dp+ep (MoE)")
    cfg = bt.train_config(s, 4)
    mcfg = cfg.model_config()
    mesh = colofn.Mesh(tuple(cfg.mesh_shape.values()), tuple(cfg.mesh_shape))
    run = bt.Colofn(cfg, mcfg, gpt.init(random.key(0), mcfg), mesh)
    batch = data.sample_batch(random.key(100), data.encode(data.text()), bt.BATCH, mcfg.seq_len)
    names = list(variants)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for i in range(len(names) * (steps + 2)):
        name = names[i % len(names)]
        layer.expert_parallel = variants[name]  # what moe() calls
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        run.step(batch)
        wall = torch.tensor([time.perf_counter() - t0])
        cpu = torch.tensor([time.process_time() - c0])
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu)
        if i >= 2 * len(names):  # two warm-up steps each
            times[name].append((float(wall), float(cpu)))
    return {k: (statistics.median(w for w, _ in v) * 1e3, statistics.median(c for _, c in v) * 1e3) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="NAME=PATH of an experts.py")
    p.add_argument("--steps", type=int, default=24, help="timed steps per variant")
    a = p.parse_args()
    paths = dict(v.split("=", 1) for v in a.variants)
    load = os.getloadavg()[0]
    out = colofn.launch(rank_program, paths, a.steps, world_size=4, backend="gloo")[0]
    print(f"# ab_moe: {a.steps} steps per variant, load average {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, (wall, cpu) in out.items():
        print(f"{name}: step {wall:.1f} ms (slowest rank), CPU {cpu:.1f} ms (4 ranks)")


if __name__ == "__main__":
    main()
