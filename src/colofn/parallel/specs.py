"""Parameter and batch specs as data: path patterns -> ``P``, derived from a :class:`Plan`.

The rules are an ordered mapping from a dotted path pattern (``fnmatch``
syntax; ``layers.*.attn.wq`` matches every layer's query weight) to a spec;
the first matching rule wins, and anything unmatched is replicated. This is
the whole Megatron/expert-parallel layout of ``colofn.models.gpt``:

>>> from colofn.parallel import Plan, rules
>>> for pattern, spec in rules(Plan(tp="tp", ep="ep")).items():
...     print(f"{pattern:20} {spec}")
embed.tok            P('tp')
layers.*.attn.wq     P(None, 'tp')
layers.*.attn.wk     P(None, 'tp')
layers.*.attn.wv     P(None, 'tp')
layers.*.attn.wo     P('tp')
layers.*.mlp.w1      P(None, 'tp')
layers.*.mlp.w2      P('tp')
layers.*.moe.w1      P('ep', None, 'tp')
layers.*.moe.w2      P('ep', 'tp')
head                 P(None, 'tp')
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from colofn import tree as jt
from colofn.parallel import tp3d
from colofn.parallel.plan import Plan
from colofn.partition_spec import P, PartitionSpec

__all__ = [
    "batch_specs",
    "dotted",
    "layer_specs",
    "param_specs",
    "rules",
    "spec_for",
    "stage_slice",
]


def rules(plan: Plan) -> dict[str, PartitionSpec]:
    """The ordered ``{path pattern: spec}`` rules of ``plan`` (unmatched paths are replicated).

    A 2D / 2.5D plan has its own: :func:`colofn.parallel.tp2d.rules`.
    """
    if plan.tp_mode in ("2d", "2.5d"):
        from colofn.parallel import tp2d

        return tp2d.rules(plan)
    if plan.tp_mode == "3d":
        return tp3d.rules(plan)
    tp, ep = plan.tp, plan.ep
    return {
        "embed.tok": P(tp),  # vocabulary-parallel embedding (and tied head)
        "layers.*.attn.wq": P(None, tp),  # column parallel: heads
        "layers.*.attn.wk": P(None, tp),
        "layers.*.attn.wv": P(None, tp),
        "layers.*.attn.wo": P(tp),  # row parallel: heads
        "layers.*.mlp.w1": P(None, tp),  # column parallel: d_ff
        "layers.*.mlp.w2": P(tp),  # row parallel: d_ff
        "layers.*.moe.w1": P(ep, None, tp),  # experts over ep, d_ff over tp
        "layers.*.moe.w2": P(ep, tp),
        "head": P(None, tp),  # vocabulary-parallel logits
    }


def dotted(path: Any) -> str:
    """A pytree path as dotted text: ``['layers'][0]['attn']['wq']`` -> ``layers.0.attn.wq``."""
    text = jt.keystr(path)
    return ".".join(part.strip("'\"") for part in text.strip("[]").split("]["))


def spec_for(path: str, table: Mapping[str, PartitionSpec]) -> PartitionSpec:
    """The spec of the first pattern in ``table`` matching the dotted ``path``; ``P()`` if none does."""
    for pattern, spec in table.items():
        if fnmatch.fnmatchcase(path, pattern):
            return spec
    return P()


def _specs(tree: Any, table: Mapping[str, PartitionSpec], prefix: str = "") -> Any:
    return jt.map_with_path(lambda p, _: spec_for(prefix + dotted(p), table), tree)


def param_specs(config: Any, plan: Plan) -> Any:
    """The spec of every parameter of ``colofn.models.gpt.init(key, config)``, as a pytree of ``P``.

    >>> from colofn.models import gpt
    >>> specs = param_specs(gpt.config("tiny"), Plan(tp="tp"))
    >>> specs["layers"][0]["attn"]["wo"], specs["final_norm"]["scale"]
    (P('tp'), P())
    """
    from colofn.models import gpt

    return _specs(gpt.abstract_params(config), rules(plan))


def layer_specs(config: Any, plan: Plan, layers: range) -> list[Any]:
    """Specs of ``params["layers"][layers.start:layers.stop]``: what a pipeline stage holding those layers shards.

    >>> from colofn.models import gpt
    >>> cfg = gpt.config("tiny", n_layers=4, n_experts=2, moe_every=2)
    >>> [sorted(s) for s in layer_specs(cfg, Plan(ep="ep"), range(2, 4))][1]
    ['attn', 'moe', 'norm1', 'norm2']
    """
    return param_specs(config, plan)["layers"][layers.start : layers.stop]


def stage_slice(tree: Any, config: Any, layers: range) -> dict[str, Any]:
    """What a pipeline stage holding model layers ``layers`` needs of a full parameter (or spec) tree.

    ``{"layers": tree["layers"][layers.start:layers.stop]}``, plus ``"embed"`` on
    the first stage and ``"final_norm"`` and ``"head"`` (or ``"embed": {"tok"}``
    when tied) on the last: the ``params`` of :func:`colofn.parallel.stage_forward`.
    Works on parameters and on :func:`param_specs` alike.

    >>> from colofn.models import gpt
    >>> cfg = gpt.config("tiny", n_layers=4)
    >>> specs = param_specs(cfg, Plan(tp="tp"))
    >>> sorted(stage_slice(specs, cfg, range(0, 2))), sorted(stage_slice(specs, cfg, range(2, 4)))
    (['embed', 'layers'], ['embed', 'final_norm', 'layers'])
    >>> stage_slice(specs, cfg, range(2, 4))["embed"]
    {'tok': P('tp')}
    """
    out: dict[str, Any] = {"layers": tree["layers"][layers.start : layers.stop]}
    if layers.start == 0:
        out["embed"] = tree["embed"]
    if layers.stop == config.n_layers:
        out["final_norm"] = tree["final_norm"]
        if config.tie_embeddings:
            out.setdefault("embed", {"tok": tree["embed"]["tok"]})
        else:
            out["head"] = tree["head"]
    return out


def batch_specs(plan: Plan) -> dict[str, PartitionSpec]:
    """Specs of ``{"tokens", "targets"}`` ``[batch, seq]``.

    The batch dim is split over :attr:`Plan.batch_axes`; the sequence over the
    ring/Ulysses axis, in contiguous blocks (ring attention's zig-zag layout is
    made inside, by :func:`~colofn.parallel.relayout`). Megatron-SP keeps whole
    sequences on each ``tp`` rank (the vocabulary-parallel embedding
    reduce-scatters them into shards).

    >>> batch_specs(Plan(dp="dp", sp="ulysses", sp_axis="sp"))["tokens"]
    P('dp', 'sp')
    """
    if plan.tp_mode == "3d":
        return tp3d.batch_specs(plan)
    b = plan.batch_axes or None
    s = plan.sp_axis if plan.sp in ("ulysses", "ring") else None
    spec = P(b, s)
    return {"tokens": spec, "targets": spec}
