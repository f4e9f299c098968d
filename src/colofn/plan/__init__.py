"""``colofn plan``: predict the memory, communication and step time of a composition, and pick one.

Inputs are data (:class:`ModelShape`, :class:`Cluster`, :class:`Candidate`);
predictions are pure functions. See ``docs/plan.md``.

>>> from colofn import plan
>>> ranked, refused = plan.search(plan.model("gpt2-124m"), plan.cluster("cpu-local"), devices=8, global_batch=8)
>>> str(ranked[0].candidate)
'dp=8'
"""

from __future__ import annotations

from colofn.plan._candidate import Candidate, check
from colofn.plan._cluster import CLUSTERS, Cluster, cluster
from colofn.plan._comm import Collective, step_collectives
from colofn.plan._file import plan_json, plan_train, read_plan
from colofn.plan._measure import saved_activation_bytes, step_bytes, trainer_step_bytes
from colofn.plan._memory import (
    FP32_ADAM,
    MIXED_ADAM,
    Precision,
    activation_bytes_per_layer,
    colofn_activation_bytes_per_layer,
    device_params,
    model_state_bytes,
)
from colofn.plan._model import MODELS, ModelShape, from_gpt, model
from colofn.plan._ops import OP_COUNTS, count_ops, count_step_ops, step_ops
from colofn.plan._predict import Prediction, link, pipeline_shape, predict
from colofn.plan._search import candidates, search

__all__ = [
    "CLUSTERS", "FP32_ADAM", "MIXED_ADAM", "MODELS", "OP_COUNTS", "Candidate", "Cluster", "Collective", "ModelShape",
    "Precision", "Prediction", "activation_bytes_per_layer", "candidates", "colofn_activation_bytes_per_layer", "check", "cluster", "count_ops", "count_step_ops", "device_params",
    "from_gpt", "link", "model", "model_state_bytes", "pipeline_shape", "plan_json", "plan_train", "predict", "read_plan",
    "saved_activation_bytes", "search", "step_bytes", "step_collectives", "step_ops", "trainer_step_bytes",
]
