"""Find schedules by name, or load a user's schedule function by ``"module:function"``.

A schedule function takes ``(num_ranks, num_microbatches)`` and, if it supports
several stages per rank, a keyword ``chunks``; it returns a
:class:`~colofn.pipeline.Schedule`.

>>> sorted(SCHEDULES)
['1f1b', 'dualpipev', 'gpipe', 'interleaved_1f1b', 'zb_h1', 'zb_h2', 'zbv']
>>> make_schedule("colofn.pipeline.schedules:gpipe", 2, 4).name
'gpipe'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from colofn.errors import ScheduleError
from colofn.pipeline.ir import Schedule
from colofn.pipeline.schedules import gpipe, interleaved_1f1b, one_f_one_b
from colofn.pipeline.zero_bubble import dualpipev, zb_h1, zb_h2, zbv

__all__ = ["SCHEDULES", "ScheduleFn", "get_schedule", "make_schedule"]


ScheduleFn = Callable[..., Schedule]
"""``fn(num_ranks, num_microbatches, *, chunks=...) -> Schedule``."""

SCHEDULES: dict[str, ScheduleFn] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
    "zb_h1": zb_h1,
    "zb_h2": zb_h2,
    "zbv": zbv,
    "dualpipev": dualpipev,
}


def get_schedule(name: str) -> ScheduleFn:
    """The schedule function called ``name``, or the function ``"module:function"``.

    Built-in names are matched ignoring case and ``-``/``_``. A ``"module:function"``
    is imported (the module must be importable, e.g. on ``sys.path``).

    >>> get_schedule("ZB-H1").__name__
    'zb_h1'
    >>> get_schedule("pipedream")
    Traceback (most recent call last):
    ...
    colofn.errors.ScheduleError: Unknown pipeline schedule 'pipedream'. Built in: 1f1b, dualpipev, gpipe, interleaved_1f1b, zb_h1, zb_h2, zbv; or give your own as 'module:function'.
    """
    if not isinstance(name, str):
        raise ScheduleError(f"A schedule name must be a str, got {type(name).__name__}.")
    key = name.strip().lower().replace("-", "_")
    if key in SCHEDULES:
        return SCHEDULES[key]
    if ":" not in name:
        raise ScheduleError(
            f"Unknown pipeline schedule {name!r}. Built in: {', '.join(sorted(SCHEDULES))}; "
            "or give your own as 'module:function'."
        )
    module_name, _, attr = name.strip().partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ScheduleError(
            f"Cannot load schedule {name!r}: importing module {module_name!r} failed ({e}). "
            "Is it on sys.path (run from its directory, or pip install it)?"
        ) from None
    fn = module
    for part in attr.split("."):
        if not part or not hasattr(fn, part):
            raise ScheduleError(
                f"Cannot load schedule {name!r}: module {module_name!r} has no {attr!r}."
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise ScheduleError(
            f"Cannot load schedule {name!r}: {attr!r} is a {type(fn).__name__}, not a function."
        )
    return fn


def make_schedule(
    name_or_fn: str | ScheduleFn,
    num_ranks: int,
    num_microbatches: int,
    *,
    chunks: int | None = None,
) -> Schedule:
    """Call a schedule function (or the one :func:`get_schedule` finds) and check its result.

    ``chunks`` is passed only when given, so user functions without it work.
    """
    fn = get_schedule(name_or_fn) if isinstance(name_or_fn, str) else name_or_fn
    kwargs = {} if chunks is None else {"chunks": chunks}
    schedule = fn(num_ranks, num_microbatches, **kwargs)
    if not isinstance(schedule, Schedule):
        label = name_or_fn if isinstance(name_or_fn, str) else getattr(fn, "__name__", fn)
        raise ScheduleError(
            f"Schedule function {label!r} returned {type(schedule).__name__}, expected a "
            "colofn.pipeline.Schedule."
        )
    return schedule
