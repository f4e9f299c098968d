"""Built-in schedules: exact orders, validity on a grid of sizes, size errors, the registry."""

import sys
import textwrap

import pytest

from colofn.errors import ScheduleError
from colofn.pipeline import (
    SCHEDULES,
    Schedule,
    check,
    dualpipev,
    get_schedule,
    gpipe,
    interleaved_1f1b,
    make_schedule,
    one_f_one_b,
    zb_h1,
    zb_h2,
    zbv,
)

ALL = [
    (gpipe, (1, 2, 3)),
    (one_f_one_b, (1,)),
    (interleaved_1f1b, (1, 2, 3)),
    (zb_h1, (1,)),
    (zb_h2, (1,)),
    (zbv, (2,)),
    (dualpipev, (2,)),
]


def rows(schedule):
    return [" ".join("." if a is None else str(a) for a in row) for row in schedule.actions]


@pytest.mark.parametrize("fn, chunk_options", ALL, ids=lambda x: getattr(x, "__name__", ""))
def test_builtins_are_valid_on_a_grid(fn, chunk_options):
    for p in range(1, 6):
        for m in range(1, 11):
            for v in chunk_options:
                if fn is interleaved_1f1b and v > 1 and m % p:
                    continue
                s = fn(p, m, chunks=v)
                assert check(s) == [], (fn.__name__, p, m, v)
                assert (s.num_ranks, s.num_stages, s.num_microbatches) == (p, p * v, m)


def test_fewer_microbatches_than_stages():
    # PyTorch's GPipe rejects this; nothing about GPipe needs it.
    assert rows(gpipe(4, 2)) == ["0F0 0F1 0B0 0B1", "1F0 1F1 1B0 1B1",
                                 "2F0 2F1 2B0 2B1", "3F0 3F1 3B0 3B1"]
    assert rows(one_f_one_b(4, 2))[0] == "0F0 0F1 0B0 0B1"
    for fn in (zb_h1, zb_h2, zbv, dualpipev):
        assert check(fn(4, 1)) == []


def test_exact_orders():
    assert rows(one_f_one_b(3, 4)) == [
        "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3",
        "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3",
        "2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3",
    ]
    # Looped BFS: every forward of the first local stage, then the next.
    assert rows(gpipe(2, 2, chunks=2)) == [
        "0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1",
        "1F0 1F1 3F0 3F1 3B0 3B1 1B0 1B1",
    ]
    # Megatron-LM's interleaved order, p=2, v=2, m=4.
    assert rows(interleaved_1f1b(2, 4, chunks=2)) == [
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3",
        "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",
    ]
    # ZB-H1: rank r holds its W back r places.
    assert rows(zb_h1(3, 4)) == [
        "0F0 0F1 0F2 0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3",
        "1F0 1F1 1I0 1F2 1I1 1W0 1F3 1I2 1W1 1I3 1W2 1W3",
        "2F0 2I0 2F1 2I1 2F2 2I2 2W0 2F3 2I3 2W1 2W2 2W3",
    ]
    assert rows(zb_h2(2, 4)) == [
        "0F0 0F1 0F2 0I0 0W0 0I1 0F3 0I2 0W1 0W2 0I3 0W3",
        "1F0 1I0 1F1 1I1 1F2 1I2 1W0 1F3 1I3 1W1 1W2 1W3",
    ]
    assert zbv(2, 3).stage_to_rank == (0, 1, 1, 0)
    assert rows(zbv(2, 3)) == [
        "0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0I0 0W0 3F2 3I2 3W2 0I1 0W1 0I2 0W2",
        "1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1I1 2I2 1I2 1W1 2W2 1W2",
    ]


def _torch_rows(cls, p, m, **fields):
    """Action text per rank from a PyTorch schedule class's private generator."""
    from types import SimpleNamespace

    out = []
    for r in range(p):
        fake = SimpleNamespace(pp_group_size=p, _n_microbatches=m, rank=r, **fields)
        ops = cls._calculate_single_rank_operations(fake, r)
        row = []
        for a in ops:
            if a is not None:
                for x in a.sub_actions or (a,):
                    row.append(f"{x.stage_index}{x.computation_type.value}{x.microbatch_index}")
        out.append(" ".join(row))
    return out


def test_same_orders_as_pytorch():
    """Our ports equal PyTorch's generators (a DualPipeV overlapped pair is its F then B)."""
    S = pytest.importorskip("torch.distributed.pipelining.schedules")
    try:
        for p in (1, 2, 3, 4):
            for m in range(1, 10):
                assert rows(zbv(p, m)) == _torch_rows(S.ScheduleZBVZeroBubble, p, m,
                                                      num_stages=2 * p)
                assert rows(zb_h1(p, m)) == _torch_rows(
                    S.ScheduleInterleavedZeroBubble, p, m, n_local_stages=1,
                    microbatches_per_round=m // max(1, m // p))
                if m >= 2 * p:
                    assert rows(dualpipev(p, m)) == _torch_rows(S.ScheduleDualPipeV, p, m,
                                                                num_stages=2 * p)
            for m in (p, 2 * p, 3 * p):
                assert rows(interleaved_1f1b(p, m, chunks=2)) == _torch_rows(
                    S.ScheduleInterleaved1F1B, p, m, n_local_stages=2, microbatches_per_round=p)
    except (AttributeError, TypeError) as e:  # PyTorch's private generators changed shape
        pytest.skip(f"PyTorch's schedule internals changed: {e}")


def test_size_errors():
    with pytest.raises(ScheduleError) as e:
        interleaved_1f1b(4, 6, chunks=2)
    assert str(e.value) == (
        "interleaved_1f1b needs num_microbatches to be a multiple of num_ranks (Megatron-LM "
        "runs microbatches in groups of num_ranks), got 6 microbatches on 4 ranks; use 4 or 8 "
        "microbatches, or 'gpipe' with chunks=2, or 'zbv'."
    )
    with pytest.raises(ScheduleError, match=r"use 4 microbatches,"):
        interleaved_1f1b(4, 3)
    with pytest.raises(ScheduleError) as e:
        one_f_one_b(4, 8, chunks=2)
    assert str(e.value) == (
        "1f1b needs chunks=1 (stages per rank), got chunks=2; 'gpipe' and 'interleaved_1f1b' "
        "take any chunks, 'zbv' and 'dualpipev' take 2."
    )
    with pytest.raises(ScheduleError, match=r"^zbv needs chunks=2 \(stages per rank\), got chunks=3"):
        zbv(4, 8, chunks=3)
    with pytest.raises(ScheduleError, match=r"^gpipe: num_microbatches must be an int >= 1, got 0"):
        gpipe(4, 0)


def test_interleaved_with_one_chunk_is_1f1b():
    assert interleaved_1f1b(4, 6, chunks=1).actions == one_f_one_b(4, 6).actions


def test_registry_names():
    assert sorted(SCHEDULES) == ["1f1b", "dualpipev", "gpipe", "interleaved_1f1b", "zb_h1",
                                 "zb_h2", "zbv"]
    assert get_schedule("1F1B") is one_f_one_b
    assert get_schedule("zb-h2") is zb_h2
    for name, fn in SCHEDULES.items():
        assert fn(2, 4).name == name


def test_registry_errors():
    with pytest.raises(ScheduleError) as e:
        get_schedule("pipedream")
    assert str(e.value) == (
        "Unknown pipeline schedule 'pipedream'. Built in: 1f1b, dualpipev, gpipe, "
        "interleaved_1f1b, zb_h1, zb_h2, zbv; or give your own as 'module:function'."
    )
    with pytest.raises(ScheduleError, match=r"^Cannot load schedule 'no_such_mod_xyz:f': importing "
                       r"module 'no_such_mod_xyz' failed \(No module named 'no_such_mod_xyz'\)"):
        get_schedule("no_such_mod_xyz:f")
    with pytest.raises(ScheduleError) as e:
        get_schedule("colofn.pipeline:nope")
    assert str(e.value) == "Cannot load schedule 'colofn.pipeline:nope': module 'colofn.pipeline' has no 'nope'."
    with pytest.raises(ScheduleError, match="is a dict, not a function"):
        get_schedule("colofn.pipeline:SCHEDULES")


def test_user_schedule_from_module(tmp_path, monkeypatch):
    (tmp_path / "my_pipes.py").write_text(textwrap.dedent("""
        from colofn.pipeline import Action, Schedule, looped_placement

        def all_forward_first(num_ranks, num_microbatches):
            rows = [[Action(r, "F", j) for j in range(num_microbatches)]
                    + [Action(r, "B", j) for j in range(num_microbatches)]
                    for r in range(num_ranks)]
            return Schedule(rows, num_ranks, num_microbatches, looped_placement(num_ranks),
                            name="all_forward_first")

        def broken(num_ranks, num_microbatches):
            return [["0F0"]]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    s = make_schedule("my_pipes:all_forward_first", 3, 5)
    assert isinstance(s, Schedule) and check(s) == [] and s.actions == gpipe(3, 5).actions
    with pytest.raises(ScheduleError) as e:
        make_schedule("my_pipes:broken", 3, 5)
    assert str(e.value) == (
        "Schedule function 'my_pipes:broken' returned list, expected a colofn.pipeline.Schedule."
    )
    sys.modules.pop("my_pipes", None)


def test_make_schedule_passes_chunks_only_when_given():
    assert make_schedule("interleaved_1f1b", 2, 4).num_stages == 4
    assert make_schedule("interleaved_1f1b", 2, 4, chunks=3).num_stages == 6
    assert make_schedule(gpipe, 2, 4, chunks=2).num_stages == 4
