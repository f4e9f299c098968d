"""``colofn train``: a GPT trained with strategies composed on one mesh.

The run is described by a :class:`TrainConfig` (the flags of ``colofn train``),
checked in full before any work (:func:`~colofn.train.config.validate`), and
run on a simulated world of ``prod(mesh)`` devices, on local gloo processes,
or in the world ``torchrun`` started. See ``docs/train.md``.
"""

from __future__ import annotations

import sys

from colofn.train.config import TrainConfig, parse_mesh, validate

__all__ = ["TrainConfig", "parse_mesh", "train", "validate"]


def train(cfg: TrainConfig) -> int:
    """Run ``cfg``; returns an exit code (1 when ``--check`` found a difference above rounding)."""
    from colofn.train import report
    from colofn.train.loop import rank_program
    from colofn.world import initialize, launch

    validate(cfg)
    if cfg.backend == "env":
        from colofn.world import process_index

        initialize()  # joined worlds are left together at exit (world._leave_world)
        records = [rank_program(cfg)]
        me = process_index()
    else:
        records = launch(rank_program, cfg, world_size=cfg.world_size, backend=cfg.backend)  # type: ignore[arg-type]
        me = 0
    record = records[0]
    if me != 0:
        return 0
    if not record["loss"]:
        print("colofn train: nothing to do (the checkpoint is already at --steps)")
        return 0
    svg, md = report.write(cfg.out, record)
    diffs = [abs(a - b) for a, b in zip(record["loss"], record["single"], strict=True) if b is not None]
    print(f"\nloss {record['loss'][0]:.4f} -> {record['loss'][-1]:.4f}; wrote {svg} and {md}")
    if diffs:
        worst = max(diffs)
        ok = worst < 1e-4
        print(f"{'OK' if ok else 'MISMATCH'}: parallel training equals single-device training "
              f"(max loss difference {worst:.1e} over {len(diffs)} steps)")
        sys.stdout.flush()
        return 0 if ok else 1
    return 0
