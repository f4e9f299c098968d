"""validate/check: one test per rule, with the exact text users see."""

import pytest

from colofn.errors import ScheduleError
from colofn.pipeline import Rule, Schedule, check, one_f_one_b, validate, zb_h1


def two_stage(rank0, rank1, m=1):
    return Schedule([rank0, rank1], num_stages=2, num_microbatches=m, stage_to_rank=(0, 1),
                    name="toy")


def bullets(schedule):
    return [str(v) for v in check(schedule)]


def test_valid_schedule_is_returned():
    s = one_f_one_b(3, 5)
    assert validate(s) is s
    assert check(s) == []


def test_idle_slots_are_ignored():
    s = two_stage(["0F0", None, None, "0B0"], [None, "1F0", "1B0"])
    assert check(s) == []


def test_range():
    s = two_stage(["0F0", "0B0", "2F0"], ["1F0", "1B0", "1F3"])
    assert bullets(s) == [
        "rank 0, step 2, 2F0: range: stage 2 does not exist (stages are 0..1)",
        "rank 1, step 2, 1F3: range: microbatch 3 does not exist (microbatches are 0..0)",
    ]


def test_placement_and_duplicate():
    s = two_stage(["0F0", "1F0", "0B0"], ["1F0", "1B0"])
    assert bullets(s) == [
        "rank 0, step 1, 1F0: placement: stage 1 is on rank 1 (stage_to_rank[1] == 1), not on rank 0",
        "rank 1, step 0, 1F0: duplicate: 1F0 already runs at rank 0, step 1",
    ]


def test_missing_and_mixed():
    s = Schedule(
        [["0F0", "0I0", "0F1", "0B1", "0W1"], ["1F0", "1W0", "1F1"]],
        num_stages=2, num_microbatches=2, stage_to_rank=(0, 1), name="toy",
    )
    assert bullets(s) == [
        "rank 0, step 1, 0I0: missing: 0I0 has no matching 0W0 (the weight gradient is never computed)",
        "rank 0, step 3, 0B1: mixed backward: 0B1 and 0W1 both compute the backward of stage 0, microbatch 1",
        "rank 1, step 1, 1W0: missing: 1W0 has no 1I0 (the input gradient is never computed)",
        "rank 1: missing: no backward for stage 1, microbatch 1: add 1B1, or 1I1 and 1W1",
    ]
    s = two_stage(["0B0"], ["1F0", "1B0"])
    assert bullets(s) == ["rank 0: missing: no forward 0F0: stage 0 must run F once for microbatch 0"]


def test_order():
    s = two_stage(["0F0", "0W0", "0I0"], ["1B0", "1F0"])
    assert bullets(s) == [
        "rank 0, step 1, 0W0: order: needs its input-grad pass 0I0, which this rank runs later, at step 2",
        "rank 1, step 0, 1B0: order: needs its own forward 1F0, which this rank runs later, at step 1",
    ]
    # Neighbouring stages on the same rank: the activation must be computed first.
    s = Schedule([["1F0", "0F0", "1B0", "0B0"]], num_stages=2, num_microbatches=1,
                 stage_to_rank=(0, 0))
    assert bullets(s) == [
        "rank 0, step 0, 1F0: order: needs the activation of 0F0, which this rank runs later, at step 1",
    ]


def test_deadlock():
    # Rank 0 waits for 1B0 before sending 0F1; rank 1 waits for 0F1 before running 1B0.
    s = two_stage(["0F0", "0B0", "0F1", "0B1"], ["1F0", "1F1", "1B0", "1B1"], m=2)
    found = check(s)
    assert [v.rule for v in found] == [Rule.DEADLOCK, Rule.DEADLOCK]
    assert [(v.rank, v.step, str(v.action)) for v in found] == [(0, 1, "0B0"), (1, 1, "1F1")]
    assert bullets(s) == [
        "rank 0, step 1, 0B0: deadlock: waits for the gradient of 1B0 (rank 1, step 2), "
        "but rank 1 is stuck at step 1 (1F1)",
        "rank 1, step 1, 1F1: deadlock: waits for the activation of 0F1 (rank 0, step 2), "
        "but rank 0 is stuck at step 1 (0B0)",
    ]


def test_validate_message():
    s = two_stage(["0F0", "0B0", "0F1", "0B1"], ["1F0", "1F1", "1B0", "1B1"], m=2)
    with pytest.raises(ScheduleError) as e:
        validate(s)
    assert str(e.value) == "\n".join([
        "Schedule 'toy' (2 ranks, 2 stages, 2 microbatches) is not valid:",
        "  * rank 0, step 1, 0B0: deadlock: waits for the gradient of 1B0 (rank 1, step 2), "
        "but rank 1 is stuck at step 1 (1F1)",
        "  * rank 1, step 1, 1F1: deadlock: waits for the activation of 0F1 (rank 0, step 2), "
        "but rank 0 is stuck at step 1 (0B0)",
        "Around rank 0, step 1:",
        "    step     0   1   2   3",
        "    rank 0 0F0 0B0 0F1 0B1",
        "               ^^^",
        "    rank 1 1F0 1F1 1B0 1B1",
        "Fix: reorder so that no rank waits for a rank that is (transitively) waiting for it.",
    ])
    assert [v.rule for v in e.value.violations] == [Rule.DEADLOCK, Rule.DEADLOCK]
    assert isinstance(e.value, ValueError)


def test_validate_message_windows_long_schedules_and_caps_bullets():
    s = zb_h1(4, 30)
    rows = [list(r) for r in s.actions]
    rows[1] = [a for a in rows[1] if a.kind.value != "W"]  # drop every W on rank 1
    with pytest.raises(ScheduleError) as e:
        validate(Schedule(rows, 4, 30, s.stage_to_rank, name="zb_h1"))
    text = str(e.value)
    lines = text.splitlines()
    assert lines[0] == "Schedule 'zb_h1' (4 ranks, 4 stages, 30 microbatches) is not valid:"
    assert lines[1] == ("  * rank 1, step 3, 1I0: missing: 1I0 has no matching 1W0 (the weight "
                        "gradient is never computed)")
    assert "  * ... and 10 more" in lines
    assert "Around rank 1, step 3:" in lines
    assert lines[-1] == ("Fix: give every (stage, microbatch) one F and either one B or one I "
                         "and one W.")
    # The grid is cut to the steps around the failure, marked with '...' where cut.
    grid_head = lines[lines.index("Around rank 1, step 3:") + 1]
    assert grid_head.rstrip().endswith("...") and grid_head.split()[1] == "0"
