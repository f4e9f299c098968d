"""Pipeline stages replicated over dp: random schedules and microbatch counts equal one device.

Each stage is a ``per_device`` function of replicated parameters and
dp-split activations, so its parameters' gradients are summed over ``dp``: once
per step (:class:`colofn._step_sums.StepSums`), during each stage's last
parameter backward, while the receives of later actions are posted early. For
random built-in schedules (1-2 pipeline ranks x 2 dp ranks, any chunk and
microbatch count they take), two steps (the first learns the activation shapes,
the second uses the early receives) give the single-device loss and gradients,
and each rank issues one backward all-reduce per stage it holds per step.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import colofn
from colofn import P
from colofn.pipeline import SCHEDULES, Pipeline, gather_stages, make_schedule
from colofn.shard_map import per_device
from colofn.testing import assert_trees_close
from colofn.train.pipe_zero import varying

F64 = torch.float64
CHUNKS = {"gpipe": (1, 2), "1f1b": (1,), "interleaved_1f1b": (1, 2), "zb_h1": (1,), "zb_h2": (1,),
          "zbv": (2,), "dualpipev": (2,)}


@st.composite
def configs(draw):
    name = draw(st.sampled_from(sorted(SCHEDULES)))
    p = draw(st.integers(1, 2))
    v = draw(st.sampled_from(CHUNKS[name]))
    m = p * draw(st.integers(1, 2)) if name == "interleaved_1f1b" and v > 1 else draw(st.integers(1, 5))
    schedule = make_schedule(name, p, m, chunks=v)
    widths = draw(st.lists(st.integers(1, 4), min_size=schedule.num_stages + 1, max_size=schedule.num_stages + 1))
    return schedule, widths, draw(st.integers(1, 2)), draw(st.integers(0, 2**16))


def mlp(p, h):
    return torch.tanh(h @ p["w"] + p["b"])


def stages(schedule, mesh, vary=lambda p: p):
    mse = lambda p, h, t: colofn.pmean(((mlp(vary(p), h) - t) ** 2).mean(), "dp")  # noqa: E731
    body = [per_device(lambda p, h: mlp(vary(p), h), mesh=mesh, in_specs=(P(), P("dp")))
            for _ in range(schedule.num_stages - 1)]
    return body + [per_device(mse, mesh=mesh, in_specs=(P(), P("dp"), P("dp")))]


@given(configs())
def test_pipeline_over_dp_equals_single_device(config):
    _check(config, summed=False)


@given(configs())
def test_pipeline_with_varying_params_and_grad_sum_axes_equals_single_device(config):
    """The stages mark their parameters varying along dp and ``grad_sum_axes="dp"`` sums their totals once."""
    _check(config, summed=True)


def _check(config, summed):
    schedule, widths, rows, seed = config
    g = torch.Generator().manual_seed(seed)
    params = [{"w": torch.randn(widths[s], widths[s + 1], generator=g, dtype=F64),
               "b": torch.randn(widths[s + 1], generator=g, dtype=F64)} for s in range(schedule.num_stages)]
    n = 2 * rows * schedule.num_microbatches  # dp=2 halves, each split into the microbatches
    x = torch.randn(n, widths[0], generator=g, dtype=F64)
    t = torch.randn(n, widths[-1], generator=g, dtype=F64)

    def program():
        mesh = colofn.Mesh((schedule.num_ranks, 2), ("pp", "dp"))
        if summed:
            pipe = Pipeline(stages(schedule, mesh, lambda p: varying(p, "dp")), schedule, mesh=mesh, grad_sum_axes="dp")
        else:
            pipe = Pipeline(stages(schedule, mesh), schedule, mesh=mesh)
        d = mesh.axis_index("dp")
        xs, ts = x.view(2, n // 2, -1)[d], t.view(2, n // 2, -1)[d]
        outs = []
        for _ in range(2):
            with colofn.comm_trace() as rec:
                outs.append(pipe(params, xs, ts))
            outs[-1] = (outs[-1], sum(r.op == "all_reduce" and r.phase == "backward" for r in rec))
        held = len(pipe.local_stages)
        return [o.loss for o, _ in outs], [c for _, c in outs], held, gather_stages(outs[-1][0].grads, mesh=mesh)

    p = [{k: v.clone().requires_grad_() for k, v in st_.items()} for st_ in params]
    h = x
    for st_ in p:  # the mean over the whole batch equals the mean of the dp halves' means
        h = mlp(st_, h)
    want = ((h - t) ** 2).mean()
    want_grads = torch.autograd.grad(want, [a for st_ in p for a in st_.values()])
    for r, (losses, reduces, held, grads) in enumerate(colofn.launch(program, world_size=2 * schedule.num_ranks)):
        for loss in losses:
            assert_trees_close(loss, want.detach(), what=f"loss (rank {r}, {schedule.name})")
        assert_trees_close([a for st_ in grads for a in st_.values()], list(want_grads),
                           what=f"gradients (rank {r}, {schedule.name})")
        assert reduces == [held, held], f"rank {r}: {reduces} backward all-reduces per step, holding {held} stages"
