"""Expert parallelism: routing with whole-batch statistics, all-to-all dispatch and combine."""

from colofn.parallel.ep.experts import expert_parallel, local_experts
from colofn.parallel.ep.layer import moe
from colofn.parallel.ep.routing import route, route_and_count

__all__ = ["expert_parallel", "local_experts", "moe", "route", "route_and_count"]
