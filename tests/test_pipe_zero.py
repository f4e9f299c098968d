"""ZeRO inside pipeline stages: the bytes per step are the pipeline's plus ZeRO's, and what is refused says why.

The equivalence with one device is in ``property_tests/test_pipe_zero_props.py``
and, through ``colofn train --check``, in ``tests/test_train.py``.
"""

from __future__ import annotations

import pytest
import torch

import colofn
from colofn import optim, zero
from colofn.errors import ConfigError, TreeError
from colofn.mesh import Mesh
from colofn.models import gpt
from colofn.train import TrainConfig, parse_mesh, validate
from colofn.train.trainers import PipelineTrainer

MCFG = gpt.config("tiny", vocab_size=64, seq_len=8, d_model=16, n_heads=2, d_ff=32, tie_embeddings=False)
M = 4  # microbatches


def _traced_step(zero_stage):
    mesh = Mesh((2, 2), ("pp", "dp"))
    opt = optim.adamw(1e-2)
    params = gpt.init(colofn.random.key(0), MCFG)
    from colofn.parallel import Plan

    trainer = PipelineTrainer(MCFG, Plan(dp="dp", pp="pp"), mesh, opt, params, opt.init(params), "1f1b", M, zero_stage=zero_stage)
    tokens = torch.randint(0, MCFG.vocab_size, (8, MCFG.seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    trainer.step(batch)  # the first step also exchanges activation shapes
    with colofn.comm_trace() as records:
        trainer.step(batch)
    psi = sum(s.plan.layout.nbytes() for s in trainer.states.values()) if zero_stage is not None else 0
    last = 1 in trainer.mine
    return [(r.op, r.axes, r.shape, r.bytes_sent) for r in records], psi, last


@pytest.mark.parametrize("stage", [1, 2])
def test_comm_per_step_is_the_pipelines_plus_zeros_formula(stage):
    zero_runs = colofn.launch(_traced_step, stage, world_size=4)
    plain_runs = colofn.launch(_traced_step, None, world_size=4)
    n = 2
    for (recs, psi, last), (plain, _, _) in zip(zero_runs, plain_runs, strict=True):
        p2p = [r for r in recs if r[0] in ("send", "recv")]
        assert p2p == [r for r in plain if r[0] in ("send", "recv")]  # the pipeline's own traffic, unchanged
        by_op = {op: sum(r[3] for r in recs if r[0] == op and r[1] == ("dp",)) for op in ("reduce_scatter", "all_gather")}
        assert by_op == {"reduce_scatter": psi * (n - 1) // n, "all_gather": psi * (n - 1) // n}  # 2Ψ(n-1)/n in all
        # Over dp besides: only the microbatch loss's (sum, count) psum, on the last stage's ranks.
        sums = [r for r in recs if r[0] == "all_reduce"]
        assert all(r[2] == (2,) for r in sums) and len(sums) == (M if last else 0), sums
        assert {r[0] for r in recs} <= {"send", "recv", "reduce_scatter", "all_gather", "all_reduce"}


def test_pipeline_zero_and_experts_pass_validation_and_zero3_is_refused_with_the_reason():
    def cfg(mesh, **kw):
        return TrainConfig(mesh=tuple(parse_mesh(mesh).items()), **kw)

    validate(cfg("pp=2,dp=2", zero=1))
    validate(cfg("pp=2,dp=2,tp=2", zero=2, sp="megatron"))
    validate(cfg("pp=2,dp=2,ep=2", experts=2, microbatches=2))
    with pytest.raises(ConfigError) as e:
        validate(cfg("pp=2,dp=2", zero=3))
    assert "--zero 3 with pp is not supported: ZeRO-3 all-gathers a unit's parameters for each use" in str(e.value)
    assert "Use --zero 1 or 2 with pp" in str(e.value)


def test_apply_gradients_refuses_stage_3_and_a_wrong_tree():
    def program():
        mesh = Mesh((2,), ("dp",))
        opt = optim.sgd(0.1)
        out = []
        for stage, grads in ((3, {"w": torch.ones(4)}), (1, {"v": torch.ones(4)}), (1, {"w": torch.ones(3)})):
            state = zero.init({"w": torch.ones(4)}, opt, mesh, stage=stage)
            try:
                zero.apply_gradients(opt, state, grads)
            except (ConfigError, TreeError) as err:
                out.append(f"{type(err).__name__}: {err}")
        return out

    stage3, other_tree, other_shape = colofn.launch(program, world_size=2)[0]
    assert stage3.startswith("ConfigError: zero.apply_gradients: this state cannot take gradients computed elsewhere: stage 3")
    assert other_tree.startswith("TreeError: zero.apply_gradients: grads must be shaped like the params")
    assert "shapes [(3,)]" in other_shape


def test_apply_gradients_holds_the_full_gradient_at_the_update_in_stage_1_only():
    def program(stage):
        mesh = Mesh((2,), ("dp",))
        opt = optim.adam(0.1)
        state = zero.init({"a": torch.ones(6), "b": torch.ones(10)}, opt, mesh, stage=stage)
        _, memory = zero.apply_gradients(opt, state, {"a": torch.ones(6), "b": torch.ones(10)})
        return memory.grads, state.plan.layout.nbytes()

    for stage, share in ((1, 1), (2, 2)):
        grads, psi = colofn.launch(program, stage, world_size=2)[0]
        assert grads == psi // share, (stage, grads, psi)
