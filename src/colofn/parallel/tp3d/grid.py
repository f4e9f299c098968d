"""The 3D grid of a plan: which mesh axis is input, weight and output, the layout as specs, and its checks.

Bian et al. 2021 ("Maximizing Parallelism in Distributed Training for Huge
Neural Networks", arXiv:2105.14450) place a matrix product on a cube of
``p x p x p`` devices; colofn allows a cuboid (the three axes of ``tp_grid``
may differ in size). Each device holds ``1 / (p_in p_w p_out)`` of every weight.

The residual stream ``[batch, seq, d_model]`` has its batch split over
``(dp..., weight, input)`` and ``d_model`` over ``output``; a weight of the
first kind of product (``d_model`` in, :func:`~colofn.parallel.tp3d.matmul`)
is ``[d_model / p_out, n / (p_in p_w)]``, one of the second kind (back to
``d_model``) ``[n / (p_in p_w), d_model / p_out]``:

>>> from colofn.parallel import Plan, rules
>>> plan = Plan(tp_mode="3d", tp_grid=("i", "w", "o"))
>>> for pattern, spec in rules(plan).items():
...     print(f"{pattern:20} {spec}")
embed.tok            P(('i', 'w'), 'o')
embed.pos            P(None, 'o')
layers.*.norm*       P('o')
final_norm.*         P('o')
layers.*.attn.wq     P('o', 'i', 'w')
layers.*.attn.wk     P('o', 'i', 'w')
layers.*.attn.wv     P('o', 'i', 'w')
layers.*.attn.wo     P('i', 'w', 'o')
layers.*.mlp.w1      P('o', ('i', 'w'))
layers.*.mlp.w2      P(('i', 'w'), 'o')
head                 P('o', ('i', 'w'))
>>> batch_specs(plan)
{'tokens': P('w'), 'targets': P(('w', 'o'))}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from colofn.parallel.plan import Plan
from colofn.partition_spec import P, PartitionSpec

if TYPE_CHECKING:
    from colofn.models.gpt import GPTConfig

__all__ = ["Grid", "batch_failures", "batch_specs", "grid", "mesh_failures", "plan_failures", "rules"]


class Grid(NamedTuple):
    """The mesh axes of the cube, named by what is all-gathered along them in the first product."""

    inp: str  # the input (activation rows) is all-gathered along it
    wt: str  # the weight is all-gathered along it (and its gradient reduce-scattered)
    out: str  # the output is reduce-scattered along it


def grid(plan: Plan) -> Grid:
    """``plan.tp_grid`` as a :class:`Grid` (``plan.tp_mode`` must be ``"3d"``)."""
    inp, wt, out = plan.tp_grid or ()
    return Grid(inp, wt, out)


def rules(plan: Plan) -> dict[str, PartitionSpec]:
    """The ordered ``{path pattern: spec}`` rules of a 3D plan (unmatched paths, none in the GPT, are replicated)."""
    i, w, o = grid(plan)
    first, second = P(o, (i, w)), P((i, w), o)  # [d_model, n] and [n, d_model]
    return {
        "embed.tok": second,  # the head's transpose: one table when tied
        "embed.pos": P(None, o),
        "layers.*.norm*": P(o),
        "final_norm.*": P(o),
        "layers.*.attn.wq": P(o, i, w),  # [d_model, heads, head_dim]: heads over input, head_dim over weight
        "layers.*.attn.wk": P(o, i, w),
        "layers.*.attn.wv": P(o, i, w),
        "layers.*.attn.wo": P(i, w, o),
        "layers.*.mlp.w1": first,
        "layers.*.mlp.w2": second,
        "head": first,
    }


def batch_specs(plan: Plan) -> dict[str, PartitionSpec]:
    """Token ids split over ``(dp..., weight)`` (the embedding gathers no ids), targets as the logits: ``(dp..., weight, output)``."""
    g = grid(plan)
    return {"tokens": P(plan.dp_axes + (g.wt,)), "targets": P(plan.dp_axes + (g.wt, g.out))}


def plan_failures(plan: Plan) -> list[str]:
    """What a 3D plan cannot have, whatever the mesh."""
    out = []
    names = plan.tp_grid
    if not (isinstance(names, tuple) and len(names) == 3 and all(isinstance(a, str) and a for a in names)):
        return [f"tp_mode='3d' needs tp_grid=(input, weight, output), three mesh axis names; got {names!r}"]
    if len(set(names)) != 3:
        out.append(f"tp_grid={names!r} names an axis twice; the cube needs three distinct axes")
    if plan.tp is not None:
        out.append(f"tp={plan.tp!r} is set with tp_mode='3d'; the grid {names!r} replaces it: set tp=None")
    others = {"sp": plan.sp != "none", "ep": plan.ep is not None, "pp": plan.pp is not None}
    for role, used in others.items():
        if used:
            out.append(f"tp_mode='3d' composes with dp only in this release; drop {role}={getattr(plan, role)!r}")
    return out


def mesh_failures(plan: Plan, c: GPTConfig | Any, shape: Mapping[str, int]) -> list[str]:
    """Every reason the config (a ``GPTConfig``) or the mesh order does not fit the 3D grid."""
    g = grid(plan)
    out = []
    names = list(shape)
    pos = {a: names.index(a) for a in (*plan.dp_axes, *g)}
    if not (pos[g.inp] < pos[g.wt] < pos[g.out] and all(pos[a] < pos[g.wt] for a in plan.dp_axes)):
        out.append(
            f"the mesh {tuple(names)} must list the grid's axes in the order input {g.inp!r}, weight {g.wt!r}, "
            f"output {g.out!r}, with the dp axes before {g.wt!r} (weights split over ({g.inp!r}, {g.wt!r}), "
            f"targets over (dp..., {g.wt!r}, {g.out!r}))"
        )
    pi, pw, po = (shape[a] for a in g)
    need = [
        ("d_model", c.d_model, po, f"output={po}", "the residual stream splits d_model over the output axis"),
        ("n_heads", c.n_heads, pi, f"input={pi}", "attention splits heads over the input axis"),
        ("head_dim", c.head_dim, pw, f"weight={pw}", "q/k/v weights split head_dim over the weight axis"),
        ("d_ff", c.d_ff, pi * pw, f"input * weight = {pi * pw}", "the MLP splits d_ff over both"),
        ("vocab_size", c.vocab_size, pi * pw, f"input * weight = {pi * pw}", "the embedding and head split the vocabulary over both"),
    ]
    for name, value, by, what, why in need:
        if value % by:
            fix = f"; pad it: vocab_size={math.ceil(value / by) * by}" if name == "vocab_size" else ""
            out.append(f"{name}={value} is not divisible by {what} ({why}){fix}")
    if c.n_experts:
        out.append(f"n_experts={c.n_experts}: tp_mode='3d' has no mixture-of-experts layers in this release; use n_experts=0")
    return out


def batch_failures(plan: Plan, shape: Mapping[str, int], batch: int) -> list[str]:
    """The batch must split over ``(dp..., weight, input)`` (the stream) and ``(dp..., weight, output)`` (the logits)."""
    g = grid(plan)
    dp = math.prod(shape.get(a, 1) for a in plan.dp_axes)
    need = math.lcm(shape.get(g.inp, 1), shape.get(g.out, 1)) * shape.get(g.wt, 1) * dp
    if batch % need:
        return [
            f"batch {batch} is not divisible by {need}: tp_mode='3d' splits it over dp * weight * input "
            f"(the residual stream) and dp * weight * output (the logits); use a multiple of {need}"
        ]
    return []
