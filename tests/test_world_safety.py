"""What crosses between a gloo rank and its launcher, and the status board, without starting processes.

The launcher never unpickles what a rank sent (results are ``torch.save`` bytes
read with ``weights_only=True``; exceptions are rebuilt from their description),
refuses functions that new processes cannot import, and reports collective
failures from the board. The end-to-end runs are in tests/test_gloo_failures.py.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

import colofn
from colofn import _procinfo
from colofn._world import board, procs
from colofn.errors import (
    CollectiveError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    RankError,
    SpecError,
    TreeTypeError,
    WorldError,
)

# ----------------------------------------------------------------------------- results

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**62), 2**62), st.floats(allow_nan=False), st.text(max_size=5),
    st.builds(lambda n, d: torch.arange(n, dtype=d), st.integers(0, 4), st.sampled_from([torch.float32, torch.int64, torch.bfloat16])),
)
_plain = st.recursive(
    _scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.tuples(kids, kids), st.dictionaries(st.text(max_size=3), kids, max_size=3)
    ),
    max_leaves=8,
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@given(_plain)
def test_results_of_plain_data_come_back_equal(value: Any) -> None:
    assert _same(procs._from_bytes(procs.encode_value(value, 0)), value)


def test_what_torch_load_refuses_is_refused_in_the_rank() -> None:
    # bytes are not in the promise: torch's safe loader takes b"raw" but refuses b""
    with pytest.raises(TreeTypeError, match=r"^rank 0 returned a bytes .*\(Unsupported global: GLOBAL bytes was not an allowed global"):
        procs.encode_value(b"", 0)


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


def test_results_that_are_not_plain_data_are_refused_in_the_rank() -> None:
    with pytest.raises(TreeTypeError) as e:
        procs.encode_value({"p": Point(1)}, 3)
    text = str(e.value)
    assert text.startswith("rank 3 returned a dict that launch cannot send back to the launcher (")
    assert "(Unsupported global: GLOBAL test_world_safety.Point was not an allowed global by default." in text
    assert text.endswith(
        "Results travel as data, never as pickled objects: a rank may return tensors, numbers, str, None, "
        "torch dtypes and sizes, and lists, tuples and dicts of them (no DTensor: return .full_tensor() or "
        ".to_local(); no custom classes)."
    )
    with pytest.raises(TreeTypeError, match=r"^rank 0 returned a function that launch cannot send back"):
        procs.encode_value(lambda: 0, 0)


class Planted:
    """A pickle that, when loaded by an unrestricted unpickler, creates a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_a_crafted_payload_from_a_rank_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    crafted = pickle.dumps(Planted(str(marker)))
    with pytest.raises(pickle.UnpicklingError):
        procs._from_bytes(crafted)
    exc, tb = procs.decode_exception(crafted, 1)
    assert isinstance(exc, RankError) and exc.rank == 1
    assert str(exc).startswith("rank 1 failed and its report could not be read (")
    assert not marker.exists()
    # the same object inside torch.save's format is refused too
    with pytest.raises(pickle.UnpicklingError):
        procs._from_bytes(procs._to_bytes({"x": Planted(str(marker))}))
    assert not marker.exists()


class Boom(Exception):
    pass


def _roundtrip(e: BaseException) -> BaseException:
    try:
        raise e
    except BaseException as caught:  # noqa: BLE001
        import traceback

        data = procs.encode_exception(caught, traceback.format_exc())
    exc, tb = procs.decode_exception(data, 2)
    assert "_roundtrip" in tb
    return exc


def test_rank_exceptions_are_rebuilt_only_as_allowlisted_types() -> None:
    e = _roundtrip(KeyError("no such layer"))
    assert type(e) is KeyError and e.args == ("no such layer",)
    e = _roundtrip(SpecError("bad spec"))
    assert type(e) is SpecError and str(e) == "bad spec"
    noted = ValueError(object())  # args that are not data: the message survives
    noted.add_note("a note")
    e = _roundtrip(noted)
    assert type(e) is ValueError and str(e).startswith("<object object at") and e.__notes__ == ["a note"]
    e = _roundtrip(Boom("custom"))  # not builtin, not colofn.errors: described, not rebuilt
    assert type(e) is RankError and isinstance(e, RuntimeError)
    assert str(e) == "test_world_safety.Boom: custom"
    assert e.rank == 2 and e.type_name == "test_world_safety.Boom" and "raise e" in e.rank_traceback


# ----------------------------------------------------------------------------- what a rank receives


def test_gloo_launch_of_a_lambda_says_to_define_it_at_module_level() -> None:
    before = threading.active_count()
    with pytest.raises(WorldError) as e:
        colofn.launch(lambda: 0, world_size=2, backend="gloo")
    text = str(e.value)
    assert text.startswith("launch(backend='gloo') sends the function to new processes by pickling it, and "
                           "'test_gloo_launch_of_a_lambda_says_to_define_it_at_module_level.<locals>.<lambda>' "
                           "cannot be pickled (")
    assert text.endswith(
        "Define the function at module level (a `def` at the top of a module that the new processes can import, "
        "not a lambda, a nested function or a function typed into `python -c` or an interactive session) and "
        "pass what it needs as arguments."
    )
    assert threading.active_count() == before
    with pytest.raises(WorldError, match=r"sends argument 1 to new processes by pickling it, and 'lock' cannot"):
        colofn.launch(print, 1, threading.Lock(), world_size=2, backend="gloo")


def test_functions_of_python_c_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    main = types.ModuleType("__main__")  # what `python -c` and interactive sessions have: no __file__
    monkeypatch.setitem(sys.modules, "__main__", main)

    def f() -> int:
        return 0

    f.__module__ = f.__qualname__ = "f"
    f.__module__ = "__main__"
    with pytest.raises(WorldError) as e:
        colofn.launch(f, world_size=2, backend="gloo")
    assert str(e.value).startswith(
        "launch(backend='gloo') starts new processes that import the function by name, and 'f' was defined in "
        "`__main__` of an interactive session or `python -c`, which they cannot import."
    )


# ----------------------------------------------------------------------------- world directories


def test_sweep_removes_only_directories_of_launchers_that_are_gone(tmp_path: Path) -> None:
    ns = _procinfo.pid_namespace()
    me = _procinfo.stat(os.getpid())
    assert me is not None
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its pid names nobody (until reused, which the start time catches)
    names = {
        "mine": f"{procs.PREFIX}{ns}.{os.getpid()}.{me[1]}-abc",
        "dead": f"{procs.PREFIX}{ns}.{child.pid}.{me[1]}-abc",
        "reused": f"{procs.PREFIX}{ns}.{os.getpid()}.{me[1] + 1}-abc",  # my pid, another start time
        "other_ns": f"{procs.PREFIX}{ns + 1}.{child.pid}.1-abc",
        "unrelated": "colofn-something-else",
    }
    for n in names.values():
        (tmp_path / n).mkdir()
    removed = procs.sweep(str(tmp_path))
    assert sorted(removed) == sorted(str(tmp_path / names[k]) for k in ("dead", "reused"))
    assert sorted(os.listdir(tmp_path)) == sorted(names[k] for k in ("mine", "other_ns", "unrelated"))


# ----------------------------------------------------------------------------- the status board


def _boards(tmp_path: Path, n: int = 2) -> list[board.Board]:
    path = str(tmp_path / "board")
    board.create_file(path, n)
    return [board.from_file(path, r, n, 5.0) for r in range(n)]


def _group(ranks: tuple[int, ...] = (0, 1), axes: tuple[str, ...] = ("dp",)) -> Any:
    return types.SimpleNamespace(group=object(), ranks=ranks, axes=axes)


GLOO_RESET = "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:54459: Connection reset by peer. This is typically caused by a remote worker hanging."
GLOO_TIMEOUT = "[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"


def test_board_reports_a_peer_that_raised(tmp_path: Path) -> None:
    b0, b1 = _boards(tmp_path)
    b1.exited("raised KeyError: 'no such layer'")
    b0.begin("all_gather", _group(), torch.Size([2, 3]), torch.float32)
    e = b0.explain(RuntimeError(GLOO_RESET))
    assert type(e) is CollectiveError
    assert str(e) == (
        "rank 0: all_gather over ('dp',) on group [0, 1] (call #0: (2, 3) float32) failed "
        "(gloo: Read error [127.0.0.1]:54459: Connection reset by peer.). What each rank was doing:\n"
        "  rank 0: failed in all_gather over ('dp',) on group [0, 1] (call #0: (2, 3) float32)\n"
        "  rank 1: exited (raised KeyError: 'no such layer')"
    )
    assert board.read_file(str(tmp_path / "board"), 2) == b0.statuses()  # what the launcher reads


def test_board_tells_a_mismatch_from_a_timeout(tmp_path: Path) -> None:
    b0, b1, b2 = _boards(tmp_path, 3)
    g = [_group((0, 1, 2)) for _ in range(3)]
    for b, gr in zip((b0, b1, b2), g, strict=True):  # call #0 agrees
        b.begin("all_reduce", gr, (4,), torch.float32)
        b.end()
    b0.begin("all_reduce", g[0], (4,), torch.float32)
    b1.begin("all_reduce(MAX)", g[1], (4,), torch.float32)
    e = b0.explain(RuntimeError(GLOO_TIMEOUT))
    assert type(e) is CollectiveMismatchError
    assert str(e).startswith(
        "rank 0: ranks diverged at call #1 on group [0, 1, 2]: rank 0 called all_reduce over ('dp',) ((4,) float32), "
        "rank 1 called all_reduce(MAX) over ('dp',) ((4,) float32). Every rank of a group must call the same "
        "collectives with the same shapes in the same order (gloo: Timed out waiting 5000ms for recv operation "
        "to complete). What each rank was doing:\n"
    )
    assert str(e).endswith("  rank 2: running (not in a colofn collective; the last was all_reduce over ('dp',) "
                           "on group [0, 1, 2] (call #0: (4,) float32))")
    (tmp_path / "2").mkdir()
    b0, b1, b2 = _boards(tmp_path / "2", 3)
    for b, gr in zip((b0, b1, b2), g, strict=True):
        b.begin("all_reduce", gr, (4,), torch.float32)
        b.end()
    b1.begin("all_reduce", g[1], (4,), torch.float32)  # the others never come: a timeout, no mismatch
    e = b1.explain(RuntimeError(GLOO_TIMEOUT))
    assert type(e) is CollectiveTimeoutError
    assert str(e).startswith("rank 1: all_reduce over ('dp',) on group [0, 1, 2] (call #1: (4,) float32) did not "
                             "complete within 5 s (gloo: Timed out waiting 5000ms for recv operation to complete).")


def test_board_compares_only_members_of_one_group(tmp_path: Path) -> None:
    # Ranks 0 and 1 in different groups (of one mesh axis, with the same name) may do different things.
    b0, b1, _, _ = _boards(tmp_path, 4)
    b0.begin("all_reduce", _group((0, 2)), (4,), torch.float32)
    b1.begin("all_gather", _group((1, 3)), (4,), torch.float32)
    assert procs._board_mismatch(b0.statuses()) is None  # the launcher does not stop them
    assert type(b0.explain(RuntimeError(GLOO_TIMEOUT))) is CollectiveTimeoutError


def test_board_describes_ranks_that_never_reported() -> None:
    assert board.decode(bytes(board.SLOT)).describe() == "no report (not started, or has not reached a colofn collective)"
    assert board.decode(b"w\x03\x00abc").describe() == "no report (not started, or has not reached a colofn collective)"


def test_store_board_publishes_for_ranks_on_other_machines() -> None:
    store = dist.HashStore()
    b0, b1 = board.from_store(store, 0, 2, 5.0), board.from_store(store, 1, 2, 5.0)
    try:
        assert b0.statuses()[1].state == "unknown"
        b1.begin("ppermute", _group(), (8,), torch.float32)
        b1.publish()
        assert b0.statuses()[1].describe() == "waiting in ppermute over ('dp',) on group [0, 1] (call #0: (8,) float32)"
        b1.exited("left the world at exit")
        assert b0.statuses()[1].describe() == "exited (left the world at exit)"
    finally:
        b0.closed.set()
        b1.closed.set()
