"""validate() accepts every built-in schedule and rejects mutated ones with the right message.

The oracle for "valid" is independent of colofn's code: a schedule is executable
under the contract (blocking receives, non-blocking sends) exactly when the graph
of program order plus data dependencies is acyclic, checked here with graphlib.
"""

import graphlib

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from colofn.pipeline import (
    SCHEDULES,
    Action,
    ActionKind,
    Costs,
    Rule,
    Schedule,
    check,
    simulate,
)

F, B, I, W = ActionKind.F, ActionKind.B, ActionKind.I, ActionKind.W  # noqa: E741
CHUNKS = {"gpipe": (1, 2, 3), "1f1b": (1,), "interleaved_1f1b": (1, 2, 3), "zb_h1": (1,),
          "zb_h2": (1,), "zbv": (2,), "dualpipev": (2,)}


@st.composite
def builtin(draw, min_ranks=1, min_microbatches=1):
    name = draw(st.sampled_from(sorted(SCHEDULES)))
    p = draw(st.integers(min_ranks, 5))
    v = draw(st.sampled_from(CHUNKS[name]))
    if name == "interleaved_1f1b" and v > 1:
        m = p * draw(st.integers(max(1, -(-min_microbatches // p)), 3))
    else:
        m = draw(st.integers(min_microbatches, 9))
    return SCHEDULES[name](p, m, chunks=v)


def with_rows(schedule, rows):
    return Schedule(rows, schedule.num_stages, schedule.num_microbatches, schedule.stage_to_rank,
                    name=schedule.name)


def reference_has_cycle(schedule):
    """Program order + data dependencies, written out again here, then a topological sort."""
    actions = {a for row in schedule.actions for a in row if a is not None}
    graph = {a: set() for a in actions}
    for row in schedule.actions:
        row = [a for a in row if a is not None]
        for before, after in zip(row, row[1:], strict=False):
            graph[after].add(before)
    last = schedule.num_stages - 1
    for a in actions:
        s, k, m = a.stage, a.kind, a.microbatch
        if k is F and s > 0:
            graph[a].add(Action(s - 1, F, m))
        if k in (B, I):
            graph[a].add(Action(s, F, m))
            if s < last:
                graph[a] |= {x for x in (Action(s + 1, B, m), Action(s + 1, I, m)) if x in actions}
        if k is W:
            graph[a].add(Action(s, I, m))
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError:
        return True
    return False


def locate(schedule, action):
    return next((r, k) for r, row in enumerate(schedule.actions) for k, a in enumerate(row)
                if a == action)


@given(builtin())
def test_builtins_are_valid(schedule):
    assert check(schedule) == []
    assert not reference_has_cycle(schedule)


@given(builtin(), st.data())
def test_dropped_action_is_reported_missing(schedule, data):
    every = [(r, k) for r, row in enumerate(schedule.actions) for k in range(len(row))]
    r, k = data.draw(st.sampled_from(every))
    a = schedule.actions[r][k]
    rows = [list(row) for row in schedule.actions]
    del rows[r][k]
    mutated = with_rows(schedule, rows)
    s, m = a.stage, a.microbatch
    if a.kind is F:
        expected = f"rank {r}: missing: no forward {a}: stage {s} must run F once for microbatch {m}"
    elif a.kind is B:
        expected = (f"rank {r}: missing: no backward for stage {s}, microbatch {m}: "
                    f"add {s}B{m}, or {s}I{m} and {s}W{m}")
    elif a.kind is I:
        w = Action(s, W, m)
        r_w, k_w = locate(mutated, w)
        expected = (f"rank {r_w}, step {k_w}, {w}: missing: {w} has no {a} "
                    "(the input gradient is never computed)")
    else:
        i = Action(s, I, m)
        r_i, k_i = locate(mutated, i)
        expected = (f"rank {r_i}, step {k_i}, {i}: missing: {i} has no matching {a} "
                    "(the weight gradient is never computed)")
    assert [str(v) for v in check(mutated)] == [expected]


@given(builtin(min_ranks=2), st.data())
def test_action_on_the_wrong_rank(schedule, data):
    every = [(r, k) for r, row in enumerate(schedule.actions) for k in range(len(row))]
    r, k = data.draw(st.sampled_from(every))
    to = data.draw(st.sampled_from([x for x in range(schedule.num_ranks) if x != r]))
    rows = [list(row) for row in schedule.actions]
    a = rows[r].pop(k)
    at = data.draw(st.integers(0, len(rows[to])))
    rows[to].insert(at, a)
    found = check(with_rows(schedule, rows))
    owner = schedule.stage_to_rank[a.stage]
    assert [str(v) for v in found] == [
        f"rank {to}, step {at}, {a}: placement: stage {a.stage} is on rank {owner} "
        f"(stage_to_rank[{a.stage}] == {owner}), not on rank {to}"
    ]


@given(builtin(), st.data())
def test_swapped_dependency_is_an_order_error(schedule, data):
    s = data.draw(st.integers(0, schedule.num_stages - 1))
    m = data.draw(st.integers(0, schedule.num_microbatches - 1))
    r, k_f = locate(schedule, Action(s, F, m))
    k_b = next(k for k, a in enumerate(schedule.actions[r])
               if a is not None and a.stage == s and a.microbatch == m and a.kind in (B, I))
    rows = [list(row) for row in schedule.actions]
    rows[r][k_f], rows[r][k_b] = rows[r][k_b], rows[r][k_f]
    mutated = with_rows(schedule, rows)
    found = check(mutated)
    backward = rows[r][k_f]
    assert {v.rule for v in found} == {Rule.ORDER}
    assert (f"rank {r}, step {k_f}, {backward}: order: needs its own forward {s}F{m}, which "
            f"this rank runs later, at step {k_b}") in [str(v) for v in found]
    assert reference_has_cycle(mutated)


@given(builtin(min_ranks=2, min_microbatches=2), st.data())
def test_deadlock_inducing_reorder(schedule, data):
    """Move a backward whose gradient comes from another rank up to just after its own
    forward; keep the moves that deadlock, and check the report on one of them."""
    candidates = []
    for r, row in enumerate(schedule.actions):
        for k, b in enumerate(row):
            if b is None or b.kind not in (B, I) or b.stage == schedule.num_stages - 1:
                continue
            if schedule.stage_to_rank[b.stage + 1] == r:
                continue
            k_f = row.index(Action(b.stage, F, b.microbatch))
            if k_f + 1 < k:
                rows = [list(x) for x in schedule.actions]
                rows[r].insert(k_f + 1, rows[r].pop(k))
                mutated = with_rows(schedule, rows)
                if check(mutated) and check(mutated)[0].rule is Rule.DEADLOCK:
                    candidates.append(mutated)
    assume(candidates)
    mutated = data.draw(st.sampled_from(candidates))
    found = check(mutated)
    assert {v.rule for v in found} == {Rule.DEADLOCK}
    assert reference_has_cycle(mutated)
    blocked = {v.rank for v in found}
    for v in found:
        assert mutated.actions[v.rank][v.step] == v.action
        other = int(v.message.split("but rank ")[1].split()[0])
        assert other in blocked  # every wait points at another stuck rank: a cycle
        assert v.message.startswith("waits for ")


@given(builtin(), st.data())
def test_any_reorder_is_valid_exactly_when_acyclic(schedule, data):
    r = data.draw(st.integers(0, schedule.num_ranks - 1))
    rows = [list(row) for row in schedule.actions]
    rows[r] = data.draw(st.permutations(rows[r]))
    mutated = with_rows(schedule, rows)
    found = check(mutated)
    assert (found == []) == (not reference_has_cycle(mutated))
    assert {v.rule for v in found} <= {Rule.ORDER, Rule.DEADLOCK}


@given(builtin(), st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([0.5, 1.0, 1.5]),
       st.sampled_from([0.25, 1.0]), st.sampled_from([0.0, 0.3]))
def test_simulation_respects_order_and_dependencies(schedule, t_f, t_i, t_w, latency):
    costs = Costs(forward=t_f, input_grad=t_i, weight_grad=t_w, latency=latency)
    result = simulate(schedule, costs)
    end = {e.action: e.end for e in result.timeline}
    rank_of = {e.action: e.rank for e in result.timeline}
    previous_end = {}
    for e in sorted(result.timeline, key=lambda e: (e.rank, e.start)):
        a = e.action
        assert e.end - e.start == pytest.approx(costs.time(a.kind, a.stage))
        needs = []
        if a.kind is F and a.stage > 0:
            needs.append(Action(a.stage - 1, F, a.microbatch))
        if a.kind in (B, I):
            needs.append(Action(a.stage, F, a.microbatch))
            needs += [x for x in (Action(a.stage + 1, B, a.microbatch),
                                  Action(a.stage + 1, I, a.microbatch)) if x in end]
        if a.kind is W:
            needs.append(Action(a.stage, I, a.microbatch))
        ready = max([previous_end.get(e.rank, 0.0)] + [
            end[n] + (latency if rank_of[n] != e.rank else 0.0) for n in needs])
        assert e.start == pytest.approx(ready)  # starts as soon as its rank and its inputs allow
        previous_end[e.rank] = e.end
    assert result.makespan == max(end.values())
