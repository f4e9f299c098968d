"""A chosen composition as data (the ``colofn plan --out FILE`` format), and ``colofn train --plan``.

A plan file is one JSON object: the composition (``mesh``, ``sp``, ``zero``,
``schedule``, ``microbatches``, ``recompute``; ``tp_mode`` and ``tp_depth`` for a
tp grid), what it was planned for
(``model``, ``devices``, ``global_batch``, ``cluster``) and, for the reader, what
the planner predicted (``predicted``: ignored when read back).

>>> from colofn.plan import Candidate
>>> text = plan_json(Candidate((("pp", 2), ("dp", 2)), schedule="gpipe", microbatches=4), model="tiny")
>>> print(text)
{
  "model": "tiny",
  "mesh": {
    "pp": 2,
    "dp": 2
  },
  "sp": "none",
  "zero": null,
  "schedule": "gpipe",
  "microbatches": 4,
  "recompute": "none"
}
>>> str(read_plan(text)[0])
'pp=2,dp=2 gpipe m=4'
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any, get_args

from colofn.errors import ConfigError, format_failures
from colofn.plan._candidate import AXES, Candidate, Recompute, TPMode
from colofn.plan._cluster import cluster
from colofn.plan._predict import Prediction

if TYPE_CHECKING:
    from colofn.train.config import TrainConfig

__all__ = ["plan_json", "plan_train", "read_plan"]

_COMPOSITION = ("mesh", "sp", "zero", "schedule", "microbatches", "recompute", "tp_mode", "tp_depth")
_CONTEXT = ("model", "devices", "global_batch", "cluster", "predicted")
_RUNNABLE: tuple[Recompute, ...] = ("none",)  # colofn train does not recompute activations


def plan_json(c: Candidate, *, model: str | None = None, devices: int | None = None, global_batch: int | None = None,
              cluster_name: str | None = None, prediction: Prediction | None = None) -> str:
    """The plan file of ``c`` (context fields left out when ``None``)."""
    out: dict[str, Any] = {"model": model, "devices": devices, "global_batch": global_batch, "cluster": cluster_name}
    out = {k: v for k, v in out.items() if v is not None}
    out.update(mesh=dict(c.mesh), sp=c.sp, zero=c.zero, schedule=c.schedule, microbatches=c.microbatches,
               recompute=c.recompute)
    if c.tp_mode != "1d":
        out.update(tp_mode=c.tp_mode, tp_depth=c.tp_depth)
    if prediction is not None:
        p = prediction
        out["predicted"] = {"model_states_bytes": p.model_states, "activation_bytes": p.activations,
                            "intra_bytes": p.intra_bytes, "inter_bytes": p.inter_bytes, "bubble": p.bubble,
                            "step_s": p.step_s, "mfu": p.mfu}
    return json.dumps(out, indent=2)


def read_plan(text: str, source: str = "plan") -> tuple[Candidate, dict[str, Any]]:
    """``(candidate, context)`` of a plan file; every problem is reported at once.

    Raises:
        ConfigError: not JSON, unknown fields, or fields of the wrong type.

    >>> read_plan('{"mesh": {"dp": 2, "xp": 0}, "zero": "1", "sp": "rings", "colour": 3}', "p.json")
    Traceback (most recent call last):
    ...
    colofn.errors.ConfigError: p.json is not a plan colofn can read:
      * unknown fields ['colour']; the fields are mesh, sp, zero, schedule, microbatches, recompute, tp_mode, tp_depth, model, devices, global_batch, cluster, predicted
      * mesh: axis 'xp' is not one of pp, dp, sp, tp, ep
      * mesh: axis 'xp' has size 0; sizes are ints >= 1
      * sp='rings' is not one of none, megatron, ulysses, ring
      * zero='1' is not null or an int
    Fix: write it with colofn plan --out FILE, or follow the format in docs/plan.md
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} is not a plan: a JSON object with a 'mesh' field is, not {type(data).__name__}")
    bad = []
    unknown = sorted(set(data) - set(_COMPOSITION + _CONTEXT))
    if unknown:
        bad.append(f"unknown fields {unknown}; the fields are {', '.join(_COMPOSITION + _CONTEXT)}")
    mesh = data.get("mesh")
    if not isinstance(mesh, dict) or not mesh:
        bad.append(f"mesh={mesh!r} is not an object of axis sizes such as {{\"dp\": 2, \"tp\": 2}}")
        mesh = {}
    for axis, n in mesh.items():
        if axis not in AXES:
            bad.append(f"mesh: axis {axis!r} is not one of {', '.join(AXES)}")
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            bad.append(f"mesh: axis {axis!r} has size {n!r}; sizes are ints >= 1")
    kinds = {"sp": str, "schedule": str, "microbatches": int, "recompute": str, "tp_mode": str, "tp_depth": int}
    for key, kind in kinds.items():
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            bad.append(f"{key}={data[key]!r} is not a {kind.__name__}")
    for key, options in (("sp", ("none", "megatron", "ulysses", "ring")), ("recompute", get_args(Recompute)),
                         ("tp_mode", get_args(TPMode))):
        if isinstance(data.get(key), str) and data[key] not in options:
            bad.append(f"{key}={data[key]!r} is not one of {', '.join(options)}")
    if "zero" in data and data["zero"] is not None and (not isinstance(data["zero"], int) or isinstance(data["zero"], bool)):
        bad.append(f"zero={data['zero']!r} is not null or an int")
    if bad:
        raise ConfigError(format_failures(f"{source} is not a plan colofn can read:", bad,
                                          fix="write it with colofn plan --out FILE, or follow the format in docs/plan.md"))
    fields = {k: data[k] for k in _COMPOSITION[1:] if k in data}
    c = Candidate(tuple(mesh.items()), **fields)
    return c, {k: data[k] for k in _CONTEXT if k in data}


def _auto(cfg: TrainConfig) -> tuple[Candidate, str]:
    from colofn.plan._model import from_gpt
    from colofn.plan._search import search

    devices = cfg.world_size
    cl = cluster("cpu-local", devices)
    m = from_gpt(cfg.model_config(), cfg.preset)
    ranked, refused = search(m, cl, devices=devices, global_batch=cfg.batch_size, recompute=_RUNNABLE)
    if not ranked:
        raise ConfigError(f"--plan auto: no composition of {cfg.preset} fits {devices} x {cl.name}: "
                          f"{refused[0].candidate}: {refused[0].reason}")
    from colofn.plan.cli import explain

    best = ranked[0]
    why = (f"--plan auto: planned {cfg.preset} on {devices} devices (the size of --mesh) of cluster {cl.name}, "
           f"global batch {cfg.batch_size}: {len(ranked)} compositions fit, {len(refused)} do not.\n"
           + explain(best, ranked[1] if len(ranked) > 1 else None, cl))
    return best.candidate, why


def plan_train(spec: str, cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """``cfg`` with the composition of ``--plan spec`` (``auto`` or a plan file), and what to tell the user.

    ``auto`` runs the planner for ``cfg.world_size`` devices of cluster
    ``cpu-local`` and the global batch ``cfg.batch_size``, over what
    ``colofn train`` runs (no recompute; with ``--experts``, ``pp x dp x ep``). The mesh, ``--sp``, ``--zero``,
    ``--schedule`` and ``--microbatches`` come from the plan; the result is
    validated as any flags are (:func:`colofn.train.config.validate`).

    Raises:
        ConfigError: a plan file that cannot be read, was made for another
            model, or asks for what ``colofn train`` does not run.
    """
    if cfg.hf is not None:
        raise ConfigError("--plan plans colofn's GPT presets: drop --hf, or drop --plan")
    if spec == "auto":
        c, why = _auto(cfg)
    else:
        try:
            with open(spec, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"--plan {spec!r} is neither 'auto' nor a readable plan file ({e.strerror})") from None
        c, context = read_plan(text, spec)
        bad = []
        if context.get("model", cfg.preset) != cfg.preset:
            bad.append(f"it was planned for model {context['model']!r}, not --preset {cfg.preset!r}: "
                       f"pass --preset {context['model']}, or plan again with --model {cfg.preset}")
        if c.recompute not in _RUNNABLE:
            bad.append(f"recompute={c.recompute!r}: colofn train does not recompute activations "
                       "(plan again with colofn plan --recompute none)")
        if bad:
            raise ConfigError(format_failures(f"--plan {spec} cannot run:", bad))
        why = f"--plan {spec}: {c}"
    pp = c.size("pp") > 1
    new = dataclasses.replace(cfg, mesh=c.mesh, sp=c.sp, zero=c.zero, schedule=c.schedule if pp else "1f1b",
                              microbatches=c.microbatches if pp else None, tp_mode=c.tp_mode, tp_depth=c.tp_depth)
    return new, why + f"\nRunning --mesh {','.join(f'{a}={n}' for a, n in c.mesh)}" + _flags(c)


def _flags(c: Candidate) -> str:
    out = ""
    if c.sp != "none":
        out += f" --sp {c.sp}"
    if c.zero is not None:
        out += f" --zero {c.zero}"
    if c.tp_mode != "1d":
        out += f" --tp-mode {c.tp_mode}" + (f" --tp-depth {c.tp_depth}" if c.tp_mode == "2.5d" else "")
    if c.size("pp") > 1:
        out += f" --schedule {c.schedule} --microbatches {c.microbatches}"
    return out + "."
