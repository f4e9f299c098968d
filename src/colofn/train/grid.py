"""``--tp-mode 2d | 2.5d``: the ``tp`` axis of ``--mesh`` factored into a grid, its plan and its refusals.

``tp=N`` becomes the axes ``tp_row, tp_col`` (2D, ``N = q * q``) or
``tp_row, tp_col, tp_dep`` (2.5D, ``N = q * q * D`` with ``--tp-depth D``), in
place of ``tp`` in the mesh, so ranks keep their order.

>>> from colofn.train.config import TrainConfig
>>> c = TrainConfig(mesh=(("dp", 2), ("tp", 8)), tp_mode="2.5d", tp_depth=2)
>>> device_mesh_shape(c)
{'dp': 2, 'tp_row': 2, 'tp_col': 2, 'tp_dep': 2}
>>> grid_plan(c).tp_grid
('tp_row', 'tp_col', 'tp_dep')
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from colofn.parallel import Plan

if TYPE_CHECKING:
    from colofn.train.config import TrainConfig

__all__ = ["GRID_AXES", "device_mesh_shape", "grid_failures", "grid_plan", "rematerializing"]

GRID_AXES = {"2d": ("tp_row", "tp_col"), "2.5d": ("tp_row", "tp_col", "tp_dep")}
"""The mesh axes ``tp`` becomes under each grid mode."""


def _side(cfg: TrainConfig) -> int | None:
    """``q``, or None when ``tp`` does not factor as the mode needs."""
    n = cfg.mesh_shape.get("tp", 0)
    depth = cfg.tp_depth if cfg.tp_mode == "2.5d" else 1
    if depth < 1 or n % depth:
        return None
    q = math.isqrt(n // depth)
    return q if q * q * depth == n else None


def device_mesh_shape(cfg: TrainConfig) -> dict[str, int]:
    """``cfg.mesh_shape`` with ``tp`` replaced by the grid's axes (unchanged under ``--tp-mode 1d``)."""
    q = _side(cfg)
    if cfg.tp_mode not in GRID_AXES or q is None:
        return cfg.mesh_shape
    sizes = (q, q, cfg.tp_depth)
    out: dict[str, int] = {}
    for name, size in cfg.mesh_shape.items():
        out.update(dict(zip(GRID_AXES[cfg.tp_mode], sizes, strict=False)) if name == "tp" else {name: size})
    return out


def grid_plan(cfg: TrainConfig) -> Plan:
    """The plan of a 2d / 2.5d run: data parallel over ``dp`` (if any), the grid over the ``tp`` axes."""
    return Plan(dp="dp" if "dp" in cfg.mesh_shape else None, tp_mode=cfg.tp_mode, tp_grid=GRID_AXES[cfg.tp_mode])  # type: ignore[arg-type]


def grid_failures(cfg: TrainConfig) -> list[str]:
    """Why ``--tp-mode`` / ``--tp-depth`` cannot run with the other flags (empty when they can)."""
    mode, m = cfg.tp_mode, cfg.mesh_shape
    if mode not in ("1d", "3d", *GRID_AXES):
        return [f"--tp-mode {mode!r} is unknown; choose 1d, 2d, 2.5d or 3d"]
    out = []
    if cfg.tp_remat and mode == "1d":
        out.append("--tp-remat keeps SUMMA blocks instead of panels: it needs --tp-mode 2d or 2.5d")
    if cfg.tp_remat and mode == "3d":
        out.append("--tp-remat keeps SUMMA blocks instead of panels: it needs --tp-mode 2d or 2.5d, not 3d")
    if cfg.tp_depth != 1 and mode != "2.5d":
        out.append(f"--tp-depth {cfg.tp_depth} is the depth of --tp-mode 2.5d; add --tp-mode 2.5d or drop the flag")
    if mode in ("1d", "3d"):  # 3d's own checks: colofn.train.tp3d.failures
        return out
    if "tp" not in m:
        out.append(f"--tp-mode {mode} splits the tp axis into a grid: add tp=N to --mesh")
    elif _side(cfg) is None:
        n = m["tp"]
        if mode == "2d":
            near = [q * q for q in (math.isqrt(n), math.isqrt(n) + 1) if q >= 2]
            out.append(f"--tp-mode 2d needs tp = q * q (a square grid), but tp={n}; use tp={' or tp='.join(map(str, near))}")
        elif cfg.tp_depth < 1:
            out.append(f"--tp-depth must be an integer >= 1, got {cfg.tp_depth}")
        else:
            d = cfg.tp_depth
            out.append(f"--tp-mode 2.5d needs tp = q * q * depth, but tp={n} with --tp-depth {d} is not; "
                       f"use tp={4 * d} (q=2) or tp={9 * d} (q=3), or another --tp-depth")
    for bad, what in (
        (cfg.pp > 1, "pp (pipeline stages)"),
        (cfg.zero is not None, "--zero"),
        (cfg.sp != "none", f"--sp {cfg.sp}"),
        (bool(cfg.experts) or "ep" in m, "--experts / ep"),
        (cfg.hf is not None, "--hf"),
    ):
        if bad:
            out.append(f"--tp-mode {mode} does not compose with {what} in this release; use --tp-mode 1d, or drop it")
    return out


def rematerializing(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` (a ``value_and_grad``) run under :func:`colofn.parallel.tp2d.rematerialize` (``--tp-remat``)."""
    from colofn.parallel import tp2d

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with tp2d.rematerialize():
            return step(*args, **kwargs)

    return wrapped
