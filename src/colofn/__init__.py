"""colofn: JAX-style functional parallelism on PyTorch.

Write a model once as a pure function over a parameter pytree, say with
``PartitionSpec``s on a named ``Mesh`` where every tensor lives, and run it on
simulated devices (threads) or on a real ``torch.distributed`` job.

The subpackages ``models``, ``optim``, ``parallel``, ``pipeline``, ``testing``
and ``zero`` are attributes of ``colofn`` imported on first use (PEP 562), as
``jax.sharding`` is after ``import jax``: ``import colofn`` stays light.

>>> import colofn
>>> colofn.optim.sgd(0.1).__class__.__name__
'GradientTransformation'
"""

import importlib
from typing import TYPE_CHECKING, Any

from colofn import checkpoint, errors, random, tree
from colofn.collectives import (
    all_gather,
    all_to_all,
    axis_index,
    axis_size,
    pbroadcast,
    pmax,
    pmean,
    pmin,
    ppermute,
    psum,
    psum_scatter,
    pvary,
)
from colofn.jit import Jitted, jit, with_sharding_constraint
from colofn.mesh import Mesh, current_mesh
from colofn.partition_spec import P, PartitionSpec
from colofn.shard_map import per_device, shard_map
from colofn.sharding import NamedSharding, device_put, gather, sharding_of
from colofn.tracing import CommRecord, comm_trace
from colofn.world import initialize, launch, process_count, process_index

if TYPE_CHECKING:
    from colofn import models, optim, parallel, pipeline, testing, zero

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("models", "nn", "optim", "parallel", "pipeline", "plan", "testing", "zero")
"""Subpackages imported on first attribute access (:func:`__getattr__`)."""

__all__ = [
    "Jitted",
    "checkpoint",
    "jit",
    "with_sharding_constraint",
    "all_gather",
    "all_to_all",
    "axis_index",
    "axis_size",
    "CommRecord",
    "comm_trace",
    "pbroadcast",
    "pmax",
    "pmean",
    "pmin",
    "ppermute",
    "psum",
    "psum_scatter",
    "pvary",
    "per_device",
    "shard_map",
    "Mesh",
    "NamedSharding",
    "P",
    "PartitionSpec",
    "current_mesh",
    "device_put",
    "errors",
    "gather",
    "initialize",
    "launch",
    "process_count",
    "process_index",
    "random",
    "sharding_of",
    "tree",
    "zero",
    "models",
    "nn",
    "optim",
    "parallel",
    "pipeline",
    "plan",
    "testing",
]


def __getattr__(name: str) -> Any:
    """Import a subpackage on first access: ``colofn.pipeline`` after only ``import colofn``."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"colofn.{name}")  # sets the attribute: later lookups skip this
    raise AttributeError(f"module 'colofn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
