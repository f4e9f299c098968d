"""``colofn demo``: train a small MLP with data x tensor parallelism on simulated devices.

The MLP is Megatron-style: ``w1`` column-parallel (``P(None, "tp")``), ``w2``
row-parallel (``P("tp", None)``) with one ``psum`` over ``tp``; the batch is split
over ``dp`` and the loss is a ``pmean`` over ``dp``. Every step is checked
against the same model trained on a single device.
"""

from __future__ import annotations

import math
import time

import torch

import colofn
from colofn import P, optim

D_IN, HIDDEN, D_OUT, BATCH = 16, 32, 8, 32


def init_params(seed: int = 0) -> dict[str, torch.Tensor]:
    k1, k2, k3 = colofn.random.split(colofn.random.key(seed), 3)
    return {
        "w1": colofn.random.normal(k1, (D_IN, HIDDEN)) / math.sqrt(D_IN),
        "b1": torch.zeros(HIDDEN),
        "w2": colofn.random.normal(k2, (HIDDEN, D_OUT)) / math.sqrt(HIDDEN),
        "b2": torch.zeros(D_OUT),
    }


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = colofn.random.fold_in(colofn.random.key(1), step)
    kx, ky = colofn.random.split(k)
    x = colofn.random.normal(kx, (BATCH, D_IN))
    target = torch.sin(x[:, :D_OUT]) + 0.1 * colofn.random.normal(ky, (BATCH, D_OUT))
    return x, target


def mlp(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


SPECS = {"w1": P(None, "tp"), "b1": P("tp"), "w2": P("tp", None), "b2": P()}


def local_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-device code: this rank's batch rows and hidden columns."""
    h = torch.nn.functional.gelu(x @ p["w1"] + p["b1"])
    out = colofn.psum(h @ p["w2"], "tp") + p["b2"]  # row-parallel: one all-reduce over tp
    return colofn.pmean(((out - y) ** 2).mean(), "dp")


def train_parallel(steps: int, dp: int, tp: int) -> list[float]:
    mesh = colofn.Mesh((dp, tp), ("dp", "tp"))
    loss_fn = colofn.shard_map(local_loss, mesh=mesh, in_specs=(SPECS, P("dp"), P("dp")), out_specs=P())
    params = colofn.device_put(init_params(), SPECS, mesh=mesh)
    opt = optim.adamw(1e-2)
    state = opt.init(params)
    losses = []
    for step in range(steps):
        params = colofn.tree.map(lambda t: t.detach().requires_grad_(), params)
        loss = loss_fn(params, *batch(step))
        grads = torch.autograd.grad(loss.to_local(), colofn.tree.leaves(params))  # type: ignore[attr-defined]
        grads = colofn.tree.unflatten(colofn.tree.structure(params), grads)
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        losses.append(loss.to_local().item())  # type: ignore[attr-defined]
    return losses


def train_single(steps: int) -> list[float]:
    params = init_params()
    opt = optim.adamw(1e-2)
    state = opt.init(params)
    losses = []
    for step in range(steps):
        params = colofn.tree.map(lambda t: t.detach().requires_grad_(), params)
        x, y = batch(step)
        loss = ((mlp(params, x) - y) ** 2).mean()
        grads = colofn.tree.unflatten(colofn.tree.structure(params), torch.autograd.grad(loss, colofn.tree.leaves(params)))
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        losses.append(loss.item())
    return losses


def main(devices: int = 4, steps: int = 5) -> int:
    tp = 2 if devices % 2 == 0 else 1
    dp = devices // tp
    print(f"colofn demo: MLP {D_IN}->{HIDDEN}->{D_OUT}, batch {BATCH}, AdamW, on {devices} simulated devices")
    print(f"mesh dp={dp} x tp={tp}; w1 {SPECS['w1']}, w2 {SPECS['w2']}, batch P('dp')\n")
    t0 = time.perf_counter()
    parallel = colofn.launch(train_parallel, steps, dp, tp, world_size=devices)
    elapsed = time.perf_counter() - t0
    single = train_single(steps)
    print(f"{'step':>4}  {'parallel loss':>14}  {'single-device':>14}  {'difference':>10}")
    worst = 0.0
    for i, (lp, ls) in enumerate(zip(parallel[0], single, strict=True)):
        diff = abs(lp - ls)
        worst = max(worst, diff, *(abs(r[i] - lp) for r in parallel))
        print(f"{i:>4}  {lp:>14.8f}  {ls:>14.8f}  {diff:>10.2e}")
    ok = worst < 1e-5
    verdict = "OK" if ok else "MISMATCH"
    print(f"\n{verdict}: max difference {worst:.2e} over {steps} steps on {devices} ranks ({elapsed:.2f} s)")
    return 0 if ok else 1
