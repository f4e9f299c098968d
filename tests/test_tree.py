"""colofn.tree: optree-based pytrees with JAX-style paths and prefix errors."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, NamedTuple

import pytest
import torch

from colofn import tree as jt
from colofn.errors import TreeError, TreeTypeError

FIX = (
    "Fix: give prefix the structure of tree (or a prefix of it: one entry may stand for a "
    "whole subtree)"
)


class Pair(NamedTuple):
    x: Any
    y: Any


@jt.register_dataclass
@dataclasses.dataclass
class Linear:
    w: Any
    b: Any


@jt.register_dataclass(meta_fields=("name",))
@dataclasses.dataclass
class Block:
    lin: Any
    scale: Any
    name: str


def paths(tree: Any, **kw: Any) -> list[str]:
    return [jt.keystr(p) for p, _ in jt.leaves_with_path(tree, **kw)]


# ----------------------------------------------------------------------------- flatten / paths


def test_flatten_unflatten_round_trip_with_jax_paths() -> None:
    tree = {"layers": [{"w": 1, "b": 2}, {"w": 3, "b": 4}], "emb": (5, Pair(6, [7]))}
    leaves, treedef = jt.flatten(tree)
    assert leaves == [5, 6, 7, 2, 1, 4, 3]
    assert jt.unflatten(treedef, leaves) == tree
    assert paths(tree) == [
        "['emb'][0]",
        "['emb'][1].x",
        "['emb'][1].y[0]",
        "['layers'][0]['b']",
        "['layers'][0]['w']",
        "['layers'][1]['b']",
        "['layers'][1]['w']",
    ]
    pairs, treedef2 = jt.flatten_with_path(tree)
    assert treedef2 == treedef
    assert [x for _, x in pairs] == leaves


def test_dataclass_paths_use_dot_fields() -> None:
    tree = Block(Linear(torch.ones(2), torch.zeros(1)), None, "blk")
    assert paths(tree) == [".lin.w", ".lin.b"]
    assert paths({"blocks": [tree]}) == ["['blocks'][0].lin.w", "['blocks'][0].lin.b"]


def test_keystr_forms() -> None:
    assert jt.keystr(()) == "<root>"
    assert jt.keystr("") == "<root>"
    assert jt.keystr(("layers", 0, "w")) == "['layers'][0]['w']"
    assert jt.keystr("['a']") == "['a']"
    ((root_path, _),) = jt.leaves_with_path(torch.ones(1))
    assert jt.keystr(root_path) == "<root>"


def test_dict_children_sorted_but_unflatten_keeps_insertion_order() -> None:
    tree = {"b": 1, "a": 2, "c": 3}
    leaves, treedef = jt.flatten(tree)
    assert leaves == [2, 1, 3]  # sorted keys, as JAX and optree
    back = jt.unflatten(treedef, leaves)
    assert list(back) == ["b", "a", "c"]  # the original insertion order
    assert list(jt.map(lambda x: x * 10, tree)) == ["b", "a", "c"]
    # Same keys in another order: the same structure, and map zips by key.
    other = {"a": 20, "c": 30, "b": 10}
    assert jt.structure(tree) == jt.structure(other)
    assert jt.map(lambda x, y: x + y, tree, other) == {"b": 11, "a": 22, "c": 33}
    assert list(jt.map(lambda x, y: x + y, tree, other)) == ["b", "a", "c"]


def test_ordered_dict_keeps_insertion_order_and_defaultdict_sorts() -> None:
    od = collections.OrderedDict(b=1, a=2)
    assert jt.leaves(od) == [1, 2]
    assert paths(od) == ["['b']", "['a']"]
    dd = collections.defaultdict(list, b=1, a=2)
    assert jt.leaves(dd) == [2, 1]
    back = jt.unflatten(*reversed(jt.flatten(dd)))
    assert isinstance(back, collections.defaultdict) and back.default_factory is list


def test_none_is_an_empty_node() -> None:
    tree = {"w": torch.ones(2), "bias": None, "opt": [None, 3]}
    assert paths(tree) == ["['opt'][1]", "['w']"]
    assert jt.leaves(None) == []
    leaves, treedef = jt.flatten(tree)
    assert jt.unflatten(treedef, leaves)["bias"] is None
    assert jt.map(lambda x: x * 2, tree)["bias"] is None
    # ...and a leaf when is_leaf says so
    assert paths(tree, is_leaf=lambda x: x is None) == [
        "['bias']",
        "['opt'][0]",
        "['opt'][1]",
        "['w']",
    ]
    # None and an empty tuple are different structures
    assert jt.structure({"a": None}) != jt.structure({"a": ()})


def test_map_with_path_passes_paths_and_rest() -> None:
    tree = {"a": [1, 2], "b": 3}
    out = jt.map_with_path(
        lambda p, x, y: f"{jt.keystr(p)}={x + y}", tree, {"a": [10, 20], "b": 30}
    )
    assert out == {"a": ["['a'][0]=11", "['a'][1]=22"], "b": "['b']=33"}


def test_map_structure_mismatch_error() -> None:
    with pytest.raises(TreeError) as e:
        jt.map(lambda x, y: x, {"a": 1}, {"a": 1, "b": 2})
    assert str(e.value) == (
        "Tree argument 1 does not have the structure of the first tree:\n"
        "  first: PyTreeSpec({'a': *})\n"
        "  other: PyTreeSpec({'a': *, 'b': *})"
    )
    with pytest.raises(TreeError, match=r"Tree argument 2 does not have the structure"):
        jt.map_with_path(lambda p, x, y, z: x, [1, 2], [1, 2], (1, 2))
    assert isinstance(e.value, ValueError)


def test_all_leaves_are_names_every_bad_path() -> None:
    jt.all_leaves_are({"a": torch.ones(1), "b": [torch.zeros(2)]}, torch.Tensor, "params")
    with pytest.raises(TreeTypeError) as e:
        jt.all_leaves_are({"a": torch.ones(1), "b": [1, "s"]}, torch.Tensor, "params")
    assert str(e.value) == (
        "Every leaf of params must be a Tensor; 2 leaf(s) are not:\n"
        "  * ['b'][0]: got int 1\n"
        "  * ['b'][1]: got str 's'\n"
        "Fix: convert the values with torch.as_tensor, or make them part of the tree structure"
    )
    assert isinstance(e.value, TypeError)
    with pytest.raises(TreeTypeError, match=r"must be a Tensor or float; 1 leaf"):
        jt.all_leaves_are([1.5, "x"], (torch.Tensor, float), "inputs")


# ----------------------------------------------------------------------------- broadcast_prefix


def test_broadcast_prefix_success() -> None:
    assert jt.broadcast_prefix({"a": 1, "b": 2}, {"a": [10, 20], "b": 30}) == [1, 1, 2]
    assert jt.broadcast_prefix(7, {"a": [1, 2], "b": None, "c": 3}) == [7, 7, 7]
    assert jt.broadcast_prefix([1, (2, 3)], [[9, 9], (9, [9, 9])]) == [1, 1, 2, 3, 3]
    # is_leaf makes None a prefix leaf that stands for a whole subtree
    assert jt.broadcast_prefix(
        {"a": None, "b": 1}, {"a": [1, 2], "b": 3}, is_leaf=lambda x: x is None
    ) == [
        None,
        None,
        1,
    ]
    # None against None: an empty node on both sides
    assert jt.broadcast_prefix({"a": None, "b": 1}, {"a": None, "b": [1, 2]}) == [1, 1]
    assert jt.broadcast_prefix(None, None) == []
    # dict flavours are interchangeable
    assert jt.broadcast_prefix(collections.OrderedDict(a=1), {"a": [1, 2]}) == [1, 1]
    # registered dataclasses
    assert jt.broadcast_prefix(Linear(1, 2), Linear([0, 0], 0)) == [1, 1, 2]


def _prefix_error(prefix: Any, full: Any, **kw: Any) -> str:
    with pytest.raises(TreeError) as e:
        jt.broadcast_prefix(prefix, full, **kw)
    return str(e.value)


def test_broadcast_prefix_missing_and_extra_keys() -> None:
    assert _prefix_error({"a": 1}, {"a": 1, "b": 2}) == (
        f"prefix is not a pytree prefix of tree:\n  * at <root>: prefix dict has missing keys ['b']\n{FIX}"
    )
    assert _prefix_error({"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 2}) == (
        f"prefix is not a pytree prefix of tree:\n  * at <root>: prefix dict has extra keys ['c']\n{FIX}"
    )


def test_broadcast_prefix_node_vs_leaf_and_wrong_node_type() -> None:
    assert _prefix_error({"a": [1, 2]}, {"a": 3}) == (
        "prefix is not a pytree prefix of tree:\n"
        "  * at ['a']: prefix has a list node but tree has a leaf of type int\n" + FIX
    )
    assert _prefix_error([1, 2], (1, 2)) == (
        f"prefix is not a pytree prefix of tree:\n  * at <root>: prefix has a list but tree has a tuple\n{FIX}"
    )
    assert _prefix_error([1, 2], [1, 2, 3]) == (
        f"prefix is not a pytree prefix of tree:\n  * at <root>: prefix has 2 children but tree has 3\n{FIX}"
    )
    assert "prefix has a NoneType node but tree has a leaf of type Tensor" in _prefix_error(
        {"a": None}, {"a": torch.ones(1)}
    )


def test_broadcast_prefix_collects_every_failure_with_custom_names() -> None:
    text = _prefix_error(
        {"x": {"a": 1}, "y": [1], "z": [1]},
        {"x": {"b": 1}, "y": [1, 2], "z": 5},
        prefix_name="in_specs",
        full_name="args",
    )
    assert text == (
        "in_specs is not a pytree prefix of args:\n"
        "  * at ['x']: in_specs dict has missing keys ['b'] and extra keys ['a']\n"
        "  * at ['y']: in_specs has 1 children but args has 2\n"
        "  * at ['z']: in_specs has a list node but args has a leaf of type int\n"
        "Fix: give in_specs the structure of args (or a prefix of it: one entry may stand for "
        "a whole subtree)"
    )


# ----------------------------------------------------------------------------- dataclasses


def test_register_dataclass_round_trip_and_meta_fields() -> None:
    b = Block(Linear(1, 2), None, "blk")
    leaves, treedef = jt.flatten(b)
    assert leaves == [1, 2]
    assert jt.unflatten(treedef, [3, 4]) == Block(Linear(3, 4), None, "blk")
    # meta fields are part of the structure
    assert jt.structure(b) == jt.structure(Block(Linear(5, 6), None, "blk"))
    assert jt.structure(b) != jt.structure(Block(Linear(5, 6), None, "other"))


def test_register_dataclass_errors() -> None:
    with pytest.raises(
        TypeError, match="register_dataclass expects a dataclass, got <class 'int'>"
    ):
        jt.register_dataclass(int)

    @dataclasses.dataclass
    class X:
        a: int
        b: int

    with pytest.raises(TypeError) as e:
        jt.register_dataclass(X, data_fields=["a", "zz"], meta_fields=["a"])
    assert str(e.value) == (
        "register_dataclass(test_register_dataclass_errors.<locals>.X): unknown fields ['zz']; "
        "fields ['a'] are both data and meta; fields ['b'] are neither data nor meta. "
        "Every field of ['a', 'b'] must be in exactly one of data_fields and meta_fields."
    )
    with pytest.raises(ValueError, match="already registered in namespace 'colofn'"):
        jt.register_dataclass(Linear)


def test_torch_func_grad_over_registered_dataclass() -> None:
    params = Block(
        Linear(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0.5, -0.5])), None, "blk"
    )
    x = torch.tensor([[1.0, -1.0], [2.0, 0.5]])

    def loss(p: Block, x: torch.Tensor) -> torch.Tensor:
        return ((x @ p.lin.w + p.lin.b) ** 2).sum()

    g = torch.func.grad(loss)(params, x)
    assert isinstance(g, Block) and isinstance(g.lin, Linear)
    assert g.scale is None and g.name == "blk"
    w = params.lin.w.clone().requires_grad_()
    b = params.lin.b.clone().requires_grad_()
    ((x @ w + b) ** 2).sum().backward()
    torch.testing.assert_close(g.lin.w, w.grad)
    torch.testing.assert_close(g.lin.b, b.grad)
    # The gradient tree has the colofn structure of the parameters.
    assert jt.structure(g) == jt.structure(params)
    # vmap sees the fields as children too.
    batched = Linear(torch.ones(3, 2), torch.arange(3.0))
    out = torch.func.vmap(lambda p: p.w.sum() + p.b)(batched)
    assert out.tolist() == [2.0, 3.0, 4.0]
