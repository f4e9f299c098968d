"""Stochastic gradient descent with momentum, as ``torch.optim.SGD`` computes it."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from colofn import tree as ctree
from colofn.errors import OptimizerError, OptimizerTypeError
from colofn.optim import _checks
from colofn.optim._foreach import Tensors, run_grouped
from colofn.optim.base import GradientTransformation, OptState, Params, ScalarOrSchedule, Updates

__all__ = ["SgdState", "sgd"]


class SgdState(NamedTuple):
    """The state of :func:`sgd`.

    Attributes:
        count: a 0-d ``int32`` tensor on the CPU, the number of updates taken.
        momentum: ``torch.optim.SGD``'s ``momentum_buffer`` for every param, a
            pytree of tensors shaped like the params; ``None`` (no leaves) when
            ``momentum == 0``.
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    momentum: Params | None


def sgd(
    lr: ScalarOrSchedule,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """``torch.optim.SGD(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)``.

    Per leaf, with ``g`` the gradient and ``b`` the momentum buffer (zero at first)::

        g = g + weight_decay * p
        b = momentum * b + g
        g = g + momentum * b  if nesterov else  b
        update = -lr * g

    Args:
        lr: the learning rate, a float >= 0 or a schedule (step -> lr).
        momentum: the momentum factor, >= 0; 0 keeps no buffers.
        nesterov: use Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 penalty added to the gradient, >= 0 (needs the params
            in ``update``).

    Returns:
        A :class:`~colofn.optim.GradientTransformation` whose state is an
        :class:`SgdState`.

    Raises:
        OptimizerError: a hyperparameter out of range (each one is named).

    >>> import torch
    >>> from colofn import optim
    >>> opt = optim.sgd(0.1, momentum=0.9)
    >>> params = {"w": torch.zeros(2)}
    >>> state = opt.init(params)
    >>> for _ in range(2):
    ...     updates, state = opt.update({"w": torch.ones(2)}, state, params)
    ...     params = optim.apply_updates(params, updates)
    >>> params["w"], state.count
    (tensor([-0.2900, -0.2900]), tensor(2, dtype=torch.int32))
    """
    _checks.check_lr("sgd", lr)
    _checks.check_hparams(
        "sgd",
        [
            ("momentum", momentum, lambda v: v >= 0, "finite and >= 0"),
            ("weight_decay", weight_decay, lambda v: v >= 0, "finite and >= 0"),
        ],
    )
    if nesterov and momentum <= 0:
        raise OptimizerError(
            f"sgd: nesterov=True needs momentum > 0, got momentum={momentum!r}.\n"
            "Fix: pass momentum=0.9 (for example), or nesterov=False."
        )

    def init(params: Params) -> SgdState:
        _checks.check_tensors("sgd init", params, "params")
        with torch.no_grad():
            bufs = (
                ctree.map(
                    lambda p: torch.zeros_like(p, memory_format=torch.preserve_format), params
                )
                if momentum
                else None
            )
        return SgdState(count=torch.zeros((), dtype=torch.int32), momentum=bufs)

    @torch.no_grad()
    def update(
        grads: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, SgdState]:
        _checks.check_state("sgd update", state, SgdState)
        if (state.momentum is None) == bool(momentum):
            raise OptimizerTypeError(
                f"sgd update: this sgd has momentum={momentum!r} but the state was made by an sgd "
                f"{'without' if momentum else 'with'} momentum (state.momentum is "
                f"{'None' if state.momentum is None else 'a tree of buffers'}).\n"
                "Fix: pass the state returned by this optimizer's init (opt.init(params))."
            )
        step = _checks.step_of("sgd update", state.count)
        treedef, g, p = _checks.leaves_for_update(
            "sgd update",
            grads,
            params,
            state.momentum if momentum else None,
            f"weight_decay={weight_decay!r}" if weight_decay else None,
        )
        math = functools.partial(
            _sgd_math,
            lr=_checks.lr_at("sgd update", lr, step),
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
        )
        # Lists the math does not use are stand-ins (g), so every group has three.
        bufs = ctree.leaves(state.momentum) if momentum else g
        updates, bufs = run_grouped(math, [g, p if p is not None else g, bufs], 2)
        new_momentum = ctree.unflatten(treedef, bufs) if momentum else None
        return ctree.unflatten(treedef, updates), SgdState(state.count + 1, new_momentum)

    return GradientTransformation(init, update)


def _sgd_math(
    g: Tensors,
    p: Tensors,
    bufs: Tensors,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
) -> tuple[Tensors, Tensors]:
    """``_multi_tensor_sgd``'s formulas (dampening 0) for one device/dtype group.

    Returns ``(updates, new momentum buffers)``; no input is modified.
    """
    if weight_decay:
        g = torch._foreach_add(g, p, alpha=weight_decay)
    if momentum:
        bufs = torch._foreach_mul(bufs, momentum)
        torch._foreach_add_(bufs, g, alpha=1.0)
        g = torch._foreach_add(g, bufs, alpha=momentum) if nesterov else bufs
    return torch._foreach_mul(g, -lr), bufs
