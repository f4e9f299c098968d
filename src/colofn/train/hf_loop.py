"""The program every rank runs for ``colofn train --hf`` (the Hugging Face twin of :mod:`colofn.train.loop`)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch.distributed as dist

from colofn import checkpoint, data, random
from colofn.mesh import Mesh
from colofn.train import hf as hft
from colofn.train.config import TrainConfig
from colofn.train.loop import _fmt_bytes, make_optimizer
from colofn.world import process_index


def rank_program(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``--hf`` on this rank; rank 0 prints progress. Returns the run's record."""
    assert cfg.hf is not None
    mesh = Mesh(tuple(cfg.mesh_shape.values()), tuple(cfg.mesh_shape))
    model = hft.load_model(cfg.hf, cfg.preset, cfg.seed)
    opt = make_optimizer(cfg)
    start, params, state = hft.initial_state(cfg, model, opt)
    trainer = hft.trainer(cfg, model, mesh, opt, params, state)
    me = process_index()
    checker = hft.SingleDevice(model, opt, params, state) if cfg.check and me == 0 else None
    del params, state
    train_tokens, held_out = hft.token_streams(cfg.data)
    seq = hft.seq_len(model)
    key = random.key(cfg.seed + 1)
    record: dict[str, Any] = {"steps": [], "loss": [], "single": [], "tokens_per_s": [], "bytes_per_rank": []}
    tokens_per_step = cfg.batch_size * seq
    say = (lambda text: print(text, flush=True)) if me == 0 else (lambda text: None)
    say(f"colofn train: {hft.describe(model)} from --hf {cfg.hf} on {mesh}"
        + (f", ZeRO-{cfg.zero}" if cfg.zero is not None else "")
        + (f", schedule {cfg.schedule} x {cfg.num_microbatches} microbatches" if cfg.pp > 1 else "")
        + (f", sp {cfg.sp}" if cfg.sp != "none" else "")
        + f"; data {cfg.data or 'the shipped corpus'} ({len(train_tokens):,} train / {len(held_out):,} held-out bytes)"
        + (f", resumed at step {start}" if start else ""))
    per_rank: list[Any] | None = None
    for step in range(start, cfg.steps):
        batch = data.sample_batch(random.fold_in(key, step), train_tokens, cfg.batch_size, seq)
        t0 = time.perf_counter()
        loss = trainer.step(batch)
        dt = time.perf_counter() - t0
        if per_rank is None:
            per_rank = [trainer.local_bytes()]
            if dist.is_initialized() and dist.get_world_size() > 1:
                per_rank = [None] * dist.get_world_size()
                dist.all_gather_object(per_rank, trainer.local_bytes())
        single = checker.step(batch) if checker else None
        record["steps"].append(step + 1)
        record["loss"].append(loss)
        record["single"].append(single)
        record["tokens_per_s"].append(tokens_per_step / dt)
        record["bytes_per_rank"].append(per_rank)
        check = f" | single-device {single:.6f} (diff {abs(loss - single):.1e})" if single is not None else ""
        say(f"step {step + 1:>4}/{cfg.steps} | loss {loss:.6f}{check} | {tokens_per_step / dt:,.0f} tok/s | "
            f"params+opt per rank {_fmt_bytes(max(per_rank))}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            p, s = trainer.export()
            path = os.path.join(cfg.out, "checkpoints", f"step_{step + 1:06d}")
            checkpoint.save(path, {"step": step + 1, "params": p, "opt_state": tuple(s)}, overwrite=True)
            say(f"  saved {path}")
    if record["steps"]:
        final, _ = trainer.export()
        record["eval_loss"] = hft.eval_loss(model, final, held_out, seq, random.key(cfg.seed + 2))
        say(f"held-out loss {record['eval_loss']:.4f} ({int(hft.HELD_OUT * 100)}% of the data, never trained on)")
    record["config"] = dataclasses.asdict(cfg)
    record["mesh"] = str(mesh)
    return record
