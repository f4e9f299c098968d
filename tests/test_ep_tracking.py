"""The MoE layer's bookkeeping stays out of the varying/invariant mode, and its results are tagged as the mode would.

Every op the tracking mode sees costs Python time on every rank of every step
(issue 12 §4): the dispatch, grouping and combine indices of a MoE layer once
sent ~260 ops per layer through it, and one in-place index write made every
later op of the step pay for the written-storage check.
"""

from __future__ import annotations

import threading
from unittest import mock

import pytest
import torch

import colofn
from colofn import P, _vma, random
from colofn.models import gpt
from colofn.parallel import Plan, ep


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_layer_passes_few_ops_through_the_tracking_mode_and_tags_like_it(capacity_factor):
    cfg = gpt.config("tiny", n_experts=4, top_k=2, capacity_factor=capacity_factor, dtype=torch.float64)
    params = gpt.init(random.key(0), cfg)["layers"][0]["moe"]
    x = random.normal(random.key(1), (4, 6, cfg.d_model), torch.float64)
    seen: dict[int, list] = {}  # rank thread -> the funcs the mode saw inside ep.moe
    got: dict[int, tuple] = {}
    real = _vma._VmaMode.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        if threading.get_ident() in seen:
            seen[threading.get_ident()].append(func)
        return real(self, func, types, args, kwargs)

    def body(params, x):
        seen[threading.get_ident()] = []
        y, aux = ep.moe(params, x, cfg, Plan(dp="dp", ep="ep"))
        ops = seen.pop(threading.get_ident())
        ctx = _vma.current()
        got[threading.get_ident()] = (len(ops), bool(ctx.written), ctx.vma(y), ctx.vma(aux))
        return y, aux

    def program():
        specs = {"router": P(), "w1": P("ep"), "w2": P("ep")}
        f = colofn.shard_map(
            body, mesh=colofn.Mesh((2, 2), ("dp", "ep")), in_specs=(specs, P(("dp", "ep"))), out_specs=(P(("dp", "ep")), P())
        )
        f(params, x)

    with mock.patch.object(_vma._VmaMode, "__torch_function__", counting):
        colofn.launch(program, world_size=4)
    assert len(got) == 4
    for n_ops, written, y_vma, aux_vma in got.values():
        # 33 here: routing's psum, the all-to-alls' own bookkeeping; + ~70 for the capacity order (tracked)
        assert n_ops <= 40 if capacity_factor is None else n_ops <= 120, f"{n_ops} ops through the tracking mode (264 before, 335 with a capacity)"
        assert not written, "an in-place write reached the tracking mode: every later op of the step pays for it"
        assert (y_vma, aux_vma) == ({"dp", "ep"}, set())
