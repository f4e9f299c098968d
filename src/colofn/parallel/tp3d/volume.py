"""Bytes each rank sends under a 3D plan, by formula, op by op; and what each rank holds.

The figures are those :func:`colofn.comm_trace` records (ring volumes, see
:mod:`colofn.tracing`), so a test can assert them exactly. One 3D product
``Y = X W`` (:func:`~colofn.parallel.tp3d.matmul`) on ``P = p_in p_w p_out``
ranks sends, per rank, in the forward and again in the backward,

    ``e ((p_x - 1) |X| + (p_w - 1) |W| + (p_y - 1) |Y|) / P``

(``|.|`` the elements of the global matrix, ``e`` bytes per element, ``p_x``
and ``p_y`` the sizes of the axes ``X`` is gathered and ``Y`` scattered along):
the all-gathers of ``X`` and ``W`` and the reduce-scatter of ``Y``, then the
all-gather of ``dY`` and the reduce-scatters of ``dX`` and ``dW``. On a cube
that is ``2 (p - 1)(|X| + |W| + |Y|) / p^3`` a product, the
``O(6 (q - 1) / q^3)`` of Bian et al. with ``|X| = |W| = |Y|``.

>>> from colofn.models import gpt
>>> from colofn.parallel import Plan
>>> cfg = gpt.config("tiny")  # d_model 32, d_ff 128, 4 heads
>>> plan = Plan(tp_mode="3d", tp_grid=("i", "w", "o"))
>>> layer_bytes(cfg, plan, {"i": 2, "w": 2, "o": 2}, batch=8, seq=32)
145792
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from colofn.models.gpt import GPTConfig
from colofn.parallel.plan import Plan
from colofn.parallel.tp3d.grid import grid

__all__ = ["layer_bytes", "memory", "step_ops", "step_bytes"]

Key = tuple[str, tuple[str, ...], str]  # (op, axes, phase)


def _ring(op: str, nbytes: int, n: int) -> int:
    """As :func:`colofn.tracing.volume`: bytes sent by one rank."""
    if n <= 1:
        return 0
    return {"all_reduce": 2 * (n - 1) * nbytes // n, "all_gather": (n - 1) * nbytes, "reduce_scatter": (n - 1) * nbytes // n}[op]


class _Ops:
    def __init__(self, plan: Plan, shape: Mapping[str, int]) -> None:
        self.g, self.shape, self.dp = grid(plan), shape, plan.dp_axes
        self.sizes = [shape[a] for a in self.g]
        self.P = math.prod(self.sizes)
        self.out: Counter[Key] = Counter()

    def add(self, op: str, axes: tuple[str, ...], phase: str, nbytes: int) -> None:
        axes = tuple(a for a in self.shape if a in axes)  # mesh order, as the records name them
        n = math.prod(self.shape[a] for a in axes)
        if n > 1:
            self.out[(op, axes, phase)] += _ring(op, nbytes, n)

    def product(self, x: int, w: int, y: int, e: int, *, flip: bool = False, dp_sum: bool = True) -> None:
        """``x``, ``w``, ``y``: elements of the global ``X``, ``W`` (its tensor-parallel part) and ``Y``."""
        g = self.g
        xa, ya = (g.out, g.inp) if flip else (g.inp, g.out)
        px, py, pw = self.shape[xa], self.shape[ya], self.shape[g.wt]
        for phase in ("forward", "backward"):  # the backward moves the transposes: the same bytes
            self.add("all_gather" if phase == "forward" else "reduce_scatter", (xa,), phase, e * x // self.P * (px if phase == "backward" else 1))
            self.add("all_gather" if phase == "forward" else "reduce_scatter", (g.wt,), phase, e * w // self.P * (pw if phase == "backward" else 1))
            self.add("reduce_scatter" if phase == "forward" else "all_gather", (ya,), phase, e * y // self.P * (py if phase == "forward" else 1))
        if dp_sum:  # the data-parallel gradient sum of W's shard
            self.add("all_reduce", self.dp, "backward", e * w // self.P)

    def norm(self, tokens: int, config: GPTConfig, ef: int, e: int) -> None:
        """A LayerNorm/RMSNorm of ``tokens`` (global count per dp replica) and its ``scale`` (and ``bias``) gradients."""
        rows = tokens // (self.shape[self.g.wt] * self.shape[self.g.inp])
        for _ in range(2 if config.norm == "layernorm" else 1):  # mean and variance, or the mean square
            self.add("all_reduce", (self.g.out,), "forward", rows * ef)
            # their pvary into the d_model-split stream is psum'd back in the backward
            self.add("all_reduce", (self.g.out,), "backward", rows * ef)
        for _ in range(2 if config.norm == "layernorm" else 1):  # scale (and bias): replicated over dp, input, weight
            self.add("all_reduce", (*self.dp, self.g.inp, self.g.wt), "backward", config.d_model // self.shape[self.g.out] * e)


def _sizes(config: GPTConfig) -> tuple[int, int]:
    e = torch.empty((), dtype=config.dtype).element_size()
    ef = torch.empty((), dtype=torch.promote_types(config.dtype, torch.float32)).element_size()
    return e, ef


def _layer(o: _Ops, config: GPTConfig, tokens: int) -> None:
    e, ef = _sizes(config)
    d, ff = config.d_model, config.d_ff
    o.norm(tokens, config, ef, e)
    o.product(tokens * d, 3 * d * d, 3 * tokens * d, e)  # q, k, v: one product of the stacked weights
    o.product(tokens * d, d * d, tokens * d, e, flip=True)  # wo
    o.norm(tokens, config, ef, e)
    o.product(tokens * d, d * ff, tokens * ff, e)  # w1
    o.product(tokens * ff, ff * d, tokens * d, e, flip=True)  # w2


def step_ops(config: GPTConfig, plan: Plan, shape: Mapping[str, int], batch: int, seq: int) -> Counter[Key]:
    """``{(op, axes, phase): bytes sent per rank}`` of one loss-and-gradient step of :func:`colofn.parallel.make_loss`.

    Gradient sums are counted parameter by parameter; colofn buckets those of
    one group into one all-reduce, which sends the same bytes (the ring
    formula's rounding aside, exact when the group's size divides the bytes).
    """
    o = _Ops(plan, shape)
    g, e, ef = o.g, *_sizes(config)
    tokens = batch // math.prod(shape[a] for a in plan.dp_axes) * seq  # per dp replica
    d, v = config.d_model, config.vocab_size
    # embedding: the table gathered along weight, the looked-up rows reduce-scattered along input
    for phase, gather, scatter in (("forward", "all_gather", "reduce_scatter"), ("backward", "reduce_scatter", "all_gather")):
        o.add(gather, (g.wt,), phase, e * v * d // o.P * (shape[g.wt] if phase == "backward" else 1))
        o.add(scatter, (g.inp,), phase, e * tokens * d // o.P * (shape[g.inp] if phase == "forward" else 1))
    o.add("all_reduce", plan.dp_axes, "backward", e * v * d // o.P)  # tok's dp gradient sum (once, tied or not)
    if config.pos == "learned":
        o.add("all_reduce", (*plan.dp_axes, g.inp, g.wt), "backward", e * config.seq_len * d // shape[g.out])
    for _ in range(config.n_layers):
        _layer(o, config, tokens)
    o.norm(tokens, config, ef, e)
    o.product(tokens * d, d * v, tokens * v, e, dp_sum=not config.tie_embeddings)  # head (tied: tok.T, summed above)
    rows = tokens // (shape[g.wt] * shape[g.out])  # the logits' tokens on a rank
    o.add("all_reduce", (g.inp,), "forward", rows * ef)  # the max over the vocabulary
    o.add("all_reduce", (g.inp,), "forward", 2 * rows * ef)  # sum of exponentials and the target's logit
    o.add("all_reduce", (*plan.dp_axes, g.wt, g.out), "forward", 2 * ef)  # [nll, count] for the mean
    return +o.out


def step_bytes(config: GPTConfig, plan: Plan, shape: Mapping[str, int], batch: int, seq: int) -> int:
    """Bytes one rank sends in a loss-and-gradient step (the sum of :func:`step_ops`)."""
    return sum(step_ops(config, plan, shape, batch, seq).values())


def layer_bytes(config: GPTConfig, plan: Plan, shape: Mapping[str, int], batch: int, seq: int) -> int:
    """Bytes one rank sends for one transformer block, forward and backward (dp gradient sums included)."""
    o = _Ops(plan, shape)
    _layer(o, config, batch // math.prod(shape[a] for a in plan.dp_axes) * seq)
    return sum(o.out.values())


def memory(config: GPTConfig, plan: Plan, shape: Mapping[str, int], batch: int, seq: int) -> dict[str, int]:
    """Elements one rank holds: ``"weights"`` (its shards) and ``"stream"`` (one ``[b, s, d_model]`` activation).

    Every weight matrix is split ``P = p_in p_w p_out`` ways; the norms' and
    the position table's ``d_model`` only ``p_out`` ways (they are replicated
    over input and weight). One residual-stream activation is split ``P`` ways
    as well (``batch`` over dp, weight and input, ``d_model`` over output).
    """
    from colofn import tree
    from colofn.models.gpt import abstract_params
    from colofn.parallel.specs import param_specs

    P = math.prod(shape[a] for a in grid(plan))
    specs = param_specs(config, plan)

    def local(t: Any, spec: Any) -> int:
        n = t.numel()
        for entry in spec:
            for a in (entry,) if isinstance(entry, str) else entry or ():
                n //= shape[a]
        return n

    weights = sum(local(t, s) for t, s in zip(tree.leaves(abstract_params(config)), tree.leaves(specs), strict=True))
    dp = math.prod(shape[a] for a in plan.dp_axes)
    return {"weights": weights, "stream": batch // dp * seq * config.d_model // P}
