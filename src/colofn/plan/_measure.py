"""Measure the activation memory of a forward: the bytes autograd keeps for the backward.

On CPU there is no allocator to ask for a peak (``torch.cuda.max_memory_allocated``
has no CPU twin), so colofn counts what the forward leaves behind for the
backward: every tensor autograd saves passes through a
:func:`torch.autograd.graph.saved_tensors_hooks` pack hook, and the distinct
storages among them (parameters excluded) are the activation memory held when
the forward ends, which is the peak of activation memory in a step without a
pipeline (the backward frees them as it goes).

>>> import torch
>>> w = torch.ones(4, 8, requires_grad=True)
>>> x = torch.ones(16, 4)
>>> saved_activation_bytes(lambda: torch.relu(x @ w).sum(), exclude=[w])  # x (256 B) and relu's output (512 B)
768
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["saved_activation_bytes"]


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    local = getattr(t, "_local_tensor", t)  # a DTensor's shard
    return local.untyped_storage()


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages that ``fn()``'s autograd graph saves, less those of ``exclude``.

    Run ``fn`` (a forward whose result the backward will start from) with a
    pack hook that notes each saved tensor's storage; a storage saved twice
    (the same input of two matmuls, views of one buffer) counts once, whole.
    Hooks are per thread, so each simulated rank measures its own forward.
    """
    skip = {_storage(t).data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        st = _storage(x)
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    del out
    return sum(seen.values())
