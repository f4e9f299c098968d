"""The planner against published tables: Korthikanti et al. 2022, Rajbhandari et al. 2020, Narayanan et al. 2021.

Each table here is data copied from a paper (cited on the constant) and a
function that puts the planner's prediction next to it. ``tests/test_plan.py``
pins the reproduced numbers; ``docs/plan.md`` prints the tables.

>>> [round(r.saved, 2) for r in korthikanti_selective_savings()]  # their 70% and 65%
[0.7, 0.65]
"""

from __future__ import annotations

import dataclasses

from colofn.plan._candidate import Candidate, Recompute
from colofn.plan._cluster import cluster
from colofn.plan._memory import activation_bytes_per_layer, model_state_bytes
from colofn.plan._model import ModelShape
from colofn.plan._predict import predict

__all__ = [
    "KORTHIKANTI_2022_TABLE3", "NARAYANAN_2021_TABLE1", "ZERO_2020_FIGURE1", "ZERO_2020_TABLE1", "KorthikantiRow", "MegatronRow",
    "korthikanti_markdown", "korthikanti_selective_savings", "korthikanti_table", "megatron_mfu", "megatron_table",
    "zero_figure1", "zero_table1",
]

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class KorthikantiConfig:
    """A model of Korthikanti et al. 2022, Table 3: heads, width, layers, tensor-parallel size, microbatch."""

    name: str
    heads: int
    hidden: int
    layers: int
    tp: int
    micro_batch: int
    seq: int = 2048


# Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
# (arXiv:2205.05198), Table 3: the four GPT models of their evaluation, sequence length 2048,
# tensor-parallel size 8 (pipeline sizes 1, 8, 35, 64), microbatch sizes 4, 1, 1, 1.
KORTHIKANTI_2022_TABLE3 = (
    KorthikantiConfig("22B", 64, 6144, 48, 8, 4),
    KorthikantiConfig("175B (GPT-3)", 96, 12288, 96, 8, 1),
    KorthikantiConfig("530B (MT-NLG)", 128, 20480, 105, 8, 1),
    KorthikantiConfig("1T", 160, 25600, 128, 8, 1),
)


@dataclasses.dataclass(frozen=True)
class KorthikantiRow:
    """Activation MiB of one layer of ``config`` under each row of Korthikanti et al.'s Table 2."""

    config: KorthikantiConfig
    none: float
    tp: float
    tp_sp: float
    tp_selective: float
    tp_sp_selective: float
    full: float


def korthikanti_table() -> list[KorthikantiRow]:
    """Table 2's five formulas (16-bit activations, bytes per layer) evaluated for Table 3's models, in MiB.

    >>> print(korthikanti_markdown())  # doctest: +NORMALIZE_WHITESPACE
    | model | no parallelism | tensor parallel | tensor + sequence parallel | tp + selective | tp + sp + selective | full recompute |
    | --- | --- | --- | --- | --- | --- | --- |
    | 22B | 6,752 | 1,264 | 844 | 624 | 204 | 96 |
    | 175B (GPT-3) | 2,736 | 552 | 342 | 312 | 102 | 48 |
    | 530B (MT-NLG) | 3,920 | 840 | 490 | 520 | 170 | 80 |
    | 1T | 4,900 | 1,050 | 612 | 650 | 212 | 100 |
    """
    out = []
    for c in KORTHIKANTI_2022_TABLE3:
        def mib(t: int = 1, sp: bool = False, recompute: Recompute = "none", c: KorthikantiConfig = c) -> float:
            return activation_bytes_per_layer(s=c.seq, b=c.micro_batch, h=c.hidden, a=c.heads, t=t, sp=sp,
                                              recompute=recompute) / MIB

        t = c.tp
        out.append(KorthikantiRow(c, none=mib(), tp=mib(t), tp_sp=mib(t, True), tp_selective=mib(t, False, "selective"),
                                  tp_sp_selective=mib(t, True, "selective"), full=mib(t, False, "full")))
    return out


def korthikanti_markdown() -> str:
    """:func:`korthikanti_table` as a Markdown table (MiB per layer)."""
    rows = ["| model | no parallelism | tensor parallel | tensor + sequence parallel | tp + selective "
            "| tp + sp + selective | full recompute |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in korthikanti_table():
        cells = (r.none, r.tp, r.tp_sp, r.tp_selective, r.tp_sp_selective, r.full)
        rows.append(f"| {r.config.name} | " + " | ".join(f"{v:,.0f}" for v in cells) + " |")
    return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class Saving:
    config: KorthikantiConfig
    attention_term: float
    saved: float


def korthikanti_selective_savings() -> list[Saving]:
    """What selective recompute saves for GPT-3 and MT-NLG: ``5as/h / (34 + 5as/h)``.

    Korthikanti et al. 2022, section 5: "for GPT-3 ... 70%", "for MT-NLG ... 65%"
    of the activation memory (their ``5as/h`` is 80 and 64).
    """
    out = []
    for c in KORTHIKANTI_2022_TABLE3[1:3]:
        term = 5 * c.heads * c.seq / c.hidden
        out.append(Saving(c, term, term / (34 + term)))
    return out


# Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
# Figure 1: a 7.5B-parameter model on 64 GPUs, K = 12: GB of model states per device
# for the baseline and the three stages.
ZERO_2020_FIGURE1 = (("baseline", None, 120.0), ("P_os", 1, 31.4), ("P_os+g", 2, 16.6), ("P_os+g+p", 3, 1.9))


def zero_figure1() -> list[tuple[str, float, float]]:
    """``(stage name, predicted GB, paper's GB)`` for Figure 1 (the model's bytes scaled to exactly 7.5B parameters)."""
    m = ModelShape("7.5b", n_layers=32, d_model=4096, n_heads=32, d_ff=16384, vocab_size=51200, seq_len=2048)
    scale = 7.5e9 / m.params
    return [(name, model_state_bytes(m, Candidate((("dp", 64),), zero=z)) * scale / 1e9, paper)
            for name, z, paper in ZERO_2020_FIGURE1]


# Rajbhandari et al. 2020, Table 1: per-device model-state memory (GB) of ZeRO's stages
# (P_os, P_os+g, P_os+g+p) for 7.5B, 128B and 1T parameters as the dp degree grows, K = 12.
ZERO_2020_TABLE1: dict[int, tuple[float, ...]] = {
    1: (120, 120, 120, 2048, 2048, 2048, 16000, 16000, 16000),
    4: (52.5, 41.3, 30, 896, 704, 512, 7000, 5500, 4000),
    16: (35.6, 21.6, 7.5, 608, 368, 128, 4750, 2875, 1000),
    64: (31.4, 16.6, 1.88, 536, 284, 32, 4187, 2218, 250),
    256: (30.4, 15.4, 0.47, 518, 263, 8, 4046, 2054, 62.5),
    1024: (30.1, 15.1, 0.12, 513, 257, 2, 4011, 2013, 15.6),
}


def zero_table1() -> dict[int, tuple[float, ...]]:
    """:data:`ZERO_2020_TABLE1` as the planner computes it (``model_state_bytes`` for ``Ψ`` parameters, in GB).

    The paper rounds (and at times truncates) to three or four digits; the
    planner's values agree within 1% or 1 GB, whichever is larger.
    """
    m = ModelShape("any", n_layers=1, d_model=1024, n_heads=8, d_ff=4096, vocab_size=1024, seq_len=1024)
    out = {}
    for n in ZERO_2020_TABLE1:
        row = []
        for psi in (7.5e9, 128e9, 1e12):
            for z in (1, 2, 3):
                row.append(model_state_bytes(m, Candidate((("dp", n),) if n > 1 else (("dp", 1),), zero=z))
                           / m.params * psi / 1e9)
        out[n] = tuple(row)
    return out


@dataclasses.dataclass(frozen=True)
class MegatronRow:
    """One row of Narayanan et al. 2021, Table 1 (A100s, s = 2048, V = 51,200)."""

    params_b: float
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops: float
    peak_percent: float


# Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
# Megatron-LM" (arXiv:2104.04473), Table 1: weak scaling from 1.7B to 1T parameters on up to 3072
# A100-80GB GPUs (DGX A100 nodes, 8 HDR InfiniBand NICs each): achieved teraFLOP/s per GPU and its
# percentage of the 312 teraFLOP/s peak. Their FLOPs (equation 3) count full activation
# recomputation: 96 B s l h^2 (1 + s/(6h) + V/(16 l h)).
NARAYANAN_2021_TABLE1 = (
    MegatronRow(1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 44),
    MegatronRow(3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 44),
    MegatronRow(7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 46),
    MegatronRow(18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 43),
    MegatronRow(39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 44),
    MegatronRow(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 45),
    MegatronRow(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 47),
    MegatronRow(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 50),
    MegatronRow(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 52),
    MegatronRow(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 52),
)


def megatron_mfu(row: MegatronRow, efficiency: float = 0.5) -> tuple[ModelShape, Candidate, float]:
    """``(model, candidate, predicted percent of peak)`` of a Table 1 row, as the paper counts FLOPs.

    The candidate is the row's ``(t, p, d)`` with full recompute, 1F1B, microbatches
    of one sequence and the gradients reduced over dp once per step (Megatron-LM);
    the cluster is :data:`~colofn.plan.CLUSTERS` ``"a100-80g"``; the efficiency is
    the planner's default, not fitted to the table.
    """
    m = ModelShape(f"{row.params_b}B", row.layers, row.hidden, row.heads, 4 * row.hidden, 51200, 2048,
                   learned_pos=True, source="Narayanan et al. 2021, Table 1")
    dp = row.gpus // (row.tp * row.pp)
    mesh = tuple((a, n) for a, n in (("pp", row.pp), ("dp", dp), ("tp", row.tp)) if n > 1)
    c = Candidate(mesh, microbatches=row.batch // dp if row.pp > 1 else 1, recompute="full")
    cl = cluster("a100-80g", row.gpus)
    p = predict(m, c, cl, global_batch=row.batch, efficiency=efficiency)
    s, h, layers, v = m.seq_len, m.d_model, m.n_layers, m.vocab_size
    flops = 96 * row.batch * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))  # their equation 3
    return m, c, 100 * flops / (p.step_s * row.gpus * cl.peak_flops)


def megatron_table(rows: tuple[MegatronRow, ...] = NARAYANAN_2021_TABLE1) -> str:
    """Published and predicted percent of peak for ``rows``, with the error in percentage points."""
    out = ["| parameters | t | p | GPUs | batch | published % of peak | predicted | error (points) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        m, _, pred = megatron_mfu(r)
        out.append(f"| {m.params / 1e9:.1f}B | {r.tp} | {r.pp} | {r.gpus} | {r.batch} | {r.peak_percent}% "
                   f"| {pred:.1f}% | {pred - r.peak_percent:+.1f} |")
    return "\n".join(out)
