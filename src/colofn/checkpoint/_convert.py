"""``convert``: rewrite a checkpoint of the pickled format (manifest version 1) as data, for files the user trusts."""

from __future__ import annotations

import base64
import os
import pickle
from typing import Any

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


def _unpickle(text: Any, path: str, what: str) -> Any:
    if not text:
        return None
    try:
        return pickle.loads(base64.b64decode(text))  # noqa: S301 - the user vouched for these files (trust=True)
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
