"""``save``: write a pytree with ``torch.distributed.checkpoint``, atomically.

Order of a save, on every rank (rank 0 alone does the file-system steps):

1. validate the tree (no communication yet), then check that every rank was
   given the same path (one all-gather) and that it can be written;
2. rank 0 makes a temporary sibling directory ``.<name>.tmp-<random>`` with an
   owner file (pid, host, boot id, process start time) and broadcasts its
   name, or the error that stopped it;
3. ``torch.distributed.checkpoint.save`` writes the tensors into it (every rank
   its own shards; DCP deduplicates replicated tensors);
4. every rank hashes a share of the files; rank 0 gathers the digests, writes
   the completion marker (the manifest) and renames the directory into place;
5. rank 0 broadcasts the outcome, so every rank returns or raises together;
   after a success it removes temporary directories of earlier saves to the
   same parent whose owner process is provably dead (:mod:`._stale`).

A failure anywhere before the rename leaves ``path`` as it was (absent, or the
previous checkpoint); rank 0 removes the temporary directory when it can.
Every exchange between ranks is a tensor of JSON (:mod:`._comm`).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate

from colofn.checkpoint import _manifest, _stale
from colofn.checkpoint._comm import all_gather, all_to_rank0, broadcast, world
from colofn.errors import CheckpointError, CheckpointSaveError, TreeTypeError, format_failures

__all__ = ["save"]


def save(path: str | os.PathLike[str], tree: Any, *, overwrite: bool = False) -> str:
    """Save ``tree`` (DTensors, tensors and plain values) to the directory ``path``; returns ``path``.

    Every rank calls it with its own shards (SPMD); the directory must be on a
    file system all ranks share. The save is atomic: ``path`` appears, complete
    with its marker, only when every rank has written its data; a failure on any
    rank leaves ``path`` as it was. Plain values (step counters, config
    entries: bool, int, float, str, bytes, ``torch.dtype``, ``torch.device``)
    and the tree structure go into the manifest as JSON data, never pickles.
    Pending reductions (``Partial`` DTensors) are reduced first.

    Args:
      path: the checkpoint directory to create (its parent is created if missing).
      tree: the pytree to save.
      overwrite: replace an existing checkpoint at ``path`` (otherwise an error).
        The old one is renamed aside, the new one renamed in, then the old removed.

    Raises:
      TreeTypeError: a leaf that is neither a tensor nor a plain value (its path named).
      CheckpointError: ``path`` exists (without ``overwrite``), or the ranks
        were given different paths (raised on every rank).
      CheckpointSaveError: the directory cannot be created (its parent is a
        file or not writable) or writing failed on some rank (a full disk is
        said so); ``path`` is untouched; ``failures`` maps ranks to their
        errors. Other errors of a failing rank (a deadlock after a peer died,
        say) keep their type, with a note.
    """
    path = os.path.abspath(os.fspath(path))
    leaves, treedef, state, failures = _manifest.describe(tree)
    if failures:
        raise TreeTypeError(format_failures(f"colofn.checkpoint.save({path!r}): {len(failures)} leaf(s) cannot be saved:", failures))
    rank, size = world()
    _check_same_path(path, overwrite, rank)
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(
            f"colofn.checkpoint.save: {path} already exists; pass overwrite=True to replace it, "
            "or save each step to its own directory (step_000100, ...)"
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"colofn.checkpoint.save: {path} exists and is a file, not a checkpoint directory")
    prepared = broadcast(_prepare(path) if rank == 0 else None)
    if "error" in prepared:
        cause = OSError(prepared["errno"], prepared["strerror"], prepared["filename"])
        raise CheckpointSaveError(prepared["error"], {0: cause})
    tmp, parent = prepared["tmp"], os.path.dirname(path)
    try:
        state = {k: _reduced(v) for k, v in state.items()}
        _dcp_save(state, tmp)
        names = _manifest.data_files(tmp)
        mine = {n: _manifest.file_digest(os.path.join(tmp, n)) for n in names[rank::size]}
        gathered = all_to_rank0(mine)
        outcome: dict[str, Any] | None = None
        failed: BaseException | None = None
        if rank == 0:
            assert gathered is not None
            files = {k: v for part in gathered for k, v in part.items()}
            try:
                _finalize(tmp, path, overwrite, _manifest.manifest(leaves, treedef, files, size))
            except OSError as e:  # the marker or the renames: a full disk, a vanished directory, ...
                failed = e
                outcome = {"text": f"colofn.checkpoint.save({path!r}) failed on rank 0 while finishing the save "
                           f"({type(e).__name__}: {e}){_disk_hint(e, parent)}; {path} was left as it was"}
            except BaseException as e:  # noqa: BLE001 - reported to every rank below
                failed, outcome = e, {"text": f"colofn.checkpoint.save({path!r}) failed on rank 0: {type(e).__name__}: {e}"}
        outcome = broadcast(outcome)
        if rank == 0 and failed is not None and not isinstance(failed, OSError):
            raise failed
        if outcome is not None:
            raise CheckpointSaveError(outcome["text"], {0: failed if failed is not None else RuntimeError(outcome["text"])}) from failed
    except BaseException as e:
        if rank == 0 and tmp is not None and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        by_rank = _dcp_failures(e)
        if by_rank is not None:  # DCP's own error type is a BaseException: make it an ordinary one
            text = "; ".join(f"rank {r}: {type(x).__name__}: {x}" for r, x in sorted(by_rank.items()))
            hint = next((h for x in by_rank.values() if (h := _disk_hint(x, parent))), "")
            raise CheckpointSaveError(
                f"colofn.checkpoint.save({path!r}) failed on rank(s) {sorted(by_rank)} ({text}){hint}; "
                f"{path} was left as it was",
                by_rank,
            ) from e
        if hasattr(e, "add_note"):
            e.add_note(f"colofn.checkpoint.save({path!r}) did not complete; {path} was left as it was")
        raise
    if rank == 0:
        _stale.remove_dead(parent)
    return path


def _check_same_path(path: str, overwrite: bool, rank: int) -> None:
    """Every rank raises when the ranks were given different paths (or ``overwrite`` flags)."""
    asked = all_gather([path, overwrite])
    if any(a != asked[0] for a in asked):
        raise CheckpointError(
            format_failures(
                f"colofn.checkpoint.save: the ranks were given different paths (this is rank {rank}); "
                "a checkpoint is one directory that every rank writes its shards into:",
                [f"rank {r}: {p!r}" + (", overwrite=True" if o else "") for r, (p, o) in enumerate(asked)],
                fix="pass the same path on every rank (compute it from the step, not from the rank)",
            )
        )


def _prepare(path: str) -> dict[str, Any]:
    """Rank 0: the temporary directory (with its owner file) as ``{"tmp": ...}``, or the error as data."""
    parent, base = os.path.dirname(path), os.path.basename(path)
    try:
        blocker = _file_in_the_way(parent)
        if blocker is not None:
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory (a file is in the way)", blocker)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
        _stale.write_owner(tmp)
    except OSError as e:
        where = e.filename or parent
        if isinstance(e, NotADirectoryError | FileExistsError):
            why = f"{where} is a file, not a directory"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = f"{where} is not writable ({'a read-only file system' if e.errno == errno.EROFS else 'permission denied'})"
        else:
            why = f"{type(e).__name__}: {e}"
        return {
            "error": f"colofn.checkpoint.save({path!r}) cannot create the checkpoint: {why}{_disk_hint(e, parent)}; "
            "nothing was written",
            "errno": e.errno, "strerror": e.strerror, "filename": str(where),
        }
    return {"tmp": tmp}


def _file_in_the_way(directory: str) -> str | None:
    """The nearest existing ancestor of ``directory`` (itself included) when it is not a directory."""
    d = directory
    while not os.path.exists(d):
        up = os.path.dirname(d)
        if up == d:
            return None
        d = up
    return None if os.path.isdir(d) else d


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _disk_hint(e: BaseException, parent: str) -> str:
    """A note on free space when ``e`` is a full disk (ENOSPC, EDQUOT) or torch's zip writer failing to write, else ""."""
    full = isinstance(e, OSError) and e.errno in _DISK_FULL
    cut_short = "unexpected pos" in str(e) or "failed writing file" in str(e)  # torch's writer, when a write fails
    if not (full or cut_short):
        return ""
    try:
        free = f"{shutil.disk_usage(parent).free} bytes free"
    except OSError:  # pragma: no cover
        free = "free space unknown"
    if full:
        return f"; the file system of {parent} is full ({free})"
    return f"; a data file could not be written in full: is the disk full? ({free} on the file system of {parent})"


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
    _stale.remove_owner(tmp)
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
