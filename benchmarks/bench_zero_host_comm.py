"""What ZeRO's bucket collectives cost on gloo, one operation per bucket against one for all of them.

The buckets of ``bench_train.py``'s small GPT (about 2 MB of float32 over 7
buckets), 4 gloo ranks, one thread each; every variant starts its operations
asynchronously and waits for all of them, the variants take turns at a barrier
(so a change of machine load hits all alike), median over 20 rounds of each
rank's CPU time (all threads of its process) and wall time. This is what
decided how ``colofn/zero/_host_comm.py`` runs ZeRO-1's reduce-scatter and
stages 1-2's all-gather on host backends::

    python benchmarks/bench_zero_host_comm.py
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

import colofn
from colofn import _comm

SIZES = [24960, 111104, 111104, 111104, 111104, 24960, 192]  # elements per bucket (multiples of 4)
N = 4


def program() -> dict[str, str]:
    torch.set_num_threads(1)
    g = dist.group.WORLD
    xs = [torch.randn(s) for s in SIZES]

    def reduce_scatters() -> None:
        works = [_comm._reduce_scatter_from(torch.empty(x.numel() // N), x, group=g, async_op=True) for x in xs]
        for w in works:
            w.wait()

    def all_reduces() -> None:
        works = [dist.all_reduce(x, group=g, async_op=True) for x in xs]
        for w in works:
            w.wait()

    def coalesced_all_reduce() -> None:
        g.allreduce_coalesced(xs, dist.AllreduceCoalescedOptions()).wait()

    def all_gathers() -> None:
        works = [_comm._all_gather_into(torch.empty_like(x), x[: x.numel() // N].clone(), group=g, async_op=True) for x in xs]
        for w in works:
            w.wait()

    def broadcasts() -> None:
        works = []
        for x in xs:
            s = x.numel() // N
            works += [dist.broadcast(x.narrow(0, i * s, s), group=g, group_src=i, async_op=True) for i in range(N)]
        for w in works:
            w.wait()

    def coalesced_all_gather() -> None:
        g.allgather_into_tensor_coalesced([torch.empty_like(x) for x in xs], [x[: x.numel() // N].clone() for x in xs]).wait()

    variants = {
        "7 reduce-scatters": reduce_scatters,
        "7 all-reduces in place": all_reduces,
        "1 coalesced all-reduce": coalesced_all_reduce,
        "7 all-gathers": all_gathers,
        "28 broadcasts in place": broadcasts,
        "1 coalesced all-gather": coalesced_all_gather,
    }
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():
        f()
    for _ in range(20):
        for name, f in variants.items():
            dist.barrier()
            c, w = time.process_time(), time.perf_counter()
            f()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {k: f"{statistics.median(cpu[k]) * 1e3:.1f} ms CPU, {statistics.median(wall[k]) * 1e3:.1f} ms wall" for k in variants}


if __name__ == "__main__":
    load = os.getloadavg()[0]
    results = colofn.launch(program, world_size=N, backend="gloo")
    print(f"# {sum(SIZES) * 4 / 1e6:.1f} MB of float32 in {len(SIZES)} buckets, gloo world {N}, load average {load:.1f}; per rank: median CPU (process) / wall")
    print("| operations | " + " | ".join(f"rank {r}" for r in range(N)) + " |")
    print("| --- |" + " ---: |" * N)
    for name in results[0]:
        print(f"| {name} | " + " | ".join(r[name] for r in results) + " |")
