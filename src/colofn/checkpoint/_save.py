"""``save``: write a pytree with ``torch.distributed.checkpoint``, atomically.

Order of a save, on every rank (rank 0 alone does the file-system steps):

1. validate the tree and the path (no communication yet);
2. rank 0 makes a temporary sibling directory ``.<name>.tmp-<random>`` and
   broadcasts its name;
3. ``torch.distributed.checkpoint.save`` writes the tensors into it (every rank
   its own shards; DCP deduplicates replicated tensors);
4. every rank hashes a share of the files; rank 0 gathers the digests, writes
   the completion marker (the manifest) and renames the directory into place;
5. rank 0 broadcasts the outcome, so every rank returns or raises together.

A failure anywhere before the rename leaves ``path`` as it was (absent, or the
previous checkpoint); rank 0 removes the temporary directory when it can.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate

from colofn.checkpoint import _manifest
from colofn.checkpoint._comm import all_to_rank0, broadcast, world
from colofn.errors import CheckpointError, CheckpointSaveError, TreeTypeError, format_failures

__all__ = ["save"]


def save(path: str | os.PathLike[str], tree: Any, *, overwrite: bool = False) -> str:
    """Save ``tree`` (DTensors, tensors and plain values) to the directory ``path``; returns ``path``.

    Every rank calls it with its own shards (SPMD); the directory must be on a
    file system all ranks share. The save is atomic: ``path`` appears, complete
    with its marker, only when every rank has written its data; a failure on any
    rank leaves ``path`` as it was. Plain values (step counters, config
    entries) go into the manifest: JSON when they are bool/int/float/str,
    pickled otherwise. Pending reductions (``Partial`` DTensors) are reduced first.

    Args:
      path: the checkpoint directory to create (its parent is created if missing).
      tree: the pytree to save.
      overwrite: replace an existing checkpoint at ``path`` (otherwise an error).
        The old one is renamed aside, the new one renamed in, then the old removed.

    Raises:
      CheckpointError: ``path`` exists (without ``overwrite``).
      TreeTypeError: a leaf that can be neither saved as a tensor nor pickled.
      CheckpointSaveError: writing failed on some rank (``path`` untouched);
        ``failures`` maps ranks to their errors. Other errors of a failing rank
        (a deadlock after a peer died, say) keep their type, with a note.
    """
    path = os.path.abspath(os.fspath(path))
    leaves, treedef, state, failures = _manifest.describe(tree)
    if failures:
        raise TreeTypeError(format_failures(f"colofn.checkpoint.save({path!r}): {len(failures)} leaf(s) cannot be saved:", failures))
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(
            f"colofn.checkpoint.save: {path} already exists; pass overwrite=True to replace it, "
            "or save each step to its own directory (step_000100, ...)"
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"colofn.checkpoint.save: {path} exists and is a file, not a checkpoint directory")
    rank, size = world()
    parent, base = os.path.dirname(path), os.path.basename(path)
    tmp = None
    if rank == 0:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        tmp = broadcast(tmp)
        state = {k: _reduced(v) for k, v in state.items()}
        _dcp_save(state, tmp)
        names = _manifest.data_files(tmp)
        mine = {n: _manifest.file_digest(os.path.join(tmp, n)) for n in names[rank::size]}
        gathered = all_to_rank0(mine)
        outcome: str | None = None
        failed: BaseException | None = None
        if rank == 0:
            assert gathered is not None and tmp is not None
            files = {k: v for part in gathered for k, v in part.items()}
            try:
                _finalize(tmp, path, overwrite, _manifest.manifest(leaves, treedef, files, size))
            except BaseException as e:  # noqa: BLE001 - reported to every rank below
                outcome, failed = f"{type(e).__name__}: {e}", e
        outcome = broadcast(outcome)
        if rank == 0 and failed is not None:
            raise failed
        if outcome is not None:
            raise CheckpointError(f"colofn.checkpoint.save({path!r}) failed on rank 0: {outcome}")
    except BaseException as e:
        if rank == 0 and tmp is not None and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        by_rank = _dcp_failures(e)
        if by_rank is not None:  # DCP's own error type is a BaseException: make it an ordinary one
            text = "; ".join(f"rank {r}: {type(x).__name__}: {x}" for r, x in sorted(by_rank.items()))
            raise CheckpointSaveError(
                f"colofn.checkpoint.save({path!r}) failed on rank(s) {sorted(by_rank)} ({text}); "
                f"{path} was left as it was",
                by_rank,
            ) from e
        if hasattr(e, "add_note"):
            e.add_note(f"colofn.checkpoint.save({path!r}) did not complete; {path} was left as it was")
        raise
    return path


def _dcp_failures(e: BaseException) -> dict[int, BaseException] | None:
    """The per-rank exceptions inside DCP's ``CheckpointException``, or None for any other error."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(e, CheckpointException):
        return None
    out = {}
    for r, wrapped in e.failures.items():
        exc = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        out[int(r)] = exc if isinstance(exc, BaseException) else RuntimeError(str(exc))
    return out


def _reduced(x: torch.Tensor) -> torch.Tensor:
    if _manifest.has_partial(x):
        assert isinstance(x, DTensor)
        return x.redistribute(x.device_mesh, [Replicate() if isinstance(p, Partial) else p for p in x.placements])
    return x


def _dcp_save(state: dict[str, torch.Tensor], directory: str) -> None:
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(directory)
    dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())


def _finalize(tmp: str, path: str, overwrite: bool, content: dict[str, Any]) -> None:
    """Rank 0: write the marker, then rename the finished directory into place."""
    _manifest.write_marker(tmp, content)
    parent = os.path.dirname(path)
    old = None
    if os.path.exists(path):
        if not overwrite:
            raise CheckpointError(f"{path} appeared while saving; not overwriting it")
        old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, old)
    os.rename(tmp, path)
    _manifest.fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
