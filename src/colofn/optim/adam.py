"""Adam and AdamW, as ``torch.optim.Adam`` and ``torch.optim.AdamW`` compute them."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from colofn import tree as ctree
from colofn.optim import _checks
from colofn.optim._foreach import Tensors, groups, run_grouped
from colofn.optim.base import (
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Updates,
    register_in_place,
)

__all__ = ["AdamState", "adam", "adamw"]


class AdamState(NamedTuple):
    """The state of :func:`adam` and :func:`adamw` (the two share it).

    Attributes:
        count: a 0-d ``int32`` tensor on the CPU, the number of updates taken
            (``torch.optim``'s ``step``).
        mu: the first moments (``exp_avg``), a pytree of tensors shaped like the params.
        nu: the second moments (``exp_avg_sq``), a pytree of tensors shaped like the params.
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Params
    nu: Params


def adam(
    lr: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """``torch.optim.Adam(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)``.

    The weight decay is an L2 penalty added to the gradient (``g + weight_decay * p``)
    before the moments are updated; see :func:`adamw` for decoupled decay.

    Args:
        lr: the learning rate, a float >= 0 or a schedule (step -> lr).
        b1: decay rate of the first moment, in [0, 1).
        b2: decay rate of the second moment, in [0, 1).
        eps: added to the denominator, > 0.
        weight_decay: L2 penalty, >= 0 (needs the params in ``update``).

    Returns:
        A :class:`~colofn.optim.GradientTransformation` whose state is an
        :class:`AdamState`.

    Raises:
        OptimizerError: a hyperparameter out of range (each one is named).

    >>> import torch
    >>> from colofn import optim
    >>> opt = optim.adam(0.1)
    >>> params = [torch.tensor([1.0, -2.0])]
    >>> updates, state = opt.update([torch.tensor([3.0, -0.5])], opt.init(params), params)
    >>> updates  # the first Adam step is -lr * sign(g)
    [tensor([-0.1000,  0.1000])]
    """
    return _make("adam", lr, b1, b2, eps, weight_decay, decoupled=False)


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> GradientTransformation:
    """``torch.optim.AdamW(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)``.

    The weight decay is decoupled: the update is Adam's plus ``-lr * weight_decay * p``
    (torch multiplies the param by ``1 - lr * weight_decay`` before the Adam step).

    Args:
        lr: the learning rate, a float >= 0 or a schedule (step -> lr).
        b1: decay rate of the first moment, in [0, 1).
        b2: decay rate of the second moment, in [0, 1).
        eps: added to the denominator, > 0.
        weight_decay: decoupled decay rate, >= 0 (needs the params in ``update``).

    Returns:
        A :class:`~colofn.optim.GradientTransformation` whose state is an
        :class:`AdamState`.

    Raises:
        OptimizerError: a hyperparameter out of range (each one is named).

    >>> import torch
    >>> from colofn import optim
    >>> opt = optim.adamw(0.1, weight_decay=0.5)
    >>> params = [torch.tensor([1.0, -2.0])]
    >>> updates, state = opt.update([torch.tensor([3.0, -0.5])], opt.init(params), params)
    >>> updates  # -lr * sign(g) - lr * weight_decay * p
    [tensor([-0.1500,  0.2000])]
    """
    return _make("adamw", lr, b1, b2, eps, weight_decay, decoupled=True)


def _make(
    name: str,
    lr: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    *,
    decoupled: bool,
) -> GradientTransformation:
    _checks.check_lr(name, lr)
    _checks.check_hparams(
        name,
        [
            ("b1", b1, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("b2", b2, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("eps", eps, lambda v: v > 0, "finite and > 0"),
            ("weight_decay", weight_decay, lambda v: v >= 0, "finite and >= 0"),
        ],
    )
    where = f"{name} update"

    def init(params: Params) -> AdamState:
        _checks.check_tensors(f"{name} init", params, "params")
        with torch.no_grad():
            mu = ctree.map(
                lambda p: torch.zeros_like(p, memory_format=torch.preserve_format), params
            )
            nu = ctree.map(
                lambda p: torch.zeros_like(p, memory_format=torch.preserve_format), params
            )
        return AdamState(count=torch.zeros((), dtype=torch.int32), mu=mu, nu=nu)

    def prepare(grads: Updates, state: OptState, params: Params | None, kernel: Any, in_place: bool = False) -> tuple[Any, Any, list[list[torch.Tensor]]]:
        _checks.check_state(where, state, AdamState)
        step = _checks.step_of(where, state.count)
        needs_params = "update_in_place" if in_place else f"weight_decay={weight_decay!r}" if weight_decay else None
        fast = _checks.aligned_leaves(grads, state.mu, state.nu, *((params,) if params is not None else ()))
        if fast is not None and (params is not None or needs_params is None):  # one flatten per tree
            treedef, (g, mu, nu, *rest) = fast
            p = rest[0] if rest and needs_params is not None else None
        else:  # the detailed checks: they name the path, the shapes and the fix
            _checks.check_same_tree(where, state.nu, "state.nu", state.mu, "state.mu")
            treedef, g, p = _checks.leaves_for_update(where, grads, params, state.mu, needs_params)
            mu, nu = ctree.leaves(state.mu), ctree.leaves(state.nu)
        math = functools.partial(
            kernel,
            lr=_checks.lr_at(where, lr, step),
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled=decoupled,
            step=step + 1,
        )
        return treedef, math, [g, mu, nu, p if p is not None else g]

    @torch.no_grad()
    def update(
        grads: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, AdamState]:
        treedef, math, lists = prepare(grads, state, params, _adam_math)
        updates, mu, nu = run_grouped(math, lists, 3)
        new_state = AdamState(
            state.count + 1, ctree.unflatten(treedef, mu), ctree.unflatten(treedef, nu)
        )
        return ctree.unflatten(treedef, updates), new_state

    @torch.no_grad()
    def update_in_place(grads: Updates, state: OptState, params: Params) -> AdamState | None:
        """``torch.optim``'s step on ``params`` and the moments, its kernels in its order; None where it cannot run."""
        if not isinstance(state, AdamState):
            return None  # the functional path raises the detailed error
        _, math, lists = prepare(grads, state, params, functools.partial(_adam_math, in_place=True), in_place=True)
        if not _in_place_ok(lists[3], lists[1], lists[2]) or any(a is not b for a, b in zip(lists[3], ctree.leaves(params), strict=True)):
            return None  # not plain tensors alike, shared storage, or a param cast to the state's dtype (a copy)
        for _, group in groups(lists):
            math(*group)
        return AdamState(state.count + 1, state.mu, state.nu)

    register_in_place(update, update_in_place)
    return GradientTransformation(init, update)


def _adam_math(
    g: Tensors,
    mu: Tensors,
    nu: Tensors,
    p: Tensors,
    *,
    lr: float,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    step: int,
    in_place: bool = False,
) -> tuple[Tensors, Tensors, Tensors]:
    """``_multi_tensor_adam``'s formulas (capturable=False) for one device/dtype group.

    ``step`` counts this update (1 at the first). Returns ``(updates, mu, nu)``;
    no input is modified (``p`` is used only for the weight decay). With
    ``in_place``: ``torch.optim``'s kernels in its order, writing ``p``, ``mu``
    and ``nu`` (bit-equal to ``torch.optim.Adam``/``AdamW.step()``), and
    ``updates`` is ``p`` itself; the functional form (an update tree, rounded
    once more before it is added) agrees with it to float rounding.
    """
    if weight_decay and decoupled and in_place:
        torch._foreach_mul_(p, 1 - lr * weight_decay)
    elif weight_decay and not decoupled:
        g = torch._foreach_add(g, p, alpha=weight_decay)
    if in_place:
        torch._foreach_lerp_(mu, g, 1 - b1)
        torch._foreach_mul_(nu, b2)
    else:
        mu = torch._foreach_lerp(mu, g, 1 - b1)
        nu = torch._foreach_mul(nu, b2)
    torch._foreach_addcmul_(nu, g, g, 1 - b2)
    bias_correction1 = 1 - b1**step
    bias_correction2 = 1 - b2**step
    step_size = (lr / bias_correction1) * -1
    denom = torch._foreach_sqrt(nu)
    torch._foreach_div_(denom, bias_correction2**0.5)
    torch._foreach_add_(denom, eps)
    if in_place:  # torch: p.addcdiv_(mu, denom, value=step_size)
        torch._foreach_addcdiv_(p, mu, denom, step_size)
        return p, mu, nu
    updates = torch._foreach_mul(mu, step_size)  # p + step_size * mu / denom, as an update
    torch._foreach_div_(updates, denom)
    if weight_decay and decoupled:
        torch._foreach_add_(updates, p, alpha=-lr * weight_decay)
    return updates, mu, nu


def _in_place_ok(ps: list[torch.Tensor], mus: list[torch.Tensor], nus: list[torch.Tensor]) -> bool:
    """Plain tensors whose moments share their dtype and device, no two sharing storage (each written once)."""
    for p, m, n in zip(ps, mus, nus, strict=True):
        if not (type(p) is type(m) is type(n) is torch.Tensor):
            return False
        if not (p.dtype == m.dtype == n.dtype and p.device == m.device == n.device) or (p.requires_grad and not p.is_leaf):
            return False
    ptrs = {t.untyped_storage().data_ptr() for t in (*ps, *mus, *nus)}
    return len(ptrs) == 3 * len(ps)
