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
           "device_params", "expert_device_params", "model_state_bytes", "zero_params", "zero_units"]


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


def device_params(m: ModelShape, c: Candidate, stage: int | None = None) -> int:
    """Parameters a device of pipeline stage ``stage`` holds after tensor parallelism (``None``: the largest stage).

    The first stage holds the embeddings, the last the final norm and the head
    (the tied embedding again), each with ``n_layers / pp`` blocks.
    """
    t, pp = c.size("tp"), c.size("pp")
    if stage is None:
        return max(device_params(m, c, s) for s in {0, pp - 1})
    h, norm = m.d_model, m._norm
    block = m.layer_tp_params // t + 2 * norm
    emb = m.vocab_size * h // t
    total = m.n_layers // pp * block
    if m.n_experts:  # no pipeline with experts: every block is here; ep splits the experts
        moe = m.attn_params // t + m.n_experts // c.size("ep") * m.expert_params // t + h * m.n_experts + 2 * norm
        total += m.moe_layers * (moe - block)
    if stage == 0:
        total += emb + m.pos_params
    if stage == pp - 1:
        total += norm + (emb if pp > 1 or not m.tie_embeddings else 0)
    return total


def zero_units(m: ModelShape, c: Candidate, stage: int = 0) -> list[int]:
    """Parameters of each ZeRO unit a device of pipeline stage ``stage`` holds.

    The units are :func:`colofn.zero.flat.split_units`' (each top-level entry,
    each block): the embeddings (first stage), the stage's blocks, the final
    norm and the head (last stage; with a pipeline the head holds the tied
    embedding again). :mod:`colofn.zero.flat` pads each unit to a multiple of
    the dp size.
    """
    t, norm, pp = c.size("tp"), m._norm, c.size("pp")
    emb = m.vocab_size * m.d_model // t
    units = [emb + m.pos_params] if stage == 0 else []
    units += [m.layer_tp_params // t + 2 * norm] * (m.n_layers // pp)
    if stage == pp - 1:
        units += [norm] + ([] if m.tie_embeddings and pp == 1 else [emb])
    return units


def zero_params(m: ModelShape, c: Candidate, stage: int | None = None) -> int:
    """:func:`device_params` as ZeRO stages 1-2 (3 without a pipeline) hold them: each unit padded to a multiple of dp.

    ``stage``: the pipeline stage (``None``: the largest).
    """
    n = c.size("dp")
    if c.stage == 0:
        return device_params(m, c, stage)
    if stage is None:
        return max(zero_params(m, c, s) for s in {0, c.size("pp") - 1})
    return sum(-(-u // n) * n for u in zero_units(m, c, stage))


def model_state_bytes(m: ModelShape, c: Candidate, precision: Precision = MIXED_ADAM) -> float:
    """Model-state bytes per device: :func:`device_params` under ZeRO stage ``c.zero`` over ``dp``.

    >>> from colofn.plan import Candidate, model
    >>> model_state_bytes(model("gpt2-124m"), Candidate((("dp", 4),), zero=3)) == 16 * 124356864 / 4
    True
    """
    p = zero_params(m, c)
    # Inside pipeline stages ZeRO-2 accumulates full gradients over the microbatches, as ZeRO-1 does
    # (docs/zero.md, "Inside pipeline stages"): it shards only the gradients of the update.
    stage = 1 if c.stage == 2 and c.size("pp") > 1 else c.stage
    return precision.fixed + formula_bytes(stage=stage, params=p * precision.param, grads=p * precision.grad,
                                           states=p * precision.states, n=c.size("dp"))


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


def expert_device_params(m: ModelShape, c: Candidate) -> int:
    """Expert parameters a device holds (its ``n_experts / ep`` experts of every MoE block)."""
    return m.moe_layers * m.n_experts // c.size("ep") * m.expert_params // c.size("tp")


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
