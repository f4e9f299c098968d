"""Small models and data for the colofn.zero tests (module-level, so gloo processes can pickle them)."""

from __future__ import annotations

from typing import Any

import torch

import colofn
from colofn import P, optim, zero
from colofn import tree as jt


def mlp_params(sizes: list[int], dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layers": [
            {
                "w": (torch.randn(a, b, generator=g, dtype=torch.float64) / a**0.5).to(dtype),
                "b": (torch.randn(b, generator=g, dtype=torch.float64) * 0.1).to(dtype),
            }
            for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        ]
    }


def mlp_loss(params: Any, batch: Any) -> torch.Tensor:
    """Per-device: the mean squared error over this rank's rows."""
    x, y = batch
    layers = params["layers"]
    h = x
    for i, layer in enumerate(layers):
        h = h @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            h = torch.tanh(h)
    return ((h - y) ** 2).mean()


def batches(sizes: list[int], rows: int, steps: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(rows, sizes[0], generator=g, dtype=torch.float64).to(dtype),
            torch.randn(rows, sizes[-1], generator=g, dtype=torch.float64).to(dtype),
        )
        for _ in range(steps)
    ]


# --------------------------------------------------------------------- a dp x tp model

TP_SPECS = {"l1": {"w": P(None, "tp"), "b": P("tp")}, "l2": {"w": P("tp", None), "b": P()}}


def tp_params(d_in: int, hidden: int, d_out: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return {
        "l1": {"w": r(d_in, hidden, scale=d_in**-0.5), "b": r(hidden, scale=0.1)},
        "l2": {"w": r(hidden, d_out, scale=hidden**-0.5), "b": r(d_out, scale=0.1)},
    }


def tp_loss(params: Any, batch: Any) -> torch.Tensor:
    """Per-device: column-split l1, row-split l2 (Megatron MLP), psum over tp."""
    x, y = batch
    h = torch.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
    out = colofn.psum(h @ params["l2"]["w"], "tp") + params["l2"]["b"]
    return ((out - y) ** 2).mean()


def tp_single_loss(params: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    h = torch.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
    return ((h @ params["l2"]["w"] + params["l2"]["b"] - y) ** 2).mean()


# --------------------------------------------------------------------- programs


def make_optimizer(name: str) -> optim.GradientTransformation:
    if name == "sgd":
        return optim.sgd(0.1, momentum=0.9, weight_decay=0.01)
    if name == "adam":
        return optim.adam(1e-2)
    return optim.adamw(1e-2, weight_decay=0.1)


def train_program(
    mesh_shape: tuple[int, ...],
    axis_names: tuple[str, ...],
    params: Any,
    specs: Any,
    loss_fn: Any,
    data: list[Any],
    stage: int,
    opt_name: str = "adamw",
    **init_kw: Any,
) -> tuple[Any, list[float], list[Any]]:
    """Run ZeRO on this rank; return (global params, losses, [(info, comm records)] per step)."""
    mesh = colofn.Mesh(mesh_shape, axis_names)
    if specs is not None:
        params = colofn.device_put(params, specs, mesh=mesh)
    opt = make_optimizer(opt_name)
    state = zero.init(params, opt, mesh, stage=stage, **init_kw)
    losses, steps = [], []
    for batch in data:
        with colofn.comm_trace() as records:
            state, info = zero.train_step(loss_fn, opt, state, batch)
        losses.append(float(info.loss))
        steps.append((info, list(records)))
    return zero.params(state), losses, steps


def max_error(a: Any, b: Any) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(jt.leaves(a), jt.leaves(b), strict=True))
