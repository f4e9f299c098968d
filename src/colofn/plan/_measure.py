"""Measure what the planner predicts: the activation memory of a forward, and the bytes a step sends.

On CPU there is no allocator to ask for a peak (``torch.cuda.max_memory_allocated``
has no CPU twin), so colofn counts what the forward leaves behind for the
backward: every tensor autograd saves passes through a
:func:`torch.autograd.graph.saved_tensors_hooks` pack hook, and the distinct
storages among them (parameters excluded) are the activation memory held when
the forward ends, which is the peak of activation memory in a step without a
pipeline (the backward frees them as it goes).

>>> import torch
>>> w = torch.ones(4, 8, requires_grad=True)
>>> x = torch.ones(16, 4)
>>> saved_activation_bytes(lambda: torch.relu(x @ w).sum(), exclude=[w])  # x (256 B) and relu's output (512 B)
768
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["saved_activation_bytes", "step_bytes", "trainer_step_bytes"]


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    local = getattr(t, "_local_tensor", t)  # a DTensor's shard
    return local.untyped_storage()


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages that ``fn()``'s autograd graph saves, less those of ``exclude``.

    Run ``fn`` (a forward whose result the backward will start from) with a
    pack hook that notes each saved tensor's storage; a storage saved twice
    (the same input of two matmuls, views of one buffer) counts once, whole.
    Hooks are per thread, so each simulated rank measures its own forward.
    """
    skip = {_storage(t).data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        st = _storage(x)
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    del out
    return sum(seen.values())


def step_bytes(config: Any, mesh_pairs: tuple[tuple[str, int], ...], batch_size: int,
               sp: str = "none") -> tuple[Counter[tuple[str, str, str]], tuple[int, ...]]:
    """What one rank sends in a step of ``colofn train``'s dense trainer on ``mesh_pairs``, by (op, axes, phase).

    (:func:`colofn.parallel.make_local_value_and_grad`, which it runs: the same
    collectives as ``make_value_and_grad``'s but for plain dp, whose loss
    statistics ride in the last gradient bucket.)

    Run it on every rank of a world (``colofn.launch``); the plan takes ``dp``,
    ``tp``, ``ep`` (and ``sp`` over an ``sp`` axis) from the mesh's axis names.
    Also returns each MoE layer's all-to-all room (rows per destination), which
    depends on the routing: pass it to ``step_collectives(ep_rooms=...)``.
    """
    from colofn import comm_trace, random
    from colofn import tree as jt
    from colofn.mesh import Mesh
    from colofn.models import gpt
    from colofn.parallel import Plan, make_local_value_and_grad, shard_params

    shape = dict(mesh_pairs)
    mesh = Mesh(tuple(shape.values()), tuple(shape))
    plan = Plan(**{a: a if a in shape else None for a in ("dp", "tp", "ep")},  # type: ignore[arg-type]
                sp=sp, sp_axis="sp" if "sp" in shape else None)  # type: ignore[arg-type]
    params = jt.map(lambda d: d.to_local(), shard_params(gpt.init(random.key(0), config), config, plan, mesh))
    t = random.randint(random.key(1), (batch_size, config.seq_len + 1), 0, config.vocab_size)
    with comm_trace() as records:
        make_local_value_and_grad(config, plan, mesh)(params, {"tokens": t[:, :-1], "targets": t[:, 1:]})
    out: Counter[tuple[str, str, str]] = Counter()
    for r in records:
        out[(r.op, "+".join(r.axes), r.phase)] += r.bytes_sent
    rooms = tuple(r.shape[1] for r in records if r.op == "all_to_all" and r.phase == "forward" and "ep" in r.axes)
    return out, rooms[::2]  # dispatch and combine share a room


def trainer_step_bytes(config: Any, mesh_pairs: tuple[tuple[str, int], ...], batch_size: int, *, sp: str = "none",
                       zero: int | None = None, microbatches: int = 1
                       ) -> tuple[Counter[tuple[str, str, str]], int, tuple[int, ...]]:
    """What one rank sends in a step of ``colofn train``'s trainer (ZeRO or pipeline), by (op, axes, phase).

    Like :func:`step_bytes`, for the compositions ``make_value_and_grad`` does
    not run: ZeRO over the data axes (``ZeroTrainer``) and pipelines, with ZeRO
    inside the stages and experts (``PipelineTrainer``, 1F1B with
    ``microbatches``). The pipeline's metadata messages (the schedule's small
    integer tensors) are left out; the balancing loss a MoE stage sends (a
    scalar) is kept. Returns ``(bytes, pipeline stage, MoE rooms)``, the rooms
    in layer and microbatch order, for ``step_collectives(ep_rooms=...)``.
    """
    from colofn import comm_trace, random
    from colofn.mesh import Mesh
    from colofn.models import gpt
    from colofn.train import TrainConfig
    from colofn.train.loop import make_optimizer
    from colofn.train.trainers import PipelineTrainer, ZeroTrainer

    shape = dict(mesh_pairs)
    mesh = Mesh(tuple(shape.values()), tuple(shape))
    cfg = TrainConfig(mesh=mesh_pairs, zero=zero, sp=sp, experts=config.n_experts)  # type: ignore[arg-type]
    opt = make_optimizer(cfg)
    params = gpt.init(random.key(0), config)
    trainer: Any
    if "pp" in shape:
        trainer = PipelineTrainer(config, cfg.plan(), mesh, opt, params, opt.init(params), "1f1b", microbatches,
                                  zero_stage=zero)
    else:
        trainer = ZeroTrainer(config, cfg.plan(), mesh, opt, params, opt.init(params), zero or 0)
    t = random.randint(random.key(1), (batch_size, config.seq_len + 1), 0, config.vocab_size)
    with comm_trace() as records:
        trainer.step({"tokens": t[:, :-1], "targets": t[:, 1:]})
    out: Counter[tuple[str, str, str]] = Counter()
    for r in records:
        if r.op not in ("send", "recv") or r.axes != ("pp",) or len(r.shape) in (0, 3):
            out[(r.op, "+".join(r.axes), r.phase)] += r.bytes_sent
    rooms = tuple(r.shape[1] for r in records if r.op == "all_to_all" and r.phase == "forward" and "ep" in r.axes)
    return out, mesh.axis_index("pp") if "pp" in shape else 0, rooms[::2]
