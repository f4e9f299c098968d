"""colofn.zero mixed precision (bf16/fp16 compute, fp32 master), skipped overflow steps, CPU offload."""

from __future__ import annotations

import pytest
import torch

import colofn
from _zero_models import batches, make_optimizer, max_error, mlp_loss, mlp_params, train_program
from colofn import optim, zero
from colofn import tree as jt

SIZES = [4, 9, 6, 3]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_training_matches_an_fp32_single_device_run_within_bf16_tolerance(stage):
    n = 2
    params = mlp_params(SIZES)
    data = batches(SIZES, 8, 4)
    want, want_losses = zero.reference_train(mlp_loss, make_optimizer("adamw"), params, data)
    got, losses, steps = colofn.launch(
        train_program, (n,), ("dp",), params, None, mlp_loss, data, stage, precision=torch.bfloat16, world_size=n
    )[0]
    assert got["layers"][0]["w"].dtype == torch.float32  # the fp32 master weights come back
    assert max_error(got, want) < 2e-2  # 4 AdamW steps of lr 1e-2 through bf16 gradients
    assert max(abs(a - b) for a, b in zip(losses, want_losses, strict=True)) < 2e-2
    assert not any(info.skipped for info, _ in steps)
    grad_ops = [r for r in steps[-1][1] if r.op in ("reduce_scatter", "all_reduce") and r.shape != (2,)]
    assert {r.dtype for r in grad_ops} == {torch.bfloat16}  # gradients travel in bf16


def _overflow_program(stage, precision, poison_at, steps=3, offload=False):
    mesh = colofn.Mesh((2,), ("dp",))
    opt = optim.adam(1e-2)
    state = zero.init(mlp_params(SIZES), opt, mesh, stage=stage, precision=precision, offload=offload)
    out = []
    for k, (x, y) in enumerate(batches(SIZES, 4, steps)):
        if k == poison_at and colofn.process_index() == 1:  # only one rank sees the inf
            x = x.clone()
            x[-1, 0] = float("inf")  # the last row is in rank 1's shard
        before = zero.params(state)
        count = int(jt.leaves(state.opt_state)[0])
        state, info = zero.train_step(mlp_loss, opt, state, (x, y))
        after = zero.params(state)
        unchanged = all(torch.equal(a, b) for a, b in zip(jt.leaves(before), jt.leaves(after), strict=True))
        out.append((info.skipped, info.loss_scale, unchanged, count, int(jt.leaves(state.opt_state)[0])))
    return out, int(state.skipped), float(state.loss_scale), int(state.step)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_forced_overflow_is_skipped_and_reported_on_every_rank(stage):
    precision = zero.MixedPrecision(torch.float16, loss_scale=zero.DynamicLossScale(init_scale=256.0))
    for out, skipped, scale, step in colofn.launch(_overflow_program, stage, precision, 1, world_size=2):
        (s0, sc0, same0, _, _), (s1, sc1, same1, c_before, c_after), (s2, sc2, same2, _, _) = out
        assert (s0, s1, s2) == (False, True, False)
        assert same1 and not same0 and not same2  # params, master and optimizer state untouched
        assert c_after == c_before  # the optimizer did not count the skipped step
        assert (sc0, sc1, sc2) == (256.0, 256.0, 128.0)  # halved after the overflow
        assert (skipped, scale, step) == (1, 128.0, 3)


def test_bf16_overflow_is_skipped_without_loss_scaling():
    out, skipped, scale, _ = colofn.launch(_overflow_program, 3, torch.bfloat16, 0, 2, world_size=2)[0]
    assert [o[0] for o in out] == [True, False] and out[0][2] and skipped == 1 and scale == 1.0


def test_dynamic_loss_scale_grows_after_the_interval():
    precision = zero.MixedPrecision(torch.float16, loss_scale=zero.DynamicLossScale(init_scale=8.0, growth_interval=2))
    out, skipped, scale, _ = colofn.launch(_overflow_program, 2, precision, -1, 5, world_size=2)[0]
    assert [o[1] for o in out] == [8.0, 8.0, 16.0, 16.0, 32.0] and skipped == 0 and scale == 32.0


def test_fp16_training_with_loss_scaling_matches_fp32_roughly():
    params = mlp_params(SIZES)
    data = batches(SIZES, 8, 3)
    want, _ = zero.reference_train(mlp_loss, make_optimizer("adamw"), params, data)
    precision = zero.MixedPrecision(torch.float16, loss_scale=zero.DynamicLossScale(init_scale=1024.0))
    got, _, steps = colofn.launch(
        train_program, (2,), ("dp",), params, None, mlp_loss, data, 2, precision=precision, world_size=2
    )[0]
    assert not any(info.skipped for info, _ in steps) and max_error(got, want) < 5e-3


# --------------------------------------------------------------------- offload


def _offload_program(stage, offload, precision):
    mesh = colofn.Mesh((2,), ("dp",))
    opt = optim.adamw(1e-2)
    state = zero.init(mlp_params(SIZES), opt, mesh, stage=stage, offload=offload, precision=precision)
    moved = []
    for batch in batches(SIZES, 4, 2):
        state, info = zero.train_step(mlp_loss, opt, state, batch)
        moved.append(info.offload_bytes)
    placement = {
        "params": zero.devices(state.params),
        "master": zero.devices(state.master) if state.master is not None else None,
        "opt_state": zero.devices(state.opt_state),
    }
    per_leaf = [
        (colofn.tree.keystr(p), (x.to_local() if hasattr(x, "to_local") else x).device)
        for p, x in colofn.tree.leaves_with_path(state.opt_state)
    ]
    return zero.params(state), placement, per_leaf, moved, state.plan.state_device, state.plan.compute_device


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_offload_places_the_optimizer_on_the_host_and_changes_no_number(stage, precision):
    on = colofn.launch(_offload_program, stage, True, precision, world_size=2)
    off = colofn.launch(_offload_program, stage, False, precision, world_size=2)
    for (p_on, placement, per_leaf, moved, state_dev, compute_dev), (p_off, *_rest) in zip(on, off, strict=True):
        assert state_dev == torch.device("cpu") and compute_dev == torch.device("cpu")
        assert placement["master"] == {torch.device("cpu")} and placement["opt_state"] == {torch.device("cpu")}
        assert placement["params"] == {compute_dev}
        assert per_leaf and all(d == torch.device("cpu") for _, d in per_leaf)
        for a, b in zip(jt.leaves(p_on), jt.leaves(p_off), strict=True):
            assert torch.equal(a, b)  # the same update, run where the state lives
        item = 2 if precision is not None else 4
        numel = sum(x.numel() for x in jt.leaves(mlp_params(SIZES)))
        shard = numel if stage == 0 else -(-numel // 2)  # upper bound per rank (padding per unit)
        for to_host, to_device in moved:
            assert to_host == to_device and 0 < to_host <= (shard + 8) * item
    assert all(m == (0, 0) for m in off[0][3])


def test_precision_arguments_are_checked():
    with pytest.raises(colofn.errors.DTypeError, match="not a floating dtype"):
        zero.MixedPrecision(torch.int8)
    with pytest.raises(colofn.errors.ConfigError, match="loss_scale"):
        zero.MixedPrecision(torch.float16, loss_scale=-1.0)
    with pytest.raises(colofn.errors.ConfigError, match="backoff_factor"):
        zero.DynamicLossScale(backoff_factor=2.0)
    assert zero.MixedPrecision(torch.float16, loss_scale=4).loss_scale == 4.0
