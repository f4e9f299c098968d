"""``load``: read a checkpoint into the shardings of ``like`` (any mesh, any world size)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Placement

from colofn import tree as jt
from colofn.checkpoint import _dcp, _manifest
from colofn.checkpoint._comm import all_gather, world
from colofn.errors import CheckpointError, TreeError, format_failures
from colofn.mesh import current_mesh
from colofn.partition_spec import PartitionSpec
from colofn.sharding import NamedSharding, check_spec

__all__ = ["load"]


@dataclass(frozen=True)
class _Target:
    """What one saved leaf becomes: a DTensor, a plain tensor, or a plain value."""

    kind: str  # "dtensor" | "tensor" | "value"
    device_mesh: Any = None
    placements: tuple[Placement, ...] = ()
    device: torch.device | None = None


def _like_leaf(x: Any) -> bool:
    return isinstance(x, torch.Tensor | NamedSharding | PartitionSpec)


def load(path: str | os.PathLike[str], like: Any = None, *, verify: bool = True) -> Any:
    """Load the checkpoint at ``path``, laid out like ``like``.

    Args:
      path: a directory written by :func:`colofn.checkpoint.save`.
      like: where each tensor goes. A pytree with the saved structure whose
        tensor leaves are DTensors (load into their mesh and placements),
        plain tensors (the full value, on their device), ``NamedSharding``s or
        ``P``s (a DTensor with that sharding; a ``P`` is on the ambient mesh);
        plain-value leaves are placeholders replaced by the saved values. It
        may also be a pytree *prefix* whose leaves are shardings (``like=P()``:
        every tensor replicated). None: every tensor as a plain full tensor.
        The mesh and world size may differ from the ones that saved.
      verify: check every data file's SHA-256 against the manifest (each rank
        hashes a share of the files). Sizes are always checked.

    Returns:
      A new pytree with the saved structure (``like`` is not modified).

    Nothing in the files is run: the manifest is JSON data, DCP's
    ``.metadata`` is read with a restricted unpickler and the tensors with
    ``torch.load(weights_only=True)`` (see ``docs/security.md``).

    Raises:
      CheckpointNotFoundError: no directory at ``path``.
      CheckpointError: the checkpoint is incomplete (no marker); its manifest,
        ``.metadata`` or a data file is corrupt, missing or crafted (the file
        named); it is of the older pickled format (the message gives the
        conversion command); or ``like`` does not match it (each mismatching
        leaf path named).
    """
    path = os.path.abspath(os.fspath(path))
    content = _manifest.read(path)
    leaves: list[_manifest.Leaf] = content["leaves"]
    pickled = [leaf.path for leaf in leaves if leaf.kind == "pickle"]
    if pickled:
        raise _manifest.legacy_error(path, f"the values of {', '.join(pickled[:3])}{' ...' if len(pickled) > 3 else ''}")
    targets, out_def = _match(path, content, leaves, content["_treedef"], content["_tree_why"], like)
    _check_files(path, content["files"], verify)
    state: dict[str, torch.Tensor] = {}
    for leaf, t in zip(leaves, targets, strict=True):
        if leaf.kind == "tensor":
            state[leaf.path] = _allocate(leaf, t)
    if state:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        _dcp.read_metadata(path)  # a crafted or damaged index is named here, before DCP's collectives
        try:
            dcp.load(state, storage_reader=_dcp.SafeReader(path), no_dist=not dist.is_initialized())
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - reported with the path
            inner = [w[0] if isinstance(w, tuple) else w for w in getattr(e, "failures", {}).values()]
            cause = inner[0] if inner and isinstance(inner[0], BaseException) else e
            if isinstance(cause, CheckpointError):
                raise CheckpointError(str(cause)) from e
            text = f"{type(cause).__name__}: " + str(cause).strip().split("\n")[0][:300]
            raise CheckpointError(
                f"Checkpoint {path} is corrupt: reading its tensor data failed ({text}); "
                "a data file was damaged or replaced after the save"
            ) from e
    values = [state[leaf.path] if leaf.kind == "tensor" else leaf.python_value() for leaf in leaves]
    return jt.unflatten(out_def, values)


def _match(path: str, content: dict[str, Any], leaves: list[_manifest.Leaf], treedef: Any, why: str, like: Any) -> tuple[list[_Target], Any]:
    """One target per saved leaf, and the tree structure to return; every mismatch named."""
    saved_paths = [leaf.path for leaf in leaves]
    if treedef is None and like is None:
        if content["version"] < _manifest.VERSION:
            raise _manifest.legacy_error(path, "its tree structure")
        raise CheckpointError(
            f"Checkpoint {path}: the tree structure in its manifest {_manifest.MARKER} ({content.get('structure')}) cannot be rebuilt "
            f"here: {why}; pass like= with the whole structure (a template for every leaf)"
        )
    if like is None:
        return [_Target("value" if leaf.kind != "tensor" else "tensor") for leaf in leaves], treedef
    if treedef is not None:
        skeleton = jt.unflatten(treedef, range(len(leaves)))
        try:
            per_leaf = jt.broadcast_prefix(like, skeleton, is_leaf=_like_leaf, prefix_name="like", full_name="the checkpoint's tree")
        except TreeError as e:
            raise CheckpointError(
                f"Checkpoint {path} does not match like: its tree is {content.get('structure')}\n{e}"
            ) from None
        out_def = treedef
    else:
        pairs, out_def = jt.flatten_with_path(like, is_leaf=_like_leaf)
        like_paths = [jt.keystr(p) for p, _ in pairs]
        if like_paths != saved_paths:
            if content["version"] < _manifest.VERSION:
                raise _manifest.legacy_error(path, "its tree structure")
            missing = [p for p in saved_paths if p not in like_paths]
            extra = [p for p in like_paths if p not in saved_paths]
            raise CheckpointError(
                format_failures(
                    f"Checkpoint {path} does not match like (its structure cannot be rebuilt here: {why}, "
                    "so like must give every leaf):",
                    [f"in the checkpoint, not in like: {p}" for p in missing] + [f"in like, not in the checkpoint: {p}" for p in extra],
                )
            )
        per_leaf = [x for _, x in pairs]
    failures: list[str] = []
    targets = [_target(leaf, x, failures) for leaf, x in zip(leaves, per_leaf, strict=True)]
    if failures:
        raise CheckpointError(
            format_failures(
                f"Checkpoint {path} does not match like ({len(failures)} leaf(s)):",
                failures,
                fix="give like the saved shapes and dtypes (the manifest lists them), or a sharding "
                "(NamedSharding / P) to take them from the checkpoint",
            )
        )
    return targets, out_def


def _target(leaf: _manifest.Leaf, x: Any, failures: list[str]) -> _Target:
    p = leaf.path
    if leaf.kind != "tensor":
        if isinstance(x, torch.Tensor):
            failures.append(f"{p}: the checkpoint has a plain value there, like has a tensor {tuple(x.shape)}")
        return _Target("value")
    what = f"{leaf.dtype}{list(leaf.shape)}"
    if isinstance(x, torch.Tensor):
        bad = []
        if tuple(x.shape) != leaf.shape:
            bad.append(f"shape {list(x.shape)}")
        if _manifest.dtype_name(x.dtype) != leaf.dtype:
            bad.append(f"dtype {_manifest.dtype_name(x.dtype)}")
        if bad:
            failures.append(f"{p}: the checkpoint has {what}, like has {' and '.join(bad)}")
        if isinstance(x, DTensor):
            return _Target("dtensor", x.device_mesh, tuple(x.placements))
        return _Target("tensor", device=x.device)
    if isinstance(x, NamedSharding | PartitionSpec):
        mesh = x.mesh if isinstance(x, NamedSharding) else current_mesh()
        if mesh is None:
            failures.append(f"{p}: the spec {x} needs a mesh: load inside `with mesh:` or give a NamedSharding")
            return _Target("tensor")
        spec = x.spec if isinstance(x, NamedSharding) else x
        bad = check_spec(p, spec, mesh, leaf.shape)
        failures += [f"{b} (checkpoint has {what})" for b in bad]
        if bad:
            return _Target("tensor")
        return _Target("dtensor", mesh.device_mesh, NamedSharding(mesh, spec).to_placements(len(leaf.shape)))
    failures.append(f"{p}: the checkpoint has a tensor {what} there, like has a {type(x).__name__} {x!r:.40}")
    return _Target("tensor")


def _allocate(leaf: _manifest.Leaf, t: _Target) -> torch.Tensor:
    dtype = _manifest.dtype_of(leaf.dtype)
    if t.kind == "dtensor":
        from torch.distributed.tensor import empty

        return empty(leaf.shape, dtype=dtype, device_mesh=t.device_mesh, placements=t.placements)
    return torch.empty(leaf.shape, dtype=dtype, device=t.device or "cpu")


def _check_files(path: str, files: dict[str, Any], verify: bool) -> None:
    """Every data file present with its size; with ``verify`` its hash (each rank a share)."""
    failures = _manifest.damaged_files(path, files)
    if not failures and verify:
        rank, size = world()
        names = sorted(files)
        mine = [
            f"{n}: content differs from the save (SHA-256 {got[:12]}..., the manifest says {files[n]['sha256'][:12]}...)"
            for n in names[rank::size]
            if (got := _manifest.file_digest(os.path.join(path, n))["sha256"]) != files[n]["sha256"]
        ]
        failures = [f for part in all_gather(mine) for f in part]
    if failures:
        raise CheckpointError(
            format_failures(
                f"Checkpoint {path} is corrupt: {len(failures)} data file(s) do not match its manifest:",
                failures,
                fix="restore the directory from a copy, or load an earlier checkpoint",
            )
        )
