"""Sequence parallelism: Megatron-SP region collectives, DeepSpeed-Ulysses and ring attention.

* :mod:`~colofn.parallel.sp.megatron` (Korthikanti et al. 2022): the sequence of
  the residual stream is split over the ``tp`` axis; gathered before each
  tensor-parallel region, reduce-scattered after it.
* :mod:`~colofn.parallel.sp.ulysses` (Jacobs et al. 2023): the sequence is split
  over an ``sp`` axis; attention swaps the split from sequence to heads and back
  with two all-to-alls.
* :mod:`~colofn.parallel.sp.ring` (Liu et al. 2023): the sequence is split over
  an ``sp`` axis; key/value blocks travel around the ring and the partial
  attentions are merged by their log-sum-exps (:mod:`~colofn.parallel.sp.blockwise`);
  each rank holds two chunks, one from each end of the sequence (the zig-zag
  layout of :mod:`~colofn.parallel.sp.chunks`), so causal work is balanced.
"""

from colofn.parallel.sp import blockwise, megatron, ring, ulysses
from colofn.parallel.sp.chunks import local_positions, to_zigzag

__all__ = ["blockwise", "local_positions", "megatron", "ring", "to_zigzag", "ulysses"]
