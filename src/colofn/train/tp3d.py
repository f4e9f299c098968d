"""``colofn train --tp-mode 3d``: the tp axis of ``--mesh`` factored into a cube, and what 3D refuses.

``--mesh dp=2,tp=8 --tp-mode 3d`` runs on the mesh
``dp=2, tp_in=2, tp_w=2, tp_out=2``: the grid (input, weight, output) of
:mod:`colofn.parallel.tp3d` in place of ``tp``.

>>> device_mesh_shape({"dp": 2, "tp": 8}, "3d")
{'dp': 2, 'tp_in': 2, 'tp_w': 2, 'tp_out': 2}
>>> failures({"tp": 4}, "3d", zero=None, sp="none", experts=0)
['--tp-mode 3d splits tp over a p x p x p cube, but tp=4 is not a cube: use tp=1 or tp=8 (2^3)']
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["GRID", "cube_side", "device_mesh_shape", "failures"]

GRID = ("tp_in", "tp_w", "tp_out")
"""The mesh axes the tp axis becomes: input, weight, output (Bian et al. 2021)."""


def cube_side(n: int) -> int | None:
    """``p`` with ``p ** 3 == n``, or None."""
    p = round(n ** (1 / 3))
    return next((q for q in (p - 1, p, p + 1) if q > 0 and q**3 == n), None)


def device_mesh_shape(mesh: Mapping[str, int], tp_mode: str) -> dict[str, int]:
    """The mesh the run builds: ``mesh`` itself, or under 3d its ``tp`` axis replaced in place by the cube's three."""
    p = cube_side(mesh.get("tp", 0)) if tp_mode == "3d" else None
    if p is None:
        return dict(mesh)
    out: dict[str, int] = {}
    for name, size in mesh.items():
        out.update(dict.fromkeys(GRID, p) if name == "tp" else {name: size})
    return out


def failures(mesh: Mapping[str, int], tp_mode: str, *, zero: int | None, sp: str, experts: int, hf: bool = False) -> list[str]:
    """Why ``--tp-mode 3d`` cannot run with these flags (nothing for another mode)."""
    if tp_mode != "3d":
        return []
    out = []
    if "tp" not in mesh:
        out.append("--tp-mode 3d splits the tp axis into a cube: add tp=8 (2^3) to --mesh")
    elif cube_side(mesh["tp"]) is None:
        n = mesh["tp"]
        below = max(q for q in range(1, n + 1) if q**3 <= n)
        out.append(
            f"--tp-mode 3d splits tp over a p x p x p cube, but tp={n} is not a cube: "
            f"use tp={below**3} or tp={(below + 1) ** 3} ({below + 1}^3)"
        )
    names = list(mesh)
    if "tp" in mesh and "dp" in mesh and names.index("dp") > names.index("tp"):
        out.append(
            "--tp-mode 3d splits the batch over dp, then the cube's weight and input axes: list dp before tp "
            f"in --mesh (--mesh dp={mesh['dp']},tp={mesh['tp']})"
        )
    for bad, why in (
        ("pp" in mesh, "pp (pipeline stages)"),
        ("sp" in mesh or sp != "none", "--sp"),
        ("ep" in mesh or bool(experts), "--experts / ep"),
        (zero is not None, "--zero"),
        (hf, "--hf (colofn's GPT only)"),
    ):
        if bad:
            out.append(f"--tp-mode 3d composes with dp only in this release: drop {why}")
    return out
