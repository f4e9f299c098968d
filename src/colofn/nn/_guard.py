"""Detect one ``nn.Module`` whose tensors two threads swap at once (``torch.func.functional_call``).

Simulated ranks are threads. ``torch.func.functional_call(module, params, x)``
swaps ``params`` into ``module`` for the call and swaps the originals back:
two ranks doing that on one shared module use each other's tensors, and the
run fails far from the cause (often as a collective mismatch). While a
simulated world runs, colofn wraps torch's reparametrization so that a second
thread entering it for a module another thread is inside raises
:class:`ModuleSharingError`, naming the module and the fix, before it swaps.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch.nn.utils.stateless as _stateless

from colofn.errors import ColofnError

__all__ = ["ModuleSharingError", "install"]


class ModuleSharingError(ColofnError, RuntimeError):
    """One ``nn.Module`` reparametrized by two threads (simulated ranks) at once."""


_lock = threading.Lock()
_inside: dict[int, tuple[int, int]] = {}  # id(module) -> (thread ident, depth)
_original: Any = None


def _rank_name() -> str:
    try:
        from colofn._world import sim_backend

        ctx = sim_backend.current()
        rank = None if ctx is None else ctx[1]
    except Exception:  # noqa: BLE001 - only used to word the message
        rank = None
    return f"rank {rank}" if rank is not None else f"thread {threading.get_ident()}"


@contextlib.contextmanager
def _guarded(module: Any, *args: Any, **kwargs: Any) -> Iterator[None]:
    me = threading.get_ident()
    key = id(module)
    with _lock:
        owner, depth = _inside.get(key, (me, 0))
        if owner != me:
            raise ModuleSharingError(
                f"{_rank_name()} called torch.func.functional_call on a {type(module).__name__} that another "
                "rank is running at the same moment: functional_call swaps tensors into the module, and "
                "simulated ranks are threads sharing it. Use colofn.nn.functionalize(module) -> (apply, params) "
                "and call apply(params, ...) in every rank (it never mutates the module)"
            )
        _inside[key] = (me, depth + 1)
    try:
        with _original(module, *args, **kwargs):
            yield
    finally:
        with _lock:
            owner, depth = _inside[key]
            if depth == 1:
                del _inside[key]
            else:
                _inside[key] = (owner, depth - 1)


def install() -> None:
    """Wrap torch's ``_reparametrize_module`` (idempotent). Harmless outside threads: it only counts entries."""
    global _original
    with _lock:
        if _original is None:
            _original = _stateless._reparametrize_module
            _stateless._reparametrize_module = _guarded
