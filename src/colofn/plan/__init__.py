"""``colofn plan``: predict the memory, communication and step time of a composition, and pick one.

Inputs are data (:class:`ModelShape`, :class:`Cluster`, :class:`Candidate`);
predictions are pure functions. See ``docs/plan.md``.
"""

from __future__ import annotations

from colofn.plan._candidate import Candidate
from colofn.plan._cluster import CLUSTERS, Cluster, cluster
from colofn.plan._model import MODELS, ModelShape, from_gpt, model

__all__ = ["CLUSTERS", "MODELS", "Candidate", "Cluster", "ModelShape", "cluster", "from_gpt", "model"]
