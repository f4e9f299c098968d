"""colofn.zero: every stage equals single-device training; exact communication and measured memory."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

import colofn
from _zero_models import (
    TP_SPECS,
    batches,
    make_optimizer,
    max_error,
    mlp_loss,
    mlp_params,
    tp_loss,
    tp_params,
    tp_single_loss,
    train_program,
)
from colofn import optim, zero
from colofn.zero.flat import FlatLayout

ODD = [3, 5, 7, 2]  # no dim divisible by 2, 3 or 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_stage_matches_single_device(n, stage, dtype):
    params = mlp_params(ODD, dtype)
    data = batches(ODD, 2 * n, 3, dtype)
    want, want_losses = zero.reference_train(mlp_loss, make_optimizer("adamw"), params, data)
    results = colofn.launch(train_program, (n,), ("dp",), params, None, mlp_loss, data, stage, world_size=n)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for rank, (got, losses, _) in enumerate(results):
        assert max_error(got, want) < tol, f"rank {rank}"
        assert got["layers"][0]["w"].dtype == dtype
        assert max(abs(a - b) for a, b in zip(losses, want_losses, strict=True)) < tol


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_dp_x_tp_matches_single_device_on_every_rank(stage, opt_name):
    params = tp_params(3, 6, 5, torch.float64)
    data = batches([3, 5], 4, 3, torch.float64)
    want, _ = zero.reference_train(tp_single_loss, make_optimizer(opt_name), params, data)
    results = colofn.launch(
        train_program, (2, 2), ("dp", "tp"), params, TP_SPECS, tp_loss, data, stage, opt_name, world_size=4
    )
    for rank, (got, _, steps) in enumerate(results):
        assert max_error(got, want) < 1e-12, f"rank {rank}"
        # ZeRO only talks over dp; the tp traffic is loss_fn's own psum (and its transpose).
        assert {r.axes for r in steps[-1][1]} <= {("dp",), ("tp",)}


# --------------------------------------------------------------------- communication, exactly

DIVISIBLE = [4, 8, 8, 4]  # every unit's numel divides by 2 and 4: no padding, Ψ exact


def _loss_with_input_grad(params, batch):
    """As if x came from an earlier differentiable stage: every unit is needed in backward."""
    x, y = batch
    return mlp_loss(params, (x.detach().requires_grad_(True), y))


def _bytes(records, op, phase=None, axes=("dp",)):
    return sum(r.bytes_sent for r in records if r.op == op and r.axes == axes and (phase is None or r.phase == phase))


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_communication_per_step_is_the_papers(n, stage):
    params = mlp_params(DIVISIBLE, torch.float32)
    psi = sum(x.numel() * 4 for x in colofn.tree.leaves(params))  # Ψ: param bytes
    data = batches(DIVISIBLE, 2 * n, 2)
    results = colofn.launch(
        train_program, (n,), ("dp",), params, None, _loss_with_input_grad, data, stage, world_size=n
    )
    for _, _, steps in results:
        for _, records in steps:
            loss_bytes = 2 * (n - 1) * 4 // n  # the fp32 loss pmean, accounted for separately
            scalar = [r for r in records if r.shape == ()]
            assert [(r.op, r.bytes_sent) for r in scalar] == [("all_reduce", loss_bytes)]
            rest = [r for r in records if r.shape != ()]
            total = sum(r.bytes_sent for r in rest)
            if stage == 0:
                assert {r.op for r in rest} == {"all_reduce"}
                assert total == 2 * psi * (n - 1) / n
            elif stage in (1, 2):
                assert _bytes(rest, "reduce_scatter") == psi * (n - 1) / n
                assert _bytes(rest, "all_gather") == psi * (n - 1) / n
                assert total == 2 * psi * (n - 1) / n
            else:
                assert _bytes(rest, "all_gather", "forward") == psi * (n - 1) / n
                assert _bytes(rest, "all_gather", "backward") == psi * (n - 1) / n
                assert _bytes(rest, "reduce_scatter", "backward") == psi * (n - 1) / n
                assert total == 3 * psi * (n - 1) / n
            if stage == 2:  # reduce-scattered unit by unit during the backward
                assert {r.phase for r in rest if r.op == "reduce_scatter"} == {"backward"}


def test_stage3_skips_regathering_a_unit_the_backward_does_not_read():
    n = 2
    params = mlp_params(DIVISIBLE)
    data = batches(DIVISIBLE, 4, 1)
    _, _, steps = colofn.launch(train_program, (n,), ("dp",), params, None, mlp_loss, data, 3, world_size=n)[0]
    info, records = steps[0]
    first = params["layers"][0]
    first_bytes = (first["w"].numel() + first["b"].numel()) * 4
    psi = sum(x.numel() * 4 for x in colofn.tree.leaves(params))
    # dW0 = x.T @ g needs x only: layer 0 is not gathered again.
    assert _bytes(records, "all_gather", "backward") == (psi - first_bytes) * (n - 1) / n
    assert "backward gather ['layers'][0] start" not in info.schedule


def test_padding_is_what_the_odd_sizes_add():
    n = 4
    params = mlp_params(ODD)
    layout = FlatLayout.build(params, n)
    data = batches(ODD, 4, 1)
    _, _, steps = colofn.launch(train_program, (n,), ("dp",), params, None, mlp_loss, data, 2, world_size=n)[0]
    records = steps[0][1]
    assert layout.nbytes() > layout.nbytes(padded=False)
    assert _bytes(records, "reduce_scatter") == _bytes(records, "all_gather") == layout.nbytes() * (n - 1) // n


# --------------------------------------------------------------------- memory, measured


MEM = [16, 32, 32, 16]  # every unit divides by 4: no padding


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_measured_memory_is_the_papers_formula(stage):
    n = 4
    params = mlp_params(MEM)
    numel = sum(x.numel() for x in colofn.tree.leaves(params))
    data = batches(MEM, 8, 1)
    results = colofn.launch(
        train_program, (n,), ("dp",), params, None, mlp_loss, data, stage, "adam", precision=torch.bfloat16, world_size=n
    )
    for _, _, steps in results:
        mem = steps[0][0].memory
        # 2 + 2 bytes of bf16 params and grads, 4 + 4 + 4 of fp32 master, mu, nu; plus Adam's int32 count.
        assert mem.model_states == zero.paper_bytes(stage=stage, numel=numel, n=n) + 4
        assert mem.workspace == 4 * numel // (1 if stage == 0 else n)  # the fp32 gradient the update reads
        if stage == 3:
            units = [(lay["w"].numel() + lay["b"].numel()) * 2 for lay in params["layers"]]
            biggest_two = sum(sorted(units)[-2:])
            assert 0 < mem.gathered_peak <= biggest_two  # one unit in use, the next one prefetched


# --------------------------------------------------------------------- state layout


def _state_program(stage, precision):
    mesh = colofn.Mesh((2,), ("dp",))
    params = mlp_params(ODD)
    state = zero.init(params, optim.adam(), mesh, stage=stage, precision=precision)
    leaves = [x for x in colofn.tree.leaves(state.opt_state) if isinstance(x, DTensor)]
    master = state.master[0].placements if state.master is not None else None
    return state.params[0].placements, master, {x.placements for x in leaves}, state.opt_state.count.shape


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_state_shardings_per_stage(stage):
    params_pl, master_pl, opt_pl, count_shape = colofn.launch(_state_program, stage, torch.bfloat16, world_size=2)[0]
    sharded, replicated = (Shard(0),), (Replicate(),)
    assert params_pl == (sharded if stage == 3 else replicated)
    assert master_pl == (sharded if stage >= 1 else replicated)
    assert opt_pl == {sharded if stage >= 1 else replicated}
    assert count_shape == ()


# --------------------------------------------------------------------- stage 3 prefetch


def _schedule_program(prefetch):
    mesh = colofn.Mesh((2,), ("dp",))
    opt = optim.sgd(0.1)
    state = zero.init(mlp_params([4, 6, 6, 2]), opt, mesh, stage=3, prefetch=prefetch)
    state, info = zero.train_step(mlp_loss, opt, state, batches([4, 2], 4, 1)[0])
    return info.schedule


def test_stage3_prefetches_the_next_unit_while_the_current_one_computes():
    on = colofn.launch(_schedule_program, True, world_size=2)[0]
    off = colofn.launch(_schedule_program, False, world_size=2)[0]

    def at(schedule, event):
        return schedule.index(event)

    L = "['layers'][{}]".format
    # with prefetch: unit 1's all-gather is in flight before unit 0 is done (released)
    assert at(on, f"forward gather {L(1)} start") < at(on, f"forward release {L(0)}")
    assert at(on, f"forward gather {L(2)} start") < at(on, f"forward release {L(1)}")
    # in the backward, unit 1's gather is issued before unit 2's gradients are reduce-scattered
    assert at(on, f"backward gather {L(1)} start") < at(on, f"backward reduce_scatter {L(2)}")
    # without: each gather starts only when its unit is needed
    assert at(off, f"forward gather {L(1)} start") > at(off, f"forward release {L(0)}")
    assert at(off, f"backward gather {L(1)} start") > at(off, f"backward reduce_scatter {L(2)}")
    # every gathered unit is released, forward and backward
    for phase in ("forward", "backward"):
        gathered = {e.split(" gather ")[1].rsplit(" ", 1)[0] for e in on if e.startswith(f"{phase} gather")}
        released = {e.split(" release ")[1] for e in on if e.startswith(f"{phase} release")}
        assert gathered == released


def _lazy_program():
    mesh = colofn.Mesh((2,), ("dp",))
    opt = optim.sgd(0.1)
    params = {"scale": torch.tensor([2.0]), "layers": [{"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2)}]}
    state = zero.init(params, opt, mesh, stage=3)
    seen = {}

    def loss_fn(p, x):
        seen["repr"] = repr(p)
        seen["keys"] = list(p)
        seen["len"] = len(p["layers"])
        h = x * p["scale"]
        for layer in p["layers"][:2]:
            h = h @ layer["w"]
        return h.mean()

    state, _ = zero.train_step(loss_fn, opt, state, torch.ones(2, 2))
    return seen


def test_stage3_params_are_lazy_read_only_views():
    seen = colofn.launch(_lazy_program, world_size=2)[0]
    assert seen["keys"] == ["scale", "layers"] and seen["len"] == 2
    assert "gathered on access" in seen["repr"]


# --------------------------------------------------------------------- errors, before any communication


def _init_error(**kw):
    def program():
        mesh = colofn.Mesh((2,), ("dp",))
        args = {"params": {"w": torch.ones(4)}, "optimizer": optim.sgd(0.1), "stage": 1} | kw
        try:
            zero.init(args.pop("params"), args.pop("optimizer"), mesh, **args)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            return type(e), str(e)
        return None, ""

    return colofn.launch(program, world_size=2)[0]


def test_unknown_axis_names_the_mesh_axes_and_the_fix():
    typ, msg = _init_error(axis="data")
    assert issubclass(typ, colofn.errors.SpecError) and issubclass(typ, ValueError)
    assert "axis='data' is not an axis of Mesh(dp=2)" in msg and "('dp',)" in msg and "Fix:" in msg


def test_bad_stage_lists_the_options():
    typ, msg = _init_error(stage=4)
    assert issubclass(typ, colofn.errors.ConfigError)
    assert "stage=4 is not a ZeRO stage" in msg
    for k in ("0: plain data parallel", "1: optimizer state sharded", "2: optimizer state and gradients", "3: optimizer state, gradients and parameters"):
        assert k in msg
    assert _init_error(stage=True)[0] is typ


def test_params_that_are_not_tensors_are_named_by_path():
    typ, msg = _init_error(params={"w": torch.ones(2), "layers": [{"b": [1.0, 2.0]}]})
    assert issubclass(typ, colofn.errors.TreeTypeError) and issubclass(typ, TypeError)
    assert "params['layers'][0]['b'][0]: float" in msg and "Fix:" in msg
    typ, msg = _init_error(params={"ids": torch.arange(3)})
    assert issubclass(typ, colofn.errors.DTypeError) and "params['ids']: dtype torch.int64" in msg


def test_global_norm_clipping_is_refused_when_the_update_is_sharded():
    typ, msg = _init_error(optimizer=optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1)))
    assert issubclass(typ, colofn.errors.ConfigError) and "not per-coordinate" in msg
    assert _init_error(optimizer=optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1)), stage=0) == (None, "")
    assert issubclass(_init_error(offload="cpu")[0], colofn.errors.ConfigError)
    assert issubclass(_init_error(precision="bf16")[0], colofn.errors.ConfigError)


def _step_error(batch, loss_fn=mlp_loss):
    def program():
        mesh = colofn.Mesh((4,), ("dp",))
        opt = optim.sgd(0.1)
        state = zero.init(mlp_params([3, 2]), opt, mesh, stage=2)
        with colofn.comm_trace() as records:
            try:
                zero.train_step(loss_fn, opt, state, batch)
            except Exception as e:  # noqa: BLE001
                return type(e), str(e), len(records)
        return None, "", len(records)

    return colofn.launch(program, world_size=4)[0]


def test_batch_not_divisible_names_the_leaf_and_fails_before_communicating():
    typ, msg, n_records = _step_error((torch.ones(6, 3), torch.ones(8, 2)))
    assert issubclass(typ, colofn.errors.ShapeError)
    assert "batch[0] has 6 rows (dim 0 of shape (6, 3)), not divisible by the 4 ranks of axis 'dp'" in msg
    assert "batch[1]" not in msg and "Fix: make every batch leaf's dim 0 a multiple of 4" in msg
    assert n_records == 0


def test_loss_fn_must_return_a_scalar():
    typ, msg, _ = _step_error((torch.ones(4, 3), torch.ones(4, 2)), lambda p, b: b[0] @ p["layers"][0]["w"])
    assert issubclass(typ, colofn.errors.ShapeError) and "0-d floating tensor" in msg


def _tied_loss(params, batch):
    """The embedding is read twice, before and after the layers (tied input/output weights)."""
    x, y = batch
    h = torch.tanh(x @ params["embed"])
    for layer in params["layers"]:
        h = torch.tanh(h @ layer["w"])
    return ((h @ params["embed"].T - y) ** 2).mean()


def _tied_program(stage):
    mesh = colofn.Mesh((2,), ("dp",))
    g = torch.Generator().manual_seed(0)
    params = {"embed": torch.randn(3, 5, generator=g), "layers": [{"w": torch.randn(5, 5, generator=g)}]}
    opt = optim.adam(1e-2)
    step = zero.make_train_step(_tied_loss, opt)
    state = zero.init(params, opt, mesh, stage=stage)
    for batch in batches([3, 3], 4, 2):
        with colofn.comm_trace() as records:
            state, info = step(state, batch)
    return zero.params(state), params, info.schedule, _bytes(records, "all_gather", "forward")


@pytest.mark.parametrize("stage", [2, 3])
def test_a_unit_read_twice_is_gathered_again_and_both_uses_reach_its_gradient(stage):
    got, params, schedule, fwd_gather = colofn.launch(_tied_program, stage, world_size=2)[0]
    want, _ = zero.reference_train(_tied_loss, optim.adam(1e-2), params, batches([3, 3], 4, 2))
    assert max_error(got, want) < 1e-5
    if stage == 3:
        assert schedule.count("forward gather ['embed'] wait") == 2
        embed_shard_bytes = -(-15 // 2) * 4
        assert fwd_gather == (2 * embed_shard_bytes + -(-25 // 2) * 4) * 1  # (n-1) = 1


def _extra_on_some_ranks(params, batch):
    """``extra`` reaches the graph only on ranks whose first row starts positive (data-dependent)."""
    x, _ = batch
    loss = mlp_loss({"layers": params["layers"]}, batch)
    if float(x[0, 0]) > 0:
        loss = loss + 0.1 * (params["extra"] ** 2).sum()
    return loss


def test_stage1_overlapped_reduce_scatters_keep_one_order_when_a_unit_is_unused_on_some_ranks():
    # Stage 1 starts each bucket's reduce-scatter when autograd completes it; a unit no gradient
    # reaches on one rank must still be summed in the same order on every rank (else the
    # collectives pair up wrongly): the result equals stage 0's all-reduce of the same gradients.
    params = {**mlp_params(ODD, torch.float64), "extra": torch.linspace(-1, 1, 6, dtype=torch.float64)}
    data = batches(ODD, 4, 2, torch.float64)
    for x, _ in data:
        x[0, 0], x[2, 0] = 1.0, -1.0  # rank 0 of 2 uses "extra", rank 1 does not
    runs = {
        stage: colofn.launch(train_program, (2,), ("dp",), params, None, _extra_on_some_ranks, data, stage, world_size=2)
        for stage in (0, 1)
    }
    for (got1, losses1, steps), (got0, losses0, _) in zip(runs[1], runs[0], strict=True):
        assert max_error(got1, got0) < 1e-12
        assert losses1 == pytest.approx(losses0, abs=1e-12)
        assert not torch.equal(got1["extra"], params["extra"])  # it did learn
        assert [r.op for r in steps[-1][1]].count("reduce_scatter") == len(FlatLayout.build(params, 2).buckets)
