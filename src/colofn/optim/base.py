"""The optimizer interface: ``GradientTransformation(init, update)`` and ``apply_updates``.

An optimizer is a pair of pure functions over pytrees of tensors (optax's
design):

* ``init(params) -> state``: the optimizer state, a ``NamedTuple`` whose leaves
  are tensors (a 0-d ``count`` and buffers shaped like the params);
* ``update(grads, state, params=None) -> (updates, new_state)``: the updates to
  add to the params, and the next state. Neither argument is modified.

>>> import torch
>>> from colofn import optim
>>> params = {"w": torch.ones(2)}
>>> opt = optim.sgd(0.5)
>>> state = opt.init(params)
>>> updates, state = opt.update({"w": torch.ones(2)}, state, params)
>>> optim.apply_updates(params, updates)
{'w': tensor([0.5000, 0.5000])}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from colofn import tree as ctree
from colofn.optim import _checks
from colofn.optim._foreach import rewrap, same_layout_locals

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "OptState",
    "Params",
    "Schedule",
    "ScalarOrSchedule",
    "TransformInitFn",
    "TransformUpdateFn",
    "Updates",
    "apply_updates",
    "register_in_place",
    "update_in_place",
]

Params = Any
"""A pytree of tensors."""
Updates = Any
"""A pytree of tensors with the structure of the params (gradients or updates)."""
OptState = Any
"""An optimizer state: a pytree (a ``NamedTuple`` or a tuple of them) whose leaves are tensors."""
Schedule = Callable[[int], float]
"""A learning-rate schedule: the number of steps taken so far -> the value for this step."""
ScalarOrSchedule = float | Schedule


class TransformInitFn(Protocol):
    """``init(params) -> state``."""

    def __call__(self, params: Params, /) -> OptState: ...


class TransformUpdateFn(Protocol):
    """``update(grads, state, params=None) -> (updates, new_state)``."""

    def __call__(
        self, grads: Updates, state: OptState, params: Params | None = None, /
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A gradient transformation: ``init(params) -> state`` and
    ``update(grads, state, params=None) -> (updates, new_state)``, both pure.

    Build them with :func:`~colofn.optim.sgd`, :func:`~colofn.optim.adamw`, ...,
    and combine them with :func:`~colofn.optim.chain`.
    """

    init: TransformInitFn
    update: TransformUpdateFn


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none (``clip_by_global_norm``)."""


@torch.no_grad()
def apply_updates(params: Params, updates: Updates) -> Params:
    """Return ``params + updates``, leaf by leaf, as new tensors.

    Each result keeps its param's dtype (the sum is taken in the promoted dtype,
    then cast back, so fp32 updates apply to bf16 params), its device (updates on
    another device, such as CPU-offloaded ones, are moved first) and its
    ``requires_grad`` flag, so the result can be differentiated again. Runs
    under ``torch.no_grad``; nothing is modified in place.

    Args:
        params: a pytree of tensors.
        updates: a pytree of tensors with the same structure and shapes.

    Raises:
        TreeError: the trees differ (each differing path is named).
        TreeTypeError: a leaf is not a tensor.
        ShapeError: an update's shape differs from its param's.

    >>> import torch
    >>> p = {"w": torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)}
    >>> out = apply_updates(p, {"w": torch.tensor([0.5, -1.0])})
    >>> out["w"], out["w"].requires_grad
    (tensor([ 0.5000, -1.0000], dtype=torch.bfloat16, requires_grad=True), True)
    """
    _checks.check_tensors("apply_updates", updates, "updates")
    _checks.check_tensors("apply_updates", params, "params")
    _checks.check_same_tree("apply_updates", updates, "updates", params, "params")

    def add(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if u.device != p.device and not _checks.is_dtensor(u) and not _checks.is_dtensor(p):
            u = u.to(p.device, non_blocking=True)
        blocks = same_layout_locals((p, u)) if _checks.is_dtensor(p) else None
        if blocks is not None:  # DTensors laid out alike: add the blocks (no sharding propagation)
            total = blocks[0] + blocks[1]
            out = rewrap(total if total.dtype == p.dtype else total.to(p.dtype), p)
            return out.requires_grad_(p.requires_grad) if out.is_floating_point() else out
        out = p + u
        if out.dtype != p.dtype:
            out = out.to(p.dtype)
        return out.requires_grad_(p.requires_grad) if out.is_floating_point() else out

    p_leaves, treedef = ctree.flatten(params)
    u_leaves = ctree.leaves(updates)
    if all(type(p) is torch.Tensor and type(u) is torch.Tensor and p.dtype == u.dtype and p.device == u.device
           for p, u in zip(p_leaves, u_leaves, strict=True)):  # the common case: one foreach add, the same sums
        out = torch._foreach_add(p_leaves, u_leaves)
        for o, p in zip(out, p_leaves, strict=True):
            if p.requires_grad:
                o.requires_grad_()
        return ctree.unflatten(treedef, out)
    return ctree.map(add, params, updates)


_IN_PLACE: dict[Any, Callable[..., Any]] = {}  # an update function -> its in-place twin


def register_in_place(update: TransformUpdateFn, in_place: Callable[[Updates, OptState, Params], OptState | None]) -> None:
    """Declare ``in_place(grads, state, params) -> new_state | None`` the in-place twin of ``update``.

    The twin writes the step into ``params`` (and may reuse the state's buffers)
    and returns the state ``update`` would; its params may differ from
    ``apply_updates(params, update(...)[0])`` by float rounding only (the twin
    of :func:`~colofn.optim.adamw` runs ``torch.optim.AdamW``'s in-place kernels,
    which an update tree cannot reproduce bit for bit). It returns None where it
    cannot run (for example on DTensors), and :func:`update_in_place` then takes
    the functional path.
    """
    _IN_PLACE[update] = in_place


def update_in_place(opt: GradientTransformation, grads: Updates, state: OptState, params: Params) -> OptState:
    """One optimizer step written into ``params``: ``torch.optim``'s ``step()`` for a pure optimizer.

    For a trainer that owns its parameters and state between steps. For
    :func:`~colofn.optim.adam` and :func:`~colofn.optim.adamw` on plain tensors
    (no DTensor, no two leaves sharing storage) it runs ``torch.optim``'s own
    in-place kernels in their order: params and moments end bit-equal to
    ``torch.optim.Adam``/``AdamW.step()``, no update tree is allocated, and the
    ``state`` passed in is consumed (its buffers belong to the returned state).
    ``opt.update`` + :func:`apply_updates` agree with it to float rounding (a
    returned update has to be rounded once more before it is added). Other
    optimizers (a :func:`chain`, DTensor params) take that functional path and
    copy the result into ``params``.

    Args:
        opt: the optimizer.
        grads: the gradients, a pytree like ``params``.
        state: ``opt``'s state for ``params``; do not use it after this call.
        params: a pytree of tensors, written in place (under ``torch.no_grad``).

    Returns:
        The next optimizer state.

    >>> import torch
    >>> from colofn import optim
    >>> w = torch.tensor([1.0, -2.0])
    >>> twin = torch.nn.Parameter(w.clone())
    >>> torch_opt = torch.optim.AdamW([twin], lr=0.1, weight_decay=0.5)
    >>> opt = optim.adamw(0.1, weight_decay=0.5)
    >>> state = optim.update_in_place(opt, [torch.tensor([3.0, -0.5])], opt.init([w]), [w])
    >>> twin.grad = torch.tensor([3.0, -0.5]); torch_opt.step()
    >>> w, torch.equal(w, twin.detach()), int(state.count)
    (tensor([ 0.8500, -1.8000]), True, 1)
    """
    twin = _IN_PLACE.get(opt.update)
    if twin is not None and (new_state := twin(grads, state, params)) is not None:
        return new_state
    updates, new_state = opt.update(grads, state, params)
    new = apply_updates(params, updates)
    with torch.no_grad():
        for p, n in zip(ctree.leaves(params), ctree.leaves(new), strict=True):
            p.copy_(n)
    return new_state
