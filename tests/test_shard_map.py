"""shard_map programs checked against single-device ``torch.autograd.grad``.

Each test runs a real parallel program (data parallel, Megatron tensor parallel,
sequence parallel, ring ppermute, all_to_all expert routing) on a simulated
world and compares its loss and gradients, on every rank, with the same math
done on one device with plain ``torch.autograd.grad``. Then: the error texts,
the exact communication (``comm_trace``), ``torch.func`` inside ``shard_map``,
and the ``local_map`` gradient bug colofn avoids.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

import colofn
from colofn import P
from colofn import tree as jt
from colofn.errors import ShapeError, SpecError, TreeError

F64 = torch.float64


def close(actual, expected, what=""):
    if isinstance(actual, DTensor):
        actual = actual.full_tensor()
    torch.testing.assert_close(
        actual, expected, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}"
    )


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def grads_of(loss, tree):
    """``torch.autograd.grad`` of ``loss`` w.r.t. every leaf of ``tree``, as a tree."""
    leaves, treedef = jt.flatten(tree)
    return jt.unflatten(treedef, torch.autograd.grad(loss, leaves))


def requiring_grad(tree):
    return jt.map(lambda t: t.detach().clone().requires_grad_(), tree)


def every_rank_equal(results):
    """The per-rank results of ``launch`` are all equal (and returns rank 0's)."""
    for r, v in enumerate(results[1:], 1):
        assert v == results[0], f"rank {r} returned {v}, rank 0 {results[0]}"
    return results[0]


# ----------------------------------------------------------------------------- data parallel

DP = 4


def mlp_params(d_in=3, hidden=4, d_out=2, seed=0):
    return {
        "w1": randn(d_in, hidden, seed=seed),
        "b1": randn(hidden, seed=seed + 1),
        "w2": randn(hidden, d_out, seed=seed + 2),
        "b2": randn(d_out, seed=seed + 3),
    }


def mlp(p, x):
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def local_loss(p, x):
    return (mlp(p, x) ** 2).mean()


def l2(p):
    return 0.05 * sum((v**2).sum() for v in jt.leaves(p))


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("with_l2", [False, True])
def test_data_parallel_grads_equal_single_device(check_vma, with_l2):
    params, x = mlp_params(), randn(8, 3, seed=9)
    p_ref = requiring_grad(params)
    loss_ref = local_loss(p_ref, x) + (l2(p_ref) if with_l2 else 0)
    want = grads_of(loss_ref, p_ref)

    def program():
        mesh = colofn.Mesh((DP,), ("dp",))

        @colofn.shard_map(mesh=mesh, in_specs=(P(), P("dp")), out_specs=P(), check_vma=check_vma)
        def step(p, x):
            loss = colofn.pmean(local_loss(p, x), "dp")
            # replicated math after the pmean: its gradient must not be multiplied by DP
            return loss + l2(p) if with_l2 else loss

        p = requiring_grad(params)
        loss = step(p, x)
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
        close(loss.to_local(), loss_ref.detach(), "loss")
        got = grads_of(loss.to_local(), p)
        for k in params:
            close(got[k], want[k], f"grad {k}")
        return True

    assert all(colofn.launch(program, world_size=DP))


def test_data_parallel_batch_gradient_is_full_global_gradient_on_every_rank():
    params, x = mlp_params(), randn(8, 3, seed=4)
    xr = x.clone().requires_grad_()
    want = torch.autograd.grad(local_loss(params, xr), xr)[0]

    def program():
        mesh = colofn.Mesh((DP,), ("dp",))
        step = colofn.shard_map(
            lambda p, x: colofn.pmean(local_loss(p, x), "dp"),
            mesh=mesh,
            in_specs=(P(), P("dp")),
            out_specs=P(),
        )
        xg = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(step(params, xg).to_local(), xg)
        assert not isinstance(g, DTensor) and g.shape == x.shape
        close(g, want, "grad x")
        return True

    assert all(colofn.launch(program, world_size=DP))


def test_dtensor_arguments_get_dtensor_gradients_with_their_sharding():
    params, x = mlp_params(hidden=4), randn(8, 3, seed=5)
    p_ref = requiring_grad(params)
    want = grads_of(local_loss(p_ref, x), p_ref)

    def program():
        mesh = colofn.Mesh((2, 2), ("dp", "tp"))
        specs = {"w1": P(None, "tp"), "b1": P("tp"), "w2": P("tp", None), "b2": P()}

        def tp_loss(p, x):
            h = torch.tanh(x @ p["w1"] + p["b1"])
            y = colofn.psum(h @ p["w2"], "tp") + p["b2"]
            return colofn.pmean((y**2).mean(), "dp")

        step = colofn.shard_map(tp_loss, mesh=mesh, in_specs=(specs, P("dp")), out_specs=P())
        p = jt.map(lambda t: t.requires_grad_(), colofn.device_put(params, specs, mesh=mesh))
        # w2 arrives replicated although its spec shards it: shard_map redistributes it,
        # and its gradient comes back in the argument's own (replicated) form
        p["w2"] = colofn.device_put(params["w2"], P(), mesh=mesh).requires_grad_()
        step(p, x).to_local().backward()
        for k in params:
            g = p[k].grad
            assert isinstance(g, DTensor), k
            assert g.placements == p[k].placements, (k, g.placements, p[k].placements)
            close(g, want[k], f"grad {k}")
        return {k: p[k].grad.placements for k in params}

    R = Replicate()
    assert every_rank_equal(colofn.launch(program, world_size=4)) == {
        "w1": (R, Shard(1)),
        "b1": (R, Shard(0)),
        "w2": (R, R),  # as passed, not as its spec P("tp", None) says
        "b2": (R, R),
    }


def test_closure_captured_weight_is_invariant_and_its_gradient_summed_once():
    w, x = randn(3, 2, seed=1), randn(8, 3, seed=2)
    wr = w.clone().requires_grad_()
    want = torch.autograd.grad(((x @ wr) ** 2).sum() + (wr**3).sum(), wr)[0]

    def program():
        mesh = colofn.Mesh((DP,), ("dp",))
        wc = w.clone().requires_grad_()
        # wc is used with per-shard data (pvary'd: summed over dp) and alone (not summed)
        f = colofn.shard_map(
            lambda x: colofn.psum(((x @ wc) ** 2).sum(), "dp") + (wc**3).sum(),
            mesh=mesh,
            in_specs=P("dp"),
            out_specs=P(),
        )
        (g,) = torch.autograd.grad(f(x).to_local(), wc)
        close(g, want, "grad of the captured weight")
        return True

    assert all(colofn.launch(program, world_size=DP))


# ----------------------------------------------------------------------------- tensor parallel


def test_megatron_tensor_parallel_mlp_on_dp_x_tp():
    params, x = mlp_params(d_in=4, hidden=8, d_out=4, seed=3), randn(8, 4, seed=7)
    p_ref = requiring_grad(params)
    xr = x.clone().requires_grad_()
    y_ref = mlp(p_ref, xr)
    loss_ref = (y_ref**2).mean()
    want = grads_of(loss_ref, (p_ref, xr))

    def program():
        mesh = colofn.Mesh((2, 2), ("dp", "tp"))
        specs = {"w1": P(None, "tp"), "b1": P("tp"), "w2": P("tp", None), "b2": P()}

        def tp_mlp(p, x):  # column-parallel w1, row-parallel w2: one psum over tp
            h = torch.tanh(x @ p["w1"] + p["b1"])
            return colofn.psum(h @ p["w2"], "tp") + p["b2"]

        def step(p, x):
            y = tp_mlp(p, x)
            return colofn.pmean((y**2).mean(), "dp"), y

        f = colofn.shard_map(step, mesh=mesh, in_specs=(specs, P("dp")), out_specs=(P(), P("dp")))
        p, xg = requiring_grad(params), x.clone().requires_grad_()
        loss, y = f(p, xg)
        assert y.placements == (Shard(0), Replicate())
        close(y, y_ref.detach(), "y")
        close(loss.to_local(), loss_ref.detach(), "loss")
        got = grads_of(loss.to_local(), (p, xg))
        jt.map_with_path(lambda path, a, b: close(a, b, f"grad {jt.keystr(path)}"), got, want)
        return True

    assert all(colofn.launch(program, world_size=4))


def test_sequence_parallel_all_gather_and_psum_scatter():
    """Megatron-SP: activations sharded on the sequence; all_gather in, psum_scatter out."""
    params, x = mlp_params(d_in=4, hidden=6, d_out=4, seed=11), randn(8, 4, seed=12)
    p_ref = requiring_grad(params)
    xr = x.clone().requires_grad_()
    y_ref = mlp(p_ref, xr)
    want = grads_of((y_ref * randn(8, 4, seed=13)).sum(), (p_ref, xr))
    ct = randn(8, 4, seed=13)

    def program():
        mesh = colofn.Mesh((2,), ("tp",))
        specs = {"w1": P(None, "tp"), "b1": P("tp"), "w2": P("tp", None), "b2": P()}

        def sp_mlp(p, x):  # x: (S/tp, D) -> (S/tp, D)
            full = colofn.all_gather(x, "tp", axis_dim=0, tiled=True)  # (S, D), "g" of Megatron-SP
            h = torch.tanh(full @ p["w1"] + p["b1"])  # (S, H/tp)
            y = colofn.psum_scatter(h @ p["w2"], "tp", scatter_dimension=0, tiled=True)  # (S/tp, D)
            return y + p["b2"]

        f = colofn.shard_map(sp_mlp, mesh=mesh, in_specs=(specs, P("tp")), out_specs=P("tp"))
        p, xg = requiring_grad(params), x.clone().requires_grad_()
        with colofn.comm_trace() as rec:
            y = f(p, xg)
            got = grads_of((y.to_local() * ct.chunk(2)[mesh.axis_index("tp")]).sum(), (p, xg))
        close(y, y_ref.detach(), "y")  # outside the trace: full_tensor() all-gathers (DTensor's, recorded)
        jt.map_with_path(lambda path, a, b: close(a, b, f"grad {jt.keystr(path)}"), got, want)
        return [(r.op, r.axes, r.shape, r.phase) for r in rec]

    trace = every_rank_equal(colofn.launch(program, world_size=2))
    assert trace[:2] == [
        ("all_gather", ("tp",), (4, 4), "forward"),
        ("reduce_scatter", ("tp",), (8, 4), "forward"),
    ]
    # backward: the transposes (all_gather of dy, psum_scatter of dx_full), then b2's pvary over tp and
    # the gathers that give global-tensor arguments their full gradients on every rank
    assert Counter(trace[2:]) == Counter(
        [
            ("all_gather", ("tp",), (4, 4), "backward"),  # dy -> d(h @ w2)
            ("reduce_scatter", ("tp",), (8, 4), "backward"),  # d(full) -> dx
            ("all_reduce", ("tp",), (4,), "backward"),  # b2 met varying data: its pvary's psum
            ("all_gather", ("tp",), (4, 3), "backward"),  # w1 grad, full on every rank
            ("all_gather", ("tp",), (3,), "backward"),  # b1
            ("all_gather", ("tp",), (3, 4), "backward"),  # w2
            ("all_gather", ("tp",), (4, 4), "backward"),  # x
        ]
    )


# ----------------------------------------------------------------------------- ppermute and all_to_all


@pytest.mark.parametrize("kind", ["shift", "reverse"])
def test_ppermute_ring(kind):
    n, x, w = 4, randn(8, 3, seed=21), randn(3, seed=22)
    perm = (
        [(i, (i + 1) % n) for i in range(n)]
        if kind == "shift"
        else [(i, n - 1 - i) for i in range(n)]
    )
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    blocks = list((xr * wr).chunk(n))
    y_ref = torch.cat(blocks[-1:] + blocks[:-1]) if kind == "shift" else torch.cat(blocks[::-1])
    ct = randn(8, 3, seed=23)
    want = torch.autograd.grad((y_ref * ct).sum(), (xr, wr))

    def program():
        mesh = colofn.Mesh((n,), ("i",))
        f = colofn.shard_map(
            lambda x, w: colofn.ppermute(x * w, "i", perm),
            mesh=mesh,
            in_specs=(P("i"), P()),
            out_specs=P("i"),
        )
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with colofn.comm_trace() as rec:
            y = f(xg, wg)
        close(y, y_ref.detach(), "y")
        gx, gw = torch.autograd.grad(colofn.gather(y).mul(ct).sum(), (xg, wg))
        close(gx, want[0], "grad x")
        close(gw, want[1], "grad w")
        me = mesh.axis_index("i")
        dst, src = dict(perm)[me], {d: s for s, d in perm}[me]
        sends = [(r.op, r.peer, r.bytes_sent, r.bytes_received) for r in rec]
        assert sends == [("send", dst, 2 * 3 * 8, 0), ("recv", src, 0, 2 * 3 * 8)], sends
        return True

    assert all(colofn.launch(program, world_size=n))


def test_all_to_all_expert_routing():
    """Top-1 mixture of experts: tokens go to their expert's rank by all_to_all and come back."""
    n, t, d = 4, 3, 4  # experts = ranks, tokens per rank, model dim
    x, wg, experts = randn(n * t, d, seed=31), randn(d, n, seed=32), randn(n, d, d, seed=33)
    xr, wgr, er = (v.clone().requires_grad_() for v in (x, wg, experts))
    logits = xr @ wgr
    assign = logits.argmax(-1)
    score = logits.softmax(-1).gather(1, assign[:, None])
    y_ref = torch.relu(torch.einsum("td,tde->te", xr, er[assign])) * score
    ct = randn(n * t, d, seed=34)
    want = torch.autograd.grad((y_ref * ct).sum(), (xr, wgr, er))

    def moe(
        x, wg, w
    ):  # x (t, d) this rank's tokens; wg (d, n) replicated gate; w (1, d, d) my expert
        logits = x @ wg
        assign = logits.argmax(-1)
        score = logits.softmax(-1).gather(1, assign[:, None])
        onehot = torch.nn.functional.one_hot(assign, n).to(x.dtype)  # (t, n)
        buckets = (
            onehot.T[:, :, None] * x[None]
        )  # (n, t, d): bucket e holds the tokens for expert e
        recv = colofn.all_to_all(
            buckets, "ep", 0, 0, tiled=True
        )  # (n, t, d): from each source rank
        out = torch.relu(recv @ w[0])
        back = colofn.all_to_all(out, "ep", 0, 0, tiled=True)  # (n, t, d): from each expert
        return back.sum(0) * score  # tokens not routed to an expert got zeros from it

    def program():
        mesh = colofn.Mesh((n,), ("ep",))
        f = colofn.shard_map(moe, mesh=mesh, in_specs=(P("ep"), P(), P("ep")), out_specs=P("ep"))
        args = [v.clone().requires_grad_() for v in (x, wg, experts)]
        with colofn.comm_trace() as rec:
            y = f(*args)
        close(y, y_ref.detach(), "y")
        got = torch.autograd.grad((colofn.gather(y) * ct).sum(), args)
        for name, a, b in zip(("x", "gate", "experts"), got, want, strict=True):
            close(a, b, f"grad {name}")
        return [(r.op, r.shape, r.bytes_sent) for r in rec]

    nbytes = n * t * d * 8
    assert every_rank_equal(colofn.launch(program, world_size=n)) == [
        ("all_to_all", (n, t, d), (n - 1) * nbytes // n),
        ("all_to_all", (n, t, d), (n - 1) * nbytes // n),
    ]


# ----------------------------------------------------------------------------- comm_trace


def trace_of(rec):
    return Counter((r.op, r.axes, r.shape, r.phase) for r in rec)


def test_comm_trace_data_parallel_step():
    """One all_reduce of the loss forward; backward, every parameter gradient's sum over dp in
    one coalesced all_reduce (the arguments' pvary transposes are bucketed), the same bytes."""
    params, x = mlp_params(), randn(8, 3, seed=9)

    def program():
        mesh = colofn.Mesh((DP,), ("dp",))

        def tied(p, x):  # w1 used twice with per-shard data: still one all_reduce for its gradient
            h = torch.tanh(x @ p["w1"] + p["b1"])
            return colofn.pmean((h @ p["w2"] + p["b2"]).pow(2).mean() + (x @ p["w1"]).mean(), "dp")

        step = colofn.shard_map(tied, mesh=mesh, in_specs=(P(), P("dp")), out_specs=P())
        p = requiring_grad(params)
        with colofn.comm_trace() as rec:
            step(p, x).to_local().backward()
        return sorted((r.op, r.axes, r.shape, r.phase, r.bytes_sent) for r in rec)

    f = 8  # bytes per float64

    def ar(shape):  # ring all_reduce: 2 (n-1)/n of the bytes
        return 2 * (DP - 1) * math.prod(shape) * f // DP

    n_params = sum(v.numel() for v in params.values())
    assert every_rank_equal(colofn.launch(program, world_size=DP)) == sorted(
        [("all_reduce", ("dp",), (), "forward", ar(())), ("all_reduce", ("dp",), (n_params,), "backward", ar((n_params,)))]
    )


def test_comm_trace_megatron_layer():
    """Forward: exactly one all_reduce over tp of batch x d_model. Backward with DTensor parameters:
    the DP gradient sums (one coalesced all_reduce), plus Megatron's "f" all_reduce over tp for
    the input gradient."""
    params, x = mlp_params(d_in=4, hidden=8, d_out=4, seed=3), randn(8, 4, seed=7)

    def program():
        mesh = colofn.Mesh((2, 2), ("dp", "tp"))
        specs = {"w1": P(None, "tp"), "b1": P("tp"), "w2": P("tp", None), "b2": P()}

        def layer(p, x):
            h = torch.tanh(x @ p["w1"] + p["b1"])
            return colofn.psum(h @ p["w2"], "tp") + p["b2"]

        f = colofn.shard_map(layer, mesh=mesh, in_specs=(specs, P("dp")), out_specs=P("dp"))
        p = jt.map(lambda t: t.requires_grad_(), colofn.device_put(params, specs, mesh=mesh))
        xd = colofn.device_put(x, P("dp"), mesh=mesh).requires_grad_()
        with colofn.comm_trace() as fwd:
            y = f(p, xd)
        with colofn.comm_trace() as bwd:
            y.to_local().pow(2).sum().backward()
        assert isinstance(xd.grad, DTensor) and xd.grad.placements == xd.placements
        return [(r.op, r.axes, r.shape, r.bytes_sent) for r in fwd], sorted(trace_of(bwd).items())

    fwd, bwd = every_rank_equal(colofn.launch(program, world_size=4))
    assert fwd == [
        ("all_reduce", ("tp",), (4, 4), 4 * 4 * 8)
    ]  # (batch/dp, d_model), 2(n-1)/n B with n=2
    assert bwd == sorted(
        {
            # the parameters' sums over dp, coalesced: w1 (4, 4) + w2 (4, 4) + b1 (4,) + b2 (4,) blocks
            ("all_reduce", ("dp",), (40,), "backward"): 1,
            # dx (4, 4): Megatron's f (identity forward, all_reduce over tp backward)
            ("all_reduce", ("tp",), (16,), "backward"): 1,
        }.items()
    )


def test_comm_trace_psum_scatter_and_all_gather_volumes():
    def program():
        mesh = colofn.Mesh((4,), ("i",))
        x = torch.ones(8, 6)

        def f(x):  # x: (2, 6) per rank
            big = torch.cat([x] * 4)  # (8, 6)
            rs = colofn.psum_scatter(big, "i", scatter_dimension=0, tiled=True)  # (2, 6)
            return colofn.all_gather(rs, "i", axis_dim=0, tiled=True)

        with colofn.comm_trace() as rec:
            colofn.shard_map(f, mesh=mesh, in_specs=P("i"), out_specs=P("i"))(x)
        return [(r.op, r.shape, r.bytes_sent, r.bytes_received) for r in rec]

    b = 8 * 6 * 4  # bytes of the (8, 6) float32 operand
    assert every_rank_equal(colofn.launch(program, world_size=4)) == [
        ("reduce_scatter", (8, 6), 3 * b // 4, 3 * b // 4),  # sends N (n-1)/n, keeps N/n
        ("all_gather", (2, 6), 3 * b // 4, 3 * b // 4),
    ]


# ----------------------------------------------------------------------------- torch.func


def test_torch_func_grad_and_vjp_inside_shard_map():
    w, x = randn(3, 2, seed=41), randn(8, 3, seed=42)
    wr, xr = w.clone().requires_grad_(), x.clone().requires_grad_()
    loss_ref = ((xr @ wr) ** 2).mean()
    gw_ref, gx_ref = torch.autograd.grad(loss_ref, (wr, xr))
    y_ref = xr.reshape(DP, 2, 3).sum(0) @ wr  # psum of the local (2, 3) blocks, then @ w

    def program():
        mesh = colofn.Mesh((DP,), ("dp",))

        def loss(w, x):
            return colofn.pmean(((x @ w) ** 2).mean(), "dp")

        # (a) JAX's idiom: the gradient function itself is what gets shard_map'd
        g = colofn.shard_map(
            torch.func.grad(loss, argnums=(0, 1)),
            mesh=mesh,
            in_specs=(P(), P("dp")),
            out_specs=(P(), P("dp")),
        )
        gw, gx = g(w, x)
        close(gw, gw_ref, "func.grad w")
        close(gx, gx_ref * DP / DP, "func.grad x")

        # (b) torch.func.vjp inside the body, through psum
        def body(w, x):
            y, vjp = torch.func.vjp(lambda w, x: colofn.psum(x, "dp") @ w, w, x)
            return (y, *vjp(torch.ones_like(y)))

        y, vw, vx = colofn.shard_map(
            body, mesh=mesh, in_specs=(P(), P("dp")), out_specs=(P(), P(), P("dp"))
        )(w, x)
        (y2, vjp2) = torch.func.vjp(lambda w, x: x.reshape(DP, 2, 3).sum(0) @ w, w, x)
        rw, rx = vjp2(torch.ones_like(y2))
        close(y, y_ref.detach(), "vjp y")
        close(vw, rw, "vjp w")
        close(vx, rx, "vjp x")
        return True

    assert all(colofn.launch(program, world_size=DP))


def test_torch_func_grad_inside_keeps_varying_tracking():
    """Gradients computed inside the body carry their primal's vma: a varying input's
    gradient varies (so out spec P() is refused) and is not summed over the axis."""

    def program():
        mesh = colofn.Mesh((2,), ("dp",))
        w, x = torch.tensor([1.0, 2.0]), torch.arange(8.0).reshape(4, 2)
        gx = colofn.shard_map(
            lambda w, x: torch.func.grad(lambda x: colofn.psum((x * w).sum(), "dp"))(x),
            mesh=mesh,
            in_specs=(P(), P("dp")),
            out_specs=P("dp"),
        )(w, x)
        with pytest.raises(SpecError, match="replicated across mesh axis 'dp'"):
            colofn.shard_map(
                lambda w, x: torch.func.grad(lambda x: (x * w).sum())(x),
                mesh=mesh,
                in_specs=(P(), P("dp")),
                out_specs=P(),
            )(w, x)

        def autograd_inside(w, x):
            wl = w.detach().requires_grad_()
            return torch.autograd.grad((x * wl).sum(), wl)[0]  # invariant: pvary's psum summed it

        gw = colofn.shard_map(autograd_inside, mesh=mesh, in_specs=(P(), P("dp")), out_specs=P())(
            w, x
        )
        return colofn.gather(gx).tolist(), colofn.gather(gw).tolist()

    gx, gw = every_rank_equal(colofn.launch(program, world_size=2))
    assert gx == [[1.0, 2.0]] * 4
    assert gw == [12.0, 16.0]


def test_torch_func_over_the_whole_shard_map_is_refused_clearly():
    def program():
        mesh = colofn.Mesh((2,), ("dp",))
        loss = colofn.shard_map(
            lambda w: colofn.pmean(w.sum(), "dp"), mesh=mesh, in_specs=P(), out_specs=P()
        )
        with pytest.raises(TypeError) as e:
            torch.func.grad(lambda w: loss(w).to_local())(torch.ones(2))
        return str(e.value)

    assert every_rank_equal(colofn.launch(program, world_size=2)) == (
        "shard_map'd function '<lambda>' was called under a torch.func transform (grad, vjp, vmap, ...); "
        "its results are DTensors, which torch.func cannot carry. Apply the transform inside instead, as in "
        "JAX: shard_map(torch.func.grad(local_loss), ...) with pmean/psum in local_loss, or use "
        "torch.autograd.grad/backward on the shard_map'd function"
    )


# ----------------------------------------------------------------------------- local_map


def test_local_map_replicated_input_gradient_bug_that_shard_map_avoids():
    """torch's local_map gives each rank only its own shard's share of a Replicate input's
    gradient, still labelled Replicate (so the "replicated" gradient differs between ranks)."""
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.experimental import local_map

    def f(w, x):
        return x * w

    def program():
        mesh = colofn.Mesh((2,), ("dp",))
        w, x = torch.tensor([1.0, 2.0]), torch.arange(8.0).reshape(4, 2)
        wd = distribute_tensor(w, mesh.device_mesh, [Replicate()]).requires_grad_()
        xd = distribute_tensor(x, mesh.device_mesh, [Shard(0)])
        lm = local_map(
            f,
            out_placements=[Shard(0)],
            in_placements=([Replicate()], [Shard(0)]),
            device_mesh=mesh.device_mesh,
        )
        lm(wd, xd).full_tensor().sum().backward()
        wc = w.clone().requires_grad_()
        colofn.shard_map(f, mesh=mesh, in_specs=(P(), P("dp")), out_specs=P("dp"))(
            wc, x
        ).full_tensor().sum().backward()
        return wd.grad.placements, wd.grad.to_local().tolist(), wc.grad.tolist()

    ranks = colofn.launch(program, world_size=2)
    true_grad = torch.arange(8.0).reshape(4, 2).sum(0).tolist()  # [12, 16]
    assert [r[0] for r in ranks] == [(Replicate(),)] * 2
    assert [r[1] for r in ranks] == [[2.0, 4.0], [10.0, 12.0]]  # each rank's own rows only
    assert [r[2] for r in ranks] == [true_grad, true_grad]


# ----------------------------------------------------------------------------- errors


def error_of(program):
    """The text of the error ``program`` raises on a 2 x 2 mesh (the same on every rank)."""

    def run():
        mesh = colofn.Mesh((2, 2), ("dp", "tp"))
        try:
            program(mesh)
        except (ValueError, TypeError, RuntimeError) as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    return every_rank_equal(colofn.launch(run, world_size=4))


def f(w, x):
    return x


W, X = torch.ones(3, 4), torch.ones(6, 3)


def test_error_out_spec_leaves_out_a_varying_axis():
    assert error_of(
        lambda m: colofn.shard_map(f, mesh=m, in_specs=(P(), P("dp")), out_specs=P())(W, X)
    ) == (
        "SpecError: shard_map of 'f': the result does not fit out_specs on Mesh(dp=2, tp=2):\n"
        "  * out_specs P() for the output implies that the corresponding output value is replicated across "
        "mesh axis 'dp', but could not infer replication over it: the value varies along 'dp'. Fix: "
        "psum/pmean/all_gather(to='invariant') it over 'dp', or name 'dp' in its out spec"
    )
    text = error_of(
        lambda m: colofn.shard_map(
            lambda w, x: {"a": x, "b": colofn.psum(x, "dp") * colofn.axis_index("tp")},
            mesh=m,
            in_specs=(P(), P("dp")),
            out_specs={"a": P("dp"), "b": P()},
        )(W, X)
    )
    assert text.splitlines()[1:] == [
        "  * out_specs P() for the output at ['b'] implies that the corresponding output value is replicated "
        "across mesh axis 'tp', but could not infer replication over it: the value varies along 'tp'. Fix: "
        "psum/pmean/all_gather(to='invariant') it over 'tp', or name 'tp' in its out spec"
    ]


def test_error_in_specs_collected_in_one_message():
    text = error_of(
        lambda m: colofn.shard_map(
            f,
            mesh=m,
            in_specs=({"a": P("zz"), "b": P("dp", "tp", None)}, P(None, "tp")),
            out_specs=P(),
        )({"a": torch.ones(4), "b": torch.ones(3, 4)}, X)
    )
    assert text == (
        "SpecError: shard_map applied to 'f' got arguments that do not fit in_specs on Mesh(dp=2, tp=2) "
        "(axis sizes {'dp': 2, 'tp': 2}):\n"
        "  * args[0]['a'] of shape (4,), where args[0] is bound to f's parameter 'w', corresponds to "
        "in_specs[0]['a'] of value P('zz'): dim 0: axis 'zz' is not in the mesh Mesh(dp=2, tp=2)\n"
        "  * args[0]['b'] of shape (3, 4), where args[0] is bound to f's parameter 'w', corresponds to "
        "in_specs[0]['b'] of value P('dp', 'tp', None): P('dp', 'tp', None) has 3 entries but the tensor "
        "has rank 2 (shape (3, 4))\n"
        "  * args[1] of shape (6, 3), where args[1] is bound to f's parameter 'x', corresponds to "
        "in_specs[1] of value P(None, 'tp'): dim 1 of size 3 is not divisible by 2 (axes tp=2)\n"
        "Fix: name only mesh axes, each once per spec, in at most as many entries as the argument has "
        "dims, and make each split dim divisible by the product of its axes' sizes"
    )


def test_error_in_specs_repeated_axis_and_one_spec_for_all_arguments():
    text = error_of(
        lambda m: colofn.shard_map(f, mesh=m, in_specs=P(("dp", "tp"), "dp"), out_specs=P())(
            torch.ones(4, 4), X
        )
    )
    assert text.splitlines()[1:] == [
        "  * args[0] of shape (4, 4), where args[0] is bound to f's parameter 'w', corresponds to in_specs "
        "of value P(('dp', 'tp'), 'dp'): dim 1: axis 'dp' is used more than once",
        "  * args[1] of shape (6, 3), where args[1] is bound to f's parameter 'x', corresponds to in_specs "
        "of value P(('dp', 'tp'), 'dp'): dim 1: axis 'dp' is used more than once",
        "  * args[1] of shape (6, 3), where args[1] is bound to f's parameter 'x', corresponds to in_specs "
        "of value P(('dp', 'tp'), 'dp'): dim 0 of size 6 is not divisible by 4 (axes dp=2 x tp=2)",
        "  * args[1] of shape (6, 3), where args[1] is bound to f's parameter 'x', corresponds to in_specs "
        "of value P(('dp', 'tp'), 'dp'): dim 1 of size 3 is not divisible by 2 (axes dp=2)",
        "Fix: name only mesh axes, each once per spec, in at most as many entries as the argument has "
        "dims, and make each split dim divisible by the product of its axes' sizes",
    ]


def test_error_in_specs_not_a_prefix_and_non_tensor_argument():
    assert error_of(
        lambda m: colofn.shard_map(f, mesh=m, in_specs=(P(), P(), P()), out_specs=P())(W, X)
    ) == (
        "TreeError: in_specs is not a pytree prefix of the argument tuple:\n"
        "  * at <root>: in_specs has 3 children but the argument tuple has 2\n"
        "Fix: give in_specs the structure of the argument tuple (or a prefix of it: one entry may stand "
        "for a whole subtree)"
    )
    assert error_of(
        lambda m: colofn.shard_map(f, mesh=m, in_specs=(P(), P()), out_specs=P())(3, X)
    ) == (
        "SpecError: shard_map applied to 'f' got arguments that do not fit in_specs on Mesh(dp=2, tp=2) "
        "(axis sizes {'dp': 2, 'tp': 2}):\n"
        "  * args[0], where args[0] is bound to f's parameter 'w', is an int (3), not a tensor\n"
        "Fix: shard_map maps tensors only: close over other values or bind them with functools.partial"
    )


def test_error_collective_misuse():
    ins = (P(), P("dp"))

    def inside(body, out=P("dp")):
        return lambda m: colofn.shard_map(
            lambda w, x: body(x), mesh=m, in_specs=ins, out_specs=out
        )(W, torch.ones(4, 4))

    assert error_of(inside(lambda x: colofn.pvary(x, "dp"))) == (
        "SpecError: colofn.pvary: the value already varies along ['dp']; pvary takes values invariant "
        "along the axis (drop the pvary, or psum first)"
    )
    assert error_of(inside(lambda x: colofn.psum(x, "zz"))) == (
        "SpecError: colofn.psum(..., axis_name='zz'): unknown axis name(s) ['zz']; the mesh axes are ('dp', 'tp')"
    )
    assert error_of(lambda m: colofn.psum(X, "dp")) == (
        "SpecError: colofn.psum was called outside shard_map: named mesh axes are bound only inside a "
        "function run by colofn.shard_map; call it from there"
    )
    assert error_of(inside(lambda x: colofn.psum_scatter(x[:1], "tp"))) == (
        "ShapeError: psum_scatter over ('tp',) (size 2): dim 0 of the operand, of size 1 (shape (1, 4)), "
        "must be equal to 2; pass tiled=True to split a longer dim into blocks"
    )
    assert error_of(
        inside(lambda x: colofn.psum_scatter(x[:, :3], "tp", scatter_dimension=1, tiled=True))
    ) == (
        "ShapeError: psum_scatter over ('tp',) (size 2): dim 1 of the operand, of size 3 (shape (2, 3)), must be divisible by 2"
    )
    assert error_of(
        inside(lambda x: colofn.all_to_all(x[:, :3], ("dp", "tp"), 1, 0, tiled=True))
    ) == (
        "ShapeError: all_to_all over ('dp', 'tp') (size 4): split_axis 1 of the operand, of size 3 "
        "(shape (2, 3)), must be divisible by 4"
    )
    assert error_of(inside(lambda x: colofn.ppermute(x, "tp", [(0, 1), (1, 1)]))) == (
        "SpecError: ppermute over ('tp',) (size 2): perm=[(0, 1), (1, 1)] is not a list of (source, destination) pairs:\n"
        "  * destination 1 appears 2 times ((0, 1), (1, 1))\n"
        "Fix: give each source and each destination at most once, as axis indices in [0, 2); "
        "e.g. a ring: perm=[(i, (i + 1) % 2) for i in range(2)]"
    )
    assert "perm[0] = (0, 2): destination 2 not an axis index in [0, 2)" in error_of(
        inside(lambda x: colofn.ppermute(x, "tp", [(0, 2)]))
    )


def test_error_call_forms():
    sm = colofn.shard_map  # decorator form with every option given by keyword
    assert error_of(lambda m: sm(f, mesh=m, in_specs=(P(), P()), out_specs=P())(W, x=X)) == (
        "TypeError: shard_map'd function 'f' was called with keyword arguments ['x']; pass every argument "
        "positionally (in_specs follows the positional argument tuple), or bind static ones with functools.partial"
    )
    assert (
        error_of(lambda m: sm(mesh=m, in_specs=P(), out_specs=P())(3))
        == "TypeError: shard_map needs a callable, got int"
    )
    assert error_of(lambda m: sm(f, in_specs=P(), out_specs=P())(W, X)) == (
        "MeshError: shard_map of 'f' needs a mesh: pass mesh=... or call it inside `with mesh:`"
    )
    with pytest.raises(TypeError, match="positional"):
        sm(f, None, in_specs=P(), out_specs=P())  # mesh is keyword-only
    assert error_of(
        lambda m: sm(
            lambda x: sm(f, mesh=m, in_specs=P(), out_specs=P())(x, x),
            mesh=m,
            in_specs=P(),
            out_specs=P(),
        )(W)
    ) == (
        "NotImplementedError: shard_map of 'f' was called inside another shard_map's body; nested "
        "shard_map is not supported: use one shard_map over all the mesh axes"
    )


def test_decorator_form_and_ambient_mesh():
    def program():
        mesh = colofn.Mesh((2, 2), ("dp", "tp"))

        @colofn.shard_map(mesh=mesh, in_specs=P("dp", "tp"), out_specs=P("dp"))
        def rowsum(x):
            return colofn.psum(x.sum(1), "tp")

        with mesh:
            colsum = colofn.shard_map(
                lambda x: colofn.psum(x.sum(0), "dp"), in_specs=P("dp", "tp"), out_specs=P("tp")
            )
            x = torch.arange(16.0).reshape(4, 4)
            assert rowsum.__name__ == "rowsum"
            return colofn.gather(rowsum(x)).tolist(), colofn.gather(colsum(x)).tolist()

    assert every_rank_equal(colofn.launch(program, world_size=4)) == (
        [6.0, 22.0, 38.0, 54.0],
        [24.0, 28.0, 32.0, 36.0],
    )


def test_errors_are_value_or_type_errors():
    assert (
        issubclass(SpecError, ValueError)
        and issubclass(ShapeError, ValueError)
        and issubclass(TreeError, ValueError)
    )


def test_out_spec_naming_an_invariant_axis_sums_the_copies_cotangents():
    """P('i') on a value invariant along 'i' gives tiled copies; each copy's cotangent counts."""
    x, ct = torch.tensor([1.0, 2.0, 3.0], dtype=F64), randn(6, seed=51)
    xr = x.clone().requires_grad_()
    want = torch.autograd.grad((torch.cat([xr * 2, xr * 2]) * ct).sum(), xr)[0]

    def program(check_vma):
        mesh = colofn.Mesh((2,), ("i",))
        xg = x.clone().requires_grad_()
        y = colofn.shard_map(
            lambda v: v * 2, mesh=mesh, in_specs=P(), out_specs=P("i"), check_vma=check_vma
        )(xg)
        close(y, torch.cat([x * 2, x * 2]), "tiled copies")
        close(torch.autograd.grad((colofn.gather(y) * ct).sum(), xg)[0], want, "grad")
        return True

    for check_vma in (True, False):
        assert all(colofn.launch(program, check_vma, world_size=2))


def test_error_dtensor_argument_on_another_mesh():
    def program():
        square, line = colofn.Mesh((2, 2), ("dp", "tp")), colofn.Mesh((4,), ("i",))
        w = colofn.device_put(torch.ones(4), P(), mesh=line)
        try:
            colofn.shard_map(f, mesh=square, in_specs=P(), out_specs=P())(w, torch.ones(2))
        except SpecError as e:
            return str(e).splitlines()[1]

    assert every_rank_equal(colofn.launch(program, world_size=4)).startswith(
        "  * args[0], where args[0] is bound to f's parameter 'w', is a DTensor on another mesh ("
    )


def _in_place_program(x):
    mesh = colofn.Mesh((2,), ("i",))

    def body(b):
        b.add_(1.0)  # mutating a block must not reach the other simulated ranks
        return b

    return colofn.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P())(x).to_local().tolist()


def test_in_place_op_on_a_block_stays_on_its_rank_in_the_simulated_world():
    x = torch.zeros(2)
    assert colofn.launch(_in_place_program, x, world_size=2) == [[1.0, 1.0], [1.0, 1.0]]
    assert x.tolist() == [0.0, 0.0]


def _per_device_errors():
    mesh = colofn.Mesh((2,), ("dp",))
    out = []
    for specs in [(P("zz"),), ("dp",)]:
        try:
            colofn.per_device(lambda x: x, mesh=mesh, in_specs=specs)(torch.ones(2))
        except colofn.errors.SpecError as e:
            out.append(str(e))
    return out


def test_per_device_rejects_bad_in_specs_before_running():
    msgs = colofn.launch(_per_device_errors, world_size=2)[0]
    assert msgs == [
        "per_device of '<lambda>': in_specs entries [P('zz')] are not P(...) of axes of Mesh(dp=2)",
        "per_device of '<lambda>': in_specs entries ['dp'] are not P(...) of axes of Mesh(dp=2)",
    ]
