"""Parallel strategies for ``colofn.models.gpt``, composed on one mesh by a :class:`Plan`.

* :mod:`~colofn.parallel.plan`: :class:`Plan` (which axis does what) and its checks.
* :mod:`~colofn.parallel.specs`: parameter and batch specs as data (path pattern -> ``P``).
* :mod:`~colofn.parallel.tp`: Megatron tensor parallelism (regions, vocabulary-parallel embedding and loss).
* :mod:`~colofn.parallel.tp2d`: 2D (Optimus) and 2.5D (Tesseract) tensor parallelism on a grid of mesh axes.
* :mod:`~colofn.parallel.sp`: sequence parallelism (Megatron-SP, DeepSpeed-Ulysses, ring attention).
* :mod:`~colofn.parallel.ep`: expert parallelism (whole-batch routing, all-to-all dispatch and combine).
* :mod:`~colofn.parallel.tp3d`: 3D tensor parallelism (Bian et al. 2021), for ``Plan(tp_mode="3d")``.
* :mod:`~colofn.parallel.gpt`: the per-device model under a plan, :func:`make_loss` and :func:`shard_params`.
* :mod:`~colofn.parallel.data_axes`: the axes ZeRO shards over under a plan, and the loss it differentiates.

``docs/strategies.md`` is the guide: what each strategy shards and
communicates, and when to pick it.
"""

from colofn.parallel import ep, sp, tp, tp2d, tp3d
from colofn.parallel.data_axes import zero_axes, zero_loss_plan
from colofn.parallel.gpt import (
    block,
    embed,
    head_sums,
    layers_forward,
    local_loss,
    make_local_value_and_grad,
    make_loss,
    make_value_and_grad,
    relayout,
    shard_params,
    stage_forward,
)
from colofn.parallel.plan import SP, Plan, PlanError, check_batch, check_plan
from colofn.parallel.specs import (
    batch_specs,
    layer_specs,
    param_specs,
    rules,
    spec_for,
    stage_slice,
)

__all__ = [
    "SP",
    "Plan",
    "PlanError",
    "batch_specs",
    "block",
    "check_batch",
    "check_plan",
    "embed",
    "ep",
    "head_sums",
    "layer_specs",
    "layers_forward",
    "local_loss",
    "make_local_value_and_grad",
    "make_loss",
    "make_value_and_grad",
    "param_specs",
    "relayout",
    "rules",
    "shard_params",
    "sp",
    "spec_for",
    "stage_forward",
    "stage_slice",
    "tp",
    "tp2d",
    "tp3d",
    "zero_axes",
    "zero_loss_plan",
]
