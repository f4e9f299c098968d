"""The completion marker of a checkpoint: a JSON manifest of the tree it holds.

A checkpoint directory is complete exactly when it holds :data:`MARKER`. The
manifest records the tree structure (as data: :mod:`colofn._treecodec`), every
leaf's path and kind (tensor: shape, dtype, sharding when saved; value: the
value itself, as data) and every data file's size and SHA-256, so a load can
name the leaf or the file that is wrong. Nothing in it is a pickle; manifests
of version 1 (colofn before safe loading) held pickles, which are never read
here: :func:`legacy_error` says how to convert them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Shard

from colofn import _treecodec as codec
from colofn import tree as jt
from colofn.errors import CheckpointError, CheckpointNotFoundError

MARKER = "colofn_checkpoint.json"
FORMAT = "colofn.checkpoint"
VERSION = 2
LEGACY_VERSION = 1


@dataclass(frozen=True)
class Leaf:
    """One leaf of a saved tree, as the manifest records it."""

    path: str
    kind: str  # "tensor" | "value" | legacy "json" / "pickle" (version 1)
    shape: tuple[int, ...] = ()
    dtype: str = ""
    value: Any = None
    sharding: str = ""

    def to_json(self) -> dict[str, Any]:
        if self.kind == "tensor":
            out: dict[str, Any] = {"path": self.path, "kind": "tensor", "shape": list(self.shape), "dtype": self.dtype}
            if self.sharding:
                out["sharding"] = self.sharding
            return out
        return {"path": self.path, "kind": self.kind, "value": self.value}

    @classmethod
    def from_json(cls, d: dict[str, Any], version: int) -> Leaf:
        if not isinstance(d, dict) or not isinstance(d.get("path"), str):
            raise ValueError(f"a leaf entry {str(d)[:80]} has no path")
        if d.get("kind") == "tensor":
            shape = d["shape"]
            if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
                raise ValueError(f"the leaf {d['path']} has the shape {shape!r}")
            dtype_of(str(d["dtype"]))
            return cls(d["path"], "tensor", tuple(shape), str(d["dtype"]), sharding=str(d.get("sharding", "")))
        kinds = ("value",) if version >= VERSION else ("json", "pickle")
        if d.get("kind") not in kinds:
            raise ValueError(f"the leaf {d['path']} has the kind {d.get('kind')!r}, not one of {['tensor', *kinds]}")
        if d["kind"] == "value":
            codec.decode_value(d["value"])  # checked now, so a bad value is a corrupt manifest
        return cls(d["path"], d["kind"], value=d["value"])

    def python_value(self) -> Any:
        if self.kind == "pickle":  # never reached: load refuses such checkpoints first
            raise AssertionError("a legacy pickled value")
        return codec.decode_value(self.value) if self.kind == "value" else self.value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    d = vars(torch).get(name)  # not getattr: torch lazily imports submodules by name
    if not isinstance(d, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return d


def sharding_text(x: DTensor) -> str:
    names = x.device_mesh.mesh_dim_names or tuple(f"axis{i}" for i in range(x.device_mesh.ndim))
    parts = []
    for n, p in zip(names, x.placements, strict=True):
        parts.append(f"{n}: Shard({p.dim})" if isinstance(p, Shard) else f"{n}: {p}")
    mesh = ", ".join(f"{n}={s}" for n, s in zip(names, x.device_mesh.shape, strict=True))
    return f"mesh({mesh}) " + "{" + ", ".join(parts) + "}"


def describe(tree: Any) -> tuple[list[Leaf], Any, dict[str, torch.Tensor], list[str]]:
    """(leaves, treedef, DCP state dict, failures) for ``tree``; no communication."""
    pairs, treedef = jt.flatten_with_path(tree)
    leaves: list[Leaf] = []
    state: dict[str, torch.Tensor] = {}
    failures: list[str] = []
    for path, x in pairs:
        p = jt.keystr(path)
        if isinstance(x, torch.Tensor):
            leaves.append(Leaf(p, "tensor", tuple(x.shape), dtype_name(x.dtype), sharding=sharding_text(x) if isinstance(x, DTensor) else ""))
            state[p] = x.detach()
        else:
            try:
                leaves.append(Leaf(p, "value", value=codec.encode_value(x)))
            except codec.Unencodable as e:
                failures.append(f"{p}: {e}")
    return leaves, treedef, state, failures


def has_partial(x: torch.Tensor) -> bool:
    return isinstance(x, DTensor) and any(isinstance(p, Partial) for p in x.placements)


def encode_tree(treedef: Any) -> tuple[Any, str]:
    """(the structure as data, "") or (None, why not): a node type outside the registry."""
    try:
        return codec.encode_structure(treedef), ""
    except codec.Unencodable as e:
        return None, str(e)


def decode_tree(content: dict[str, Any]) -> tuple[Any, str]:
    """(treedef, "") or (None, why it cannot be rebuilt here); a ``ValueError`` when it is not a structure."""
    if content["version"] < VERSION:
        return None, "it was written by an older colofn, whose structure this one does not read"
    if content.get("tree") is None:
        return None, str(content.get("tree_note") or "it has node types outside the registry")
    try:
        return codec.decode_structure(content["tree"]), ""
    except codec.Unavailable as e:
        return None, f"it needs {e}"


def legacy_error(path: str, what: str) -> CheckpointError:
    """The refusal of a version-1 checkpoint, with the command that converts one the user trusts."""
    return CheckpointError(
        f"Checkpoint {path} was written by an older colofn: its manifest {MARKER} (version "
        f"{LEGACY_VERSION}) stores {what} as pickles; colofn does not unpickle checkpoint files, since a crafted pickle "
        "runs code. If you trust this checkpoint (you or your job wrote it), convert it once with "
        f"`colofn checkpoint convert --trust {path}` (or colofn.checkpoint.convert(path, trust=True)); "
        "or load it with like= a full tree (every leaf given) when it holds no pickled values"
    )


def file_digest(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def data_files(directory: str) -> list[str]:
    """The files a save wrote (everything but the marker), sorted."""
    return sorted(n for n in os.listdir(directory) if n != MARKER and not n.startswith(MARKER) and os.path.isfile(os.path.join(directory, n)))


def manifest(leaves: list[Leaf], treedef: Any, files: dict[str, Any], world_size: int) -> dict[str, Any]:
    tree, note = encode_tree(treedef)
    return {
        "format": FORMAT,
        "version": VERSION,
        "world_size": world_size,
        "torch": torch.__version__,
        "structure": str(treedef),
        "tree": tree,
        **({"tree_note": note} if note else {}),
        "leaves": [leaf.to_json() for leaf in leaves],
        "files": files,
    }


def write_marker(directory: str, content: dict[str, Any]) -> None:
    """Write the marker atomically (a temporary file renamed) and flush it to disk."""
    part = os.path.join(directory, MARKER + ".part")
    with open(part, "w") as f:
        json.dump(content, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, os.path.join(directory, MARKER))
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def read(path: str) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path``, or a clear error saying what is wrong."""
    if not os.path.exists(path):
        parent = os.path.dirname(path) or "."
        hint = ""
        if os.path.isdir(parent):
            partial = [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(path)}.tmp-")]
            if partial:
                hint = f" (an unfinished save left {partial[0]!r} in {parent}: it is not a checkpoint)"
        raise CheckpointNotFoundError(f"No checkpoint at {path}: the directory does not exist{hint}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint: it is a file, not a directory")
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        raise CheckpointError(
            f"Checkpoint {path} is incomplete: it has no completion marker {MARKER} (the save that "
            "wrote it did not finish, or it was not written by colofn.checkpoint.save). Load an "
            "earlier one: colofn.checkpoint.latest(parent_dir) finds the newest complete checkpoint"
        )
    try:
        with open(marker, encoding="utf-8") as f:
            content = json.load(f)
        if not isinstance(content, dict) or content.get("format") != FORMAT or not isinstance(content.get("leaves"), list):
            raise ValueError(f"format {content.get('format') if isinstance(content, dict) else None!r} is not {FORMAT!r}")
        version = content.get("version", 0)
        if type(version) is not int or version < LEGACY_VERSION:
            raise ValueError(f"version {version!r} is not one colofn writes")
        if version > VERSION:
            raise ValueError(f"version {version} is newer than this colofn reads ({VERSION})")
        content["leaves"] = [Leaf.from_json(d, version) for d in content["leaves"]]
        content["_treedef"], content["_tree_why"] = decode_tree(content)  # underscored: not in the file
        if content["_treedef"] is not None and content["_treedef"].num_leaves != len(content["leaves"]):
            raise ValueError(f"its structure has {content['_treedef'].num_leaves} leaves and it lists {len(content['leaves'])}")
        files = content.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(n, str) and n == os.path.basename(n) and isinstance(v, dict) and type(v.get("size")) is int
            and isinstance(v.get("sha256"), str) for n, v in files.items()
        ):
            raise ValueError("it has no valid list of data files")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt: its manifest {MARKER} cannot be read ({type(e).__name__}: {str(e)[:300]})"
        ) from None
    return content


def damaged_files(path: str, files: dict[str, Any]) -> list[str]:
    """One line per data file that is missing or whose size differs from the manifest (cheap: no reads)."""
    out = []
    for name, want in sorted(files.items()):
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            out.append(f"{name}: missing")
        elif os.path.getsize(f) != want["size"]:
            out.append(f"{name}: {os.path.getsize(f)} bytes, the manifest says {want['size']} (truncated or replaced)")
    return out


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a checkpoint whose save finished (its manifest is present and readable)."""
    try:
        read(os.path.abspath(os.fspath(path)))
    except CheckpointError:
        return False
    return True
