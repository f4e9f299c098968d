"""A MoE layer's local bookkeeping without the varying/invariant mode, tagged once at its edges.

Inside a ``shard_map`` body every torch op, even ``x.shape``, passes through
the tracking mode's Python ``__torch_function__`` (:mod:`colofn._vma`): a few
microseconds per op on the fast path, tens once an in-place write has been
seen. A MoE layer's routing and dispatch are mostly small index ops (sorts,
gathers, scatters, counts) whose vma is known in advance: every value that
mixes the layer's inputs varies along the union of their axes. So:

* :func:`vary_alike` gives each differentiable input the ``pvary`` the mode
  would insert where it first meets the others (the same cached ``pvary``,
  so a ``shard_map`` argument's gradient sum still goes to the gradient
  buckets), and returns the union;
* :func:`untracked` runs the ops in between with ``__torch_function__`` off
  (collectives still work: they tag what they return themselves);
* :func:`tag` marks what leaves the region (or enters a collective) with the
  vma the mode would have given it.

Exact where every use of an input inside the region meets values varying
along the whole union (true of routing's ``x @ router`` and of the experts:
tokens, gates and weights all meet in each expert's output): ``pvary`` is the
identity forward and its transpose, a ``psum``, is linear, so summing the
cotangent once at the input equals summing it on each path. Outside a
``shard_map`` with ``check_vma`` all three do nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from colofn import _vma

__all__ = ["tag", "untracked", "vary_alike", "vma_of"]


def _tracked() -> _vma.Context | None:
    ctx = _vma.current()
    return ctx if ctx is not None and ctx.check_vma else None


def vary_alike(
    tensors: Sequence[torch.Tensor], extra: Sequence[str] = ()
) -> tuple[frozenset[str] | None, list[torch.Tensor]]:
    """``(union, tensors)``: each varying along the union of all their axes and ``extra``.

    ``union`` is ``None`` (and the tensors unchanged) when nothing is tracked.
    """
    ctx = _tracked()
    if ctx is None:
        return None, list(tensors)
    vmas = [ctx.vma(t) for t in tensors]
    union = frozenset(extra).union(*vmas)
    out = [
        t if v == union else _vma.vary_over(t, tuple(a for a in ctx.mesh_shape if a in union - v))
        for t, v in zip(tensors, vmas, strict=True)
    ]
    return union, out


@contextlib.contextmanager
def untracked(*tensors: torch.Tensor) -> Iterator[None]:
    """Torch ops here skip the tracking mode, inside a tracked ``shard_map`` body, when ``tensors`` are plain.

    A tensor subclass (whose ``__torch_function__`` must run) keeps every op
    tracked; so does code outside a tracked body (nothing changes there).
    Tracked or not, the results are the same: the inputs already vary along
    the union (:func:`vary_alike`), so the mode inserts no ``pvary`` of its own.
    """
    if _tracked() is None or any(type(t) is not torch.Tensor for t in tensors):
        yield
        return
    with torch._C.DisableTorchFunction():
        yield


def tag(vma: frozenset[str] | None, *tensors: torch.Tensor) -> None:
    """Mark ``tensors`` varying along ``vma`` (what the mode would have computed); nothing when untracked."""
    ctx = _tracked()
    if ctx is None or vma is None:
        return
    for t in tensors:
        ctx.set_vma(t, vma)


def vma_of(t: torch.Tensor) -> frozenset[str] | None:
    """``t``'s vma inside a tracked ``shard_map`` body, else ``None``."""
    ctx = _tracked()
    return None if ctx is None else ctx.vma(t)
