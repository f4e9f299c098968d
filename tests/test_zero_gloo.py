"""colofn.zero on real gloo processes: stages 1-3 equal single-device training (one world of 2)."""

from __future__ import annotations

import pytest
import torch

import colofn
from _zero_models import batches, make_optimizer, max_error, mlp_loss, mlp_params
from colofn import zero

SIZES = [5, 7, 6, 3]


def _program(stages, data):
    mesh = colofn.Mesh((colofn.process_count(),), ("dp",))
    out = {}
    for stage in stages:
        opt = make_optimizer("adamw")
        state = zero.init(mlp_params(SIZES), opt, mesh, stage=stage)
        sent = []
        for batch in data:
            with colofn.comm_trace() as records:
                state, info = zero.train_step(mlp_loss, opt, state, batch)
            sent.append(sum(r.bytes_sent for r in records if r.shape != ()))
        out[stage] = (zero.params(state), float(info.loss), sent, info.schedule)
    return out


@pytest.mark.gloo
def test_stages_1_to_3_on_gloo_equal_single_device():
    n = 2
    data = batches(SIZES, 4 * n, 3)
    want, want_losses = zero.reference_train(mlp_loss, make_optimizer("adamw"), mlp_params(SIZES), data)
    results = colofn.launch(_program, (1, 2, 3), data, world_size=n, backend="gloo")
    for rank, out in enumerate(results):
        for stage, (params, loss, sent, schedule) in out.items():
            assert max_error(params, want) < 1e-5, f"rank {rank} stage {stage}"
            assert abs(loss - want_losses[-1]) < 1e-5
            assert len(set(sent)) == 1 and sent[0] > 0  # the same bytes every step
            if stage == 3:  # async prefetch on gloo too
                assert schedule.index("forward gather ['layers'][1] start") < schedule.index(
                    "forward release ['layers'][0]"
                )
    assert results[0][1][2][0] == results[0][2][2][0]  # stages 1 and 2 move the same bytes
    assert results[0][3][0]["layers"][0]["w"].dtype == torch.float32
