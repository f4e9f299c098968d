"""Higher-order derivatives through collectives, pbroadcast, and collectives over an empty axis tuple.

Every collective's backward is itself a differentiable collective (its
transpose), so a gradient taken inside a shard_map body can be differentiated
again, and grad-of-grad equals the single-device computation.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401  (torch.func imports it lazily: two thread ranks doing so at once see it half-made)
from torch.func import grad, grad_and_value, hessian, jacrev, jvp, vmap

import colofn
from colofn import P
from colofn.errors import SpecError
from colofn.testing import assert_equivalent, shard_map_reference


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)


def _blocks(x: torch.Tensor) -> torch.Tensor:  # x (4, 3) on t=2: the two (2, 3) blocks
    return x.reshape(2, 2, 3)


# (name, local loss of w with x bound, the same loss on the global x): each a scalar invariant along t
ISSUE_CASES = {
    # issue 11's example: grad wrt w of psum((x * w).sum())**2, then differentiated again
    "psum": (lambda w, x: colofn.psum((x * w).sum(), "t") ** 2, lambda w, x: (x * w).sum() ** 2),
    "pmean": (lambda w, x: colofn.pmean((x * w).sum(), "t") ** 2, lambda w, x: ((x * w).sum() / 2) ** 2),
    "pmax": (
        lambda w, x: colofn.pmax((x * w).sum(), "t") ** 2,
        lambda w, x: (_blocks(x) * w).sum((1, 2)).max() ** 2,
    ),
    "pmin": (
        lambda w, x: colofn.pmin((x * w).sum(), "t") ** 3,
        lambda w, x: (_blocks(x) * w).sum((1, 2)).min() ** 3,
    ),
    "all_gather_invariant": (
        lambda w, x: (colofn.all_gather(x @ w, "t", tiled=True, to="invariant").softmax(0) * torch.arange(4.0)).sum(),
        lambda w, x: ((x @ w).softmax(0) * torch.arange(4.0)).sum(),
    ),
    "all_gather_varying": (
        lambda w, x: colofn.pmean(colofn.all_gather(x @ w, "t", tiled=True).softmax(0)[1] ** 2, "t"),
        lambda w, x: (x @ w).softmax(0)[1] ** 2,
    ),
    "psum_scatter": (
        lambda w, x: colofn.psum((colofn.psum_scatter(x * w, "t", tiled=True) ** 3).sum(), "t"),
        lambda w, x: ((_blocks(x) * w).sum(0) ** 3).sum(),
    ),
    "ppermute": (
        lambda w, x: colofn.psum((colofn.ppermute(x * w, "t", [(0, 1), (1, 0)]) * x).sum() ** 2, "t"),
        lambda w, x: ((_blocks(x).flip(0) * w * _blocks(x)).sum((1, 2)) ** 2).sum(),
    ),
    "all_to_all": (  # rank r receives row r of every rank's block, side by side
        lambda w, x: colofn.psum(((colofn.all_to_all(x * w, "t", 0, 1, tiled=True).tanh() * x.sum()).sum()) ** 2, "t"),
        lambda w, x: sum(
            ((torch.cat([_blocks(x)[s][r] * w for s in range(2)]).tanh() * _blocks(x)[r].sum()).sum()) ** 2
            for r in range(2)
        ),
    ),
    "pbroadcast": (
        lambda w, x: colofn.pbroadcast((x * w).sum(), "t", 1) ** 2 * colofn.psum((x * w).sum(), "t"),
        lambda w, x: (_blocks(x)[1] * w).sum() ** 2 * (x * w).sum(),
    ),
}


@pytest.mark.parametrize("name", list(ISSUE_CASES))
def test_grad_inside_the_body_differentiates_again_like_single_device(name):
    """Issue 11 §1: the body returns grad_w(loss); its gradient wrt w and x equals single-device."""
    local, single = ISSUE_CASES[name]
    w, x = _data()

    def parallel(w, x):
        body = lambda w, x: grad(lambda w: local(w, x))(w)  # noqa: E731
        return colofn.shard_map(body, mesh=colofn.Mesh((2,), ("t",)), in_specs=(P(), P("t")), out_specs=P())(w, x)

    assert_equivalent(parallel, lambda w, x: grad(lambda w: single(w, x))(w), w, x, world_size=2)


def test_issue_example_numbers():
    """The issue's program: the second-order gradient wrt w equals single-device on every rank, and
    the gradient wrt x is one global value (it differed between the shards before)."""
    w, x = _data(1)
    c = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)

    def program():
        wl, xl = w.clone().requires_grad_(), x.clone().requires_grad_()
        body = lambda w, x: grad(lambda w: colofn.psum((x * w).sum(), "t") ** 2)(w)  # noqa: E731
        out = colofn.shard_map(body, mesh=colofn.Mesh((2,), ("t",)), in_specs=(P(), P("t")), out_specs=P())(wl, xl)
        return torch.autograd.grad((out.full_tensor() * c).sum(), (wl, xl))

    wr, xr = w.clone().requires_grad_(), x.clone().requires_grad_()
    want = torch.autograd.grad((grad(lambda w: (xr * w).sum() ** 2)(wr) * c).sum(), (wr, xr))
    # d/dw <2 (x.w) X, c> = 2 X^T X c summed: closed form, as a check of the check
    torch.testing.assert_close(want[0], 2 * x.sum(0) * (x.sum(0) @ c))
    for gw, gx in colofn.launch(program, world_size=2):
        torch.testing.assert_close(gw, want[0])
        torch.testing.assert_close(gx, want[1])


def test_megatron_value_and_grad_inside_the_body():
    """dp x tp Megatron MLP: grad_and_value inside the body, then its gradient from outside."""
    g = torch.Generator().manual_seed(3)
    w1, w2 = (torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64))
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)

    def body(w1, w2, x):
        def loss(w1, w2):
            y = colofn.psum(torch.tanh(x @ w1) @ w2, "tp")  # column- then row-parallel
            return colofn.pmean((y**2).mean(), "dp")

        (g1, g2), value = grad_and_value(loss, argnums=(0, 1))(w1, w2)
        return value, g1, g2

    def parallel(w1, w2, x):
        mesh = colofn.Mesh((2, 2), ("dp", "tp"))
        specs = (P(None, "tp"), P("tp", None), P("dp"))
        return colofn.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(P(), P(None, "tp"), P("tp", None)))(w1, w2, x)

    def single(w1, w2, x):
        (g1, g2), value = grad_and_value(lambda a, b: ((torch.tanh(x @ a) @ b) ** 2).mean(), argnums=(0, 1))(w1, w2)
        return value, g1, g2

    assert_equivalent(parallel, single, w1, w2, x, world_size=4)


def test_hessian_vector_product_by_double_backward_through_every_collective():
    """An HVP by reverse over reverse (create_graph=True) outside the shard_map, with tracking and without."""
    w, x = _data(2)
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    local = lambda w, x: sum(f(w, x) for f, _ in ISSUE_CASES.values())  # noqa: E731
    single = lambda w, x: sum(f(w, x) for _, f in ISSUE_CASES.values())  # noqa: E731

    def hvp(loss):
        def run(w, x):
            (gw,) = torch.autograd.grad(loss(w, x), (w,), create_graph=True)
            return torch.autograd.grad((gw * v).sum(), (w, x), create_graph=True)

        return run

    for check_vma in (True, False):

        def parallel(w, x, check_vma=check_vma):
            f = colofn.shard_map(local, mesh=colofn.Mesh((2,), ("t",)), in_specs=(P(), P("t")), out_specs=P(), check_vma=check_vma)
            return f(w, x).full_tensor()

        assert_equivalent(hvp(parallel), hvp(single), w, x, world_size=2)


def test_third_order_through_psum_and_pvary():
    w, x = _data(4)

    def nested(loss):
        return lambda w, x: grad(lambda w: grad(lambda w: loss(w, x))(w).pow(2).sum())(w)

    def parallel(w, x):
        f = nested(lambda w, x: colofn.psum(((x * w).sum(1) ** 3).sum(), "t"))
        return colofn.shard_map(f, mesh=colofn.Mesh((2,), ("t",)), in_specs=(P(), P("t")), out_specs=P())(w, x)

    assert_equivalent(parallel, nested(lambda w, x: ((x * w).sum(1) ** 3).sum()), w, x, world_size=2)


@pytest.mark.parametrize("transform", ["jvp", "hessian", "vmap"])
def test_unsupported_transforms_raise_naming_the_collective(transform):
    w, x = _data()

    def body(w, x):
        f = lambda w: colofn.psum((x * w).sum(), "t")  # noqa: E731
        if transform == "jvp":
            return jvp(f, (w,), (torch.ones_like(w),))[1]
        if transform == "hessian":
            return hessian(f)(w).sum()
        return vmap(lambda r: colofn.all_gather(r, "t"))(x).sum()

    def program():
        sm = colofn.shard_map(body, mesh=colofn.Mesh((2,), ("t",)), in_specs=(P(), P("t")), out_specs=P())
        with pytest.raises(NotImplementedError) as e:
            sm(w, x)
        return str(e.value)

    text = colofn.launch(program, world_size=2)[0]
    if transform == "vmap":
        assert text.startswith("colofn.all_gather under torch.func.vmap is not supported")
    else:
        assert "forward-mode differentiation" in text and "simulated world" in text and "through colofn's " in text


VMAP_CASES = {  # body of (w, x) on t=2 (w: P(), x: P("t")), out spec, single-device value
    "vmap psum": (lambda w, x: vmap(lambda r: colofn.psum(r * w, "t"))(x), P(), lambda w, x: _blocks(x).sum(0) * w),
    "vmap ppermute": (
        lambda w, x: vmap(lambda c: colofn.ppermute(c, "t", [(0, 1), (1, 0)]), in_dims=1, out_dims=1)(x),
        P("t"),
        lambda w, x: _blocks(x).flip(0).reshape(4, 3),
    ),
    "jacrev psum": (
        lambda w, x: jacrev(lambda w: colofn.pmean(torch.tanh(x @ w), "t"))(w),
        P(),
        lambda w, x: jacrev(lambda w: torch.tanh(_blocks(x) @ w).mean(0))(w),
    ),
    "jacrev pmax": (
        lambda w, x: jacrev(lambda w: colofn.pmax(torch.tanh(x @ w), "t"))(w),
        P(),
        lambda w, x: jacrev(lambda w: torch.tanh(_blocks(x) @ w).amax(0))(w),
    ),
    "hessian by jacrev of jacrev": (
        lambda w, x: jacrev(jacrev(lambda w: colofn.psum((torch.tanh(x @ w) ** 2).sum(), "t")))(w),
        P(),
        lambda w, x: hessian(lambda w: (torch.tanh(x @ w) ** 2).sum())(w),
    ),
}


@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_vmap_and_jacrev_through_collectives(name):
    """psum, pvary, pbroadcast and ppermute batch under vmap (the batch dim rides along), so jacrev
    and reverse-mode Hessians work on thread ranks too, and differentiate again."""
    body, out_spec, single = VMAP_CASES[name]
    w, x = _data(6)

    def parallel(w, x):
        return colofn.shard_map(body, mesh=colofn.Mesh((2,), ("t",)), in_specs=(P(), P("t")), out_specs=out_spec)(w, x)

    assert_equivalent(parallel, single, w, x, world_size=2)


def _forward_mode_on_gloo() -> list[torch.Tensor]:
    w, x = _data(5)
    v = torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64)
    f = lambda w, x: colofn.psum((x * w).sum(), "t") ** 2 + colofn.pmax((x * w).sum(1), "t").sum() ** 3  # noqa: E731

    def body(w, x):
        return jvp(lambda w: f(w, x), (w,), (v,))[1], jvp(grad(lambda w: f(w, x)), (w,), (v,))[1]

    mesh = colofn.Mesh((2,), ("t",))
    out = colofn.shard_map(body, mesh=mesh, in_specs=(P(), P("t")), out_specs=(P(), P()))(w, x)
    # and reverse over reverse: the gradient of the body's gradient (issue 11's program)
    wl = w.clone().requires_grad_()
    gw = colofn.shard_map(lambda w, x: grad(lambda w: f(w, x))(w), mesh=mesh, in_specs=(P(), P("t")), out_specs=P())(wl, x)
    (hv,) = torch.autograd.grad((gw.full_tensor() * v).sum(), wl)
    return [o.full_tensor() for o in out] + [hv]


@pytest.mark.gloo
def test_forward_mode_and_second_order_on_gloo():
    """Where torch's forward AD works (one rank per process), jvp through collectives is exact; and
    reverse over reverse through gloo's collectives equals it."""
    w, x = _data(5)
    v = torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64)
    single = lambda w: (x * w).sum() ** 2 + (_blocks(x) * w).sum(2).amax(0).sum() ** 3  # noqa: E731
    want = [jvp(single, (w,), (v,))[1], jvp(grad(single), (w,), (v,))[1]]
    want.append(want[1])  # the Hessian is symmetric: H v by forward over reverse and by reverse over reverse
    for got in colofn.launch(_forward_mode_on_gloo, world_size=2, backend="gloo", timeout=120):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- pbroadcast


@pytest.mark.parametrize("check_vma", [True, False])
def test_pbroadcast_values_gradients_and_second_order_equal_reference(check_vma):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)  # mesh (i=3, j=2), x on P(("i", "j"))

    def f(v):
        b = colofn.pbroadcast(v * v, "i", 2)  # varying along j still: the source's block per j
        return b, colofn.psum((b * v).sum(), ("i", "j"))

    def parallel(x):
        mesh = colofn.Mesh((3, 2), ("i", "j"))
        return colofn.shard_map(f, mesh=mesh, in_specs=P(("i", "j")), out_specs=(P("j"), P()), check_vma=check_vma)(x)

    ref = shard_map_reference(f, mesh_shape={"i": 3, "j": 2}, in_specs=P(("i", "j")), out_specs=(P("j"), P()))
    assert_equivalent(parallel, ref, x, world_size=6)

    def second(fn):  # the gradient, differentiable again
        return lambda x: torch.autograd.grad(sum(y.full_tensor().sum() if hasattr(y, "full_tensor") else y.sum() for y in fn(x)), x, create_graph=True)

    assert_equivalent(second(parallel), second(ref), x, world_size=6)


def test_reference_pbroadcast_differentiates_to_second_order():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64, requires_grad=True)
    ref = shard_map_reference(lambda v: colofn.pbroadcast(v, "i", 1) ** 3, mesh_shape={"i": 2}, in_specs=P("i"), out_specs=P())
    (g,) = torch.autograd.grad(ref(x).sum(), x, create_graph=True)
    torch.testing.assert_close(g.detach(), torch.tensor([0.0, 0.0, 27.0, 48.0], dtype=torch.float64))
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, torch.tensor([0.0, 0.0, 18.0, 24.0], dtype=torch.float64))


def test_pbroadcast_moves_what_a_broadcast_moves():
    """comm_trace: a chain broadcast (at most B bytes per rank, (n-1) B in all) where
    psum(where(axis_index == k, x, 0)) all-reduces 2 (n-1)/n B per rank; backward under tracking
    moves nothing, without tracking a chain reduce."""

    def program(check_vma):
        mesh = colofn.Mesh((4,), ("i",))
        x = torch.arange(32.0).reshape(4, 8).requires_grad_()
        f = colofn.shard_map(lambda v: colofn.pbroadcast(v, "i", 1), mesh=mesh, in_specs=P("i"), out_specs=P(), check_vma=check_vma)
        with colofn.comm_trace() as records:
            y = f(x).to_local()
            fwd = [(r.op, r.bytes_sent, r.bytes_received, r.phase) for r in records]
            records.clear()
            y.sum().backward()
        bwd = [(r.op, r.bytes_sent, r.bytes_received) for r in records if r.op in ("reduce", "broadcast")]
        return y.tolist(), fwd, bwd, x.grad.tolist()

    b = 8 * 4  # one (1, 8) float32 block
    for check_vma in (True, False):
        res = colofn.launch(program, check_vma, world_size=4)
        for r, (y, fwd, bwd, gx) in enumerate(res):
            assert y == [[8.0 + k for k in range(8)]]
            assert fwd == [("broadcast", 0 if r == 0 else b, 0 if r == 1 else b, "forward")]  # chain 1->2->3->0
            assert gx == [[1.0] * 8 if i == 1 else [0.0] * 8 for i in range(4)]
            if check_vma:
                assert bwd == []
            else:  # chain 2->3->0->1 into rank 1
                assert bwd == [("reduce", 0 if r == 1 else b, 0 if r == 2 else b)]
        assert sum(f[0][1] for _, f, _, _ in res) == 3 * b  # (n-1) B in all, vs 4 * 2 * 3/4 B for an all-reduce


def test_pbroadcast_bad_source_is_refused_before_communication():
    def program():
        f = colofn.shard_map(lambda v: colofn.pbroadcast(v, "i", 2), mesh=colofn.Mesh((2,), ("i",)), in_specs=P("i"), out_specs=P())
        with pytest.raises(SpecError, match=r"colofn.pbroadcast over \('i',\) \(size 2\): source must be an int index in \[0, 2\), got 2"):
            f(torch.ones(2))
        return True

    assert all(colofn.launch(program, world_size=2))


# ----------------------------------------------------------------------------- empty axis tuples


def test_collectives_over_an_empty_axis_tuple_are_the_identity():
    """As in JAX: a group of one rank. Reductions and pbroadcast return x, untiled gathers add a dim
    of size 1, axis_index is 0 and axis_size 1; no communication; the value keeps its vma."""

    def f(v):
        outs = [
            colofn.psum(v, ()),
            colofn.pmean(v, ()),
            colofn.pmax(v, ()),
            colofn.pmin(v, ()),
            colofn.pbroadcast(v, (), 0),
            colofn.all_gather(v, (), tiled=True),
            colofn.all_gather(v, (), axis_dim=1).squeeze(1),
            colofn.psum_scatter(v, (), tiled=True),
            colofn.all_to_all(v, (), 0, 1, tiled=True),
            colofn.ppermute(v, (), [(0, 0)]),
            v * colofn.axis_size(()) + colofn.axis_index(()).to(v.dtype),
        ]
        return torch.stack(outs)

    x = torch.arange(8.0, dtype=torch.float64).reshape(4, 2)

    def parallel(x):
        with colofn.comm_trace() as records:
            out = colofn.shard_map(f, mesh=colofn.Mesh((2,), ("i",)), in_specs=P("i"), out_specs=P(None, "i"))(x)
        assert records == []
        return out

    ref = shard_map_reference(f, mesh_shape={"i": 2}, in_specs=P("i"), out_specs=P(None, "i"))
    torch.testing.assert_close(ref(x), x.expand(11, 4, 2))
    assert_equivalent(parallel, ref, x, world_size=2)
    with pytest.raises(SpecError, match="replicated across mesh axis 'i'"):  # still varying along i
        colofn.launch(
            lambda: colofn.shard_map(lambda v: colofn.psum(v, ()), mesh=colofn.Mesh((2,), ("i",)), in_specs=P("i"), out_specs=P())(x),
            world_size=2,
        )


def test_reference_refuses_transforms_inside_its_body():
    w, x = _data()
    body = lambda w, x: grad(lambda w: colofn.psum((x * w).sum(), "t") ** 2)(w)  # noqa: E731
    ref = shard_map_reference(body, mesh_shape={"t": 2}, in_specs=(P(), P("t")), out_specs=P())
    with pytest.raises(NotImplementedError, match="Differentiate the reference from outside"):
        ref(w, x)
