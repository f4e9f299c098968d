"""Megatron sequence parallelism (Korthikanti et al. 2022, arXiv:2205.05198, sec. 4.2.2).

Outside the tensor-parallel regions (norms, dropout, residual adds) every
``tp`` rank holds a ``1/tp`` slice of the sequence, so those activations are
not replicated. The all-reduce that closes a Megatron TP region becomes a
reduce-scatter into sequence shards (``g-bar`` in the paper), and the next region
opens with an all-gather of the sequence (``g``); each one's backward is the
other, which colofn's collectives give as their transposes.
"""

from __future__ import annotations

import torch

from colofn.collectives import all_gather, psum_scatter

__all__ = ["gather", "scatter"]

SEQ_DIM = 1  # activations are [batch, seq, d_model]


def gather(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Sequence shards ``[b, s/tp, d]`` -> the whole sequence ``[b, s, d]`` (backward: reduce-scatter)."""
    return all_gather(x, axis, axis_dim=SEQ_DIM, tiled=True)


def scatter(y: torch.Tensor, axis: str) -> torch.Tensor:
    """Partial sums ``[b, s, d]`` -> their sum's sequence shard ``[b, s/tp, d]`` (backward: all-gather)."""
    return psum_scatter(y, axis, scatter_dimension=SEQ_DIM, tiled=True)
