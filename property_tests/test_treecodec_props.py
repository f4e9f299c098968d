"""Tree structures and plain values survive their data encodings exactly; damaged encodings fail cleanly.

Random trees of every registered node type (dict in any key order, OrderedDict,
defaultdict, list, tuple, None, a NamedTuple, a registered dataclass with a
meta field) round-trip through the checkpoint's JSON structure
(:mod:`colofn._treecodec`) and through the pipeline's int64 metadata
(:mod:`colofn.pipeline._wire_meta`), with random shapes and dtypes. A damaged
wire (truncated, or one int changed) decodes to a valid metadata or raises
``RuntimeError``, never anything else.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from colofn import _treecodec as codec
from colofn import tree as jt
from colofn.errors import TreeTypeError
from colofn.pipeline import _wire_meta


class Pair(NamedTuple):
    a: object
    b: object


@jt.register_dataclass(meta_fields=["tag"])
@dataclasses.dataclass
class Box:
    x: object
    tag: str = ""


LEAF = object()
keys = st.one_of(st.text(max_size=6), st.integers(-5, 5))


def trees(depth: int = 3):
    leaf = st.just(LEAF)
    if depth == 0:
        return leaf

    def pairs(children):
        return st.lists(st.tuples(keys, children), max_size=3, unique_by=lambda kv: kv[0])

    sub = trees(depth - 1)
    return st.one_of(
        leaf,
        st.none(),
        st.lists(sub, max_size=3),
        st.lists(sub, max_size=3).map(tuple),
        pairs(sub).map(dict),
        pairs(sub).map(collections.OrderedDict),
        pairs(sub).map(lambda kv: collections.defaultdict(list, kv)),
        st.tuples(sub, sub).map(lambda ab: Pair(*ab)),
        st.tuples(sub, st.text(max_size=4)).map(lambda xt: Box(*xt)),
    )


plain_values = st.one_of(
    st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8),
    st.binary(max_size=8), st.sampled_from(_wire_meta.DTYPES), st.sampled_from([torch.device("cpu"), torch.device("cuda", 1)]),
)


def _same(a, b):
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@given(trees())
def test_structure_round_trips_through_json(tree):
    treedef = jt.structure(tree, is_leaf=lambda x: x is LEAF)
    data = json.loads(json.dumps(codec.encode_structure(treedef)))  # what a manifest stores
    back = codec.decode_structure(data)
    assert back == treedef
    rebuilt = jt.unflatten(back, range(back.num_leaves))
    original = jt.unflatten(treedef, range(treedef.num_leaves))
    assert rebuilt == original and repr(rebuilt) == repr(original)  # dict key order kept too


@given(plain_values)
def test_plain_values_round_trip_through_json(x):
    back = codec.decode_value(json.loads(json.dumps(codec.encode_value(x))))
    assert type(back) is type(x) and _same(back, x)


@st.composite
def metas(draw):
    tree = draw(trees())
    treedef = jt.structure(tree, is_leaf=lambda x: x is LEAF)
    specs = tuple(
        (tuple(draw(st.lists(st.integers(0, 2**40), max_size=4))), draw(st.sampled_from(_wire_meta.DTYPES)))
        for _ in range(treedef.num_leaves)
    )
    return (treedef if draw(st.booleans()) or not specs else None), specs


@given(metas(), st.data())
def test_wire_metadata_round_trips_and_damage_fails_cleanly(meta, data):
    wire = _wire_meta.encode(meta)
    assert wire.dtype == torch.int64 and wire.dim() == 1
    assert _wire_meta.decode(wire) == meta
    cut = data.draw(st.integers(0, wire.numel() - 1))
    with pytest.raises(RuntimeError, match="metadata received from the previous stage is malformed"):
        _wire_meta.decode(wire[:cut])
    damaged = wire.clone()
    damaged[data.draw(st.integers(0, wire.numel() - 1))] = data.draw(st.integers(-(2**63), 2**63 - 1))
    try:
        treedef, specs = _wire_meta.decode(damaged)
    except RuntimeError:
        return
    assert all(all(s >= 0 for s in shape) and dtype in _wire_meta.DTYPES for shape, dtype in specs)
    assert treedef is None or treedef.num_leaves == len(specs)


def test_unregistered_nodes_and_values_are_refused_with_their_path():
    weird = collections.defaultdict(lambda: 0, {"k": LEAF})
    treedef = jt.structure({"a": [weird]}, is_leaf=lambda x: x is LEAF)
    with pytest.raises(codec.Unencodable, match=r"tree\['a'\]\[0\]: a defaultdict whose factory .* is not one of"):
        codec.encode_structure(treedef)
    with pytest.raises(TreeTypeError, match=r"Pipeline: a stage's output cannot be sent to the next stage: tree\['a'\]\[0\]"):
        _wire_meta.encode((treedef, [((1,), torch.float32)]))
    with pytest.raises(codec.Unencodable, match=r"a set is not a plain value a checkpoint can store"):
        codec.encode_value({1})
    with pytest.raises(ValueError, match=r"is not a stored plain value"):
        codec.decode_value({"dtype": "Tensor"})  # a torch attribute that is not a dtype


json_data = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.sampled_from(["*", "dict", "list", "tuple", "namedtuple", "dataclass", "defaultdict", "os:system", "builtins:int"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["node", "children", "keys", "type", "fields", "meta", "factory", "dtype", "bytes", "float", "device"]), inner, max_size=4),
    max_leaves=12,
)


@given(json_data)
def test_arbitrary_json_decodes_to_a_structure_or_a_value_error(data):
    """What a crafted manifest can hold: decoding gives a structure/value or a ValueError, nothing else."""
    for decode in (codec.decode_structure, codec.decode_value):
        try:
            decode(data)
        except ValueError:
            pass
