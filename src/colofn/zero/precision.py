"""Mixed precision: low-precision compute copies of the params, master weights in fp32.

:class:`MixedPrecision` says which dtype the forward and backward run in
(``compute_dtype``: the params copy, activations, gradients and their
reduce-scatter), and which the optimizer runs in (``master_dtype``: the master
weights and the optimizer state). A step whose gradients hold an inf or NaN
is skipped (params, master weights and optimizer state unchanged) and counted
in ``ZeroState.skipped``. With fp16 the loss is multiplied by a dynamic loss
scale before the backward pass (:class:`DynamicLossScale`, torch's
``GradScaler`` rule): halved on every skipped step, doubled after
``growth_interval`` good steps in a row.

>>> import torch
>>> MixedPrecision(torch.float16).loss_scale
DynamicLossScale(init_scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000, min_scale=1.0)
>>> MixedPrecision(torch.bfloat16).loss_scale is None  # bf16 has fp32's range: no scaling
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from colofn.errors import ConfigError, DTypeError

__all__ = ["DynamicLossScale", "MixedPrecision", "as_precision", "next_loss_scale"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class DynamicLossScale:
    """Dynamic loss scaling (``torch.amp.GradScaler``'s rule).

    Attributes:
      init_scale: the first scale.
      growth_factor: multiplies the scale after ``growth_interval`` good steps in a row.
      backoff_factor: multiplies the scale on a step with non-finite gradients (skipped).
      growth_interval: good steps between growths.
      min_scale: the scale never goes below this.
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float = 1.0

    def __post_init__(self) -> None:
        bad = []
        for name, ok in (
            ("init_scale", self.init_scale > 0),
            ("growth_factor", self.growth_factor >= 1),
            ("backoff_factor", 0 < self.backoff_factor <= 1),
            ("growth_interval", isinstance(self.growth_interval, int) and self.growth_interval >= 1),
            ("min_scale", self.min_scale > 0),
        ):
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                bad.append(f"{name}={value!r}")
        if bad:
            raise ConfigError(
                f"DynamicLossScale: out of range: {', '.join(bad)}. Fix: init_scale > 0, growth_factor >= 1, "
                "0 < backoff_factor <= 1, growth_interval an int >= 1, min_scale > 0"
            )


@dataclass(frozen=True)
class MixedPrecision:
    """Compute in ``compute_dtype``, keep master weights and optimizer state in ``master_dtype``.

    Attributes:
      compute_dtype: dtype of the params copy used by ``loss_fn``, of the
        gradients and of their communication (``torch.bfloat16`` or ``torch.float16``).
      master_dtype: dtype of the master weights and the optimizer state.
      loss_scale: ``None`` for the dtype's default (a :class:`DynamicLossScale`
        for fp16, no scaling for bf16 and wider types), a float for a static
        scale, or a :class:`DynamicLossScale`.
      cast_batch: cast the batch's floating-point leaves to ``compute_dtype``
        before ``loss_fn`` sees them (integer leaves, such as token ids, are left alone).
    """

    compute_dtype: torch.dtype = torch.bfloat16
    master_dtype: torch.dtype = torch.float32
    loss_scale: float | DynamicLossScale | None = field(default=None)
    cast_batch: bool = True

    def __post_init__(self) -> None:
        for name in ("compute_dtype", "master_dtype"):
            d = getattr(self, name)
            if d not in _FLOATS:
                raise DTypeError(
                    f"MixedPrecision: {name}={d!r} is not a floating dtype; choose one of "
                    f"{', '.join(map(str, _FLOATS))}"
                )
        if self.loss_scale is None and self.compute_dtype == torch.float16:
            object.__setattr__(self, "loss_scale", DynamicLossScale())
        ls = self.loss_scale
        if ls is not None and not isinstance(ls, DynamicLossScale):
            if isinstance(ls, bool) or not isinstance(ls, int | float) or not (math.isfinite(ls) and ls > 0):
                raise ConfigError(
                    f"MixedPrecision: loss_scale={ls!r}; pass None, a finite float > 0 or a DynamicLossScale(...)"
                )
            object.__setattr__(self, "loss_scale", float(ls))

    @property
    def initial_scale(self) -> float:
        ls = self.loss_scale
        return ls.init_scale if isinstance(ls, DynamicLossScale) else 1.0 if ls is None else float(ls)


def as_precision(precision: Any) -> MixedPrecision | None:
    """``None``, a :class:`MixedPrecision`, or a dtype (shorthand for ``MixedPrecision(dtype)``)."""
    if precision is None or isinstance(precision, MixedPrecision):
        return precision
    if isinstance(precision, torch.dtype):
        return MixedPrecision(compute_dtype=precision)
    raise ConfigError(
        f"zero.init: precision={precision!r} is not understood; pass None (compute in the params' dtype), "
        "a dtype such as torch.bfloat16, or zero.MixedPrecision(compute_dtype=..., master_dtype=..., loss_scale=...)"
    )


def next_loss_scale(policy: MixedPrecision | None, scale: float, good_steps: int, overflow: bool) -> tuple[float, int]:
    """The loss scale and good-step count after a step (``overflow``: its gradients were not finite)."""
    ls = policy.loss_scale if policy is not None else None
    if not isinstance(ls, DynamicLossScale):
        return scale, 0 if overflow else good_steps + 1
    if overflow:
        return max(scale * ls.backoff_factor, ls.min_scale), 0
    good_steps += 1
    if good_steps >= ls.growth_interval:
        return scale * ls.growth_factor, 0
    return scale, good_steps
