"""jit (global view) vs shard_map (explicit collectives) vs DTensor parallelize_module, and checkpoints vs plain DCP.

The same Megatron tensor-parallel MLP and pre-LN transformer block (attention +
MLP) written three ways, on a world of 2 (tp=2):

* ``jit``: the single-device function of global weights, with ``in_shardings``
  (column-parallel w1/wq/wk/wv, row-parallel w2/wo);
* ``shard_map``: the per-rank function on local shards with one ``psum`` after
  each row-parallel matmul;
* ``dtensor``: ``nn.Module``s under ``parallelize_module`` (ColwiseParallel /
  RowwiseParallel), torch's own way;

and, as the unit, the single-device function on one rank (``plain``). The
jit and shard_map versions get their parameters as DTensors placed once (so
their gradients stay sharded, as with parallelize_module); ``jit+wsc`` adds a
``with_sharding_constraint(y, P())`` after each row-parallel matmul (Megatron's
all-reduce, where propagation alone may pick other collectives). Time is
forward + backward of a scalar loss, median over steps, rank 0; the table gives
each as a ratio to ``plain``. ``jit+compile`` is the jit version with
``compile=True`` (simulated world only: compiling takes ~10 s a model).

Checkpoints: a tree of 8 float32 tensors (32 MiB) sharded dp x tp on 4 ranks,
saved with colofn.checkpoint.save (atomic, with SHA-256 of every file) and with
plain ``torch.distributed.checkpoint.save``; loaded on a mesh of 4 tp ranks
with colofn.checkpoint.load (verifying hashes, and with ``verify=False``) and
with plain ``dcp.load``. MiB/s, median of the repeats.

    python benchmarks/bench_jit.py            # about 2 minutes on 2 busy CPU cores
    python benchmarks/bench_jit.py --quick    # fewer steps, no gloo, no compile
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import colofn
from colofn import P

D, FF, HEADS, BATCH, SEQ = 64, 256, 4, 4, 16


# ----------------------------------------------------------------------------- the models, written once as global functions


def same(y: torch.Tensor) -> torch.Tensor:
    return y


def mlp(p: dict[str, torch.Tensor], x: torch.Tensor, out=same) -> torch.Tensor:
    return out(F.gelu(x @ p["w1"]) @ p["w2"])


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def attention(p: dict[str, torch.Tensor], x: torch.Tensor, core=causal, out=same) -> torch.Tensor:
    b, s, _ = x.shape
    q, k, v = (
        (x @ p[w]).view(b, s, -1, D // HEADS).transpose(1, 2) for w in ("wq", "wk", "wv")
    )  # -1: all heads globally, this rank's heads locally
    return out(core(q, k, v).transpose(1, 2).reshape(b, s, -1) @ p["wo"])


def block(p: dict[str, torch.Tensor], x: torch.Tensor, core=causal, out=same) -> torch.Tensor:
    h = x + attention(p, F.layer_norm(x, (D,), p["ln1"], None), core, out)
    return h + mlp(p, F.layer_norm(h, (D,), p["ln2"], None), out)


def loss_of(model: str, p: dict[str, torch.Tensor], x: torch.Tensor, core=causal, out=same) -> torch.Tensor:
    """``out`` is applied to each row-parallel output: identity, or a with_sharding_constraint."""
    y = mlp(p, x, out) if model == "mlp" else block(p, x, core, out)
    return (y * y).mean()


def params(model: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    p = {"w1": torch.randn(D, FF, generator=g) / D**0.5, "w2": torch.randn(FF, D, generator=g) / FF**0.5}
    if model == "block":
        p |= {w: torch.randn(D, D, generator=g) / D**0.5 for w in ("wq", "wk", "wv", "wo")}
        p |= {"ln1": torch.ones(D), "ln2": torch.ones(D)}
    return p


SPECS = {"w1": P(None, "tp"), "w2": P("tp"), "wq": P(None, "tp"), "wk": P(None, "tp"), "wv": P(None, "tp"), "wo": P("tp"), "ln1": P(), "ln2": P()}


def data() -> torch.Tensor:
    return torch.randn(BATCH, SEQ, D, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- the three parallel versions


def replicate(y: torch.Tensor) -> torch.Tensor:
    return colofn.with_sharding_constraint(y, P())


def make_jit(model: str, compile: bool = False, out=same):  # noqa: A002
    # DTensor has no sharding rule for CPU's fused attention kernel (jit says so, naming the op):
    # the attention core runs per head block in a shard_map inside the global function.
    core = colofn.shard_map(causal, in_specs=P(None, "tp"), out_specs=P(None, "tp"))
    f = colofn.jit(lambda p, x: loss_of(model, p, x, core, out), in_shardings=({k: SPECS[k] for k in params(model)}, P()), compile=compile)
    return lambda p, x: f(p, x).to_local()


def make_shard_map(model: str):
    def local(p, x):  # Megatron: each row-parallel output is a partial sum over tp
        def mlp_l(x):
            return colofn.psum(F.gelu(x @ p["w1"]) @ p["w2"], "tp")

        if model == "mlp":
            y = mlp_l(x)
        else:
            h = x + colofn.psum(attention(p, F.layer_norm(x, (D,), p["ln1"], None)), "tp")
            y = h + mlp_l(F.layer_norm(h, (D,), p["ln2"], None))
        return (y * y).mean()

    f = colofn.shard_map(local, in_specs=({k: SPECS[k] for k in params(model)}, P()), out_specs=P())
    return lambda p, x: f(p, x).to_local()


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(D, FF, bias=False), nn.Linear(FF, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D, bias=False), nn.LayerNorm(D, bias=False)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.mlp = _Mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        y = self.ln1(x)
        q, k, v = (lin(y).view(b, s, -1, D // HEADS).transpose(1, 2) for lin in (self.wq, self.wk, self.wv))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.wo(o.transpose(1, 2).reshape(b, s, -1))
        return h + self.mlp(self.ln2(h))


def make_dtensor(model: str, mesh: colofn.Mesh):
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    m = _Mlp() if model == "mlp" else _Block()
    p = params(model)
    with torch.no_grad():
        for name, mod in m.named_modules():
            for key in ("w1", "w2", "wq", "wk", "wv", "wo"):
                if name.endswith(key):
                    mod.weight.copy_(p[key].T)  # nn.Linear stores [out, in]
    prefix = "" if model == "mlp" else "mlp."
    plan = {f"{prefix}w1": ColwiseParallel(), f"{prefix}w2": RowwiseParallel()}
    if model == "block":
        plan |= {"wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(), "wo": RowwiseParallel()}
    parallelize_module(m, mesh.device_mesh, plan)

    def step(_p, x):
        y = m(x)
        return (y * y).mean()

    return step


# ----------------------------------------------------------------------------- timing


def _time(fn, p, x, steps: int) -> float:
    """Median seconds of forward + backward; every rank starts each step together."""
    times = []
    for i in range(steps + 2):
        dist.barrier()
        t = time.perf_counter()
        loss = fn(p, x)
        loss.backward()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_models(steps: int, compile: bool) -> dict[str, dict[str, float]]:  # noqa: A002
    out: dict[str, dict[str, float]] = {}
    # One mesh for both models: compiling the block (whose shard_map graph-breaks) on a second
    # mesh after the MLP compiled on a first failed in torch 2.13's partitioner (docs/jit.md).
    mesh = colofn.Mesh((dist.get_world_size(),), ("tp",))
    for model in ("mlp", "block"):
        x = data()
        p = {k: v.clone().requires_grad_() for k, v in params(model).items()}
        row = {"plain": _time(lambda p, x, m=model: loss_of(m, p, x), p, x, steps)}
        with mesh:
            # parameters placed once and kept sharded, as in training (their gradients stay sharded)
            ps = {k: colofn.device_put(v.detach(), SPECS[k]).requires_grad_() for k, v in p.items()}
            row["jit"] = _time(make_jit(model), ps, x, steps)
            row["jit+wsc"] = _time(make_jit(model, out=replicate), ps, x, steps)
            row["shard_map"] = _time(make_shard_map(model), ps, x, steps)
            row["dtensor"] = _time(make_dtensor(model, mesh), p, x, steps)
            if compile:
                f = make_jit(model, compile=True, out=replicate)
                t = time.perf_counter()
                f(ps, x).backward()
                row["compile_s"] = time.perf_counter() - t
                row["jit+wsc+compile"] = _time(f, ps, x, steps)
        out[model] = row
    return out


# ----------------------------------------------------------------------------- checkpoints


def _tree(mesh: colofn.Mesh) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": colofn.device_put(torch.randn(1024, 1024, generator=g), P("dp", "tp"), mesh=mesh) for i in range(8)}


def run_checkpoint(root: str, repeats: int) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp

    mib = 8 * 1024 * 1024 * 4 / 2**20
    out: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        out.setdefault(name, []).append(mib / (time.perf_counter() - t))

    mesh = colofn.Mesh((2, dist.get_world_size() // 2), ("dp", "tp"))
    tree = _tree(mesh)
    flat = colofn.Mesh((dist.get_world_size(),), ("tp",))
    like = {k: P(None, "tp") for k in tree}
    for r in range(repeats):
        timed("colofn save", lambda r=r: colofn.checkpoint.save(f"{root}/c{r}", tree))
        timed("dcp save", lambda r=r: dcp.save(dict(tree), checkpoint_id=f"{root}/d{r}"))
        timed("colofn load", lambda r=r: _load(f"{root}/c{r}", flat, like, True))
        timed("colofn load (verify=False)", lambda r=r: _load(f"{root}/c{r}", flat, like, False))
        timed("dcp load", lambda r=r: _dcp_load(f"{root}/d{r}", flat, tree))
    return {k: statistics.median(v) for k, v in out.items()}


def _load(path: str, mesh: colofn.Mesh, like: dict[str, Any], verify: bool) -> None:
    with mesh:
        colofn.checkpoint.load(path, like=like, verify=verify)


def _dcp_load(path: str, mesh: colofn.Mesh, tree: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import empty

    state = {k: empty(v.shape, device_mesh=mesh.device_mesh, placements=colofn.NamedSharding(mesh, P(None, "tp")).to_placements(2)) for k, v in tree.items()}
    dcp.load(state, checkpoint_id=path)


# ----------------------------------------------------------------------------- driver


def models_program(steps: int, compile: bool) -> dict[str, dict[str, float]]:  # noqa: A002
    torch.set_num_threads(1)
    return run_models(steps, compile)


def checkpoint_program(root: str, repeats: int) -> dict[str, float]:
    torch.set_num_threads(1)
    return run_checkpoint(os.path.join(root, f"w{dist.get_world_size()}"), repeats)


def _print_models(title: str, models: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}: forward+backward, median ms (ratio to plain single-device)")
    cols = ["plain", "jit", "jit+wsc", "shard_map", "dtensor", "jit+wsc+compile"]
    print("| model | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for model, row in models.items():
        cells = [f"{row[c] * 1e3:.2f} ({row[c] / row['plain']:.1f}x)" if c in row else "-" for c in cols]
        print(f"| {model} | " + " | ".join(cells) + " |")
    for model, row in models.items():
        if "compile_s" in row:
            print(f"  {model}: first compiled call (compile + run) {row['compile_s']:.1f} s")


def _print_checkpoint(title: str, ck: dict[str, float]) -> None:
    print(f"\n{title}: 32 MiB, MiB/s (median)")
    print("| operation | MiB/s |")
    print("|---|---|")
    for k, v in ck.items():
        print(f"| {k} | {v:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 5 if args.quick else 20
    repeats = 2 if args.quick else 3
    root = tempfile.mkdtemp(prefix="colofn-bench-jit-")
    t0 = time.perf_counter()
    try:
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, D={D} FF={FF} heads={HEADS} batch={BATCH} seq={SEQ}")
        sim = colofn.launch(models_program, steps, not args.quick, world_size=2)[0]
        _print_models("simulated world of 2 (threads)", sim)
        ck = colofn.launch(checkpoint_program, f"{root}/sim", repeats, world_size=4)[0]
        _print_checkpoint("checkpoint, simulated world of 4 (dp=2 x tp=2 -> tp=4)", ck)
        if not args.quick:
            gloo = colofn.launch(models_program, steps, False, world_size=2, backend="gloo")[0]
            _print_models("gloo world of 2 (processes)", gloo)
            ck = colofn.launch(checkpoint_program, f"{root}/gloo", repeats, world_size=4, backend="gloo")[0]
            _print_checkpoint("checkpoint, gloo world of 4 (dp=2 x tp=2 -> tp=4)", ck)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
