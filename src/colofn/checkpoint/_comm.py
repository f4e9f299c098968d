"""The few exchanges a checkpoint needs between ranks, as tensors of UTF-8 JSON (no-ops outside a world).

Nothing received is unpickled: every message is JSON data (paths, digests,
outcomes), sent as its length (one int64) and its bytes (uint8). DCP's own
planning still uses torch's object collectives between the ranks of the job.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather", "all_to_rank0", "broadcast", "world"]


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a world."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _device() -> torch.device:
    if dist.get_backend() == "nccl":  # pragma: no cover - needs GPUs
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(obj: Any) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=_device())


def _decode(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.cpu().tolist()).decode("utf-8"))


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` (JSON data) on every rank."""
    rank, size = world()
    if size == 1:
        return obj
    data = _encode(obj) if rank == 0 else torch.empty(0, dtype=torch.uint8, device=_device())
    n = torch.tensor([data.numel()], dtype=torch.int64, device=_device())
    dist.broadcast(n, src=0)
    if rank != 0:
        data = torch.empty(int(n.item()), dtype=torch.uint8, device=_device())
    dist.broadcast(data, src=0)
    return _decode(data)


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (JSON data), in rank order, on every rank."""
    _, size = world()
    if size == 1:
        return [obj]
    data = _encode(obj)
    n = torch.tensor([data.numel()], dtype=torch.int64, device=_device())
    sizes = [torch.empty_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=_device())
    padded[: data.numel()] = data
    out = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(out, padded)
    return [_decode(t[: int(s.item())]) for t, s in zip(out, sizes, strict=True)]


def all_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (JSON data), in rank order, on rank 0 (None elsewhere)."""
    rank, _ = world()
    got = all_gather(obj)
    return got if rank == 0 else None
