"""colofn.random: explicit keys that give the same numbers on every rank and in every world."""

from __future__ import annotations

import pytest
import torch

import colofn
from colofn import random as cr

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _draws(seed: int) -> dict[str, torch.Tensor]:
    k = cr.key(seed)
    a, b, c, d = cr.split(k, 4)
    return {
        "normal": cr.normal(a, (5, 3)),
        "uniform": cr.uniform(b, (7,), minval=-2.0, maxval=3.0),
        "randint": cr.randint(c, (6,), 0, 1000),
        "bernoulli": cr.bernoulli(d, 0.3, (9,)),
        "folded": cr.normal(cr.fold_in(k, 17), (2,), dtype=torch.bfloat16),
    }


def _same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(
        x[n].dtype == y[n].dtype and torch.equal(x[n], y[n]) for n in x
    )


def _rank_draws() -> dict[str, torch.Tensor]:
    # Every rank seeds torch's *global* RNG differently: colofn.random must not care.
    torch.manual_seed(1000 + colofn.process_index())
    return _draws(42)


# ----------------------------------------------------------------------------- determinism


def test_same_key_same_numbers() -> None:
    assert _same(_draws(42), _draws(42))
    assert not torch.equal(_draws(42)["normal"], _draws(43)["normal"])


def test_global_rng_does_not_matter() -> None:
    torch.manual_seed(0)
    first = _draws(5)
    torch.manual_seed(1)
    torch.rand(100)
    assert _same(first, _draws(5))


def test_same_numbers_on_every_rank_and_in_consecutive_worlds() -> None:
    serial = _draws(42)
    for world_size in (1, 3, 4):
        per_rank = colofn.launch(_rank_draws, world_size=world_size)
        assert len(per_rank) == world_size
        for got in per_rank:
            assert _same(got, serial)


def test_rank_keys_differ_by_fold_in() -> None:
    def f() -> torch.Tensor:
        return cr.normal(cr.fold_in(cr.key(0), colofn.process_index()), (4,))

    outs = colofn.launch(f, world_size=4)
    for r, o in enumerate(outs):
        assert torch.equal(o, cr.normal(cr.fold_in(cr.key(0), r), (4,)))
    assert len({tuple(o.tolist()) for o in outs}) == 4


def test_keys_are_stable_values() -> None:
    # A key is a pure function of the seed: pin one so a change of the mixer shows up.
    k = cr.key(0)
    assert k.dtype == torch.int64 and k.shape == (2,)
    assert torch.equal(k, cr.key(0))
    assert torch.equal(cr.key(-1), cr.key(2**64 - 1))  # seeds are taken mod 2**64
    assert not torch.equal(cr.key(0), cr.key(1))


# ----------------------------------------------------------------------------- independence


def test_split_gives_distinct_keys_and_streams() -> None:
    k = cr.key(7)
    keys = cr.split(k, 64)
    assert len(keys) == 64
    states = {tuple(x.tolist()) for x in keys} | {tuple(k.tolist())}
    assert len(states) == 65
    a, b = cr.split(k)
    assert torch.equal(a, keys[0]) and torch.equal(
        b, keys[1]
    )  # split(k, n) is a prefix-stable sequence
    (one,) = cr.split(k, 1)
    assert torch.equal(one, keys[0])
    xa, xb = cr.normal(a, (4096,)), cr.normal(b, (4096,))
    corr = torch.corrcoef(torch.stack([xa, xb]))[0, 1]
    assert abs(float(corr)) < 0.06


def test_fold_in_distinct_for_distinct_data() -> None:
    k = cr.key(0)
    folded = [cr.fold_in(k, i) for i in range(256)]
    assert len({tuple(x.tolist()) for x in folded}) == 256
    assert all(not torch.equal(f, k) for f in folded)
    split_states = {tuple(x.tolist()) for x in cr.split(k, 256)}
    assert split_states.isdisjoint({tuple(x.tolist()) for x in folded})
    assert torch.equal(cr.fold_in(k, 2**64 + 3), cr.fold_in(k, 3))  # data taken mod 2**64


def test_draws_of_different_keys_look_independent() -> None:
    k = cr.key(123)
    x = torch.stack([cr.uniform(cr.fold_in(k, i), (2048,)) for i in range(8)])
    corr = torch.corrcoef(x)
    off = corr - torch.eye(8)
    assert float(off.abs().max()) < 0.08


# ----------------------------------------------------------------------------- shapes, dtypes, ranges


@pytest.mark.parametrize("dtype", FLOATS)
def test_normal_shapes_dtypes_moments(dtype: torch.dtype) -> None:
    x = cr.normal(cr.key(1), (64, 64), dtype=dtype)
    assert x.shape == (64, 64) and x.dtype == dtype
    assert abs(float(x.float().mean())) < 0.05
    assert abs(float(x.float().std()) - 1.0) < 0.05
    assert cr.normal(cr.key(1), torch.Size([2, 0, 3])).shape == (2, 0, 3)
    assert cr.normal(cr.key(1), ()).shape == ()
    # lower precisions are the float32 draw, rounded
    if dtype != torch.float64:
        assert torch.equal(x, cr.normal(cr.key(1), (64, 64)).to(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_uniform_range_even_after_rounding(dtype: torch.dtype) -> None:
    k = cr.key(2)
    for lo, hi in ((0.0, 1.0), (-3.0, -1.0), (10.0, 10.5)):
        x = cr.uniform(k, (200_000,), dtype=dtype, minval=lo, maxval=hi)
        assert x.dtype == dtype and x.shape == (200_000,)
        assert float(x.min()) >= lo
        assert float(x.max()) < hi  # bfloat16 rounding used to hit maxval itself
        assert abs(float(x.double().mean()) - (lo + hi) / 2) < 0.02 * (hi - lo) + 0.01


@pytest.mark.parametrize("dtype", (torch.int64, torch.int32, torch.int8, torch.uint8))
def test_randint_range_and_dtype(dtype: torch.dtype) -> None:
    x = cr.randint(cr.key(3), (4000,), -5 if dtype != torch.uint8 else 0, 7, dtype=dtype)
    assert x.dtype == dtype
    lo = -5 if dtype != torch.uint8 else 0
    assert set(x.tolist()) == set(range(lo, 7))  # every value hit, none outside
    assert cr.randint(cr.key(3), (3,), 4, 5).tolist() == [4, 4, 4]
    full = cr.randint(cr.key(3), (100,), 0, 256, dtype=torch.uint8)
    assert full.dtype == torch.uint8


def test_bernoulli_edges_and_shapes() -> None:
    k = cr.key(4)
    assert not cr.bernoulli(k, 0.0, (10_000,)).any()
    assert cr.bernoulli(k, 1.0, (10_000,)).all()
    b = cr.bernoulli(k, 0.25, (100_000,))
    assert b.dtype == torch.bool and abs(float(b.float().mean()) - 0.25) < 0.01
    # a tensor p gives the shape, or broadcasts against shape
    p = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert cr.bernoulli(k, p).tolist() == [False, True, False, True]
    assert cr.bernoulli(k, p, (3, 4)).shape == (3, 4)
    assert cr.bernoulli(k, p, (3, 4))[:, 1].all()
    assert cr.bernoulli(k, 0.5).shape == ()


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs() -> None:
    k = cr.key(0)
    with pytest.raises(TypeError, match=r"key\(seed\) takes an int, got float 1.0"):
        cr.key(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"key\(seed\) takes an int, got bool True"):
        cr.key(True)
    bad_key = (
        r"Expected a key from colofn.random.key \(an int64 tensor of shape \(2,\)\), got "
        r"Tensor torch.Size\(\[2\]\) torch.float32"
    )
    with pytest.raises(TypeError, match=bad_key):
        cr.normal(torch.zeros(2), (2,))
    with pytest.raises(TypeError, match=r"got int\b"):
        cr.split(0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got Tensor torch.Size\(\[3\]\) torch.int64"):
        cr.fold_in(torch.zeros(3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match=r"split\(key, num\) needs num >= 1, got 0"):
        cr.split(k, 0)
    with pytest.raises(
        ValueError, match=r"uniform needs minval < maxval, got minval=1.0, maxval=1.0"
    ):
        cr.uniform(k, (2,), minval=1.0, maxval=1.0)
    with pytest.raises(ValueError, match=r"randint needs low < high, got low=3, high=3"):
        cr.randint(k, (2,), 3, 3)
    with pytest.raises(
        ValueError, match=r"randint range \[0, 300\) does not fit torch.uint8 \(\[0, 255\]\)"
    ):
        cr.randint(k, (2,), 0, 300, dtype=torch.uint8)
    with pytest.raises(
        TypeError, match="normal draws floats; dtype must be a floating dtype, got torch.int64"
    ):
        cr.normal(k, (2,), dtype=torch.int64)
    with pytest.raises(TypeError, match="uniform draws floats"):
        cr.uniform(k, (2,), dtype=torch.int32)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"bernoulli needs 0 <= p <= 1, got"):
            cr.bernoulli(k, p, (2,))
    with pytest.raises(ValueError, match="bernoulli needs 0 <= p <= 1"):
        cr.bernoulli(k, torch.tensor([0.5, 2.0]))
