"""1D (Megatron) vs 3D (Bian et al. 2021) tensor parallelism on 8 ranks: bytes sent, weights and saved activations per layer.

    python benchmarks/bench_tp3d.py            # about 30 s on 2 idle cores

On a simulated world of 8 (``tp=8`` against a ``2 x 2 x 2`` cube), for one
GPT config, measures per rank:

1. bytes sent per transformer layer, forward + backward (``comm_trace`` of a
   2-layer minus a 1-layer model), next to the formulas
   (:func:`colofn.parallel.tp3d.volume.layer_bytes`; 1D: 4 all-reduces of
   the ``[batch, seq, d_model]`` activation);
2. parameter bytes held (the local shards);
3. activation bytes autograd saves for the backward, per layer (``saved_tensors_hooks``,
   each storage once, parameters' own storage left out), 2 layers minus 1.

Never gates tests.
"""

from __future__ import annotations

import math

import torch

import colofn
from colofn import random, tree
from colofn.models import gpt
from colofn.parallel import Plan, make_loss, shard_params
from colofn.parallel.tp3d import volume

BATCH, SEQ = 8, 64
CFG = dict(vocab_size=512, seq_len=SEQ, d_model=128, n_heads=8, d_ff=512, dtype=torch.float32)
RUNS = {
    "1D tp=8": (Plan(tp="tp"), {"tp": 8}),
    "3D 2x2x2": (Plan(tp_mode="3d", tp_grid=("i", "w", "o")), {"i": 2, "w": 2, "o": 2}),
}


def _rank(cfg, plan, shape, params, batch):
    mesh = colofn.Mesh(tuple(shape.values()), tuple(shape))
    sharded = tree.map(lambda p: p.detach().requires_grad_(), shard_params(params, cfg, plan, mesh))
    own = {p.to_local().untyped_storage().data_ptr() for p in tree.leaves(sharded)}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with colofn.comm_trace() as records:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = make_loss(cfg, plan, mesh)(sharded, batch)
        torch.autograd.grad(loss.to_local(), tree.leaves(sharded))
    weights = sum(p.to_local().numel() * p.to_local().element_size() for p in tree.leaves(sharded))
    return sum(r.bytes_sent for r in records), weights, sum(seen.values())


def measure(name: str, layers: int) -> tuple[int, int, int]:
    plan, shape = RUNS[name]
    cfg = gpt.config("tiny", n_layers=layers, **CFG)
    params = gpt.init(random.key(0), cfg)
    t = random.randint(random.key(1), (BATCH, SEQ + 1), 0, cfg.vocab_size)
    out = colofn.launch(_rank, cfg, plan, shape, params, {"tokens": t[:, :-1], "targets": t[:, 1:]}, world_size=8)
    return max(o[0] for o in out), max(o[1] for o in out), max(o[2] for o in out)


def main() -> None:
    cfg = gpt.config("tiny", **CFG)
    e = 4
    act = BATCH * SEQ * cfg.d_model * e  # one [batch, seq, d_model] activation, whole
    print(f"GPT d_model={cfg.d_model} n_heads={cfg.n_heads} d_ff={cfg.d_ff} vocab={cfg.vocab_size}; batch {BATCH} x seq {SEQ}, float32; 8 ranks")
    print(f"one [batch, seq, d_model] activation: {act:,} B; one layer's weights: {(4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff) * e:,} B")
    print(f"{'plan':10} {'sent/layer':>12} {'formula':>12} {'weights':>10} {'saved act./layer':>17}")
    for name, (plan, shape) in RUNS.items():
        one, two = measure(name, 1), measure(name, 2)
        if plan.tp_mode == "3d":
            formula = volume.layer_bytes(cfg, plan, shape, BATCH, SEQ)
        else:
            formula = 4 * (2 * 7 * act // 8)  # 2 all-reduces forward, 2 backward
        print(f"{name:10} {two[0] - one[0]:>12,} {formula:>12,} {two[1] - one[1]:>10,} {two[2] - one[2]:>17,}")
    print("\nThe papers' per-product bandwidth terms (ColossalAI feature docs, by the authors), at P ranks:")
    print(f"{'P':>4} {'1D 2(P-1)/P':>12} {'2D 6(q-1)/q':>12} {'2.5D 3(q-1)(d+1)/dq':>20} {'3D 6(q-1)/q^3':>14}")
    for p in (8, 64):
        q2 = math.isqrt(p)
        two_d = f"{6 * (q2 - 1) / q2:.3f}" if q2 * q2 == p else "-"
        q25, d25 = (2, 2) if p == 8 else (4, 4)
        q3 = round(p ** (1 / 3))
        print(f"{p:>4} {2 * (p - 1) / p:>12.3f} {two_d:>12} {3 * (q25 - 1) * (d25 + 1) / (d25 * q25):>20.3f} {6 * (q3 - 1) / q3**3:>14.3f}")


if __name__ == "__main__":
    main()
