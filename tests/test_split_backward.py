"""``I`` then ``W`` (colofn.pipeline._split_backward) equals ``B``, and runs each backward op once.

The runtime's own equivalence tests (tests/test_pipeline_runtime.py,
property_tests/test_pipeline_runtime_props.py) run the zero-bubble schedules
through it; here the two halves are checked directly against one
``torch.autograd.grad`` over inputs and parameters, on stage shapes that the
runtime's tanh chains do not have: tied parameters, parameters that reach an
output without passing the input path, unused parameters, stages without
inputs. The op count is the point of the split: ``W`` must not run the input
path again.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from colofn.pipeline._split_backward import backward_input, backward_weight


class _Count(TorchDispatchMode):
    """Counts the aten ops run under it but views (the backward's: autograd runs CPU nodes on this thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket is not torch.ops.aten.view:  # finding a leaf's gradient edge makes a view
            self.ops += 1
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.mm += 1
        return func(*args, **(kwargs or {}))


def _chain(layers: int, width: int, seed: int, *, tie: bool = False):
    g = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(layers):
        params.append(torch.randn(width, width, generator=g, dtype=torch.float64).requires_grad_())
        params.append(torch.randn(width, generator=g, dtype=torch.float64).requires_grad_())
    x = torch.randn(3, width, generator=g, dtype=torch.float64).requires_grad_()

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(layers):
            w = params[0] if tie else params[2 * i]
            h = torch.tanh(h @ w + params[2 * i + 1])
        return h

    return params, x, forward


def _split(outs, grads, ins, params):
    found, work = backward_input(outs, grads, ins, params)
    return found, backward_weight(work, params)


def _reference(outs, grads, ins, params):
    found = torch.autograd.grad(outs, list(ins) + list(params), grads, retain_graph=True, allow_unused=True,
                                materialize_grads=True)
    return list(found[:len(ins)]), list(found[len(ins):])


def _assert_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_i_plus_w_runs_the_ops_of_b_once():
    params, x, forward = _chain(4, 8, 0)
    g = torch.randn(3, 8, dtype=torch.float64)
    y = forward(x)
    with _Count() as full:
        torch.autograd.grad([y], [x, *params], [g])
    y = forward(x)
    with _Count() as split:
        found, work = backward_input([y], [g], [x], params)
        del y
        backward_weight(work, params)
    # B: per layer one matmul for the input and one for the weight (the first layer's input too).
    assert full.mm == 8
    assert split.mm == full.mm
    assert split.ops == full.ops


def test_the_old_way_ran_the_input_path_twice():
    """What this module replaced: ``W`` from the outputs again; the count test above would catch its return."""
    params, x, forward = _chain(4, 8, 0)
    g = torch.randn(3, 8, dtype=torch.float64)
    y = forward(x)
    with _Count() as old:
        torch.autograd.grad([y], [x], [g], retain_graph=True)
        torch.autograd.grad([y], params, [g])
    assert old.mm > 8


def test_tied_parameter_is_counted_once():
    params, x, forward = _chain(3, 5, 1, tie=True)
    y = forward(x)
    g = torch.randn_like(y)
    _assert_equal(_split([y], [g], [x], params)[0], _reference([y], [g], [x], params)[0])
    y = forward(x)
    _assert_equal(_split([y], [g], [x], params)[1], _reference([forward(x)], [g], [x], params)[1])


def test_first_stage_without_inputs_does_everything_in_w():
    params, x, forward = _chain(2, 4, 2)
    y = forward(x.detach())
    g = torch.randn_like(y)
    found, work = backward_input([y], [g], [], params)
    assert found == []
    _assert_equal(backward_weight(work, params), _reference([forward(x.detach())], [g], [], params)[1])


def test_parameter_only_output_unused_parameter_and_leaf_output():
    g = torch.Generator().manual_seed(3)
    w, v, unused, x = (torch.randn(4, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4))

    def outs():
        return [torch.sin(x @ w), (v * 2).sum(0), w]  # the last: a parameter returned as is

    cot = [torch.randn(4, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64),
           torch.randn(4, 4, dtype=torch.float64)]
    got = _split(outs(), cot, [x], [w, v, unused])
    want = _reference(outs(), cot, [x], [w, v, unused])
    _assert_equal(got[0], want[0])
    _assert_equal(got[1], want[1])
    assert not got[1][2].any()


def test_input_unused_and_no_grad_outputs():
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y = w * 3
    found, work = backward_input([y], [torch.ones(3, 3, dtype=torch.float64)], [x], [w])
    assert not found[0].any()
    torch.testing.assert_close(backward_weight(work, [w])[0], torch.full((3, 3), 3.0, dtype=torch.float64))
    found, work = backward_input([], [], [x], [w])
    assert not found[0].any() and not backward_weight(work, [w])[0].any()


@st.composite
def _graphs(draw):
    """A random stage: layers drawing from a pool of parameters (shared, unused), two inputs, 1-2 outputs."""
    width = draw(st.integers(1, 4))
    pool = draw(st.integers(1, 5))
    layers = draw(st.lists(st.tuples(st.integers(0, pool - 1), st.sampled_from(["tanh", "mul", "side"]),
                                     st.integers(0, 1)), min_size=1, max_size=5))
    outputs = draw(st.sampled_from(["h", "h+side", "side-only"]))
    return width, pool, layers, outputs, draw(st.integers(0, 2**16))


@given(_graphs())
def test_split_equals_one_backward(graph):
    width, pool, layers, outputs, seed = graph
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(width, width, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(pool)]
    ins = [torch.randn(2, width, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2)]

    def forward():
        h, side = ins[0], None
        for p, kind, which in layers:
            w = params[p]
            if kind == "tanh":
                h = torch.tanh(h @ w) + (ins[1] if which else 0)
            elif kind == "mul":
                h = h * w.sum(0)
            else:
                s = (w * w).sum()
                side = s if side is None else side + s
        outs = {"h": [h], "h+side": [h] + ([side.reshape(1)] if side is not None else []),
                "side-only": [side.reshape(1)] if side is not None else [h]}[outputs]
        return [o for o in outs if o.requires_grad]

    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in forward()]
    got = _split(forward(), cot, ins, params)
    want = _reference(forward(), cot, ins, params)
    _assert_equal(got[0], want[0])
    _assert_equal(got[1], want[1])
