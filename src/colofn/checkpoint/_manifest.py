"""The completion marker of a checkpoint: a JSON manifest of the tree it holds.

A checkpoint directory is complete exactly when it holds :data:`MARKER`. The
manifest records the tree structure, every leaf's path and kind (tensor: shape,
dtype, sharding when saved; value: the value itself) and every data file's
size and SHA-256, so a load can name the leaf or the file that is wrong.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Shard

from colofn import tree as jt
from colofn.errors import CheckpointError, CheckpointNotFoundError

MARKER = "colofn_checkpoint.json"
FORMAT = "colofn.checkpoint"
VERSION = 1
_JSON_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class Leaf:
    """One leaf of a saved tree, as the manifest records it."""

    path: str
    kind: str  # "tensor" | "json" | "pickle"
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
    def from_json(cls, d: dict[str, Any]) -> Leaf:
        if d["kind"] == "tensor":
            return cls(d["path"], "tensor", tuple(int(s) for s in d["shape"]), str(d["dtype"]), sharding=d.get("sharding", ""))
        if d["kind"] not in ("json", "pickle"):
            raise ValueError(f"unknown leaf kind {d['kind']!r}")
        return cls(d["path"], d["kind"], value=d["value"])

    def python_value(self) -> Any:
        if self.kind == "pickle":
            return pickle.loads(base64.b64decode(self.value))
        return self.value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
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
        elif isinstance(x, _JSON_TYPES) and json.loads(json.dumps(x)) == x and type(json.loads(json.dumps(x))) is type(x):
            leaves.append(Leaf(p, "json", value=x))
        else:
            try:
                blob = pickle.dumps(x)
            except Exception as e:  # noqa: BLE001 - reported with the leaf path
                failures.append(f"{p}: a {type(x).__name__} that cannot be pickled ({e})")
                continue
            leaves.append(Leaf(p, "pickle", value=base64.b64encode(blob).decode("ascii")))
    return leaves, treedef, state, failures


def has_partial(x: torch.Tensor) -> bool:
    return isinstance(x, DTensor) and any(isinstance(p, Partial) for p in x.placements)


def encode_treedef(treedef: Any) -> str:
    try:
        return base64.b64encode(pickle.dumps(treedef)).decode("ascii")
    except Exception:  # noqa: BLE001 - a node type that cannot be pickled: like must then be a full tree
        return ""


def decode_treedef(text: str) -> Any:
    if not text:
        return None
    try:
        return pickle.loads(base64.b64decode(text))
    except Exception:  # noqa: BLE001 - a node type not importable here: like must then be a full tree
        return None


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
    return {
        "format": FORMAT,
        "version": VERSION,
        "world_size": world_size,
        "torch": torch.__version__,
        "structure": str(treedef),
        "treedef": encode_treedef(treedef),
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
        with open(marker) as f:
            content = json.load(f)
        if content.get("format") != FORMAT or not isinstance(content.get("leaves"), list):
            raise ValueError(f"format {content.get('format')!r} is not {FORMAT!r}")
        if int(content.get("version", 0)) > VERSION:
            raise ValueError(f"version {content['version']} is newer than this colofn reads ({VERSION})")
        content["leaves"] = [Leaf.from_json(d) for d in content["leaves"]]
        files = content.get("files")
        if not isinstance(files, dict):
            raise ValueError("it has no list of data files")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"Checkpoint {path} is corrupt: its manifest {MARKER} cannot be read ({type(e).__name__}: {e})") from None
    return content


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a checkpoint whose save finished (its manifest is present and readable)."""
    try:
        read(os.path.abspath(os.fspath(path)))
    except CheckpointError:
        return False
    return True
