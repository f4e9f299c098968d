"""What a 2D / 2.5D step sends and holds per rank, as formulas (checked against ``comm_trace`` by the tests).

Notation: ``q`` the grid side, ``z`` the depth (1 under 2D), ``D`` the data
parallel size, ``T = batch * seq / (D q z)`` the tokens of a rank's rows, ``d``
``d_model``, ``f`` ``d_ff``, ``V`` the vocabulary, ``e`` bytes per element.
Bytes are counted as :mod:`colofn.tracing` counts them: an all-gather of a
``B``-byte block sends ``(q - 1) B``, its transpose, a reduce-scatter of the
``q B``-byte panel, sends the same; an all-reduce of ``B`` bytes over ``n``
ranks sends ``2 (n - 1) B / n``.

>>> from colofn.models import gpt
>>> cfg = gpt.config("tiny", n_layers=1)
>>> layer_bytes(cfg, q=2, tokens=64)  # one layer, forward + backward, per rank
{'activations': 57344, 'weights': 24576, 'norms': 2048}
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from colofn.parallel.plan import Plan
from colofn.parallel.tp2d.summa import Grid

__all__ = ["layer_bytes", "step_bytes", "weight_elements"]


def _sizes(config: Any) -> tuple[int, int, int, int]:
    return config.d_model, config.d_ff, config.vocab_size, 2 if config.norm == "layernorm" else 1


def _wide(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()


def _all_reduce(nbytes: int, n: int) -> int:
    return 2 * (n - 1) * nbytes // n


def layer_bytes(config: Any, q: int, tokens: int) -> dict[str, int]:
    """Bytes one rank sends for one transformer layer, forward and backward, on a ``q x q`` grid.

    ``tokens`` is ``T``, the rank's token rows. ``activations``: the row panels
    gathered over ``col`` (the input of q/k/v, the heads before ``wo``, the
    MLP's input and hidden), ``2 (q - 1) T (3 d + f) / q`` elements forward and
    back; ``weights``: the column panels of ``wq, wk, wv, wo, w1, w2`` gathered
    over ``row``, ``2 (q - 1) (4 d^2 + 2 d f) / q^2``; ``norms``: the
    statistics of the two norms (``[T, 1]`` each: two for LayerNorm, one for
    RMSNorm) all-reduced over ``col``, forward and back.
    """
    d, f, _, stats = _sizes(config)
    e, w = config.dtype.itemsize, _wide(config.dtype)
    return {
        "activations": 2 * (q - 1) * tokens * (3 * d + f) // q * e,
        "weights": 2 * (q - 1) * (4 * d * d + 2 * d * f) // (q * q) * e,
        "norms": 2 * 2 * stats * _all_reduce(tokens * w, q),
    }


def weight_elements(config: Any, q: int) -> dict[str, int]:
    """Parameter elements one rank holds: ``grid`` (split ``q^2`` ways) and ``columns`` (split ``q`` ways: norms, positions)."""
    d, f, v, stats = _sizes(config)
    grid = config.n_layers * (4 * d * d + 2 * d * f) + v * d * (1 if config.tie_embeddings else 2)
    cols = (2 * config.n_layers + 1) * stats * d + (config.seq_len * d if config.pos == "learned" else 0)
    return {"grid": grid // (q * q), "columns": cols // q}


def step_bytes(
    config: Any, plan: Plan, mesh_shape: Mapping[str, int], batch: int, seq: int, *, remat: bool = False
) -> Counter[tuple[str, tuple[str, ...], str]]:
    """Bytes one rank sends in ``make_loss`` and its gradient, by ``(op, axes, phase)`` as :func:`colofn.comm_trace` records them.

    Per layer :func:`layer_bytes`; plus the token table (and untied head)
    gathered over ``row``, the final norm, the head and the
    vocabulary-parallel loss over ``col``, the mean over the token axes, and
    the gradient sums: weight blocks over the data and depth axes,
    column-split parameters (norms, positions) over every token axis. With
    ``remat`` (the forward ran under :func:`~colofn.parallel.tp2d.rematerialize`)
    the backward gathers every saved panel again: the forward's gathers, less
    the embedding's table (the lookup saves no panel). Zero entries are left out.
    """
    g = Grid.of(plan)
    q = mesh_shape[g.row]
    d, _, v, stats = _sizes(config)
    e, w = config.dtype.itemsize, _wide(config.dtype)
    n_tok = math.prod(mesh_shape[a] for a in plan.token_axes)
    t = batch * seq // n_tok
    L, tied = config.n_layers, config.tie_embeddings
    layer = {k: L * b // 2 for k, b in layer_bytes(config, q, t).items()}  # per direction
    col, row = (g.col,), (g.row,)
    out: Counter[tuple[str, tuple[str, ...], str]] = Counter()
    table = 2 * (q - 1) * v * d // (q * q) * e  # the token table gathered twice (embedding, tied head) or table and head
    head_panel = 0 if tied else (q - 1) * t * d // q * e
    final_norm = stats * _all_reduce(t * w, q)
    for op, phase in (("all_gather", "forward"), ("reduce_scatter", "backward")):
        out[(op, col, phase)] += layer["activations"] + head_panel
        out[(op, row, phase)] += layer["weights"] + table
    for phase in ("forward", "backward"):
        out[("all_reduce", col, phase)] += layer["norms"] + final_norm
    # the vocabulary-parallel loss: a max, then [sum of exponentials, target logit], over col
    out[("all_reduce", col, "forward")] += _all_reduce(t * w, q) + _all_reduce(2 * t * w, q)
    if tied:  # x tok^T: partial logits summed and scattered over col; back: their gradient gathered
        out[("reduce_scatter", col, "forward")] += (q - 1) * t * v // q * e
        out[("all_gather", col, "backward")] += (q - 1) * t * v // q * e
    if remat:
        out[("all_gather", col, "backward")] += layer["activations"] + head_panel
        out[("all_gather", row, "backward")] += layer["weights"] + table // 2
    out[("all_reduce", plan.token_axes, "forward")] += _all_reduce(2 * w, n_tok)  # the mean: [nll, count]
    blocks = weight_elements(config, q)
    rest = tuple(a for a in mesh_shape if a in plan.token_axes and a != g.row)
    out[("all_reduce", rest, "backward")] += _all_reduce(blocks["grid"] * e, math.prod(mesh_shape[a] for a in rest))
    out[("all_reduce", plan.token_axes, "backward")] += _all_reduce(blocks["columns"] * e, n_tok)
    return Counter({k: b for k, b in out.items() if b})
