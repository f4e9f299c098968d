"""Tree structures and plain values as JSON data: what checkpoints and pipeline messages store.

Nothing here unpickles, imports a module or calls a function named by the
data. A structure is encoded node by node from a fixed registry:

===================  ==================================================================
node                 JSON
===================  ==================================================================
a leaf               ``"*"``
``None``             ``null``
``list``             ``{"node": "list", "children": [...]}``
``tuple``            ``{"node": "tuple", "children": [...]}``
``dict``             ``{"node": "dict", "keys": [...], "children": [...]}`` (insertion order)
``OrderedDict``      ``{"node": "OrderedDict", "keys": [...], "children": [...]}``
``defaultdict``      ``{"node": "defaultdict", "factory": "list", "keys": [...], "children": [...]}``
``NamedTuple``       ``{"node": "namedtuple", "type": "module:Qualname", "fields": [...], "children": [...]}``
dataclass            ``{"node": "dataclass", "type": "module:Qualname", "meta": [...], "children": [...]}``
===================  ==================================================================

Dict keys are ``str`` or ``int``. A ``defaultdict``'s factory is one of
:data:`FACTORIES`. A NamedTuple or a dataclass registered with
:func:`colofn.tree.register_dataclass` is named by its module and qualified
name; decoding finds the class only in a module that is already imported
(never imports one) and checks that it is still that kind of class (the same
fields; registered with colofn), otherwise the structure cannot be rebuilt
(:class:`Unavailable`). Meta fields of dataclasses are plain values.

Plain values (checkpoint leaves that are not tensors) are ``bool``, ``int``,
``float`` (NaN and infinities too), ``str``, ``torch.dtype``, ``torch.device``
and ``bytes``; anything else is refused when encoding.

>>> import torch
>>> from colofn import tree as jt
>>> spec = jt.structure({"b": [torch.ones(1), None], "a": (torch.zeros(1),)})
>>> data = encode_structure(spec)
>>> data["keys"], data["children"][0]
(['b', 'a'], {'node': 'list', 'children': ['*', None]})
>>> decode_structure(data) == spec
True
>>> encode_value(torch.bfloat16), decode_value(encode_value(torch.bfloat16))
({'dtype': 'bfloat16'}, torch.bfloat16)
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import math
import sys
from typing import Any

import optree
import torch

from colofn import tree as jt

__all__ = [
    "FACTORIES",
    "Unavailable",
    "Unencodable",
    "decode_structure",
    "decode_value",
    "encode_structure",
    "encode_value",
]

FACTORIES: dict[str, Any] = {"list": list, "dict": dict, "int": int, "float": float, "str": str, "set": set, "tuple": tuple}
"""The ``defaultdict`` factories a structure may name (none other is stored)."""

_FACTORY_NAMES = {id(v): k for k, v in FACTORIES.items()}
_MAX_DEPTH = 200


class Unencodable(TypeError):
    """A node type or a value outside the registry (the message says which, and where)."""


class Unavailable(ValueError):
    """A structure whose node class is not available here (its module is not imported, or it changed)."""


class _Leaf:
    """The leaf placeholder of a skeleton."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "*"


_LEAF = _Leaf()


# ----------------------------------------------------------------------------- plain values


def encode_value(x: Any) -> Any:
    """``x`` as JSON data: bool/int/str as themselves, floats as themselves or ``{"float": "nan"}``, others tagged."""
    t = type(x)
    if t in (bool, int, str):
        return x
    if t is float:
        return x if math.isfinite(x) else {"float": repr(x)}
    if t is bytes:
        return {"bytes": base64.b64encode(x).decode("ascii")}
    if isinstance(x, torch.dtype):
        return {"dtype": str(x).removeprefix("torch.")}
    if isinstance(x, torch.device):
        return {"device": str(x)}
    raise Unencodable(
        f"a {t.__name__} is not a plain value a checkpoint can store (bool, int, float, str, bytes, "
        "torch.dtype, torch.device); store it as one of those, or as a tensor"
    )


def decode_value(d: Any) -> Any:
    """The value :func:`encode_value` wrote; a ``ValueError`` for anything else."""
    if type(d) in (bool, int, float, str):
        return d
    if isinstance(d, dict) and len(d) == 1:
        (tag, v), = d.items()
        if isinstance(v, str):
            if tag == "float" and v in ("nan", "inf", "-inf"):
                return float(v)
            if tag == "bytes":
                return base64.b64decode(v.encode("ascii"), validate=True)
            if tag == "dtype":
                dtype = vars(torch).get(v)  # no module __getattr__: nothing is imported
                if isinstance(dtype, torch.dtype):
                    return dtype
            if tag == "device":
                try:
                    return torch.device(v)
                except RuntimeError:  # torch's error for a malformed device string
                    pass
    raise ValueError(f"{_short(d)} is not a stored plain value")


# ----------------------------------------------------------------------------- structures


def encode_structure(treedef: jt.PyTreeSpec) -> Any:
    """``treedef`` as JSON data; :class:`Unencodable` names the first node outside the registry."""
    skeleton = jt.unflatten(treedef, [_LEAF] * treedef.num_leaves)
    return _encode(skeleton, "tree")


def decode_structure(data: Any) -> jt.PyTreeSpec:
    """The structure :func:`encode_structure` wrote.

    Raises:
      ValueError: ``data`` is not a structure this module writes.
      Unavailable: a NamedTuple or dataclass it names is not imported here (or has changed).
    """
    return jt.structure(_decode(data, 0), is_leaf=lambda x: x is _LEAF)


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _key(k: Any, where: str) -> Any:
    if type(k) in (str, int):
        return k
    raise Unencodable(f"{where}: a dict key {_short(k)} of type {type(k).__name__} (keys must be str or int)")


def _encode(x: Any, where: str) -> Any:
    if x is _LEAF:
        return "*"
    if x is None:
        return None
    t = type(x)
    if t in (list, tuple):
        return {"node": t.__name__, "children": [_encode(c, f"{where}[{i}]") for i, c in enumerate(x)]}
    if t in (dict, collections.OrderedDict, collections.defaultdict):
        out: dict[str, Any] = {"node": t.__name__}
        if t is collections.defaultdict:
            factory = _FACTORY_NAMES.get(id(x.default_factory)) if x.default_factory is not None else None
            if x.default_factory is not None and factory is None:
                raise Unencodable(f"{where}: a defaultdict whose factory {x.default_factory!r} is not one of {sorted(FACTORIES)}")
            out["factory"] = factory
        out["keys"] = [_key(k, where) for k in x]
        out["children"] = [_encode(c, f"{where}[{k!r}]") for k, c in x.items()]
        return out
    if optree.is_namedtuple_class(t):
        return {"node": "namedtuple", "type": _type_name(t), "fields": list(t._fields),
                "children": [_encode(getattr(x, f), f"{where}.{f}") for f in t._fields]}
    if dataclasses.is_dataclass(t) and _registered(t):
        children, meta, entries, _ = optree.tree_flatten_one_level(x, namespace=jt.NAMESPACE)  # type: ignore[arg-type]
        try:
            meta_data = [encode_value(m) for m in (meta or ())]  # type: ignore[attr-defined]
        except Unencodable as e:
            raise Unencodable(f"{where}: a meta field of {t.__qualname__}: {e}") from None
        return {"node": "dataclass", "type": _type_name(t), "meta": meta_data,
                "fields": list(entries), "children": [_encode(c, f"{where}.{f}") for f, c in zip(entries, children, strict=True)]}
    raise Unencodable(
        f"{where}: a {t.__module__}.{t.__qualname__} node, which is not in the registry (dict, list, tuple, None, "
        "OrderedDict, defaultdict, NamedTuple, dataclasses registered with colofn.tree.register_dataclass)"
    )


def _registered(cls: type) -> bool:
    return optree.register_pytree_node.get(cls, namespace=jt.NAMESPACE) is not None  # type: ignore[attr-defined]


def _find_class(name: Any) -> type:
    """The class named ``module:Qualname`` in an already imported module; never imports."""
    if not isinstance(name, str) or name.count(":") != 1:
        raise ValueError(f"{_short(name)} is not a class name")
    module, qualname = name.split(":")
    parts = qualname.split(".")
    if not all(p.isidentifier() for p in parts) or not all(p.isidentifier() for p in module.split(".")):
        raise Unavailable(f"the class {name} (a local class cannot be found again)")
    obj: Any = sys.modules.get(module)
    if obj is None:
        raise Unavailable(f"the class {name} (its module {module} is not imported)")
    for p in parts:
        obj = vars(obj).get(p) if hasattr(obj, "__dict__") else None
        if obj is None:
            raise Unavailable(f"the class {name} (not found in {module})")
    if not isinstance(obj, type):
        raise Unavailable(f"the class {name} ({module} has a {type(obj).__name__} there)")
    return obj


def _strs_or_ints(keys: Any) -> list[Any]:
    if not isinstance(keys, list) or not all(type(k) in (str, int) for k in keys):
        raise ValueError(f"{_short(keys)} is not a list of str/int keys")
    return keys


def _decode(d: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError(f"the structure is nested deeper than {_MAX_DEPTH}")
    if d == "*":
        return _LEAF
    if d is None:
        return None
    if not isinstance(d, dict) or not isinstance(d.get("children"), list):
        raise ValueError(f"{_short(d)} is not a stored tree node")
    kind = d.get("node")
    children = [_decode(c, depth + 1) for c in d["children"]]
    if kind == "list":
        return children
    if kind == "tuple":
        return tuple(children)
    if kind in ("dict", "OrderedDict", "defaultdict"):
        keys = _strs_or_ints(d.get("keys"))
        if len(keys) != len(children) or len(set(keys)) != len(keys):
            raise ValueError(f"a {kind} node with {len(keys)} keys (or repeated keys) and {len(children)} children")
        pairs = zip(keys, children, strict=True)
        if kind == "dict":
            return dict(pairs)
        if kind == "OrderedDict":
            return collections.OrderedDict(pairs)
        factory = d.get("factory")
        if factory is not None and factory not in FACTORIES:
            raise ValueError(f"the defaultdict factory {_short(factory)} is not one of {sorted(FACTORIES)}")
        return collections.defaultdict(FACTORIES[factory] if factory else None, pairs)
    if kind == "namedtuple":
        cls = _find_class(d.get("type"))
        fields = d.get("fields")
        here = list(getattr(cls, "_fields", ()))
        if not optree.is_namedtuple_class(cls) or here != fields:
            raise Unavailable(f"the NamedTuple {d.get('type')} (here it is not a NamedTuple with fields {fields})")
        if len(children) != len(here):
            raise ValueError(f"a NamedTuple node with {len(children)} children for {len(here)} fields")
        return cls(*children)
    if kind == "dataclass":
        cls = _find_class(d.get("type"))
        entry = optree.register_pytree_node.get(cls, namespace=jt.NAMESPACE) if dataclasses.is_dataclass(cls) else None  # type: ignore[attr-defined]
        if entry is None:
            raise Unavailable(f"the dataclass {d.get('type')} (here it is not registered with colofn.tree.register_dataclass)")
        meta = d.get("meta")
        if not isinstance(meta, list):
            raise ValueError(f"{_short(meta)} is not a list of meta values")
        try:
            return entry.unflatten_func(tuple(decode_value(m) for m in meta), children)
        except (TypeError, ValueError) as e:
            raise Unavailable(f"the dataclass {d.get('type')} (it cannot be rebuilt from the stored fields {d.get('fields')}: {e})") from None
    raise ValueError(f"{_short(kind)} is not a registered node type")

