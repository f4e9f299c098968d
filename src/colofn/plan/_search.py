"""Enumerate the compositions colofn can run on a device count, predict each, rank them.

Legal means what ``colofn train`` accepts (``docs/train.md``): ``pp x dp x tp``
equal to the device count; ``tp`` divides the heads and stays inside a node;
``pp`` divides the layers; the batch splits over dp and the microbatches;
ZeRO 1-3 over dp, 1-2 inside pipeline stages (ZeRO-3 with pp is refused);
Megatron sequence parallelism only with tp; Ulysses over an ``sp`` axis
inside a node, with dp and ZeRO over ``dp x sp``; a mixture-of-experts model
on ``pp x dp x ep`` (ep dividing the experts, the batch split over dp and
ep), with ZeRO over ``dp x ep`` (experts over dp) without a pipeline, over
dp inside pipeline stages when there is no ep axis; the tp axis as a 2D
(``q^2``), 2.5D (``q^2 d``) or 3D (``p^3``) grid with dp only (``--tp-mode``).

>>> from colofn.plan import cluster, model
>>> ranked, refused = search(model("gpt2-124m"), cluster("cpu-local"), devices=8, global_batch=8)
>>> str(ranked[0].candidate), len(refused)
('dp=8', 0)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator

from colofn.errors import ConfigError
from colofn.plan._candidate import Candidate, Recompute, TPMode, grid_failures
from colofn.plan._cluster import Cluster
from colofn.plan._model import ModelShape
from colofn.plan._predict import Prediction, predict

__all__ = ["candidates", "search"]

SCHEDULES = ("1f1b", "gpipe", "zb_h1")
RECOMPUTE: tuple[Recompute, ...] = ("none", "selective", "full")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pipes(pp: int, data: int, global_batch: int) -> list[tuple[str, int]]:
    """``(schedule, microbatches)`` pairs: ``pp``, ``2 pp``, ``4 pp`` microbatches that split each data rank's rows."""
    if pp == 1:
        return [("1f1b", 1)]
    return [(s, k * pp) for s in SCHEDULES for k in (1, 2, 4) if global_batch % (data * k * pp) == 0]


def _grids(tp: int) -> list[tuple[TPMode, int]]:
    """The grid modes ``tp`` devices make: ``2d`` (``q^2``), ``2.5d`` (``q^2 d``, ``d >= 2``), ``3d`` (``p^3``); ``q, p >= 2``."""
    out: list[tuple[TPMode, int]] = []
    for q in range(2, math.isqrt(tp) + 1):
        if tp % (q * q) == 0:
            out.append(("2d", 1) if tp == q * q else ("2.5d", tp // (q * q)))
    return out + [("3d", 1) for p in range(2, tp) if p**3 == tp]


def candidates(m: ModelShape, cl: Cluster, *, devices: int, global_batch: int,
               recompute: tuple[Recompute, ...] = RECOMPUTE) -> Iterator[Candidate]:
    """Every legal candidate (see the module docstring), pipelines with ``pp``, ``2 pp``, ``4 pp`` microbatches."""
    if m.n_experts:  # mixture of experts: pp x dp x ep
        for pp, ep in itertools.product(_divisors(devices), repeat=2):
            dp = devices // pp // ep
            if devices % (pp * ep) or m.n_experts % ep or m.n_layers % pp or global_batch % (dp * ep):
                continue
            mesh = tuple((a, n) for a, n in (("pp", pp), ("dp", dp), ("ep", ep)) if n > 1) or (("dp", 1),)
            # ZeRO over the data axes; inside pipeline stages over dp alone (colofn train refuses ep there).
            zeros = (None,) if dp == 1 or (pp > 1 and ep > 1) else (None, 1, 2, 3) if pp == 1 else (None, 1, 2)
            for zero, (sched, mb), rc in itertools.product(zeros, _pipes(pp, dp * ep, global_batch), recompute):
                yield Candidate(mesh, zero=zero, schedule=sched, microbatches=mb, recompute=rc)
        return
    for pp in _divisors(devices):
        for tp in _divisors(devices // pp):
            dp = devices // pp // tp
            if m.n_layers % pp or tp > cl.devices_per_node or global_batch % dp:
                continue
            mesh = tuple((a, n) for a, n in (("pp", pp), ("dp", dp), ("tp", tp)) if n > 1) or (("dp", 1),)
            sps = ("none", "megatron") if tp > 1 else ("none",)
            zeros = ((None, 1, 2, 3) if pp == 1 else (None, 1, 2)) if dp > 1 else (None,)
            pipes = _pipes(pp, dp, global_batch)
            for sp, zero, (sched, mb), rc in itertools.product(sps, zeros, pipes, recompute) if m.n_heads % tp == 0 else ():
                yield Candidate(mesh, sp=sp, zero=zero, schedule=sched, microbatches=mb, recompute=rc)  # type: ignore[arg-type]
            if pp == 1:  # the tp axis as a 2D, 2.5D or 3D grid (dp only)
                for mode, depth in _grids(tp):
                    grid = Candidate(mesh, tp_mode=mode, tp_depth=depth)
                    if not grid_failures(m, grid):
                        yield from (dataclasses.replace(grid, recompute=rc) for rc in recompute)
    # Ulysses and ring attention over an sp axis (innermost), with dp and ZeRO over dp x sp.
    for u in _divisors(devices)[1:]:
        dp = devices // u
        if u > cl.devices_per_node or global_batch % dp:
            continue
        mesh = (("dp", dp), ("sp", u)) if dp > 1 else (("sp", u),)
        kinds = (["ulysses"] if m.n_heads % u == 0 and m.seq_len % u == 0 else []) + (
            ["ring"] if m.seq_len % (2 * u) == 0 else [])
        for sp, zero, rc in itertools.product(kinds, (None, 1, 2, 3) if dp > 1 else (None,), recompute):
            yield Candidate(mesh, sp=sp, zero=zero, recompute=rc)  # type: ignore[arg-type]


def search(m: ModelShape, cl: Cluster, *, devices: int, global_batch: int, efficiency: float = 0.5,
           recompute: tuple[Recompute, ...] = RECOMPUTE) -> tuple[list[Prediction], list[Prediction]]:
    """``(ranked, refused)``: the candidates that fit, fastest first, and those that do not (``.reason``).

    ``recompute`` limits the recompute modes tried (``("none",)``: what ``colofn train`` runs).
    """
    if devices < 1 or global_batch < 1:
        raise ConfigError(f"devices={devices} and global_batch={global_batch} must be >= 1")
    preds = [predict(m, c, cl, global_batch=global_batch, efficiency=efficiency)
             for c in candidates(m, cl, devices=devices, global_batch=global_batch, recompute=recompute)]
    if not preds:
        raise ConfigError(
            f"no legal composition of {m.name} on {devices} devices with global batch {global_batch}: "
            f"make the batch a multiple of the data-parallel size, or pick a device count that divides "
            f"the layers ({m.n_layers}) or heads ({m.n_heads})")
    fits = sorted((p for p in preds if p.fits), key=lambda p: (p.step_s, p.memory))
    refused = sorted((p for p in preds if not p.fits), key=lambda p: p.memory)
    return fits, refused
