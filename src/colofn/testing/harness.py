"""``assert_equivalent``: prove a parallel function equal to a reference, values and gradients."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from colofn import tree as jt

__all__ = ["assert_equivalent", "assert_trees_close", "tolerances", "value_and_grads"]

_TOL = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def tolerances(dtype: torch.dtype, *, magnitude: float = 1.0, reduction_size: int = 1) -> tuple[float, float]:
    """(rtol, atol) for comparing results computed in ``dtype`` with different reduction orders.

    Summing ``n`` terms in another order moves a result by rounding errors of its
    partial sums, which grow with their magnitude and, statistically, with
    ``sqrt(n)``. So the absolute tolerance is the dtype's base one (float32:
    ``2e-5``, about 170 ulps of 1.0) scaled by ``max(1, magnitude)`` (the
    largest ``|expected|`` of the leaf, standing in for the partial sums) and by
    ``sqrt(reduction_size)``; the relative tolerance is the dtype's base one.

    >>> tolerances(torch.float32)
    (2e-05, 2e-05)
    >>> tolerances(torch.float32, magnitude=100.0, reduction_size=16)
    (2e-05, 0.008)
    """
    r, t = _TOL.get(dtype, (0.0, 0.0))
    return r, t * max(1.0, magnitude) * math.sqrt(max(1, reduction_size))


def assert_trees_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    what: str = "value",
    reduction_size: int = 1,
) -> None:
    """Leaf by leaf ``|a - e| <= atol + rtol |e|`` with defaults scaled to rounding.

    By default ``(rtol, atol)`` are :func:`tolerances` of the expected leaf's
    dtype, with ``magnitude`` the leaf's largest ``|e|`` and ``reduction_size``
    as given: the number of terms the largest sum behind a result adds up (for a
    float32 loss summed over 4096 elements to about 92, ``atol`` is about
    ``2e-5 * 92 * 64 = 0.12``; an element that nearly cancels cannot be held to
    its own relative error). A real error (a missing or doubled term, a wrong
    sign) stays far above that. Give ``rtol``/``atol`` to override.

    The error names the first differing leaf path, its max absolute error and
    where it is.

    >>> big = torch.tensor([92.2])
    >>> assert_trees_close(big + 0.0078, big, reduction_size=64)  # rounding of a 64-term sum
    >>> assert_trees_close(big * 2, big, reduction_size=64)  # a doubled sum is not rounding
    Traceback (most recent call last):
    ...
    AssertionError: value at <root> differs: max abs error 92.2 (rtol=2e-05, atol=0.014752, dtype torch.float32); first at index (0,): actual 184.4, expected 92.2
    """
    a_pairs, a_def = jt.flatten_with_path(actual)
    e_pairs, e_def = jt.flatten_with_path(expected)
    if a_def != e_def:
        raise AssertionError(f"{what}: tree structures differ:\n  actual:   {a_def}\n  expected: {e_def}")
    for (path, a), (_, e) in zip(a_pairs, e_pairs, strict=True):
        p = jt.keystr(path)
        if isinstance(a, DTensor):
            a = a.full_tensor()
        if isinstance(e, DTensor):
            e = e.full_tensor()
        if not isinstance(a, torch.Tensor) or not isinstance(e, torch.Tensor):
            if a != e:
                raise AssertionError(f"{what} at {p}: {a!r} != {e!r}")
            continue
        if a.shape != e.shape:
            raise AssertionError(f"{what} at {p}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
        a64, e64 = a.detach().double().cpu(), e.detach().double().cpu()
        magnitude = float(e64.abs().nan_to_num(0.0, 0.0, 0.0).max()) if e64.numel() else 0.0
        r, t = tolerances(e.dtype, magnitude=magnitude, reduction_size=reduction_size)
        r = r if rtol is None else rtol
        t = t if atol is None else atol
        err = (a64 - e64).abs()
        bad = err > t + r * e64.abs()
        nan_mismatch = a64.isnan() != e64.isnan()
        bad = (bad & ~(a64.isnan() & e64.isnan())) | nan_mismatch
        if bool(bad.any()):
            idx = tuple(int(i) for i in (bad.nonzero()[0] if bad.ndim else ()))
            raise AssertionError(
                f"{what} at {p} differs: max abs error {float(err.nan_to_num(float('inf')).max()):.3g} "
                f"(rtol={r:g}, atol={t:g}, dtype {e.dtype}); first at index {idx}: "
                f"actual {float(a64[idx]):.6g}, expected {float(e64[idx]):.6g}"
            )


def _cotangent(x: torch.Tensor, i: int) -> torch.Tensor:
    """A fixed, non-symmetric cotangent so every output element's gradient path is exercised."""
    n = x.numel()
    base = torch.cos(torch.arange(n, dtype=torch.float64) * 0.7 + i) + 0.5
    return base.reshape(x.shape).to(x.dtype)


def value_and_grads(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, list[Any]]:
    """``fn(*args)`` gathered to global tensors, and the gradients of ``sum_i <out_i, c_i>``
    (fixed cotangents ``c_i``) with respect to every floating-point tensor leaf of ``args``."""
    args = jt.map(
        lambda x: x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x,
        tuple(args),
    )
    out = fn(*args)
    full = jt.map(lambda y: y.full_tensor() if isinstance(y, DTensor) else y, out)
    leaves = [y for y in jt.leaves(full) if isinstance(y, torch.Tensor) and y.is_floating_point()]
    inputs = [x for x in jt.leaves(args) if isinstance(x, torch.Tensor) and x.requires_grad]
    grads: list[Any] = []
    if leaves and inputs:
        total = sum((y * _cotangent(y, i).to(y.device)).sum() for i, y in enumerate(leaves))
        if isinstance(total, torch.Tensor) and total.requires_grad:
            grads = list(torch.autograd.grad(total, inputs, allow_unused=True))
    grads = grads or [None] * len(inputs)  # outputs that do not depend on the inputs: zero gradients
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
    return jt.map(lambda y: y.detach() if isinstance(y, torch.Tensor) else y, full), [g.detach() for g in grads]


def _rank_run(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, list[Any]]:
    return value_and_grads(fn, args)


def assert_equivalent(
    parallel_fn: Callable[..., Any],
    reference_fn: Callable[..., Any],
    *args: Any,
    world_size: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    reduction_size: int | None = None,
) -> None:
    """Assert ``parallel_fn(*args) == reference_fn(*args)``, values and gradients, leaf by leaf.

    Leaves are compared by :func:`assert_trees_close`; ``reduction_size``
    defaults to the number of elements of the floating-point arguments (no
    result can sum more distinct inputs than that), so the default tolerance
    allows the rounding of the longest sum the program can do.

    Both take global tensors. ``parallel_fn`` may return DTensors (they are
    gathered). Gradients are those of ``sum_i <out_i, c_i>`` for fixed cotangents
    ``c_i``, with respect to every floating-point tensor argument. With
    ``world_size``, ``parallel_fn`` runs on a simulated world of that size (it
    builds its own mesh) and every rank's results are checked; without it, the
    caller is already inside a world.

    >>> import torch, colofn
    >>> from colofn import P
    >>> from colofn.testing import shard_map_reference
    >>> f = lambda x: colofn.psum(x * x, "i")
    >>> def parallel(x):
    ...     return colofn.shard_map(f, mesh=colofn.Mesh((2,), ("i",)), in_specs=P("i"), out_specs=P())(x)
    >>> ref = shard_map_reference(f, mesh_shape={"i": 2}, in_specs=P("i"), out_specs=P())
    >>> assert_equivalent(parallel, ref, torch.arange(4.0), world_size=2)
    """
    if world_size is None:
        got = [value_and_grads(parallel_fn, args)]
    else:
        from colofn.world import launch

        got = launch(_rank_run, parallel_fn, args, world_size=world_size)
    want_v, want_g = value_and_grads(reference_fn, args)
    if reduction_size is None:
        floats = [x.numel() for x in jt.leaves(tuple(args)) if isinstance(x, torch.Tensor) and x.is_floating_point()]
        reduction_size = max(1, sum(floats))
    for r, (v, g) in enumerate(got):
        where = f" (rank {r})" if world_size else ""
        assert_trees_close(v, want_v, rtol=rtol, atol=atol, what="value" + where, reduction_size=reduction_size)
        assert_trees_close(g, want_g, rtol=rtol, atol=atol, what="gradient" + where, reduction_size=reduction_size)
