"""Combining transformations: ``chain``."""

from __future__ import annotations

from colofn.errors import OptimizerTypeError, format_failures
from colofn.optim._checks import a
from colofn.optim.base import GradientTransformation, OptState, Params, Updates

__all__ = ["chain"]


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after another; the result is a transformation too.

    The state is a plain tuple holding each transform's state, in order.

    Args:
        *transforms: :class:`~colofn.optim.GradientTransformation` values.

    Raises:
        OptimizerTypeError: an argument is not a ``GradientTransformation``.

    >>> import torch
    >>> from colofn import optim
    >>> opt = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.5))
    >>> params = {"w": torch.zeros(2)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": torch.tensor([3.0, 4.0])}, state, params)
    >>> updates["w"]
    tensor([-0.3000, -0.4000])
    >>> type(state).__name__, [type(s).__name__ for s in state]
    ('tuple', ['EmptyState', 'SgdState'])
    """
    bad = [
        f"argument {i}: {type(t).__name__} {t!r:.60}"
        for i, t in enumerate(transforms)
        if not isinstance(t, GradientTransformation)
    ]
    if bad:
        raise OptimizerTypeError(
            format_failures(
                "chain takes GradientTransformation values; these are not:",
                bad,
                fix="pass the results of optim.sgd(...), optim.adamw(...), ... (call them)",
            )
        )
    n = len(transforms)

    def init(params: Params) -> tuple[OptState, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(
        grads: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, tuple[OptState, ...]]:
        if type(state) is not tuple or len(state) != n:
            got = f"a tuple of {len(state)}" if type(state) is tuple else a(type(state).__name__)
            raise OptimizerTypeError(
                f"chain update: state is {got}, not the tuple of {n} states this chain of "
                f"{n} transforms keeps.\nFix: pass the state returned by this chain's init "
                "(opt.init(params)) or by its last update."
            )
        new_states = []
        for t, s in zip(transforms, state, strict=True):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    return GradientTransformation(init, update)
