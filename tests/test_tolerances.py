"""Default tolerances of ``assert_equivalent``/``assert_trees_close`` scale with magnitude and sum length.

A float32 sum of 4096 terms of size ~100 that ends near 92 is off by rounding
by more than the fixed ``2e-5`` relative tolerance allowed (issue 11 §4); the
scaled default accepts it, and a real error (one term dropped) still fails.
"""

from __future__ import annotations

import pytest
import torch

import colofn
from colofn import P
from colofn.testing import assert_equivalent, assert_trees_close, tolerances

N = 4096


def cancelling_terms() -> torch.Tensor:
    """float32 terms of size ~100 whose sum is about 92."""
    x = torch.randn(N, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 100
    x += (92.2 - x.sum()) / N
    return x.float()


def sequential_sum(x: torch.Tensor) -> torch.Tensor:
    acc = x[0]
    for v in x[1:]:
        acc = acc + v
    return acc


def parallel_sum(x: torch.Tensor) -> torch.Tensor:
    mesh = colofn.Mesh((4,), ("i",))
    return colofn.shard_map(lambda b: colofn.psum(b.sum(), "i"), mesh=mesh, in_specs=P("i"), out_specs=P())(x)


def test_rounding_of_a_long_float32_sum_is_within_the_default_tolerance():
    x = cancelling_terms()
    got, want = sequential_sum(x), x.sum()
    assert abs(float(got - want)) > 2e-5 * abs(float(want)) + 2e-5  # the old fixed default failed it
    assert_trees_close(got, want, reduction_size=N)
    with pytest.raises(AssertionError, match="differs"):
        assert_trees_close(got, want)  # without the sum's length the tolerance stays tight


def test_assert_equivalent_infers_the_sum_length_from_the_arguments():
    x = cancelling_terms()
    assert_equivalent(parallel_sum, sequential_sum, x, world_size=4)
    with pytest.raises(AssertionError, match=r"value \(rank 0\) at <root> differs"):
        assert_equivalent(parallel_sum, sequential_sum, x, world_size=4, reduction_size=1)


def test_a_real_error_still_fails():
    x = cancelling_terms()
    with pytest.raises(AssertionError, match="differs"):
        assert_equivalent(parallel_sum, lambda x: x[1:].sum(), x, world_size=4)  # one term dropped
    with pytest.raises(AssertionError, match="differs"):
        assert_trees_close(x.sum() * 1.01, x.sum(), reduction_size=N)


def test_tolerances_scale_with_magnitude_and_sqrt_of_the_length():
    assert tolerances(torch.float32) == (2e-5, 2e-5)
    assert tolerances(torch.float32, magnitude=0.5) == (2e-5, 2e-5)  # never below the base
    assert tolerances(torch.float64, magnitude=10.0, reduction_size=100) == pytest.approx((1e-7, 1e-7))
    assert tolerances(torch.int64, magnitude=10.0) == (0.0, 0.0)
