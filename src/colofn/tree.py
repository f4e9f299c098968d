"""Pytrees, built on optree in one registry namespace (``"colofn"``).

Conventions (the same as JAX's):

* Leaves are tensors (or any object that is not a registered node).
* Nodes: ``dict`` and ``defaultdict`` (children ordered by **sorted key**, like
  JAX and optree; the dict handed back by :func:`unflatten` or :func:`map` keeps
  the insertion order of the dict that was flattened, and two dicts with the same
  keys in another order have equal structures), ``OrderedDict`` (children in
  insertion order), ``list``, ``tuple``, ``NamedTuple``,
  dataclasses registered with :func:`register_dataclass`, and ``None``, which is
  a node with no children (not a leaf), so an optional entry set to ``None``
  contributes no leaves.
* Paths are tuples of keys and print JAX-style: ``['layers'][0]['w']``,
  ``.field`` for dataclass and NamedTuple fields.

Dataclasses registered here are also registered with ``torch.utils._pytree``,
so ``torch.func`` transforms (``grad``, ``vmap``, ``functional_call``) see their
fields as children (a field set to ``None`` is no child in either registry).

>>> import torch
>>> tree = {"b": [torch.ones(1), None], "a": torch.zeros(2)}
>>> [keystr(p) for p, _ in leaves_with_path(tree)]
["['a']", "['b'][0]"]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import optree
from optree import PyTreeSpec

from colofn.errors import TreeError

__all__ = [
    "NAMESPACE",
    "PyTreeSpec",
    "all_leaves_are",
    "broadcast_prefix",
    "flatten",
    "flatten_with_path",
    "keystr",
    "leaves",
    "leaves_with_path",
    "map",
    "map_with_path",
    "register_dataclass",
    "structure",
    "unflatten",
]

NAMESPACE = "colofn"
Path = Any  # an optree PyTreeAccessor; print it with keystr
T = TypeVar("T")

def flatten(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> tuple[list[Any], PyTreeSpec]:
    """Return ``(leaves, treedef)``."""
    return optree.tree_flatten(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def unflatten(treedef: PyTreeSpec, leaves: Iterable[Any]) -> Any:
    """Inverse of :func:`flatten`."""
    return optree.tree_unflatten(treedef, list(leaves))


def leaves(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[Any]:
    return optree.tree_leaves(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def structure(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> PyTreeSpec:
    return optree.tree_structure(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def _one_level(node: Any, is_leaf: Callable[[Any], bool] | None) -> tuple[list[Any], list[str]] | None:
    """Children of ``node`` and their path texts, or None when ``node`` is a leaf."""
    if is_leaf is not None and is_leaf(node):
        return None
    if node is None:  # a node with no children (flattening it with none_is_leaf would recurse)
        return [], []
    if optree.treespec_is_leaf(optree.tree_structure(node, namespace=NAMESPACE)):
        return None
    accessors, children, _ = optree.tree_flatten_with_accessor(
        node, is_leaf=lambda x: x is not node, none_is_leaf=True, namespace=NAMESPACE
    )
    return children, [a.codify("") for a in accessors]


def flatten_with_path(
    tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> tuple[list[tuple[Path, Any]], PyTreeSpec]:
    """Return ``([(path, leaf), ...], treedef)``."""
    accessors, lvs, treedef = optree.tree_flatten_with_accessor(
        tree, is_leaf=is_leaf, namespace=NAMESPACE
    )
    return list(zip(accessors, lvs, strict=True)), treedef


def leaves_with_path(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[Path, Any]]:
    return flatten_with_path(tree, is_leaf)[0]


def keystr(path: Any) -> str:
    """JAX-style text of a path: ``['layers'][0]['w']``; the root is ``<root>``.

    ``path`` is a path from :func:`flatten_with_path` (an optree accessor), a
    string already in that form, or a tuple of keys.
    """
    if isinstance(path, str):
        return path or "<root>"
    if isinstance(path, optree.PyTreeAccessor):
        return path.codify("") or "<root>"
    return "".join(f"[{p!r}]" for p in path) or "<root>"


def map(f: Callable[..., Any], tree: Any, *rest: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:  # noqa: A001
    """``f`` applied to every leaf (and the matching leaves of ``rest``)."""
    _check_same_structure(tree, rest, is_leaf)
    return optree.tree_map(f, tree, *rest, is_leaf=is_leaf, namespace=NAMESPACE)


def map_with_path(
    f: Callable[..., Any], tree: Any, *rest: Any, is_leaf: Callable[[Any], bool] | None = None
) -> Any:
    """``f(path, leaf, *other_leaves)`` for every leaf; ``path`` prints with :func:`keystr`."""
    _check_same_structure(tree, rest, is_leaf)
    pairs, treedef = flatten_with_path(tree, is_leaf)
    others = [treedef.flatten_up_to(r) for r in rest]
    out = [f(p, x, *(o[i] for o in others)) for i, (p, x) in enumerate(pairs)]
    return unflatten(treedef, out)


def _check_same_structure(tree: Any, rest: Sequence[Any], is_leaf: Callable[[Any], bool] | None) -> None:
    if not rest:
        return
    ref = structure(tree, is_leaf)
    for i, r in enumerate(rest):
        if structure(r, is_leaf) != ref:
            raise TreeError(
                f"Tree argument {i + 1} does not have the structure of the first tree:\n"
                f"  first: {ref}\n  other: {structure(r, is_leaf)}"
            )


def all_leaves_are(tree: Any, types: type | tuple[type, ...], what: str) -> None:
    """Raise :class:`~colofn.errors.TreeTypeError` naming every leaf not of ``types``."""
    from colofn.errors import TreeTypeError, format_failures

    if all(isinstance(x, types) for x in leaves(tree)):  # the common case: no paths to build
        return
    bad = [
        f"{keystr(p)}: got {type(x).__name__} {x!r:.60}"
        for p, x in leaves_with_path(tree)
        if not isinstance(x, types)
    ]
    if bad:
        raise TreeTypeError(
            format_failures(
                f"Every leaf of {what} must be a {_type_names(types)}; {len(bad)} leaf(s) are not:",
                bad,
                fix="convert the values with torch.as_tensor, or make them part of the tree structure",
            )
        )


def _type_names(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in ts)


def broadcast_prefix(
    prefix: Any,
    full: Any,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    prefix_name: str = "prefix",
    full_name: str = "tree",
) -> list[Any]:
    """Broadcast ``prefix`` (a pytree prefix of ``full``) to one entry per leaf of ``full``.

    A leaf of ``prefix`` (as decided by ``is_leaf``, or by being unregistered) applies
    to the whole subtree of ``full`` at its path. Every disagreement is reported,
    each naming its path.

    >>> broadcast_prefix({"a": 1, "b": 2}, {"a": [10, 20], "b": 30})
    [1, 1, 2]
    """
    p_leaves, p_def = flatten(prefix, is_leaf)
    try:  # the outcome depends only on the two structures: repeat a success without the walk
        key: Any = (p_def, structure(full), is_leaf)
        counts = _BROADCAST_COUNTS.get(key)
    except TypeError:  # a node whose metadata is unhashable
        key, counts = None, None
    if counts is None:
        out, counts = _broadcast_prefix(prefix, full, is_leaf, prefix_name, full_name)
        if key is not None and len(counts) == len(p_leaves):
            if len(_BROADCAST_COUNTS) >= 1024:
                _BROADCAST_COUNTS.clear()
            _BROADCAST_COUNTS[key] = counts
        return out
    return [x for x, k in zip(p_leaves, counts, strict=True) for _ in range(k)]


# (prefix structure, full structure, is_leaf) -> how many leaves of full each leaf of prefix stands
# for; successes only, so a mismatch is walked (and worded) again on every call
_BROADCAST_COUNTS: dict[Any, tuple[int, ...]] = {}


def _broadcast_prefix(
    prefix: Any, full: Any, is_leaf: Callable[[Any], bool] | None, prefix_name: str, full_name: str
) -> tuple[list[Any], tuple[int, ...]]:
    """The walk behind :func:`broadcast_prefix`: its result, and the count of each prefix leaf, in order."""
    out: list[Any] = []
    counts: list[int] = []
    failures: list[str] = []

    def rec(p: Any, f: Any, path: str) -> None:
        p_level = _one_level(p, is_leaf)
        if p_level is None:
            counts.append(len(leaves(f)))
            out.extend([p] * counts[-1])
            return
        f_level = _one_level(f, None)
        where = path or "<root>"
        if f_level is None:
            failures.append(
                f"at {where}: {prefix_name} has a {type(p).__name__} node but {full_name} "
                f"has a leaf of type {type(f).__name__}"
            )
            return
        if type(p) is not type(f) and not (isinstance(p, dict) and isinstance(f, dict)):
            failures.append(
                f"at {where}: {prefix_name} has a {type(p).__name__} but {full_name} "
                f"has a {type(f).__name__}"
            )
            return
        (pch, pent), (fch, fent) = p_level, f_level
        if pent != fent:
            if isinstance(p, dict):
                missing = sorted(set(f) - set(p), key=repr)
                extra = sorted(set(p) - set(f), key=repr)
                detail = [f"missing keys {missing}"] if missing else []
                detail += [f"extra keys {extra}"] if extra else []
                failures.append(f"at {where}: {prefix_name} dict has " + " and ".join(detail))
            else:
                failures.append(
                    f"at {where}: {prefix_name} has {len(pent)} children but "
                    f"{full_name} has {len(fent)}"
                )
            return
        for pc, fc, e in zip(pch, fch, fent, strict=True):
            rec(pc, fc, path + e)

    rec(prefix, full, "")
    if failures:
        from colofn.errors import format_failures

        raise TreeError(
            format_failures(
                f"{prefix_name} is not a pytree prefix of {full_name}:",
                failures,
                fix=f"give {prefix_name} the structure of {full_name} (or a prefix of it: one "
                "entry may stand for a whole subtree)",
            )
        )
    return out, tuple(counts)


def register_dataclass(
    cls: type[T] | None = None,
    *,
    data_fields: Sequence[str] | None = None,
    meta_fields: Sequence[str] = (),
) -> Any:
    """Register a dataclass as a pytree node (usable as a decorator).

    ``data_fields`` (default: every field not in ``meta_fields``) are children;
    ``meta_fields`` are static and part of the tree structure. The class is
    registered with optree (namespace ``"colofn"``) and with
    ``torch.utils._pytree`` so that ``torch.func`` transforms see its children.
    """

    def do(c: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(c):
            raise TypeError(f"register_dataclass expects a dataclass, got {c!r}")
        names = [f.name for f in dataclasses.fields(c) if f.init]  # what __init__ takes back
        data = list(data_fields) if data_fields is not None else [n for n in names if n not in meta_fields]
        meta = list(meta_fields)
        unknown = [n for n in data + meta if n not in names]
        both = [n for n in data if n in meta]
        missing = [n for n in names if n not in data and n not in meta]
        if unknown or both or missing:
            raise TypeError(
                f"register_dataclass({c.__qualname__}): "
                + "; ".join(
                    text
                    for text in (
                        f"unknown fields {unknown}" if unknown else "",
                        f"fields {both} are both data and meta" if both else "",
                        f"fields {missing} are neither data nor meta" if missing else "",
                    )
                    if text
                )
                + f". Every field of {names} must be in exactly one of data_fields and meta_fields."
            )

        def flatten_fn(obj: Any) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[str, ...]]:
            return tuple(getattr(obj, n) for n in data), tuple(getattr(obj, n) for n in meta), tuple(data)

        def unflatten_fn(metadata: tuple[Any, ...], children: Iterable[Any]) -> T:
            kw = dict(zip(data, children, strict=True))
            kw.update(zip(meta, metadata, strict=True))
            return c(**kw)

        optree.register_pytree_node(
            c, flatten_fn, unflatten_fn, path_entry_type=optree.GetAttrEntry, namespace=NAMESPACE  # type: ignore[arg-type]
        )

        # torch's pytree treats None as a leaf (and torch.func.grad rejects non-tensor
        # leaves); keep None fields in the context so both registries see the same children.
        def torch_flatten(obj: Any) -> tuple[list[Any], tuple[Any, ...]]:
            values = [getattr(obj, n) for n in data]
            nones = tuple(n for n, v in zip(data, values, strict=True) if v is None)
            return [v for v in values if v is not None], (tuple(getattr(obj, n) for n in meta), nones)

        def torch_unflatten(children: Iterable[Any], context: tuple[Any, ...]) -> T:
            metadata, nones = context
            it = iter(children)
            return unflatten_fn(metadata, [None if n in nones else next(it) for n in data])

        try:
            import torch.utils._pytree as tpytree

            tpytree.register_pytree_node(
                c, torch_flatten, torch_unflatten, serialized_type_name=f"{c.__module__}.{c.__qualname__}"
            )
        except ValueError:  # already registered with torch (re-registration of a class)
            pass
        return c

    return do if cls is None else do(cls)
