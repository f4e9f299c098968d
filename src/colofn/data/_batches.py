"""Random training windows of a token stream, drawn with explicit keys."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from colofn import random
from colofn.errors import ShapeError

__all__ = ["batches", "sample_batch"]


def sample_batch(
    key: torch.Tensor, tokens: torch.Tensor, batch_size: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """``batch_size`` windows of ``tokens`` at random offsets, and the same windows one token later.

    Args:
        key: a key from :func:`colofn.random.key`; the same key gives the same batch.
        tokens: a 1-D token stream, longer than ``seq_len``.
        batch_size: windows per batch.
        seq_len: tokens per window.

    Returns:
        ``{"tokens": [batch_size, seq_len], "targets": [batch_size, seq_len]}`` with
        ``targets[b, t] == tokens[b, t + 1]`` within the stream: the batch format
        of :func:`colofn.models.gpt.loss`.

    >>> b = sample_batch(random.key(0), torch.arange(100), 2, 4)
    >>> b["tokens"].shape, bool((b["targets"] == b["tokens"] + 1).all())
    (torch.Size([2, 4]), True)
    """
    if tokens.ndim != 1 or tokens.shape[0] <= seq_len:
        raise ShapeError(
            f"sample_batch needs a 1-D token stream longer than seq_len={seq_len}, "
            f"got shape {tuple(tokens.shape)}"
        )
    starts = random.randint(key, (batch_size,), 0, tokens.shape[0] - seq_len, device=tokens.device)
    index = starts[:, None] + torch.arange(seq_len + 1, device=tokens.device)
    windows = tokens[index]
    return {"tokens": windows[:, :-1], "targets": windows[:, 1:]}


def batches(
    key: torch.Tensor, tokens: torch.Tensor, batch_size: int, seq_len: int
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of :func:`sample_batch`, step ``i`` drawn with ``fold_in(key, i)``.

    Step ``i``'s batch depends only on ``key`` and ``i``, so a resumed run can
    restart the stream at any step.

    >>> import itertools
    >>> [b["tokens"].shape for b in itertools.islice(batches(random.key(0), torch.arange(50), 3, 8), 2)]
    [torch.Size([3, 8]), torch.Size([3, 8])]
    """
    step = 0
    while True:
        yield sample_batch(random.fold_in(key, step), tokens, batch_size, seq_len)
        step += 1
