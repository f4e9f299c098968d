"""Memory per device: model states (the ZeRO paper's formulas) and activations (Korthikanti et al. 2022).

Model states reuse :func:`colofn.zero.memory.formula_bytes` (the formulas
``docs/zero.md`` states and the tests match to 1.000) on the parameters one
device holds after tensor and pipeline parallelism (ZeRO 1-3: with each unit
padded to a multiple of the dp size, as :mod:`colofn.zero.flat` pads). Activations follow
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", section 4 (16-bit activations, bytes per layer, ``s``
sequence, ``b`` microbatch, ``h`` width, ``a`` heads, ``t`` tensor-parallel size):

=================================  ================================
no parallelism                     ``s*b*h*(34 + 5*a*s/h)``
tensor parallel                    ``s*b*h*(10 + 24/t + 5*a*s/(h*t))``
tensor + sequence parallel         ``s*b*h/t*(34 + 5*a*s/h)``
+ selective recompute              drops the ``5*a*s/h`` term
full recompute                     ``2*s*b*h`` (the layer input; ``/t`` with sp)
=================================  ================================

>>> activation_bytes_per_layer(s=2048, b=1, h=12288, a=96, t=8, sp=True, recompute="selective") / 2**20
102.0
"""

from __future__ import annotations

import dataclasses

from colofn.plan._candidate import Candidate, Recompute
from colofn.plan._model import ModelShape
from colofn.zero.memory import formula_bytes

__all__ = ["FP32_ADAM", "MIXED_ADAM", "Precision", "activation_bytes_per_layer", "colofn_activation_bytes_per_layer",
           "device_params", "expert_device_params", "model_state_bytes", "zero_groups", "zero_params"]


@dataclasses.dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each model state, and per activation element.

    Attributes:
        param, grad: bytes of one parameter and of its gradient as the step holds them.
        states: master weights plus optimizer state (the paper's ``K``).
        comm_grad: bytes per gradient element on the wire.
        activation: bytes per activation element (Korthikanti's formulas assume 2).
        fixed: bytes held whatever the model (Adam's step count).
    """

    param: int
    grad: int
    states: int
    comm_grad: int
    activation: int = 2
    fixed: int = 0


# The ZeRO paper's mixed-precision Adam: bf16/fp16 params and grads, K = 12 (fp32 master, m, v).
MIXED_ADAM = Precision(param=2, grad=2, states=12, comm_grad=2)
# What `colofn train` holds between steps: fp32 params and Adam's two moments (gradients are transient).
# The int32 step count is the 4 fixed bytes.
FP32_ADAM = Precision(param=4, grad=0, states=8, comm_grad=4, activation=4, fixed=4)


def _layer_parts(m: ModelShape, c: Candidate, i: int) -> tuple[int, int]:
    """``(dense, experts)``: parameters of block ``i`` a device holds (layer ``i`` is MoE when ``(i + 1) % moe_every == 0``)."""
    t, norm = c.size("tp"), m._norm
    if not m.n_experts or (i + 1) % m.moe_every:
        return m.layer_tp_params // t + 2 * norm, 0
    return m.attn_params // t + m.d_model * m.n_experts + 2 * norm, m.n_experts // c.size("ep") * m.expert_params // t


def zero_groups(m: ModelShape, c: Candidate, stage: int = 0) -> list[tuple[str, int, list[int]]]:
    """``[(axes, ranks, unit parameters)]``: the ZeRO groups of a device of pipeline stage ``stage`` and their units.

    ZeRO shards over the data axes (:func:`colofn.parallel.zero_axes`): ``dp``,
    the Ulysses ``sp`` axis, and ``ep`` for what ep replicates; expert weights
    (split over ep) over ``dp`` alone. The units are
    :func:`colofn.zero.flat.split_units`' (each top-level entry, each block):
    the embeddings (first stage), the stage's blocks, the final norm and the head
    (last stage; with a pipeline it holds the tied embedding again). A unit
    with both kinds has a bucket in each group; :mod:`colofn.zero.flat` pads
    each bucket to a multiple of its group's ranks.

    >>> from colofn.plan import model
    >>> [(a, n, len(u)) for a, n, u in zero_groups(model("tiny"), Candidate((("dp", 2), ("sp", 2)), sp="ulysses"))]
    [('dp+sp', 4, 4)]
    """
    t, pp, ep = c.size("tp"), c.size("pp"), c.size("ep")
    emb = m.vocab_size * m.d_model // t
    per = m.n_layers // pp
    parts = [_layer_parts(m, c, i) for i in range(stage * per, (stage + 1) * per)]
    dense = [emb + m.pos_params] if stage == 0 else []
    dense += [d + (0 if ep > 1 else e) for d, e in parts]
    if stage == pp - 1:
        dense += [m._norm] + ([] if m.tie_embeddings and pp == 1 else [emb])
    axes = [a for a in ("dp", "sp", "ep") if c.size(a) > 1] or ["dp"]
    groups = [("+".join(axes), c.size("dp") * c.size("sp") * ep, dense)]
    experts = [e for _, e in parts if e]
    if ep > 1 and experts:
        groups.append(("dp", c.size("dp"), experts))
    return groups


def device_params(m: ModelShape, c: Candidate, stage: int | None = None) -> int:
    """Parameters a device of pipeline stage ``stage`` holds after tensor parallelism (``None``: the largest stage).

    The first stage holds the embeddings, the last the final norm and the head
    (the tied embedding again), each with ``n_layers / pp`` blocks.
    """
    if c.tp_mode != "1d":
        return grid_params(m, c)
    if stage is None:
        return max(device_params(m, c, s) for s in range(c.size("pp")))
    return sum(sum(units) for _, _, units in zero_groups(m, c, stage))


def grid_params(m: ModelShape, c: Candidate) -> int:
    """Parameters a device holds on a tp grid: ``tp2d.cost.weight_elements`` (2d, 2.5d), ``tp3d.volume.memory`` (3d)."""
    from colofn.plan._model import gpt_config
    from colofn.train.config import TrainConfig

    cfg = TrainConfig(mesh=c.mesh, tp_mode=c.tp_mode, tp_depth=c.tp_depth)
    config, shape = gpt_config(m), cfg.device_mesh_shape
    if c.tp_mode == "3d":
        from colofn.parallel.tp3d.volume import memory

        return memory(config, cfg.plan(), shape, 1, m.seq_len)["weights"]
    from colofn.parallel.tp2d.cost import weight_elements

    return sum(weight_elements(config, shape["tp_row"]).values())


def zero_params(m: ModelShape, c: Candidate, stage: int | None = None) -> int:
    """:func:`device_params` as ZeRO stages 1-3 hold them: each bucket padded to a multiple of its group's ranks.

    ``stage``: the pipeline stage (``None``: the largest).
    """
    if c.stage == 0:
        return device_params(m, c, stage)
    if stage is None:
        return max(zero_params(m, c, s) for s in range(c.size("pp")))
    return sum(-(-u // n) * n for _, n, units in zero_groups(m, c, stage) for u in units)


def model_state_bytes(m: ModelShape, c: Candidate, precision: Precision = MIXED_ADAM) -> float:
    """Model-state bytes per device: :func:`device_params` under ZeRO stage ``c.zero``, summed over its groups.

    >>> from colofn.plan import Candidate, model
    >>> model_state_bytes(model("gpt2-124m"), Candidate((("dp", 4),), zero=3)) == 16 * 124356864 / 4
    True
    """
    # Inside pipeline stages ZeRO-2 accumulates full gradients over the microbatches, as ZeRO-1 does
    # (docs/zero.md, "Inside pipeline stages"): it shards only the gradients of the update.
    zstage = 1 if c.stage == 2 and c.size("pp") > 1 else c.stage

    def stage_bytes(s: int) -> float:
        if c.stage == 0:
            groups = [(1, device_params(m, c, s))]
        else:
            groups = [(n, sum(-(-u // n) * n for u in units)) for _, n, units in zero_groups(m, c, s)]
        return sum(formula_bytes(stage=zstage, params=p * precision.param, grads=p * precision.grad,
                                 states=p * precision.states, n=n) for n, p in groups)

    return precision.fixed + max(stage_bytes(s) for s in range(c.size("pp")))


def activation_bytes_per_layer(*, s: int, b: float, h: int, a: int, t: int = 1, sp: bool = False,
                               recompute: Recompute = "none", element: int = 2) -> float:
    """Korthikanti et al. 2022's activation bytes of one transformer layer (table above).

    ``element`` scales from their 2-byte activations (4 for fp32).
    """
    scale = element / 2
    if recompute == "full":
        return scale * 2 * s * b * h / (t if sp else 1)
    attn = 0.0 if recompute == "selective" else 5 * a * s / h
    if sp:
        return scale * s * b * h / t * (34 + attn)
    return scale * s * b * h * (10 + 24 / t + attn / t)


def expert_device_params(m: ModelShape, c: Candidate, stage: int = 0) -> int:
    """Expert parameters a device of pipeline stage ``stage`` holds (its ``n_experts / ep`` experts of each MoE block)."""
    per = m.n_layers // c.size("pp")
    return sum(_layer_parts(m, c, i)[1] for i in range(stage * per, (stage + 1) * per))


def colofn_activation_bytes_per_layer(*, s: int, b: float, h: int, a: int, d_ff: int, t: int = 1, sp: bool = False,
                                      element: int = 4) -> float:
    """What one block of colofn's GPT (LayerNorm, no dropout) keeps for the backward, in bytes.

    Measured with :func:`colofn.plan.saved_activation_bytes` (``tests/test_plan.py``
    checks the whole model within 10%, in practice within 1%). In elements, with ``/t``
    for what tensor parallelism splits and ``/t'`` (``t`` with Megatron-SP, else 1)
    for what sequence parallelism splits:

    * the two norms' inputs ``2sbh/t'`` and their mean and rstd ``4sb/t'``;
    * the two norms' outputs, the inputs of the QKV and first MLP matmuls,
      ``2sbh``: whole, since colofn keeps the all-gathered input under
      Megatron-SP (Korthikanti et al. keep the shard and gather it again in
      the backward, section 4.2.2);
    * queries, keys, values and the attention output ``4sbh/t``; SDPA's
      log-sum-exp ``asb/t`` (no ``s x s`` matrix: a fused kernel);
    * the MLP's activation input and output ``2 s b d_ff / t``.

    With ``d_ff = 4h`` and no sp this is Korthikanti's ``(10 + 24/t)sbh`` bytes
    less the two dropout masks, and the ``5as/h`` term gone (16 elements of ``sbh`` at t = 1).

    >>> colofn_activation_bytes_per_layer(s=32, b=2, h=32, a=4, d_ff=128) == 4 * (16 * 2048 + 8 * 64)
    True
    """
    split = t if sp else 1
    elements = (2 * s * b * h + 4 * s * b) / split + 2 * s * b * h + (4 * s * b * h + a * s * b + 2 * s * b * d_ff) / t
    return element * elements
