"""colofn.nn: functionalize, the way back, unsafe sharing, plans for modules and their ZeRO composition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import colofn
from colofn import P, optim, zero
from colofn import tree as jt
from colofn.errors import TreeError
from colofn.nn import (
    ModulePlan,
    ModuleSharingError,
    Rewrite,
    functionalize,
    hf,
    parallelize,
    to_state_dict,
    write_params,
)
from colofn.parallel import PlanError
from colofn.testing import assert_trees_close


def _encoder(seed=0, layers=2, d=8, heads=2, ff=16):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True) for _ in range(layers)])


def test_functionalize_paths_follow_the_module_tree_and_apply_equals_forward():
    net = _encoder()
    apply, params = functionalize(net)
    assert isinstance(params, list) and sorted(params[1]) == ["linear1", "linear2", "norm1", "norm2", "self_attn"]
    assert params[0]["self_attn"]["out_proj"]["weight"].shape == (8, 8)
    assert not any(t.requires_grad for t in jt.leaves(params))
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(apply(params, x), net(x))  # the same ops (a few ulps: MHA picks its path by requires_grad)
    before = {n: p.clone() for n, p in net.named_parameters()}
    apply(jt.map(torch.zeros_like, params), x)  # the module is never touched
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_functionalize_composes_with_torch_func():
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    apply, params = functionalize(net)
    x = torch.randn(7, 3)
    grads = torch.func.grad(lambda p: apply(p, x).sum())(params)
    net(x).sum().backward()
    assert_trees_close(to_state_dict(grads), {n: p.grad for n, p in net.named_parameters()})
    per_example = torch.func.vmap(lambda xi: apply(params, xi), in_dims=0)(x)
    torch.testing.assert_close(per_example, net(x))


def test_buffers_are_constants_or_explicit():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    apply, params = functionalize(net)
    assert set(to_state_dict(params)) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    with pytest.raises(TreeError, match=r"wrote into its buffers .*buffers=True"):
        apply(params, torch.randn(4, 2))
    assert torch.equal(net[1].running_mean, torch.zeros(2))  # the module is never touched
    apply, params = functionalize(net, buffers=True)
    names = set(to_state_dict(params))
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= names
    apply(params, torch.randn(4, 2))  # updates the running stats passed in, not the module's
    assert torch.equal(net[1].running_mean, torch.zeros(2))
    assert not torch.equal(params[1]["running_mean"], torch.zeros(2))


def test_params_that_do_not_match_name_the_paths():
    apply, params = functionalize(nn.Linear(2, 3))
    with pytest.raises(TreeError, match=r"missing \['bias'\]; unexpected \['b'\]"):
        apply({"weight": params["weight"], "b": params["bias"]}, torch.ones(2))


def test_write_params_round_trip_and_shape_errors():
    net = _encoder()
    _, params = functionalize(net)
    new = jt.map(lambda t: t + 1, params)
    write_params(net, new)
    assert_trees_close(to_state_dict(functionalize(net)[1]), to_state_dict(new))
    with pytest.raises(TreeError, match=r"\[0\]\['linear1'\]\['bias'\] has shape \(3,\) but the module's is \(16,\)"):
        write_params(net, {0: {"linear1": {"bias": torch.zeros(3)}}})


class _CollectiveInside(nn.Module):
    """A module whose forward waits for every rank: ranks are inside it at the same time."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return colofn.psum(self.lin(x), "dp")


def test_functional_call_on_a_shared_module_is_detected_with_the_fix():
    net = _CollectiveInside()

    def program():
        mesh = colofn.Mesh((2,), ("dp",))
        f = colofn.shard_map(lambda p, x: torch.func.functional_call(net, p, (x,)).sum(), mesh=mesh,
                             in_specs=(P(), P("dp")), out_specs=P())
        return f(dict(net.named_parameters()), torch.ones(2, 2))

    with pytest.raises(ModuleSharingError, match=r"another rank is running .*colofn\.nn\.functionalize\(module\)"):
        colofn.launch(program, world_size=2)


def test_issue_example_dp_and_zero2_over_functionalized_encoder_equals_one_device():
    """The issue's case: two TransformerEncoderLayers, dp + ZeRO-2 on simulated ranks."""
    net = _encoder(layers=2)
    apply, params = functionalize(net)
    x, y = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    loss_fn = lambda p, b: (apply(p, b["x"]) - b["y"]).square().mean()  # noqa: E731
    opt = optim.sgd(0.1, momentum=0.9)  # not Adam: the key bias's gradient is exactly 0, Adam would scale its noise to lr

    def program():
        mesh = colofn.Mesh((2,), ("dp",))
        state = zero.init(params, opt, mesh, axis="dp", stage=2)
        for _ in range(2):
            state, info = zero.train_step(loss_fn, opt, state, {"x": x, "y": y})
        return to_state_dict(jt.map(lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t, zero.params(state)))

    got = colofn.launch(program, world_size=2)[0]
    ref = jt.map(lambda t: t.clone(), params)
    state = opt.init(ref)
    for _ in range(2):
        g = torch.func.grad(loss_fn)(ref, {"x": x, "y": y})
        updates, state = opt.update(g, state, ref)
        ref = optim.apply_updates(ref, updates)
    assert_trees_close(got, to_state_dict(ref), rtol=1e-5, atol=1e-6)


def test_encoder_plan_tp_equals_one_device():
    net = _encoder(layers=2, d=8, heads=2, ff=8)
    x = torch.randn(2, 3, 8)

    def program():
        mesh = colofn.Mesh((2, 2), ("dp", "tp"))
        par = parallelize(net, hf.plan_for(net, dp="dp", tp="tp"), mesh)
        f = colofn.shard_map(lambda p, x: colofn.pmean(par.apply(p, x).square().mean(), "dp"), mesh=mesh,
                             in_specs=(par.specs, P("dp")), out_specs=P())
        params = jt.map(torch.Tensor.requires_grad_, par.shard())
        loss = f(params, x)
        g = torch.autograd.grad(loss.to_local(), jt.leaves(params))
        return float(loss.to_local()), to_state_dict(par.module_params(jt.unflatten(jt.structure(params), g)))

    loss, grads = colofn.launch(program, world_size=4)[0]
    ref = net(x).square().mean()
    ref_g = dict(zip([n for n, _ in net.named_parameters()], torch.autograd.grad(ref, list(net.parameters())), strict=True))
    assert abs(loss - float(ref)) < 1e-6
    assert_trees_close(grads, ref_g, rtol=1e-5, atol=1e-7)


def test_plan_errors_list_every_problem_before_communication():
    net = _encoder(heads=2)
    with pytest.raises(PlanError, match="sp=True splits the sequence over the tp axis, but tp is None"):
        hf.plan_for(net, dp="dp", sp=True)
    plan = hf.plan_for(net, tp="tp", sp=True)

    def program():
        parallelize(net, plan, colofn.Mesh((3,), ("tp",)))

    with pytest.raises(PlanError) as e:
        colofn.launch(program, world_size=3)
    text = str(e.value)
    assert "['0']['linear1']['weight']: dim 0 of shape (16, 8) is not divisible by 3 (spec P('tp'))" in text.replace("[0]", "['0']")
    assert "0.self_attn.num_heads=2 is not divisible by tp=3; attention heads are split over tp" in text
    assert "1.self_attn.num_heads=2 is not divisible by tp=3" in text
    mixed = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                          nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0))
    with pytest.raises(PlanError, match="mix batch_first=True and False"):
        hf.plan_for(mixed, tp="tp")
    with pytest.raises(PlanError, match="no shipped plan for Linear"):
        hf.plan_for(nn.Linear(2, 2))
    dropout = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1))

    def program2():
        parallelize(dropout, hf.plan_for(dropout, dp="dp"), colofn.Mesh((1,), ("dp",)))

    with pytest.raises(PlanError, match=r"nn.Dropout\(p=0.1\) in training mode"):
        colofn.launch(program2, world_size=1)

    def program3():
        parallelize(net, ModulePlan(rules=((r"nothing", P("tp")),), tp="tp"), colofn.Mesh((1,), ("tp",)))

    with pytest.raises(PlanError, match="no rule of plan matches a parameter of Sequential"):
        colofn.launch(program3, world_size=1)


def test_functionalized_module_under_jit_equals_one_device():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    apply, params = functionalize(net)
    x = torch.randn(6, 4)

    def program():
        with colofn.Mesh((2,), ("dp",)):
            f = colofn.jit(lambda p, x: apply(p, x).square().mean(), in_shardings=(P(), P("dp")))
            ps = jt.map(lambda t: t.detach().requires_grad_(), params)
            out = f(ps, x)
            grads = torch.autograd.grad(out.to_local(), jt.leaves(ps))
            return float(out.full_tensor()), [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]

    loss, grads = colofn.launch(program, world_size=2)[0]
    ps = jt.map(lambda t: t.detach().requires_grad_(), params)
    ref = apply(ps, x).square().mean()
    assert abs(loss - float(ref)) < 1e-6
    assert_trees_close(grads, list(torch.autograd.grad(ref, jt.leaves(ps))), rtol=1e-5, atol=1e-7)


def _mha_plan():
    return ModulePlan(rules=((r"in_proj_(weight|bias)", P(None, "tp")), (r"out_proj\.weight", P(None, "tp"))),
                      rewrites=((r"", Rewrite("mha")),), packed=((r"in_proj_(weight|bias)", 0, 3),), tp="tp")


def test_mha_rewrite_splits_a_bare_multihead_attention_by_heads():
    """Rewrite("mha") on its own: each rank holds its heads' q, k, v rows; misuse raises before any collective."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 4, batch_first=True)
    x, other = torch.randn(2, 5, 8), torch.randn(2, 5, 8)

    def program():
        mesh = colofn.Mesh((2,), ("tp",))
        par = parallelize(mha, _mha_plan(), mesh)
        shapes = {n: tuple(t.to_local().shape) for n, t in to_state_dict(par.shard()).items()}
        f = colofn.shard_map(lambda p, x: par.apply(p, x, x, x, need_weights=False)[0], mesh=mesh,
                             in_specs=(par.specs, P()), out_specs=P())
        out = f(par.shard(), x).full_tensor()
        errors = []
        for call in (lambda p, x: par.apply(p, x, other, other, need_weights=False)[0],  # cross-attention
                     lambda p, x: par.apply(p, x, x, x)[0]):  # need_weights=True, nn.MultiheadAttention's default
            with pytest.raises(ValueError) as e:
                colofn.shard_map(call, mesh=mesh, in_specs=(par.specs, P()), out_specs=P())(par.shard(), x)
            errors.append(str(e.value))
        return shapes, out, errors

    shapes, out, errors = colofn.launch(program, world_size=2)[0]
    assert shapes["in_proj_weight"] == (3, 4, 8) and shapes["in_proj_bias"] == (3, 4)
    assert shapes["out_proj.weight"] == (8, 4) and shapes["out_proj.bias"] == (8,)
    torch.testing.assert_close(out, mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)
    assert "runs self-attention only" in errors[0]
    assert "does not return attention weights" in errors[1] and "need_weights=False" in errors[1]
    dropout = nn.MultiheadAttention(8, 4, dropout=0.1)

    def program2():
        parallelize(dropout, _mha_plan(), colofn.Mesh((1,), ("tp",)))

    with pytest.raises(PlanError, match=r"the module is nn.MultiheadAttention\(dropout=0.1\) in training mode"):
        colofn.launch(program2, world_size=1)
    cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)

    def program3():
        parallelize(cross, _mha_plan(), colofn.Mesh((2,), ("tp",)))

    with pytest.raises(PlanError) as e:
        colofn.launch(program3, world_size=2)
    assert "the module: Rewrite('mha') needs the packed in_proj_weight (kdim = vdim = embed_dim)" in str(e.value)



def test_pipeline_stages_refuse_a_stack_they_do_not_cover():
    from colofn.nn._stages import check_stages

    stack = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 2, enable_nested_tensor=False)
    with pytest.raises(PlanError, match="not a module without a Hugging Face config; for another stack, write its stage functions"):
        check_stages(stack, 2)
