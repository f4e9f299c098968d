"""Microseconds per GPT training step on the paths whose layouts are written with einops.

The rows cover every layout the einops patterns express: the attention head
split and merge and the MoE routing (one device), Ulysses and ring attention,
expert-parallel dispatch and the vocabulary-parallel loss (simulated world 2),
the pipeline's microbatch split, and ZeRO-3's shards. The one-device rows are
a forward plus backward of ``gpt.loss``; the simulated-world rows are a
training step (forward, backward, AdamW) of the trainer ``colofn train`` builds
for those flags. The model is ``gpt.config("tiny", ...)`` and the batch
``4 x 16`` tokens: small, so that Python overhead (where einops adds its
recipe look-ups) is a large part of the time. The figure is CPU microseconds
per step of the whole process (both simulated ranks: they wait on condition
variables, not spinning), the best of ``--repeats`` rounds, the rows taking
turns in each round; every rank runs the same fixed number of steps and rank 0
reports.

To compare two versions of the code, run both from one shell loop so machine
load hits them alike, for example::

    for i in 1 2 3; do
      PYTHONPATH=/tmp/before/src python benchmarks/bench_layouts.py --label before
      PYTHONPATH=$PWD/src python benchmarks/bench_layouts.py --label after
    done
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import types
from collections.abc import Callable

import einops
import torch

import colofn
from colofn import optim, random
from colofn.models import gpt
from colofn.train import TrainConfig
from colofn.train.loop import _trainer

B, S = 4, 16


def _batch(cfg: gpt.GPTConfig) -> dict[str, torch.Tensor]:
    t = random.randint(random.key(1), (B, S + 1), 0, cfg.vocab_size)
    return {"tokens": t[:, :-1], "targets": t[:, 1:]}


def _einops_calls(fn: Callable[[], object]) -> int:
    """How many einops functions (``rearrange``, ``reduce``, ``repeat``, ``einsum``) one call of ``fn`` makes on this thread."""
    codes = {f.__code__ for f in (einops.rearrange, einops.reduce, einops.repeat, einops.einsum)}
    count = 0

    def profile(frame: types.FrameType, event: str, arg: object) -> None:
        nonlocal count
        if event == "call" and frame.f_code in codes:
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def _per_call_overhead(repeats: int) -> float:
    """CPU microseconds einops adds to one layout op: ``rearrange`` over the ``reshape`` it lowers to."""
    x = torch.zeros(4, 16, 8)
    fns = {
        "einops": lambda: einops.rearrange(x, "b s d -> (b s) d"),
        "torch": lambda: x.reshape(-1, x.shape[-1]),
    }
    t = _timed(fns, 2000, repeats)
    return t["einops"] - t["torch"]


def _timed(fns: dict[str, Callable[[], object]], iters: int, repeats: int) -> dict[str, float]:
    """Best microseconds per call of each function over ``repeats`` rounds, the functions taking turns.

    The clock is the process's CPU time (every thread, so both simulated ranks),
    not wall time: on a machine shared with other work, wall time mostly
    measures the other work, while the CPU time this process spends is what a
    change of the code changes.
    """
    for fn in fns.values():
        fn()
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.process_time()
            for _ in range(iters):
                fn()
            best[name] = min(best[name], (time.process_time() - t) / iters * 1e6)
    return best


DENSE = gpt.config("tiny", pos="rotary")
MOE = gpt.config("tiny", n_experts=4, top_k=2, capacity_factor=1.0)


def one_device() -> dict[str, Callable[[], object]]:
    steps: dict[str, Callable[[], object]] = {}
    for name, cfg in (("1 device, dense (rotary)", DENSE), ("1 device, MoE (capacity)", MOE)):
        params = colofn.tree.map(lambda p: p.requires_grad_(), gpt.init(random.key(0), cfg))
        batch = _batch(cfg)

        def step(params=params, batch=batch, cfg=cfg) -> None:
            loss = gpt.loss(params, batch, cfg)
            torch.autograd.grad(loss, colofn.tree.leaves(params))

        steps[name] = step
    return steps


ROWS = {  # name: the flags of ``colofn train`` on the simulated world 2 (preset tiny)
    "sim 2, ulysses": TrainConfig(mesh=(("sp", 2),), sp="ulysses"),
    "sim 2, ring": TrainConfig(mesh=(("sp", 2),), sp="ring"),
    "sim 2, tp (vocab-parallel loss)": TrainConfig(mesh=(("tp", 2),)),
    "sim 2, ep (MoE dispatch)": TrainConfig(mesh=(("ep", 2),), experts=4),
    "sim 2, pp (1f1b, 4 microbatches)": TrainConfig(mesh=(("pp", 2),), microbatches=4),
    "sim 2, ZeRO-3": TrainConfig(mesh=(("dp", 2),), zero=3),
}


def _world_program(iters: int, repeats: int) -> dict[str, tuple[float, int]]:
    steps: dict[str, Callable[[], object]] = {}
    for name, cfg in ROWS.items():
        mcfg = cfg.model_config()
        mesh = colofn.Mesh(tuple(cfg.mesh_shape.values()), tuple(cfg.mesh_shape))
        opt = optim.adamw(1e-3)
        params = gpt.init(random.key(0), mcfg)
        trainer = _trainer(cfg, mcfg, mesh, opt, params, opt.init(params))
        steps[name] = functools.partial(trainer.step, _batch(mcfg))
    return _measure(steps, iters, repeats)


def _measure(steps: dict[str, Callable[[], object]], iters: int, repeats: int) -> dict[str, tuple[float, int]]:
    calls = {name: _einops_calls(fn) for name, fn in steps.items()}
    return {name: (us, calls[name]) for name, us in _timed(steps, iters, repeats).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    overhead = _per_call_overhead(args.repeats)
    rows = _measure(one_device(), args.iters, args.repeats)
    rows |= colofn.launch(_world_program, args.iters, args.repeats, world_size=2)[0]
    print(f"{args.label:8} {'row':34} {'CPU us/step':>11} {'einops calls':>12} {'x overhead':>10}")
    for name, (us, calls) in rows.items():
        print(f"{args.label:8} {name:34} {us:11.0f} {calls:12d} {calls * overhead:7.0f} us")
    print(f"{args.label:8} (einops adds {overhead:.1f} us per call over the reshape it lowers to)")


if __name__ == "__main__":
    main()
