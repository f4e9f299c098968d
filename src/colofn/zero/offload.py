"""CPU offload of the optimizer (ZeRO-Offload): master weights, optimizer state and the update live on the host.

With ``offload=True`` every leaf of ``ZeroState.master`` and
``ZeroState.opt_state`` is placed on the CPU, whatever device the mesh computes
on; ``ZeroState.params`` stays on the mesh's device. Each step moves this rank's
gradient shard to the host, runs the optimizer there (in the master dtype) and
moves the updated compute-dtype shard back: per rank ``Ψ/N`` bytes each way
(``Ψ`` in the compute dtype), reported in ``StepInfo.offload_bytes``. On a CUDA
mesh the host tensors are pinned and kept as DTensors on a CPU twin of the
mesh (the default process group needs a CPU backend, e.g.
``init_process_group("cpu:gloo,cuda:nccl")``).

On a CPU-only machine the host *is* the compute device: the mechanism still
runs (explicit per-leaf placement, separate master copy, transfers counted),
and :func:`devices` lets tests check where every leaf lives.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from colofn import tree as jt
from colofn.mesh import Mesh

__all__ = ["HOST", "devices", "storage_mesh", "to_device"]

HOST = torch.device("cpu")


def storage_mesh(mesh: Mesh, device: torch.device) -> DeviceMesh:
    """The DeviceMesh for DTensors whose local tensors live on ``device`` (the mesh's own, or a CPU twin)."""
    if device.type == mesh.device_type:
        return mesh.device_mesh
    cache: dict[str, DeviceMesh] = mesh.__dict__.setdefault("_colofn_zero_twins", {})
    twin = cache.get(device.type)
    if twin is None:
        twin = DeviceMesh(device.type, mesh.device_mesh.mesh, mesh_dim_names=mesh.axis_names)
        cache[device.type] = twin
    return twin


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None, *, copy: bool = False) -> torch.Tensor:
    """``x`` on ``device`` (pinned when it is the host and CUDA is in use) in ``dtype``."""
    out = x.to(device=device, dtype=dtype or x.dtype, non_blocking=True, copy=copy)
    if device.type == "cpu" and x.device.type == "cuda" and not out.is_pinned():
        out = out.pin_memory()
    return out


def devices(tree: Any) -> set[torch.device]:
    """The devices the tensors of ``tree`` live on (DTensors: their local tensors)."""
    out = set()
    for x in jt.leaves(tree):
        if isinstance(x, torch.Tensor):
            local = x.to_local() if hasattr(x, "to_local") else x
            out.add(local.device)
    return out
