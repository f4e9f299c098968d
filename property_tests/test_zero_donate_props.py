"""``zero.train_step(donate=True)`` takes the same steps as the default, bit for bit, in the state's own buffers.

The cases of ``test_zero_props`` (random MLPs, a data axis of 1-4 ranks, an
optional tp axis, stages 0-3, float32/float64, sgd/adam/adamw), with mixed
precision (bf16 compute, fp32 master) or offload drawn on top: every step's
loss, the final params and optimizer state, and every step's collectives
(op, axes, bytes, phase) equal the default path's, and the donated state's
parameter and master buffers, and Adam's moments, are the ones ``init``
allocated (updated in place: no new buffers per step). The default path is proven equal to one
device by ``test_zero_props``; so is, through this, the donated one.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st

import colofn
from colofn import tree as jt
from colofn import zero
from test_zero_props import OPTIMIZERS, cases


@st.composite
def donate_cases(draw: st.DrawFn) -> dict[str, Any]:
    case = draw(cases())
    case["data"] = case["data"][:2]
    case["extra"] = draw(st.sampled_from([{}, {}, {"precision": torch.bfloat16}, {"offload": True}]))
    return case


def _storage(tree: Any) -> list[int]:
    return [x.to_local().untyped_storage().data_ptr() for x in jt.leaves(tree) if isinstance(x, torch.Tensor) and x.ndim]


def run(case: dict[str, Any]) -> dict[str, Any]:
    sizes = tuple(case["sizes"][a] for a in case["names"])
    mesh = colofn.Mesh(sizes, case["names"])
    params = case["params"]
    if case["specs"] is not None:
        params = colofn.device_put(params, case["specs"], mesh=mesh)
    out: dict[str, Any] = {}
    for donate in (False, True):
        opt = OPTIMIZERS[case["opt"]]()
        state = zero.init(params, opt, mesh, stage=case["stage"], **case["extra"])
        first = (_storage(state.params), _storage(state.master), _storage(state.opt_state))
        losses, records = [], []
        for batch in case["data"]:
            with colofn.comm_trace() as rec:
                state, info = zero.train_step(case["loss_fn"], opt, state, batch, donate=donate)
            losses.append(info.loss)
            records.append([(r.op, r.axes, r.bytes_sent, r.phase) for r in rec])
        kept = [a == b for a, b in zip((_storage(state.params), _storage(state.master), _storage(state.opt_state)), first, strict=True)]
        out[donate] = (losses, records, zero.export_state(state), kept)
    return out


@given(donate_cases())
def test_donated_steps_equal_the_default_bit_for_bit_in_the_states_own_buffers(case):
    world = case["sizes"]["dp"] * case["sizes"]["tp"]
    for rank, out in enumerate(colofn.launch(run, case, world_size=world)):
        (losses, records, state, _), (d_losses, d_records, d_state, kept) = out[False], out[True]
        assert all(torch.equal(a, b) for a, b in zip(losses, d_losses, strict=True)), f"rank {rank}"
        assert records == d_records, f"rank {rank}"
        for key in ("params", "opt_state"):
            for a, b in zip(jt.leaves(state[key]), jt.leaves(d_state[key]), strict=True):
                assert torch.equal(a, b), f"rank {rank} {key}"
        # params and master buffers are written in place at every stage (stages 1-2 gather
        # into the full buffers they hold); so are the moments of an optimizer with an
        # in-place twin (adam, adamw: optim.update_in_place), not sgd's momentum
        assert kept[:2] == [True, True], f"rank {rank}: a donated step allocated new params or master buffers"
        assert kept[2] or case["opt"] == "sgd", f"rank {rank}: a donated step allocated new moments"
