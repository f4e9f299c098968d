"""In-place writes inside shard_map are seen by the varying/invariant check (issue 11 §2).

The issue's two programs are rejected with JAX's text; writes through ``out=``,
through a view taken before the write, and into an invariant differentiable
buffer are tracked; what is not a write (``requires_grad_``) or is reduced
after the write is accepted. The random programs are in
``property_tests/test_mutation_props.py``.
"""

from __future__ import annotations

import pytest
import torch

import colofn
from colofn import P
from colofn.errors import SpecError

X = torch.arange(4.0)


def run(f, *, out_specs=P(), check_vma=True, x=X):
    def program():
        mesh = colofn.Mesh((2,), ("i",))
        try:
            y = colofn.shard_map(f, mesh=mesh, in_specs=P("i"), out_specs=out_specs, check_vma=check_vma)(x)
        except SpecError as e:
            return f"{type(e).__name__}: {e}"
        return y.to_local().tolist()

    return colofn.launch(program, world_size=2)


WRITTEN = (
    "SpecError: shard_map of 'f': the result does not fit out_specs on Mesh(i=2):\n"
    "  * out_specs P() for the output implies that the corresponding output value is replicated across mesh "
    "axis 'i', but could not infer replication over it: the value varies along 'i' (a value varying along it "
    "was written into it in place). Fix: psum/pmean/all_gather(to='invariant') it over 'i', or name 'i' in "
    "its out spec"
)


def test_setitem_of_a_varying_value_is_rejected():
    def f(x):
        y = torch.zeros(2)
        y[0] = x.sum()
        return y

    assert run(f) == [WRITTEN, WRITTEN]


def test_write_through_a_view_makes_the_base_vary():
    def f(x):
        y = torch.zeros(2)
        y[0:1].add_(x.sum())
        return y

    assert run(f) == [WRITTEN, WRITTEN]


def test_a_view_taken_before_a_write_into_its_base_varies():
    def f(x):
        y = torch.zeros(2)
        z = y[1:]  # never written itself, but shares y's storage
        y.copy_(x)
        return z

    assert run(f) == [WRITTEN, WRITTEN]


@pytest.mark.parametrize("how", ["out", "index_put_", "masked_fill_", "iadd"])
def test_other_writes_are_tracked(how):
    def f(x):
        y = torch.zeros(2)
        if how == "out":
            torch.add(x, 1.0, out=y)
        elif how == "index_put_":
            y.index_put_((torch.tensor([1]),), x[0])
        elif how == "masked_fill_":
            y.masked_fill_(x > 1.5, 1.0)  # the mask varies: where the write lands varies
        else:
            y += x
        return y

    assert run(f) == [WRITTEN, WRITTEN]


def test_reduced_after_the_write_or_not_a_write_is_accepted():
    def f(x):
        y = torch.zeros(2)
        y[0] = x.sum()
        z = colofn.psum(y, "i")  # invariant again
        w = torch.ones(2).requires_grad_()  # in place by name, writes no value
        return z * w

    assert run(f) == [[6.0, 0.0], [6.0, 0.0]]


def test_naming_the_axis_in_the_out_spec_returns_each_ranks_buffer():
    def f(x):
        y = torch.zeros(2)
        y[0] = x.sum()
        return y

    assert run(f, out_specs=P("i")) == [[1.0, 0.0], [5.0, 0.0]]


def test_check_vma_false_does_not_track():
    def f(x):
        y = torch.zeros(2)
        y[0] = x.sum()
        return y

    assert run(f, check_vma=False) == [[1.0, 0.0], [5.0, 0.0]]


def test_invariant_buffer_written_with_varying_data_sums_its_gradient():
    """``b = w * 1; b[0] = x.sum()``: b varies, so w's cotangent (from b[1]) is summed over 'i'."""
    w0 = torch.tensor([1.0, 2.0])

    def program():
        mesh = colofn.Mesh((2,), ("i",))
        w = w0.clone().requires_grad_()

        def f(w, x):
            b = w * 1.0
            b[0] = x.sum()
            return colofn.psum((b * b).sum(), "i")

        colofn.shard_map(f, mesh=mesh, in_specs=(P(), P("i")), out_specs=P())(w, X).to_local().backward()
        return w.grad.tolist()

    # single device: sum over ranks of (x_r.sum()**2 + w[1]**2): d/dw = [0, 2 * 2 * w[1]]
    assert colofn.launch(program, world_size=2) == [[0.0, 8.0], [0.0, 8.0]]


def test_reference_check_replicated_finds_the_per_rank_values():
    """The oracle by values: the issue's program gives different copies on the two devices."""
    from colofn.testing import shard_map_reference

    def f(x):
        y = torch.zeros(2)
        y[0] = x.sum()
        return y

    ref = shard_map_reference(f, mesh_shape={"i": 2}, in_specs=P("i"), out_specs=P(), check_replicated=True)
    with pytest.raises(SpecError, match=r"out spec P\(\) for the output at <root> leaves out mesh axis 'i', but the "):
        ref(X)
    ok = shard_map_reference(lambda x: colofn.psum(x, "i"), mesh_shape={"i": 2}, in_specs=P("i"), out_specs=P(), check_replicated=True)
    assert ok(X).tolist() == [2.0, 4.0]
