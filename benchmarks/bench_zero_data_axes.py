"""ZeRO over several data axes (dp x Ulysses sp, dp x ep) next to ZeRO over dp alone: bytes and memory per rank.

The GPT of ``colofn train`` (a preset, untied embeddings, fp32 AdamW), one
step per ZeRO stage on the simulated world, the way ``colofn train --zero``
runs it (``colofn.parallel.zero_axes`` and ``zero_loss_plan``). For each mesh
and stage, per rank (rank 0):

* model states: the bytes of the params and AdamW state a rank holds between
  steps (``ZeroTrainer.local_bytes``), and the ZeRO formula for them, group by
  group: ``4 + sum_g (4 Psi_g / (n_g if stage 3 else 1) + 8 Psi_g / (n_g if stage >= 1 else 1))``
  with ``Psi_g`` the padded elements of the buckets of data-axis group ``g``
  and ``n_g`` its ranks;
* bytes sent per step (``comm_trace``), split into ZeRO's own collectives
  (reduce-scatters, all-gathers, all-reduces of the flat buckets) and the
  rest (the strategy's all-to-alls, the loss), and ZeRO's formula per group:
  ``2 Psi_g (n_g - 1) / n_g`` for stages 0-2, ``3 Psi_g (n_g - 1) / n_g`` for
  stage 3 (less a unit the backward does not read again: the untied embedding).

Run it with::

    PYTHONPATH=src python benchmarks/bench_zero_data_axes.py                 # tiny preset, about a minute
    PYTHONPATH=src python benchmarks/bench_zero_data_axes.py --preset small
"""

from __future__ import annotations

import argparse
from typing import Any

import colofn
from colofn import data, random
from colofn.models import gpt
from colofn.optim.adam import AdamState
from colofn.parallel import Plan
from colofn.train.config import TrainConfig
from colofn.train.loop import make_optimizer
from colofn.train.trainers import ZeroTrainer

MESHES = [
    ("dp=4", {"dp": 4}, Plan(dp="dp"), 0),
    ("dp=2,sp=2 ulysses", {"dp": 2, "sp": 2}, Plan(dp="dp", sp="ulysses", sp_axis="sp"), 0),
    ("dp=4 experts=2", {"dp": 4}, Plan(dp="dp"), 2),
    ("dp=2,ep=2 experts=2", {"dp": 2, "ep": 2}, Plan(dp="dp", ep="ep"), 2),
]


def _program(preset: str, sizes: dict[str, int], plan: Plan, experts: int, stage: int) -> dict[str, Any]:
    mesh = colofn.Mesh(tuple(sizes.values()), tuple(sizes))
    cfg = TrainConfig(preset=preset, mesh=tuple(sizes.items()), experts=experts, zero=stage)
    mcfg = cfg.model_config()
    opt = make_optimizer(cfg)
    params = gpt.init(random.key(0), mcfg)
    trainer = ZeroTrainer(mcfg, plan, mesh, opt, params, AdamState(*opt.init(params)), stage)
    batch = data.sample_batch(random.key(1), data.encode(data.text()), cfg.batch_size, mcfg.seq_len)
    with colofn.comm_trace() as records:
        trainer.step(batch)
    zp = trainer.state.plan
    groups: dict[tuple[str, ...], list[int]] = {}
    for k in range(len(zp.layout.buckets)):
        groups.setdefault(zp.bucket_axes(k), []).append(k)
    sizes_of = {(zp.bucket_axes(k), b.padded * 4, b.shard * 4) for k, b in enumerate(zp.layout.buckets)}
    zero_sent = other_sent = 0
    for r in records:
        nbytes = r.shape[0] * r.dtype.itemsize if len(r.shape) == 1 else -1
        ours = r.op in ("all_reduce", "reduce_scatter", "all_gather") and any(
            r.axes == axes and nbytes == (shard if r.op == "all_gather" else padded) for axes, padded, shard in sizes_of
        )
        if ours:
            zero_sent += r.bytes_sent
        else:
            other_sent += r.bytes_sent
    formula_states = 4.0
    formula_comm = 0.0
    for axes, ks in groups.items():
        n = 1
        for a in axes:
            n *= mesh.shape[a]
        psi = sum(zp.layout.buckets[k].padded for k in ks)
        formula_states += 4 * psi / (n if stage == 3 else 1) + 8 * psi / (n if stage >= 1 else 1)
        if n > 1:
            formula_comm += (3 if stage == 3 else 2) * 4 * psi * (n - 1) / n
    return {
        "groups": {"x".join(a): len(ks) for a, ks in groups.items()},
        "states": trainer.local_bytes(),
        "formula_states": formula_states,
        "zero_sent": zero_sent,
        "formula_comm": formula_comm,
        "other_sent": other_sent,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    print(f"preset {args.preset}, fp32 AdamW, simulated world of 4, rank 0; bytes")
    print("| mesh | stage | bucket groups | model states | formula | ZeRO's bytes sent | formula (at most) | strategy + loss bytes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, sizes, plan, experts in MESHES:
        for stage in range(4):
            r = colofn.launch(_program, args.preset, sizes, plan, experts, stage, world_size=4)[0]
            groups = ", ".join(f"{k}: {v}" for k, v in r["groups"].items())
            print(f"| {name} | {stage} | {groups} | {r['states']:,} | {r['formula_states']:,.0f} | {r['zero_sent']:,} | "
                  f"{r['formula_comm']:,.0f} | {r['other_sent']:,} |")


if __name__ == "__main__":
    main()
