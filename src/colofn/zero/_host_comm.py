"""ZeRO's bucket collectives on host process groups (gloo, the simulated world), run in place.

gloo has no reduce-scatter of its own: ``reduce_scatter_tensor`` clones its
input, all-reduces the clone and, when waited on, copies this rank's chunk
out (``ProcessGroupGloo::reduce_scatter_tensor_coalesced``); its
``all_gather_into_tensor`` gathers into a scratch buffer and copies every
chunk out. ZeRO owns the buffers these run on, so it can do the same work
without the copies:

* :func:`start_all_reduce`: ZeRO-1's reduce-scatter of a bucket's full gradient
  is gloo's own all-reduce of it, run on the buffer itself (stage 1 keeps the
  full gradient until the update anyway); this rank's shard is then a view.
* :func:`start_gather`: the all-gather of the updated shards is one in-place
  broadcast per shard, from its owner, into the full buffer (as
  ``ZeroRedundancyOptimizer`` does per parameter), no scratch buffer; for a
  group not in process-group order (else the coalesced all-gather below).
* :func:`start_all_reduce_coalesced`, :func:`start_gather_coalesced`: several
  buckets in one operation. gloo runs each operation as its own algorithm with
  its own rendezvous; with 4 ranks on 2 cores (load average 6), 7 asynchronous
  all-reduces of a GPT's buckets (2 MB) took 30 ms of wall time and 11 ms of
  CPU per rank, one coalesced all-reduce of the same buckets 9.5 ms and 3.5 ms;
  7 all-gathers 19 ms and 7 ms, 28 in-place broadcasts 20 ms and 6 ms, one
  coalesced all-gather 6 ms and 2.4 ms
  (``benchmarks/bench_zero_host_comm.py``).

The same sums (the all-reduce gloo runs for a reduce-scatter; a coalesced one
reassociates floats inside gloo's flat buffer) and the same values;
``comm_trace`` records the collectives they stand for, as before.
Other backends (NCCL's native reduce-scatter and all-gather) keep those.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from colofn._comm import AxisGroup

__all__ = ["in_place", "start_all_reduce", "start_all_reduce_coalesced", "start_gather", "start_gather_coalesced"]

IN_PLACE_BACKENDS = ("gloo", "colofn_sim")
_cache: dict[int, bool] = {}


def in_place(g: AxisGroup) -> bool:
    """Whether ``g``'s collectives run on a host backend whose reduce-scatter is an all-reduce."""
    if g.group is None:
        return False
    hit = _cache.get(id(g.group))
    if hit is None:
        hit = _cache[id(g.group)] = str(dist.get_backend(g.group)) in IN_PLACE_BACKENDS
    return hit


def start_all_reduce(full: torch.Tensor, g: AxisGroup) -> dist.Work:
    """Start summing ``full`` over ``g`` in place; every rank's shard of it is then a view."""
    work = dist.all_reduce(full, group=g.group, async_op=True)
    assert work is not None
    return work


def start_all_reduce_coalesced(fulls: list[torch.Tensor], g: AxisGroup) -> dist.Work:
    """Start summing every tensor of ``fulls`` (one dtype) over ``g`` in place, as one operation.

    gloo runs a separate algorithm, with its own rendezvous, per operation: on a busy
    host a handful of small all-reduces cost several times one of their total size.
    """
    if len(fulls) == 1:
        return start_all_reduce(fulls[0], g)
    assert g.group is not None
    return g.group.allreduce_coalesced(fulls, dist.AllreduceCoalescedOptions())


def start_gather_coalesced(fulls: list[torch.Tensor], shards: list[torch.Tensor], g: AxisGroup) -> dist.Work:
    """Start filling each 1-D ``fulls[i]`` with every rank's ``shards[i]`` (one dtype), as one operation.

    For a group in process-group order (chunk ``k`` from process-group rank ``k``).
    """
    assert g.group is not None and g.identity_order
    return g.group.allgather_into_tensor_coalesced(fulls, shards)


def start_gather(full: torch.Tensor, shard: torch.Tensor, g: AxisGroup) -> list[dist.Work]:
    """Start filling the 1-D ``full`` (chunks by group index) with every rank's ``shard``, in place.

    This rank's chunk ``g.index`` is ``shard`` (copied in unless it already is that view);
    chunk ``k`` comes from group index ``k`` by a broadcast.
    """
    size = shard.numel()
    mine = full.narrow(0, g.index * size, size)
    if not (mine.data_ptr() == shard.data_ptr() and mine.dtype == shard.dtype and mine.device == shard.device):
        mine.copy_(shard)
    works = []
    for k in range(g.size):
        work = dist.broadcast(full.narrow(0, k * size, size), group=g.group, group_src=g.order[k], async_op=True)
        assert work is not None
        works.append(work)
    return works
