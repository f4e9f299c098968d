"""Gradient clipping by the global norm, as ``torch.nn.utils.clip_grad_norm_`` computes it."""

from __future__ import annotations

import torch

from colofn import tree as ctree
from colofn.optim import _checks
from colofn.optim._foreach import groups
from colofn.optim.base import EmptyState, GradientTransformation, OptState, Params, Updates

__all__ = ["clip_by_global_norm", "global_norm"]


@torch.no_grad()
def global_norm(tree: Updates) -> torch.Tensor:
    """The 2-norm of all the leaves of ``tree`` together, as one vector.

    Computed as ``torch.nn.utils.get_total_norm`` does: the norm of the stacked
    per-leaf norms (``torch._foreach_norm`` per device/dtype group), on the
    device of the first leaf. DTensor leaves contribute their full norm. (With
    leaves of several dtypes, torch may stack the groups in another order, so
    the last bit can differ.)

    >>> import torch
    >>> global_norm({"a": torch.tensor([3.0]), "b": [torch.tensor([[4.0]])]})
    tensor(5.)
    """
    _checks.check_tensors("global_norm", tree, "tree")
    leaves = ctree.leaves(tree)
    if not leaves:
        return torch.tensor(0.0)
    first_device = leaves[0].device
    norms: list[torch.Tensor] = []
    for _, (group,) in groups([leaves]):
        norms.extend(torch._foreach_norm(group, 2.0))
    norms = [n.full_tensor() if _checks.is_dtensor(n) else n for n in norms]  # type: ignore[attr-defined]
    return torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), 2.0)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale the gradients so that their global norm is at most ``max_norm``.

    The same as ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` with the
    norm taken over all leaves: every gradient is multiplied by
    ``min(max_norm / (global_norm + 1e-6), 1)``. Chain it before an optimizer:
    ``chain(clip_by_global_norm(1.0), adamw(3e-4))``. Its state is an
    :class:`~colofn.optim.EmptyState`.

    Args:
        max_norm: the largest global norm let through, > 0.

    Raises:
        OptimizerError: ``max_norm`` is not finite and > 0.

    >>> import torch
    >>> clip = clip_by_global_norm(1.0)
    >>> updates, _ = clip.update({"g": torch.tensor([3.0, 4.0])}, clip.init(None))
    >>> updates
    {'g': tensor([0.6000, 0.8000])}
    """
    _checks.check_hparams(
        "clip_by_global_norm", [("max_norm", max_norm, lambda v: v > 0, "finite and > 0")]
    )
    max_norm = float(max_norm)

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    @torch.no_grad()
    def update(
        grads: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, EmptyState]:
        del params
        _checks.check_state("clip_by_global_norm update", state, EmptyState)
        _checks.check_tensors("clip_by_global_norm update", grads, "grads")
        leaves, treedef = ctree.flatten(grads)
        if not leaves:
            return grads, state
        coef = torch.clamp(max_norm / (global_norm(grads) + 1e-6), max=1.0)
        out: list[torch.Tensor] = [leaves[0]] * len(leaves)
        for idx, (group,) in groups([leaves]):
            scaled = torch._foreach_mul(group, coef.to(group[0].device))
            for i, x, g in zip(idx, scaled, group, strict=True):
                # A 0-d grad promotes with the 0-d coef; torch's in-place mul_ casts back.
                out[i] = x if x.dtype == g.dtype else x.to(g.dtype)
        return ctree.unflatten(treedef, out), state

    return GradientTransformation(init, update)
