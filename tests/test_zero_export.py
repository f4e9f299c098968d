"""colofn.zero.export_state and zero.init(opt_state=..., step=...): a checkpoint taken on one mesh and stage
resumes on another (or without ZeRO) and takes the same steps as uninterrupted single-device training."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import colofn
from _zero_models import TP_SPECS, batches, tp_loss, tp_params, tp_single_loss
from colofn import optim, zero
from colofn import tree as jt
from colofn.errors import ConfigError, TreeError

DP = ((4,), ("dp",))
DP2 = ((2,), ("dp",))
DP3 = ((3,), ("dp",))
DPxTP = ((2, 2), ("dp", "tp"))
STEPS, K = 6, 3  # train K steps on mesh A, the rest on mesh B
TOL = 1e-12  # float64: only the summation order differs


def make_opt(name: str) -> optim.GradientTransformation:
    if name == "adamw_schedule":  # the lr depends on count: a resume that lost it would drift
        return optim.adamw(optim.linear_schedule(2e-2, 1e-3, STEPS), weight_decay=0.1)
    # a tuple of two states, two counts, three per-parameter buffers
    return optim.chain(optim.sgd(0.1, momentum=0.9, weight_decay=0.01), optim.adam(1e-2))


PARAMS = tp_params(3, 6, 5, torch.float64)  # units l1 (24 values) and l2 (35): padded for dp = 2, 3, 4
DATA = batches([3, 5], 12, STEPS, torch.float64)


def reference(opt_name: str, params: Any, opt_state: Any, data: list[Any]) -> list[tuple[float, Any, Any]]:
    """Plain colofn.optim on one device: (loss, params after, opt_state after) per step."""
    opt = make_opt(opt_name)
    p = jt.map(lambda x: x.detach().clone().requires_grad_(True), params)
    state = opt.init(p) if opt_state is None else opt_state
    out = []
    for batch in data:
        loss = tp_single_loss(p, batch)
        leaves, treedef = jt.flatten(p)
        grads = jt.unflatten(treedef, torch.autograd.grad(loss, leaves))
        updates, state = opt.update(grads, state, p)
        p = optim.apply_updates(p, updates)
        out.append((float(loss), jt.map(lambda x: x.detach(), p), state))
    return out


def program(mesh: tuple, stage: int, opt_name: str, data: list[Any], ckpt: dict[str, Any], **kw: Any) -> list[tuple[float, dict[str, Any]]]:
    """Resume from the global ``ckpt`` on ``mesh``; after every step, the loss and the exported state."""
    m = colofn.Mesh(*mesh)
    tp = "tp" in m.axis_names
    resume = dict(ckpt)
    if tp:
        resume["params"] = colofn.device_put(resume["params"], TP_SPECS, mesh=m)
    opt = make_opt(opt_name)
    state = zero.init(optimizer=opt, mesh=m, stage=stage, **resume, **kw)
    out = []
    for batch in data:
        state, info = zero.train_step(tp_loss if tp else tp_single_loss, opt, state, batch)
        out.append((float(info.loss), zero.export_state(state)))
    return out


def run(mesh: tuple, stage: int, opt_name: str, data: list[Any], ckpt: dict[str, Any], **kw: Any) -> list[tuple[float, dict[str, Any]]]:
    results = colofn.launch(program, mesh, stage, opt_name, data, ckpt, world_size=math.prod(mesh[0]), **kw)
    for rank, r in enumerate(results[1:], 1):  # every rank exports the same values
        for (la, ea), (lb, eb) in zip(results[0], r, strict=True):
            assert la == lb
            assert_same(ea, eb, f"rank {rank}")
    return results[0]


def assert_same(a: Any, b: Any, what: str, tol: float = 0.0) -> None:
    assert jt.structure(a) == jt.structure(b), what
    for (path, x), y in zip(jt.leaves_with_path(a), jt.leaves(b), strict=True):
        where = f"{what}: {jt.keystr(path)}"
        if not isinstance(x, torch.Tensor):
            assert x == y, where
            continue
        assert not isinstance(x, torch.distributed.tensor.DTensor), where
        assert (x.dtype, x.shape) == (y.dtype, y.shape), where
        if tol == 0.0 or not x.is_floating_point():
            assert torch.equal(x, y), where
        else:
            assert float((x - y).abs().max()) < tol, where


def assert_matches_reference(trace: list[tuple[float, dict[str, Any]]], ref: list[tuple[float, Any, Any]], first: int) -> None:
    for t, (loss, exported) in enumerate(trace):
        want_loss, want_params, want_opt = ref[first + t]
        assert abs(loss - want_loss) < TOL, f"step {first + t}"
        assert exported["step"] == first + t + 1
        assert_same(exported["params"], want_params, f"params after step {first + t}", TOL)
        assert_same(exported["opt_state"], want_opt, f"opt_state after step {first + t}", TOL)


FRESH = {"params": PARAMS}


@pytest.mark.parametrize(
    ("a", "stage_a", "b", "stage_b", "opt_name", "kw_a"),
    [
        (DPxTP, 3, DP, 1, "adamw_schedule", {}),
        (DP, 2, DPxTP, 0, "chain", {}),
        (DP2, 1, DP3, 3, "chain", {"offload": True}),
    ],
    ids=["dpxtp-s3_to_dp4-s1", "dp4-s2_to_dpxtp-s0", "dp2-s1-offload_to_dp3-s3"],
)
def test_resume_on_another_mesh_and_stage_continues_single_device_training(a, stage_a, b, stage_b, opt_name, kw_a):
    ref = reference(opt_name, PARAMS, None, DATA)
    first = run(a, stage_a, opt_name, DATA[:K], FRESH, **kw_a)
    assert_matches_reference(first, ref, 0)
    ckpt = first[-1][1]
    assert sorted(ckpt) == sorted(["params", "opt_state", "step", "loss_scale", "good_steps", "skipped"])
    assert (ckpt["step"], ckpt["loss_scale"], ckpt["good_steps"], ckpt["skipped"]) == (K, 1.0, K, 0)
    # the optimizer state mirrors optimizer.init(global params)
    assert jt.structure(ckpt["opt_state"]) == jt.structure(make_opt(opt_name).init(PARAMS))
    assert_matches_reference(run(b, stage_b, opt_name, DATA[K:], ckpt), ref, K)


def test_zero_checkpoint_resumes_without_zero_and_back():
    ref = reference("adamw_schedule", PARAMS, None, DATA)
    # ZeRO (dp x tp, stage 0) -> plain colofn.optim on one device
    ckpt = run(DPxTP, 0, "adamw_schedule", DATA[:2], FRESH)[-1][1]
    plain = reference("adamw_schedule", ckpt["params"], ckpt["opt_state"], DATA[2:4])
    for t, (loss, p, s) in enumerate(plain, 2):
        assert abs(loss - ref[t][0]) < TOL
        assert_same(p, ref[t][1], f"params {t}", TOL)
        assert_same(s, ref[t][2], f"opt_state {t}", TOL)
    # plain colofn.optim (an optimizer.init(params) state, updated) -> ZeRO stage 3 on dp x tp
    _, p, s = plain[-1]
    trace = run(DPxTP, 3, "adamw_schedule", DATA[4:], {"params": p, "opt_state": s, "step": 4})
    assert_matches_reference(trace, ref, 4)


def _round_trip(ckpt: dict[str, Any], precision: Any) -> list[dict[str, Any]]:
    """export(init(**ckpt)) on three meshes and stages, without a step in between."""
    out = []
    for mesh, stage, offload in ((DPxTP, 3, False), (DP, 1, True), (DPxTP, 0, True)):
        m = colofn.Mesh(*mesh)
        p = colofn.device_put(ckpt["params"], TP_SPECS, mesh=m) if "tp" in m.axis_names else ckpt["params"]
        state = zero.init(optimizer=make_opt("chain"), mesh=m, stage=stage, offload=offload, precision=precision, **(ckpt | {"params": p}))
        ckpt = zero.export_state(state)
        out.append(ckpt)
    return out


def _train_fp16() -> dict[str, Any]:
    m = colofn.Mesh(*DPxTP)
    precision = zero.MixedPrecision(torch.float16, loss_scale=zero.DynamicLossScale(init_scale=256.0, growth_interval=5))
    opt = make_opt("chain")
    params = tp_params(3, 6, 5, torch.float32)
    state = zero.init(colofn.device_put(params, TP_SPECS, mesh=m), opt, m, stage=3, precision=precision)
    x, y = batches([3, 5], 4, 1)[0]
    state, _ = zero.train_step(tp_loss, opt, state, (x.clone().index_fill_(0, torch.tensor([3]), float("inf")), y))  # skipped
    for batch in batches([3, 5], 4, 3):
        state, _ = zero.train_step(tp_loss, opt, state, batch)
    ckpt = zero.export_state(state)
    return {"ckpt": ckpt, "trips": _round_trip(ckpt, precision)}


def test_export_of_a_resumed_state_is_the_checkpoint_exactly():
    results = colofn.launch(_train_fp16, world_size=4)
    ckpt = results[0]["ckpt"]
    # 1 skipped step (scale 256 -> 128), then 3 good ones (growth comes after 5)
    assert (ckpt["step"], ckpt["skipped"], ckpt["loss_scale"], ckpt["good_steps"]) == (4, 1, 128.0, 3)
    assert [int(s.count) for s in ckpt["opt_state"]] == [3, 3]
    assert ckpt["params"]["l1"]["w"].dtype == torch.float32  # master values, original dtype
    assert ckpt["opt_state"][1].nu["l1"]["w"].dtype == torch.float32  # the master dtype
    for rank, r in enumerate(results):
        assert_same(r["ckpt"], ckpt, f"rank {rank}")
        for i, trip in enumerate(r["trips"]):
            assert_same(trip, ckpt, f"rank {rank}, round trip {i}")


def _dtensor_opt_state(ref_state: Any, params: Any, replicated: bool) -> dict[str, Any]:
    m = colofn.Mesh(*DPxTP)
    specs = jt.map(lambda s: colofn.P(), TP_SPECS, is_leaf=lambda s: isinstance(s, colofn.P)) if replicated else TP_SPECS
    adam = ref_state[1]._replace(mu=colofn.device_put(ref_state[1].mu, specs, mesh=m), nu=colofn.device_put(ref_state[1].nu, specs, mesh=m))
    opt_state = (ref_state[0]._replace(momentum=colofn.device_put(ref_state[0].momentum, specs, mesh=m)), adam)
    p = colofn.device_put(params, TP_SPECS, mesh=m)
    return zero.export_state(zero.init(p, make_opt("chain"), m, stage=2, opt_state=opt_state, step=2))


@pytest.mark.parametrize("replicated", [False, True])
def test_opt_state_may_hold_dtensors_placed_like_the_params_or_replicated(replicated):
    _, p, s = reference("chain", PARAMS, None, DATA[:2])[-1]
    for rank, got in enumerate(colofn.launch(_dtensor_opt_state, s, p, replicated, world_size=4)):
        assert_same(got["opt_state"], s, f"rank {rank}")
        assert_same(got["params"], p, f"rank {rank}")
        assert got["step"] == 2


def _init_error(opt_state: Any, **kw: Any) -> str:
    mesh = colofn.Mesh(*DP2)
    try:
        zero.init(PARAMS, optim.adam(1e-2), mesh, stage=1, opt_state=opt_state, **kw)
    except (TreeError, ConfigError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_a_mismatched_opt_state_names_every_path():
    good = optim.adam(1e-2).init(PARAMS)
    text = colofn.launch(_init_error, optim.sgd(0.1, momentum=0.9).init(PARAMS), world_size=2)[0]
    assert text.startswith("TreeError: zero.init: opt_state is not this optimizer's state")
    assert "opt_state: expected AdamState(count, mu, nu), got SgdState(count, momentum)" in text
    mu = {"l1": good.mu["l1"], "l2": {"w": good.mu["l2"]["w"]}}  # ['l2']['b'] missing
    nu = jt.map(lambda x: x, good.nu)
    nu["l1"]["w"] = torch.zeros(6, 3, dtype=torch.float64)
    text = colofn.launch(_init_error, good._replace(mu=mu, nu=nu), world_size=2)[0]
    assert "missing opt_state.mu['l2']['b']" in text
    assert "opt_state.nu['l1']['w']: shape (6, 3), but the param's is (3, 6)" in text
    text = colofn.launch(_init_error, (good,), world_size=2)[0]
    assert "opt_state: expected AdamState(count, mu, nu), got a tuple of 1" in text
    text = colofn.launch(_init_error, good, step=-1, loss_scale=0.0, world_size=2)[0]
    assert text.startswith("ConfigError")
    assert "step=-1" in text and "loss_scale=0.0" in text
