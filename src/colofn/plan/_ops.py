"""Torch operations per step: how many a rank calls from Python, by strategy (counted, stored as data).

On a CPU host the time of a small model's step is set less by its FLOPs than
by the software cost of each operation (Python, dispatch, autograd). The
planner charges :attr:`Cluster.per_op_s <colofn.plan.Cluster>` per operation,
so it needs each composition's operation count. They are counted, not
guessed: :func:`count_step_ops` runs two steps of ``colofn train``'s own
trainer (``colofn.train.loop``'s, with its optimizer) on the simulated world
and counts, with a :class:`torch.overrides.TorchFunctionMode`, every torch call
of each rank's second step (forward, the Python parts of the backward, the
collectives' wrappers, the optimizer update). :func:`recount` does that for
each strategy at two depths (and, with a pipeline, two microbatch counts) of
the ``tiny`` preset and fits the counts, exactly, as lines in the layers (and
microbatches); :data:`OP_COUNTS` is its output, kept as data, and
``tests/test_plan_cost.py`` recounts it and fails when the code drifts from it
(``python -m colofn.plan._ops`` prints a fresh table to paste).

What the fit holds, per key:

* without a pipeline, ``(per step, per layer)``: a rank of ``dp=2`` (plain or
  ZeRO 1-3), ``tp=2``, ``dp=2,tp=2`` (plain or Megatron-SP) or ``dp=2,sp=2``
  (Ulysses, ring);
* with a pipeline (1F1B on ``pp=3``, ``pp=3,dp=2`` and ZeRO 1 inside
  ``pp=3,dp=2``), for the first, a middle and the last stage, ``(a, b, c, d)``
  in ``a + b L + c m + d L m`` with ``L`` the stage's layers, ``m`` microbatches.

:func:`step_ops` composes them: a strategy changes a layer's operations (the
difference between its per-layer count and plain dp's, times layers and
microbatches) and the data axes' machinery the rest (ZeRO, the pipeline).
The sizes (widths, batch, axis sizes) do not change a count; ring attention's
hops do (``sp - 1`` per layer: counted on ``sp=2``, a limit).

>>> from colofn.plan import Candidate, model
>>> step_ops(model("tiny"), Candidate((("dp", 2),))) == OP_COUNTS["dp"][0] + 2 * OP_COUNTS["dp"][1]
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from colofn.plan._candidate import Candidate
    from colofn.plan._model import ModelShape

__all__ = ["OP_COUNTS", "count_ops", "count_step_ops", "recount", "step_ops"]

# python -m colofn.plan._ops (torch calls per rank per step; see the module docstring)
OP_COUNTS: dict[str, tuple[int, ...]] = {
    "dp": (234, 342),
    "dp zero1": (401, 121),
    "dp zero2": (365, 109),
    "dp zero3": (385, 133),
    "tp": (285, 376),
    "dp tp": (333, 422),
    "dp tp megatron": (363, 462),
    "dp sp ulysses": (279, 459),
    "dp sp ring": (306, 613),
    "pp first": (96, 340, 33, 52),
    "pp middle": (28, 340, 30, 52),
    "pp last": (145, 340, 53, 52),
    "pp dp first": (128, 430, 27, 32),
    "pp dp middle": (42, 430, 28, 32),
    "pp dp last": (194, 430, 46, 32),
    "pp zero1 first": (199, 234, 34, 52),
    "pp zero1 middle": (53, 234, 30, 52),
    "pp zero1 last": (357, 234, 59, 52),
}

# (key, mesh, sp, zero) of the strategies counted without a pipeline
_FLAT: tuple[tuple[str, str, str, int | None], ...] = (
    ("dp", "dp=2", "none", None),
    ("dp zero1", "dp=2", "none", 1),
    ("dp zero2", "dp=2", "none", 2),
    ("dp zero3", "dp=2", "none", 3),
    ("tp", "tp=2", "none", None),
    ("dp tp", "dp=2,tp=2", "none", None),
    ("dp tp megatron", "dp=2,tp=2", "megatron", None),
    ("dp sp ulysses", "dp=2,sp=2", "ulysses", None),
    ("dp sp ring", "dp=2,sp=2", "ring", None),
)
# (key, mesh, zero) of the pipelines counted (three stages: first, middle, last)
_PIPE: tuple[tuple[str, str, int | None], ...] = (
    ("pp", "pp=3", None),
    ("pp dp", "pp=3,dp=2", None),
    ("pp zero1", "pp=3,dp=2", 1),
)


def count_ops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), torch calls it made from Python on this thread)``, counted with a :class:`~torch.overrides.TorchFunctionMode`.

    >>> import torch
    >>> count_ops(lambda: (torch.ones(2) + 1).sum())[1]
    3
    """
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.n += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        out = fn()
    return out, count.n


def _counting_program(mesh: tuple[tuple[str, int], ...], sp: str, zero: int | None, microbatches: int | None,
                      n_layers: int) -> tuple[int, int]:
    """On each rank: ``(pipeline stage, torch calls of the trainer's second step)``."""
    from colofn import data, random
    from colofn.mesh import Mesh
    from colofn.train import TrainConfig
    from colofn.train.loop import _trainer, initial_state, make_optimizer

    cfg = TrainConfig(preset="tiny", mesh=mesh, batch_size=12, sp=sp, zero=zero,  # type: ignore[arg-type]
                      microbatches=microbatches)
    shape = cfg.device_mesh_shape
    dmesh = Mesh(tuple(shape.values()), tuple(shape))
    mcfg = dataclasses.replace(cfg.model_config(), n_layers=n_layers)
    opt = make_optimizer(cfg)
    _, params, state = initial_state(cfg, mcfg, opt)
    trainer = _trainer(cfg, mcfg, dmesh, opt, params, state)
    batch = data.sample_batch(random.key(1), data.encode(data.text()), cfg.batch_size, mcfg.seq_len)
    trainer.step(batch)  # the first step builds what later steps reuse: not counted
    return (dmesh.axis_index("pp") if "pp" in shape else 0), count_ops(lambda: trainer.step(batch))[1]


def count_step_ops(mesh: str, *, sp: str = "none", zero: int | None = None, microbatches: int | None = None,
                   n_layers: int = 2) -> dict[int, int]:
    """Torch calls of one warm ``colofn train`` step of the ``tiny`` preset with ``n_layers``, by pipeline stage.

    Runs on the simulated world (each rank counts its own thread's calls); the
    stage's largest count over its ranks.

    >>> count_step_ops("dp=2", n_layers=1) == {0: OP_COUNTS["dp"][0] + OP_COUNTS["dp"][1]}
    True
    """
    import math

    import colofn
    from colofn.train import parse_mesh

    pairs = tuple(parse_mesh(mesh).items())
    out: dict[int, int] = {}
    for stage, n in colofn.launch(_counting_program, pairs, sp, zero, microbatches, n_layers,
                                  world_size=math.prod(n for _, n in pairs)):
        out[stage] = max(out.get(stage, 0), n)
    return out


def recount() -> dict[str, tuple[int, ...]]:
    """:data:`OP_COUNTS` counted afresh (about 20 s on the simulated world of a 2-core host)."""
    out: dict[str, tuple[int, ...]] = {}
    for key, mesh, sp, zero in _FLAT:
        one, two = (count_step_ops(mesh, sp=sp, zero=zero, n_layers=n)[0] for n in (1, 2))
        out[key] = (2 * one - two, two - one)
    for key, mesh, zero in _PIPE:
        # a + b L + c m + d L m at L in (1, 2) layers per stage and m in (3, 6) microbatches
        at = {(n, m): count_step_ops(mesh, zero=zero, microbatches=m, n_layers=3 * n) for n in (1, 2) for m in (3, 6)}
        for stage, role in enumerate(("first", "middle", "last")):
            f11, f21, f12, f22 = (at[k][stage] for k in ((1, 3), (2, 3), (1, 6), (2, 6)))
            d = (f22 - f21 - f12 + f11) // 3
            b, c = f21 - f11 - 3 * d, (f12 - f11) // 3 - d
            a = f11 - b - 3 * c - 3 * d
            out[f"{key} {role}"] = (a, b, c, d)
    return out


def _kind(c: Candidate) -> str:
    """The key (counted with dp) whose layers a candidate's follow: plain dp's when nothing was counted for it."""
    if c.sp in ("ring", "ulysses"):
        return f"dp sp {c.sp}"
    if c.size("tp") > 1:  # a tp grid is counted as Megatron's 1D layers (not counted: a limit)
        return "dp tp megatron" if c.sp == "megatron" else "dp tp"
    return "dp"


def step_ops(m: ModelShape, c: Candidate, stage: int = 0) -> int:
    """Torch calls a rank of pipeline stage ``stage`` makes in one step of ``c`` (from :data:`OP_COUNTS`).

    The data axes' machinery (dp's gradient buckets, ZeRO, the pipeline) comes
    from its own key; a strategy's layers add the difference between their
    key and plain dp's (both counted with dp=2), once per layer and
    microbatch; without a data axis, the gradient buckets' calls (``dp tp`` less
    ``tp``) come off. Mixture-of-experts layers and tp grids count as dense
    layers of plain dp and 1D tp (not counted yet: a limit).
    """
    kind = _kind(c)
    pp, (step, layer) = c.size("pp"), OP_COUNTS["dp"]
    extra_step, extra_layer = OP_COUNTS[kind][0] - step, OP_COUNTS[kind][1] - layer
    if c.size("dp") * c.size("sp") * c.size("ep") == 1:  # no gradient sums over data axes
        extra_step -= OP_COUNTS["dp tp"][0] - OP_COUNTS["tp"][0]
        extra_layer -= OP_COUNTS["dp tp"][1] - OP_COUNTS["tp"][1]
    layers = m.n_layers // pp
    zero = f" zero{min(c.zero, 1 if pp > 1 else 3)}" if c.zero else ""
    if pp == 1:
        per_step, per_layer = OP_COUNTS["dp" + zero]
        return per_step + extra_step + (per_layer + extra_layer) * layers
    key = "pp" + (zero or (" dp" if c.size("dp") > 1 else ""))
    role = "first" if stage == 0 else "last" if stage == pp - 1 else "middle"
    a, b, cm, d = OP_COUNTS[f"{key} {role}"]
    mb = c.microbatches
    if kind != "dp":  # the strategy's layers, per microbatch
        d += OP_COUNTS[kind][1] - layer
    return a + b * layers + cm * mb + d * layers * mb


if __name__ == "__main__":
    print("OP_COUNTS: dict[str, tuple[int, ...]] = {")
    for k, v in recount().items():
        print(f'    "{k}": {v},')
    print("}")
