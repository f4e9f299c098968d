"""Unit tests of colofn.optim: behaviour, purity, dtypes, and the text of its errors."""

from __future__ import annotations

import math

import pytest
import torch

from colofn import optim
from colofn import tree as ctree
from colofn.errors import (
    OptimizerError,
    OptimizerTypeError,
    ShapeError,
    TreeError,
    TreeTypeError,
)


def _params() -> dict:
    return {
        "layers": [{"w": torch.randn(2, 3), "b": torch.randn(3)}],
        "head": torch.randn(3, dtype=torch.float64),
    }


def _like(tree: object, value: float = 0.5) -> object:
    return ctree.map(lambda p: torch.full_like(p, value), tree)


ALL = {
    "sgd": lambda: optim.sgd(0.1),
    "sgd_momentum": lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adam": lambda: optim.adam(1e-2, weight_decay=0.1),
    "adamw": lambda: optim.adamw(1e-2),
    "clip": lambda: optim.clip_by_global_norm(1.0),
    "chain": lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2)),
}


# -- behaviour ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_update_is_pure(name):
    opt = ALL[name]()
    params = _params()
    state = opt.init(params)
    grads = _like(params, 3.0)
    before = [x.clone() for x in ctree.leaves((params, state, grads))]
    updates, new_state = opt.update(grads, state, params)
    updates2, new_state2 = opt.update(grads, state, params)
    after = ctree.leaves((params, state, grads))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert ctree.structure(updates) == ctree.structure(params)
    assert ctree.structure(new_state) == ctree.structure(state)
    for a, b in zip(
        ctree.leaves((updates, new_state)), ctree.leaves((updates2, new_state2)), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_state_is_a_pytree_of_tensors_shaped_like_params(name):
    params = _params()
    state = ALL[name]().init(params)
    for path, leaf in ctree.leaves_with_path(state):
        assert isinstance(leaf, torch.Tensor), ctree.keystr(path)
        if not ctree.keystr(path).endswith(".count"):
            assert not leaf.requires_grad


def test_state_layouts():
    params = _params()
    s = optim.sgd(0.1, momentum=0.9).init(params)
    assert type(s) is optim.SgdState and s._fields == ("count", "momentum")
    assert s.count.shape == () and s.count.dtype == torch.int32 and s.count.device.type == "cpu"
    assert ctree.structure(s.momentum) == ctree.structure(params)
    assert optim.sgd(0.1).init(params).momentum is None
    a = optim.adamw().init(params)
    assert type(a) is optim.AdamState and a._fields == ("count", "mu", "nu")
    for buf in (a.mu, a.nu):
        for p, b in zip(ctree.leaves(params), ctree.leaves(buf), strict=True):
            assert b.shape == p.shape and b.dtype == p.dtype and not b.any()
    assert optim.clip_by_global_norm(1.0).init(params) == optim.EmptyState()
    chained = optim.chain(optim.clip_by_global_norm(1.0), optim.adam()).init(params)
    assert type(chained) is tuple and type(chained[1]) is optim.AdamState


def test_chain_returns_a_gradient_transformation_and_nests():
    inner = optim.chain(optim.clip_by_global_norm(1.0))
    opt = optim.chain(inner, optim.sgd(1.0))
    assert isinstance(opt, optim.GradientTransformation)
    params = {"w": torch.zeros(2)}
    updates, state = opt.update({"w": torch.tensor([6.0, 8.0])}, opt.init(params), params)
    torch.testing.assert_close(updates["w"], torch.tensor([-0.6, -0.8]))
    assert state[0] == (optim.EmptyState(),)


def test_apply_updates_keeps_dtype_device_and_requires_grad():
    params = {"a": torch.ones(2, dtype=torch.bfloat16, requires_grad=True), "b": torch.ones(1)}
    out = optim.apply_updates(params, {"a": torch.full((2,), 0.5), "b": torch.ones(1)})
    assert out["a"].dtype == torch.bfloat16 and out["a"].requires_grad and out["a"].is_leaf
    assert not out["b"].requires_grad
    torch.testing.assert_close(out["a"], torch.full((2,), 1.5, dtype=torch.bfloat16))
    assert torch.equal(params["a"], torch.ones(2, dtype=torch.bfloat16))  # not modified


def test_functional_training_loop_with_autograd():
    """update runs under no_grad; apply_updates gives leaves that autograd can use again."""
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    params = {"w": torch.zeros(3, requires_grad=True), "b": torch.zeros((), requires_grad=True)}
    opt = optim.chain(optim.clip_by_global_norm(10.0), optim.adam(0.1))
    state = opt.init(params)
    losses = []
    for _ in range(30):
        loss = ((x @ params["w"] + params["b"] - y) ** 2).mean()
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        updates, state = opt.update(grads, state, params)
        assert all(u.grad_fn is None for u in ctree.leaves(updates))
        params = optim.apply_updates(params, updates)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0]


def test_update_under_no_grad_and_with_grad_requiring_params():
    params = {"w": torch.ones(3, requires_grad=True)}
    opt = optim.adamw(0.1)
    with torch.no_grad():
        u1, s1 = opt.update({"w": torch.ones(3)}, opt.init(params), params)
    u2, s2 = opt.update({"w": torch.ones(3)}, opt.init(params), params)
    assert torch.equal(u1["w"], u2["w"]) and u2["w"].grad_fn is None
    assert not any(t.requires_grad for t in ctree.leaves(s2))


def test_mixed_precision_fp32_master_params_take_bf16_grads():
    params = {"w": torch.randn(4)}  # fp32 master weights
    grads32 = {"w": torch.randn(4)}
    grads16 = ctree.map(lambda g: g.to(torch.bfloat16), grads32)
    opt = optim.adamw(1e-2, weight_decay=0.1)
    u16, s16 = opt.update(grads16, opt.init(params), params)
    u32, _ = opt.update(ctree.map(lambda g: g.float(), grads16), opt.init(params), params)
    assert u16["w"].dtype == torch.float32 and s16.mu["w"].dtype == torch.float32
    assert torch.equal(u16["w"], u32["w"])
    sgd_u, _ = optim.sgd(0.1).update(grads16, optim.sgd(0.1).init(params), params)
    assert sgd_u["w"].dtype == torch.float32


def test_sgd_without_params_and_empty_trees():
    opt = optim.sgd(0.5, momentum=0.9)
    updates, state = opt.update([torch.ones(2)], opt.init([torch.zeros(2)]))
    torch.testing.assert_close(updates[0], torch.full((2,), -0.5))
    for o in ALL.values():
        u, s = o().update({}, o().init({}), {})
        assert u == {}
    assert optim.global_norm({}) == 0


def test_schedule_as_lr_uses_the_count_before_the_update():
    seen = []

    def schedule(step: int) -> float:
        seen.append(step)
        return 0.1 * (step + 1)

    opt = optim.sgd(schedule)
    params = [torch.zeros(1)]
    state = opt.init(params)
    for _ in range(3):
        updates, state = opt.update([torch.ones(1)], state, params)
        params = optim.apply_updates(params, updates)
    assert seen == [0, 1, 2]
    torch.testing.assert_close(params[0], torch.tensor([-0.6]))


def test_adam_state_is_interchangeable_with_adamw():
    params = {"w": torch.randn(3)}
    state = optim.adam().init(params)
    _, state = optim.adamw().update({"w": torch.ones(3)}, state, params)
    assert type(state) is optim.AdamState and int(state.count) == 1


# -- errors -------------------------------------------------------------------------------


def _grads_missing_and_extra() -> dict:
    return {"layers": [{"w": torch.ones(2, 3)}], "head": torch.ones(3), "extra": torch.ones(1)}


def test_error_grads_tree_mismatch_names_paths():
    params = _params()
    opt = optim.adamw()
    with pytest.raises(TreeError) as e:
        opt.update(_grads_missing_and_extra(), opt.init(params), params)
    msg = str(e.value)
    assert msg.startswith(
        "adamw update: grads does not have the tree structure of the optimizer state "
        "(its buffers mirror the params given to init):\n"
    )
    assert "  * ['layers'][0]['b']: in the optimizer state but not in grads" in msg
    assert "  * ['extra']: in grads but not in the optimizer state" in msg
    assert "Fix: give grads exactly the structure" in msg
    assert isinstance(e.value, ValueError)


def test_error_grads_vs_params_when_the_state_has_no_buffers():
    params = _params()
    opt = optim.sgd(0.1)
    with pytest.raises(
        TreeError, match=r"(?s)sgd update: grads does not .* of params:.*\['extra'\]"
    ):
        opt.update(_grads_missing_and_extra(), opt.init(params), params)


def test_error_none_grad_is_an_empty_subtree():
    params = {"a": torch.ones(1), "b": torch.ones(1)}
    opt = optim.adam()
    with pytest.raises(TreeError, match=r"\['b'\]: in the optimizer state but not in grads"):
        opt.update({"a": torch.ones(1), "b": None}, opt.init(params), params)


def test_error_shape_mismatch_names_path():
    params = _params()
    grads = _like(params)
    grads["layers"][0]["w"] = torch.ones(3, 3)
    opt = optim.sgd(0.1, momentum=0.9)
    with pytest.raises(ShapeError) as e:
        opt.update(grads, opt.init(params), params)
    assert "  * ['layers'][0]['w']: grads has shape (3, 3), the optimizer state" in str(e.value)
    assert "has (2, 3)" in str(e.value)


def test_error_non_tensor_leaf_names_path():
    params = {"w": torch.ones(2)}
    opt = optim.adam()
    with pytest.raises(
        TreeTypeError, match=r"grads given to adam update.*\n  \* \['w'\]: got float 1.0"
    ):
        opt.update({"w": 1.0}, opt.init(params), params)


@pytest.mark.parametrize(
    "make_state, opt, expected",
    [
        (
            lambda p: optim.sgd(0.1).init(p),
            optim.adam(),
            "adam update: state is a SgdState (made by sgd(...).init), not the AdamState",
        ),
        (
            lambda p: optim.adamw().init(p),
            optim.sgd(0.1),
            "sgd update: state is an AdamState (made by adam(...).init or adamw(...).init), not the SgdState",
        ),
        (
            lambda p: optim.chain(optim.sgd(0.1)).init(p),
            optim.adamw(),
            "adamw update: state is a tuple (made by chain(...).init)",
        ),
        (
            lambda p: optim.adam().init(p),
            optim.clip_by_global_norm(1.0),
            "clip_by_global_norm update: state is an AdamState",
        ),
        (
            lambda p: optim.adam().init(p),
            optim.chain(optim.adam()),
            "chain update: state is an AdamState, not the tuple of 1 states",
        ),
        (
            lambda p: (optim.EmptyState(),),
            optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1)),
            "chain update: state is a tuple of 1, not the tuple of 2 states",
        ),
    ],
)
def test_error_state_from_another_optimizer(make_state, opt, expected):
    params = {"w": torch.ones(2)}
    with pytest.raises(OptimizerTypeError) as e:
        opt.update(_like(params), make_state(params), params)
    assert str(e.value).startswith(expected)
    assert "Fix: pass the state returned by this" in str(e.value)
    assert isinstance(e.value, TypeError)


def test_error_sgd_state_with_other_momentum_setting():
    params = {"w": torch.ones(2)}
    with pytest.raises(
        OptimizerTypeError,
        match="this sgd has momentum=0.9 but the state was made by an sgd without momentum",
    ):
        optim.sgd(0.1, momentum=0.9).update(_like(params), optim.sgd(0.1).init(params), params)


@pytest.mark.parametrize(
    "make, expected",
    [
        (
            lambda: optim.sgd(-0.1),
            "sgd: hyperparameters out of range:\n  * lr=-0.1: must be finite and >= 0",
        ),
        (lambda: optim.adam(math.nan), "  * lr=nan: must be finite and >= 0"),
        (lambda: optim.adamw(math.inf), "  * lr=inf: must be finite and >= 0"),
        (
            lambda: optim.adam(1e-3, b1=1.0, b2=-0.1, eps=0.0),
            "  * b1=1.0: must be in [0, 1)\n  * b2=-0.1: must be in [0, 1)\n  * eps=0.0: must be finite and > 0",
        ),
        (lambda: optim.adamw(eps=-1e-8), "  * eps=-1e-08: must be finite and > 0"),
        (lambda: optim.adamw(weight_decay=-0.1), "  * weight_decay=-0.1: must be finite and >= 0"),
        (lambda: optim.sgd(0.1, momentum=-0.5), "  * momentum=-0.5: must be finite and >= 0"),
        (
            lambda: optim.sgd(0.1, nesterov=True),
            "sgd: nesterov=True needs momentum > 0, got momentum=0.0.",
        ),
        (lambda: optim.clip_by_global_norm(0.0), "  * max_norm=0.0: must be finite and > 0"),
        (lambda: optim.clip_by_global_norm(-1.0), "  * max_norm=-1.0: must be finite and > 0"),
        (lambda: optim.clip_by_global_norm(math.nan), "  * max_norm=nan: must be finite and > 0"),
    ],
)
def test_error_bad_hyperparameters(make, expected):
    with pytest.raises(OptimizerError) as e:
        make()
    assert expected in str(e.value)
    assert "Fix: " in str(e.value)


def test_error_bad_hyperparameter_types():
    with pytest.raises(
        OptimizerTypeError, match=r"adam: lr='0.1' is a str; expected a float or a schedule"
    ):
        optim.adam("0.1")
    with pytest.raises(OptimizerTypeError, match=r"b1=None is a NoneType, not a real number"):
        optim.adam(b1=None)
    with pytest.raises(OptimizerTypeError, match=r"argument 0: function"):
        optim.chain(optim.sgd, optim.sgd(0.1))


def test_error_schedule_gives_bad_lr_names_step():
    opt = optim.sgd(optim.linear_schedule(0.1, -0.1, transition_steps=2))
    params = [torch.zeros(1)]
    state = opt.init(params)
    _, state = opt.update([torch.ones(1)], state, params)
    _, state = opt.update([torch.ones(1)], state, params)  # lr 0.0 is allowed
    with pytest.raises(
        OptimizerError,
        match=r"sgd update: the lr schedule 'linear_schedule\(.*\)' returned -0.1 at step 2",
    ):
        opt.update([torch.ones(1)], state, params)


def test_error_weight_decay_needs_params():
    for opt in (optim.sgd(0.1, weight_decay=0.1), optim.adam(weight_decay=0.1), optim.adamw()):
        with pytest.raises(
            OptimizerError,
            match=r"update: weight_decay=0\.\d+ needs the params\.\nFix: call update\(grads, state, params\)",
        ):
            opt.update([torch.ones(1)], opt.init([torch.ones(1)]))


def test_error_apply_updates_mismatch():
    params = {"a": [torch.ones(1), torch.ones(2)]}
    with pytest.raises(
        TreeError,
        match=r"apply_updates: updates does not have the tree structure of params:\n  \* \['a'\]\[1\]: in params but not in updates",
    ):
        optim.apply_updates(params, {"a": [torch.ones(1)]})
    with pytest.raises(TreeError, match="same leaf paths, different containers"):
        optim.apply_updates(params, {"a": (torch.ones(1), torch.ones(2))})
    with pytest.raises(
        ShapeError, match=r"\['a'\]\[1\]: updates has shape \(3,\), params has \(2,\)"
    ):
        optim.apply_updates(params, {"a": [torch.ones(1), torch.ones(3)]})


# -- update_in_place ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("schedule", [False, True])
def test_update_in_place_equals_update_then_apply(name, schedule):
    """Bit for bit where the functional path is taken; Adam/AdamW's twin runs torch.optim's kernels, whose
    params differ from update + apply_updates by float rounding only (the moments are the same bits)."""
    if schedule and name.startswith("adam"):
        opt = getattr(optim, name)(optim.linear_schedule(1e-2, 1e-3, 3), weight_decay=0.2)
    else:
        opt = ALL[name]()
    torch.manual_seed(0)
    params = _params()
    ref_params, ref_state = ctree.map(torch.clone, params), opt.init(params)
    state = opt.init(params)
    for _ in range(3):
        grads = ctree.map(torch.randn_like, params)
        updates, ref_state = opt.update(grads, ref_state, ref_params)
        ref_params = optim.apply_updates(ref_params, updates)
        state = optim.update_in_place(opt, grads, state, params)
    for a, b in zip(ctree.leaves(ref_state), ctree.leaves(state), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(ctree.leaves(ref_params), ctree.leaves(params), strict=True):
        assert a.dtype == b.dtype
        if name.startswith("adam"):
            torch.testing.assert_close(a, b, rtol=4 * torch.finfo(a.dtype).eps, atol=1e-12)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_update_in_place_is_torch_optim_adam_bit_for_bit(decoupled, weight_decay):
    """Five steps of Adam/AdamW in place against torch.optim's foreach implementation on the same
    tensors (fp32 and fp64 groups): params and moments are the same bits."""
    torch.manual_seed(1)
    params = _params()
    twins = [torch.nn.Parameter(p.clone()) for p in ctree.leaves(params)]
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    torch_opt = kind(twins, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, foreach=True)
    opt = (optim.adamw if decoupled else optim.adam)(3e-2, b1=0.8, b2=0.95, eps=1e-6, weight_decay=weight_decay)
    state = opt.init(params)
    for _ in range(5):
        grads = ctree.map(torch.randn_like, params)
        state = optim.update_in_place(opt, grads, state, params)
        for t, g in zip(twins, ctree.leaves(grads), strict=True):
            t.grad = g.clone()
        torch_opt.step()
    for p, t, mu, nu in zip(ctree.leaves(params), twins, ctree.leaves(state.mu), ctree.leaves(state.nu), strict=True):
        assert torch.equal(p, t.detach())
        assert torch.equal(mu, torch_opt.state[t]["exp_avg"]) and torch.equal(nu, torch_opt.state[t]["exp_avg_sq"])


def test_update_in_place_reuses_adam_buffers_and_writes_params():
    opt = optim.adamw(1e-2)
    params = _params()
    state = opt.init(params)
    ids = [id(t) for t in ctree.leaves((params, state.mu, state.nu))]
    new = optim.update_in_place(opt, _like(params, 3.0), state, params)
    assert [id(t) for t in ctree.leaves((params, new.mu, new.nu))] == ids  # torch.optim's footprint: no new buffers
    assert int(new.count) == 1


def test_update_in_place_with_tied_params_takes_the_functional_path():
    opt = optim.adamw(1e-1, weight_decay=0.5)
    w = torch.tensor([1.0, -2.0])
    params = {"a": w, "b": w.view(2)}  # one storage, two leaves: an in-place twin would step it twice
    ref, _ = opt.update(_like(params, 1.0), opt.init(params), params)
    expected = optim.apply_updates(params, ref)["a"]
    optim.update_in_place(opt, _like(params, 1.0), opt.init(params), params)
    assert torch.equal(w, expected)
