"""colofn.optim on DTensor leaves (a one-process gloo world): same numbers as plain tensors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from colofn import optim
from colofn import tree as ctree

pytest.importorskip("torch.distributed.tensor")
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor  # noqa: E402


@pytest.fixture(scope="module")
def mesh():
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


OPTIMIZERS = [
    lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    lambda: optim.adam(1e-2, weight_decay=0.1),
    lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2)),
]


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_dtensor_leaves_match_plain_tensors(mesh, make):
    gen = torch.Generator().manual_seed(0)
    plain = {
        "w": torch.randn(4, 3, generator=gen),
        "b": torch.randn(3, generator=gen),
        "s": torch.randn(2, generator=gen),
    }
    grads_seq = [ctree.map(lambda p: torch.randn(p.shape, generator=gen), plain) for _ in range(3)]
    placements = {"w": [Shard(0)], "b": [Replicate()]}  # "s" stays a plain tensor

    def dist_(tree):
        return {
            k: distribute_tensor(v, mesh, placements[k]) if k in placements else v
            for k, v in tree.items()
        }

    opt = make()
    p_ref, s_ref = plain, opt.init(plain)
    p_dt, s_dt = dist_(plain), opt.init(dist_(plain))
    buffers = [x for x in ctree.leaves(s_dt) if x.shape == (4, 3)]
    assert buffers and all(isinstance(x, DTensor) and x.placements == (Shard(0),) for x in buffers)
    for grads in grads_seq:
        u, s_ref = opt.update(grads, s_ref, p_ref)
        p_ref = optim.apply_updates(p_ref, u)
        u, s_dt = opt.update(dist_(grads), s_dt, p_dt)
        p_dt = optim.apply_updates(p_dt, u)
    assert isinstance(p_dt["w"], DTensor) and p_dt["w"].placements == (Shard(0),)
    for k in plain:
        got = p_dt[k].full_tensor() if isinstance(p_dt[k], DTensor) else p_dt[k]
        torch.testing.assert_close(got, p_ref[k], rtol=1e-6, atol=1e-7)
