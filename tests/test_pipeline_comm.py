"""The communication derived from a schedule: transfers, per-rank plans, FIFO order."""

import pytest

from colofn.errors import ScheduleError
from colofn.pipeline import (
    Payload,
    Schedule,
    dualpipev,
    fifo_conflicts,
    interleaved_1f1b,
    one_f_one_b,
    plan,
    transfers,
    zbv,
)


def test_transfers_of_1f1b():
    assert [str(t) for t in transfers(one_f_one_b(3, 1))] == [
        "activation 0F0 -> 1F0 (rank 0 -> rank 1, tag 0)",
        "activation 1F0 -> 2F0 (rank 1 -> rank 2, tag 2)",
        "gradient 1B0 -> 0B0 (rank 1 -> rank 0, tag 3)",
        "gradient 2B0 -> 1B0 (rank 2 -> rank 1, tag 5)",
    ]


def test_counts_and_tags():
    for s in (one_f_one_b(4, 6), interleaved_1f1b(2, 4, chunks=3), zbv(3, 5), dualpipev(2, 5)):
        ts = transfers(s)
        crossing = sum(s.stage_to_rank[k] != s.stage_to_rank[k + 1] for k in range(s.num_stages - 1))
        assert len(ts) == 2 * crossing * s.num_microbatches
        assert len({t.tag for t in ts}) == len(ts)
        for t in ts:
            assert t.src == s.stage_to_rank[t.producer.stage] != t.dst
            assert t.dst == s.stage_to_rank[t.consumer.stage]
            assert t.microbatch == t.consumer.microbatch
            if t.payload is Payload.ACTIVATION:
                assert t.consumer.stage == t.producer.stage + 1
            else:
                assert t.consumer.stage == t.producer.stage - 1
                assert t.producer.kind.is_backward_input and t.consumer.kind.is_backward_input


def test_v_placement_keeps_the_turn_on_one_rank():
    # Stages p-1 and p live on rank p-1, and stages 0 and 2p-1 on rank 0: no transfer there.
    ts = transfers(zbv(3, 1))
    assert not [t for t in ts if {t.producer.stage, t.consumer.stage} == {2, 3}]
    assert len(ts) == 2 * 4


def test_plan():
    s = Schedule([["0F0", None, "0B0"], [None, "1F0", "1B0"]], 2, 1, (0, 1))
    program = plan(s)
    assert [[str(step.action) for step in steps] for steps in program] == [["0F0", "0B0"],
                                                                          ["1F0", "1B0"]]
    (f0, b0), (f1, b1) = program
    assert f0.recvs == () and [str(t.consumer) for t in f0.sends] == ["1F0"]
    assert [str(t.producer) for t in f1.recvs] == ["0F0"] and f1.sends == ()
    assert b1.recvs == () and [str(t.consumer) for t in b1.sends] == ["0B0"]
    assert [str(t.producer) for t in b0.recvs] == ["1B0"] and b0.sends == ()


def test_plan_validates_first():
    bad = Schedule([["0B0", "0F0"]], 1, 1, (0,))
    with pytest.raises(ScheduleError, match="is not valid"):
        plan(bad)


def test_fifo_conflicts():
    assert fifo_conflicts(one_f_one_b(4, 8)) == []
    # Rank 1 consumes microbatch 1 before microbatch 0: order-matched backends would swap them.
    s = Schedule([["0F0", "0F1", "0B0", "0B1"], ["1F1", "1F0", "1B0", "1B1"]], 2, 2, (0, 1))
    assert fifo_conflicts(s) == [
        "rank 0 -> rank 1: message 0 is sent as activation 0F0 but received as activation 0F1",
    ]
