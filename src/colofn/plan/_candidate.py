"""A candidate: one way to run a model (mesh, sequence parallelism, ZeRO, pipeline, recompute).

>>> c = Candidate(mesh=(("dp", 4), ("tp", 2)), zero=1)
>>> c.size("dp"), c.size("pp"), c.devices, str(c)
(4, 1, 8, 'dp=4,tp=2 zero1')
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal, get_args

from colofn.errors import ConfigError, format_failures

if TYPE_CHECKING:
    from colofn.plan._model import ModelShape

__all__ = ["Candidate", "Recompute", "SP", "TPMode", "check", "grid_failures"]

SP = Literal["none", "megatron", "ulysses", "ring"]
Recompute = Literal["none", "selective", "full"]
TPMode = Literal["1d", "2d", "2.5d", "3d"]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A composition of strategies on a mesh.

    Attributes:
        mesh: ``(axis, size)`` pairs, row-major (``pp``, ``dp``, ``sp``, ``tp``, ``ep`` are modelled;
            ``ep`` splits the experts of a mixture-of-experts model, and the batch with dp).
        sp: ``"megatron"``: sequence parallelism over the ``tp`` axis (Korthikanti et al. 2022);
            ``"ulysses"``: over the ``sp`` axis (Jacobs et al. 2023; with dp and ZeRO, not tp or pp, for now).
        zero: ZeRO stage 0-3 over the data axes: ``dp``, with Ulysses ``dp x sp``, with experts
            ``dp x ep`` (the experts over ``dp``); inside pipeline stages (1-2) over ``dp``
            (``None``: plain data parallelism).
        schedule: pipeline schedule name (used when ``pp > 1``).
        microbatches: microbatches per step (pipeline).
        recompute: activation recomputation: none, selective (attention core) or full.
        tp_mode: ``"1d"`` (Megatron), or the ``tp`` axis as a grid (``colofn train --tp-mode``):
            ``"2d"`` (SUMMA, ``tp = q^2``), ``"2.5d"`` (Tesseract, ``tp = q^2 * tp_depth``) or
            ``"3d"`` (``tp = p^3``), with dp only.
        tp_depth: the depth of a 2.5D grid.
    """

    mesh: tuple[tuple[str, int], ...]
    sp: SP = "none"
    zero: int | None = None
    schedule: str = "1f1b"
    microbatches: int = 1
    recompute: Recompute = "none"
    tp_mode: TPMode = "1d"
    tp_depth: int = 1

    def size(self, axis: str) -> int:
        return dict(self.mesh).get(axis, 1)

    @property
    def devices(self) -> int:
        return math.prod(n for _, n in self.mesh)

    @property
    def stage(self) -> int:
        return self.zero or 0

    def __str__(self) -> str:
        parts = [",".join(f"{a}={n}" for a, n in self.mesh)]
        if self.tp_mode != "1d":
            parts.append(f"tp={self.tp_mode}" + (f"x{self.tp_depth}" if self.tp_mode == "2.5d" else ""))
        if self.sp != "none":
            parts.append(f"sp={self.sp}")
        if self.zero:
            parts.append(f"zero{self.zero}")
        if self.size("pp") > 1:
            parts.append(f"{self.schedule} m={self.microbatches}")
        if self.recompute != "none":
            parts.append(f"rc={self.recompute}")
        return " ".join(parts)


AXES = ("pp", "dp", "sp", "tp", "ep")


def check(m: ModelShape, c: Candidate, global_batch: int) -> None:
    """Raise :class:`~colofn.errors.ConfigError` listing every reason ``c`` cannot run ``m``.

    >>> from colofn.plan import model
    >>> check(model("tiny"), Candidate((("dp", 3), ("tp", 8)), zero=4), global_batch=8)
    Traceback (most recent call last):
    ...
    colofn.errors.ConfigError: Candidate dp=3,tp=8 zero4 cannot run tiny (global batch 8):
      * zero=4: the stages are 0, 1, 2, 3 (or None)
      * tp=8 does not divide n_heads=4
      * global batch 8 does not split over dp=3 x 1 microbatches
    Fix: pick sizes that divide the model and the batch (colofn.plan.candidates lists the legal ones)
    """
    bad = []
    names = [a for a, _ in c.mesh]
    for a, n in c.mesh:
        if a not in AXES:
            bad.append(f"axis {a!r} is not modelled; the planner knows {', '.join(AXES)}")
        if not isinstance(n, int) or n < 1:
            bad.append(f"axis {a!r} has size {n!r}; sizes are ints >= 1")
    if len(set(names)) != len(names):
        bad.append(f"an axis appears twice in {names}")
    if c.sp not in get_args(SP):
        bad.append(f"sp={c.sp!r} is not one of {get_args(SP)}")
    elif c.sp == "megatron" and c.size("tp") == 1:
        bad.append("sp='megatron' splits the sequence over tp: add a tp axis")
    elif c.sp in ("ulysses", "ring") and "sp" not in names:
        bad.append(f"sp={c.sp!r} splits the sequence over an sp axis: add one")
    elif c.sp in ("ulysses", "ring") and (c.size("tp") > 1 or c.size("pp") > 1):
        bad.append(f"sp={c.sp!r} is modelled with dp (and ZeRO over dp x sp) only, not tp or pp, in this release")
    if "sp" in names and c.sp not in ("ulysses", "ring"):
        bad.append(f"an sp axis needs sp='ulysses' or sp='ring' (sp={c.sp!r})")
    if c.recompute not in get_args(Recompute):
        bad.append(f"recompute={c.recompute!r} is not one of {get_args(Recompute)}")
    if c.zero not in (None, 0, 1, 2, 3):
        bad.append(f"zero={c.zero!r}: the stages are 0, 1, 2, 3 (or None)")
    elif c.zero == 3 and c.size("pp") > 1:
        bad.append("zero=3 with pp: ZeRO-3 gathers a unit for each use, but a stage uses its parameters in every "
                   "microbatch at times only the schedule knows (colofn train refuses it): use zero 1 or 2 with pp")
    if c.zero is not None and "dp" not in names:
        bad.append(f"zero={c.zero} shards over the dp axis (and the other data axes with it): add dp")
    if "ep" in names and not m.n_experts:
        bad.append(f"an ep axis splits experts, and {m.name} has none")
    elif "ep" in names and isinstance(c.size("ep"), int) and c.size("ep") >= 1 and m.n_experts % c.size("ep"):
        bad.append(f"ep={c.size('ep')} does not divide n_experts={m.n_experts}")
    if m.n_experts and (c.size("tp") > 1 or c.size("sp") > 1):
        bad.append("mixture of experts is modelled with dp, ep, pp and ZeRO (not tp or sp) in this release")
    if c.zero is not None and c.size("pp") > 1 and (c.size("ep") > 1 or c.size("sp") > 1):
        bad.append("ZeRO with pp runs over dp inside the stages, not with an ep or sp axis (colofn train refuses it): "
                   "drop pp, or zero")
    if all(isinstance(n, int) and n >= 1 for _, n in c.mesh):
        mb = c.microbatches if c.size("pp") > 1 else 1
        if c.tp_mode == "1d" and m.n_heads % c.size("tp"):
            bad.append(f"tp={c.size('tp')} does not divide n_heads={m.n_heads}")
        if c.sp == "ring" and m.seq_len % (2 * c.size("sp")):
            bad.append(f"sp={c.size('sp')}: ring attention's zig-zag cuts seq_len={m.seq_len} into 2 x sp chunks")
        elif c.sp != "ring" and (m.n_heads % c.size("sp") or m.seq_len % c.size("sp")):
            bad.append(f"sp={c.size('sp')} must divide n_heads={m.n_heads} and seq_len={m.seq_len} (Ulysses)")
        if m.n_layers % c.size("pp"):
            bad.append(f"pp={c.size('pp')} does not divide n_layers={m.n_layers}")
        ep = f" x ep={c.size('ep')}" if c.size("ep") > 1 else ""
        if global_batch % (c.size("dp") * c.size("ep") * mb):
            bad.append(f"global batch {global_batch} does not split over dp={c.size('dp')}{ep} x {mb} microbatches")
    if c.tp_mode != "1d":
        bad += grid_failures(m, c)
    if bad:
        raise ConfigError(format_failures(f"Candidate {c} cannot run {m.name} (global batch {global_batch}):", bad,
                                          fix="pick sizes that divide the model and the batch "
                                          "(colofn.plan.candidates lists the legal ones)"))


def grid_failures(m: ModelShape, c: Candidate) -> list[str]:
    """Why the ``tp`` grid of ``c`` (2d, 2.5d, 3d) cannot run ``m``: ``colofn train``'s own refusals, and the model's."""
    from colofn.train.config import TrainConfig
    from colofn.train.grid import grid_failures as train_grid_failures
    from colofn.train.tp3d import failures as cube_failures

    if c.tp_mode not in get_args(TPMode):
        return [f"tp_mode={c.tp_mode!r} is not one of {get_args(TPMode)}"]
    cfg = TrainConfig(mesh=c.mesh, tp_mode=c.tp_mode, tp_depth=c.tp_depth, zero=c.zero, sp=c.sp,  # type: ignore[arg-type]
                      experts=m.n_experts)
    out = train_grid_failures(cfg) + cube_failures(cfg.mesh_shape, c.tp_mode, zero=c.zero, sp=c.sp,
                                                   experts=m.n_experts)
    if m.gated_mlp or m.kv_heads != m.n_heads:
        out.append(f"tp_mode={c.tp_mode!r} is modelled for colofn's GPT (no gated MLP, no grouped KV heads), not {m.name}")
    if not out and c.tp_mode != "3d":
        from colofn.parallel.tp2d.checks import config_failures
        from colofn.plan._model import gpt_config

        out += config_failures(cfg.plan(), gpt_config(m), cfg.device_mesh_shape)
    return out
