"""ZeRO equals single-device training, step for step, on random models and meshes; its
communication per step is exactly the ZeRO paper's volume (on the padded buckets).

Random MLP param pytrees with odd shapes (depth 1-3, dims 1-7), a data axis of
1-4 ranks, optionally a tp axis of 2 (a Megatron MLP, either mesh axis order),
stages 0-3, float32 and float64, sgd/adam/adamw, 2-3 steps. Failures shrink
to a minimal model and mesh.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st

import colofn
from colofn import P, optim, zero
from colofn import tree as jt
from colofn.zero.flat import FlatLayout

OPTIMIZERS = {
    "sgd": lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda: optim.adam(1e-2, weight_decay=0.01),
    "adamw": lambda: optim.adamw(1e-2),
}


def _randn(g: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5).to(dtype)


def mlp_loss(params: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    h = x * params["scale"]
    for i, layer in enumerate(params["layers"]):
        h = h @ layer["w"] + layer["b"]
        if i < len(params["layers"]) - 1:
            h = torch.tanh(h)
    return ((h - y) ** 2).mean()


def tp_loss(params: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    h = torch.tanh(x @ params["up"]["w"] + params["up"]["b"])
    out = colofn.psum(h @ params["down"]["w"], "tp") + params["down"]["b"]
    return ((out - y) ** 2).mean()


def tp_single_loss(params: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    h = torch.tanh(x @ params["up"]["w"] + params["up"]["b"])
    return ((h @ params["down"]["w"] + params["down"]["b"] - y) ** 2).mean()


TP_SPECS = {"up": {"w": P(None, "tp"), "b": P("tp")}, "down": {"w": P("tp", None), "b": P()}}


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    tp = draw(st.sampled_from([1, 1, 2]))
    dp = draw(st.integers(1, 4 // tp))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    d_in, d_out = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    if tp == 1:
        dims = [d_in] + draw(st.lists(st.integers(1, 7), min_size=0, max_size=2)) + [d_out]
        params: Any = {
            "scale": _randn(g, dtype, d_in) + 1,
            "layers": [{"w": _randn(g, dtype, a, b), "b": _randn(g, dtype, b)} for a, b in zip(dims[:-1], dims[1:], strict=True)],
        }
        names, specs, loss_fn, single = ("dp",), None, mlp_loss, mlp_loss
    else:
        hidden = tp * draw(st.integers(1, 3))
        params = {
            "up": {"w": _randn(g, dtype, d_in, hidden), "b": _randn(g, dtype, hidden)},
            "down": {"w": _randn(g, dtype, hidden, d_out), "b": _randn(g, dtype, d_out)},
        }
        names = draw(st.sampled_from([("dp", "tp"), ("tp", "dp")]))
        specs, loss_fn, single = TP_SPECS, tp_loss, tp_single_loss
    rows = dp * draw(st.integers(1, 3))
    steps = draw(st.integers(2, 3))
    data = [(_randn(g, dtype, rows, d_in), _randn(g, dtype, rows, d_out)) for _ in range(steps)]
    return {
        "sizes": {"dp": dp, "tp": tp},
        "names": names,
        "params": params,
        "specs": specs,
        "loss_fn": loss_fn,
        "single": single,
        "data": data,
        "stage": draw(st.integers(0, 3)),
        "opt": draw(st.sampled_from(sorted(OPTIMIZERS))),
        "dtype": dtype,
    }


def run(case: dict[str, Any]) -> tuple[Any, list[float], list[list[Any]], Any]:
    sizes = tuple(case["sizes"][a] for a in case["names"])
    mesh = colofn.Mesh(sizes, case["names"])
    params = case["params"]
    if case["specs"] is not None:
        params = colofn.device_put(params, case["specs"], mesh=mesh)
    opt = OPTIMIZERS[case["opt"]]()
    state = zero.init(params, opt, mesh, stage=case["stage"])
    losses, records = [], []
    for batch in case["data"]:
        with colofn.comm_trace() as rec:
            state, info = zero.train_step(case["loss_fn"], opt, state, batch)
        losses.append(float(info.loss))
        records.append([r for r in rec if r.axes == ("dp",) and r.shape != ()])  # () : the loss pmean
    return zero.params(state), losses, records, state.plan.layout


def expected_bytes(layout: FlatLayout, stage: int, n: int) -> dict[tuple[str, str], int]:
    """Bytes sent per rank per step over dp, by (op, phase), from the padded buckets."""
    shard = [b.shard * b.dtype.itemsize for b in layout.buckets]
    padded = [b.padded * b.dtype.itemsize for b in layout.buckets]
    if n == 1:
        return {}
    if stage == 0:
        return {("all_reduce", "forward"): sum(2 * (n - 1) * p // n for p in padded)}
    if stage in (1, 2):
        # both reduce-scatter during the backward (stage 1's buckets since the overlap, same bytes)
        return {("reduce_scatter", "backward"): (n - 1) * sum(shard), ("all_gather", "forward"): (n - 1) * sum(shard)}
    # stage 3: the first unit is fed raw data, so the backward does not read its params again
    later = [s for b, s in zip(layout.buckets, shard, strict=True) if b.unit > 0]
    out = {("all_gather", "forward"): (n - 1) * sum(shard), ("reduce_scatter", "backward"): (n - 1) * sum(shard)}
    if later:
        out[("all_gather", "backward")] = (n - 1) * sum(later)
    return out


@given(cases())
def test_zero_equals_single_device_with_the_papers_communication(case):
    want, want_losses = zero.reference_train(case["single"], OPTIMIZERS[case["opt"]](), case["params"], case["data"])
    world = case["sizes"]["dp"] * case["sizes"]["tp"]
    tol = 2e-5 if case["dtype"] == torch.float32 else 1e-10
    for rank, (got, losses, records, layout) in enumerate(colofn.launch(run, case, world_size=world)):
        for path_leaf, a, b in zip(jt.leaves_with_path(want), jt.leaves(got), jt.leaves(want), strict=True):
            err = float((a - b).abs().max())
            assert err <= tol * (1 + float(b.abs().max())), f"rank {rank} {jt.keystr(path_leaf[0])}: {err}"
        assert all(abs(x - y) <= tol * (1 + abs(y)) for x, y in zip(losses, want_losses, strict=True))
        want_bytes = expected_bytes(layout, case["stage"], case["sizes"]["dp"])
        for step in records:
            got_bytes: dict[tuple[str, str], int] = {}
            for r in step:
                got_bytes[(r.op, r.phase)] = got_bytes.get((r.op, r.phase), 0) + r.bytes_sent
            assert got_bytes == want_bytes, f"rank {rank}"
