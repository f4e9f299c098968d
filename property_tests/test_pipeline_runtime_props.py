"""The pipeline runtime equals single-device training for random schedules, sizes and skips.

A model is a sequence of small tanh layers of random widths, cut into the
schedule's stages; the loss is the mean squared error. For random built-in
schedules (1-4 ranks, their chunk counts, any microbatch count they take) every
rank's loss and every stage's gradients (gathered) after two steps (the first
sends activation shapes, the second reuses them) equal plain autograd on the
whole batch. Failures shrink to the smallest schedule and model.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import colofn
from colofn.pipeline import SCHEDULES, Pipeline, gather_stages, make_schedule
from colofn.testing import assert_trees_close

F64 = torch.float64
CHUNKS = {"gpipe": (1, 2, 3), "1f1b": (1,), "interleaved_1f1b": (1, 2, 3), "zb_h1": (1,),
          "zb_h2": (1,), "zbv": (2,), "dualpipev": (2,)}


@st.composite
def configs(draw, min_stages=1):
    name = draw(st.sampled_from(sorted(SCHEDULES)))
    p = draw(st.integers(1, 4))
    v = draw(st.sampled_from(CHUNKS[name]))
    if p * v < min_stages:
        v = max(c for c in CHUNKS[name])
        p = max(p, -(-min_stages // v))
    if name == "interleaved_1f1b" and v > 1:
        m = p * draw(st.integers(1, 2))
    else:
        m = draw(st.integers(1, 6))
    schedule = make_schedule(name, p, m, chunks=v)
    layers = draw(st.integers(1, 2))
    widths = draw(st.lists(st.integers(1, 4), min_size=schedule.num_stages * layers + 1,
                           max_size=schedule.num_stages * layers + 1))
    microbatch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return schedule, layers, widths, microbatch, seed


def model(schedule, layers, widths, microbatch, seed):
    g = torch.Generator().manual_seed(seed)
    params, k = [], 0
    for _ in range(schedule.num_stages):
        stage = []
        for _ in range(layers):
            stage.append({"w": torch.randn(widths[k], widths[k + 1], generator=g, dtype=F64),
                          "b": torch.randn(widths[k + 1], generator=g, dtype=F64)})
            k += 1
        params.append(stage)
    n = microbatch * schedule.num_microbatches
    x = torch.randn(n, widths[0], generator=g, dtype=F64)
    t = torch.randn(n, widths[-1], generator=g, dtype=F64)
    return params, x, t


def mlp(layers, x):
    for layer in layers:
        x = torch.tanh(x @ layer["w"] + layer["b"])
    return x


def mse(y, t):
    y = y["h"] if isinstance(y, dict) else y
    return ((y - t) ** 2).mean()


def skip_stages(num_stages, src, dst):
    """Stage ``src`` also outputs ``emb``; stage ``dst`` adds its row sums to its input."""

    def stage(s):
        def fn(p, x):
            h = x["h"] if isinstance(x, dict) else x
            if s == dst:
                h = h + x["emb"].sum(-1, keepdim=True)
            h = mlp(p, h)
            return {"h": h, "emb": torch.sin(h)} if s == src else {"h": h}
        return fn

    return [stage(s) for s in range(num_stages)]


def reference(params, x, t, skip=None):
    p = [[{k: v.clone().requires_grad_() for k, v in layer.items()} for layer in st] for st in params]
    h, emb = x, None
    for s, stage in enumerate(p):
        if skip is not None and s == skip[1]:
            h = h + emb.sum(-1, keepdim=True)
        h = mlp(stage, h)
        if skip is not None and s == skip[0]:
            emb = torch.sin(h)
    loss = mse(h, t)
    leaves = [v for st in p for layer in st for v in layer.values()]
    it = iter(torch.autograd.grad(loss, leaves))
    return loss.detach(), [[{k: next(it) for k in layer} for layer in st] for st in p]


def run(schedule, params, x, t, stages, skips=None):
    def program():
        mesh = colofn.Mesh((schedule.num_ranks,), ("pp",))
        pipe = Pipeline(stages, schedule, loss_fn=mse, skips=skips, mesh=mesh)
        pipe(params, x, t)
        out = pipe(params, x, t)
        return out.loss, gather_stages(out.grads, mesh=mesh)

    return colofn.launch(program, world_size=schedule.num_ranks)


@given(configs())
def test_pipeline_equals_single_device(config):
    schedule, *sizes = config
    params, x, t = model(schedule, *sizes)
    want_loss, want_grads = reference(params, x, t)
    for r, (loss, grads) in enumerate(run(schedule, params, x, t, [mlp] * schedule.num_stages)):
        assert_trees_close(loss, want_loss, what=f"loss (rank {r}, {schedule.name})")
        assert_trees_close(grads, want_grads, what=f"gradients (rank {r}, {schedule.name})")


@given(configs(min_stages=2), st.data())
def test_pipeline_with_a_skip_equals_single_device(config, data):
    schedule, *sizes = config
    S = schedule.num_stages
    src = data.draw(st.integers(0, S - 2), label="src")
    dst = data.draw(st.integers(src + 1, S - 1), label="dst")
    params, x, t = model(schedule, *sizes)
    want_loss, want_grads = reference(params, x, t, skip=(src, dst))
    got = run(schedule, params, x, t, skip_stages(S, src, dst), skips={(src, dst): "emb"})
    for r, (loss, grads) in enumerate(got):
        assert_trees_close(loss, want_loss, what=f"loss (rank {r}, {schedule.name})")
        assert_trees_close(grads, want_grads, what=f"gradients (rank {r}, {schedule.name})")
