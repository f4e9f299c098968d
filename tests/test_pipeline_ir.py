"""The schedule IR: Action text, Schedule normalisation and shape errors, placements."""

import pytest

from colofn.errors import ScheduleError
from colofn.pipeline import Action, ActionKind, Schedule, looped_placement, v_placement


@pytest.mark.parametrize("text", ["2F0", "0B13", "11I2", "3W0"])
def test_action_text_round_trips(text):
    assert str(Action.from_str(text)) == text


def test_action_fields_and_unpacking():
    a = Action.from_str(" 2F0 ")
    assert (a.stage, a.kind, a.microbatch) == (2, ActionKind.F, 0)
    stage, kind, mb = a
    assert (stage, kind, mb) == (2, ActionKind.F, 0)
    assert Action(2, "F", 0) == a and hash(Action(2, "F", 0)) == hash(a)
    assert repr(a) == "Action(2, 'F', 0)"
    assert eval(repr(a)) == a


@pytest.mark.parametrize("text", ["F0", "2X0", "2F", "2 F 0 1", "", "-1F0"])
def test_action_from_str_rejects_bad_text(text):
    with pytest.raises(ScheduleError) as e:
        Action.from_str(text)
    assert str(e.value) == (
        f"Cannot parse action {text!r}: expected <stage><kind><microbatch> with kind one "
        "of F, B, I, W, e.g. '2F0'."
    )


def test_action_rejects_bad_fields():
    with pytest.raises(ScheduleError, match=r"Unknown action kind 'X'; expected one of 'F'"):
        Action(0, "X", 0)
    with pytest.raises(ScheduleError, match=r"^Action stage must be an int >= 0, got -1\.$"):
        Action(-1, "F", 0)
    with pytest.raises(ScheduleError, match=r"^Action microbatch must be an int >= 0, got 1\.5\.$"):
        Action(0, "F", 1.5)


def test_schedule_normalises_rows():
    s = Schedule([["0F0", None, "."], [Action(1, "F", 0)]], num_stages=2, num_microbatches=1,
                 stage_to_rank=[0, 1])
    assert s.actions == ((Action(0, "F", 0), None, None), (Action(1, "F", 0),))
    assert s.stage_to_rank == (0, 1)
    assert s.num_ranks == 2 and s.rank_of(1) == 1 and s.stages_of(0) == (0,)
    assert hash(s) == hash(Schedule(s.actions, 2, 1, (0, 1)))


def test_schedule_shape_errors():
    with pytest.raises(ScheduleError) as e:
        Schedule([["0F0"], ["1F0"]], num_stages=4, num_microbatches=1, stage_to_rank=(0, 1))
    assert str(e.value) == (
        "Schedule.stage_to_rank has 2 entries but there are 4 stages; give one rank per "
        "stage, e.g. looped_placement(2, chunks=2)."
    )
    with pytest.raises(ScheduleError) as e:
        Schedule([["0F0"], ["1F0"]], num_stages=2, num_microbatches=1, stage_to_rank=(0, 2))
    assert str(e.value) == (
        "Schedule.stage_to_rank must map stages to ranks 0..1 (one action list per rank): "
        "stage 1 -> 2."
    )
    with pytest.raises(ScheduleError) as e:
        Schedule([["0F0", 3]], num_stages=1, num_microbatches=1, stage_to_rank=(0,))
    assert str(e.value) == (
        "rank 0, step 1: expected an Action, its text (like '2F0') or None (an idle slot), "
        "got int 3."
    )
    with pytest.raises(ScheduleError, match=r"^Schedule.num_microbatches must be an int >= 1"):
        Schedule([["0F0"]], num_stages=1, num_microbatches=0, stage_to_rank=(0,))
    with pytest.raises(ScheduleError, match=r"^Schedule.actions is empty"):
        Schedule([], num_stages=1, num_microbatches=1, stage_to_rank=(0,))
    with pytest.raises(ScheduleError, match=r"^Schedule.actions\[0\] must be a sequence"):
        Schedule(["0F0"], num_stages=1, num_microbatches=1, stage_to_rank=(0,))


def test_schedule_errors_are_value_errors():
    with pytest.raises(ValueError):
        Action.from_str("nope")


def test_placements():
    assert looped_placement(4) == (0, 1, 2, 3)
    assert looped_placement(2, chunks=3) == (0, 1, 0, 1, 0, 1)
    assert v_placement(4) == (0, 1, 2, 3, 3, 2, 1, 0)
    assert v_placement(2, chunks=4) == (0, 1, 1, 0, 0, 1, 1, 0)
    p = 5
    placement = v_placement(p)
    for r in range(p):
        assert [s for s, owner in enumerate(placement) if owner == r] == [r, 2 * p - 1 - r]
    with pytest.raises(ScheduleError, match=r"^num_ranks must be an int >= 1, got 0\.$"):
        looped_placement(0)


def test_schedules_pickle():
    # Runtimes may ship schedules to spawned processes.
    import pickle

    from colofn.pipeline import zbv

    s = zbv(2, 3)
    assert pickle.loads(pickle.dumps(s)) == s
