"""1D (Megatron) vs 2D (Optimus) vs 2.5D (Tesseract) tensor parallelism: bytes sent and memory per rank, per layer.

    python benchmarks/bench_tp2d.py            # about a minute on 2 idle cores

For one GPT layer (measured as the difference between a 2-layer and a 1-layer
model, so the embedding, head and loss cancel) at the same device count, prints
per rank, measured on the simulated world:

* bytes sent in the forward and the backward (``colofn.comm_trace``), and for
  2D / 2.5D the formula of ``colofn.parallel.tp2d.cost.layer_bytes``;
* parameter bytes held (the rank's shards);
* bytes saved for the backward (``torch.autograd.graph.saved_tensors_hooks``:
  distinct storages, the parameters themselves excluded); under
  ``tp2d.rematerialize`` a rematerialised panel counts as its block.

Never gates tests.
"""

from __future__ import annotations

import math
import threading

import torch

import colofn
from colofn import random, tree
from colofn.models import gpt
from colofn.parallel import Plan, make_loss, shard_params
from colofn.parallel.tp2d import cost, remat

_local = threading.local()
_pack = remat._pack


def _spy(t):  # what rematerialize() keeps for the backward: a panel's block, or the tensor itself
    kept = _pack(t)
    record = getattr(_local, "record", None)
    if record is not None:
        record(kept.panel.block if isinstance(kept, remat._Saved) else t)
    return kept


remat._pack = _spy

B, S = 8, 32
CASES = [
    ("1D tp=4", Plan(tp="tp"), {"tp": 4}),
    ("2D 2x2", Plan(tp_mode="2d", tp_grid=("r", "c")), {"r": 2, "c": 2}),
    ("2D remat", Plan(tp_mode="2d", tp_grid=("r", "c")), {"r": 2, "c": 2}),
    ("1D tp=8", Plan(tp="tp"), {"tp": 8}),
    ("2.5D 2x2x2", Plan(tp_mode="2.5d", tp_grid=("r", "c", "z")), {"r": 2, "c": 2, "z": 2}),
    ("2.5D remat", Plan(tp_mode="2.5d", tp_grid=("r", "c", "z")), {"r": 2, "c": 2, "z": 2}),
]


def _program(cfg, plan, sizes, params, batch, rematerialize):
    mesh = colofn.Mesh(tuple(sizes.values()), tuple(sizes))
    placed = tree.map(lambda p: p.detach().requires_grad_(), shard_params(params, cfg, plan, mesh))
    mine = {p.to_local().untyped_storage().data_ptr() for p in tree.leaves(placed)}
    saved: dict[int, int] = {}

    def note(t):
        st = t.untyped_storage()
        if st.data_ptr() not in mine:
            saved[st.data_ptr()] = st.nbytes()

    def pack(t):
        note(t)
        return t

    _local.record = note
    hooks = remat.rematerialize() if rematerialize else torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with colofn.comm_trace() as records:
        with hooks:
            loss = make_loss(cfg, plan, mesh)(placed, batch)
        n_fwd = len(records)
        torch.autograd.grad(loss.to_local(), tree.leaves(placed))
    fwd = sum(r.bytes_sent for r in records[:n_fwd])
    bwd = sum(r.bytes_sent for r in records[n_fwd:])
    held = sum(p.to_local().numel() * p.to_local().element_size() for p in tree.leaves(placed))
    return fwd, bwd, held, sum(saved.values())


def measure(plan, sizes, layers, rematerialize):
    cfg = gpt.config("tiny", n_layers=layers, d_model=64, n_heads=8, d_ff=256, seq_len=S)
    params = gpt.init(random.key(0), cfg)
    t = random.randint(random.key(1), (B, S + 1), 0, cfg.vocab_size)
    out = colofn.launch(_program, cfg, plan, sizes, params, {"tokens": t[:, :-1], "targets": t[:, 1:]},
                        rematerialize, world_size=math.prod(sizes.values()))
    return out[0], cfg


def main() -> None:
    print(f"GPT layer d_model=64, n_heads=8, d_ff=256, batch {B} x seq {S}, float32; per rank, one layer")
    print(f"{'plan':12} {'fwd sent':>10} {'bwd sent':>10} {'formula':>10} {'params':>10} {'saved acts':>11}")
    for name, plan, sizes in CASES:
        on = name.endswith("remat")
        (f2, b2, h2, s2), cfg = measure(plan, sizes, 2, on)
        (f1, b1, h1, s1), _ = measure(plan, sizes, 1, on)
        formula = ""
        if plan.tp_mode != "1d":
            q, z = sizes["r"], sizes.get("z", 1)
            per = cost.layer_bytes(cfg, q, B * S // (q * z))
            formula = str(sum(per.values()) + (per["activations"] + per["weights"]) // 2 * on)
        print(f"{name:12} {f2 - f1:>10} {b2 - b1:>10} {formula:>10} {h2 - h1:>10} {s2 - s1:>11}")


if __name__ == "__main__":
    main()
