"""``convert``: rewrite a checkpoint of the pickled format (manifest version 1) as data, for files the user trusts."""

from __future__ import annotations

import base64
import builtins
import collections
import dataclasses
import io
import os
import pickle
from typing import Any

import optree
import torch

from colofn import _treecodec as codec
from colofn.checkpoint import _manifest
from colofn.errors import CheckpointError, format_failures

__all__ = ["convert"]


def convert(path: str | os.PathLike[str], *, trust: bool = False) -> str:
    """Rewrite the manifest of an older checkpoint (version 1, with pickles) in the current format.

    Version 1 stored the tree structure and non-JSON plain values as pickles.
    Reading a pickle runs whatever code it names, so this unpickles them only
    with ``trust=True``: run it on checkpoints you or your own jobs wrote. The
    data files are not touched (their sizes and hashes stay valid); the
    manifest is replaced atomically. A checkpoint already in the current format
    is left as it is.

    Args:
      path: the checkpoint directory.
      trust: confirm that the files are trusted (required for a version-1 checkpoint).

    Returns:
      ``path``.

    Raises:
      CheckpointError: not a checkpoint, ``trust`` not given, or a pickled
        value that cannot be stored as data (each leaf path named).
    """
    path = os.path.abspath(os.fspath(path))
    content = _manifest.read(path)
    if content["version"] >= _manifest.VERSION:
        return path
    if not trust:
        raise CheckpointError(
            f"colofn.checkpoint.convert: {path} holds pickles, which run code when read; pass trust=True "
            "(command line: --trust) only if you trust its files"
        )
    failures: list[str] = []
    leaves = [_convert_leaf(path, leaf, failures) for leaf in content["leaves"]]
    treedef = _unpickle(content.get("treedef"), path, "its tree structure")
    if failures:
        raise CheckpointError(format_failures(f"colofn.checkpoint.convert: {path} has values that cannot be stored as data:", failures))
    new = _manifest.manifest(leaves, treedef, content["files"], content.get("world_size", 1))
    if treedef is None:  # a node type that could not be pickled: like= stays needed
        new["structure"] = content.get("structure", "")
    _manifest.write_marker(path, new)
    return path


_PLAIN = {"bool", "int", "float", "complex", "str", "bytes", "bytearray", "list", "tuple", "dict", "set", "frozenset", "slice", "range"}
_COLLECTIONS = {"OrderedDict", "defaultdict", "deque"}


class _Legacy(pickle.Unpickler):
    """Version 1's pickles rebuilt from what they may hold, and nothing else.

    A tree structure (optree's ``PyTreeSpec`` and the node types the current
    format also admits: NamedTuples and registered dataclasses of modules
    already imported) and plain values (builtins' data types, ``collections``'
    containers, torch dtypes, ``torch.Size``, ``torch.device``). Any other
    global, a callable above all, is refused, so even a file the user trusts
    cannot make ``convert`` run code it names.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _PLAIN:
            return getattr(builtins, name)
        if module == "collections" and name in _COLLECTIONS:
            return getattr(collections, name)
        if (module, name) == ("optree", "PyTreeSpec"):
            return optree.PyTreeSpec
        if module == "torch" and (isinstance(vars(torch).get(name), torch.dtype) or name in ("Size", "device")):
            return vars(torch)[name]
        try:
            cls = codec._find_class(f"{module}:{name}")
        except (codec.Unavailable, ValueError):
            cls = None
        if cls is not None and (optree.is_namedtuple_class(cls) or (dataclasses.is_dataclass(cls) and codec._registered(cls))):
            return cls
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is neither a tree node type nor a plain value")


def _unpickle(text: Any, path: str, what: str) -> Any:
    if not text:
        return None
    try:
        return _Legacy(io.BytesIO(base64.b64decode(text))).load()
    except Exception as e:  # noqa: BLE001 - reported with the path
        raise CheckpointError(f"colofn.checkpoint.convert: {path}: {what} cannot be unpickled here ({type(e).__name__}: {e})") from None


def _convert_leaf(path: str, leaf: _manifest.Leaf, failures: list[str]) -> _manifest.Leaf:
    if leaf.kind == "tensor":
        return leaf
    value = _unpickle(leaf.value, path, f"the value of {leaf.path}") if leaf.kind == "pickle" else leaf.value
    try:
        return _manifest.Leaf(leaf.path, "value", value=codec.encode_value(value))
    except codec.Unencodable as e:
        failures.append(f"{leaf.path}: {e}")
        return leaf
