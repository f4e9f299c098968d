"""The pipeline runtime on real gloo processes (world 2): 1F1B, ZBV with a skip across ranks,
and DualPipeV, each against single-device autograd, in one launch."""

from __future__ import annotations

import pytest
import torch

import colofn
from colofn import pipeline
from colofn.pipeline import Pipeline, gather_stages
from colofn.testing import assert_trees_close

F64 = torch.float64


def make_params(num_stages, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[{"w": torch.randn(dim, dim, generator=g, dtype=F64) / 2,
              "b": torch.randn(dim, generator=g, dtype=F64)}] for _ in range(num_stages)]


def mlp(layers, x):
    for layer in layers:
        x = torch.tanh(x @ layer["w"] + layer["b"])
    return x


def mse(y, t):
    y = y["h"] if isinstance(y, dict) else y
    return ((y - t) ** 2).mean()


def skip_stage(s, src, dst):
    def fn(p, x):
        h = x["h"] if isinstance(x, dict) else x
        if s == dst:
            h = h + x["emb"]
        h = mlp(p, h)
        return {"h": h, "emb": 2 * h} if s == src else {"h": h}
    return fn


CASES = {  # name -> (schedule, skips)
    "1f1b": (lambda: pipeline.one_f_one_b(2, 4), None),
    "zbv+skip": (lambda: pipeline.zbv(2, 4), {(1, 3): "emb"}),
    "dualpipev": (lambda: pipeline.dualpipev(2, 4), None),
}


def rank_program(params_by_case, x, t):
    """Module level so that spawned gloo processes can unpickle it."""
    mesh = colofn.Mesh((2,), ("pp",))
    out = {}
    for name, (make, skips) in CASES.items():
        schedule = make()
        S = schedule.num_stages
        stages = [skip_stage(s, *next(iter(skips))) for s in range(S)] if skips else [mlp] * S
        pipe = Pipeline(stages, schedule, loss_fn=mse, skips=skips, mesh=mesh)
        pipe(params_by_case[name], x, t)
        with colofn.comm_trace() as records:
            res = pipe(params_by_case[name], x, t)
        out[name] = (res.loss, gather_stages(res.grads, mesh=mesh), len(records))
    return out


def reference(params, x, t, skips):
    p = [[{k: v.clone().requires_grad_() for k, v in layer.items()} for layer in st] for st in params]
    (src, dst), = skips or {(-1, -1): None}
    h, saved = x, {}
    for s, st in enumerate(p):
        if s == dst:
            h = h + saved["emb"]
        h = mlp(st, h)
        if s == src:
            saved["emb"] = 2 * h
    loss = mse(h, t)
    it = iter(torch.autograd.grad(loss, [v for st in p for layer in st for v in layer.values()]))
    return loss.detach(), [[{k: next(it) for k in layer} for layer in st] for st in p]


@pytest.mark.gloo
def test_pipeline_on_gloo_equals_single_device():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=F64)
    t = torch.randn(8, 3, generator=g, dtype=F64)
    params = {name: make_params(make().num_stages, seed=i)
              for i, (name, (make, _)) in enumerate(CASES.items())}
    results = colofn.launch(rank_program, params, x, t, world_size=2, backend="gloo")
    for name, (make, skips) in CASES.items():
        want_loss, want_grads = reference(params[name], x, t, skips)
        transfers = pipeline.transfers(make())
        extra = 4 * (skips is not None) * 2  # a remote skip: 4 activations and 4 gradients
        for r, out in enumerate(results):
            loss, grads, messages = out[name]
            assert_trees_close(loss, want_loss, what=f"{name} loss (rank {r})")
            assert_trees_close(grads, want_grads, what=f"{name} gradients (rank {r})")
            # each rank sends or receives every transfer once, plus the losses (one message)
            assert messages == len(transfers) + extra + 1, name
