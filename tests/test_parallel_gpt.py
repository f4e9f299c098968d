"""The GPT under every plan: loss and gradients equal to single-device, and the communication per layer.

Parameters are placed with ``shard_params`` (DTensors), as a user would, so the
traces hold only the strategies' own collectives.
"""

from __future__ import annotations

import math
from collections import Counter
from unittest import mock

import pytest
import torch

import colofn
from colofn import P, random, tree
from colofn.errors import TreeError
from colofn.models import gpt
from colofn.parallel import (
    Plan,
    PlanError,
    local_loss,
    make_loss,
    make_value_and_grad,
    param_specs,
    shard_params,
    stage_forward,
    stage_slice,
)
from colofn.parallel.specs import batch_specs
from colofn.testing import assert_trees_close


def _batch(cfg, b, s, key=1):
    t = random.randint(random.key(key), (b, s + 1), 0, cfg.vocab_size)
    return {"tokens": t[:, :-1], "targets": t[:, 1:]}


def _reference(params, batch, cfg):
    params = tree.map(lambda p: p.detach().requires_grad_(), params)
    loss = gpt.loss(params, batch, cfg)
    return loss.detach(), tree.unflatten(
        tree.structure(params), torch.autograd.grad(loss, tree.leaves(params))
    )


def _parallel_program(cfg, plan, mesh_shape, params, batch):
    mesh = colofn.Mesh(tuple(mesh_shape.values()), tuple(mesh_shape))
    loss_fn = make_loss(cfg, plan, mesh)
    sharded = tree.map(lambda p: p.detach().requires_grad_(), shard_params(params, cfg, plan, mesh))
    with colofn.comm_trace() as records:
        loss = loss_fn(sharded, batch)
        n_fwd = len(records)
        grads = torch.autograd.grad(loss.to_local(), tree.leaves(sharded))
    grads = tree.unflatten(tree.structure(params), [g.full_tensor() for g in grads])
    again, grads2 = make_value_and_grad(cfg, plan, mesh)(
        shard_params(params, cfg, plan, mesh), batch
    )
    assert torch.equal(again.to_local(), loss.to_local())
    assert all(
        torch.equal(a.full_tensor(), b)
        for a, b in zip(tree.leaves(grads2), tree.leaves(grads), strict=True)
    )
    count = Counter((r.op, r.axes, r.phase) for r in records)
    fwd_bytes = sum(r.bytes_sent for r in records[:n_fwd])
    return loss.to_local().detach(), grads, count, fwd_bytes


def run(cfg, plan, mesh_shape, b=4, s=8):
    params = gpt.init(random.key(0), cfg)
    batch = _batch(cfg, b, s)
    want_loss, want_grads = _reference(params, batch, cfg)
    results = colofn.launch(
        _parallel_program,
        cfg,
        plan,
        mesh_shape,
        params,
        batch,
        world_size=math.prod(mesh_shape.values()),
    )
    for rank, (loss, grads, _, _) in enumerate(results):
        assert_trees_close(loss, want_loss, what=f"loss (rank {rank})", rtol=1e-5, atol=1e-5)
        assert_trees_close(grads, want_grads, what=f"gradient (rank {rank})", rtol=1e-4, atol=1e-5)
    return results[0][2], results[0][3]


def fwd(count, op, axes):
    return count[(op, axes, "forward")]


def bwd(count, op, axes):
    return count[(op, axes, "backward")]


L = 2  # layers of the configs below
DENSE = gpt.config("tiny", n_layers=L, seq_len=16)


def test_data_parallel():
    c, _ = run(DENSE, Plan(dp="dp"), {"dp": 4})
    assert fwd(c, "all_reduce", ("dp",)) == 1  # the loss (summed losses and token counts in one)
    # The parameters' gradient sums over dp are coalesced (shard_map buckets its arguments'
    # pvary transposes): a few flat all_reduces, flushed as autograd finishes arguments,
    # instead of one per use of each of the model's weights.
    n_leaves = len(tree.leaves(gpt.init(random.key(0), DENSE)))
    assert 1 <= bwd(c, "all_reduce", ("dp",)) <= 3 < n_leaves


def _value_and_grad_program(cfg, plan, mesh_shape, params, batch):
    mesh = colofn.Mesh(tuple(mesh_shape.values()), tuple(mesh_shape))
    vg, sharded = make_value_and_grad(cfg, plan, mesh), shard_params(params, cfg, plan, mesh)
    loss, _ = vg(sharded, batch)
    return float(loss.to_local())


def _watched(name, events):
    """``torch.distributed.<name>`` patched to log ``(async_op, in a backward)`` per rank (the ranks are threads)."""
    real = getattr(torch.distributed, name)

    def watched(*args, **kwargs):
        in_backward = torch._C._current_graph_task_id() != -1
        events[torch.distributed.get_rank()].append((kwargs.get("async_op", False), in_backward))
        return real(*args, **kwargs)

    return mock.patch.object(torch.distributed, name, watched)


def test_value_and_grad_has_no_rendezvous_in_the_forward():
    # DDP's step synchronises once, in the backward; make_value_and_grad's loss sum (the only
    # forward collective of dp) is started asynchronously before the backward and waited after it.
    params, batch = gpt.init(random.key(0), DENSE), _batch(DENSE, 4, 8)
    want, _ = _reference(params, batch, DENSE)
    events = {r: [] for r in range(4)}
    with _watched("all_reduce", events):
        losses = colofn.launch(
            _value_and_grad_program, DENSE, Plan(dp="dp"), {"dp": 4}, params, batch, world_size=4
        )
    for rank, loss in enumerate(losses):
        assert abs(loss - float(want)) < 1e-5
        got = events[rank]
        assert len(got) >= 2 and all(asynchronous for asynchronous, _ in got), got  # nobody blocks
        assert got[0] == (True, False)  # the loss: started before the backward, waited after it
        assert all(in_backward for _, in_backward in got[1:]), got  # the gradient buckets


def test_tensor_parallel_two_all_reduces_per_layer():
    c, _ = run(DENSE, Plan(tp="tp"), {"tp": 2})
    assert (
        fwd(c, "all_reduce", ("tp",)) == 2 * L + 1 + 2
    )  # attention + MLP per layer; embedding; loss max and sums
    assert (
        bwd(c, "all_reduce", ("tp",)) == 2 * L + 1
    )  # the f operator's backward per region; the head's
    assert set(c) == {("all_reduce", ("tp",), "forward"), ("all_reduce", ("tp",), "backward")}


def test_dp_tp():
    c, _ = run(
        gpt.config("tiny", n_layers=L, pos="rotary", tie_embeddings=False),
        Plan(dp="dp", tp="tp"),
        {"dp": 2, "tp": 2},
    )
    assert fwd(c, "all_reduce", ("tp",)) == 2 * L + 3 and fwd(c, "all_reduce", ("dp",)) == 1


def test_megatron_sp_replaces_all_reduce_by_gather_and_scatter_of_equal_bytes():
    c_sp, bytes_sp = run(DENSE, Plan(tp="tp", sp="megatron"), {"tp": 2})
    c_tp, bytes_tp = run(DENSE, Plan(tp="tp"), {"tp": 2})
    assert (
        fwd(c_sp, "all_gather", ("tp",)) == 2 * L + 1
    )  # before attention and MLP; before the head
    assert (
        fwd(c_sp, "reduce_scatter", ("tp",)) == 2 * L + 1
    )  # after attention and MLP; the embedding
    assert fwd(c_sp, "all_reduce", ("tp",)) == 2  # only the vocabulary-parallel loss
    assert (
        bwd(c_sp, "reduce_scatter", ("tp",)) == 2 * L + 1
        and bwd(c_sp, "all_gather", ("tp",)) == 2 * L + 1
    )
    # Korthikanti et al.: an all-gather plus a reduce-scatter move the bytes of one all-reduce.
    assert bytes_sp == bytes_tp


def test_dp_megatron_sp_rmsnorm():
    cfg = gpt.config("tiny", n_layers=L, norm="rmsnorm", pos="rotary")
    c, _ = run(cfg, Plan(dp="dp", tp="tp", sp="megatron"), {"dp": 2, "tp": 2})
    assert fwd(c, "reduce_scatter", ("tp",)) == 2 * L + 1


def test_ulysses_two_all_to_alls_per_attention():
    cfg = gpt.config("tiny", n_layers=L, pos="rotary")
    c, _ = run(cfg, Plan(dp="dp", sp="ulysses", sp_axis="sp"), {"dp": 2, "sp": 2})
    assert fwd(c, "all_to_all", ("sp",)) == 2 * L  # q, k, v stacked in; the output back
    assert bwd(c, "all_to_all", ("sp",)) == 2 * L
    assert fwd(c, "all_reduce", ("dp", "sp")) == 1


def test_ulysses_with_tp():
    c, _ = run(
        gpt.config("tiny", n_layers=L),
        Plan(tp="tp", sp="ulysses", sp_axis="sp"),
        {"sp": 2, "tp": 2},
    )
    assert fwd(c, "all_to_all", ("sp",)) == 2 * L and fwd(c, "all_reduce", ("tp",)) == 2 * L + 3


@pytest.mark.parametrize(("mesh", "n"), [({"dp": 2, "sp": 2}, 2), ({"dp": 1, "sp": 4}, 4)])
def test_ring_attention_n_minus_1_hops_per_layer(mesh, n):
    cfg = gpt.config("tiny", n_layers=L, pos="rotary", seq_len=16)
    c, _ = run(cfg, Plan(dp="dp", sp="ring", sp_axis="sp"), mesh, s=16)
    assert (
        fwd(c, "send", ("sp",)) == (n - 1) * L and fwd(c, "recv", ("sp",)) == (n - 1) * L
    )  # k and v stacked
    assert bwd(c, "send", ("sp",)) == (n - 1) * L


def test_ring_learned_positions_untied():
    run(
        gpt.config("tiny", n_layers=1, tie_embeddings=False),
        Plan(sp="ring", sp_axis="sp"),
        {"sp": 2},
    )


MOE = gpt.config("tiny", n_layers=L, n_experts=4, top_k=2)


def test_dp_ep_three_collectives_per_moe_layer():
    # and the forward's all-to-alls are started asynchronously (this rank's own block goes
    # through its experts meanwhile); their transposes in the backward block
    events = {r: [] for r in range(4)}
    with _watched("all_to_all_single", events):
        c, _ = run(MOE, Plan(dp="dp", ep="ep"), {"dp": 2, "ep": 2})
    for got in events.values():  # the program runs the step twice
        assert [a for a, b in got if not b] == [True] * (4 * L) and [a for a, b in got if b] == [False] * (4 * L)
    assert fwd(c, "all_to_all", ("ep",)) == 2 * L  # dispatch, combine
    assert fwd(c, "all_reduce", ("dp", "ep")) == L + 1  # routing statistics and counts per layer; the loss
    assert sum(n for (_, _, phase), n in c.items() if phase == "forward") == 3 * L + 1  # nothing else: no count all-gather
    assert bwd(c, "all_to_all", ("ep",)) == 2 * L


def test_ep_on_the_data_axis_with_capacity():
    cfg = gpt.config("tiny", n_layers=L, n_experts=4, top_k=2, capacity_factor=1.0, moe_every=2)
    c, _ = run(cfg, Plan(dp="dp", ep="dp"), {"dp": 4})
    assert (
        fwd(c, "all_to_all", ("dp",)) == 2 and fwd(c, "all_gather", ("dp",)) == 1
    )  # capacity order (the counts ride in the statistics' sum)


def test_ep_group_whose_assignments_are_all_dropped_still_communicates_in_step():
    # Found by the property tests: capacity drops every assignment of the dp=1 ranks, which
    # then skipped the experts, so the expert weights' gradient all-reduce over dp deadlocked.
    cfg = gpt.config(
        "tiny", vocab_size=8, seq_len=4, d_model=2, n_heads=1, n_layers=1, d_ff=2,
        tie_embeddings=False, n_experts=4, top_k=1, capacity_factor=1.0, dtype=torch.float64,
    )  # fmt: skip
    run(cfg, Plan(dp="dp", ep="ep"), {"dp": 2, "ep": 2}, b=4, s=1)


def test_tp_ep():
    cfg = gpt.config("tiny", n_layers=L, n_experts=4, top_k=1, capacity_factor=1.5, pos="rotary")
    c, _ = run(cfg, Plan(tp="tp", ep="ep"), {"ep": 2, "tp": 2})
    assert fwd(c, "all_to_all", ("ep",)) == 2 * L
    assert fwd(c, "all_reduce", ("tp",)) == 2 * L + 3 + L  # + the aux loss pmean per MoE layer


def test_megatron_sp_ep_and_ring_ep():
    cfg = gpt.config(
        "tiny", n_layers=L, n_experts=2, top_k=2, moe_every=2, capacity_factor=1.0, norm="rmsnorm"
    )
    run(cfg, Plan(dp="dp", tp="tp", sp="megatron", ep="dp"), {"dp": 2, "tp": 2})
    run(cfg, Plan(dp="dp", sp="ring", sp_axis="sp", ep="sp"), {"dp": 2, "sp": 2})


def test_ignored_targets_count_once_over_the_whole_batch():
    cfg = gpt.config("tiny", n_layers=1)
    params, batch = gpt.init(random.key(0), cfg), _batch(cfg, 4, 8)
    batch["targets"] = batch["targets"].clone()
    batch["targets"][0, :] = -100  # all of rank 0's tokens under dp=2 x sp=2 are ignored
    batch["targets"][3, 5] = -100
    want, _ = _reference(params, batch, cfg)
    got = colofn.launch(
        _parallel_program,
        cfg,
        Plan(dp="dp", sp="ulysses", sp_axis="sp"),
        {"dp": 2, "sp": 2},
        params,
        batch,
        world_size=4,
    )
    assert_trees_close(got[0][0], want, rtol=1e-5, atol=1e-6)


def _bad_batch_program(cfg, plan):
    mesh = colofn.Mesh((2, 2), ("dp", "sp"))
    f = make_loss(cfg, plan, mesh)
    with colofn.comm_trace() as records:
        try:
            f(gpt.init(random.key(0), cfg), _batch(cfg, 3, 7))
        except PlanError as e:
            return str(e), len(records)
    return None, len(records)


def test_bad_batch_fails_before_any_communication():
    cfg = gpt.config("tiny", n_layers=1)
    msg, n = colofn.launch(
        _bad_batch_program, cfg, Plan(dp="dp", sp="ring", sp_axis="sp"), world_size=4
    )[0]
    assert n == 0
    assert "batch 3 is not divisible" in msg and "seq 7 is not divisible by 2 * sp = 4" in msg and "zig-zag" in msg


def test_make_loss_checks_the_plan_first():
    def program():
        mesh = colofn.Mesh((2,), ("tp",))
        with pytest.raises(PlanError, match="n_heads=1 is not divisible by tp=2"):
            make_loss(gpt.config("tiny", n_heads=1, d_model=3, vocab_size=8), Plan(tp="tp"), mesh)
        with pytest.raises(TreeError, match="tokens"):
            make_loss(gpt.config("tiny"), Plan(tp="tp"), mesh)(
                gpt.init(random.key(0), gpt.config("tiny")), {"x": 1}
            )

    colofn.launch(program, world_size=2)


def _stages_program(cfg, plan, params, batch):
    """Two pipeline stages run back to back on each device must give the whole model's loss."""
    mesh = colofn.Mesh((2, 2), ("dp", "tp"))
    n = cfg.n_layers
    specs = param_specs(cfg, plan)
    first, last = (stage_slice(params, cfg, r) for r in (range(0, 1), range(1, n)))
    s_first, s_last = (stage_slice(specs, cfg, r) for r in (range(0, 1), range(1, n)))
    assert sorted(first) == ["embed", "layers"] and sorted(last["embed"]) == ["tok"]

    def two_stages(p0, p1, batch):
        x, aux0 = stage_forward(p0, batch["tokens"], cfg, plan, layers=range(0, 1))
        ce, aux1 = stage_forward(p1, x, cfg, plan, layers=range(1, n), targets=batch["targets"])
        whole = {
            "embed": p0["embed"],
            "layers": p0["layers"] + p1["layers"],
            "final_norm": p1["final_norm"],
        }
        return ce + aux0 + aux1, local_loss(whole, batch, cfg, plan)

    f = colofn.shard_map(
        two_stages, mesh=mesh, in_specs=(s_first, s_last, batch_specs(plan)), out_specs=(P(), P())
    )
    staged, whole = f(first, last, batch)
    return float(staged.to_local()), float(whole.to_local())


def test_stage_forward_composes_to_the_loss():
    cfg = gpt.config("tiny", n_layers=3, n_experts=4, moe_every=2)
    plan = Plan(dp="dp", tp="tp", sp="megatron")
    params = gpt.init(random.key(0), cfg)
    batch = _batch(cfg, 4, 8)
    staged, whole = colofn.launch(_stages_program, cfg, plan, params, batch, world_size=4)[0]
    assert abs(staged - whole) < 1e-6 and abs(whole - float(gpt.loss(params, batch, cfg))) < 1e-5


def test_layers_forward_names_a_wrong_slice():
    cfg = gpt.config("tiny", n_layers=2, n_experts=2, moe_every=2)
    params = gpt.init(random.key(0), cfg)
    x = torch.zeros(1, 4, cfg.d_model)
    from colofn.parallel import layers_forward

    with pytest.raises(TreeError, match=r"layers\[0\] \(model layer 0\) has no 'mlp' entry"):
        layers_forward(params["layers"][1:], x, cfg, Plan(), first_layer=0)
    with pytest.raises(TypeError, match="needs targets"):
        stage_forward({"layers": params["layers"][1:]}, x, cfg, Plan(), layers=range(1, 2))
