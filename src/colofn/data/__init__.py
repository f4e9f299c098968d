"""A small shipped corpus, a byte-level tokenizer and random training windows.

``stories.txt`` (about 80 KB, ASCII) is synthetic: short stories from the small
grammar in ``_grammar.py``, exactly ``generate_text(random.key(0), 80_000)``.
It is not a public-domain book, so it has no provenance question, and its
regularities (fixed animal facts, remembered places, sums in words) show a
small model learning within a CPU minute.

>>> from colofn import data, random
>>> tokens = data.encode(data.text())
>>> batch = data.sample_batch(random.key(0), tokens, batch_size=4, seq_len=32)
>>> batch["tokens"].shape, data.VOCAB_SIZE
(torch.Size([4, 32]), 256)
"""

from __future__ import annotations

from importlib import resources

from colofn.data._batches import batches, sample_batch
from colofn.data._grammar import generate_text
from colofn.data._tokenizer import VOCAB_SIZE, decode, encode

__all__ = ["VOCAB_SIZE", "batches", "decode", "encode", "generate_text", "sample_batch", "text"]

CORPUS = "stories.txt"


def text() -> str:
    """The shipped corpus, as a string.

    >>> text()[:29]
    'The next day, Leo went to the'
    """
    return resources.files(__name__).joinpath(CORPUS).read_text(encoding="ascii")
