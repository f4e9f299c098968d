"""colofn: JAX-style functional parallelism on PyTorch.

Write a model once as a pure function over a parameter pytree, say with
``PartitionSpec``s on a named ``Mesh`` where every tensor lives, and run it on
simulated devices (threads) or on a real ``torch.distributed`` job.
"""

from colofn import checkpoint, errors, random, tree, zero
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

__version__ = "0.1.0"

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
]
