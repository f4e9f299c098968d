"""The real world: every rank a process in a ``torch.distributed`` job on this machine.

Used by ``colofn.launch(fn, world_size=N, backend="gloo")``. Processes are started
with the ``spawn`` method, meet through a ``FileStore`` in a private temporary
directory (no ports to race for) and run with a collective timeout, so a hang
becomes an error instead of gloo's default 30-minute wait.

What this module promises (``docs/security.md``):

* **Results come back as data.** A rank sends its return value as
  ``torch.save`` bytes over a pipe and the launcher reads them with
  ``torch.load(weights_only=True)``: tensors, numbers, strings, None and
  lists, tuples and dicts of them. An exception comes back as its type name,
  message, notes and traceback text and is rebuilt only as a builtin or
  :mod:`colofn.errors` type (else a :class:`~colofn.errors.RankError` keeping
  the text). The launcher never unpickles what a rank sent.
* **Ranks do not outlive their launcher.** Each rank watches its parent
  (``os.getppid()`` every 0.1 s, which also works when ``launch`` runs in a
  thread, unlike ``PR_SET_PDEATHSIG``); when the launcher dies, by SIGTERM,
  SIGKILL or anything else, the rank removes the world's directory and exits.
  A directory left anyway (every process of the world killed at once) is named
  after its launcher's pid and start time, and the next ``launch`` removes it
  once that launcher is provably gone.
* **Failures say what each rank was doing**, through the status board
  (:mod:`colofn._world.board`); ranks that call different collectives at the
  same point are stopped by the launcher as soon as the board shows it.
"""

from __future__ import annotations

import builtins
import datetime
import io
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import connection
from typing import Any

import torch
import torch.multiprocessing as mp

from colofn import _procinfo, errors
from colofn._world import board
from colofn.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    RankError,
    TreeTypeError,
    WorldError,
)

PREFIX = "colofn-world-"
PARENT_POLL = 0.1  # seconds between a rank's checks that its launcher lives
_OK, _RAISED = b"\x01", b"\x00"


# ----------------------------------------------------------------------------- rank side


def rank_threads(size: int, env: Any = os.environ) -> int:
    """Intra-op threads for each of ``size`` ranks on this machine: their share of its cores.

    Every rank process would otherwise start one thread per core, and ``size``
    ranks would oversubscribe the machine ``size`` times (a step on 4 ranks of
    a 2-core machine ran ~40x slower). torchrun sets ``OMP_NUM_THREADS=1`` for
    the same reason; a value the user set is kept.

    >>> rank_threads(4, env={"OMP_NUM_THREADS": "3"})
    3
    >>> rank_threads(10_000, env={})
    1
    """
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // size)


def _worker(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rank: int,
    size: int,
    world_dir: str,
    backend: str,
    timeout: float,
    out: connection.Connection,
    parent: int,
) -> None:
    import torch.distributed as dist

    _watch_parent(parent, world_dir, rank)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size))
    torch.set_num_threads(rank_threads(size))
    b: board.Board | None = None
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{os.path.join(world_dir, 'store')}",
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        b = board.from_file(os.path.join(world_dir, "board"), rank, size, timeout)
        b.backend = backend
        board.install(b)
        value = fn(*args, **kwargs)
        payload = _OK + encode_value(value, rank)
        b.exited("returned")
    except BaseException as e:  # noqa: BLE001 - sent to the launcher
        tb = traceback.format_exc()
        if b is not None:  # before the group goes: peers that fail on it read this
            b.exited(f"raised {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        payload = _RAISED + encode_exception(e, tb)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown of a failed world
        pass
    out.send_bytes(payload)
    out.close()


def _watch_parent(parent: int, world_dir: str, rank: int) -> None:
    """End this rank (and remove the world's directory) when the launcher dies."""

    def gone() -> None:
        shutil.rmtree(world_dir, ignore_errors=True)
        try:
            os.write(2, f"colofn: rank {rank}: the launcher (pid {parent}) died; this rank exits\n".encode())
        finally:
            os._exit(1)

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        gone()

    if os.getppid() != parent:
        gone()
    threading.Thread(target=loop, name="colofn-parent-watch", daemon=True).start()


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    """Load data the launcher was sent: tensors and plain containers only, never code."""
    return torch.load(io.BytesIO(data), weights_only=True)


SENDABLE = (
    "tensors, numbers, str, None, torch dtypes and sizes, and lists, tuples and dicts of them "
    "(no DTensor: return .full_tensor() or .to_local(); no custom classes)"
)


def encode_value(value: Any, rank: int) -> bytes:
    """A rank's result as bytes the launcher can load safely; a clear error if it cannot be."""
    try:
        data = _to_bytes(value)
        _from_bytes(data)  # what the launcher will do: fail here, where the traceback is useful
    except Exception as e:  # noqa: BLE001 - reworded: what may be returned
        m = re.search(r"WeightsUnpickler error: ([^\n]+)", str(e))  # torch's own first line is advice
        reason = m.group(1) if m else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TreeTypeError(
            f"rank {rank} returned a {type(value).__name__} that launch cannot send back to the launcher "
            f"({reason}). Results travel as data, never as pickled objects: a rank may return {SENDABLE}."
        ) from None
    return data


def encode_exception(e: BaseException, tb: str) -> bytes:
    args: list[Any] | None = list(e.args)
    try:
        _from_bytes(_to_bytes(args))
    except Exception:  # noqa: BLE001 - args that are not plain data: keep the message only
        args = None
    info = {
        "type": f"{type(e).__module__}.{type(e).__qualname__}",
        "message": str(e),
        "args": args,
        "notes": [str(n) for n in getattr(e, "__notes__", [])],
        "traceback": tb,
    }
    return _to_bytes(info)


def _allowed_type(name: str) -> type[BaseException] | None:
    module, _, qual = name.rpartition(".")
    obj = getattr(builtins, qual, None) if module == "builtins" else getattr(errors, qual, None) if module == "colofn.errors" else None
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def decode_exception(data: bytes, rank: int) -> tuple[BaseException, str]:
    """Rebuild a rank's exception from its description: an allowlisted type, or a RankError."""
    try:
        info = _from_bytes(data)
        name, message, args, tb = info["type"], info["message"], info["args"], info["traceback"]
    except Exception as e:  # noqa: BLE001 - a damaged report
        return RankError(f"rank {rank} failed and its report could not be read ({e})", rank), ""
    exc: BaseException | None = None
    cls = _allowed_type(name)
    if cls is not None:
        try:
            exc = cls(*args) if args is not None else cls(message)
        except Exception:  # noqa: BLE001 - a constructor with other arguments
            exc = None
    if exc is None:
        exc = RankError(f"{name}: {message}", rank, name, tb)
    for note in info.get("notes", []):
        exc.add_note(note)
    return exc, tb


# ----------------------------------------------------------------------------- launcher side


_SECONDARY = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|[Tt]imed out|Read error|Write error|"
    r"NCCL communicator was aborted"
)


def _secondary(e: BaseException) -> bool:
    """Whether ``e`` is a transport error that another rank's failure can cause."""
    return isinstance(e, RuntimeError) and bool(_SECONDARY.search(str(e)))


def _priority(e: BaseException) -> int:
    """Which rank's failure to raise: the root cause first, its consequences last."""
    if isinstance(e, CollectiveMismatchError):
        return 1
    if isinstance(e, RankError) and e.type_name is None:  # died without a result
        return 2
    if isinstance(e, errors.CollectiveError | CollectiveTimeoutError | errors.DeadlockError) or _secondary(e):
        return 3
    return 0


def check_picklable(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], backend: str) -> None:
    """Everything a spawned rank receives is pickled: say what cannot be, before anything starts."""
    fix = (
        "Define the function at module level (a `def` at the top of a module that the new processes can "
        "import, not a lambda, a nested function or a function typed into `python -c` or an interactive "
        "session) and pass what it needs as arguments."
    )
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) == "__main__" and not getattr(main, "__file__", None):
        raise WorldError(
            f"launch(backend={backend!r}) starts new processes that import the function by name, and "
            f"{getattr(fn, '__qualname__', fn)!r} was defined in `__main__` of an interactive session or "
            f"`python -c`, which they cannot import. {fix}"
        )
    items = [("the function", fn)] + [(f"argument {i}", a) for i, a in enumerate(args)]
    items += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for what, obj in items:
        try:
            pickle.dumps(obj)
        except Exception as e:  # noqa: BLE001 - pickling fails in many ways
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            raise WorldError(
                f"launch(backend={backend!r}) sends {what} to new processes by pickling it, and "
                f"{getattr(obj, '__qualname__', type(obj).__name__)!r} cannot be pickled ({reason}). "
                + (fix if obj is fn else "Pass plain data (tensors, numbers, str, containers) or instances of module-level classes.")
            ) from None


def _owner_tag() -> str:
    stat = _procinfo.stat(os.getpid())
    return f"{_procinfo.pid_namespace()}.{os.getpid()}.{stat[1] if stat else 0}"


_DIR_NAME = re.compile(re.escape(PREFIX) + r"(\d+)\.(\d+)\.(\d+)-[\w-]+")


def _launcher_gone(ns: int, pid: int, start: int) -> bool:
    return ns == _procinfo.pid_namespace() and _procinfo.gone(pid, start)  # another namespace: cannot tell


def sweep(parent: str | None = None) -> list[str]:
    """Remove world directories whose launcher is provably gone; returns the paths removed."""
    parent = parent or tempfile.gettempdir()

    def dead(name: str) -> bool:
        m = _DIR_NAME.fullmatch(name)
        return m is not None and _launcher_gone(*map(int, m.groups()))

    return [os.path.join(parent, name) for name in _procinfo.remove_dirs(parent, dead)]


def _died(rank: int, proc: Any, status: board.Status) -> RankError:
    code = proc.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with code {code}"
    return RankError(f"rank {rank} {how} without a result; its last report: {status.describe()}", rank)


def _board_mismatch(states: list[board.Status]) -> str | None:
    for s in states:
        if s.state == "waiting":
            text = board.mismatch([t if t.state == "waiting" else board.Status("unknown") for t in states], s)
            if text is not None:
                return text
    return None


def run(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    world_size: int,
    timeout: float,
    backend: str,
) -> list[Any]:
    check_picklable(fn, args, kwargs, backend)
    sweep()
    ctx = mp.get_context("spawn")
    world_dir = tempfile.mkdtemp(prefix=f"{PREFIX}{_owner_tag()}-")
    board_path = os.path.join(world_dir, "board")
    values: dict[int, Any] = {}
    failures: list[tuple[int, BaseException, str]] = []
    procs: list[Any] = []
    finished = False
    try:
        board.create_file(board_path, world_size)
        pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, args, kwargs, r, world_size, world_dir, backend, timeout, pipes[r][1], os.getpid()),
                name=f"colofn-rank-{r}",
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for _, w in pipes:
            w.close()
        pending = {r: pipes[r][0] for r in range(world_size)}

        def collect(r: int) -> None:
            conn = pending.pop(r)
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                data = b""
            conn.close()
            if data[:1] == _OK:
                try:
                    values[r] = _from_bytes(data[1:])
                except Exception as e:  # noqa: BLE001 - checked in the rank, so a damaged message
                    failures.append((r, RankError(f"rank {r}'s result could not be read safely: {e}", r), ""))
            elif data[:1] == _RAISED:
                failures.append((r, *decode_exception(data[1:], r)))
            else:
                procs[r].join(1)
                failures.append((r, _died(r, procs[r], board.read_file(board_path, world_size)[r]), ""))

        deadline: float | None = None
        seen_mismatch: str | None = None
        while pending:
            by_object: dict[Any, int] = {c: r for r, c in pending.items()}
            by_object.update({procs[r].sentinel: r for r in pending})
            for obj in connection.wait(list(by_object), timeout=0.5):
                if by_object[obj] in pending:
                    collect(by_object[obj])
            if deadline is None and (values or failures):
                deadline = time.monotonic() + timeout + 10
            if deadline is not None and time.monotonic() > deadline and pending:
                raise CollectiveTimeoutError(
                    f"Ranks {sorted(pending)} of a {backend} world of {world_size} did not finish within "
                    f"{timeout:g} s after the others stopped; they were killed. What each rank was doing:\n"
                    + board.describe(board.read_file(board_path, world_size))
                ) from (failures[0][1] if failures else None)
            if pending and not failures:
                # Ranks waiting at the same call of a group in different collectives never
                # meet; gloo would only notice after the timeout. Seen twice, 0.5 s apart: stop.
                states = board.read_file(board_path, world_size)
                text = _board_mismatch(states)
                if text is not None and text == seen_mismatch:
                    raise CollectiveMismatchError(
                        f"{text[0].upper()}{text[1:]}. What each rank was doing:\n{board.describe(states)}\n"
                        f"(seen by the launcher on the world's status board; the ranks were stopped)"
                    )
                seen_mismatch = text
        finished = True
    finally:
        for p in procs:  # every rank has reported: they are exiting; else stop them now
            p.join(timeout=(5 if not failures else 0.5) if finished else 0)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(world_dir, ignore_errors=True)
    if failures:
        # Prefer a user error over the collective errors it caused in the other ranks
        # (a peer that raised closes its sockets: the others read "Connection reset by
        # peer", "Connection closed by peer", "Broken pipe" or time out).
        failures.sort(key=lambda f: (_priority(f[1]), f[0]))
        rank, exc, tb = failures[0]
        exc.add_note(f"(raised on rank {rank} of a {backend} world of {world_size})")
        if tb:
            exc.add_note("Traceback in that rank:\n" + tb)
        if len(failures) > 1:
            exc.add_note("The other ranks that failed:\n" + "\n".join(
                f"  rank {r}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}" for r, e, _ in failures[1:]
            ))
        raise exc
    return [values[r] for r in range(world_size)]
