"""colofn.jit and with_sharding_constraint on the simulated world (eager; compile is in test_jit_compile.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard

import colofn
from colofn import P, jit, with_sharding_constraint
from colofn.errors import JitError, MeshError, ShardingError, TreeError
from colofn.testing import assert_trees_close


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def mlp(x, w1, w2):
    h = torch.relu(x @ w1)
    h = with_sharding_constraint(h, P("dp", "tp"))
    return ((h @ w2) ** 2).mean()


def mlp_ref(x, w1, w2):
    return ((torch.relu(x @ w1) @ w2) ** 2).mean()


def _value_and_grads(fn, args):
    args = [a.detach().clone().requires_grad_() for a in args]
    y = fn(*args)
    y.backward()
    return y, [a.grad for a in args]


MLP_ARGS = (_randn(0, 8, 4), _randn(1, 4, 16), _randn(2, 16, 4))


def _mlp_program():
    with colofn.Mesh((2, 2), ("dp", "tp")):
        f = jit(mlp, in_shardings=(P("dp"), P(None, "tp"), P("tp")))
        y, grads = _value_and_grads(f, MLP_ARGS)
        return y.placements, y.full_tensor().detach(), [(type(g), g) for g in grads]


def test_values_and_gradients_equal_single_device():
    want_y, want_g = _value_and_grads(mlp_ref, MLP_ARGS)
    for placements, y, grads in colofn.launch(_mlp_program, world_size=4):
        assert placements == (Replicate(), Replicate())  # a mean's pending sum is reduced
        assert_trees_close(y, want_y.detach())
        # plain-tensor arguments get their full global gradient on every rank
        assert [t for t, _ in grads] == [torch.Tensor] * 3
        assert_trees_close([g for _, g in grads], want_g)


def _layouts_program():
    with colofn.Mesh((2, 2), ("dp", "tp")) as mesh:
        x = colofn.device_put(MLP_ARGS[0], P(None, "tp")).requires_grad_()
        w = MLP_ARGS[1].clone().requires_grad_()
        f = jit(lambda x, w: x @ w, in_shardings=(None, P("tp")), out_shardings=None)
        kept = f(x, w)  # x keeps (Replicate, Shard(1)); w is placed Shard(0) on tp
        g = jit(lambda x, w: x @ w, in_shardings=(P("dp"), None), out_shardings=P(None, "tp"))
        moved = g(x, w)
        (kept.full_tensor().sum() + moved.full_tensor().sum()).backward()
        partial = jit(lambda x: x.sum(0), in_shardings=P("dp"))(MLP_ARGS[0])
        sharded_sum = jit(lambda x: x.sum(0), in_shardings=P("dp"), out_shardings=P("dp"))(MLP_ARGS[0])
        none_mesh = jit(lambda x: x * 2, in_shardings=colofn.NamedSharding(mesh, P("tp")))
        return {
            "kept": kept.placements,
            "moved": moved.placements,
            "x_grad": (type(x.grad), x.grad.placements),
            "w_grad": type(w.grad),
            "partial": partial.placements,
            "sharded_sum": sharded_sum.placements,
            "ns": none_mesh(torch.arange(4.0)).placements,
            "values": (kept.full_tensor().detach(), moved.full_tensor().detach(), x.grad.full_tensor(), w.grad),
        }


def test_argument_and_result_layouts():
    out = colofn.launch(_layouts_program, world_size=4)[0]
    assert out["kept"] == (Replicate(), Replicate())  # the pending sum over tp is reduced
    assert out["moved"] == (Replicate(), Shard(1))
    assert out["x_grad"] == (DTensor, (Replicate(), Shard(1)))  # a DTensor argument's gradient keeps its layout
    assert out["w_grad"] is torch.Tensor
    assert out["partial"] == (Replicate(), Replicate())
    assert out["sharded_sum"] == (Shard(0), Replicate())
    assert out["ns"] == (Replicate(), Shard(0))
    x, w = MLP_ARGS[0].clone().requires_grad_(), MLP_ARGS[1].clone().requires_grad_()
    ((x @ w).sum() * 2).backward()
    kept, moved, xg, wg = out["values"]
    assert_trees_close([kept, moved, xg, wg], [(x @ w).detach(), (x @ w).detach(), x.grad, w.grad])


def _inside_program():
    with colofn.Mesh((2,), ("dp",)):

        @jit(in_shardings=P("dp"))
        def f(x):
            # tensors made inside are global values, treated as replicated
            return x * torch.arange(4.0)[:, None] + torch.ones(3) + 1

        return f(torch.ones(4, 3)).full_tensor()


def test_plain_tensors_created_inside_are_replicated():
    want = torch.ones(4, 3) * torch.arange(4.0)[:, None] + 2
    for got in colofn.launch(_inside_program, world_size=2):
        assert torch.equal(got, want)


def _constraint_program():
    out = {}
    with colofn.Mesh((2, 2), ("dp", "tp")) as mesh:
        x = torch.arange(16.0).reshape(4, 4).requires_grad_()
        tree = with_sharding_constraint({"a": x, "b": [x, None]}, {"a": P("dp"), "b": [P(None, ("dp", "tp")), None]})
        out["a"] = tree["a"].placements
        out["b"] = tree["b"][0].placements
        (tree["a"] * 2).full_tensor().sum().backward()
        out["grad"] = x.grad
        d = with_sharding_constraint(tree["a"], colofn.NamedSharding(mesh, P(None, "tp")))
        out["redistributed"] = d.placements
        for bad in (P("tp", "dp", "dp"), P(None, None, "tp"), P("nope")):
            try:
                with_sharding_constraint(torch.ones(3, 4), bad)
            except (ShardingError, ValueError) as e:
                out.setdefault("errors", []).append(str(e))
    try:
        with_sharding_constraint(torch.ones(2), P("dp"))
    except MeshError as e:
        out["no_mesh"] = str(e)
    return out


def test_with_sharding_constraint():
    out = colofn.launch(_constraint_program, world_size=4)[0]
    assert out["a"] == (Shard(0), Replicate())
    assert out["b"] == (Shard(1), Shard(1))
    assert torch.equal(out["grad"], torch.full((4, 4), 2.0))  # full global gradient through the placement
    assert out["redistributed"] == (Replicate(), Shard(1))
    assert "axis 'dp' is used more than once" in out["errors"][0]
    assert "has 3 entries but the tensor has rank 2" in out["errors"][1]
    assert "axis 'nope' is not in the mesh" in out["errors"][2]
    assert "needs a mesh" in out["no_mesh"] and "with mesh:" in out["no_mesh"]


def _compose_program():
    with colofn.Mesh((2,), ("tp",)):
        inner = jit(lambda a, b: a @ b, in_shardings=(P(), P(None, "tp")))

        @colofn.shard_map(in_specs=P(None, "tp"), out_specs=P())
        def local_sum(h):
            return colofn.psum(h.sum(-1), "tp")

        @jit
        def outer(x, w):
            h = inner(x, w)  # a jit inside a jit
            return local_sum(h) + h.sum(-1)  # shard_map inside jit takes the DTensor

        x, w = MLP_ARGS[0].clone().requires_grad_(), MLP_ARGS[1].clone().requires_grad_()  # one per rank thread
        y = outer(x, w)
        y.full_tensor().sum().backward()
        return y.full_tensor().detach(), x.grad, w.grad


def test_shard_map_and_jit_compose_inside_jit():
    x, w = MLP_ARGS[0].clone().requires_grad_(), MLP_ARGS[1].clone().requires_grad_()
    y = 2 * (x @ w).sum(-1)
    y.sum().backward()
    for got in colofn.launch(_compose_program, world_size=2):
        assert_trees_close(list(got), [y.detach(), x.grad, w.grad])


def _static_program():
    calls = []

    @jit(in_shardings=P("dp"), static_argnums=(1,), donate_argnums=0)
    def scale(x, how):
        calls.append(how)
        return x * 2 if how == "double" else x.neg()

    out = {}
    with colofn.Mesh((2,), ("dp",)):
        x = torch.arange(4.0)
        out["double"] = scale(x, "double").full_tensor()
        out["neg"] = scale(x, "neg").full_tensor()
        out["x_intact"] = torch.equal(x, torch.arange(4.0))  # donation is a hint only
        for bad in ((x, ["unhashable"]), (x,)):
            try:
                scale(*bad)
            except TypeError as e:
                out.setdefault("errors", []).append(str(e))
    out["calls"] = calls
    return out


def test_static_and_donated_arguments():
    out = colofn.launch(_static_program, world_size=2)[0]
    assert torch.equal(out["double"], torch.arange(4.0) * 2)
    assert torch.equal(out["neg"], -torch.arange(4.0))
    assert out["x_intact"] and out["calls"] == ["double", "neg"]
    assert "static argument 1 (list) is not hashable" in out["errors"][0]
    assert "static_argnums has 1 but the call passed 1 positional arguments" in out["errors"][1]
    with pytest.raises(TypeError, match=r"arguments \[0\] are both static and donated"):
        jit(lambda x: x, static_argnums=0, donate_argnums=0)
    with pytest.raises(TypeError, match="every leaf of in_shardings must be a NamedSharding, a P"):
        jit(lambda x: x, in_shardings=(P(), "dp"))
    with pytest.raises(TypeError, match="compile must be a bool"):
        jit(lambda x: x, compile="yes")


def _bad_args_program():
    out = []
    with colofn.Mesh((2, 2), ("dp", "tp")):
        f = jit(lambda x, y: x + y, in_shardings=(P("dp", "tp"), P("tp")))
        for args in ((torch.ones(3, 4), torch.ones(5)), (torch.ones(4, 4), 7)):
            try:
                f(*args)
            except ShardingError as e:
                out.append(str(e))
        try:
            jit(lambda x: x, in_shardings=(P(), P()))(torch.ones(2))
        except TreeError as e:
            out.append(str(e))
    return out


def test_argument_errors_name_every_bad_leaf():
    shape_err, type_err, tree_err = colofn.launch(_bad_args_program, world_size=4)[0]
    assert "jit of '<lambda>': 2 argument(s) do not fit in_shardings" in shape_err
    assert "args[0] (shape (3, 4), spec P('dp', 'tp')): dim 0 of size 3 is not divisible by 2 (axes dp=2)" in shape_err
    assert "args[1] (shape (5,), spec P('tp')): dim 0 of size 5 is not divisible by 2 (axes tp=2)" in shape_err
    assert "args[1]: a int (7) cannot be sharded; make it static or give it None" in type_err
    assert "in_shardings is not a pytree prefix of the args tuple" in tree_err


def _missing_rule_program(which):
    with colofn.Mesh((2,), ("tp",)):
        if which == "searchsorted":
            f = jit(lambda edges, x: torch.searchsorted(edges, x), in_shardings=(P(), P("tp")))
            f(torch.arange(4.0), _randn(0, 4, 4))
        elif which == "unique":
            jit(lambda x: torch.unique(x), in_shardings=P("tp"))(torch.arange(4.0))
        else:
            f = jit(lambda x: F.pad(x, (1, 1), mode="reflect"), in_shardings=P("tp"))
            f(_randn(0, 2, 4, 4))


def test_op_without_a_sharding_rule_names_op_inputs_line_and_fix():
    with pytest.raises(JitError) as e:
        colofn.launch(_missing_rule_program, "searchsorted", world_size=2)
    text = str(e.value)
    assert "DTensor has no sharding rule for aten.searchsorted.Tensor" in text
    assert "input 0: float32[4] P() on mesh(tp=2), placements (Replicate(),)" in text
    assert "input 1: float32[4, 4] P('tp') on mesh(tp=2), placements (Shard(dim=0),)" in text
    assert "test_jit.py" in text and "torch.searchsorted(edges, x)" in text
    assert "colofn.shard_map" in text
    assert isinstance(e.value.original, NotImplementedError)

    with pytest.raises(JitError, match=r"the output shape of aten._unique2.default depends on the values") as e:
        colofn.launch(_missing_rule_program, "unique", world_size=2)
    assert "torch.unique(x.full_tensor())" in str(e.value)

    with pytest.raises(JitError, match=r"no sharding rule for aten.reflection_pad1d.default") as e:
        colofn.launch(_missing_rule_program, "pad", world_size=2)
    assert "float32[2, 4, 4] P('tp')" in str(e.value)


def test_without_a_mesh_jit_runs_plain_torch():
    f = jit(lambda x, n: x * n, static_argnums=1)
    y = f(torch.ones(2), 3)
    assert type(y) is torch.Tensor and torch.equal(y, torch.full((2,), 3.0))
    assert f.__name__ == "<lambda>" and f.cache_size == 0


def _kwargs_program():
    with colofn.Mesh((2,), ("dp",)):
        f = jit(lambda x, *, bias: x + bias, in_shardings=P("dp"))
        return f(torch.zeros(4), bias=torch.arange(4.0)).placements


def test_keyword_arguments_are_replicated():
    assert colofn.launch(_kwargs_program, world_size=2)[0] == (Shard(0),)


# ----------------------------------------------------------------------------- DTensor's own limits


def _dtensor_limits_program(which):
    g = torch.Generator().manual_seed(0)
    with colofn.Mesh((colofn.process_count(),), ("i",)):
        if which == "vocab_embedding":  # vocab-sharded table, then a row-sharded matmul and a gelu
            f = jit(lambda t, e, w: F.gelu(F.embedding(t, e) @ w), in_shardings=(P(), P("i"), P("i")))
            e, w = torch.randn(4, 4, generator=g).requires_grad_(), torch.randn(4, 4, generator=g)
            f(torch.randint(0, 4, (2, 2), generator=g), e, w).full_tensor().pow(2).sum().backward()
            return e.grad
        if which == "uneven_view":
            return jit(lambda x: x.view(2, 3, 2), in_shardings=P(None, "i"))(torch.ones(2, 6))
        if which == "size1_axis":  # a dim "sharded" over an axis of size 1 is laid out as replicated
            x = torch.arange(6.0).reshape(1, 1, 6).requires_grad_()
            y = jit(lambda x: x.reshape(1, 6) * 2, in_shardings=P(None, "i"))(x)
            y.full_tensor().sum().backward()
            return y.placements, x.grad
        if which == "user_error":
            return jit(lambda x, w: x @ w, in_shardings=(P("i"), P()))(torch.ones(4, 3), torch.ones(4, 5))
        h = torch.randn(2, 4, 4, dtype=torch.float64, generator=g)
        mix = torch.randn(4, 4, dtype=torch.float64, generator=g, requires_grad=True)
        args = (h, mix)
        if which == "stride0_grad":  # a sum's stride-0 gradient reaching a redistributed matmul output
            f = jit(lambda h, m: with_sharding_constraint((h.transpose(1, 2) @ m).transpose(1, 2), P("i")).sum(1))
        else:  # "mean_backward": a mean over a sharded dim, its gradient a pending sum
            w2 = torch.randn(4, 4, dtype=torch.float64, generator=g)

            def body(h, m, w2):
                y = ((h @ w2).transpose(1, 2) @ m).transpose(1, 2)
                y = with_sharding_constraint(y - y.mean(-1, keepdim=True), P(None, "i"))
                return (y @ w2).sum(1)

            f, args = jit(body, in_shardings=(P(), P(), P(None, "i"))), (h, mix, w2)
        f(*args).full_tensor().sum().backward()
        return mix.grad


def test_vocab_sharded_embedding_is_settled_right_away():
    # DTensor alone fails here twice: an IndexError reduce-scattering the lookup, and a bare
    # AssertionError when the gelu's backward reduces the same pending sum a second time.
    got = colofn.launch(_dtensor_limits_program, "vocab_embedding", world_size=2)
    g = torch.Generator().manual_seed(0)
    e, w = torch.randn(4, 4, generator=g).requires_grad_(), torch.randn(4, 4, generator=g)
    t = torch.randint(0, 4, (2, 2), generator=g)  # drawn in the program's order
    F.gelu(F.embedding(t, e) @ w).pow(2).sum().backward()
    assert_trees_close(got, [e.grad, e.grad])


def test_a_mesh_axis_of_size_1_shards_nothing():
    placements, grad = colofn.launch(_dtensor_limits_program, "size1_axis", world_size=1)[0]
    assert placements == (Replicate(),) and torch.equal(grad, torch.full((1, 1, 6), 2.0))


def test_dtensor_failures_inside_its_dispatch_become_jit_errors():
    with pytest.raises(JitError) as e:
        colofn.launch(_dtensor_limits_program, "uneven_view", world_size=2)
    text = str(e.value)
    assert "DTensor failed to run aten.view.default on these shardings (RuntimeError: Cannot unflatten unevenly sharded tensor" in text
    assert "limitation or bug of DTensor's sharding rules" in text and "x.view(2, 3, 2)" in text
    assert "input 0: float32[2, 6] P(None, 'i') on mesh(i=2), placements (Shard(dim=1),)" in text
    # an error of the program itself (wrong shapes) is left as it is
    with pytest.raises(RuntimeError, match=r"must have same reduction dim, but got \[4, 3\] X \[4, 5\]") as e:
        colofn.launch(_dtensor_limits_program, "user_error", world_size=2)
    assert not isinstance(e.value, JitError)


def test_stride0_gradients_through_a_constraint():
    got = colofn.launch(_dtensor_limits_program, "stride0_grad", world_size=2)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 4, dtype=torch.float64, generator=g)
    mix = torch.randn(4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    (h.transpose(1, 2) @ mix).transpose(1, 2).sum(1).sum().backward()
    assert_trees_close(got, [mix.grad, mix.grad])


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="DTensor (torch 2.13): backward of a mean over a sharded dim fails with Partial(sum) -> Partial(avg)")
def test_mean_over_a_sharded_dim_backward():
    colofn.launch(_dtensor_limits_program, "mean_backward", world_size=2)


def _grad_layout_program():
    g = torch.Generator().manual_seed(0)
    with colofn.Mesh((2,), ("tp",)):
        w1 = colofn.device_put(torch.randn(64, 256, generator=g), P(None, "tp")).requires_grad_()
        w2 = colofn.device_put(torch.randn(256, 64, generator=g), P("tp")).requires_grad_()
        x = torch.randn(4, 16, 64, generator=g)

        def loss(w1, w2, x, constrain):
            y = F.gelu(x @ w1) @ w2
            y = with_sharding_constraint(y, P()) if constrain else y
            return (y * y).mean()

        layouts = []
        for constrain in (False, True):  # without jit's care the first leaves w2.grad as Partial(sum)
            jit(loss, static_argnums=3)(w1, w2, x, constrain).backward()
            layouts.append((w1.grad.placements, w2.grad.placements))
        return layouts, w2.grad.full_tensor()


def test_a_dtensor_arguments_gradient_keeps_its_layout_and_accumulates():
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(64, 256, generator=g).requires_grad_(), torch.randn(256, 64, generator=g).requires_grad_()
    x = torch.randn(4, 16, 64, generator=g)
    y = F.gelu(x @ w1) @ w2
    (2 * (y * y).mean()).backward()
    for layouts, grad in colofn.launch(_grad_layout_program, world_size=2):
        assert layouts == [((Shard(1),), (Shard(0),))] * 2
        assert_trees_close(grad, w2.grad, rtol=1e-4, atol=1e-5)
