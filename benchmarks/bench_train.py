"""``colofn train``'s strategies versus PyTorch-native tools on the ``small`` GPT, side by side in one run.

The model is ``colofn.models.gpt.config("small", tie_embeddings=False)`` (4
layers, d_model 96, 4 heads, d_ff 384, seq 64, 499K params; the MoE row uses
``n_experts=4``), the data ``colofn.data``'s corpus, the optimizer AdamW
(lr 1e-3, weight decay 0.01, fp32) on both sides, global batch 16 x 64 tokens.

* colofn: the trainers of ``colofn train`` (:mod:`colofn.train.trainers`),
  built from a :class:`~colofn.train.TrainConfig` exactly as ``colofn train``
  builds them, from the same initial parameters.
* native: :class:`NativeGPT`, an ``nn.Module`` transformer with the same
  parameters (loaded from the same pytree) and the same math: q/k/v/o and the
  MLP as ``nn.Linear`` (bias-free, as the functional model), LayerNorms, a
  learned position table, SDPA causal attention, an untied head; the MoE layer
  calls ``colofn.models.gpt.moe`` itself. Its loss equals ``gpt.loss`` on the
  same params (printed first), and the last column is the largest difference
  of the two sides' losses over the warm-up steps (after an update too), so
  both sides run the same model with the same FLOPs. (The functional GPT's
  einsum weights are not ``nn.Linear`` modules, which ``parallelize_module``
  needs; hence a Module of its own rather than a wrapper around ``gpt.apply``.)
  ``loss_parallel`` swaps DTensor's op table globally, which threads cannot
  share: on the simulated world the TP head gathers the logits instead.

| strategy | mesh (world 4) | colofn | PyTorch-native |
| --- | --- | --- | --- |
| dp | dp=4 | DenseTrainer | DDP |
| dp+tp | dp=2,tp=2 | DenseTrainer | ``parallelize_module`` TP on tp, then DDP over dp |
| tp+megatron-sp | tp=4, --sp megatron | DenseTrainer | ``parallelize_module`` TP + ``SequenceParallel`` |
| dp+zero1 | dp=4, --zero 1 | ZeroTrainer | DDP + ``ZeroRedundancyOptimizer`` |
| dp+zero2 | dp=4, --zero 2 | ZeroTrainer | FSDP2 ``fully_shard(reshard_after_forward=False)`` |
| dp+zero3 | dp=4, --zero 3 | ZeroTrainer | FSDP2 ``fully_shard`` |
| pp+dp | pp=2,dp=2, 1f1b x 4 | PipelineTrainer | ``pipelining.Schedule1F1B``, stages in DDP over dp |
| dp+ep | dp=2,ep=2, --experts 4 | DenseTrainer | DDP over all 4 ranks (torch has no native expert parallelism) |

What is measured, per strategy and framework:

* step time: every step starts at a barrier; the slowest rank's wall time of a
  step; the median over the timed steps. colofn and native steps alternate, so
  a change in machine load hits both. tokens/s = 16 x 64 / that median; the
  ratio column is colofn / native (above 1: colofn is faster).
* model states: bytes of tensor storage a rank holds in params + grads +
  optimizer state (+ ZeRO's flat buffers and master copies), at the end of a
  step, the largest rank. native: distinct storages of the optimizer's params, their
  ``.grad`` (alive until the next ``zero_grad``) and the optimizer's state
  (DTensors count their local shard; DDP's bucket views once). colofn: the
  trainer's ``local_bytes()`` (params + optimizer state) plus the bytes of the
  gradients the step produced (they are freed after the update).
* RSS growth (gloo only; threads share one process): the peak resident set
  size of the rank's process from just before the framework is set up until
  the end of its warm-up steps, minus the resident size at the start (Linux
  ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, with
  ``malloc_trim`` first); largest rank. It counts everything the process
  touched: parameters, optimizer state, activations, communication buffers,
  allocator slack, lazily built caches.

One intra-op thread per rank (as torchrun's ``OMP_NUM_THREADS=1``). Run with::

    python benchmarks/bench_train.py             # world 4 on gloo and simulated; about 2 minutes on 2 busy cores
    python benchmarks/bench_train.py --quick     # fewer steps
    python benchmarks/bench_train.py --worlds 2,4 --only dp,dp+zero3
    python benchmarks/bench_train.py --backends gloo --only dp,"pp+dp (1f1b)" --steps 4   # a cheap iteration

It prints one Markdown table and writes ``docs/img/bench_train.svg`` (bars of
colofn / native tokens/s; ``--svg PATH`` elsewhere, ``--svg ''`` not at all).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import colofn
from colofn import data, optim, random
from colofn.models import gpt
from colofn.train import TrainConfig, validate
from colofn.train.trainers import DenseTrainer, PipelineTrainer, ZeroTrainer, nbytes
from colofn.zero.memory import storage_bytes

LR, WD, BATCH, MICROBATCHES, EXPERTS = 1e-3, 0.01, 16, 4, 4


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    meshes: dict[int, tuple[tuple[str, int], ...]]  # world size -> mesh
    native: str
    zero: int | None = None
    sp: str = "none"
    experts: int = 0


STRATEGIES = [
    Strategy("dp", {4: (("dp", 4),), 2: (("dp", 2),)}, "DDP"),
    Strategy("dp+tp", {4: (("dp", 2), ("tp", 2))}, "TP + DDP"),
    Strategy("tp+megatron-sp", {4: (("tp", 4),), 2: (("tp", 2),)}, "TP + SequenceParallel", sp="megatron"),
    Strategy("dp+zero1", {4: (("dp", 4),), 2: (("dp", 2),)}, "DDP + ZeroRedundancyOptimizer", zero=1),
    Strategy("dp+zero2", {4: (("dp", 4),), 2: (("dp", 2),)}, "FSDP2 (no reshard after fwd)", zero=2),
    Strategy("dp+zero3", {4: (("dp", 4),), 2: (("dp", 2),)}, "FSDP2 fully_shard", zero=3),
    Strategy("pp+dp (1f1b)", {4: (("pp", 2), ("dp", 2)), 2: (("pp", 2),)}, "Schedule1F1B + DDP"),
    Strategy("dp+ep (MoE)", {4: (("dp", 2), ("ep", 2)), 2: (("ep", 2),)}, "DDP (no native EP)", experts=EXPERTS),
]


def train_config(s: Strategy, world: int) -> TrainConfig:
    cfg = TrainConfig(preset="small", mesh=s.meshes[world], batch_size=BATCH, lr=LR, zero=s.zero, sp=s.sp,  # type: ignore[arg-type]
                      schedule="1f1b", experts=s.experts,
                      microbatches=MICROBATCHES if "pp" in dict(s.meshes[world]) else None)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- the native model


class Attention(nn.Module):
    def __init__(self, p: dict[str, torch.Tensor], head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        for name in ("wq", "wk", "wv"):  # [d, heads, hd] -> Linear(d, heads * hd): heads split by ColwiseParallel
            setattr(self, name, _linear(p[name].reshape(p[name].shape[0], -1)))
        self.wo = _linear(p["wo"].reshape(-1, p["wo"].shape[-1]))  # [heads, hd, d] -> Linear(heads * hd, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (w(x) for w in (self.wq, self.wk, self.wv))
        b, s = q.shape[:2]  # local shapes: under TP a rank holds heads / tp heads
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, p: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.w1, self.w2 = _linear(p["w1"]), _linear(p["w2"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class MoE(nn.Module):
    """``colofn.models.gpt.moe`` on module parameters; keeps its load-balancing loss for the loss."""

    def __init__(self, p: dict[str, torch.Tensor], cfg: gpt.GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router, self.w1, self.w2 = (nn.Parameter(p[k].clone()) for k in ("router", "w1", "w2"))
        self.aux = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, self.aux = gpt.moe({"router": self.router, "w1": self.w1, "w2": self.w2}, x, self.cfg)
        return y


class Block(nn.Module):
    def __init__(self, p: dict[str, Any], cfg: gpt.GPTConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = _layernorm(p["norm1"], cfg), _layernorm(p["norm2"], cfg)
        self.attn = Attention(p["attn"], cfg.head_dim)
        self.mlp = MoE(p["moe"], cfg) if "moe" in p else MLP(p["mlp"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NativeGPT(nn.Module):
    """The layers ``layers`` of the functional GPT as an ``nn.Module`` (with the embeddings if first, the head if last)."""

    def __init__(self, params: dict[str, Any], cfg: gpt.GPTConfig, layers: range | None = None) -> None:
        super().__init__()
        layers = range(cfg.n_layers) if layers is None else layers
        self.cfg, self.first, self.last = cfg, layers.start == 0, layers.stop == cfg.n_layers
        self.sp = False  # set by _tensor_parallel: the residual stream is split over the sequence
        if self.first:
            self.tok = nn.Embedding.from_pretrained(params["embed"]["tok"].clone(), freeze=False)
            self.pos = nn.Parameter(params["embed"]["pos"].clone())
        self.layers = nn.ModuleList(Block(params["layers"][i], cfg) for i in layers)
        if self.last:
            self.ln_f = _layernorm(params["final_norm"], cfg)
            self.head = _linear(params["head"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            h = self.tok(x)
            pos = self.pos[: x.shape[1]]
            if hasattr(h, "to_local"):  # a vocabulary-parallel embedding: a DTensor, pos a replicated one
                from torch.distributed.tensor import Replicate, Shard

                h = (h + pos).redistribute(h.device_mesh, [Shard(1) if self.sp else Replicate()]).to_local()
            else:
                h = h + pos
            x = h
        for block in self.layers:
            x = block(x)
        return self.head(self.ln_f(x)) if self.last else x

    def aux_loss(self) -> torch.Tensor:
        return sum((b.mlp.aux for b in self.layers if isinstance(b.mlp, MoE)), torch.zeros(()))


def _linear(w: torch.Tensor) -> nn.Linear:
    """``x @ w`` as ``nn.Linear`` (weight ``w.T``), no bias."""
    lin = nn.Linear(*w.shape, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w.T)
    return lin


def _layernorm(p: dict[str, torch.Tensor], cfg: gpt.GPTConfig) -> nn.LayerNorm:
    ln = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    with torch.no_grad():
        ln.weight.copy_(p["scale"])
        ln.bias.copy_(p["bias"])
    return ln


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ----------------------------------------------------------------------------- the native side of each strategy


class Native:
    """One strategy with PyTorch's own tools on this rank: ``step(batch) -> local loss or None``."""

    def __init__(self, s: Strategy, cfg: TrainConfig, mcfg: gpt.GPTConfig, params: Any, mesh: colofn.Mesh, real: bool = True) -> None:
        self.mcfg, self.mesh, self.real = mcfg, mesh, real
        shape = mesh.shape
        dm = mesh.device_mesh
        self.schedule = None
        self.loss_parallel = False
        names = [n for n in ("dp", "ep") if n in shape]  # the data is split over these
        self.data_index = sum(mesh.axis_index(n) * math.prod(shape[m] for m in names[i + 1:]) for i, n in enumerate(names))
        self.data_ways = math.prod(shape[n] for n in names)
        if "pp" in shape:
            model = self._pipeline(params, cfg, shape)
        else:
            model = NativeGPT(params, mcfg)
            if "tp" in shape:
                self._tensor_parallel(model, dm["tp"], sp=s.sp == "megatron")
            if s.zero in (2, 3):
                from torch.distributed.fsdp import fully_shard

                for block in model.layers:
                    fully_shard(block, mesh=dm["dp"], reshard_after_forward=s.zero == 3)
                fully_shard(model, mesh=dm["dp"], reshard_after_forward=s.zero == 3)
            elif "dp" in shape or "ep" in shape:
                model = self._ddp(model, None if "tp" not in shape else dm.get_group("dp"))
        self.model = model
        self.modules = [model] if not isinstance(model, list) else model
        # The parameters as the optimizer sees them (after TP + DDP, parameters() lists only the non-DTensor ones).
        self.params = [p for m in self.modules for p in m.parameters()]
        if s.zero == 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.opt: Any = ZeroRedundancyOptimizer(self.params, optimizer_class=torch.optim.AdamW, lr=LR, weight_decay=WD)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=WD, foreach=True)

    @staticmethod
    def _ddp(model: nn.Module, group: Any) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        if group is not None:  # DDP over dp of a module whose params are TP DTensors: torch's TP+DDP recipe
            from torch.distributed.tensor.parallel.ddp import _pre_dp_module_transform

            _pre_dp_module_transform(model)
        return DistributedDataParallel(model, process_group=group, gradient_as_bucket_view=True)

    def _tensor_parallel(self, model: NativeGPT, tp_mesh: Any, sp: bool) -> None:
        """Megatron TP on the Linear layers (heads and d_ff split), a vocabulary-parallel embedding and head
        (with ``loss_parallel``), and with ``sp`` the norms and residual stream split over the sequence."""
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            PrepareModuleInput,
            RowwiseParallel,
            SequenceParallel,
            parallelize_module,
        )

        seq = Shard(1) if sp else Replicate()
        plan: dict[str, Any] = {
            "tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq, use_local_output=False),
            # loss_parallel swaps DTensor's op table globally: not thread-safe, so the simulated world gathers the logits
            "head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1) if self.real else Replicate(),
                                    use_local_output=not self.real),
        }
        if sp:
            plan["ln_f"] = SequenceParallel()
        for i, block in enumerate(model.layers):
            plan |= {
                f"layers.{i}.attn.wq": ColwiseParallel(), f"layers.{i}.attn.wk": ColwiseParallel(),
                f"layers.{i}.attn.wv": ColwiseParallel(), f"layers.{i}.attn.wo": RowwiseParallel(output_layouts=seq),
            }
            if isinstance(block.mlp, MLP):
                plan |= {f"layers.{i}.mlp.w1": ColwiseParallel(), f"layers.{i}.mlp.w2": RowwiseParallel(output_layouts=seq)}
            if sp:
                to_full = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
                plan |= {f"layers.{i}.ln1": SequenceParallel(), f"layers.{i}.ln2": SequenceParallel(),
                         f"layers.{i}.attn": to_full, f"layers.{i}.mlp": to_full}
        parallelize_module(model, tp_mesh, plan)
        model.pos = nn.Parameter(distribute_tensor(model.pos.data, tp_mesh, [Replicate()]))
        model.sp = sp
        self.loss_parallel = self.real

    def _pipeline(self, params: Any, cfg: TrainConfig, shape: dict[str, int]) -> list[nn.Module]:
        from torch.distributed import pipelining as tpp

        mcfg, dm = self.mcfg, self.mesh.device_mesh
        n = shape["pp"]
        per = mcfg.n_layers // n
        s = self.mesh.axis_index("pp")
        module: nn.Module = NativeGPT(params, mcfg, range(s * per, (s + 1) * per))
        if "dp" in shape:
            module = self._ddp(module, dm.get_group("dp"))
        stage = tpp.PipelineStage(module, s, n, torch.device("cpu"), group=dm.get_group("pp"))
        self.schedule = tpp.Schedule1F1B(stage, cfg.num_microbatches, loss_fn=cross_entropy)
        self.first, self.last = s == 0, s == n - 1
        return [module]

    def step(self, batch: dict[str, torch.Tensor]) -> float | None:
        tokens, targets = (batch[k].chunk(self.data_ways)[self.data_index] for k in ("tokens", "targets"))
        self.opt.zero_grad(set_to_none=True)
        if self.schedule is not None:
            losses: list[torch.Tensor] = []
            kwargs = {"target": targets, "losses": losses} if self.last else {}
            self.schedule.step(*((tokens,) if self.first else ()), **kwargs)
            self.opt.step()
            return float(torch.stack(losses).mean()) if self.last else None
        if self.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            with loss_parallel():
                loss = cross_entropy(self.model(tokens), targets)
                loss.backward()
            loss = loss.full_tensor()
        else:
            loss = cross_entropy(self.model(tokens), targets)
            if self.mcfg.n_experts:
                inner = self.model.module if hasattr(self.model, "module") else self.model
                loss = loss + self.mcfg.aux_loss_coef * inner.aux_loss()
            loss.backward()
        self.opt.step()
        return float(loss.detach())

    def model_states(self) -> int:
        def local(t: torch.Tensor) -> torch.Tensor:
            return t.to_local() if hasattr(t, "to_local") else t

        ps = self.params
        opt = self.opt.optim if hasattr(self.opt, "optim") else self.opt  # ZeroRedundancyOptimizer: its local shard's AdamW
        states = [local(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        seen: set[tuple[str, int]] = set()
        return sum(storage_bytes(t, seen) for t in ([local(p) for p in ps], [local(p.grad) for p in ps if p.grad is not None], states))


# ----------------------------------------------------------------------------- the colofn side


class Colofn:
    """The trainer ``colofn train`` builds for ``cfg``; remembers the bytes of the last step's gradients."""

    def __init__(self, cfg: TrainConfig, mcfg: gpt.GPTConfig, params: Any, mesh: colofn.Mesh) -> None:
        opt = optim.adamw(LR, weight_decay=WD)
        state = opt.init(params)
        plan = cfg.plan()
        self.grad_bytes = 0
        if cfg.pp > 1:
            t: Any = PipelineTrainer(mcfg, plan, mesh, opt, params, state, cfg.schedule, cfg.num_microbatches)
            pipe = t.pipe

            def counted_pipe(*a: Any) -> Any:
                result = pipe(*a)
                if not self.grad_bytes:  # the same every step: counted once, not charged to each timed step
                    self.grad_bytes = nbytes(result.grads)
                return result

            t.pipe = counted_pipe
        elif cfg.zero is not None:
            t = ZeroTrainer(mcfg, plan, mesh, opt, params, state, cfg.zero)
            zstep = t.step

            def zero_step(batch: dict[str, torch.Tensor]) -> float:  # ZeroTrainer.step, keeping StepInfo.memory
                loss = zstep(batch)
                self.grad_bytes = t.info.memory.grads
                return loss

            t.step = zero_step  # type: ignore[method-assign]
        else:
            t = DenseTrainer(mcfg, plan, mesh, opt, params, state)
            vg = t.value_and_grad

            def counted_vg(*a: Any) -> Any:
                loss, grads = vg(*a)
                if not self.grad_bytes:  # the same every step: counted once, not charged to each timed step
                    self.grad_bytes = nbytes(grads)
                return loss, grads

            t.value_and_grad = counted_vg
        self.trainer = t

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        return self.trainer.step(batch)

    def model_states(self) -> int:
        return self.trainer.local_bytes() + self.grad_bytes


# ----------------------------------------------------------------------------- memory of this process


_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def rss_window_start() -> int | None:
    """Free what can be freed, reset the peak RSS to the current RSS, return the current RSS (bytes)."""
    gc.collect()
    if _LIBC is None:
        return None
    _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kb("VmRSS:") * 1024


def rss_peak() -> int:
    return _status_kb("VmHWM:") * 1024


# ----------------------------------------------------------------------------- one world


def rank_program(world: int, names: list[str], warmup: int, steps: int, real: bool) -> dict[str, Any]:
    """Every strategy on this rank: {strategy: {"colofn"|"native": {times, states, rss, losses} or {error, trace}}}."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from torch.distributed import pipelining  # noqa: F401 - imported before any memory window
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from torch.distributed.tensor import parallel  # noqa: F401

    stream = data.encode(data.text())
    out: dict[str, Any] = {}
    for s in STRATEGIES:
        if s.name not in names or world not in s.meshes:
            continue
        cfg = train_config(s, world)
        mcfg = cfg.model_config()
        mesh = colofn.Mesh(tuple(cfg.mesh_shape.values()), tuple(cfg.mesh_shape))
        params = gpt.init(random.key(0), mcfg)
        batches = [data.sample_batch(random.key(100 + k), stream, BATCH, mcfg.seq_len) for k in range(warmup + steps)]
        runs: dict[str, Any] = {}
        entry: dict[str, Any] = {}
        for fw in ("colofn", "native"):
            dist.barrier()
            try:
                base = rss_window_start() if real else None
                run = Colofn(cfg, mcfg, params, mesh) if fw == "colofn" else Native(s, cfg, mcfg, params, mesh, real)
                losses = [run.step(batches[k]) for k in range(warmup)]
                entry[fw] = {"times": [], "states": run.model_states(), "losses": losses,
                             "rss": rss_peak() - base if base is not None else None}
                runs[fw] = run
            except Exception as e:  # noqa: BLE001 - reported in the table
                entry[fw] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}",
                             "trace": traceback.format_exc()}
            failed = [None] * dist.get_world_size()
            dist.all_gather_object(failed, entry[fw].get("error"))
            if any(failed) and fw in runs:  # another rank failed: time neither on any rank
                runs.pop(fw)
                entry[fw] = {"error": next(f for f in failed if f), "trace": "(failed on another rank)"}
        for k in range(warmup, warmup + steps):
            for fw, run in runs.items():
                dist.barrier()
                t0 = time.perf_counter()
                run.step(batches[k])
                entry[fw]["times"].append(time.perf_counter() - t0)
        out[s.name] = entry
        del runs
        gc.collect()
    return out


# ----------------------------------------------------------------------------- the report


def summarize(world: int, backend: str, per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    tokens = BATCH * gpt.config("small").seq_len
    for s in STRATEGIES:
        if s.name not in per_rank[0]:
            continue
        row: dict[str, Any] = {"world": world, "backend": backend, "strategy": s.name, "tool": s.native,
                               "mesh": ",".join(f"{a}={n}" for a, n in s.meshes[world])}
        for fw in ("colofn", "native"):
            entries = [r[s.name][fw] for r in per_rank]
            bad = next((e for e in entries if "error" in e), None)
            if bad is not None:
                row[fw] = {"error": bad["error"], "trace": bad["trace"]}
                continue
            step = [max(ts) for ts in zip(*(e["times"] for e in entries), strict=True)]
            # a step's loss: the mean over the ranks that have one (native dp ranks: their shard's; pp: the last stage)
            losses = [statistics.fmean(x for x in per_step if x is not None) for per_step in zip(*(e["losses"] for e in entries), strict=True)]
            rss = [e["rss"] for e in entries if e["rss"] is not None]
            row[fw] = {"tok_s": tokens / statistics.median(step), "states": max(e["states"] for e in entries),
                       "rss": max(rss) if rss else None, "losses": losses}
        if "error" not in row["colofn"] and "error" not in row["native"]:
            row["loss_diff"] = max(abs(a - b) for a, b in zip(row["colofn"]["losses"], row["native"]["losses"], strict=True))
        rows.append(row)
    return rows


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def print_table(rows: list[dict[str, Any]], warmup: int) -> None:
    print("| world | backend | strategy | mesh | PyTorch-native | colofn tok/s | native tok/s | colofn / native "
          f"| model states MiB, colofn / native | RSS growth MiB, colofn / native | max loss diff, steps 1-{warmup} |")
    print("| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        c, n = r["colofn"], r["native"]

        def cell(x: dict[str, Any], key: str, fmt: Any) -> str:
            return "failed" if "error" in x else fmt(x[key])

        ratio = f"{c['tok_s'] / n['tok_s']:.2f}" if "loss_diff" in r else "-"
        diff = f"{r['loss_diff']:.1e}" if "loss_diff" in r else "-"
        print(f"| {r['world']} | {r['backend']} | {r['strategy']} | {r['mesh']} | {r['tool']} "
              f"| {cell(c, 'tok_s', '{:,.0f}'.format)} | {cell(n, 'tok_s', '{:,.0f}'.format)} | {ratio} "
              f"| {cell(c, 'states', _mib)} / {cell(n, 'states', _mib)} | {cell(c, 'rss', _mib)} / {cell(n, 'rss', _mib)} "
              f"| {diff} |")
    for r in rows:
        for fw in ("colofn", "native"):
            if "error" in r[fw]:
                print(f"\n{fw} {r['strategy']} on {r['backend']} world {r['world']}: {r[fw]['error']}")
                print(r[fw]["trace"], file=sys.stderr)


def bar_chart_svg(rows: list[dict[str, Any]], width: int = 720) -> str:
    """Horizontal bars of colofn / native tokens/s, grouped by strategy (one bar per world and backend), a line at 1."""
    ok = [r for r in rows if "loss_diff" in r]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault(r["strategy"], []).append(r)
    bar_h, gap, group_gap, left, top = 14, 2, 10, 190, 52
    height = top + sum(len(g) * (bar_h + gap) + group_gap for g in groups.values()) + 30
    hi = max([r["colofn"]["tok_s"] / r["native"]["tok_s"] for r in ok] + [1.0]) * 1.12
    scale = (width - left - 50) / hi
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
    kinds = sorted({(r["backend"], r["world"]) for r in ok}, key=lambda k: (k[0] != "gloo", k[1]))
    color = {k: palette[i % len(palette)] for i, k in enumerate(kinds)}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">colofn train / PyTorch-native, tokens per second '
        "(small GPT; above 1: colofn faster)</text>",
    ]
    for i, (backend, world) in enumerate(kinds):
        x = left + i * 140
        out.append(f'<rect x="{x}" y="28" width="12" height="12" fill="{color[(backend, world)]}"/>')
        out.append(f'<text x="{x + 16}" y="38">{backend}, world {world}</text>')
    y = top
    for name, group in groups.items():
        out.append(f'<text x="{left - 8}" y="{y + (len(group) * (bar_h + gap)) / 2 + 4:.1f}" text-anchor="end">{name}</text>')
        for r in group:
            ratio = r["colofn"]["tok_s"] / r["native"]["tok_s"]
            out.append(f'<rect x="{left}" y="{y}" width="{ratio * scale:.1f}" height="{bar_h}" '
                       f'fill="{color[(r["backend"], r["world"])]}"/>')
            out.append(f'<text x="{left + ratio * scale + 4:.1f}" y="{y + bar_h - 3}" font-size="11">{ratio:.2f}</text>')
            y += bar_h + gap
        y += group_gap
    x1 = left + scale
    out.append(f'<line x1="{x1:.1f}" y1="{top - 4}" x2="{x1:.1f}" y2="{y}" stroke="black" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{x1:.1f}" y="{y + 14}" text-anchor="middle">1.0</text>')
    out.append("</svg>")
    return "\n".join(out)


def check_native_model() -> float:
    """The largest |loss difference| of NativeGPT and gpt.loss on the same params and batch (dense and MoE)."""
    worst = 0.0
    stream = data.encode(data.text())
    for experts in (0, EXPERTS):
        mcfg = gpt.config("small", tie_embeddings=False, n_experts=experts)
        params = gpt.init(random.key(0), mcfg)
        batch = data.sample_batch(random.key(1), stream, 4, mcfg.seq_len)
        model = NativeGPT(params, mcfg)
        native = cross_entropy(model(batch["tokens"]), batch["targets"]) + mcfg.aux_loss_coef * model.aux_loss()
        worst = max(worst, abs(float(native) - float(gpt.loss(params, batch, mcfg))))
    return worst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps")
    p.add_argument("--steps", type=int, default=None, help="timed steps per strategy and framework (default 8; --quick 2)")
    p.add_argument("--worlds", default="4", help="world sizes, comma-separated (4 and 2 have meshes)")
    p.add_argument("--backends", default="gloo,sim", help="gloo (processes) and/or sim (threads)")
    p.add_argument("--only", default=",".join(s.name for s in STRATEGIES), help="strategies, comma-separated")
    p.add_argument("--svg", default=os.path.join(os.path.dirname(__file__), "..", "docs", "img", "bench_train.svg"))
    args = p.parse_args(argv)
    warmup, steps = (1, 2) if args.quick else (2, 8)
    steps = args.steps if args.steps is not None else steps
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    mcfg = gpt.config("small", tie_embeddings=False)
    print(f"# bench_train: small GPT ({gpt.count_params(mcfg):,} params), batch {BATCH} x {mcfg.seq_len} tokens, "
          f"AdamW, {steps} timed steps after {warmup} warm-up, torch {torch.__version__}, 1 thread per rank, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"# NativeGPT vs colofn.models.gpt.loss on the same params: max |loss difference| {check_native_model():.1e}")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for world in [int(w) for w in args.worlds.split(",") if w]:
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            real = backend != "sim"
            per_rank = colofn.launch(rank_program, world, names, warmup, steps, real, world_size=world,
                                     backend="gloo" if real else "sim")
            rows += summarize(world, backend, per_rank)
            print(f"# world {world} {backend} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print()
    print_table(rows, warmup)
    if args.svg:
        os.makedirs(os.path.dirname(args.svg), exist_ok=True)
        with open(args.svg, "w") as f:
            f.write(bar_chart_svg(rows))
        print(f"\n# wrote {os.path.relpath(args.svg)}")
    print(f"# total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
