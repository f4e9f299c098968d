"""A Hugging Face LLaMA under colofn dp x tp vs torch's ``parallelize_module`` + DDP, on gloo world 4.

The same ``LlamaForCausalLM`` config and weights, dp=2 x tp=2, one training step
= forward + backward of the causal-LM loss + AdamW:

* ``colofn``: ``colofn.nn.hf.make_loss`` (the shipped LLaMA plan: column/row
  parallel attention and MLP, vocabulary-parallel embedding, head and loss)
  and ``colofn.optim.adamw`` on DTensor parameters;
* ``torch``: ``parallelize_module`` with ``ColwiseParallel`` (q/k/v, gate/up)
  and ``RowwiseParallel`` (o/down) on the tp dim of a 2-D ``DeviceMesh``, the
  embedding and head replicated, wrapped in ``DistributedDataParallel`` over
  the dp dim (after ``_pre_dp_module_transform``, torch's TP + DDP recipe),
  and ``torch.optim.AdamW``.

Reports tokens/s (median step, rank 0) and model-state bytes per rank
(parameters + gradients + AdamW moments this rank holds), and checks that both
start from the same loss.

    python benchmarks/bench_hf.py           # about a minute on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS, BATCH, SEQ = 6, 8, 64


def _model(preset: str) -> Any:
    from colofn.nn import hf

    return hf.build(hf.config("llama", preset, tie_word_embeddings=False), seed=0)


def _bytes(tensors: Any) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        total += t.numel() * t.element_size()
    return total


def run_colofn(preset: str, steps: int) -> dict[str, Any]:
    import colofn
    from colofn import optim
    from colofn import tree as jt
    from colofn.nn import hf

    model = _model(preset)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    batch = hf.batch(ids)
    mesh = colofn.Mesh((2, 2), ("dp", "tp"))
    loss_fn, par = hf.make_loss(model, hf.plan_for(model, dp="dp", tp="tp"), mesh)
    params = par.shard()
    opt = optim.adamw(1e-3)
    state = opt.init(params)
    times, first = [], None
    grads: Any = None
    for _ in range(steps):
        t0 = time.perf_counter()
        p = jt.map(lambda t: t.detach().requires_grad_(), params)
        loss = loss_fn(p, batch)
        grads = jt.unflatten(jt.structure(p), torch.autograd.grad(loss.to_local(), jt.leaves(p)))
        updates, state = opt.update(grads, state, p)
        params = jt.map(torch.Tensor.detach, optim.apply_updates(p, updates))
        times.append(time.perf_counter() - t0)
        first = float(loss.to_local()) if first is None else first
    state_bytes = _bytes(jt.leaves(params)) + _bytes(jt.leaves(grads)) + _bytes(jt.leaves((state.mu, state.nu)))
    return {"tok_s": BATCH * SEQ / statistics.median(times[1:]), "bytes": state_bytes, "loss0": first}


def run_torch(preset: str, steps: int) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from torch.distributed.tensor.parallel.ddp import _pre_dp_module_transform
    from torch.nn.parallel import DistributedDataParallel

    model = _model(preset)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    plan: dict[str, Any] = {}
    for i in range(len(model.model.layers)):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(model, mesh["tp"], plan)
    _pre_dp_module_transform(model)
    ddp = DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    dp_rank, dp = mesh["dp"].get_local_rank(), 2
    local = ids.chunk(dp)[dp_rank]
    times, first = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = ddp(input_ids=local, labels=local).loss
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if first is None:
            full = loss.detach().clone()
            dist.all_reduce(full, group=mesh["dp"].get_group())
            first = float(full) / dp
    params = [p for g in opt.param_groups for p in g["params"]]  # the local tensors DDP and AdamW hold
    moments = [v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    state_bytes = _bytes(params) + _bytes([p.grad for p in params if p.grad is not None]) + _bytes(moments)
    return {"tok_s": BATCH * SEQ / statistics.median(times[1:]), "bytes": state_bytes, "loss0": first}


def program(preset: str, steps: int) -> dict[str, Any]:
    return {"colofn": run_colofn(preset, steps), "torch": run_torch(preset, steps)}


def main() -> None:
    import colofn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=("tiny", "small"))
    ap.add_argument("--steps", type=int, default=STEPS)
    args = ap.parse_args()
    out = colofn.launch(program, args.preset, args.steps, world_size=4, backend="gloo", timeout=600)[0]
    c, t = out["colofn"], out["torch"]
    n = sum(p.numel() for p in _model(args.preset).parameters())
    print(f"HF LlamaForCausalLM preset {args.preset} ({n:,} params), gloo world 4 = dp 2 x tp 2, batch {BATCH} x seq {SEQ}")
    print(f"first-step loss: colofn {c['loss0']:.6f}, torch {t['loss0']:.6f}")
    print("| | tokens/s (median step) | model-state bytes / rank |")
    print("| --- | --- | --- |")
    print(f"| colofn dp x tp (shipped LLaMA plan) | {c['tok_s']:,.0f} | {c['bytes']:,} |")
    print(f"| torch parallelize_module + DDP | {t['tok_s']:,.0f} | {t['bytes']:,} |")
    print(f"| ratio colofn / torch | {c['tok_s'] / t['tok_s']:.2f} | {c['bytes'] / t['bytes']:.2f} |")


if __name__ == "__main__":
    main()
