"""colofn: JAX-style functional parallelism on PyTorch."""

from colofn import errors, random, tree

__all__ = ["errors", "random", "tree"]
