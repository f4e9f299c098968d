"""shard_map's gradient buckets: launched during the backward, summed exactly as one device.

``GradBucket`` stashes the dp gradient sums of ``shard_map``'s arguments in
flat buckets and starts each bucket's all-reduce asynchronously as soon as it
is full, while autograd goes on with earlier layers. These tests prove, by the
order of events (never by time), that the first bucket is on the wire before
the backward reaches the first layer, and that the gradients equal the
single-device ones for any bucket sizes.
"""

from __future__ import annotations

from unittest import mock

import torch
from hypothesis import given
from hypothesis import strategies as st

import colofn
from colofn import P, _dist_comm
from colofn import tree as jt

F32, F64 = torch.float32, torch.float64


def layers(n: int, width: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(width, width, generator=g, dtype=dtype) / width**0.5 for i in range(n)}


def mlp(p: dict[str, torch.Tensor], x: torch.Tensor, on_first: object = None) -> torch.Tensor:
    h = x
    for i in range(len(p)):
        h = torch.tanh(h @ p[f"w{i}"])
        if i == 0 and on_first is not None:
            h.register_hook(on_first)  # fires when dL/dh0 is computed: before w0's gradient can be
    return h.pow(2).mean()


def test_first_bucket_launches_before_the_backward_reaches_the_first_layer():
    """Six 256 x 256 fp32 layers (256 KiB of gradient each) at the default caps: the last four layers'
    gradients fill the 1 MiB first bucket, whose all-reduce is recorded before the gradient of the first
    layer's output exists; the rest go in one more bucket after the backward."""
    n, width = 6, 256
    params = layers(n, width, F32, seed=0)
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(1))

    def program():
        mesh = colofn.Mesh((2,), ("dp",))
        f = colofn.shard_map(lambda p, x: colofn.pmean(mlp(p, x, on_first), "dp"), mesh=mesh, in_specs=(P(), P("dp")), out_specs=P())
        p = jt.map(lambda t: t.clone().requires_grad_(), params)
        seen: list[int] = []

        def on_first(g: torch.Tensor) -> None:
            seen.append(sum(r.op == "all_reduce" and r.phase == "backward" for r in rec))

        with colofn.comm_trace() as rec:
            f(p, x).to_local().backward()
        sizes = [r.shape for r in rec if r.phase == "backward"]
        return seen, sizes, {k: v.grad for k, v in p.items()}

    p = jt.map(lambda t: t.clone().requires_grad_(), params)
    mlp(p, x).backward()
    block = width * width
    for seen, sizes, grads in colofn.launch(program, world_size=2):
        assert seen == [1]  # one bucket was on the wire when the backward got to layer 0
        assert sizes == [(4 * block,), (2 * block,)]  # w5..w2 (1 MiB), then w1, w0
        for k in params:
            torch.testing.assert_close(grads[k], p[k].grad, rtol=1e-5, atol=1e-6)


@given(
    n=st.integers(1, 5),
    width=st.integers(1, 5),
    first_cap=st.integers(1, 400),
    cap=st.integers(1, 800),
    two_axes=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_buckets_of_any_size_give_the_single_device_gradients(n, width, first_cap, cap, two_axes, seed):
    """Any caps (one gradient per bucket up to one bucket for all), on dp alone or on dp x tp with a
    second input split over both axes (w0 then gets gradient sums over dp from the MLP and over
    (dp, tp) from the second term: two groups filling apart): every rank's gradients equal one
    device's, and every stashed element goes over the wire exactly once."""
    params = layers(n, width, F64, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x, z = torch.randn(8, width, generator=g, dtype=F64), torch.randn(8, width, generator=g, dtype=F64)

    def program():
        mesh = colofn.Mesh((2, 2), ("dp", "tp")) if two_axes else colofn.Mesh((4,), ("dp",))
        z_axes = ("dp", "tp") if two_axes else "dp"

        def body(p, x, z):
            return colofn.pmean(mlp(p, x), "dp") + colofn.pmean(torch.tanh(z @ p["w0"]).mean(), z_axes)

        f = colofn.shard_map(body, mesh=mesh, in_specs=(P(), P("dp"), P(z_axes)), out_specs=P())
        p = jt.map(lambda t: t.clone().requires_grad_(), params)
        with colofn.comm_trace() as rec:
            f(p, x, z).to_local().backward()
        summed = sum(r.shape[0] for r in rec if r.phase == "backward" and r.op == "all_reduce")
        return summed, {k: v.grad for k, v in p.items()}

    p = jt.map(lambda t: t.clone().requires_grad_(), params)
    (mlp(p, x) + torch.tanh(z @ p["w0"]).mean()).backward()
    # patched around the launch, never inside the ranks: threads restoring a shared attribute race
    with mock.patch.object(_dist_comm, "FIRST_BUCKET_BYTES", first_cap), mock.patch.object(_dist_comm, "BUCKET_BYTES", cap):
        results = colofn.launch(program, world_size=4)
    for summed, grads in results:
        # one sum per (argument, axes): the tracking pvarys a value once per axes, however often it is used
        assert summed == sum(t.numel() for t in params.values()) + (params["w0"].numel() if two_axes else 0)
        for k in params:
            torch.testing.assert_close(grads[k], p[k].grad, rtol=1e-9, atol=1e-11)


def test_the_caps_are_ddps_after_the_property_test():
    """The property test's patched caps never outlive it (they are module attributes the ranks share)."""
    assert (_dist_comm.FIRST_BUCKET_BYTES, _dist_comm.BUCKET_BYTES) == (1 << 20, 25 << 20)
