"""The program every rank runs for ``colofn train``."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from colofn import checkpoint, data, optim, random
from colofn import tree as jt
from colofn.mesh import Mesh
from colofn.models import gpt
from colofn.optim.adam import AdamState
from colofn.tracing import comm_trace
from colofn.train import timing
from colofn.train.config import TrainConfig
from colofn.train.trainers import DenseTrainer, PipelineTrainer, ZeroTrainer
from colofn.world import process_index


def make_optimizer(cfg: TrainConfig) -> optim.GradientTransformation:
    schedule = optim.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, cfg.warmup), max(cfg.steps, cfg.warmup + 1), end_value=cfg.lr * 0.1)
    return optim.adamw(schedule, weight_decay=0.01)


def initial_state(cfg: TrainConfig, mcfg: gpt.GPTConfig, opt: optim.GradientTransformation) -> tuple[int, Any, AdamState]:
    """``(step, global params, global AdamW state)``: fresh, or from ``--resume``."""
    params = gpt.init(random.key(cfg.seed), mcfg)
    return resume(cfg, params, opt.init(params))


def resume(cfg: TrainConfig, params: Any, state: AdamState) -> tuple[int, Any, AdamState]:
    """``(0, params, state)``, or the step, params and AdamW state of ``--resume`` (loaded like ``params``)."""
    if not cfg.resume:
        return 0, params, state
    path = cfg.resume if checkpoint.is_complete(cfg.resume) else checkpoint.latest(cfg.resume)
    if path is None:
        from colofn.errors import CheckpointError

        raise CheckpointError(f"--resume {cfg.resume}: no complete checkpoint there (looked for step_* directories with a marker)")
    loaded = checkpoint.load(path, like={"step": 0, "params": params, "opt_state": tuple(state)})
    return int(loaded["step"]), loaded["params"], AdamState(*loaded["opt_state"])


class SingleDevice:
    """The same model and optimizer on one device, for ``--check``."""

    def __init__(self, mcfg: gpt.GPTConfig, opt: optim.GradientTransformation, params: Any, state: AdamState, microbatches: list[torch.Tensor] | None = None) -> None:
        self.mcfg, self.opt = mcfg, opt
        self.params = jt.map(lambda t: t.detach().clone(), params)
        self.state = jt.map(lambda t: t.clone(), state)
        self.microbatches = microbatches  # rows of each microbatch: MoE routing sees one at a time

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        params = jt.map(lambda t: t.detach().requires_grad_(), self.params)
        if self.microbatches is None:
            loss = gpt.loss(params, batch, self.mcfg)
        else:
            parts = [gpt.loss(params, {k: v[rows] for k, v in batch.items()}, self.mcfg) for rows in self.microbatches]
            loss = torch.stack(parts).mean()
        grads = jt.unflatten(jt.structure(params), torch.autograd.grad(loss, jt.leaves(params)))
        updates, self.state = self.opt.update(grads, self.state, params)
        self.params = jt.map(torch.Tensor.detach, optim.apply_updates(params, updates))
        return float(loss.detach())


def _trainer(cfg: TrainConfig, mcfg: gpt.GPTConfig, mesh: Mesh, opt: optim.GradientTransformation, params: Any, state: AdamState) -> Any:
    plan = cfg.plan()
    if cfg.pp > 1:
        return PipelineTrainer(mcfg, plan, mesh, opt, params, state, cfg.schedule, cfg.num_microbatches, zero_stage=cfg.zero)
    if cfg.zero is not None:
        return ZeroTrainer(mcfg, plan, mesh, opt, params, state, cfg.zero)
    trainer = DenseTrainer(mcfg, plan, mesh, opt, params, state)
    if cfg.tp_remat:
        from colofn.train.grid import rematerializing

        trainer.value_and_grad = rematerializing(trainer.value_and_grad)
    return trainer


def _microbatch_rows(cfg: TrainConfig, mesh: Mesh) -> list[torch.Tensor] | None:
    """A pipelined MoE model routes each microbatch on its own: the rows the single-device check must group."""
    if cfg.pp == 1 or not cfg.experts:
        return None
    from colofn.train.pipe_moe import microbatch_rows

    ranks = math.prod(mesh.shape[a] for a in cfg.plan().batch_axes)
    return microbatch_rows(cfg.batch_size, ranks, cfg.num_microbatches)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


class Progress:
    """``[#####     ] step 5/10 | ...``: redrawn in place on a terminal, one line per step in a log file."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.open = False  # a terminal line is drawn without its newline

    def update(self, done: int, total: int, text: str) -> None:
        bar = "#" * int(20 * done / total)
        line = f"[{bar:<20}] step {done:>4}/{total} | {text}"
        if self.tty:
            end = "\n" if done == total else ""
            self.stream.write("\r\x1b[K" + line + end)
            self.open = done != total
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own (a checkpoint saved), under the bar."""
        self.stream.write(("\n" if self.open else "") + text + "\n")
        self.open = False
        self.stream.flush()


def comm_summary(records: list[Any]) -> dict[str, list[int]]:
    """``comm_trace`` records -> ``{"op over axes, phase": [ops, bytes sent]}``, in order of first appearance."""
    out: dict[str, list[int]] = {}
    for r in records:
        entry = out.setdefault(f"{r.op} over {','.join(r.axes) or '-'}, {r.phase}", [0, 0])
        entry[0] += 1
        entry[1] += r.bytes_sent
    return out


def _per_rank(value: int) -> list[int]:
    """``value`` from every rank, in rank order (collective): an int64 tensor, not a pickled object."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.int64))
    return [int(t) for t in out]


def _peak_rss_per_rank() -> list[int]:
    """The peak resident set size of each rank's process, bytes (collective; simulated ranks share one process)."""
    import resource

    return _per_rank(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def rank_program(cfg: TrainConfig) -> dict[str, Any]:
    """Train on this rank; rank 0 prints progress. Returns the run's record (losses, timings, memory)."""
    if cfg.hf is not None:
        from colofn.train import hf_loop

        return hf_loop.rank_program(cfg)
    mesh = Mesh(tuple(cfg.device_mesh_shape.values()), tuple(cfg.device_mesh_shape))
    mcfg = cfg.model_config()
    opt = make_optimizer(cfg)
    start, params, state = initial_state(cfg, mcfg, opt)
    trainer = _trainer(cfg, mcfg, mesh, opt, params, state)
    me = process_index()
    checker = SingleDevice(mcfg, opt, params, state, _microbatch_rows(cfg, mesh)) if cfg.check and me == 0 else None
    del params, state
    stream = data.encode(data.text())
    key = random.key(cfg.seed + 1)
    header = (f"colofn train: {cfg.preset} ({gpt.count_params(mcfg):,} params) on {mesh}, plan {cfg.plan()}"
              + (f", ZeRO-{cfg.zero}" if cfg.zero is not None else "")
              + (f", schedule {cfg.schedule} x {cfg.num_microbatches} microbatches" if cfg.pp > 1 else "")
              + (f", resumed at step {start}" if start else ""))
    record = run_steps(cfg, trainer, checker, lambda step: data.sample_batch(random.fold_in(key, step), stream, cfg.batch_size, mcfg.seq_len),
                       cfg.batch_size * mcfg.seq_len, start, header)
    record["config"] = dataclasses.asdict(cfg)
    record["mesh"] = str(mesh)
    return record


def run_steps(cfg: TrainConfig, trainer: Any, checker: Any, sample: Any, tokens_per_step: int, start: int, header: str) -> dict[str, Any]:
    """Steps ``start..cfg.steps`` of ``trainer`` (and ``checker``, on rank 0 with ``--check``) on ``sample(step)``; rank 0 prints progress."""
    me = process_index()
    record: dict[str, Any] = {"steps": [], "loss": [], "single": [], "tokens_per_s": [], "bytes_per_rank": []}
    say = (lambda text: print(text, flush=True)) if me == 0 else (lambda text: None)
    say(header)
    per_rank: list[int] | None = None
    progress = Progress(sys.stdout)
    step_s: list[float] = []
    blocked_s: list[float] = []
    clock = timing.BlockedClock()
    for step in range(start, cfg.steps):
        batch = sample(step)
        with clock:
            t0, b0 = time.perf_counter(), clock.blocked
            if step == start:  # every step communicates the same: trace the first
                with comm_trace() as comm:
                    loss = trainer.step(batch)
                record["comm_per_step"] = comm_summary(comm)
            else:
                loss = trainer.step(batch)
            dt = time.perf_counter() - t0
        step_s.append(dt)
        blocked_s.append(clock.blocked - b0)
        if per_rank is None:  # the sizes of what a rank holds do not change between steps
            per_rank = _per_rank(trainer.local_bytes())
        single = checker.step(batch) if checker else None
        record["steps"].append(step + 1)
        record["loss"].append(loss)
        record["single"].append(single)
        record["tokens_per_s"].append(tokens_per_step / dt)
        record["bytes_per_rank"].append(per_rank)
        check = f" | single-device {single:.6f} (diff {abs(loss - single):.1e})" if single is not None else ""
        if me == 0:
            progress.update(step + 1, cfg.steps, f"loss {loss:.6f}{check} | {tokens_per_step / dt:,.0f} tok/s | "
                            f"params+opt per rank {_fmt_bytes(max(per_rank))}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            p, s = trainer.export()
            path = os.path.join(cfg.out, "checkpoints", f"step_{step + 1:06d}")
            checkpoint.save(path, {"step": step + 1, "params": p, "opt_state": tuple(s)}, overwrite=True)
            if me == 0:
                progress.note(f"  saved {path}")
    record["peak_rss_per_rank"] = _peak_rss_per_rank()
    if step_s:  # the first step (traced, and the first of its kind) is left out unless it is the only one
        first = 1 if len(step_s) > 1 else 0
        record["time_split"] = timing.split(_per_rank_floats(step_s[first:]), _per_rank_floats(blocked_s[first:]))
        record["time_split_steps"] = [start + first + 1, cfg.steps]
    if getattr(trainer, "events", None) is not None:
        record["pipeline_idle"] = pipeline_idle(trainer.pipe, trainer.events)
    return record


def _per_rank_floats(values: list[float]) -> list[list[float]]:
    """``values`` (as long on every rank) from every rank, in rank order (collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [values]
    out = [torch.zeros(len(values), dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor(values, dtype=torch.float64))
    return [t.tolist() for t in out]


def pipeline_idle(pipe: Any, events: Any) -> dict[str, Any]:
    """The last step's measured idle per pipeline rank next to ``simulate()``'s (collective)."""
    from colofn.pipeline.measured import compare_to_simulation, gather_events

    s = pipe.schedule
    length = max(sum(a is not None for a in row) for row in s.actions)
    c = compare_to_simulation(s, gather_events(events, pipe.rank, s.num_ranks, length))
    return {"measured_idle_s": list(c.measured_idle), "simulated_idle_s": list(c.simulated_idle),
            "measured_makespan_s": c.measured_makespan, "simulated_makespan_s": c.simulated_makespan,
            "measured_bubble": c.measured_bubble, "simulated_bubble": c.simulated_bubble, "summary": c.summary()}
