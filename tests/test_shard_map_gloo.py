"""shard_map on real processes (gloo, world 4): DP, Megatron TP and a ppermute ring.

One launch runs every program (a launch costs a few seconds); the parent
compares each rank's losses, outputs and gradients with single-device
``torch.autograd.grad``, and the exact communication each rank recorded.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

import colofn
from colofn import P
from colofn import tree as jt

F64 = torch.float64
SPECS = {"w1": P(None, "tp"), "b1": P("tp"), "w2": P("tp", None), "b2": P()}
SHARD = {"w1": (Shard(1),), "b1": (Shard(0),), "w2": (Shard(0),), "b2": (Replicate(),)}  # along tp


def params_and_batch():
    g = torch.Generator().manual_seed(0)
    p = {
        "w1": torch.randn(4, 8, generator=g, dtype=F64),
        "b1": torch.randn(8, generator=g, dtype=F64),
        "w2": torch.randn(8, 4, generator=g, dtype=F64),
        "b2": torch.randn(4, generator=g, dtype=F64),
    }
    return p, torch.randn(8, 4, generator=g, dtype=F64)


def mlp(p, x):
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def tp_mlp(p, x):
    h = torch.tanh(x @ p["w1"] + p["b1"])
    return colofn.psum(h @ p["w2"], "tp") + p["b2"]


def dp_loss(p, x):
    return colofn.pmean((mlp(p, x) ** 2).mean(), "dp")


def tp_loss(p, x):
    return colofn.pmean((tp_mlp(p, x) ** 2).mean(), "dp")


def ring(x):
    n = colofn.axis_size("i")
    return colofn.ppermute(x * 2, "i", [(k, (k + 1) % n) for k in range(n)])


def rank_program(params: dict, x: torch.Tensor) -> dict:
    out = {}
    # data parallel over 4 ranks: params P(), batch P("dp")
    mesh = colofn.Mesh((4,), ("dp",))
    p = jt.map(lambda t: t.clone().requires_grad_(), params)
    with colofn.comm_trace() as rec:
        loss = colofn.shard_map(dp_loss, mesh=mesh, in_specs=(P(), P("dp")), out_specs=P())(p, x)
        grads = torch.autograd.grad(loss.to_local(), jt.leaves(p))
    out["dp"] = (
        loss.to_local().item(),
        grads,
        sorted((r.op, r.axes, r.shape, r.phase) for r in rec),
    )

    # Megatron TP on dp x tp, parameters as DTensors: gradients stay sharded
    mesh = colofn.Mesh((2, 2), ("dp", "tp"))
    p = jt.map(lambda t: t.requires_grad_(), colofn.device_put(params, SPECS, mesh=mesh))
    with colofn.comm_trace() as rec:
        loss = colofn.shard_map(tp_loss, mesh=mesh, in_specs=(SPECS, P("dp")), out_specs=P())(p, x)
    fwd = [(r.op, r.axes, r.shape) for r in rec]
    loss.to_local().backward()
    out["tp"] = (
        loss.to_local().item(),
        {k: (v.grad.placements, v.grad.full_tensor()) for k, v in p.items()},
        fwd,
    )

    # a ppermute ring, differentiated w.r.t. a sharded global input
    mesh = colofn.Mesh((4,), ("i",))
    xr = x.clone().requires_grad_()
    y = colofn.shard_map(ring, mesh=mesh, in_specs=P("i"), out_specs=P("i"))(xr)
    ct = torch.arange(x.numel(), dtype=F64).reshape(x.shape)
    (gx,) = torch.autograd.grad((colofn.gather(y) * ct).sum(), xr)
    out["ring"] = (colofn.gather(y).detach(), gx)
    return out


@pytest.mark.gloo
def test_shard_map_programs_on_gloo_processes():
    params, x = params_and_batch()
    results = colofn.launch(rank_program, params, x, world_size=4, backend="gloo", timeout=120)

    def close(a, b, what):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")

    p = jt.map(lambda t: t.clone().requires_grad_(), params)
    want_loss = (mlp(p, x) ** 2).mean()
    want = dict(zip(p, torch.autograd.grad(want_loss, list(p.values())), strict=True))
    xr = x.clone().requires_grad_()
    want_y = torch.roll(xr * 2, shifts=2, dims=0)  # blocks of 2 rows move one rank on
    want_gx = torch.autograd.grad((want_y * torch.arange(32, dtype=F64).reshape(8, 4)).sum(), xr)[0]

    for rank, out in enumerate(results):
        loss, grads, trace = out["dp"]
        assert abs(loss - want_loss.item()) < 1e-12, rank
        for k, g in zip(sorted(params), grads, strict=True):  # tree leaves come in sorted key order
            close(g, want[k], f"dp grad {k} rank {rank}")
        n_params = sum(v.numel() for v in params.values())  # the gradient sums, coalesced
        assert trace == sorted(
            [("all_reduce", ("dp",), (), "forward"), ("all_reduce", ("dp",), (n_params,), "backward")]
        )

        loss, grads, fwd = out["tp"]
        assert abs(loss - want_loss.item()) < 1e-12, rank
        for k, (placements, g) in grads.items():  # DTensor gradients keep the parameters' sharding
            assert placements == (Replicate(), *SHARD[k]), (k, placements)
            close(g, want[k], f"tp grad {k} rank {rank}")
        # forward: the one Megatron all_reduce over tp (local batch x d_model), then the loss pmean over dp
        assert fwd == [("all_reduce", ("tp",), (4, 4)), ("all_reduce", ("dp",), ())]

        y, gx = out["ring"]
        close(y, want_y.detach(), f"ring y rank {rank}")
        close(gx, want_gx, f"ring grad rank {rank}")
