"""``colofn demo``: shard a tensor over a 2 x 2 mesh of simulated devices and show where each block lives."""

from __future__ import annotations

import torch

import colofn
from colofn import P


def _rank_program() -> str:
    mesh = colofn.Mesh((2, 2), ("dp", "tp"))
    x = torch.arange(16.0).reshape(4, 4)
    xs = colofn.device_put(x, P("dp", "tp"), mesh=mesh)
    back = colofn.gather(xs)
    r = colofn.process_index()
    coords = {a: mesh.axis_index(a) for a in mesh.axis_names}
    return (
        f"rank {r} {coords}: block {tuple(xs.to_local().shape)} = {xs.to_local().tolist()}"
        + ("" if torch.equal(back, x) else "  GATHER MISMATCH")
    )


def main(devices: int = 4, steps: int = 5) -> int:
    print(f"Simulated world of {devices} devices, mesh dp=2 x tp=2, x = arange(16).reshape(4, 4) placed with P('dp', 'tp'):")
    for line in colofn.launch(_rank_program, world_size=devices):
        print("  " + line)
    return 0
