"""The parts of one rank's dense step, colofn next to torch, in this thread's CPU time (comparable under load).

One process, a gloo world of one rank, the ``small`` GPT of ``bench_train.py``
on one rank's share of its batch (4 x 64 tokens), AdamW. Each part runs in
rounds that alternate with the others (so a change in machine load hits all),
and the median of this thread's CPU time (``time.thread_time``) per call is
printed:

* ``native step`` / ``colofn step``: ``NativeGPT`` + ``torch.optim.AdamW``
  (no DDP on one rank) against ``DenseTrainer.step`` on ``dp=1``;
* ``native fwd+bwd`` / ``gpt.loss fwd+bwd``: the two models alone, the
  functional one through ``torch.autograd.grad``;
* ``colofn value_and_grad``: the trainer's loss and gradients (the model plus
  what the step wraps around it: the body, the gradient buckets);
* ``torch AdamW step`` / ``colofn update_in_place`` / ``colofn update +
  apply_updates``: the optimizer alone on the same gradients.

Run with::

    python benchmarks/bench_step_parts.py              # about 30 s on 2 cores
    python benchmarks/bench_step_parts.py --rounds 2   # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import bench_train as bt  # noqa: E402
import colofn  # noqa: E402
from colofn import data, optim, random  # noqa: E402
from colofn import tree as jt  # noqa: E402
from colofn.models import gpt  # noqa: E402


def parts() -> dict[str, Callable[[], Any]]:
    cfg = bt.TrainConfig(preset="small", mesh=(("dp", 1),), batch_size=bt.BATCH // 4, lr=bt.LR)
    mcfg = cfg.model_config()
    params = gpt.init(random.key(0), mcfg)
    batch = data.sample_batch(random.key(100), data.encode(data.text()), bt.BATCH // 4, mcfg.seq_len)
    native = bt.NativeGPT(params, mcfg)
    torch_opt = torch.optim.AdamW(native.parameters(), lr=bt.LR, weight_decay=bt.WD, foreach=True)

    def native_step() -> float:
        torch_opt.zero_grad(set_to_none=True)
        loss = bt.cross_entropy(native(batch["tokens"]), batch["targets"])
        loss.backward()
        torch_opt.step()
        return float(loss.detach())

    def native_fwd_bwd() -> None:
        loss = bt.cross_entropy(native(batch["tokens"]), batch["targets"])
        torch.autograd.grad(loss, list(native.parameters()))

    trainer = bt.Colofn(cfg, mcfg, params, colofn.Mesh((1,), ("dp",))).trainer
    leaves = jt.leaves(jt.map(lambda t: t.clone().requires_grad_(), params))
    tree = jt.unflatten(jt.structure(params), leaves)

    def functional_fwd_bwd() -> None:
        torch.autograd.grad(gpt.loss(tree, batch, mcfg), leaves)

    grads = jt.map(torch.randn_like, params)
    opt = optim.adamw(bt.LR, weight_decay=bt.WD)
    owned = {"params": jt.map(torch.clone, params), "state": opt.init(params)}
    functional = {"params": params, "state": opt.init(params)}

    def in_place() -> None:
        owned["state"] = optim.update_in_place(opt, grads, owned["state"], owned["params"])

    def update_apply() -> None:
        updates, functional["state"] = opt.update(grads, functional["state"], functional["params"])
        functional["params"] = optim.apply_updates(functional["params"], updates)

    torch_grads = [torch.randn_like(p) for p in native.parameters()]  # the same shapes, in the module's order

    def torch_step() -> None:
        for p, g in zip(native.parameters(), torch_grads, strict=True):
            p.grad = g
        torch_opt.step()

    out = {
        "native step": native_step,
        "colofn step": lambda: trainer.step(batch),
        "native fwd+bwd": native_fwd_bwd,
        "gpt.loss fwd+bwd": functional_fwd_bwd,
        "colofn value_and_grad": lambda: trainer.value_and_grad(trainer.params, batch),
        "torch AdamW step": torch_step,
        "colofn update_in_place": in_place,
        "colofn update + apply_updates": update_apply,
    }
    if not hasattr(optim, "update_in_place"):  # an older colofn, measured for a before/after table
        del out["colofn update_in_place"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--calls", type=int, default=15, help="timed calls per part per round")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        fns = parts()
        times: dict[str, list[float]] = {k: [] for k in fns}
        step_parts = ("native step", "colofn step", "native fwd+bwd", "gpt.loss fwd+bwd", "colofn value_and_grad")
        for _ in range(args.rounds):
            for name, fn in fns.items():
                for _ in range(3):
                    fn()
                for _ in range(args.calls):
                    t0 = time.thread_time()
                    fn()
                    times[name].append(time.thread_time() - t0)
        print(f"# bench_step_parts: small GPT, {bt.BATCH // 4} x 64 tokens, one rank, torch {torch.__version__}, "
              f"load average {os.getloadavg()[0]:.1f}; median thread CPU ms per call over {args.rounds} x {args.calls}")
        for name in fns:
            sep = "" if name in step_parts or name != "torch AdamW step" else "\n"
            print(f"{sep}{name:32s} {statistics.median(times[name]) * 1e3:7.2f} ms")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
