"""Tools for proving parallel code equal to a single-device computation.

* :func:`shard_map_reference`: a serial model of ``shard_map`` (the oracle).
* :func:`assert_equivalent`: values and gradients, leaf by leaf, dtype-aware.
* :mod:`colofn.testing.strategies`: hypothesis strategies for meshes, specs,
  shapes and pytrees (import it only where hypothesis is installed).
"""

from colofn.testing.harness import (
    assert_equivalent,
    assert_trees_close,
    tolerances,
    value_and_grads,
)
from colofn.testing.reference import shard_map_reference

__all__ = ["assert_equivalent", "assert_trees_close", "shard_map_reference", "tolerances", "value_and_grads"]
