"""The checks of a 2D / 2.5D plan: the grid's axes and sizes, and the model sizes it must divide.

Called by :func:`colofn.parallel.check_plan`, which collects every failure
into one :class:`~colofn.parallel.PlanError` before any communication.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from colofn.parallel.plan import Plan

__all__ = ["config_failures", "grid_names", "plan_failures"]


def grid_names(mode: str) -> tuple[str, ...]:
    """What each axis of ``tp_grid`` is, in order: ``("row", "col")`` or ``("row", "col", "depth")``."""
    return ("row", "col", "depth") if mode == "2.5d" else ("row", "col")


def plan_failures(plan: Plan) -> list[str]:
    """What is wrong with a ``tp_mode="2d"`` or ``"2.5d"`` plan on its own (without a mesh or model)."""
    out: list[str] = []
    mode, names = plan.tp_mode, grid_names(plan.tp_mode)
    want = f"tp_grid=({', '.join(names)}), {len(names)} mesh axes"
    grid = plan.tp_grid
    if not isinstance(grid, tuple) or len(grid) != len(names):
        out.append(f"tp_mode={mode!r} needs {want}; got tp_grid={grid!r}")
    elif len(set(grid)) != len(grid):
        out.append(f"tp_grid={grid!r} names an axis twice; the grid needs {len(names)} distinct mesh axes")
    if plan.tp is not None:
        out.append(f"tp_mode={mode!r} splits the weights over tp_grid; tp={plan.tp!r} must be None")
    if plan.sp != "none":
        out.append(f"sp={plan.sp!r} does not compose with tp_mode={mode!r} yet; use sp='none'")
    if plan.pp is not None:
        out.append(
            f"pp={plan.pp!r}: pipeline stages pass the residual stream split by batch and sequence only, "
            f"but tp_mode={mode!r} splits d_model over the grid's columns too; drop pp"
        )
    if plan.ep is not None:
        out.append(f"ep={plan.ep!r}: mixture-of-experts layers are not implemented under tp_mode={mode!r}; drop ep")
    return out


def config_failures(plan: Plan, c: object, shape: Mapping[str, int]) -> list[str]:
    """What a ``GPTConfig`` and the mesh's ``{axis: size}`` must satisfy for ``plan``'s grid.

    The grid's two first axes are a square ``q x q``; heads, ``d_model``,
    ``d_ff`` and the vocabulary are split ``q`` ways.
    """
    grid = plan.tp_grid
    if not isinstance(grid, tuple) or len(grid) != len(grid_names(plan.tp_mode)) or not all(a in shape for a in grid):
        return []  # reported by plan_failures / check_plan already
    row, col = grid[0], grid[1]
    q, q_col = shape[row], shape[col]
    if q != q_col:
        return [
            f"tp_mode={plan.tp_mode!r} needs a square q x q grid, but {row}={q} and {col}={q_col}; "
            f"give both grid axes the same size"
        ]
    out: list[str] = []
    heads, d_model, d_ff, vocab, experts = (
        getattr(c, f) for f in ("n_heads", "d_model", "d_ff", "vocab_size", "n_experts")
    )
    for name, value, why in (
        ("n_heads", heads, "attention splits heads over the grid's columns"),
        ("d_model", d_model, "activations and weights split d_model over the grid"),
        ("d_ff", d_ff, "the MLP splits d_ff over the grid's columns"),
    ):
        if value % q:
            out.append(f"{name}={value} is not divisible by q={q} ({row} x {col} grid); {why}")
    if vocab % q:
        out.append(
            f"vocab_size={vocab} is not divisible by q={q} (the embedding and the logits are split by "
            f"vocabulary over the grid); pad it: vocab_size={math.ceil(vocab / q) * q}"
        )
    if experts:
        out.append(
            f"n_experts={experts}: mixture-of-experts layers are not implemented under "
            f"tp_mode={plan.tp_mode!r}; use a dense model or tp_mode='1d'"
        )
    return out
