"""A pipeline stage's dp gradient sums: one bucketed all-reduce per step, started inside the last backward.

Stages run by ``per_device`` sum their replicated parameters' gradients over
``dp`` through :class:`colofn._step_sums.StepSums`: microbatches add locally,
and the buckets go on the wire during the stage's last parameter backward of
the step. These tests prove it by the order of events (never by time), and
that the receives of later actions are posted before the current action runs.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import colofn
from colofn import P, _dist_comm
from colofn.pipeline import Pipeline, gather_stages, make_schedule
from colofn.pipeline._execute import Step
from colofn.pipeline._p2p import Wire
from colofn.shard_map import per_device
from colofn.train.pipe_zero import varying

F64 = torch.float64


def test_a_stages_dp_sums_are_one_all_reduce_per_step_launched_before_the_last_backward_ends():
    """1F1B, pp=2 x dp=2, 4 microbatches, two layers per stage, a first bucket cap of one byte (so each
    parameter's total is a bucket of its own): each step, each rank's stage sends one all-reduce per
    parameter (not per microbatch), and the first is on the wire when the last microbatch's backward
    reaches the stage's first layer, not before that backward."""
    for seen, reduces in _two_steps_of_two_layer_stages(summed=False):
        # first cap 1 byte: the second layer's total launches at once, the first layer's when the pass ends
        assert reduces == [(("dp",), (16,), "backward")] * 4
        assert seen == [0, 0, 0, 1, 2, 2, 2, 3]  # (a running count) microbatches 0-2 add locally


def test_with_grad_sum_axes_a_stages_dp_sums_are_one_all_reduce_per_step_launched_when_its_last_backward_ends():
    """The same stages with their parameters varying along dp and ``grad_sum_axes="dp"``: the same
    all-reduces, one per parameter per step, all launched right after the stage's last backward (the
    parameters' entry views run last in autograd, so no total is complete before the pass ends)."""
    for seen, reduces in _two_steps_of_two_layer_stages(summed=True):
        assert reduces == [(("dp",), (16,), "backward")] * 4
        assert seen == [0, 0, 0, 0, 2, 2, 2, 2]


def _two_steps_of_two_layer_stages(summed):
    """Per rank, over two steps: the backward all-reduces already recorded when each microbatch's backward
    reaches the stage's first layer, and the all-reduces; the gradients are checked against one device."""
    vary = (lambda p: varying(p, "dp")) if summed else (lambda p: p)
    g = torch.Generator().manual_seed(0)
    w = [[torch.randn(4, 4, generator=g, dtype=F64) for _ in range(2)] for _ in range(2)]
    x, t = torch.randn(16, 4, generator=g, dtype=F64), torch.randn(16, 4, generator=g, dtype=F64)

    def program():
        mesh = colofn.Mesh((2, 2), ("pp", "dp"))
        seen: list[int] = []
        trace: list = []  # the open comm_trace's records

        def layers(p, h):
            p = vary(p)
            h = torch.tanh(h @ p[0])
            if h.requires_grad:  # fires when dL/dh0 exists: after the second layer's parameter gradient
                h.register_hook(lambda _: seen.append(sum(r.op == "all_reduce" and r.phase == "backward" for r in trace[0])))
            return torch.tanh(h @ p[1])

        mse = lambda p, h, t: ((layers(p, h) - t) ** 2).mean()  # noqa: E731  (this rank's part of the mean)
        stages = [per_device(layers, mesh=mesh, in_specs=(P(), P("dp"))),
                  per_device(mse, mesh=mesh, in_specs=(P(), P("dp"), P("dp")))]
        pipe = Pipeline(stages, make_schedule("1f1b", 2, 4), mesh=mesh, grad_sum_axes="dp" if summed else None)
        d = mesh.axis_index("dp")
        with colofn.comm_trace() as rec:
            trace.append(rec)
            outs = [pipe(w, x.view(2, 8, 4)[d], t.view(2, 8, 4)[d]) for _ in range(2)]
        reduces = [r for r in rec if r.op == "all_reduce"]
        return seen, [(r.axes, r.shape, r.phase) for r in reduces], outs[-1].loss, gather_stages(outs[-1].grads, mesh=mesh)

    with mock.patch.object(_dist_comm, "FIRST_BUCKET_BYTES", 1):  # every parameter's total fills a bucket
        got = colofn.launch(program, world_size=4)
    p = [[a.clone().requires_grad_() for a in st] for st in w]
    halves = []
    for d in range(2):  # dp replica d's mean loss; the step's gradients are their sum (the psum over dp)
        h = x.view(2, 8, 4)[d]
        for st in p:
            h = torch.tanh(torch.tanh(h @ st[0]) @ st[1])
        halves.append(((h - t.view(2, 8, 4)[d]) ** 2).mean())
    want = torch.autograd.grad(halves[0] + halves[1], [a for st in p for a in st])
    for _seen, _reduces, _loss, grads in got:
        torch.testing.assert_close([a for st in grads for a in st], list(want))
    return [(seen, reduces) for seen, reduces, _, _ in got]


_orders: dict[int, list[tuple[str, int]]] = {}  # rank -> what its second step did, in order


def _spy_post(self, items, post=Wire.post_recv):
    order = _orders.get(colofn.process_index())
    if order is not None:
        msg = items[0][0]
        order.append(("post", msg.link if msg.link < 0 else msg))
    return post(self, items)


def _spy_compute(self, op, compute=Step._compute):
    order = _orders.get(colofn.process_index())
    if order is not None:
        order.append(("compute", op))
    return compute(self, op)


def test_receives_are_posted_before_the_action_ahead_of_them_runs():
    """After the first step (which learns shapes), every action's receives are posted before the previous
    action of the rank computes, so the data moves while this rank works; the results stay exact."""

    def program():
        mesh = colofn.Mesh((2,), ("pp",))
        stage = lambda p, h: torch.tanh(h @ p)  # noqa: E731
        pipe = Pipeline([stage, stage], make_schedule("1f1b", 2, 4), mesh=mesh,
                        loss_fn=lambda y, t: ((y - t) ** 2).mean())
        w = [torch.eye(3, dtype=F64), 2 * torch.eye(3, dtype=F64)]
        x = torch.linspace(-1, 1, 24, dtype=F64).view(8, 3)
        first = pipe(w, x, x)
        _orders[colofn.process_index()] = order = []
        second = pipe(w, x, x)
        del _orders[colofn.process_index()]
        k_of = {op: k for k, op in enumerate(pipe._program)}
        events = [(what, k_of[x] if what == "compute" else k_of.get(next((op for op in pipe._program if op.recvs and op.recvs[0] == x), None), -1)) for what, x in order]
        needs = [k for k, op in enumerate(pipe._program) if op.recvs]
        return events, needs, (first.loss, second.loss)

    with mock.patch.object(Wire, "post_recv", _spy_post), mock.patch.object(Step, "_compute", _spy_compute):
        got = colofn.launch(program, world_size=2)
    for events, needs, (first, second) in got:
        assert first == second
        computed = [k for what, k in events if what == "compute"]
        assert computed == sorted(computed) and needs
        for k in needs:
            posted_at = events.index(("post", k))
            assert k == 0 or posted_at < events.index(("compute", k - 1)), (k, events)


def test_train_reports_one_dp_reduction_per_step_and_the_measured_bubble_next_to_simulate(tmp_path):
    """``colofn train`` with pp=2 x dp=2 (the GPT's real stages): one backward all-reduce over dp per step
    on rank 0 (all of stage 0's parameters in one bucket), and the report gives the last step's measured
    idle per pipeline rank next to simulate()'s for the same schedule and measured action times."""
    import json

    from colofn.train import TrainConfig, parse_mesh, train

    out = tmp_path / "out"
    cfg = TrainConfig(mesh=tuple(parse_mesh("pp=2,dp=2").items()), out=str(out), steps=2, warmup=1)
    assert train(cfg) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["comm_per_step"]["all_reduce over dp, backward"][0] == 1
    idle = record["pipeline_idle"]
    assert len(idle["measured_idle_s"]) == len(idle["simulated_idle_s"]) == 2
    assert all(i >= 0 for i in idle["measured_idle_s"] + idle["simulated_idle_s"])
    assert 0 < idle["simulated_makespan_s"] and 0 < idle["measured_makespan_s"]
    assert "pipeline bubble of the last step" in (out / "report.md").read_text()



def test_grad_sum_axes_sums_an_invariant_parameter_once_and_refuses_what_it_cannot_sum():
    """``grad_sum_axes`` sums the stages' accumulated gradients once per step. A parameter left invariant
    (tracking stashes its gradient per use) is summed once too, within the totals; one whose uses vary along
    only some of the axes is refused with the fix, and so is an axis that is not a data axis of the mesh."""
    from colofn.errors import MeshError, ShardingError

    w = [torch.eye(3, dtype=F64) + 0.1, 2 * torch.eye(3, dtype=F64)]
    x = torch.linspace(-1, 1, 24, dtype=F64).view(8, 3)

    def program(grad_sum_axes):
        mesh = colofn.Mesh((2, 2), ("pp", "dp"))
        stage = per_device(lambda p, h: torch.tanh(h @ p), mesh=mesh, in_specs=(P(), P("dp")))  # p invariant
        last = per_device(lambda p, h, t: ((torch.tanh(h @ p) - t) ** 2).mean(), mesh=mesh, in_specs=(P(), P("dp"), P("dp")))
        pipe = Pipeline([stage, last], make_schedule("1f1b", 2, 2), mesh=mesh, grad_sum_axes=grad_sum_axes)
        d = mesh.axis_index("dp")
        out = [pipe(w, x.view(2, 4, 3)[d], x.view(2, 4, 3)[d]) for _ in range(2)]
        return gather_stages(out[-1].grads, mesh=mesh)

    for got, want in zip(colofn.launch(program, "dp", world_size=4), colofn.launch(program, None, world_size=4), strict=True):
        torch.testing.assert_close(got, want)

    def refused():
        mesh = colofn.Mesh((1, 2, 2), ("pp", "dp", "sp"))
        with pytest.raises(MeshError, match=r"\['pp'\] must be axes of .* other than the pipeline axis 'pp'"):
            Pipeline([lambda p, h, t: (h @ p - t).sum()], make_schedule("gpipe", 1, 2), mesh=mesh, grad_sum_axes=("pp",))
        loss = per_device(lambda p, h, t: ((h @ p - t) ** 2).mean(), mesh=mesh, in_specs=(P(), P("dp"), P("dp")))
        pipe = Pipeline([loss], make_schedule("gpipe", 1, 2), mesh=mesh, grad_sum_axes=("dp", "sp"))
        with pytest.raises(ShardingError) as e:  # p meets data varying along dp only: its sum is over dp, not dp x sp
            pipe([torch.eye(3, dtype=F64)], x[:4], x[:4])
        assert "is used invariant along some of them and with data varying along ('dp',)" in str(e.value)
        assert "Fix: mark the stage's parameters varying along the grad_sum_axes" in str(e.value)

    colofn.launch(refused, world_size=4)
