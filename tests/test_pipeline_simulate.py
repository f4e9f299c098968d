"""simulate() reproduces the published bubble and memory formulas, exactly.

Notation: ``p`` ranks, ``m`` microbatches, ``v`` stages (chunks) per rank.
"""

import pytest

from colofn.errors import ScheduleError
from colofn.pipeline import (
    ActionKind,
    Costs,
    Schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    simulate,
    zb_h1,
    zb_h2,
    zbv,
)

GRID = [(p, m) for p in (1, 2, 3, 4, 6) for m in (1, 2, 3, 5, 8, 13)]


@pytest.mark.parametrize("p, m", GRID)
def test_gpipe_and_1f1b_bubble_and_memory(p, m):
    """GPipe and 1F1B: bubble fraction (p-1)/(m+p-1) on every rank (T_B = 2 T_F, no
    latency); peak activations on stage 0: m for GPipe, min(p, m) for 1F1B
    (rank r of 1F1B holds at most min(p - r, m))."""
    costs = Costs(forward=1, backward=2)
    for fn in (gpipe, one_f_one_b):
        r = simulate(fn(p, m), costs)
        assert r.makespan == 3 * (m + p - 1)
        assert r.bubble == pytest.approx([(p - 1) / (m + p - 1)] * p, abs=1e-12)
        assert r.busy == (3.0 * m,) * p
    assert simulate(gpipe(p, m), costs).peak_activations == (m,) * p
    assert simulate(one_f_one_b(p, m), costs).peak_activations == tuple(
        min(p - r, m) for r in range(p))


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("v", [1, 2, 3, 4])
def test_interleaved_bubble(p, v):
    """Interleaved 1F1B (Narayanan et al. 2021, section 2.2.2): with per-chunk times
    t_f = T_F / v and t_b = T_B / v, the bubble is (p-1)(t_f + t_b), i.e. a fraction
    (p-1)/(v m) of the ideal compute time m (T_F + T_B), for every m that is a
    multiple of p."""
    for m in (p, 2 * p, 3 * p):
        r = simulate(interleaved_1f1b(p, m, chunks=v), Costs(forward=1, backward=2))
        ideal = m * v * 3
        assert (r.makespan - ideal) / ideal == pytest.approx((p - 1) / (v * m), abs=1e-12)
        # Rank 0 runs 2(p-1) + (v-1)p warm-up forwards, then one more before its first B
        # (chunks=1 is plain 1F1B).
        assert r.peak_activations[0] == (min(v * p + p - 1, v * m) if v > 1 else min(p, m))


ZB_COSTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (3, 2, 1), (1, 1, 0.5), (2, 3, 1.5),
            (1.5, 1, 0.25)]


@pytest.mark.parametrize("t_f, t_b, t_w", ZB_COSTS)
def test_zero_bubble_formulas(t_f, t_b, t_w):
    """Zero Bubble (Qi et al. 2023, arXiv 2401.10241), handcrafted schedules, in the
    paper's own notation: T_F forward, **T_B the backward for the input only** (our
    ``input_grad``, our action kind I) and T_W the backward for the weights (our W).
    The paper states (its Table of handcrafted schedules):

    * 1F1B:  bubble (p-1)(T_F + T_B + T_W), peak memory p microbatches;
    * ZB-H1: bubble (p-1)(T_F + T_B - T_W), peak memory p microbatches;
    * ZB-H2: bubble (p-1)(T_F + T_B - 2 T_W), peak memory 2p - 1 microbatches.

    The bubble is per training iteration with the optimizer step not synchronising
    the ranks (the paper's "post validation", which is what makes ZB-H2's
    parallelogram bubble-free), so an iteration costs the longest per-rank span,
    ``max(result.spans)``, minus the compute m (T_F + T_B + T_W). The handcrafted
    schedules assume T_W <= T_F and T_W <= T_B, m >= p for ZB-H1 and m >= 2p - 1
    for ZB-H2; every cost set here satisfies that.
    """
    T_F, T_B, T_W = t_f, t_b, t_w  # the paper's names
    costs = Costs(forward=T_F, input_grad=T_B, weight_grad=T_W)  # B-as-a-whole = T_B + T_W
    for p in (1, 2, 3, 4, 5):
        for m in (2 * p - 1, 2 * p, 3 * p + 1):
            compute = m * (T_F + T_B + T_W)

            one_f_one_b_result = simulate(one_f_one_b(p, m), costs)
            assert max(one_f_one_b_result.spans) - compute == pytest.approx(
                (p - 1) * (T_F + T_B + T_W))

            h1 = simulate(zb_h1(p, m), costs)
            assert max(h1.spans) - compute == pytest.approx((p - 1) * (T_F + T_B - T_W))
            assert h1.peak_activations[0] == p

            h2 = simulate(zb_h2(p, m), costs)
            assert max(h2.spans) - compute == pytest.approx((p - 1) * (T_F + T_B - 2 * T_W))
            assert h2.peak_activations[0] == 2 * p - 1


def test_zb_h1_for_m_at_least_p():
    costs = Costs(forward=1, input_grad=1, weight_grad=1)
    for p in (2, 3, 4):
        r = simulate(zb_h1(p, p), costs)
        assert max(r.spans) - 3 * p == (p - 1) * 1
        # The bubble is a third of 1F1B's when T_F = T_B = T_W.
        f1b = simulate(one_f_one_b(p, p), costs)
        assert (f1b.makespan - 3 * p) == 3 * (r.makespan - 3 * p)


def test_zbv_has_no_bubble_inside_each_rank():
    """ZB-V with T_F = T_I = T_W: every rank computes without a gap from its first
    action to its last, holding at most 2p chunk activations (p full stages: 1F1B's
    memory)."""
    for p in (2, 3, 4):
        for m in (2 * p, 3 * p):
            r = simulate(zbv(p, m), Costs(forward=1, input_grad=1, weight_grad=1))
            assert r.spans == (2 * 3.0 * m,) * p
            assert max(r.peak_activations) == 2 * p


def test_weight_grad_stash():
    # ZB-H1 rank r holds its W back r places, so r + 1 weight gradients wait at most.
    r = simulate(zb_h1(4, 8))
    assert r.peak_weight_stash == (1, 2, 3, 4)
    assert simulate(one_f_one_b(4, 8)).peak_weight_stash == (0, 0, 0, 0)


def test_latency_and_per_stage_costs():
    # Rank 0 F0 [0, 1]; rank 1 F0 [1.5, 2.5], B0 [2.5, 4.5]; rank 0 B0 [5, 7].
    r = simulate(gpipe(2, 1), Costs(forward=1, backward=2, latency=0.5))
    assert [(e.rank, str(e.action), e.start, e.end) for e in r.timeline] == [
        (0, "0F0", 0.0, 1.0), (1, "1F0", 1.5, 2.5), (1, "1B0", 2.5, 4.5), (0, "0B0", 5.0, 7.0)]
    assert r.makespan == 7.0 and r.idle == (4.0, 4.0)
    r = simulate(gpipe(2, 1), Costs(forward=(1, 3), backward=(2, 4)))
    assert r.makespan == 1 + 3 + 4 + 2 and r.busy == (3.0, 7.0)


def test_results_are_consistent():
    s = zb_h2(3, 7)
    costs = Costs(forward=1.5, input_grad=1, weight_grad=0.5, latency=0.25)
    r = simulate(s, costs)
    assert len(r.timeline) == sum(len(row) for row in s.actions)
    assert [e.start for e in r.timeline] == sorted(e.start for e in r.timeline)
    for rank in range(s.num_ranks):
        mine = [e for e in r.timeline if e.rank == rank]
        assert [e.action for e in mine] == list(s.actions[rank])
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:], strict=False))
        assert r.busy[rank] == pytest.approx(sum(e.end - e.start for e in mine))
    assert r.bubble_ratio == pytest.approx(sum(r.idle) / (3 * r.makespan))
    assert "rank      busy      idle  bubble  peak act  peak W stash" in r.summary()


def test_costs_errors():
    with pytest.raises(ScheduleError, match=r"^Costs.forward must be finite numbers >= 0, got -1"):
        Costs(forward=-1)
    with pytest.raises(ScheduleError, match=r"^Costs.latency must be one number"):
        Costs(latency=(1, 2))
    with pytest.raises(ScheduleError) as e:
        simulate(gpipe(2, 2), Costs(forward=(1, 2, 3)))
    assert str(e.value) == ("Costs.forward has 3 per-stage entries but the schedule has 2 "
                            "stages; give one number, or one per stage.")
    assert Costs().time(ActionKind.B, 0) == 2.0
    assert Costs(backward=5).time(ActionKind.B, 0) == 5.0


def test_simulate_validates_first():
    bad = Schedule([["0B0", "0F0"]], num_stages=1, num_microbatches=1, stage_to_rank=(0,))
    with pytest.raises(ScheduleError, match="order: needs its own forward 0F0"):
        simulate(bad)
