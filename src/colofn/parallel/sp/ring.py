"""Ring attention (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise
Transformers for Near-Infinite Context", arXiv:2310.01889), load-balanced by
the zig-zag split that context-parallel implementations use.

The sequence is split over an ``sp`` axis of size ``n``. Over ``n`` steps the
key/value blocks travel one hop around the ring (one ``ppermute`` of ``k`` and
``v`` stacked, ``n - 1`` per attention forward; the backward sends the
key/value gradients back the other way, ``n - 1`` more). At step ``t`` rank
``i`` holds the keys and values of rank ``(i - t) mod n``. Partial results are
merged by their log-sum-exps (:mod:`~colofn.parallel.sp.blockwise`). Rotary
embeddings use each chunk's global positions
(:func:`~colofn.parallel.sp.local_positions`).

Layouts (:mod:`~colofn.parallel.sp.chunks`):

* ``"zigzag"`` (what ``Plan(sp="ring")`` uses): the sequence is cut into
  ``2n`` chunks of ``c`` tokens and rank ``i`` holds chunks ``i`` and
  ``2n - 1 - i``. Each (query chunk, key chunk) pair is computed only if the
  key chunk is not entirely in the query chunk's future, so every rank computes
  the same ``2n + 1`` blocks of ``c x c`` scores (two of them causal
  diagonals) and skips ``2n - 1``. At every step each rank uses the block it
  received, so every ``ppermute`` has its backward on every rank.
* ``"contiguous"`` (the paper's layout, kept as the reference the balance is
  measured against): rank ``i`` holds chunk ``i`` of ``n``. Only ``i + 1`` of
  its ``n`` blocks are useful under the causal mask, so useful work grows with
  the rank. Future blocks are computed and masked, not skipped: rank 0 would
  otherwise never use the blocks it receives after step 0 and would leave its
  neighbour without the backward of the ``ppermute`` it sends into.

:func:`schedule` is the plan both run from; :func:`work` counts its scores.

>>> [work("contiguous", 4, i, 16)["useful"] for i in range(4)]
[10, 26, 42, 58]
>>> [work("zigzag", 4, i, 16)["useful"] for i in range(4)]
[34, 34, 34, 34]

Limitation: autograd keeps every visited block for the backward (no
recomputation), so activation memory is that of full attention.
"""

from __future__ import annotations

import torch

from colofn.collectives import axis_index, axis_size, ppermute
from colofn.models import gpt
from colofn.parallel.sp.blockwise import block, merge
from colofn.parallel.sp.chunks import Layout, chunk_ids

__all__ = ["attend_step", "attention", "ring_attention", "schedule", "work"]


def schedule(
    layout: Layout, n: int, i: int, skip: bool | None = None
) -> list[list[tuple[int, int, int, int]]]:
    """The blocks rank ``i`` of ``n`` computes at each ring step.

    ``steps[t]`` lists ``(q_local, kv_local, q_chunk, kv_chunk)``: the local
    index of the query chunk among this rank's and of the key/value chunk among
    the block received at step ``t``, then their global chunk indices. A pair
    whose key chunk is entirely in the query chunk's future is left out if
    ``skip``; by default (None, what :func:`ring_attention` runs) it is under
    ``"zigzag"`` and kept (masked) under ``"contiguous"``. ``skip=True`` with
    ``"contiguous"`` is for counting only: the causal work of that split.
    """
    if skip is None:
        skip = layout == "zigzag"
    mine = chunk_ids(layout, n, i)
    steps = []
    for t in range(n):
        theirs = chunk_ids(layout, n, (i - t) % n)
        steps.append(
            [
                (a, b, qa, kb)
                for a, qa in enumerate(mine)
                for b, kb in enumerate(theirs)
                if not skip or kb <= qa
            ]
        )
    return steps


def work(layout: Layout, n: int, i: int, seq: int, skip: bool | None = None) -> dict[str, int]:
    """Attention scores rank ``i`` of ``n`` computes for a sequence of ``seq`` tokens, by :func:`schedule`.

    ``"computed"``: query-key scores evaluated (``c * c`` per block, ``c`` the
    chunk length); ``"useful"``: those the causal mask keeps. Both are
    proportional to the attention FLOPs (``4 * head_dim`` per score, forward).
    """
    c = seq // (n * len(chunk_ids(layout, n, 0)))
    steps = schedule(layout, n, i, skip)
    computed = useful = 0
    for step in steps:
        for _, _, qa, kb in step:
            computed += c * c
            useful += c * c if kb < qa else c * (c + 1) // 2 if kb == qa else 0
    return {"blocks": sum(map(len, steps)), "computed": computed, "useful": useful}


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: str, layout: Layout = "zigzag"
) -> torch.Tensor:
    """Causal attention of this rank's queries ``q`` ``[b, h, s/n, hd]`` over the whole sequence's keys.

    ``q``, ``k`` and ``v`` hold this rank's tokens in ``layout``
    (:mod:`~colofn.parallel.sp.chunks`); the result is in the same layout.
    """
    n, i = axis_size(axis), int(axis_index(axis))
    to_next = [(r, (r + 1) % n) for r in range(n)]
    m = len(chunk_ids(layout, n, i))
    if q.shape[-2] % m:
        raise ValueError(
            f"ring_attention: layout={layout!r} cuts this rank's {q.shape[-2]} tokens into {m} chunks; "
            f"use a sequence length that is a multiple of {m * n}"
        )
    c = q.shape[-2] // m
    acc: Partials = [None] * m
    kv = torch.stack([k, v])
    for t, step in enumerate(schedule(layout, n, i)):
        if t:
            kv = ppermute(kv, axis, to_next)  # now the block of rank (i - t) mod n
        acc = attend_step(acc, q, kv, step, c)
    return torch.cat([part[0] for part in acc if part is not None], dim=-2).to(q.dtype)


Partials = list[tuple[torch.Tensor, torch.Tensor] | None]


def attend_step(
    acc: Partials, q: torch.Tensor, kv: torch.Tensor, step: list[tuple[int, int, int, int]], c: int
) -> Partials:
    """One ring step's compute: each block of ``step`` (:func:`schedule`) merged into its query chunk's partial.

    ``acc[a]`` is ``(out, lse)`` of local query chunk ``a`` so far (None before
    its first block); ``q`` is ``[b, h, s/n, hd]`` and ``kv`` the received ``k``
    and ``v`` stacked; ``c`` is the chunk length. No communication (the
    benchmark times ranks' compute with it).
    """
    qs, kvs = q.split(c, dim=-2), kv.split(c, dim=-2)
    acc = list(acc)
    for a, b, qa, kb in step:
        o, lse = block(qs[a], kvs[b][0], kvs[b][1], q_offset=qa * c, kv_offset=kb * c)
        prev = acc[a]
        acc[a] = (o, lse) if prev is None else merge(*prev, o, lse)
    return acc


def attention(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    config: gpt.GPTConfig,
    axis: str,
    positions: torch.Tensor,
    layout: Layout = "zigzag",
) -> torch.Tensor:
    """Causal self-attention of this rank's tokens ``x`` ``[b, s/n, d]`` in ``layout``; returns ``[b, s/n, d]``.

    ``params`` holds this rank's heads (with ``tp``, the result is a partial sum);
    ``positions`` are the tokens' absolute positions.
    """
    q, k, v = gpt.qkv(params, x, config, positions=positions)
    return gpt.attention_out(params, ring_attention(q, k, v, axis, layout))
