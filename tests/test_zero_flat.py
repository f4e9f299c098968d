"""colofn.zero.flat: units, dtype buckets, flatten-and-pad with no value lost."""

from __future__ import annotations

import pytest
import torch

from colofn import tree as jt
from colofn.zero.flat import FlatLayout, split_units


def _params():
    g = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(5, 3, generator=g),
        "layers": [
            {"w": torch.randn(3, 7, generator=g), "b": torch.randn(7, generator=g)},
            {"w": torch.randn(7, 1, generator=g), "b": torch.randn(1, generator=g).double()},
        ],
        "head": {"w": torch.randn(1, 2, generator=g)},
    }


def test_units_follow_layers_then_top_level_entries_in_insertion_order():
    kind, _, parts = split_units(_params())
    assert kind == "dict"
    assert [name for name, _ in parts] == ["['embed']", "['layers'][0]", "['layers'][1]", "['head']"]
    assert split_units([torch.ones(1), torch.ones(2)])[0] == "seq"
    assert split_units(torch.ones(3))[0] == "single"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_flatten_pads_to_a_multiple_of_n_and_loses_no_value(n):
    params = _params()
    layout = FlatLayout.build(params, n)
    flats = layout.flatten(layout.local_leaves(params))
    for b, (bucket, flat) in enumerate(zip(layout.buckets, flats, strict=True)):
        assert flat.numel() == bucket.padded and bucket.padded % n == 0
        assert bucket.padded - bucket.numel < n
        assert flat.dtype == bucket.dtype
        assert bool((flat[bucket.numel :] == 0).all())
        # the shards tile the bucket exactly
        assert torch.equal(torch.cat([layout.shard(flat, i, b) for i in range(n)]), flat)
    back = layout.unflatten(flats)
    assert jt.structure(back) == jt.structure(params)
    for a, e in zip(jt.leaves(back), jt.leaves(params), strict=True):
        assert a.dtype == e.dtype and torch.equal(a, e)


def test_one_bucket_per_dtype_per_unit():
    layout = FlatLayout.build(_params(), 2)
    layer1 = layout.units[2]
    assert layer1.name == "['layers'][1]"
    assert sorted(str(layout.buckets[b].dtype) for b in layer1.buckets) == ["torch.float32", "torch.float64"]
    assert [s.path for s in layout.slots][:2] == ["['embed']", "['layers'][0]['b']"]


def test_views_alias_the_buckets_and_rebuild_keeps_the_dict_order():
    params = _params()
    layout = FlatLayout.build(params, 3)
    flats = layout.flatten(layout.local_leaves(params))
    views = layout.views(flats)
    views[0].add_(1.0)
    assert flats[0][0] == params["embed"][0, 0] + 1
    rebuilt = layout.rebuild(views)
    assert list(rebuilt) == ["embed", "layers", "head"]
    assert isinstance(rebuilt["layers"], list) and len(rebuilt["layers"]) == 2


def test_nbytes_counts_padding():
    layout = FlatLayout.build({"w": torch.ones(5)}, 4)
    assert layout.nbytes() == 8 * 4 and layout.nbytes(padded=False) == 5 * 4
    assert layout.nbytes(torch.bfloat16) == 8 * 2
