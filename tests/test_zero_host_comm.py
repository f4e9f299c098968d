"""ZeRO's collectives on host backends (``colofn.zero._host_comm``), and the step's own check of its loss."""

from __future__ import annotations

import pytest
import torch

import colofn
from _zero_models import batches, make_optimizer, max_error, mlp_loss, mlp_params
from colofn import P, _comm, zero
from colofn.errors import SpecError
from colofn.zero import _host_comm

SIZES = [5, 7, 6, 3]


def _no_native(*args, **kwargs):
    raise AssertionError("a host backend ran ZeRO-1's reduce-scatter or all-gather as torch's own")


def _stage1(data, donate):
    mesh = colofn.Mesh((colofn.process_count(),), ("dp",))
    opt = make_optimizer("adamw")
    state = zero.init(mlp_params(SIZES), opt, mesh, stage=1)
    ops = set()
    for batch in data:
        with colofn.comm_trace() as records:
            state, info = zero.train_step(mlp_loss, opt, state, batch, donate=donate)
        ops |= {(r.op, r.phase) for r in records if r.shape != ()}
    return zero.params(state), ops


def _counted(monkeypatch, name):
    calls = []
    f = getattr(_host_comm, name)
    monkeypatch.setattr(_host_comm, name, lambda *a: calls.append(len(a[0])) or f(*a))
    return calls


@pytest.mark.parametrize("donate", [False, True])
def test_stage1_on_a_host_backend_sums_and_gathers_every_bucket_in_one_coalesced_op(monkeypatch, donate):
    # gloo's reduce-scatter is an all-reduce of a copy, and each operation pays its own
    # rendezvous: on a host backend ZeRO-1 sums its 3 small buckets (under DDP's 1 MiB first
    # cap) in place in one coalesced all-reduce, and gathers them in one coalesced all-gather,
    # never torch's reduce-scatter or all-gather
    monkeypatch.setattr(_comm, "_reduce_scatter_from", _no_native)
    monkeypatch.setattr(_comm, "_all_gather_into", _no_native)
    sums, gathers = _counted(monkeypatch, "start_all_reduce_coalesced"), _counted(monkeypatch, "start_gather_coalesced")
    data = batches(SIZES, 12, 2)
    want, _ = zero.reference_train(mlp_loss, make_optimizer("adamw"), mlp_params(SIZES), data)
    for params, ops in colofn.launch(_stage1, data, donate, world_size=3):
        assert max_error(params, want) < 1e-5
        assert ops == {("reduce_scatter", "backward"), ("all_gather", "forward")}  # recorded as what they stand for
    assert sums == gathers == [len(SIZES) - 1] * (3 * len(data))  # 3 ranks x 2 steps, all 3 buckets in each


def _tp_varying_loss():
    mesh = colofn.Mesh((2, 2), ("dp", "tp"))
    opt = make_optimizer("sgd")
    params = colofn.device_put({"w": torch.ones(4)}, {"w": P("tp")}, mesh=mesh)
    state = zero.init(params, opt, mesh, stage=1)
    zero.train_step(lambda p, b: (b @ p["w"]).mean(), opt, state, torch.ones(4, 2))


def test_a_loss_varying_along_a_model_axis_names_the_axis_and_the_fix():
    with pytest.raises(SpecError) as e:
        colofn.launch(_tp_varying_loss, world_size=4)
    text = str(e.value)
    assert "loss_fn '<lambda>' returned a loss that varies along the model axis 'tp'" in text
    assert "Fix: psum/pmean the loss over 'tp' inside loss_fn" in text
