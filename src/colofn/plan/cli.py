"""``colofn plan``: rank the compositions of a model on a cluster and explain the best."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from colofn.errors import ConfigError
from colofn.plan._cluster import CLUSTERS, Cluster, cluster
from colofn.plan._file import plan_json
from colofn.plan._model import MODELS, model
from colofn.plan._predict import Prediction
from colofn.plan._search import RECOMPUTE, search

__all__ = ["add_subparser", "explain", "main", "table"]

GIB = 2**30


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plan`` command to ``subparsers``."""
    p = subparsers.add_parser(
        "plan", help="predict memory, communication and step time of every composition, and pick one",
        description="Enumerate the compositions colofn can run (pp x dp x tp, --sp megatron, dp x sp Ulysses or ring, tp grids (2d, 2.5d, 3d), "
        "pp x dp x ep for experts, ZeRO over the data axes and inside pipeline stages, "
        "schedule, microbatches, recompute), predict each on the cluster and rank them. See docs/plan.md.")
    p.add_argument("--model", required=True, help=f"one of {', '.join(MODELS)}")
    p.add_argument("--devices", type=int, required=True, help="devices in the job")
    p.add_argument("--cluster", default="cpu-local",
                   help=f"a preset ({', '.join(CLUSTERS)}) or a JSON file of Cluster fields (default cpu-local)")
    p.add_argument("--batch", type=int, default=None, help="global batch in sequences (default: --devices)")
    p.add_argument("--efficiency", type=float, default=0.5,
                   help="fraction of peak FLOP/s the compute reaches (default 0.5)")
    p.add_argument("--top", type=int, default=10, help="rows of the table (default 10)")
    p.add_argument("--recompute", choices=("any", "none"), default="any",
                   help="any: try none, selective and full activation recomputation; none: only what "
                   "colofn train runs (default any)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the best composition as a plan file, for colofn train --plan FILE (default: none)")
    p.set_defaults(func=main)
    return p


def _cluster(text: str, devices: int) -> Cluster:
    if text in CLUSTERS:
        return cluster(text, devices)
    if text.endswith(".json") and os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            c = Cluster.from_json(f.read())
        return dataclasses.replace(c, devices=devices)
    raise ConfigError(f"--cluster {text!r} is neither a preset ({', '.join(CLUSTERS)}) nor a .json file")


def table(preds: list[Prediction]) -> str:
    """One row per prediction: memory, bytes per link class, bubble, step time, MFU."""
    head = f"{'#':>3}  {'composition':<60} {'mem GiB':>8} {'intra MB':>9} {'inter MB':>9} {'bubble':>7} {'step s':>9} {'MFU':>6}"
    rows = [head]
    for i, p in enumerate(preds, 1):
        rows.append(f"{i:>3}  {str(p.candidate):<60} {p.memory / GIB:>8.2f} {p.intra_bytes / 1e6:>9.1f} "
                    f"{p.inter_bytes / 1e6:>9.1f} {p.bubble:>7.1%} {p.step_s:>9.4f} {p.mfu:>6.1%}")
    return "\n".join(rows)


def explain(best: Prediction, runner_up: Prediction | None, cl: Cluster) -> str:
    """A paragraph on why ``best`` wins."""
    c = best.candidate
    parts = [f"Best: {c}. It holds {best.model_states / GIB:.2f} GiB of model states and "
             f"{best.activations / GIB:.2f} GiB of activations per device (of {cl.memory / GIB:.1f} GiB); "
             f"compute takes {best.compute_s:.4g} s of the {best.step_s:.4g} s step"]
    if best.bubble:
        parts.append(f", the pipeline idles {best.bubble:.1%} of the time")
    parts.append(f", and {best.comm_s:.4g} s of communication is not hidden "
                 f"({best.intra_bytes / 1e6:.1f} MB inside nodes, {best.inter_bytes / 1e6:.1f} MB between them).")
    if cl.ranks_per_core > 1 and best.step_s > best.compute_s / (1 - best.bubble) + best.comm_s * (1 + 1e-9):
        ranks = min(cl.devices, cl.devices_per_node)
        parts.append(f" Its {ranks} ranks share {cl.cores} cores, which bound the step: each rank is busy "
                     f"{best.busy_s:.4g} s ({best.ops} torch calls), and a rank that waits hands its core to another.")
    if runner_up is not None:
        parts.append(f" The next, {runner_up.candidate}, is {runner_up.step_s / best.step_s - 1:.1%} slower.")
    parts.append(f" Predicted MFU {best.mfu:.1%} (model FLOPs over the step time at the cluster's peak).")
    return "".join(parts)


def main(args: argparse.Namespace) -> int:
    try:
        m = model(args.model)
        if args.devices < 1:
            raise ConfigError(f"--devices {args.devices}: must be >= 1")
        cl = _cluster(args.cluster, args.devices)
        ranked, refused = search(m, cl, devices=args.devices, global_batch=args.batch or args.devices,
                                 efficiency=args.efficiency,
                                 recompute=("none",) if args.recompute == "none" else RECOMPUTE)
    except ConfigError as e:
        print(f"colofn plan: {e}", file=sys.stderr)
        return 2
    print(f"{m.name} ({m.params:,} params) on {args.devices} x {cl.name}, global batch "
          f"{args.batch or args.devices} x {m.seq_len} tokens: {len(ranked)} compositions fit, {len(refused)} do not")
    if ranked:
        print(table(ranked[: args.top]))
        print()
        print(explain(ranked[0], ranked[1] if len(ranked) > 1 else None, cl))
    for p in refused[:3]:
        print(f"refused: {p.candidate}: {p.reason}")
    if len(refused) > 3:
        print(f"refused: {len(refused) - 3} more")
    if ranked and args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(plan_json(ranked[0].candidate, model=m.name, devices=args.devices,
                              global_batch=args.batch or args.devices, cluster_name=cl.name,
                              prediction=ranked[0]) + "\n")
        print(f"wrote {args.out}: run it with colofn train --preset {m.name} --plan {args.out}")
    return 0 if ranked else 1
