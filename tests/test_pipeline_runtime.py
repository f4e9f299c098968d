"""The pipeline runtime on the simulated world: every built-in schedule equals single-device
training (loss and gradients), skips, pytree activations, dp x pp meshes, the exact
communication, and the errors raised before any communication."""

from __future__ import annotations

import pytest
import torch

import colofn
from colofn import pipeline
from colofn.errors import MeshError, ScheduleError, ShapeError, TreeError, TreeTypeError
from colofn.pipeline import Pipeline, Schedule, gather_stages, run_pipeline
from colofn.pipeline._program import make_links, programs
from colofn.testing import assert_trees_close

F64 = torch.float64


# ----------------------------------------------------------------------------- the model


def make_params(num_stages, layers=2, dim=3, seed=0):
    """Stage s: ``layers`` tanh layers ``{"w": [dim, dim], "b": [dim]}``."""
    g = torch.Generator().manual_seed(seed)
    return [[{"w": torch.randn(dim, dim, generator=g, dtype=F64) / 2,
              "b": torch.randn(dim, generator=g, dtype=F64)} for _ in range(layers)]
            for _ in range(num_stages)]


def mlp(layers, x):
    for layer in layers:
        x = torch.tanh(x @ layer["w"] + layer["b"])
    return x


def mse(y, t):
    return ((y - t) ** 2).mean()


def batch(n, dim=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=F64), torch.randn(n, dim, generator=g, dtype=F64)


def reference(params, x, t, forward=None):
    """Single-device loss of the whole batch and its gradients (plain autograd)."""
    p = [[{k: v.clone().requires_grad_() for k, v in layer.items()} for layer in st] for st in params]
    if forward is None:
        y = x
        for st in p:
            y = mlp(st, y)
        loss = mse(y, t)
    else:
        loss = forward(p, x, t)
    leaves = [v for st in p for layer in st for v in layer.values()]
    grads = torch.autograd.grad(loss, leaves)
    it = iter(grads)
    return loss.detach(), [[{k: next(it) for k in layer} for layer in st] for st in p]


def check_ranks(results, want_loss, want_grads):
    for r, (loss, grads) in enumerate(results):
        assert_trees_close(loss, want_loss, what=f"loss (rank {r})")
        assert_trees_close(grads, want_grads, what=f"gradients (rank {r})")


def pipelined(schedule, params, x, t, *, stages=None, steps=1, **kw):
    """Run ``steps`` steps on a pp mesh; each rank returns (loss, every stage's grads)."""
    stages = stages or [mlp] * schedule.num_stages

    def program():
        mesh = colofn.Mesh((schedule.num_ranks,), ("pp",))
        pipe = Pipeline(stages, schedule, mesh=mesh, **({"loss_fn": mse} | kw))
        for _ in range(steps):
            out = pipe(params, x, t)
        return out.loss, gather_stages(out.grads, mesh=mesh)

    return colofn.launch(program, world_size=schedule.num_ranks)


CASES = [("gpipe", 2, 3, 1), ("gpipe", 2, 4, 2), ("1f1b", 3, 5, 1), ("1f1b", 4, 2, 1),
         ("interleaved_1f1b", 2, 4, 2), ("interleaved_1f1b", 2, 2, 3), ("zb_h1", 3, 4, 1),
         ("zb_h2", 2, 5, 1), ("zbv", 2, 4, 2), ("zbv", 3, 3, 2), ("dualpipev", 2, 5, 2),
         ("1f1b", 1, 3, 1), ("zbv", 1, 2, 2)]


@pytest.mark.parametrize(("name", "p", "m", "v"), CASES, ids=[f"{c[0]}-p{c[1]}-m{c[2]}-v{c[3]}" for c in CASES])
def test_every_schedule_equals_single_device(name, p, m, v):
    schedule = pipeline.make_schedule(name, p, m, chunks=v)
    params = make_params(schedule.num_stages)
    x, t = batch(2 * m)
    check_ranks(pipelined(schedule, params, x, t, steps=2), *reference(params, x, t))


def test_run_pipeline_and_last_stage_taking_the_target():
    schedule = pipeline.zb_h1(2, 3)
    params = make_params(2)
    x, t = batch(6)

    def last(p, y, target):
        return mse(mlp(p, y), target)

    def program():
        mesh = colofn.Mesh((2,), ("pp",))
        out = run_pipeline([mlp, last], schedule, {r: params[r] for r in (0, 1)}, x, t, mesh=mesh)
        return out.loss, gather_stages(out.grads, mesh=mesh)

    check_ranks(colofn.launch(program, world_size=2), *reference(params, x, t))


def test_result_fields():
    schedule = pipeline.zb_h1(2, 2)
    params = make_params(2)
    x, t = batch(4)

    def program():
        with colofn.Mesh((2,), ("pp",)):
            out = Pipeline([mlp, mlp], schedule, loss_fn=mse)(params, x, t)
        return out

    outs = colofn.launch(program, world_size=2)
    want = torch.stack([mse(mlp(params[1], mlp(params[0], x[i:i + 2])), t[i:i + 2]) for i in (0, 2)])
    for r, out in enumerate(outs):
        assert sorted(out.grads) == [r]
        assert_trees_close(out.losses, want)
        assert out.loss.shape == () and torch.equal(out.loss, out.losses.mean())
        rows = [a for a in schedule.actions[r] if a is not None]
        assert [e.action for e in out.events] == rows  # one event per action, in order
        assert all(e.rank == r and 0 <= e.start <= e.end for e in out.events)
        assert all(a.end <= b.start for a, b in zip(out.events, out.events[1:], strict=False))


def test_deterministic():
    schedule = pipeline.zbv(2, 4)
    params = make_params(4)
    x, t = batch(8)
    a, b = (pipelined(schedule, params, x, t) for _ in range(2))
    for (la, ga), (lb, gb) in zip(a, b, strict=True):
        assert torch.equal(la, lb)
        assert_trees_close(ga, gb, rtol=0, atol=0)


# ----------------------------------------------------------------------------- skips and pytrees


def skip_forward(src, dst, num_stages):
    """Stage functions with a skip ``src -> dst``, and the same model written plainly."""

    def stage(s):
        def fn(p, x):
            h = x["h"] if isinstance(x, dict) else x
            if s == dst:
                h = h + x["emb"]
            h = mlp(p, h)
            out = {"h": h}
            if s == src:
                out["emb"] = 0.5 * h + 1.0
            return out
        return fn

    def plain(params, x, t):
        h, saved = x, {}
        for s, p in enumerate(params):
            if s == dst:
                h = h + saved["emb"]
            h = mlp(p, h)
            if s == src:
                saved["emb"] = 0.5 * h + 1.0
        return mse(h, t)

    return [stage(s) for s in range(num_stages)], plain


def dict_mse(y, t):
    return mse(y["h"], t)


@pytest.mark.parametrize(("name", "p", "v", "src", "dst"), [
    ("1f1b", 4, 1, 0, 3),  # remote, across three ranks
    ("interleaved_1f1b", 2, 2, 0, 2),  # both stages on rank 0: handed over in memory
    ("zbv", 2, 2, 0, 3),  # V placement: stage 0 and 3 on rank 0
    ("zbv", 2, 2, 1, 3),  # rank 1 -> rank 0, with I/W split
    ("gpipe", 3, 1, 0, 1),  # a skip to the next stage, beside the chain
])
def test_skip_connection(name, p, v, src, dst):
    schedule = pipeline.make_schedule(name, p, 2 * p, chunks=v)
    S = schedule.num_stages
    stages, plain = skip_forward(src, dst, S)
    params = make_params(S)
    x, t = batch(4 * p)
    got = pipelined(schedule, params, x, t, stages=stages, loss_fn=dict_mse,
                    skips={(src, dst): "emb"}, steps=2)
    check_ranks(got, *reference(params, x, t, forward=plain))


def test_one_output_to_two_stages():
    schedule = pipeline.one_f_one_b(4, 4)

    def stage(s):
        def fn(p, x):
            if s == 0:
                h = mlp(p, x)
                return {"h": h, "e": 2 * h}
            h = mlp(p, x["h"] + (x["e"] if s in (2, 3) else 0))
            return {"h": h}
        return fn

    def plain(params, x, t):
        h = mlp(params[0], x)
        e = 2 * h
        h = mlp(params[1], h)
        h = mlp(params[2], h + e)
        return mse(mlp(params[3], h + e), t)

    params = make_params(4)
    x, t = batch(8)
    got = pipelined(schedule, params, x, t, stages=[stage(s) for s in range(4)], loss_fn=dict_mse,
                    skips={(0, 2): "e", (0, 3): "e"})
    check_ranks(got, *reference(params, x, t, forward=plain))


def test_pytree_activations_with_integer_leaves_and_stage_losses():
    """Activations are pytrees; integer leaves travel without gradients; an auxiliary loss
    computed on stage 0 rides along as a leaf."""
    schedule = pipeline.zb_h1(2, 2)
    params = make_params(2)
    x, t = batch(4)
    ids = torch.tensor([[0], [1], [2], [0]])

    def first(p, inp):
        h = mlp(p, inp["x"])
        return (h, {"ids": inp["ids"] + 1, "aux": (h ** 2).mean()})

    def last(p, y, target):
        h, extra = y
        assert extra["ids"].dtype == torch.int64 and not extra["ids"].requires_grad
        h = mlp(p, h) * (extra["ids"] + 1)
        return mse(h, target) + 0.1 * extra["aux"]

    def plain(params, x, t):
        h0 = mlp(params[0], x[0:2]), mlp(params[0], x[2:4])
        losses = [mse(mlp(params[1], h) * (ids[2 * i:2 * i + 2] + 2), t[2 * i:2 * i + 2])
                  + 0.1 * (h ** 2).mean() for i, h in enumerate(h0)]
        return (losses[0] + losses[1]) / 2

    def program():
        mesh = colofn.Mesh((2,), ("pp",))
        pipe = Pipeline([first, last], schedule, mesh=mesh)
        pipe(params, {"x": x, "ids": ids}, t)
        out = pipe(params, {"x": x, "ids": ids}, t)
        return out.loss, gather_stages(out.grads, mesh=mesh)

    check_ranks(colofn.launch(program, world_size=2), *reference(params, x, t, forward=plain))


def test_dp_by_pp_mesh_runs_one_pipeline_per_dp_coordinate():
    schedule = pipeline.one_f_one_b(2, 2)
    params = make_params(2)
    x, t = batch(8)

    def program():
        mesh = colofn.Mesh((2, 2), ("dp", "pp"))
        d = mesh.axis_index("dp")
        xs, ts = x[4 * d:4 * d + 4], t[4 * d:4 * d + 4]
        out = Pipeline([mlp, mlp], schedule, loss_fn=mse, mesh=mesh)(params, xs, ts)
        return out.loss, gather_stages(out.grads, mesh=mesh)

    got = colofn.launch(program, world_size=4)
    for d in (0, 1):
        check_ranks(got[2 * d:2 * d + 2], *reference(params, x[4 * d:4 * d + 4], t[4 * d:4 * d + 4]))


def test_pp_axis_need_not_be_first_or_named_pp():
    schedule = pipeline.zbv(2, 2)
    params = make_params(4)
    x, t = batch(4)

    def program():
        mesh = colofn.Mesh((2, 2), ("stage", "tp"))
        out = Pipeline([mlp] * 4, schedule, loss_fn=mse, mesh=mesh, axis_name="stage")(params, x, t)
        return out.loss, gather_stages(out.grads, mesh=mesh, axis_name="stage")

    check_ranks(colofn.launch(program, world_size=4), *reference(params, x, t))


# ----------------------------------------------------------------------------- communication


def trace(schedule, params, x, t, steps=2):
    def program():
        mesh = colofn.Mesh((schedule.num_ranks,), ("pp",))
        pipe = Pipeline([mlp] * schedule.num_stages, schedule, loss_fn=mse, mesh=mesh)
        out = []
        for _ in range(steps):
            with colofn.comm_trace() as records:
                pipe(params, x, t)
            out.append([(r.op, r.axes, r.shape, r.bytes_sent, r.bytes_received, r.phase, r.peer)
                        for r in records])
        return out

    return colofn.launch(program, world_size=schedule.num_ranks)


def test_exact_communication_of_1f1b():
    params = make_params(2)
    x, t = batch(4)
    (first0, steady0), (first1, steady1) = trace(pipeline.one_f_one_b(2, 2), params, x, t)
    act = ((2, 3), 48)
    # Records are made when ops are posted: receives go out up to two actions ahead, and
    # the losses' receive at the start of the step (shapes are known after the first step).
    assert steady0 == [
        ("recv", ("pp",), (2,), 0, 16, "forward", 1),  # the losses
        ("recv", ("pp",), act[0], 0, 48, "backward", 1),  # for 0B0 (2 ahead of 0F0)
        ("send", ("pp",), act[0], 48, 0, "forward", 1),  # after 0F0
        ("recv", ("pp",), act[0], 0, 48, "backward", 1),  # for 0B1
        ("send", ("pp",), act[0], 48, 0, "forward", 1),  # after 0F1
    ]
    assert steady1 == [
        ("recv", ("pp",), act[0], 0, 48, "forward", 0),  # for 1F0
        ("recv", ("pp",), act[0], 0, 48, "forward", 0),  # for 1F1 (2 ahead)
        ("send", ("pp",), act[0], 48, 0, "backward", 0),  # after 1B0
        ("send", ("pp",), act[0], 48, 0, "backward", 0),  # after 1B1
        ("send", ("pp",), (2,), 16, 0, "forward", 0),  # the losses
    ]
    # The first step also sends each activation's metadata (a size and the pickled bytes).
    assert [r[0] for r in first0] == ["send"] * 6 + ["recv"] * 2 + ["recv"] * 3
    assert sum(r[0] == "recv" for r in first1) == 6


def test_messages_are_exactly_the_plans_transfers():
    """Counting messages per rank: one per cross-rank transfer of plan(), none between stages
    of one rank (ZBV's turn-around on the last rank), plus the losses."""
    for schedule in (pipeline.zbv(3, 3), pipeline.interleaved_1f1b(2, 4, chunks=2),
                     pipeline.dualpipev(2, 4)):
        params = make_params(schedule.num_stages)
        x, t = batch(2 * schedule.num_microbatches)
        steady = [per_rank[1] for per_rank in trace(schedule, params, x, t)]
        transfers = pipeline.transfers(schedule)
        last = schedule.stage_to_rank[-1]
        for r, records in enumerate(steady):
            sends = sum(tr.src == r for tr in transfers) + (schedule.num_ranks - 1) * (r == last)
            recvs = sum(tr.dst == r for tr in transfers) + (r != last)
            assert [x[0] for x in records].count("send") == sends
            assert [x[0] for x in records].count("recv") == recvs


def test_program_uses_the_plans_tags_and_unique_skip_tags():
    schedule = pipeline.zbv(2, 3)
    links = make_links(4, {(0, 3): ("emb",), (1, 2): ("a", "b")})
    progs = programs(schedule, links)
    plan = pipeline.plan(schedule)
    for rank, ops in enumerate(progs):
        for op, step in zip(ops, plan[rank], strict=True):
            assert op.action == step.action
            chain = sorted(m.tag for m in op.recvs if m.link < 3)
            assert chain == sorted(t.tag for t in step.recvs)
    tags = [(m.peer, m.tag) for ops in progs for op in ops for m in op.sends]
    assert len(tags) == len(set(tags))


# ----------------------------------------------------------------------------- errors


def test_invalid_schedule_is_rejected_with_validates_message_before_any_communication():
    bad = Schedule([["0F0", "0B0", "0F1", "0B1"], ["1F0", "1F1", "1B0", "1B1"]],
                   num_stages=2, num_microbatches=2, stage_to_rank=(0, 1), name="stuck")
    with pytest.raises(ScheduleError) as want:
        pipeline.validate(bad)

    def program():
        mesh = colofn.Mesh((2,), ("pp",))
        with colofn.comm_trace() as records, pytest.raises(ScheduleError) as e:
            Pipeline([mlp, mlp], bad, loss_fn=mse, mesh=mesh)
        return str(e.value), records

    for text, records in colofn.launch(program, world_size=2):
        assert text == str(want.value)
        assert "deadlock: waits for the gradient of 1B0" in text
        assert records == []


def run_error(build, world_size=2, mesh_shape=None, names=("pp",)):
    def program():
        mesh = colofn.Mesh(mesh_shape or (world_size,), names)
        with colofn.comm_trace() as records:
            try:
                build(mesh)
            except (ValueError, TypeError) as e:
                return type(e), str(e), records
        return None

    return colofn.launch(program, world_size=world_size)[0]


def test_mesh_without_the_pp_axis():
    kind, text, records = run_error(
        lambda mesh: Pipeline([mlp, mlp], pipeline.gpipe(2, 2), loss_fn=mse, mesh=mesh),
        names=("dp",))
    assert kind is MeshError and records == []
    assert text == ("Pipeline runs along mesh axis 'pp', but Mesh(dp=2) has axes ('dp',); "
                    "build the mesh with a 'pp' axis or pass axis_name=...")


def test_schedule_ranks_must_match_the_pp_axis():
    kind, text, _ = run_error(
        lambda mesh: Pipeline([mlp] * 3, pipeline.gpipe(3, 2), loss_fn=mse, mesh=mesh))
    assert kind is ScheduleError
    assert text == ("Schedule 'gpipe' has 3 ranks (stage_to_rank=(0, 1, 2)) but mesh axis 'pp' of "
                    "Mesh(pp=2) has 2; build the schedule for 2 ranks.")


def test_one_stage_function_per_stage():
    kind, text, _ = run_error(
        lambda mesh: Pipeline([mlp, mlp], pipeline.zbv(2, 2), loss_fn=mse, mesh=mesh))
    assert kind is ScheduleError
    assert text == ("Pipeline got 2 stage functions but schedule 'zbv' has 4 stages (2 ranks x 2 "
                    "per rank); give one function per stage.")


def test_bad_skips():
    kind, text, _ = run_error(lambda mesh: Pipeline(
        [mlp] * 2, pipeline.gpipe(2, 2), loss_fn=mse, mesh=mesh,
        skips={(1, 0): "a", (0, 1): ("",)}))
    assert kind is ScheduleError
    assert text == ("Pipeline: bad skips:\n"
                    "  * key (1, 0): needs (src, dst) stages with 0 <= src < dst < 2\n"
                    "  * (0, 1): ('',) is not a name or a tuple of names")


def test_call_errors_before_communication():
    schedule = pipeline.gpipe(2, 2)
    params = make_params(2)
    x, t = batch(4)

    def call(*args):
        return lambda mesh: Pipeline([mlp, mlp], schedule, loss_fn=mse, mesh=mesh)(*args)

    kind, text, records = run_error(call(params, x[:3], t))
    assert kind is ShapeError and records == []
    assert text == ("Pipeline cannot split inputs into microbatches:\n  * inputs<root> has shape "
                    "(3, 3): dim 0 (the batch) must be a multiple of num_microbatches=2")
    kind, text, _ = run_error(call({}, x, t))
    assert kind is TreeError and text.startswith("Pipeline: params has no entry for stage(s) [0]")
    bad = [[{"w": torch.zeros(3, 3, dtype=torch.int64)}]] * 2
    kind, text, _ = run_error(call(bad, x, t))
    assert kind is TreeTypeError
    assert "params of stage 0 at [0]['w']: a Tensor torch.int64" in text
    kind, text, _ = run_error(call(params, None, t))
    assert kind is ShapeError and text.startswith("Pipeline: pass inputs on every rank")


def test_a_loss_that_is_not_a_scalar():
    schedule = pipeline.one_f_one_b(1, 2)
    params = make_params(1)
    x, t = batch(4)
    kind, text, _ = run_error(
        lambda mesh: Pipeline([mlp], schedule, mesh=mesh, loss_fn=lambda y, t: y)(params, x, t),
        world_size=1)
    assert kind is ShapeError
    assert text == ("Pipeline: loss_fn must return the microbatch's loss as a floating-point "
                    "scalar tensor, got shape (2, 3) torch.float64.")


def test_skip_source_must_return_a_dict():
    params = make_params(2)
    x, t = batch(4)
    kind, text, _ = run_error(lambda mesh: Pipeline(
        [mlp, mlp], pipeline.gpipe(1, 2, chunks=2), mesh=mesh, loss_fn=mse,
        skips={(0, 1): "e"})(params, x, t), world_size=1)
    assert kind is TreeError
    assert text == ("Pipeline: stage 0 has skips ('e'), so it must return a dict holding them; "
                    "it returned a Tensor.")


def test_meta_inputs_off_stage_zero_and_new_shapes_on_the_same_pipeline():
    """Ranks without stage 0 may pass meta tensors as inputs (only shapes are read), the
    rank without the last stage may pass no targets, and a new batch size is learned again."""
    schedule = pipeline.zbv(2, 2)  # stages 0 and 3 on rank 0, 1 and 2 on rank 1
    params = make_params(4)
    x4, t4 = batch(4)
    x8, t8 = batch(8, seed=2)

    def program():
        mesh = colofn.Mesh((2,), ("pp",))
        pipe = Pipeline([mlp] * 4, schedule, loss_fn=mse, mesh=mesh)
        out = []
        for x, t in ((x4, t4), (x8, t8), (x4, t4)):
            first = mesh.axis_index("pp") == 0
            res = pipe(params, x if first else x.to("meta"), t if first else None)
            out.append((res.loss, gather_stages(res.grads, mesh=mesh)))
        return out

    for per_rank in colofn.launch(program, world_size=2):
        for (loss, grads), (x, t) in zip(per_rank, ((x4, t4), (x8, t8), (x4, t4)), strict=True):
            want_loss, want_grads = reference(params, x, t)
            assert_trees_close(loss, want_loss)
            assert_trees_close(grads, want_grads)
