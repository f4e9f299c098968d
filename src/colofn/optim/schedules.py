"""Learning-rate schedules: pure functions ``step -> value``.

``step`` is the number of updates taken before this one (0 at the first), so a
schedule ``s`` passed as ``lr`` gives the same learning rates as
``torch.optim.lr_scheduler.LambdaLR(opt, lambda t: s(t) / base_lr)`` stepped once
after every ``opt.step()``. Every optimizer's ``lr`` takes a float or a schedule.

>>> s = warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=6)
>>> [round(s(t), 3) for t in range(8)]
[0.0, 0.5, 1.0, 0.854, 0.5, 0.146, 0.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from colofn.errors import OptimizerError
from colofn.optim import _checks
from colofn.optim.base import Schedule

__all__ = [
    "constant_schedule",
    "cosine_decay_schedule",
    "join_schedules",
    "linear_schedule",
    "linear_warmup",
    "piecewise_constant_schedule",
    "warmup_cosine_decay_schedule",
    "warmup_linear_decay_schedule",
]


def _named(fn: Schedule, text: str) -> Schedule:
    fn.__name__ = fn.__qualname__ = text  # type: ignore[attr-defined]
    return fn


def _check(fn: str, values: dict[str, Any], steps: dict[str, Any]) -> None:
    checks: list[_checks.Check] = [(k, v, lambda v: True, "finite") for k, v in values.items()]
    checks += [
        (k, v, lambda v: v >= 0 and v == int(v), "an integer >= 0") for k, v in steps.items()
    ]
    _checks.check_hparams(fn, checks, fix="pass finite values, and step counts as integers >= 0")


def _args(**kw: Any) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items())


def constant_schedule(value: float) -> Schedule:
    """``value`` at every step.

    >>> constant_schedule(0.1)(1000)
    0.1
    """
    _check("constant_schedule", {"value": value}, {})
    value = float(value)
    return _named(lambda step: value, f"constant_schedule({value!r})")


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """``init_value`` until ``transition_begin``, then linear to ``end_value`` over
    ``transition_steps`` steps, then ``end_value``.

    >>> s = linear_schedule(1.0, 0.0, transition_steps=4)
    >>> [s(t) for t in range(6)]
    [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    _check(
        "linear_schedule",
        {"init_value": init_value, "end_value": end_value},
        {"transition_steps": transition_steps, "transition_begin": transition_begin},
    )
    a, b, n, t0 = float(init_value), float(end_value), int(transition_steps), int(transition_begin)

    def schedule(step: int) -> float:
        if n == 0:
            return a if int(step) < t0 else b
        frac = min(max(int(step) - t0, 0), n) / n
        return a + (b - a) * frac

    return _named(
        schedule,
        f"linear_schedule({_args(init_value=a, end_value=b, transition_steps=n, transition_begin=t0)})",
    )


def linear_warmup(peak_value: float, warmup_steps: int, init_value: float = 0.0) -> Schedule:
    """Linear from ``init_value`` to ``peak_value`` over ``warmup_steps``, then ``peak_value``.

    >>> s = linear_warmup(1.0, warmup_steps=4)
    >>> [s(t) for t in range(6)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    _check(
        "linear_warmup",
        {"peak_value": peak_value, "init_value": init_value},
        {"warmup_steps": warmup_steps},
    )
    s = linear_schedule(init_value, peak_value, warmup_steps)
    return _named(
        s,
        f"linear_warmup({_args(peak_value=peak_value, warmup_steps=warmup_steps, init_value=init_value)})",
    )


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps``
    (SGDR without restarts), then constant.

    >>> s = cosine_decay_schedule(1.0, decay_steps=4)
    >>> [round(s(t), 4) for t in range(6)]
    [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
    """
    _check(
        "cosine_decay_schedule",
        {"init_value": init_value, "alpha": alpha},
        {"decay_steps": decay_steps},
    )
    if decay_steps <= 0:
        raise OptimizerError(
            f"cosine_decay_schedule: decay_steps={decay_steps!r} must be > 0.\n"
            "Fix: pass the number of steps over which to decay, such as the total training steps."
        )
    v, n, al = float(init_value), int(decay_steps), float(alpha)

    def schedule(step: int) -> float:
        frac = min(max(int(step), 0), n) / n
        return v * ((1 - al) * 0.5 * (1 + math.cos(math.pi * frac)) + al)

    return _named(
        schedule, f"cosine_decay_schedule({_args(init_value=v, decay_steps=n, alpha=al)})"
    )


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine
    decay to ``end_value``, reached at step ``decay_steps`` (which counts the warmup, as in optax).

    >>> s = warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=1, decay_steps=3, end_value=0.5)
    >>> [s(t) for t in range(4)]
    [0.0, 1.0, 0.75, 0.5]
    """
    return _warmup_then(
        "warmup_cosine_decay_schedule",
        init_value,
        peak_value,
        warmup_steps,
        decay_steps,
        end_value,
        _cos,
    )


def warmup_linear_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then linear
    decay to ``end_value``, reached at step ``decay_steps`` (which counts the warmup).

    >>> s = warmup_linear_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=4)
    >>> [s(t) for t in range(6)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    return _warmup_then(
        "warmup_linear_decay_schedule",
        init_value,
        peak_value,
        warmup_steps,
        decay_steps,
        end_value,
        _lin,
    )


def _cos(frac: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * frac))


def _lin(frac: float) -> float:
    return 1 - frac


def _warmup_then(
    fn: str,
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float,
    shape: Any,
) -> Schedule:
    _check(
        fn,
        {"init_value": init_value, "peak_value": peak_value, "end_value": end_value},
        {"warmup_steps": warmup_steps, "decay_steps": decay_steps},
    )
    if decay_steps <= warmup_steps:
        raise OptimizerError(
            f"{fn}: decay_steps={decay_steps!r} must be > warmup_steps={warmup_steps!r} "
            "(decay_steps counts the warmup steps too).\n"
            "Fix: pass the total number of training steps as decay_steps."
        )
    a, peak, end = float(init_value), float(peak_value), float(end_value)
    w, n = int(warmup_steps), int(decay_steps)

    def schedule(step: int) -> float:
        step = max(int(step), 0)
        if step < w:
            return a + (peak - a) * step / w
        frac = min(step - w, n - w) / (n - w)
        return end + (peak - end) * shape(frac)

    return _named(
        schedule,
        f"{fn}({_args(init_value=a, peak_value=peak, warmup_steps=w, decay_steps=n, end_value=end)})",
    )


def piecewise_constant_schedule(
    init_value: float, boundaries_and_scales: dict[int, float]
) -> Schedule:
    """``init_value``, multiplied by ``scale`` from each step ``boundary`` on
    (``torch.optim.lr_scheduler.MultiStepLR`` with per-milestone factors).

    >>> s = piecewise_constant_schedule(1.0, {2: 0.5, 4: 0.1})
    >>> [s(t) for t in range(6)]
    [1.0, 1.0, 0.5, 0.5, 0.05, 0.05]
    """
    steps = {f"boundary {b!r}": b for b in boundaries_and_scales}
    scales = {f"scale at {b!r}": s for b, s in boundaries_and_scales.items()}
    _check("piecewise_constant_schedule", {"init_value": init_value, **scales}, steps)
    items = sorted((int(b), float(s)) for b, s in boundaries_and_scales.items())
    v = float(init_value)

    def schedule(step: int) -> float:
        out = v
        for b, s in items:
            if int(step) >= b:
                out *= s
        return out

    return _named(schedule, f"piecewise_constant_schedule({v!r}, {dict(items)!r})")


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``schedules[i]`` from ``boundaries[i - 1]`` on, each called with the steps since its start.

    >>> s = join_schedules([constant_schedule(1.0), linear_schedule(1.0, 0.0, 2)], [3])
    >>> [s(t) for t in range(6)]
    [1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    """
    if len(boundaries) != len(schedules) - 1 or not all(callable(s) for s in schedules):
        raise OptimizerError(
            f"join_schedules: got {len(schedules)} schedules and {len(boundaries)} boundaries.\n"
            "Fix: pass callables step -> value and one boundary fewer than schedules."
        )
    _check("join_schedules", {}, {f"boundaries[{i}]": b for i, b in enumerate(boundaries)})
    if list(boundaries) != sorted(boundaries):
        raise OptimizerError(
            f"join_schedules: boundaries={list(boundaries)!r} must be increasing.\nFix: sort them."
        )
    starts = [0, *(int(b) for b in boundaries)]

    def schedule(step: int) -> float:
        step = int(step)
        i = max(i for i, b in enumerate(starts) if step >= b or i == 0)
        return schedules[i](step - starts[i])

    return _named(
        schedule, f"join_schedules({len(schedules)} schedules, boundaries={list(boundaries)!r})"
    )
