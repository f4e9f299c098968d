"""colofn.optim against torch.optim, step for step, on random pytrees and gradients.

Each example draws a pytree of float32/float64 tensors (nested dicts and
lists, random small shapes), a few steps of random gradients and an optimizer
configuration, runs the same steps through ``torch.optim`` (with
``clip_grad_norm_`` and ``LambdaLR`` where the configuration has them) and
checks params and optimizer state after every step.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from colofn import optim
from colofn import tree as ctree

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=2e-6, atol=2e-7), torch.float64: dict(rtol=1e-12, atol=1e-14)}


# -- pytrees of shapes and dtypes ---------------------------------------------------------

leaf_specs = st.tuples(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), st.sampled_from(DTYPES)
)
keys = st.text("abcdefgh", min_size=1, max_size=3)
tree_specs = st.recursive(
    leaf_specs,
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3),
        st.dictionaries(keys, children, min_size=1, max_size=3),
    ),
    max_leaves=6,
)


def _is_spec(x: object) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.dtype)


def _draw_tree(spec: object, gen: torch.Generator, scale: float = 1.0) -> object:
    return ctree.map(
        lambda s: (torch.randn(s[0], generator=gen, dtype=torch.float64) * scale).to(s[1]),
        spec,
        is_leaf=_is_spec,
    )


# -- optimizer configurations -----------------------------------------------------------

lrs = st.floats(1e-3, 0.5)
schedules = st.one_of(
    st.none(),
    st.builds(lambda: optim.linear_warmup(0.1, warmup_steps=2, init_value=0.01)),
    st.builds(lambda: optim.cosine_decay_schedule(0.2, decay_steps=3, alpha=0.1)),
    st.builds(lambda: optim.warmup_cosine_decay_schedule(0.0, 0.3, warmup_steps=1, decay_steps=4)),
    st.builds(lambda: optim.piecewise_constant_schedule(0.1, {1: 0.5, 3: 0.1})),
)


@st.composite
def configs(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["sgd", "adam", "adamw"]))
    cfg: dict = {"kind": kind, "lr": draw(lrs), "schedule": draw(schedules)}
    cfg["weight_decay"] = draw(st.sampled_from([0.0, 0.0, 1e-2, 0.3]))
    if kind == "sgd":
        cfg["momentum"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
        cfg["nesterov"] = cfg["momentum"] > 0 and draw(st.booleans())
    else:
        cfg["b1"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
        cfg["b2"] = draw(st.sampled_from([0.9, 0.999]))
        cfg["eps"] = draw(st.sampled_from([1e-8, 1e-3]))
    cfg["max_norm"] = draw(st.one_of(st.none(), st.floats(0.05, 5.0)))
    cfg["foreach"] = draw(st.booleans())
    return cfg


def _ours(cfg: dict) -> optim.GradientTransformation:
    lr = cfg["schedule"] or cfg["lr"]
    if cfg["kind"] == "sgd":
        opt = optim.sgd(lr, cfg["momentum"], cfg["nesterov"], cfg["weight_decay"])
    else:
        make = optim.adam if cfg["kind"] == "adam" else optim.adamw
        opt = make(lr, cfg["b1"], cfg["b2"], cfg["eps"], cfg["weight_decay"])
    if cfg["max_norm"] is not None:
        opt = optim.chain(optim.clip_by_global_norm(cfg["max_norm"]), opt)
    return opt


def _torch(cfg: dict, params: list[torch.Tensor]) -> tuple[torch.optim.Optimizer, object]:
    lr = 1.0 if cfg["schedule"] else cfg["lr"]  # LambdaLR multiplies the base lr
    common = dict(lr=lr, weight_decay=cfg["weight_decay"], foreach=cfg["foreach"])
    if cfg["kind"] == "sgd":
        opt = torch.optim.SGD(params, momentum=cfg["momentum"], nesterov=cfg["nesterov"], **common)
    else:
        cls = torch.optim.Adam if cfg["kind"] == "adam" else torch.optim.AdamW
        opt = cls(params, betas=(cfg["b1"], cfg["b2"]), eps=cfg["eps"], **common)
    sched = cfg["schedule"] and torch.optim.lr_scheduler.LambdaLR(opt, cfg["schedule"])
    return opt, sched


def _torch_state(cfg: dict, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list:
    """torch's per-param buffers, in the order of our state's buffer trees."""
    st_ = [opt.state[p] for p in params]
    if cfg["kind"] == "sgd":
        return [[s["momentum_buffer"] for s in st_]] if cfg["momentum"] else []
    return [[s["exp_avg"] for s in st_], [s["exp_avg_sq"] for s in st_]]


def _our_state(cfg: dict, state: object) -> list:
    if cfg["max_norm"] is not None:
        state = state[1]
    if cfg["kind"] == "sgd":
        return [ctree.leaves(state.momentum)] if cfg["momentum"] else []
    return [ctree.leaves(state.mu), ctree.leaves(state.nu)]


def _close(ours: list[torch.Tensor], ref: list[torch.Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        torch.testing.assert_close(
            a, b.detach(), **TOL[a.dtype], msg=lambda m, i=i: f"{what}[{i}]: {m}"
        )


@given(
    spec=tree_specs,
    cfg=configs(),
    n_steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    grad_scale=st.sampled_from([1e-3, 1.0, 10.0]),
)
def test_matches_torch_optim_step_for_step(spec, cfg, n_steps, seed, grad_scale):
    gen = torch.Generator().manual_seed(seed)
    params = _draw_tree(spec, gen)
    grads_seq = [_draw_tree(spec, gen, grad_scale) for _ in range(n_steps)]

    tparams = [p.clone().requires_grad_() for p in ctree.leaves(params)]
    topt, tsched = _torch(cfg, tparams)
    opt = _ours(cfg)
    state = opt.init(params)

    for step, grads in enumerate(grads_seq):
        for p, g in zip(tparams, ctree.leaves(grads), strict=True):
            p.grad = g.clone()
        if cfg["max_norm"] is not None:
            torch.nn.utils.clip_grad_norm_(tparams, cfg["max_norm"], foreach=cfg["foreach"])
        topt.step()
        if tsched:
            tsched.step()

        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)

        _close(ctree.leaves(params), tparams, f"params after step {step + 1}")
        for k, (ours, ref) in enumerate(
            zip(_our_state(cfg, state), _torch_state(cfg, topt, tparams), strict=True)
        ):
            _close(ours, ref, f"state buffer {k} after step {step + 1}")
        count = (state[1] if cfg["max_norm"] is not None else state).count
        assert int(count) == step + 1


@given(spec=tree_specs, seed=st.integers(0, 2**16), max_norm=st.floats(1e-3, 10.0))
def test_clip_by_global_norm_matches_clip_grad_norm_(spec, seed, max_norm):
    gen = torch.Generator().manual_seed(seed)
    grads = _draw_tree(spec, gen)
    tparams = [torch.zeros_like(g, requires_grad=True) for g in ctree.leaves(grads)]
    for p, g in zip(tparams, ctree.leaves(grads), strict=True):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(tparams, max_norm)

    clip = optim.clip_by_global_norm(max_norm)
    clipped, _ = clip.update(grads, clip.init(grads))
    torch.testing.assert_close(optim.global_norm(grads), total, rtol=1e-12, atol=0)
    _close(ctree.leaves(clipped), [p.grad for p in tparams], "clipped grads")
    norm = float(optim.global_norm(clipped))
    assert norm <= max_norm * (1 + 1e-5) or math.isclose(norm, float(total), rel_tol=1e-5)


@given(
    schedule=st.sampled_from(
        [
            optim.constant_schedule(0.3),
            optim.linear_schedule(0.5, 0.05, transition_steps=5, transition_begin=2),
            optim.linear_warmup(0.2, warmup_steps=3),
            optim.cosine_decay_schedule(1.0, decay_steps=7, alpha=0.2),
            optim.warmup_cosine_decay_schedule(0.01, 1.0, warmup_steps=3, decay_steps=9),
            optim.warmup_linear_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=6),
        ]
    ),
    n_steps=st.integers(1, 12),
)
def test_schedule_matches_lambda_lr(schedule, n_steps):
    p = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, schedule)
    for step in range(n_steps):
        assert topt.param_groups[0]["lr"] == pytest.approx(schedule(step), abs=0)
        topt.step()
        sched.step()
    # Schedules are pure: calling one again gives the same values.
    assert [schedule(t) for t in range(n_steps)] == [schedule(t) for t in range(n_steps)]
