"""``Plan``: which mesh axis does what, as a frozen value, and its checks.

A plan names mesh axes for each parallel strategy; everything else (parameter
specs, batch specs, which collectives run) is derived from it. Checks collect
every problem with a plan, a model config and a mesh into one
:class:`PlanError` before any communication.

>>> from colofn.parallel import Plan
>>> plan = Plan(dp="dp", tp="tp", sp="megatron")
>>> plan.batch_axes, plan.seq_axis, plan.token_axes
(('dp',), 'tp', ('dp',))
>>> Plan(dp="dp", sp="ring", sp_axis="sp").token_axes
('dp', 'sp')
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

from colofn.errors import ColofnError, format_failures

__all__ = ["SP", "TPMode", "Plan", "PlanError", "check_batch", "check_plan"]

SP = Literal["none", "megatron", "ulysses", "ring"]
TPMode = Literal["1d", "2d", "2.5d", "3d"]


class PlanError(ColofnError, ValueError):
    """A parallel plan that does not fit its mesh, its model config or its batch."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which mesh axis does what. Axes the plan leaves out are replicated over.

    Attributes:
        dp: data parallel: the batch is split over this axis (or tuple of axes,
            in mesh order) and the loss averaged over it. ZeRO shards over it.
        tp: Megatron tensor parallel (Shoeybi et al. 2019): heads, ``d_ff`` and
            the vocabulary are split over it.
        sp: sequence parallelism: ``"none"``; ``"megatron"`` (Korthikanti et al.
            2022: norms and residuals on sequence shards of the ``tp`` axis);
            ``"ulysses"`` (Jacobs et al. 2023: all-to-all heads <-> sequence
            around attention over ``sp_axis``); ``"ring"`` (Liu et al. 2023:
            key/value blocks passed around the ``sp_axis`` ring; each rank
            holds two zig-zag chunks of the sequence, see :attr:`seq_layout`).
        sp_axis: the axis the sequence is split over for ``"ulysses"`` and
            ``"ring"``; ``"megatron"`` uses ``tp`` (leave it None or equal to ``tp``).
        ep: expert parallel: the experts of MoE layers are split over it and
            tokens are exchanged all-to-all. Tokens must be split along it too:
            if it is not a ``dp`` or ``sp_axis`` axis, the batch is also split over it.
        pp: the pipeline axis, for ``colofn.pipeline``; this package only checks
            that it is a distinct mesh axis (see :func:`colofn.parallel.layer_specs`).
        tp_mode: how tensor parallelism splits the weights: ``"1d"`` (Megatron,
            over ``tp``); ``"2d"`` (Xu et al. 2021, Optimus: SUMMA on a ``q x q``
            grid of two axes, :mod:`colofn.parallel.tp2d`); ``"2.5d"`` (Wang et
            al. 2021, Tesseract: the ``q x q`` grid replicated over a depth axis
            that splits the batch); ``"3d"`` (Bian et al. 2021).
        tp_grid: the grid's mesh axes in the mode's order (``tp`` stays None):
            2d ``(row, col)``, 2.5d ``(row, col, depth)``, 3d three axes.
    """

    dp: str | tuple[str, ...] | None = None
    tp: str | None = None
    sp: SP = "none"
    sp_axis: str | None = None
    ep: str | None = None
    pp: str | None = None
    tp_mode: TPMode = "1d"
    tp_grid: tuple[str, ...] | None = None

    @property
    def dp_axes(self) -> tuple[str, ...]:
        """``dp`` as a tuple (empty without data parallelism)."""
        if self.dp is None:
            return ()
        return (self.dp,) if isinstance(self.dp, str) else tuple(self.dp)

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """The axes the batch dim is split over: ``dp``, plus ``ep`` when tokens are not split along it otherwise."""
        extra: tuple[str, ...] = (
            ()
            if self.ep is None or self.ep in self.dp_axes or self.ep == self.seq_axis
            else (self.ep,)
        )
        if self.tp_mode in ("2d", "2.5d") and self.tp_grid:  # the grid's rows (and depth) split the batch
            extra += self.tp_grid[0:1] + self.tp_grid[2:3]
        return self.dp_axes + extra

    @property
    def seq_axis(self) -> str | None:
        """The axis the residual stream's sequence dim is split over between blocks."""
        if self.sp == "megatron":
            return self.tp
        return self.sp_axis if self.sp in ("ulysses", "ring") else None

    @property
    def seq_layout(self) -> Literal["contiguous", "zigzag"]:
        """Which tokens a rank of :attr:`seq_axis` holds: ``"zigzag"`` under ring attention, else ``"contiguous"``.

        Ring attention cuts the sequence into ``2 * sp`` chunks and gives rank
        ``i`` chunks ``i`` and ``2 * sp - 1 - i`` (:mod:`colofn.parallel.sp.chunks`),
        so every rank has the same causal attention work.
        """
        return "zigzag" if self.sp == "ring" else "contiguous"

    @property
    def token_axes(self) -> tuple[str, ...]:
        """The axes that split the tokens the loss and MoE routing see (batch, then ring/Ulysses sequence).

        Megatron-SP gathers the sequence before the head and the experts, so its
        ``tp`` axis is not one of them.
        """
        seq = (self.sp_axis,) if self.sp in ("ulysses", "ring") and self.sp_axis else ()
        return self.batch_axes + seq

    def axes(self) -> dict[str, tuple[str, ...]]:
        """Each role's axes (only the roles set)."""
        roles = {
            "dp": self.dp_axes,
            "tp": (self.tp,) if self.tp else (),
            "sp_axis": (self.sp_axis,) if self.sp_axis else (),
            "ep": (self.ep,) if self.ep else (),
            "pp": (self.pp,) if self.pp else (),
            "tp_grid": tuple(self.tp_grid or ()),
        }
        return {k: v for k, v in roles.items() if v}


def _plan_failures(plan: Plan) -> list[str]:
    out: list[str] = []
    if plan.sp not in get_args(SP):
        out.append(f"sp={plan.sp!r} is not one of {', '.join(map(repr, get_args(SP)))}")
    if plan.tp_mode not in get_args(TPMode):
        out.append(f"tp_mode={plan.tp_mode!r} is not one of {', '.join(map(repr, get_args(TPMode)))}")
    if plan.tp_mode == "3d":
        from colofn.parallel import tp3d

        out += tp3d.plan_failures(plan)
    if plan.sp == "megatron":
        if plan.tp is None:
            out.append(
                "sp='megatron' splits the sequence over the tp axis, but tp is None; set tp=..."
            )
        if plan.sp_axis not in (None, plan.tp):
            out.append(
                f"sp='megatron' uses tp={plan.tp!r} for the sequence; sp_axis={plan.sp_axis!r} must be None"
            )
    elif plan.sp in ("ulysses", "ring") and plan.sp_axis is None:
        out.append(f"sp={plan.sp!r} needs sp_axis, the mesh axis to split the sequence over")
    elif plan.sp == "none" and plan.sp_axis is not None:
        out.append(f"sp_axis={plan.sp_axis!r} is set but sp='none'; pick sp='ulysses' or sp='ring'")
    if plan.tp_mode not in get_args(TPMode):
        out.append(f"tp_mode={plan.tp_mode!r} is not one of {', '.join(map(repr, get_args(TPMode)))}")
    elif plan.tp_mode == "1d" and plan.tp_grid is not None:
        out.append(f"tp_grid={plan.tp_grid!r} is set but tp_mode='1d' (which splits over tp); pick tp_mode='2d' or '2.5d'")
    if plan.tp_mode in ("2d", "2.5d"):
        from colofn.parallel.tp2d.checks import plan_failures

        out += plan_failures(plan)
    used: dict[str, str] = {}
    for role, axes in plan.axes().items():
        for a in axes:
            if not isinstance(a, str) or not a:
                out.append(f"{role} axis {a!r} is not a non-empty str")
                continue
            other = used.get(a)
            ep_in_tokens = {role, other} == {"ep", "dp"} or {role, other} == {"ep", "sp_axis"}
            if (
                other is not None
                and not ep_in_tokens
                and not (role == "sp_axis" and plan.sp == "megatron")
            ):
                out.append(
                    f"axis {a!r} is used for both {other} and {role}; give each role its own axis"
                )
            used.setdefault(a, role)
    return out


def check_plan(plan: Plan, config: object, mesh_shape: Mapping[str, int]) -> None:
    """Check ``plan`` against a ``GPTConfig`` and the mesh's ``{axis: size}``; one error lists every problem.

    >>> from colofn.models import gpt
    >>> check_plan(Plan(tp="tp"), gpt.config("tiny", vocab_size=255), {"tp": 2})
    Traceback (most recent call last):
    ...
    colofn.parallel.plan.PlanError: Plan(dp=None, tp='tp', sp='none', sp_axis=None, ep=None, pp=None, tp_mode='1d', tp_grid=None) does not fit the model or mesh {'tp': 2}:
      * vocab_size=255 is not divisible by tp=2 (vocabulary-parallel embedding and loss); pad it: vocab_size=256
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"expected a colofn.parallel.Plan, got {type(plan).__name__}")
    failures = _plan_failures(plan)
    names = list(mesh_shape)
    for role, axes in plan.axes().items():
        missing = [a for a in axes if a not in mesh_shape]
        if missing:
            failures.append(
                f"{role}={missing[0]!r} is not a mesh axis; the mesh axes are {tuple(names)}"
            )
    batch = plan.batch_axes
    if all(a in mesh_shape for a in batch) and [names.index(a) for a in batch] != sorted(
        names.index(a) for a in batch
    ):
        failures.append(
            f"the batch is split over {batch}, which must be listed in mesh order {tuple(names)}"
        )
    failures += _config_failures(plan, config, mesh_shape)
    if plan.tp_mode == "3d" and not failures:
        from colofn.parallel import tp3d

        failures += tp3d.mesh_failures(plan, config, mesh_shape)
    if failures:
        raise PlanError(
            format_failures(f"{plan} does not fit the model or mesh {dict(mesh_shape)}:", failures)
        )


def _config_failures(plan: Plan, c: object, shape: Mapping[str, int]) -> list[str]:
    out: list[str] = []
    size = {
        a: shape.get(a, 1) for a in (plan.tp, plan.sp_axis, plan.ep) if a
    }  # unknown axes: reported already
    if plan.tp_mode in ("2d", "2.5d"):
        from colofn.parallel.tp2d.checks import config_failures

        return config_failures(plan, c, shape) + _dropout_failures(c)
    tp = size[plan.tp] if plan.tp else 1
    heads, vocab, d_ff, experts = (
        getattr(c, f) for f in ("n_heads", "vocab_size", "d_ff", "n_experts")
    )
    if heads % tp:
        out.append(f"n_heads={heads} is not divisible by tp={tp}; attention splits heads over tp")
    if vocab % tp:
        padded = math.ceil(vocab / tp) * tp
        out.append(
            f"vocab_size={vocab} is not divisible by tp={tp} (vocabulary-parallel embedding and loss); "
            f"pad it: vocab_size={padded}"
        )
    if d_ff % tp:
        out.append(f"d_ff={d_ff} is not divisible by tp={tp}; the MLP splits d_ff over tp")
    if plan.sp == "ulysses" and plan.sp_axis:
        u = size[plan.sp_axis]
        if heads % (tp * u):
            out.append(
                f"sp='ulysses' over {plan.sp_axis!r} (size {u}) needs n_heads={heads} divisible by "
                f"tp * sp = {tp * u}: each rank attends over whole heads"
            )
    if plan.ep is not None:
        ep = size[plan.ep]
        if experts == 0:
            out.append(f"ep={plan.ep!r} is set but the model has no experts (n_experts=0); drop ep")
        elif experts % ep:
            out.append(
                f"n_experts={experts} is not divisible by ep={ep}; each rank holds n_experts / ep experts"
            )
    return out + _dropout_failures(c)


def _dropout_failures(c: object) -> list[str]:
    out = []
    if getattr(c, "dropout", 0.0):
        out.append(
            f"dropout={c.dropout} is not implemented by the parallel strategies yet; set dropout=0.0 "  # type: ignore[attr-defined]
            "(the single-device model has it)"
        )
    return out


def check_batch(
    plan: Plan, mesh_shape: Mapping[str, int], shape: Sequence[int], seq_len: int
) -> None:
    """Check a ``[batch, seq]`` token array against the plan's splits (one error lists every problem)."""
    failures = []
    size = dict(mesh_shape)
    if len(shape) != 2:
        failures.append(f"tokens must be [batch, seq], got shape {tuple(shape)}")
    else:
        b, s = shape
        # An axis the mesh lacks counts as size 1 here: check_plan reports it.
        nb = math.prod(size.get(a, 1) for a in plan.batch_axes)
        if plan.tp_mode == "3d":
            from colofn.parallel import tp3d

            failures += tp3d.batch_failures(plan, size, b)
        elif b % nb:
            failures.append(
                f"batch {b} is not divisible by the {nb} ranks of {plan.batch_axes} it is split over"
            )
        # Ring attention's zig-zag layout cuts the sequence into 2 chunks per rank.
        n = size.get(plan.seq_axis, 1) if plan.seq_axis else 1
        chunks = n * (2 if plan.seq_layout == "zigzag" else 1)
        if plan.seq_axis is not None and s % chunks:
            what = f"sp={n}" if chunks == n else f"2 * sp = {chunks}"
            why = " into 2 zig-zag chunks per rank, one from each end" if plan.seq_layout == "zigzag" else ""
            failures.append(
                f"seq {s} is not divisible by {what} (sp={plan.sp!r} splits the sequence over "
                f"{plan.seq_axis!r}{why}); use a seq length that is a multiple of {chunks}"
            )
        if s > seq_len:
            failures.append(f"seq {s} is longer than config.seq_len={seq_len}")
    if failures:
        raise PlanError(format_failures(f"The batch does not fit {plan} on mesh {size}:", failures))
