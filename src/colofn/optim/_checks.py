"""Argument checks shared by the optimizers: each raises a colofn error naming the fix."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch

from colofn import tree as ctree
from colofn.errors import (
    OptimizerError,
    OptimizerTypeError,
    ShapeError,
    TreeError,
    format_failures,
)

try:  # DTensor is optional: foreach kernels take it, device moves do not.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds of torch without distributed
    DTensor = None  # type: ignore[assignment,misc]

# Which constructor makes each state type, for "state from another optimizer" errors.
_MADE_BY = {
    "SgdState": "sgd(...).init",
    "AdamState": "adam(...).init or adamw(...).init",
    "EmptyState": "clip_by_global_norm(...).init",
    "tuple": "chain(...).init",
}


def a(word: str) -> str:
    """``word`` with its indefinite article: ``a SgdState``, ``an AdamState``."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def is_dtensor(x: Any) -> bool:
    return DTensor is not None and isinstance(x, DTensor)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


Check = tuple[str, Any, Callable[[float], bool], str]
"""(name, value, predicate, rule): the value breaks the rule unless predicate(value)."""


def check_hparams(
    fn: str,
    checks: Iterable[Check],
    fix: str = "use values in the stated ranges (torch.optim's defaults are safe choices)",
) -> None:
    """Raise one error listing every hyperparameter of ``fn`` that breaks its rule."""
    bad_types, bad_values = [], []
    for name, value, ok, rule in checks:
        if not _is_number(value):
            bad_types.append(f"{name}={value!r} is {a(type(value).__name__)}, not a real number")
        elif not (math.isfinite(value) and ok(value)):
            bad_values.append(f"{name}={value!r}: must be {rule}")
    if bad_types:
        raise OptimizerTypeError(
            format_failures(f"{fn}: bad hyperparameters:", bad_types, fix="pass Python floats")
        )
    if bad_values:
        raise OptimizerError(
            format_failures(
                f"{fn}: hyperparameters out of range:",
                bad_values,
                fix=fix,
            )
        )


def check_lr(fn: str, lr: Any) -> None:
    """A learning rate is a finite number >= 0, or a schedule (a callable step -> lr)."""
    if callable(lr):
        return
    if not _is_number(lr):
        raise OptimizerTypeError(
            f"{fn}: lr={lr!r} is {a(type(lr).__name__)}; expected a float or a schedule "
            "(a callable step -> lr, such as optim.cosine_decay_schedule(...))"
        )
    check_hparams(fn, [("lr", lr, lambda v: v >= 0, "finite and >= 0")])


def lr_at(fn: str, lr: Any, step: int) -> float:
    """The learning rate for ``step`` (the number of steps taken so far)."""
    if not callable(lr):
        return float(lr)
    value = lr(step)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise OptimizerError(
            f"{fn}: the lr schedule {getattr(lr, '__name__', lr)!r} returned {value!r} at "
            f"step {step}; a learning rate must be a finite number >= 0.\n"
            "Fix: check the schedule's arguments (steps and values) for this step."
        )
    return float(value)


def step_of(fn: str, count: Any) -> int:
    """The integer value of a state's 0-d ``count`` tensor."""
    if not isinstance(count, torch.Tensor) or count.numel() != 1:
        raise OptimizerTypeError(
            f"{fn}: state.count must be a 0-d tensor, got {type(count).__name__} {count!r:.60}.\n"
            "Fix: pass the state returned by this optimizer's init (or by its last update)."
        )
    if is_dtensor(count):
        count = count.to_local()  # type: ignore[attr-defined]
    return int(count.item())


def check_state(fn: str, state: Any, cls: type) -> None:
    """Raise if ``state`` is not the state type ``cls`` that ``fn``'s init makes."""
    if type(state) is cls:
        return
    got = type(state).__name__
    made_by = _MADE_BY.get(got)
    origin = f" (made by {made_by})" if made_by else ""
    raise OptimizerTypeError(
        f"{fn}: state is {a(got)}{origin}, not the {cls.__name__} this optimizer keeps.\n"
        f"Fix: pass the state returned by this optimizer's init (opt.init(params)) or by its "
        f"last update; after switching optimizers, call the new optimizer's init."
    )


def aligned_leaves(*trees: Any) -> tuple[Any, list[list[torch.Tensor]]] | None:
    """One flatten per tree: ``(treedef, leaves of each)`` when every tree has one structure and every
    position holds plain tensors of one shape, dtype and device; else None (the detailed checks then run
    and name what differs). The common case of an update, checked without building a path."""
    flat = [ctree.flatten(t) for t in trees]
    treedef = flat[0][1]
    if any(d != treedef for _, d in flat[1:]):
        return None
    lists = [leaves for leaves, _ in flat]
    for xs in zip(*lists, strict=True):
        first = xs[0]
        if type(first) is not torch.Tensor:
            return None
        for x in xs[1:]:
            if type(x) is not torch.Tensor or x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
                return None
    return treedef, lists


def check_tensors(fn: str, tree: Any, name: str) -> None:
    ctree.all_leaves_are(tree, torch.Tensor, f"the {name} given to {fn}")


def check_same_tree(fn: str, tree: Any, name: str, ref: Any, ref_name: str, note: str = "") -> None:
    """Raise naming every path where ``tree`` and ``ref`` differ in structure or shape.

    ``note`` follows ``ref_name`` in the first line of the message.
    """
    t_flat, t_def = ctree.flatten(tree)  # the common case first: no paths to build (each costs an accessor)
    r_flat, r_def = ctree.flatten(ref)
    if t_def == r_def and all(x.shape == r.shape for x, r in zip(t_flat, r_flat, strict=True)):
        return
    t_leaves, t_def = ctree.flatten_with_path(tree)
    r_leaves, r_def = ctree.flatten_with_path(ref)
    if t_def != r_def:
        t_paths = [ctree.keystr(p) for p, _ in t_leaves]
        r_paths = [ctree.keystr(p) for p, _ in r_leaves]
        t_set, r_set = set(t_paths), set(r_paths)
        failures = [f"{p}: in {ref_name} but not in {name}" for p in r_paths if p not in t_set]
        failures += [f"{p}: in {name} but not in {ref_name}" for p in t_paths if p not in r_set]
        if not failures:
            failures = [
                f"same leaf paths, different containers:\n    {name}: {t_def}\n    {ref_name}: {r_def}"
            ]
        raise TreeError(
            format_failures(
                f"{fn}: {name} does not have the tree structure of {ref_name}{note}:",
                failures,
                fix=f"give {name} exactly the structure of {ref_name} (a tensor for every leaf; "
                "use torch.zeros_like for a param without a gradient, as None is an empty subtree)",
            )
        ) from None
    bad = [
        f"{ctree.keystr(p)}: {name} has shape {tuple(x.shape)}, {ref_name} has {tuple(r.shape)}"
        for (p, x), (_, r) in zip(t_leaves, r_leaves, strict=True)
        if x.shape != r.shape
    ]
    if bad:
        raise ShapeError(
            format_failures(
                f"{fn}: {name} and {ref_name}{note} differ in shape:",
                bad,
                fix=f"give each leaf of {name} the shape of the same leaf of {ref_name}",
            )
        )


def cast_like(xs: list[torch.Tensor], refs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``xs`` moved to the dtype (and, for plain tensors, the device) of ``refs``.

    The optimizer math runs where the state lives, in its dtype: fp32 state for
    fp32 master params takes bf16 grads, CPU-offloaded state takes GPU grads.
    """
    out = []
    for x, r in zip(xs, refs, strict=True):
        if x.dtype != r.dtype:
            x = x.to(r.dtype)
        if x.device != r.device and not is_dtensor(x) and not is_dtensor(r):
            x = x.to(r.device)
        out.append(x)
    return out


def need_params(fn: str, params: Any, why: str) -> None:
    if params is None:
        raise OptimizerError(
            f"{fn}: {why} needs the params.\nFix: call update(grads, state, params)."
        )


def leaves_for_update(
    fn: str, grads: Any, params: Any, buffers: Any | None, params_needed_for: str | None
) -> tuple[Any, list[torch.Tensor], list[torch.Tensor] | None]:
    """Check an update's arguments; return ``(treedef, grad leaves, param leaves or None)``.

    ``buffers`` is a per-leaf state tree mirroring the params (None if the state
    keeps none); grads must match it and ``params`` (when given). The param
    leaves come back only when ``params_needed_for`` says what needs them. The
    grad and param leaves come back in the dtype and on the device of the
    buffers (or of the params when there are no buffers).
    """
    check_tensors(fn, grads, "grads")
    if buffers is not None:
        check_same_tree(
            fn,
            grads,
            "grads",
            buffers,
            "the optimizer state",
            note=" (its buffers mirror the params given to init)",
        )
    if params is not None:
        check_tensors(fn, params, "params")
        check_same_tree(fn, grads, "grads", params, "params")
    elif params_needed_for is not None:
        need_params(fn, params, params_needed_for)
    g_leaves, treedef = ctree.flatten(grads)
    p_leaves = ctree.leaves(params) if params is not None else None
    refs = ctree.leaves(buffers) if buffers is not None else p_leaves
    if refs is not None:
        g_leaves = cast_like(g_leaves, refs)
    if p_leaves is None or params_needed_for is None:
        return treedef, g_leaves, None
    return treedef, g_leaves, cast_like(p_leaves, refs)  # type: ignore[arg-type]
