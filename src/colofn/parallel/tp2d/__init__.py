"""2D (Optimus) and 2.5D (Tesseract) tensor parallelism for ``colofn.models.gpt``.

* :mod:`~colofn.parallel.tp2d.summa`: SUMMA products on a ``q x q`` grid of two mesh axes.
* :mod:`~colofn.parallel.tp2d.model`: the GPT's embedding, norms, attention, MLP and loss on grid blocks.
* :mod:`~colofn.parallel.tp2d.remat`: :func:`rematerialize`, blocks instead of panels kept for the backward.
* :mod:`~colofn.parallel.tp2d.checks`: what a plan, mesh and model must satisfy.
* :mod:`~colofn.parallel.tp2d.cost`: the communication and memory per rank, as formulas.

Chosen by ``Plan(tp_mode="2d", tp_grid=(row, col))`` or
``Plan(tp_mode="2.5d", tp_grid=(row, col, depth))``;
:func:`colofn.parallel.make_loss` and friends dispatch on it.
"""

from colofn.parallel.tp2d.model import attention, block, embed, head_sums, mlp, norm, rules
from colofn.parallel.tp2d.remat import rematerialize
from colofn.parallel.tp2d.summa import Grid, matmul, matmul_nt, panel, weight_panel

GRID_MODES = ("2d", "2.5d")
"""The ``Plan.tp_mode`` values this package runs."""

__all__ = [
    "GRID_MODES",
    "Grid",
    "attention",
    "block",
    "embed",
    "head_sums",
    "matmul",
    "matmul_nt",
    "mlp",
    "norm",
    "panel",
    "rematerialize",
    "rules",
    "weight_panel",
]
