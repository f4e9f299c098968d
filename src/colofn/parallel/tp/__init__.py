"""Megatron tensor parallelism: region communication and the vocabulary-parallel embedding and loss."""

from colofn.parallel.tp.regions import enter, leave
from colofn.parallel.tp.vocab import cross_entropy_sums, embed_partial

__all__ = ["cross_entropy_sums", "embed_partial", "enter", "leave"]
