"""Where the CPU of a ``bench_train.py`` dp+ep (MoE) step goes, per rank, and how many ops the tracking mode sees.

Builds the row's colofn trainer exactly as ``bench_train.py`` does (gloo,
world 4, ``dp=2,ep=2``, 4 experts, top-1, 4 MoE layers), runs 3 warm-up
steps, then ``--steps`` steps with each phase timed by the calling thread's
CPU time (``time.thread_time``: a busy machine inflates it much less than
wall time): the MoE layers' routing (``route_and_count``, of it the
statistics' ``psum``) and experts (``expert_parallel``, of it the expert
math, the all-to-alls' launch and wait), the backward (``torch.autograd.grad``)
and the whole step; ms per step, mean over the steps. Then one more step
counting the ops that pass through the varying/invariant mode's
``__torch_function__``, by the source file that issued them. ``--native``
times the native side instead (DDP, every expert local: ``gpt.moe`` and the
backward)::

    python benchmarks/profile_moe.py
    python benchmarks/profile_moe.py --native
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_train as bt  # noqa: E402
import colofn  # noqa: E402
import profile_train as pt  # noqa: E402
from colofn import _vma  # noqa: E402
from colofn.models import gpt  # noqa: E402

ROW = "dp+ep (MoE)"


def _timer(acc: dict[str, float], name: str, fn: Any) -> Any:
    acc[name] = 0.0

    def timed(*a: Any, **k: Any) -> Any:
        t = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            acc[name] += time.thread_time() - t

    return timed


def rank_program(steps: int, native: bool) -> tuple[dict[str, float], dict[str, int]]:
    import colofn.parallel.ep._async as asy
    import colofn.parallel.ep.experts as ex
    import colofn.parallel.ep.layer as layer
    import colofn.parallel.ep.routing as routing

    s, cfg, mcfg, mesh, params, batch = pt.row(ROW)
    acc: dict[str, float] = {}
    if native:
        gpt.moe = _timer(acc, "moe (routing and experts)", gpt.moe)
        torch.autograd.backward = _timer(acc, "backward", torch.autograd.backward)
        run: Any = bt.Native(s, cfg, mcfg, params, mesh, True)
    else:
        layer.route_and_count = _timer(acc, "routing", layer.route_and_count)
        routing.psum = _timer(acc, "  its psum", routing.psum)
        layer.expert_parallel = _timer(acc, "experts", layer.expert_parallel)
        if hasattr(ex, "_through_experts"):
            ex._through_experts = _timer(acc, "  expert math", ex._through_experts)
        asy.AllToAll.__init__ = _timer(acc, "  all-to-all launch", asy.AllToAll.__init__)  # type: ignore[method-assign]
        asy.AllToAll.wait = _timer(acc, "  all-to-all wait", asy.AllToAll.wait)  # type: ignore[method-assign]
        torch.autograd.grad = _timer(acc, "backward", torch.autograd.grad)
        run = bt.Colofn(cfg, mcfg, params, mesh)
    for _ in range(3):
        run.step(batch)
    for k in acc:
        acc[k] = 0.0
    t0 = time.thread_time()
    for _ in range(steps):
        run.step(batch)
    out = {k: v / steps * 1e3 for k, v in acc.items()} | {"step": (time.thread_time() - t0) / steps * 1e3}
    ops: collections.Counter[str] = collections.Counter()
    real = _vma._VmaMode.__torch_function__

    def counting(self: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        f: Any = sys._getframe(1)
        while f is not None and any(p in f.f_code.co_filename for p in ("_vma.py", "/torch/", "/einops/")):
            f = f.f_back
        ops[os.path.relpath(f.f_code.co_filename, os.path.dirname(colofn.__file__)) if f else "?"] += 1
        return real(self, func, types, args, kwargs)

    _vma._VmaMode.__torch_function__ = counting  # type: ignore[method-assign]
    try:
        run.step(batch)
    finally:
        _vma._VmaMode.__torch_function__ = real  # type: ignore[method-assign]
    return out, dict(ops)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--native", action="store_true", help="time DDP with every expert local instead")
    a = p.parse_args()
    load = os.getloadavg()[0]
    results = colofn.launch(rank_program, a.steps, a.native, world_size=4, backend="gloo")
    side = "native (DDP, every expert local)" if a.native else "colofn"
    print(f"# {ROW}, {side}: CPU ms per step by phase, {a.steps} steps, load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    names = list(results[0][0])
    print("| phase | " + " | ".join(f"rank {r}" for r in range(len(results))) + " |")
    print("| --- |" + " ---: |" * len(results))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{res[n]:.1f}" for res, _ in results) + " |")
    if not a.native:
        ops = results[0][1]
        print(f"\n# ops through the tracking mode in one step (rank 0): {sum(ops.values())}")
        for f, c in sorted(ops.items(), key=lambda kv: -kv[1]):
            print(f"{c:6d}  {f}")


if __name__ == "__main__":
    main()
