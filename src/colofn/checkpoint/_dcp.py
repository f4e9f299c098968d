"""Reading DCP's files without running code from them.

DCP writes its index, ``.metadata``, as a pickle. :func:`read_metadata` reads
it with an unpickler that admits only the classes such an index is made of
(DCP's metadata dataclasses, ``torch.Size``, dtypes, layouts, paths) and then
checks what it got: every entry a tensor (colofn never saves byte entries,
whose reader would unpickle them), every data file a plain name inside the
checkpoint, no storage transforms. :class:`SafeReader` is DCP's
``FileSystemReader`` with that index; its data path reads tensors with
``torch.load(weights_only=True)`` (torch's own restricted unpickler), and an
error there names the data file.
"""

from __future__ import annotations

import os
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from colofn.errors import CheckpointError

__all__ = ["METADATA", "SafeReader", "read_metadata"]

METADATA = ".metadata"

_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    (_MD, "Metadata"): Metadata,
    (_MD, "TensorStorageMetadata"): TensorStorageMetadata,
    (_MD, "TensorProperties"): TensorProperties,
    (_MD, "ChunkStorageMetadata"): ChunkStorageMetadata,
    (_MD, "MetadataIndex"): MetadataIndex,
    (_MD, "StorageMeta"): StorageMeta,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    (_MD, "_MEM_FORMAT_ENCODING"): _MEM_FORMAT_ENCODING,
}
_LAYOUTS = {str(x): x for x in (torch.strided, torch.sparse_coo)}


def _get_layout(name: str) -> torch.layout:
    """The stand-in for ``torch.serialization._get_layout``: a table lookup, nothing else."""
    if name not in _LAYOUTS:
        raise pickle.UnpicklingError(f"the layout {name!r} is not one DCP writes for dense tensors")
    return _LAYOUTS[name]


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):  # vars: no lazy imports
            return vars(torch)[name]
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _get_layout
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of DCP's metadata")


def read_metadata(path: str) -> Metadata:
    """The DCP index of the checkpoint at ``path``, read safely and checked; a ``CheckpointError`` naming the file otherwise."""
    f = os.path.join(path, METADATA)
    try:
        with open(f, "rb") as fh:
            md = _Unpickler(fh).load()
        _check(md, path)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError) as e:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or not safe to read: its DCP metadata {METADATA} cannot be read "
            f"({type(e).__name__}: {str(e)[:300]}); nothing in it was run"
        ) from None
    return md


def _check(md: Any, path: str) -> None:
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict):
        raise ValueError(f"it holds a {type(md).__name__}, not DCP's Metadata")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(entry, TensorStorageMetadata):
            raise ValueError(f"its entry {key!r} is a {type(entry).__name__}, not a tensor")
    for index, info in md.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise ValueError(f"its storage entry {index!r} is a {type(info).__name__}")
        name = info.relative_path
        if not isinstance(name, str) or not name or name != os.path.basename(name) or name.startswith("."):
            raise ValueError(f"it points at the file {name!r}, which is not a data file inside {path}")
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"it asks for storage transforms {info.transform_descriptors!r}; colofn writes none")


class SafeReader(FileSystemReader):
    """DCP's file reader with :func:`read_metadata`'s index; a failure names the data file."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._root = path

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata: colofn writes only the global one
            raise FileNotFoundError(f"{self._root} has no per-rank DCP metadata")
        md = read_metadata(self._root)
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:  # their reader unpickles; colofn never writes them
                raise CheckpointError(f"Checkpoint {self._root} asks to read a byte entry {item.storage_index.fqn!r}; colofn writes none")
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            try:
                super().read_data(LoadPlan(items, plan.storage_data, plan.planner_data), planner).wait()
            except Exception as e:  # noqa: BLE001 - reported with the file
                text = f"{type(e).__name__}: " + str(e).strip().split("\n")[0][:300]
                raise CheckpointError(
                    f"Checkpoint {self._root} is corrupt or not safe to read: its data file "
                    f"{name} cannot be read ({text}); nothing in it was run"
                ) from e
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

