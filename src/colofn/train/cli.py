"""``colofn train``: the main job."""

from __future__ import annotations

import argparse
import os
import sys

from colofn.errors import ColofnError


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Append ``(default: X)`` to each flag's help, unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "train",
        help="train a GPT on the shipped corpus with any composition of dp/tp/sp/ep/pp and ZeRO",
        description="Train a GPT preset on N simulated devices (or real processes under torchrun), "
        "with strategies composed on one mesh, optionally checked step by step against one device. "
        "Every flag is checked against the others before any world starts (exit code 2).",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument("--preset", default="tiny", help="model preset: tiny, small, gpt2-124m")
    p.add_argument("--mesh", default="dp=2,tp=2",
                   help="axes and sizes, e.g. pp=2,dp=2,tp=2 (axes: pp dp sp tp ep); the run has prod(sizes) devices")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps to train (>= 1)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch in sequences per step, split over dp (and ep)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of AdamW (warmup, then cosine decay to lr/10)")
    p.add_argument("--warmup", type=int, default=5, help="steps of linear learning-rate warmup from 0 (>= 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the parameters and of the batches")
    p.add_argument("--zero", type=int, default=None, help="ZeRO stage 0-3 over dp, and sp (ulysses/ring) and ep when present (default: no ZeRO)")
    p.add_argument("--sp", default="none", choices=("none", "megatron", "ulysses", "ring"),
                   help="sequence parallelism: none, megatron (over tp), ulysses or ring (over sp)")
    p.add_argument("--schedule", default="1f1b", help="pipeline schedule (with pp): gpipe, 1f1b, interleaved_1f1b, zb_h1, zb_h2, zbv, dualpipev, or module:function")
    p.add_argument("--microbatches", type=int, default=None,
                   help="microbatches per step (with pp; each dp rank's batch must divide by it; default: 2 x pp)")
    p.add_argument("--experts", type=int, default=0, help="mixture-of-experts with N experts (use ep=N in --mesh to split them; 0: dense)")
    p.add_argument("--tp-mode", default="1d", choices=("1d", "2d", "2.5d", "3d"),
                   help="tensor parallelism over tp: 1d (Megatron), 2d (Optimus: SUMMA on a q x q grid, tp=q*q), "
                        "2.5d (Tesseract: q x q x depth, tp=q*q*D with --tp-depth D) or 3d (Bian et al. 2021: "
                        "tp=p^3 factored into a p x p x p cube; weights and activations split over all three)")
    p.add_argument("--tp-depth", type=int, default=1, help="the depth D of --tp-mode 2.5d (tp=q*q*D)")
    p.add_argument("--tp-remat", action="store_true",
                   help="with --tp-mode 2d/2.5d: keep SUMMA blocks for the backward and gather them again there "
                        "(less memory, more bytes; default: off)")
    p.add_argument("--check", action="store_true", help="train the single-device model alongside and print the difference per step (default: off)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save a checkpoint every K steps (0: never)")
    p.add_argument("--resume", default=None, help="a checkpoint directory, or a directory of them (the newest is used; default: start fresh)")
    p.add_argument("--out", default="colofn-train-out", help="where checkpoints, the loss curve and the report go")
    p.add_argument("--backend", choices=("sim", "gloo", "env"), default=None,
                   help="sim: threads; gloo: local processes; env: the world torchrun started "
                   "(default: env under torchrun, else sim)")
    p.add_argument("--hf", default=None, metavar="KIND|DIR",
                   help="train a Hugging Face causal LM instead of colofn's GPT: llama or gpt2 (size from --preset "
                        "tiny/small, random init), or a local directory with config.json and safetensors weights "
                        "(needs colofn[hf]; default: none)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="train on the bytes of this text file (byte-level tokens, last 10%% held out for the eval loss; "
                        "default: the shipped corpus)")
    p.add_argument("--plan", default=None, metavar="auto|FILE",
                   help="take the mesh, --sp, --zero, --schedule and --microbatches from the planner: auto plans "
                   "for the device count of --mesh on cluster cpu-local; FILE is what colofn plan --out wrote "
                   "(default: the flags)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from colofn.train import train
    from colofn.train.config import TrainConfig, parse_mesh

    backend = args.backend or ("env" if "RANK" in os.environ and "WORLD_SIZE" in os.environ else "sim")
    try:
        cfg = TrainConfig(
            preset=args.preset, mesh=tuple(parse_mesh(args.mesh).items()), steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, seed=args.seed, zero=args.zero,
            sp=args.sp, schedule=args.schedule, microbatches=args.microbatches, check=args.check,
            checkpoint_every=args.checkpoint_every, resume=args.resume, out=args.out, backend=backend,
            experts=args.experts, hf=args.hf, data=args.data, tp_mode=args.tp_mode, tp_depth=args.tp_depth,
            tp_remat=args.tp_remat,
        )
        if args.plan is not None:
            from colofn.plan import plan_train

            cfg, why = plan_train(args.plan, cfg)
            print(why)
        return train(cfg)
    except ColofnError as e:
        print(f"colofn train: error: {str(e).removeprefix('colofn train: ')}", file=sys.stderr)
        return 2
