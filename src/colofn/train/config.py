"""``TrainConfig``: what ``colofn train`` runs, checked in full before any work starts."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Literal

from colofn import checkpoint
from colofn.errors import ConfigError, format_failures
from colofn.models import gpt
from colofn.parallel import Plan, check_batch, check_plan
from colofn.parallel.plan import PlanError
from colofn.train import tp3d

AXES = ("pp", "dp", "sp", "tp", "ep")
"""The mesh axis names ``--mesh`` knows: pipeline, data, sequence (Ulysses/ring), tensor, expert."""

SP = Literal["none", "megatron", "ulysses", "ring"]


def parse_mesh(text: str) -> dict[str, int]:
    """``"pp=2,dp=2,tp=2"`` -> ``{"pp": 2, "dp": 2, "tp": 2}`` (order kept: the mesh is row-major).

    >>> parse_mesh("dp=2,tp=2")
    {'dp': 2, 'tp': 2}
    """
    out: dict[str, int] = {}
    problems = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, size = part.partition("=")
        name = name.strip()
        if not eq or not size.strip().isdigit() or int(size) < 1:
            problems.append(f"{part!r} is not NAME=SIZE with SIZE >= 1")
        elif name not in AXES:
            problems.append(f"unknown axis {name!r}; the axes are {', '.join(AXES)}")
        elif name in out:
            problems.append(f"axis {name!r} given twice")
        else:
            out[name] = int(size)
    if problems or not out:
        raise ConfigError(
            format_failures(f"--mesh {text!r} is not a mesh:", problems or ["no axes given"],
                            fix="write it like --mesh pp=2,dp=2,tp=2")
        )
    return out


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs (the flags of ``colofn train``)."""

    preset: str = "tiny"
    mesh: tuple[tuple[str, int], ...] = (("dp", 2), ("tp", 2))
    steps: int = 20
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 5
    seed: int = 0
    zero: int | None = None
    sp: SP = "none"
    schedule: str = "1f1b"
    microbatches: int | None = None
    check: bool = False
    checkpoint_every: int = 0
    resume: str | None = None
    out: str = "colofn-train-out"
    backend: str = "sim"
    experts: int = 0
    hf: str | None = None
    data: str | None = None
    tp_mode: str = "1d"
    tp_depth: int = 1
    tp_remat: bool = False

    @property
    def mesh_shape(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def device_mesh_shape(self) -> dict[str, int]:
        """The mesh the run builds: ``--mesh``, with ``tp`` factored into the grid of ``--tp-mode`` 2d / 2.5d / 3d."""
        if self.tp_mode == "3d":
            return tp3d.device_mesh_shape(self.mesh_shape, self.tp_mode)
        from colofn.train.grid import device_mesh_shape

        return device_mesh_shape(self)

    @property
    def world_size(self) -> int:
        return math.prod(self.mesh_shape.values())

    @property
    def pp(self) -> int:
        return self.mesh_shape.get("pp", 1)

    @property
    def num_microbatches(self) -> int:
        return self.microbatches if self.microbatches is not None else max(1, 2 * self.pp) if self.pp > 1 else 1

    def model_config(self) -> gpt.GPTConfig:
        # Untied on every mesh, so that one parameter tree (and checkpoint) fits all
        # of them: under pp a tied table would live on the first and the last stage.
        overrides: dict[str, Any] = {"tie_embeddings": False}
        if self.experts:
            overrides["n_experts"] = self.experts
        return gpt.config(self.preset, **overrides)

    def plan(self) -> Plan:
        m = self.mesh_shape
        if self.tp_mode == "3d":
            return Plan(dp="dp" if "dp" in m else None, tp_mode="3d", tp_grid=tp3d.GRID)
        if self.tp_mode in ("2d", "2.5d"):
            from colofn.train.grid import grid_plan

            return grid_plan(self)
        return Plan(
            dp="dp" if "dp" in m else None,
            tp="tp" if "tp" in m else None,
            sp=self.sp,
            sp_axis="sp" if self.sp in ("ulysses", "ring") else None,
            ep="ep" if "ep" in m else None,
            pp="pp" if "pp" in m else None,
        )

    def zero_plan(self) -> Plan:
        """The plan of the per-device loss under ZeRO: ZeRO itself owns the dp axis."""
        return dataclasses.replace(self.plan(), dp=None)


def mcfg_ok(cfg: TrainConfig) -> bool:
    try:
        cfg.model_config()
    except ConfigError:
        return False
    return True


def validate(cfg: TrainConfig) -> None:
    """Raise one ``ConfigError`` listing every problem with ``cfg``, before any work."""
    failures: list[str] = []
    m = cfg.mesh_shape
    failures += _check_numbers(cfg)
    failures += _check_paths(cfg)
    failures += _check_backend(cfg)
    if cfg.hf is not None or cfg.data is not None:
        failures += hf_failures(cfg)
        if cfg.hf is not None:
            failures += tp3d.failures(m, cfg.tp_mode, zero=None, sp="none", experts=0, hf=True)
            if failures:
                raise ConfigError(format_failures("colofn train: the run cannot start:", failures))
            return
    try:
        mcfg = cfg.model_config()
    except ConfigError as e:
        failures.append(str(e))
        mcfg = None
    if cfg.sp == "megatron" and "tp" not in m:
        failures.append("--sp megatron splits the sequence over the tp axis: add tp=N to --mesh")
    if cfg.sp in ("ulysses", "ring") and "sp" not in m:
        failures.append(f"--sp {cfg.sp} splits the sequence over an sp axis: add sp=N to --mesh")
    if cfg.sp == "none" and "sp" in m:
        failures.append("--mesh has an sp axis but --sp is none: pass --sp ulysses or --sp ring")
    if "ep" in m and not cfg.experts:
        failures.append("--mesh has an ep axis: pass --experts N (a mixture-of-experts model)")
    if cfg.zero is not None:
        failures += _zero_failures(cfg)
        if cfg.pp > 1 and cfg.zero == 3:
            failures.append(ZERO3_PP)
    if cfg.pp == 1 and cfg.microbatches is not None:
        failures.append(f"--microbatches {cfg.microbatches} splits the batch of a pipeline: add pp=N to --mesh, or drop the flag")
    if cfg.pp == 1 and cfg.schedule != "1f1b":
        failures.append(f"--schedule {cfg.schedule} is a pipeline schedule: add pp=N to --mesh, or drop the flag")
    if cfg.pp > 1 and cfg.num_microbatches >= 1:
        from colofn.pipeline import SCHEDULES, get_schedule

        try:
            get_schedule(cfg.schedule)
        except Exception:  # noqa: BLE001 - reported below, with the options
            failures.append(f"--schedule {cfg.schedule!r} is unknown; the built-in schedules are {', '.join(SCHEDULES)} (or module:function)")
        else:
            from colofn.pipeline import make_schedule

            try:
                stages = make_schedule(cfg.schedule, cfg.pp, cfg.num_microbatches).num_stages
            except Exception as e:  # noqa: BLE001 - the schedule's own message says why
                failures.append(f"--schedule {cfg.schedule} with pp={cfg.pp}, {cfg.num_microbatches} microbatches: {e}")
            else:
                layers = gpt.config(cfg.preset).n_layers if mcfg_ok(cfg) else None
                if layers is not None and layers % stages:
                    failures.append(
                        f"--schedule {cfg.schedule} on pp={cfg.pp} has {stages} stages but preset {cfg.preset!r} "
                        f"has {layers} layers: the layers must split evenly into stages (pick another schedule, "
                        "pp size or preset)"
                    )
    if cfg.pp > 1:
        local_batch = cfg.batch_size // max(1, m.get("dp", 1) * (m.get("ep", 1) if "ep" in m else 1))
        if cfg.num_microbatches >= 1 and local_batch % cfg.num_microbatches:
            failures.append(
                f"--microbatches {cfg.num_microbatches} must divide each dp rank's batch ({local_batch} = "
                f"--batch-size {cfg.batch_size} / dp {m.get('dp', 1)})"
            )
    mode_failures = tp3d.failures(m, cfg.tp_mode, zero=cfg.zero, sp=cfg.sp, experts=cfg.experts, hf=cfg.hf is not None)
    if cfg.tp_mode != "1d" or cfg.tp_depth != 1 or cfg.tp_remat:
        from colofn.train.grid import grid_failures

        mode_failures += grid_failures(cfg)
    failures += mode_failures
    if mcfg is not None and not mode_failures:  # the plan of a mode that cannot be built is not checked
        plan, m = cfg.plan(), cfg.device_mesh_shape
        for check in (lambda: check_plan(plan, mcfg, m), lambda: check_batch(plan, m, (cfg.batch_size, mcfg.seq_len), mcfg.seq_len)):
            try:
                check()
            except (PlanError, ConfigError, ValueError) as e:
                failures.append(str(e))
    if failures:
        raise ConfigError(format_failures("colofn train: the run cannot start:", failures))


ZERO3_PP = (
    "--zero 3 with pp is not supported: ZeRO-3 all-gathers a unit's parameters for each use and frees them "
    "after, inside one forward and backward, but a pipeline stage uses its parameters in every microbatch's "
    "F and again in its B (or I and W), at times only the schedule knows, with up to pp microbatches in "
    "flight; it needs gather/free hooks around the runtime's actions (2-3 all-gathers of the stage per "
    "microbatch). Use --zero 1 or 2 with pp (the optimizer state, and for 2 the gradients at the update, "
    "sharded over dp and the Ulysses/ring sp or ep axis), or --zero 3 without pp"
)


def _zero_failures(cfg: TrainConfig) -> list[str]:
    """``--zero``'s own checks, for colofn's GPT and ``--hf`` models alike (each refuses its own combinations)."""
    out = []
    if cfg.zero not in (0, 1, 2, 3):
        out.append(f"--zero {cfg.zero}: the stages are 0, 1, 2, 3")
    if "dp" not in cfg.mesh_shape:
        out.append("--zero shards over the dp axis: add dp=N to --mesh")
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(cfg: TrainConfig) -> list[str]:
    """Each numeric flag on its own: type and range."""
    failures = []
    bounds = {"steps": 1, "batch_size": 1, "warmup": 0, "checkpoint_every": 0, "microbatches": 1}
    for name, low in bounds.items():
        value = getattr(cfg, name)
        if name == "microbatches" and value is None:
            continue
        if not _is_int(value) or value < low:
            failures.append(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
    if not _is_int(cfg.seed):
        failures.append(f"--seed must be an integer, got {cfg.seed!r}")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        failures.append(f"--lr must be a finite number > 0, got {cfg.lr!r}")
    return failures


def _check_paths(cfg: TrainConfig) -> list[str]:
    """``--resume`` must exist; ``--out`` must be (or become) a directory."""
    failures = []
    if cfg.resume is not None and not os.path.isdir(cfg.resume):
        failures.append(f"--resume {cfg.resume}: no such directory (give a checkpoint directory or a directory of them)")
    elif cfg.resume is not None and not checkpoint.is_complete(cfg.resume) and checkpoint.latest(cfg.resume) is None:
        failures.append(f"--resume {cfg.resume}: no complete checkpoint there (looked for step_* directories with a marker)")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        failures.append(f"--out {cfg.out} is a file: give a directory (it is created if missing)")
    return failures


def _check_backend(cfg: TrainConfig) -> list[str]:
    """``--backend env`` needs the variables torchrun sets, and a mesh of their world size."""
    if cfg.backend not in ("sim", "gloo", "env"):
        return [f"--backend {cfg.backend!r} is unknown; choose sim, gloo or env"]
    if cfg.backend != "env":
        return []
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is None or "RANK" not in os.environ:
        return ["--backend env joins the world torchrun started, but RANK and WORLD_SIZE are not set: "
                "run under torchrun, or pass --backend sim or gloo"]
    if not env_world.isdigit():
        return [f"WORLD_SIZE={env_world!r} is not a number of processes"]
    if int(env_world) != cfg.world_size:
        return [f"--mesh {cfg.mesh_shape} has {cfg.world_size} devices but torchrun started {env_world} processes: "
                f"make the mesh sizes multiply to {env_world}"]
    return []


HF_KINDS = ("llama", "gpt2")
"""The model kinds ``--hf`` builds from a size preset (``--preset tiny`` or ``small``)."""


def hf_failures(cfg: TrainConfig) -> list[str]:
    """The problems of a ``--hf`` / ``--data`` run (the model's own plan checks run in the ranks, before any communication)."""
    out: list[str] = []
    m = cfg.mesh_shape
    if cfg.data is not None and not os.path.isfile(cfg.data):
        out.append(f"--data {cfg.data}: no such file")
    elif cfg.data is not None and os.path.getsize(cfg.data) < 1024:
        out.append(f"--data {cfg.data}: {os.path.getsize(cfg.data)} bytes; give at least 1 KB of text (10% is held out)")
    if cfg.hf is None:
        return out
    if cfg.hf not in HF_KINDS and not os.path.isdir(cfg.hf):
        out.append(f"--hf {cfg.hf!r} is neither a kind ({', '.join(HF_KINDS)}) nor a directory with config.json and safetensors weights")
    if cfg.hf in HF_KINDS and cfg.preset not in ("tiny", "small"):
        out.append(f"--hf {cfg.hf} presets are tiny and small, not {cfg.preset!r}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        out.append("--hf needs transformers: pip install 'colofn[hf]'")
    if cfg.experts or "ep" in m:
        out.append("--hf models have no mixture-of-experts plan: drop --experts and ep from --mesh")
    if cfg.sp in ("ulysses", "ring") or "sp" in m:
        out.append("--hf supports --sp none or megatron (over tp), not ulysses/ring or an sp axis")
    if cfg.sp == "megatron" and "tp" not in m:
        out.append("--sp megatron splits the sequence over the tp axis: add tp=N to --mesh")
    if cfg.zero is not None:
        out += _zero_failures(cfg)
        if cfg.pp > 1 and cfg.zero == 3:
            out.append(ZERO3_PP)
    if cfg.batch_size % m.get("dp", 1):
        out.append(f"--batch-size {cfg.batch_size} is not divisible by dp={m.get('dp', 1)}")
    if cfg.pp > 1:
        from colofn.pipeline import make_schedule

        try:
            make_schedule(cfg.schedule, cfg.pp, cfg.num_microbatches)
        except Exception as e:  # noqa: BLE001 - the schedule's own message says why
            out.append(f"--schedule {cfg.schedule} with pp={cfg.pp}, {cfg.num_microbatches} microbatches: {e}")
        local = cfg.batch_size // max(1, m.get("dp", 1))
        if local % cfg.num_microbatches:
            out.append(f"--microbatches {cfg.num_microbatches} must divide each dp rank's batch ({local})")
    return out
