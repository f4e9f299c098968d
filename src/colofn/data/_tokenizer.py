"""A byte-level tokenizer: token ids are the UTF-8 bytes of the text (vocab 256)."""

from __future__ import annotations

import torch

from colofn.errors import DTypeError

__all__ = ["VOCAB_SIZE", "decode", "encode"]

VOCAB_SIZE = 256


def encode(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as an int64 tensor ``[len(bytes)]``.

    >>> encode("hi!")
    tensor([104, 105,  33])
    """
    if not isinstance(text, str):
        raise DTypeError(f"encode takes a str, got {type(text).__name__}")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def decode(tokens: torch.Tensor) -> str:
    """The text of a 1-D tensor of byte ids; invalid UTF-8 (a model's guess) becomes U+FFFD.

    >>> decode(encode("héllo"))
    'héllo'
    """
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.dtype.is_floating_point:
        raise DTypeError(
            f"decode takes a 1-D integer tensor of byte ids, got "
            f"{type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))} {getattr(tokens, 'dtype', '')}"
        )
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")
