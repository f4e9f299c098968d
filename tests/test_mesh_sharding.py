"""Mesh, P, NamedSharding, device_put and gather on simulated worlds, and every bad input."""

from __future__ import annotations

import pickle
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

import colofn
from colofn import Mesh, NamedSharding, P, PartitionSpec
from colofn import tree as jt
from colofn.errors import (
    CollectiveTimeoutError,
    DeadlockError,
    MeshError,
    ShardingError,
    SpecError,
    TreeError,
    WorldError,
)

DEVICE_PUT_FIX = (
    "Fix: name only mesh axes, each once, in at most as many entries as the tensor has dims; "
    "make every sharded dim divisible by the product of its axes' sizes (or shard another dim: "
    "P(None, 'tp') splits dim 1)"
)
FAST = 5.0  # seconds; the worlds below run with a 60 s timeout
SPEC_FIX = "Fix: name only axes of the mesh ('dp', 'tp'), each at most once"


def on(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 60) -> list[Any]:
    return colofn.launch(fn, *args, world_size=world_size, timeout=timeout)


def mesh22() -> Mesh:
    return Mesh((2, 2), ("dp", "tp"))


def error_of(
    world_size: int, fn: Callable[[], Any], exc: type[BaseException] = Exception
) -> BaseException:
    with pytest.raises(exc) as e:
        on(world_size, fn)
    return e.value


# ----------------------------------------------------------------------------- Mesh


def test_mesh_properties() -> None:
    def f() -> dict[str, Any]:
        mesh = mesh22()
        return {
            "shape": dict(mesh.shape),
            "order": list(mesh.shape),
            "names": mesh.axis_names,
            "size": mesh.size,
            "ndim": mesh.ndim,
            "dm": isinstance(mesh.device_mesh, DeviceMesh),
            "dm_names": mesh.device_mesh.mesh_dim_names,
            "coords": (mesh.axis_index("dp"), mesh.axis_index("tp")),
            "repr": repr(mesh),
            "device": mesh.device,
            "groups": (
                dist.get_process_group_ranks(mesh.axis_group("dp")),
                dist.get_process_group_ranks(mesh.axis_group("tp")),
                dist.get_process_group_ranks(mesh.axis_group(("dp", "tp"))),
            ),
            "eq": mesh == mesh and mesh == Mesh.from_device_mesh(mesh.device_mesh),
            "readonly": _raises(lambda: mesh.shape.update(dp=4), AttributeError),
        }

    out = on(4, f)
    for r, o in enumerate(out):
        assert o["shape"] == {"dp": 2, "tp": 2} and o["order"] == ["dp", "tp"]
        assert o["names"] == ("dp", "tp") and o["size"] == 4 and o["ndim"] == 2
        assert o["dm"] and o["dm_names"] == ("dp", "tp")
        assert o["coords"] == divmod(r, 2)  # row-major: rank = dp * 2 + tp
        assert o["repr"] == "Mesh(dp=2, tp=2)"
        assert o["device"] == torch.device("cpu")
        dp_i, tp_i = divmod(r, 2)
        assert o["groups"] == ([tp_i, 2 + tp_i], [2 * dp_i, 2 * dp_i + 1], [0, 1, 2, 3])
        assert o["eq"] and o["readonly"]


def _raises(fn: Callable[[], Any], exc: type[BaseException]) -> bool:
    try:
        fn()
    except exc:
        return True
    return False


def test_mesh_from_mapping_1d_and_3d() -> None:
    def f() -> tuple[Any, ...]:
        a = Mesh({"x": 2, "y": 1, "z": 4})
        b = Mesh(8, ("all",))
        return dict(a.shape), tuple(a.axis_index(n) for n in a.axis_names), b.axis_index("all")

    out = on(8, f)
    for r, (shape, coords, flat) in enumerate(out):
        assert shape == {"x": 2, "y": 1, "z": 4}
        assert coords == (r // 4, 0, r % 4) and flat == r


def test_mesh_outside_a_world_is_a_world_of_one() -> None:
    # initialize() starts a 1-process gloo world in the main thread: run it in a
    # simulated world of one instead, so this test leaves no process group behind.
    assert on(1, lambda: (dict(Mesh((1,), ("d",)).shape), colofn.process_count())) == [
        ({"d": 1}, 1)
    ]


def test_ambient_mesh_is_per_rank() -> None:
    assert colofn.current_mesh() is None
    seen: dict[int, Any] = {}
    barrier = threading.Barrier(4)

    def f() -> tuple[bool, bool, bool]:
        outer = mesh22()
        inner = Mesh((4,), ("all",))
        r = dist.get_rank()
        with outer:
            barrier.wait()  # every rank is inside its own `with` at the same time
            seen[r] = colofn.current_mesh()
            with inner as m:
                nested = colofn.current_mesh() is inner and m is inner
            back = colofn.current_mesh() is outer
        return nested, back, colofn.current_mesh() is None

    assert on(4, f) == [(True, True, True)] * 4
    assert len({id(m) for m in seen.values()}) == 4  # each rank saw its own Mesh
    assert colofn.current_mesh() is None


def test_get_mesh_without_a_mesh() -> None:
    e = error_of(2, lambda: colofn.device_put({"w": torch.ones(4)}, P("dp")), MeshError)
    assert (
        str(e)
        == "the spec P('dp') at ['w'] needs a mesh: pass mesh=... or call it inside `with mesh:`"
    )


def test_mesh_errors_are_collected() -> None:
    e = error_of(4, lambda: Mesh((2, 3), ("a", "b")), MeshError)
    assert str(e) == (
        "Cannot build Mesh(shape=(2, 3), axis_names=('a', 'b')):\n"
        "  * shape (2, 3) has 6 devices but the world has 4 ranks\n"
        "Fix: give one int size and one unique name per axis, with sizes multiplying to the world size (4)"
    )
    assert e.__notes__[0].startswith("(raised on rank ")
    e = error_of(4, lambda: Mesh((2, 0, 2.0), ("a", "a", 1)), MeshError)
    assert str(e) == (
        "Cannot build Mesh(shape=(2, 0, 2.0), axis_names=('a', 'a', 1)):\n"
        "  * axis size 0 is not an int >= 1\n"
        "  * axis size 2.0 is not an int >= 1\n"
        "  * axis name 1 is not a non-empty str\n"
        "  * axis names ['a'] are used more than once\n"
        "Fix: give one int size and one unique name per axis, with sizes multiplying to the world size (4)"
    )
    assert "shape (2, 2) has 2 axes but axis_names ('a',) has 1" in str(
        error_of(4, lambda: Mesh((2, 2), ("a",)), MeshError)
    )
    assert str(error_of(4, lambda: Mesh({"a": 4}, ("a",)), MeshError)) == (
        "Mesh takes either a mapping {name: size} or (shape, axis_names), not both"
    )
    assert str(error_of(4, lambda: mesh22().axis_index("zz"), MeshError)) == (
        "axis 'zz' is not in the mesh Mesh(dp=2, tp=2)"
    )
    assert str(error_of(4, lambda: mesh22().axis_group(("tp", "dp")), MeshError)) == (
        "axes ('tp', 'dp') must be listed in mesh order ('dp', 'tp') to be combined"
    )
    assert isinstance(e, ValueError)


def test_mesh_built_differently_by_ranks_fails_fast() -> None:
    def f() -> None:
        if dist.get_rank() == 0:
            dist.barrier()  # rank 0 diverges before its mesh
        mesh22()

    t0 = time.perf_counter()
    with pytest.raises(DeadlockError) as e:
        on(4, f)
    assert time.perf_counter() - t0 < FAST
    text = str(e.value)
    assert re.match(
        r"rank \d: .* cannot complete\. Simulated world deadlocked \(every live rank is blocked",
        text,
    )
    assert (
        "What each rank was doing:\n  rank 0: waiting in barrier on group [0, 1, 2, 3] (call #0)\n"
        in text
    )
    # the others wait to create the mesh's groups (this used to be an invisible store wait)
    assert text.count("waiting in creating a process group of 2 ranks") == 3


def test_rank_hanging_while_others_build_a_mesh_times_out() -> None:
    release = threading.Event()

    def f() -> None:
        if dist.get_rank() == 3:
            release.wait(60)  # stuck in user code until the test releases it
            return
        mesh22()

    t0 = time.perf_counter()
    try:
        with pytest.raises(CollectiveTimeoutError) as e:
            on(4, f, timeout=0.3)
        elapsed = time.perf_counter() - t0
    finally:
        release.set()
    assert elapsed < FAST
    assert str(e.value).startswith(
        "Ranks [3] of a simulated world of 4 were still running user code 0.3 s after the other "
        "ranks stopped (rank "
    )
    cause = str(e.value.__cause__)
    assert (
        "creating a process group of 2 ranks" in cause and "did not complete within 0.3 s" in cause
    )
    assert "  rank 3: running (not in a collective)" in cause


def test_rank_raising_while_building_a_mesh() -> None:
    def f() -> Mesh:
        if dist.get_rank() == 1:
            raise OSError("disk on fire")
        return mesh22()

    t0 = time.perf_counter()
    e = error_of(4, f, OSError)
    assert time.perf_counter() - t0 < FAST  # the others are known to wait for rank 1: no timeout
    assert e.__notes__ == ["(raised on rank 1 of a simulated world of 4)"]


def test_bad_world_size_for_a_mesh_program() -> None:
    with pytest.raises(WorldError, match=r"launch needs world_size to be an int >= 1, got 0"):
        on(0, mesh22)


# ----------------------------------------------------------------------------- P


def test_partition_spec_semantics() -> None:
    assert P is PartitionSpec
    assert P("dp") == P("dp", None) == P("dp", None, None)
    assert hash(P("dp")) == hash(P("dp", None))
    assert P() == P(None) and hash(P()) == hash(P(None, None))
    assert P("dp") != P(None, "dp") and P("dp") != ("dp",)
    assert len({P("a"), P("a", None), P(("a", "b")), P(["a", "b"])}) == 2
    assert P(("dp",)) == P("dp") and P(()) == P(None)  # 1-tuples and empty tuples normalise
    assert P(["dp", "tp"]).entries == (("dp", "tp"),)
    assert not isinstance(P("dp"), tuple)
    assert list(P("a", None, ("b", "c"))) == ["a", None, ("b", "c")]
    assert P("a", None)[0] == "a" and len(P("a", None)) == 2
    assert P("a", None, ("b", "c")).axes == ("a", "b", "c")
    assert P("a", ("b", "c")).dim_axes(1) == ("b", "c") and P("a").dim_axes(5) == ()
    assert repr(P("dp", None, ("a", "b"))) == "P('dp', None, ('a', 'b'))"
    assert pickle.loads(pickle.dumps(P("dp", ("a", "b")))) == P("dp", ("a", "b"))


def test_partition_spec_is_immutable_and_final() -> None:
    spec = P("dp")
    with pytest.raises(AttributeError, match="PartitionSpec is immutable"):
        spec._entries = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        spec.new_attr = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        spec[0] = "tp"  # type: ignore[index]


def test_partition_spec_is_a_pytree_leaf() -> None:
    tree = {"w": P("dp", "tp"), "b": P(), "n": None}
    assert jt.leaves(tree) == [P(), P("dp", "tp")]
    assert jt.map(lambda s: s.axes, tree) == {"w": ("dp", "tp"), "b": (), "n": None}


@pytest.mark.parametrize(
    ("entry", "text"),
    [
        (0, "P entry 1 must be None, an axis name or a tuple of axis names; got int 0"),
        (
            ("a", 1),
            "P entry 1 must be None, an axis name or a tuple of axis names; got tuple ('a', 1)",
        ),
        (
            P("a"),
            "P entry 1 must be None, an axis name or a tuple of axis names; got PartitionSpec P('a')",
        ),
    ],
)
def test_partition_spec_bad_entry(entry: Any, text: str) -> None:
    with pytest.raises(TypeError) as e:
        P("dp", entry)
    assert str(e.value) == text


# ----------------------------------------------------------------------------- NamedSharding


def test_named_sharding_shapes_and_placements() -> None:
    def f() -> list[Any]:
        mesh = mesh22()
        out = []
        for spec, shape in [
            (P("dp"), (8, 3)),
            (P(None, "tp"), (3, 8)),
            (P("dp", "tp"), (4, 6)),
            (P(("dp", "tp")), (8, 2)),
            (P("tp", "dp", None), (2, 4, 5)),
            (P(), (3,)),
        ]:
            s = NamedSharding(mesh, spec)
            pl = s.to_placements(len(shape))
            back = NamedSharding.from_placements(mesh, pl)
            out.append((s.shard_shape(shape), pl, back.spec, back == s, hash(back) == hash(s)))
        return out

    got = on(4, f)[0]
    assert got == [
        ((4, 3), (Shard(0), Replicate()), P("dp"), True, True),
        ((3, 4), (Replicate(), Shard(1)), P(None, "tp"), True, True),
        ((2, 3), (Shard(0), Shard(1)), P("dp", "tp"), True, True),
        ((2, 2), (Shard(0), Shard(0)), P(("dp", "tp")), True, True),
        ((1, 2, 5), (Shard(1), Shard(0)), P("tp", "dp"), True, True),
        ((3,), (Replicate(), Replicate()), P(), True, True),
    ]


def test_named_sharding_errors() -> None:
    e = error_of(4, lambda: NamedSharding(mesh22(), P("x", ("dp", "dp"))), SpecError)
    assert str(e) == (
        "P('x', ('dp', 'dp')) does not fit Mesh(dp=2, tp=2):\n"
        "  * dim 0: axis 'x' is not in the mesh Mesh(dp=2, tp=2)\n"
        "  * dim 1: axis 'dp' is used more than once\n" + SPEC_FIX
    )
    e = error_of(4, lambda: NamedSharding(mesh22(), P("dp", "dp")), SpecError)
    assert (
        str(e)
        == "P('dp', 'dp') does not fit Mesh(dp=2, tp=2):\n  * dim 1: axis 'dp' is used more than once\n"
        + SPEC_FIX
    )
    # any order is a spec (the first axis major, as in JAX): see tests/test_axis_order.py
    assert on(4, lambda: NamedSharding(mesh22(), P(("tp", "dp"))).spec) == [P(("tp", "dp"))] * 4
    e = error_of(4, lambda: NamedSharding(mesh22(), P("dp")).shard_shape((3, 4)), ShardingError)
    assert (
        str(e)
        == "P('dp') cannot split shape (3, 4):\n  * dim 0 of size 3 is not divisible by 2 (axes dp=2)"
    )
    e = error_of(
        4, lambda: NamedSharding(mesh22(), P(("dp", "tp"))).shard_shape((6,)), ShardingError
    )
    assert (
        str(e)
        == "P(('dp', 'tp')) cannot split shape (6,):\n  * dim 0 of size 6 is not divisible by 4 (axes dp=2 x tp=2)"
    )
    e = error_of(
        4, lambda: NamedSharding(mesh22(), P("dp", None, "tp")).to_placements(2), SpecError
    )
    assert str(e) == "P('dp', None, 'tp') has 3 entries but the tensor has rank 2"
    e = error_of(4, lambda: NamedSharding(mesh22(), ("dp",)), TypeError)  # type: ignore[arg-type]
    assert str(e) == "NamedSharding needs a P(...), got tuple ('dp',)"
    e = error_of(4, lambda: NamedSharding("mesh", P()), TypeError)  # type: ignore[arg-type]
    assert str(e) == "NamedSharding needs a colofn.Mesh, got str"
    e = error_of(
        4, lambda: NamedSharding.from_placements(mesh22(), [Partial(), Replicate()]), ShardingError
    )
    assert str(e) == (
        "placement P(sum) on axis 'dp' is a pending reduction with no PartitionSpec; "
        "redistribute to Replicate() or Shard(d) first"
    )
    e = error_of(4, lambda: NamedSharding.from_placements(mesh22(), [Replicate()]), ShardingError)
    assert str(e) == "1 placements for a mesh of 2 axes (Mesh(dp=2, tp=2))"


# ----------------------------------------------------------------------------- device_put / gather


def _blocks(x: torch.Tensor, r: int) -> dict[str, torch.Tensor]:
    dp, tp = divmod(r, 2)
    return {
        "P(dp)": x.chunk(2, 0)[dp],
        "P(None,tp)": x.chunk(2, 1)[tp],
        "P(dp,tp)": x.chunk(2, 0)[dp].chunk(2, 1)[tp],
        "P((dp,tp))": x.chunk(4, 0)[r],
        "P((dp,tp)) dim1": x.chunk(4, 1)[r],
    }


def test_device_put_blocks_and_gather() -> None:
    x = torch.arange(64.0).reshape(8, 8)

    def f() -> Any:
        mesh = mesh22()
        specs = {
            "P(dp)": P("dp"),
            "P(None,tp)": P(None, "tp"),
            "P(dp,tp)": NamedSharding(mesh, P("dp", "tp")),
            "P((dp,tp))": P(("dp", "tp")),
            "P((dp,tp)) dim1": P(None, ("dp", "tp")),
        }
        tree = {k: x.clone() for k in specs}
        placed = colofn.device_put(tree, specs, mesh=mesh)
        back = colofn.gather(placed)
        return (
            {k: v.to_local() for k, v in placed.items()},
            {k: type(v).__name__ for k, v in placed.items()},
            back,
            {k: colofn.sharding_of(v).spec for k, v in placed.items()},
        )

    for r, (local, kinds, back, specs) in enumerate(on(4, f)):
        want = _blocks(x, r)
        for k in want:
            assert torch.equal(local[k], want[k]), (r, k)
            assert torch.equal(back[k], x)
        assert set(kinds.values()) == {"DTensor"}
        assert specs == {
            "P(dp)": P("dp"),
            "P(None,tp)": P(None, "tp"),
            "P(dp,tp)": P("dp", "tp"),
            "P((dp,tp))": P(("dp", "tp")),
            "P((dp,tp)) dim1": P(None, ("dp", "tp")),
        }


def test_device_put_prefix_ambient_mesh_none_and_dtensor_inputs() -> None:
    x = torch.arange(32.0).reshape(4, 8)

    def f() -> Any:
        mesh = mesh22()
        tree = {
            "layers": [x.clone(), x.clone() * 2],
            "emb": x.clone(),
            "frozen": x.clone(),
            "opt": None,
        }
        with mesh:
            placed = colofn.device_put(
                tree, {"layers": P(None, "tp"), "emb": P("dp"), "frozen": None, "opt": None}
            )
            whole = colofn.device_put(x, P())  # a single leaf as the whole prefix
            again = colofn.device_put(placed["emb"], P("dp"))  # same sharding: unchanged
            moved = colofn.device_put(
                placed["emb"], P(None, ("dp", "tp"))
            )  # DTensor: redistributed
        return (
            [t.to_local() for t in placed["layers"]],
            placed["emb"].to_local(),
            placed["frozen"],
            placed["opt"],
            whole.to_local(),
            again is placed["emb"],
            moved.to_local(),
            colofn.gather(moved),
            colofn.gather({"a": moved, "b": 3, "c": None}),
        )

    for r, (layers, emb, frozen, opt, whole, same, moved, full, mixed) in enumerate(on(4, f)):
        dp, tp = divmod(r, 2)
        assert torch.equal(layers[0], x.chunk(2, 1)[tp]) and torch.equal(
            layers[1], 2 * x.chunk(2, 1)[tp]
        )
        assert torch.equal(emb, x.chunk(2, 0)[dp])
        assert not isinstance(frozen, DTensor) and torch.equal(frozen, x)
        assert opt is None
        assert torch.equal(whole, x)
        assert same
        assert torch.equal(moved, x.chunk(4, 1)[r])
        assert torch.equal(full, x)
        assert torch.equal(mixed["a"], x) and mixed["b"] == 3 and mixed["c"] is None


def test_gather_leaves_plain_values_alone() -> None:
    tree = {"a": torch.ones(2), "b": [1, "x"], "c": None}
    out = colofn.gather(tree)
    assert out["a"] is tree["a"] and out["b"] == [1, "x"] and out["c"] is None


# ----------------------------------------------------------------------------- device_put errors


def test_device_put_collects_every_failure() -> None:
    def f() -> Any:
        mesh = mesh22()
        tree = {
            "w": torch.ones(3, 5),
            "b": [torch.ones(4), 3],
            "e": torch.ones(6),
            "u": torch.ones(4, 4),
            "r": torch.ones(8),
        }
        specs = {
            "w": P("dp", "tp"),
            "b": P(("dp", "tp")),
            "e": P(("dp", "tp")),
            "u": P("zz", ("tp", "tp")),
            "r": P("dp", None),
        }
        return colofn.device_put(tree, specs, mesh=mesh)

    e = error_of(4, f, ShardingError)
    assert str(e) == (
        "device_put cannot place 5 leaf(s):\n"
        "  * ['b'][1]: got int 3, not a tensor\n"
        "  * ['e'] (shape (6,), spec P(('dp', 'tp'))): dim 0 of size 6 is not divisible by 4 (axes dp=2 x tp=2)\n"
        "  * ['r'] (shape (8,), spec P('dp', None)): P('dp', None) has 2 entries but the tensor has rank 1 (shape (8,))\n"
        "  * ['u'] (shape (4, 4), spec P('zz', ('tp', 'tp'))): dim 0: axis 'zz' is not in the mesh Mesh(dp=2, tp=2)\n"
        "  * ['u'] (shape (4, 4), spec P('zz', ('tp', 'tp'))): dim 1: axis 'tp' is used more than once\n"
        "  * ['w'] (shape (3, 5), spec P('dp', 'tp')): dim 0 of size 3 is not divisible by 2 (axes dp=2)\n"
        "  * ['w'] (shape (3, 5), spec P('dp', 'tp')): dim 1 of size 5 is not divisible by 2 (axes tp=2)\n"
        + DEVICE_PUT_FIX
    )
    assert isinstance(e, ValueError)


def test_device_put_rank_too_long_and_unknown_axis_together() -> None:
    e = error_of(
        4,
        lambda: colofn.device_put(torch.ones(4, 4), P("zz", "dp", "tp"), mesh=mesh22()),
        ShardingError,
    )
    assert str(e) == (
        "device_put cannot place 1 leaf(s):\n"
        "  * <root> (shape (4, 4), spec P('zz', 'dp', 'tp')): dim 0: axis 'zz' is not in the mesh Mesh(dp=2, tp=2)\n"
        "  * <root> (shape (4, 4), spec P('zz', 'dp', 'tp')): P('zz', 'dp', 'tp') has 3 entries but the tensor "
        "has rank 2 (shape (4, 4))\n" + DEVICE_PUT_FIX
    )


def test_device_put_shardings_not_a_prefix() -> None:
    def f() -> Any:
        mesh = mesh22()
        return colofn.device_put(
            {"w": torch.ones(4, 4), "b": [torch.ones(4)]},
            {"w": P("dp"), "b": {"x": P()}, "c": P()},
            mesh=mesh,
        )

    e = error_of(4, f, TreeError)
    assert str(e) == (
        "shardings is not a pytree prefix of tree:\n"
        "  * at <root>: shardings dict has extra keys ['c']\n"
        "Fix: give shardings the structure of tree (or a prefix of it: one entry may stand for a whole subtree)"
    )
    e = error_of(
        4, lambda: colofn.device_put([torch.ones(4)], {"b": {"x": P()}}, mesh=mesh22()), TreeError
    )
    assert "at <root>: shardings has a dict but tree has a list" in str(e)


def test_device_put_bad_sharding_leaf() -> None:
    e = error_of(
        4,
        lambda: colofn.device_put({"w": torch.ones(4, 4)}, {"w": "dp"}, mesh=mesh22()),
        ShardingError,
    )
    assert str(e) == (
        "device_put cannot place 1 leaf(s):\n"
        "  * ['w']: expected a NamedSharding, P(...) or None, got str 'dp'\n" + DEVICE_PUT_FIX
    )


def test_device_put_errors_happen_before_any_communication() -> None:
    # Only rank 0 has a bad tree: it fails validation while the others place their
    # tensors (device_put of plain tensors needs no communication), so nobody hangs.
    def f() -> bool:
        mesh = mesh22()
        x = torch.ones(4, 4) if dist.get_rank() else torch.ones(3, 4)
        colofn.device_put(x, P("dp"), mesh=mesh)
        return True

    e = error_of(4, f, ShardingError)
    assert e.__notes__ == ["(raised on rank 0 of a simulated world of 4)"]
    assert re.search(r"dim 0 of size 3 is not divisible by 2 \(axes dp=2\)", str(e))
