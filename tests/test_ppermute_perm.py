"""``ppermute``'s ``perm``: every malformed one is refused with what is wrong and how to fix it, before any
communication; a hypothesis test checks the validator against a plain definition of a permutation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import colofn
from colofn import P
from colofn._perm import check_perm
from colofn.errors import SpecError

AXES = ("i",)


def problems(perm, n=4) -> str:
    with pytest.raises(SpecError) as e:
        check_perm(perm, AXES, n)
    return str(e.value)


@pytest.mark.parametrize(
    "perm,needle",
    [
        (5, "perm is 5 (int), not a list of pairs"),
        (None, "perm is None (NoneType), not a list of pairs"),
        ("01", "perm is '01' (str), not a list of pairs"),
        ((0, 1), "perm is one pair, not a list of pairs: for one pair write perm=[(0, 1)]"),
        ([0, 1, 2], "perm[0] is 0, not a (source, destination) pair"),
        ([(0, 1, 2)], "perm[0] is (0, 1, 2), not a (source, destination) pair"),
        ([(0, 4)], "perm[0] = (0, 4): destination 4 not an axis index in [0, 4)"),
        ([(-1, 0)], "perm[0] = (-1, 0): source -1 not an axis index in [0, 4)"),
        ([(0.0, True)], "perm[0] = (0.0, True): source 0.0 and destination True not an axis index in [0, 4)"),
        ([(0, 1), (0, 2)], "source 0 appears 2 times ((0, 1), (0, 2))"),
        ([(0, 3), (1, 3), (2, 3)], "destination 3 appears 3 times ((0, 3), (1, 3), (2, 3))"),
    ],
)
def test_each_bad_perm_says_what_is_wrong(perm, needle):
    text = problems(perm)
    assert text.startswith(f"ppermute over ('i',) (size 4): perm={perm!r} is not a list of (source, destination) pairs:")
    assert needle in text
    assert text.endswith("e.g. a ring: perm=[(i, (i + 1) % 4) for i in range(4)]")


def test_every_problem_is_listed():
    text = problems([(0, 9), (1, 2), (3, 2), "x"])
    assert text.count("\n  * ") == 3


@given(st.integers(1, 5), st.lists(st.tuples(st.integers(-1, 5), st.integers(-1, 5)), max_size=6))
def test_accepts_exactly_the_partial_permutations(n, perm):
    in_range = all(0 <= i < n for p in perm for i in p)
    distinct = len({s for s, _ in perm}) == len(perm) == len({d for _, d in perm})
    if in_range and distinct:
        assert check_perm(perm, AXES, n) == perm
        assert check_perm(iter([list(p) for p in perm]), AXES, n) == perm  # any iterable of pairs
    else:
        with pytest.raises(SpecError):
            check_perm(perm, AXES, n)


def test_ppermute_refuses_before_any_communication():
    def program():
        mesh = colofn.Mesh((2,), ("i",))
        f = colofn.shard_map(lambda x: colofn.ppermute(x, "i", (0, 1)), mesh=mesh, in_specs=P("i"), out_specs=P("i"))
        with colofn.comm_trace() as trace:
            try:
                f(torch.arange(2.0))
            except SpecError as e:
                return str(e), list(trace)
        return "no error", list(trace)

    for text, records in colofn.launch(program, world_size=2):
        assert "for one pair write perm=[(0, 1)]" in text
        assert records == []
