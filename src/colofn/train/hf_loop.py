"""The program every rank runs for ``colofn train --hf`` (the Hugging Face twin of :mod:`colofn.train.loop`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from colofn import data, random
from colofn.mesh import Mesh
from colofn.train import hf as hft
from colofn.train.config import TrainConfig
from colofn.train.loop import make_optimizer, run_steps
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
    header = (f"colofn train: {hft.describe(model)} from --hf {cfg.hf} on {mesh}"
              + (f", ZeRO-{cfg.zero}" if cfg.zero is not None else "")
              + (f", schedule {cfg.schedule} x {cfg.num_microbatches} microbatches" if cfg.pp > 1 else "")
              + (f", sp {cfg.sp}" if cfg.sp != "none" else "")
              + f"; data {cfg.data or 'the shipped corpus'} ({len(train_tokens):,} train / {len(held_out):,} held-out bytes)"
              + (f", resumed at step {start}" if start else ""))
    sample = lambda step: data.sample_batch(random.fold_in(key, step), train_tokens, cfg.batch_size, seq)  # noqa: E731
    record = run_steps(cfg, trainer, checker, sample, cfg.batch_size * seq, start, header)
    if record["steps"]:
        final, _ = trainer.export()
        record["eval_loss"] = hft.eval_loss(model, final, held_out, seq, random.key(cfg.seed + 2))
        if me == 0:
            print(f"held-out loss {record['eval_loss']:.4f} ({int(hft.HELD_OUT * 100)}% of the data, never trained on)")
    record["config"] = dataclasses.asdict(cfg)
    record["mesh"] = str(mesh)
    return record
