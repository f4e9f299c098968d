"""3D tensor parallelism (Bian et al. 2021, arXiv:2105.14450) for ``colofn.models.gpt``.

A plan with ``tp_mode="3d"`` and ``tp_grid=(input, weight, output)`` splits
every weight and the activations over the three mesh axes:

* :mod:`~colofn.parallel.tp3d.grid`: the axes, the layout as specs, the checks;
* :mod:`~colofn.parallel.tp3d.matmul`: the 3D product and the split LayerNorm;
* :mod:`~colofn.parallel.tp3d.model`: the GPT's pieces and its loss, per device;
* :mod:`~colofn.parallel.tp3d.volume`: bytes sent per layer and memory per rank, by formula.

``colofn.parallel`` dispatches on ``plan.tp_mode``: :func:`~colofn.parallel.make_loss`,
:func:`~colofn.parallel.param_specs` and :func:`~colofn.parallel.shard_params` take a 3D plan.
"""

from colofn.parallel.tp3d import volume
from colofn.parallel.tp3d.grid import (
    Grid,
    batch_failures,
    batch_specs,
    grid,
    mesh_failures,
    plan_failures,
    rules,
)
from colofn.parallel.tp3d.matmul import matmul, norm
from colofn.parallel.tp3d.model import local_loss

__all__ = [
    "Grid",
    "batch_failures",
    "batch_specs",
    "grid",
    "local_loss",
    "matmul",
    "mesh_failures",
    "norm",
    "plan_failures",
    "rules",
    "volume",
]
