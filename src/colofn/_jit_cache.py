"""The compile cache of ``jit(compile=True)``: keys, their descriptions, fresh entry points."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from colofn import tree as jt
from colofn._jit_errors import spec_text


def leaf_key(x: Any) -> Any:
    if isinstance(x, DTensor):
        return ("dtensor", x.device_mesh, tuple(x.placements), tuple(x.shape), x.dtype, x.requires_grad)
    if isinstance(x, torch.Tensor):
        return ("tensor", x.device.type, tuple(x.shape), x.dtype, x.requires_grad)
    try:
        hash(x)
        return ("value", type(x), x)
    except TypeError:
        return ("object", type(x), id(x))


def cache_key(args: tuple[Any, ...], kwargs: dict[str, Any], static: list[int]) -> tuple[Any, ...]:
    leaves, treedef = jt.flatten((tuple(a for i, a in enumerate(args) if i not in static), kwargs))
    return (
        treedef,
        tuple(leaf_key(x) for x in leaves),
        tuple((i, type(args[i]), args[i]) for i in static),
        torch.is_grad_enabled(),
    )


def describe_leaf(k: Any) -> str:
    if k[0] == "dtensor":
        grad = " requires_grad" if k[5] else ""
        return f"{str(k[4]).replace('torch.', '')}{list(k[3])} {spec_text(k[2], k[1].mesh_dim_names)}{grad}"
    if k[0] == "tensor":
        return f"{str(k[3]).replace('torch.', '')}{list(k[2])} plain" + (" requires_grad" if k[4] else "")
    return f"{k[1].__name__} {k[2]!r:.30}" if k[0] == "value" else k[1].__name__


def describe_key(key: tuple[Any, ...]) -> str:
    parts = [f"leaf {i}: {describe_leaf(k)}" for i, k in enumerate(key[1])]
    parts += [f"static arg {i}={v!r:.40}" for i, _, v in key[2]]
    return "; ".join(parts) or "no arguments"


def key_diff(old: tuple[Any, ...], new: tuple[Any, ...]) -> str:
    if old[0] != new[0]:
        return f"argument structure changed from {old[0]} to {new[0]}"
    diffs = [
        f"leaf {i}: {describe_leaf(a)} -> {describe_leaf(b)}"
        for i, (a, b) in enumerate(zip(old[1], new[1], strict=True))
        if a != b
    ]
    diffs += [f"static arg {a[0]}: {a[2]!r:.30} -> {b[2]!r:.30}" for a, b in zip(old[2], new[2], strict=False) if a != b]
    if old[3] != new[3]:
        diffs.append(f"grad mode {old[3]} -> {new[3]}")
    if not diffs and old[1] != new[1]:
        diffs.append("the mesh changed (another rank or world)")
    return "; ".join(diffs) or "new variant (another rank, world or mesh)"


def fresh_entry(f: Callable[..., Any], tag: str) -> Callable[..., Any]:
    """A function calling ``f`` with a code object of its own.

    Dynamo keys its cache (and its recompile limit) on the top frame's code
    object. One fresh code object per variant keeps the variants of every rank
    and every simulated world apart, instead of piling them on one code object
    until dynamo's recompile limit silently falls back to eager.
    """

    def entry(*args: Any, **kwargs: Any) -> Any:
        return f(*args, **kwargs)

    safe = "".join(c if c.isalnum() or c == "_" else "_" for c in tag)
    code = entry.__code__.replace(co_name=f"colofn_jit_{safe}")
    return types.FunctionType(code, entry.__globals__, code.co_name, None, entry.__closure__)
