"""Per-call overhead of shard_map and its collectives, and a tensor-parallel MLP step,
against the same work written with raw torch.distributed, local_map and parallelize_module.

Runs on the simulated world and on real gloo processes, side by side in one run,
and prints one table of microseconds per call (best of 9 interleaved repeats,
rank 0) and the ratio to the raw torch.distributed baseline:

    python benchmarks/bench_shard_map.py            # world 2 (sim and gloo)
    python benchmarks/bench_shard_map.py --world 4  # or 4

What is measured (every rank runs the same fixed number of iterations, so the
collectives stay matched; the numbers are rank 0's):

* ``shard_map call``: a shard_map'd identity (one P('i') argument and result)
  against what a hand-written wrapper does: take the local block and wrap it
  with ``DTensor.from_local``.
* one collective on a 1 KiB float32 block: the cost of one more colofn
  collective inside a shard_map body (the body with 8 of them minus the
  empty body, over 8) against the raw out-of-place call on the same process
  group (``clone`` + ``all_reduce``, ``all_gather_into_tensor``,
  ``reduce_scatter_tensor``, ``batch_isend_irecv``, ``all_to_all_single``).
* a Megatron MLP (d 64, hidden 256, batch 16, float32) forward + backward over
  a tp axis of the whole world, parameters sharded: colofn shard_map with
  DTensor parameters; raw autograd.Functions (Megatron's f and g) around
  ``dist.all_reduce`` on local shards (the baseline); ``local_map`` around the
  same raw function; ``parallelize_module`` with ColwiseParallel/RowwiseParallel.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

import colofn
from colofn import P

K = 8  # collectives per body for the amortized per-collective cost
SPECS = {"w1": P(None, "i"), "b1": P("i"), "w2": P("i", None), "b2": P()}


def timed(
    fns: dict[str, Callable[[], object]], iters: int, repeats: int = 7, warmup: int = 2
) -> dict[str, float]:
    """Median microseconds per call of each function, the functions taking turns in every repeat
    (so a change in machine load hits them alike). Fixed counts on every rank keep collectives matched."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[k].append((time.perf_counter() - t) / iters * 1e6)
    return {k: min(v) for k, v in samples.items()}


# ----------------------------------------------------------------------------- raw Megatron ops


class _AllReduce(torch.autograd.Function):
    """Megatron's g: all_reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Copy(torch.autograd.Function):
    """Megatron's f: identity forward, all_reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def colofn_tp_mlp(p, x):
    h = torch.tanh(x @ p["w1"] + p["b1"])
    return colofn.psum(h @ p["w2"], "i") + p["b2"]


# ----------------------------------------------------------------------------- the rank program


def rank_program(world: int) -> dict[str, tuple[float, float]]:
    """Every measurement on this rank: name -> (candidate µs, baseline µs)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.experimental import local_map
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.set_num_threads(1)  # ranks share the machine's cores: no intra-op thread pools fighting
    logging.getLogger("torch.distributed.tensor").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    mesh = colofn.Mesh((world,), ("i",))
    group = mesh.device_mesh.get_group("i")
    rank, n = dist.get_rank(), world
    out: dict[str, tuple[float, float]] = {}

    # --- shard_map per call
    x = torch.randn(8 * n, 32)
    ident = colofn.shard_map(lambda v: v, mesh=mesh, in_specs=P("i"), out_specs=P("i"))
    placements = (Shard(0),)

    def raw_wrap():
        return DTensor.from_local(
            x[8 * rank : 8 * rank + 8], mesh.device_mesh, placements, run_check=False
        )

    t = timed({"colofn": lambda: ident(x), "raw": raw_wrap}, 100)
    out["shard_map call (identity body)"] = (t["colofn"], t["raw"])

    # --- one collective, amortized over K in a body
    blk = torch.randn(8, 32)  # 1 KiB float32
    nxt = [(k, (k + 1) % n) for k in range(n)]
    send_to, recv_from = (rank + 1) % n, (rank - 1) % n
    gathered, scattered = torch.empty(8 * n, 32), torch.empty(8 // n if 8 % n == 0 else 1, 32)
    a2a_out = torch.empty_like(blk)

    def rs_raw():
        dist.reduce_scatter_tensor(scattered, blk, group=group)

    def pp_raw():
        buf = torch.empty_like(blk)
        ops = [
            dist.P2POp(dist.isend, blk, send_to, group),
            dist.P2POp(dist.irecv, buf, recv_from, group),
        ]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    cases = {
        "psum": (lambda v: colofn.psum(v, "i"), lambda: dist.all_reduce(blk.clone(), group=group)),
        "all_gather (tiled)": (
            lambda v: colofn.all_gather(v, "i", tiled=True),
            lambda: dist.all_gather_into_tensor(gathered, blk, group=group),
        ),
        "psum_scatter (tiled)": (lambda v: colofn.psum_scatter(v, "i", tiled=True), rs_raw),
        "ppermute (ring shift)": (lambda v: colofn.ppermute(v, "i", nxt), pp_raw),
        "all_to_all (tiled)": (
            lambda v: colofn.all_to_all(v, "i", 0, 0, tiled=True),
            lambda: dist.all_to_all_single(a2a_out, blk, group=group),
        ),
    }
    xs = torch.randn(8 * n, 32)
    empty = colofn.shard_map(lambda v: v, mesh=mesh, in_specs=P("i"), out_specs=P("i"))
    for name, (op, raw) in cases.items():

        def body(v, op=op):
            for _ in range(K):
                op(v)
            return v

        def raw_k(raw=raw):
            for _ in range(K):
                raw()

        sm = colofn.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=P("i"))
        t = timed({"empty": lambda: empty(xs), "body": lambda sm=sm: sm(xs), "raw": raw_k}, 20)
        out[f"{name}, 1 KiB"] = (max(t["body"] - t["empty"], 0.0) / K, t["raw"] / K)

    # --- Megatron MLP forward + backward
    g = torch.Generator().manual_seed(0)
    d, hdim, b = 64, 256, 16
    params = {
        "w1": torch.randn(d, hdim, generator=g) / d**0.5,
        "b1": torch.zeros(hdim),
        "w2": torch.randn(hdim, d, generator=g) / hdim**0.5,
        "b2": torch.zeros(d),
    }
    xb = torch.randn(b, d, generator=g)
    hb = hdim // n
    local = {
        "w1": params["w1"][:, rank * hb : (rank + 1) * hb].clone().requires_grad_(),
        "b1": params["b1"][rank * hb : (rank + 1) * hb].clone().requires_grad_(),
        "w2": params["w2"][rank * hb : (rank + 1) * hb].clone().requires_grad_(),
        "b2": params["b2"].clone().requires_grad_(),
    }

    def raw_step():
        xin = _Copy.apply(xb, group)
        h = torch.tanh(xin @ local["w1"] + local["b1"])
        y = _AllReduce.apply(h @ local["w2"], group) + local["b2"]
        return torch.autograd.grad(y.pow(2).mean(), list(local.values()))

    dparams = {
        k: v.requires_grad_() for k, v in colofn.device_put(params, SPECS, mesh=mesh).items()
    }
    step = colofn.shard_map(colofn_tp_mlp, mesh=mesh, in_specs=(SPECS, P()), out_specs=P())

    def colofn_step():
        y = step(dparams, xb)
        return torch.autograd.grad(y.to_local().pow(2).mean(), list(dparams.values()))

    def lm_body(w1, b1, w2, b2, x):
        h = torch.tanh(_Copy.apply(x, group) @ w1 + b1)
        return _AllReduce.apply(h @ w2, group) + b2

    R = [Replicate()]
    lm = local_map(
        lm_body,
        out_placements=R,
        in_placements=([Shard(1)], [Shard(0)], [Shard(0)], R, R),
        device_mesh=mesh.device_mesh,
    )
    order = ("w1", "b1", "w2", "b2")
    xd = DTensor.from_local(xb, mesh.device_mesh, R, run_check=False)

    def local_map_step():
        y = lm(*(dparams[k] for k in order), xd)
        return torch.autograd.grad(y.to_local().pow(2).mean(), [dparams[k] for k in order])

    model = torch.nn.Sequential(torch.nn.Linear(d, hdim), torch.nn.Tanh(), torch.nn.Linear(hdim, d))
    model = parallelize_module(
        model, mesh.device_mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()}
    )
    mparams = list(model.parameters())

    def module_step():
        return torch.autograd.grad(model(xb).pow(2).mean(), mparams)

    single = {k: v.clone().requires_grad_() for k, v in params.items()}

    def one_device_step():
        y = torch.tanh(xb @ single["w1"] + single["b1"]) @ single["w2"] + single["b2"]
        return torch.autograd.grad(y.pow(2).mean(), list(single.values()))

    steps = {
        "colofn shard_map": colofn_step,
        "local_map": local_map_step,
        "parallelize_module": module_step,
        "unsharded, 1 device": one_device_step,
    }
    t = timed({"raw": raw_step, **steps}, 10)
    for name in steps:
        out[f"TP MLP fwd+bwd: {name}"] = (t[name], t["raw"])
    return out


def table(
    world: int, sim: dict[str, tuple[float, float]], gloo: dict[str, tuple[float, float]]
) -> str:
    head = (
        f"| world {world} | sim µs | sim raw µs | sim ratio | gloo µs | gloo raw µs | gloo ratio |"
    )
    lines = [head, "|" + "---|" * 7]
    for name in sim:
        (sc, sr), (gc, gr) = sim[name], gloo[name]
        lines.append(
            f"| {name} | {sc:.0f} | {sr:.0f} | {sc / sr:.2f} | {gc:.0f} | {gr:.0f} | {gc / gr:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2, choices=(2, 4))
    args = ap.parse_args(argv)
    t = time.perf_counter()
    sim = colofn.launch(rank_program, args.world, world_size=args.world)[0]
    gloo = colofn.launch(rank_program, args.world, world_size=args.world, backend="gloo")[0]
    print(table(args.world, sim, gloo))
    print(
        f"\nraw = the same communication with torch.distributed calls (TP rows: hand-written Megatron f/g); "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs at load average {os.getloadavg()[0]:.1f}, "
        f"{time.perf_counter() - t:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
