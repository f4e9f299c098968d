"""The pipeline trainer's loss as shares of the mean (no psum in the last stage's forward) changes no number.

For random meshes that split the tokens (``dp``, ring or Ulysses ``sp``),
schedules, microbatch counts, ZeRO inside the stages or not, and targets with
ignored positions (so the microbatches' token counts differ), two steps of
:class:`~colofn.train.trainers.PipelineTrainer` give the parameters and optimizer
state of the same trainer with the last stage's ``psum``'d mean bit for bit (the
same gradients), a first loss equal to one device's (the mean over microbatches
of each microbatch's mean), and both losses within float reassociation of the
``psum`` path's.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import colofn
from colofn import optim
from colofn.mesh import Mesh
from colofn.models import gpt
from colofn.parallel.tp import vocab
from colofn.train import TrainConfig
from colofn.train.pipe_moe import microbatch_rows
from colofn.train.trainers import PipelineTrainer

MODEL = dict(vocab_size=64, seq_len=8, d_model=16, n_heads=2, d_ff=32, tie_embeddings=False)


class PsumTrainer(PipelineTrainer):
    """The trainer as it was: the last stage returns the microbatch's mean, ``psum``'d over the token axes."""

    def _loss_in_shares(self) -> bool:
        return False


@st.composite
def runs(draw):
    mesh = draw(st.sampled_from([{"pp": 2, "dp": 2}, {"pp": 2, "sp": 2}]))
    sp = draw(st.sampled_from(["ring", "ulysses"])) if "sp" in mesh else "none"
    schedule = draw(st.sampled_from(["1f1b", "gpipe", "zb_h1", "interleaved_1f1b"]))
    microbatches = draw(st.sampled_from([2, 4]))
    zero = draw(st.sampled_from([None, None, 1, 2]))
    return mesh, sp, schedule, microbatches, zero, draw(st.integers(0, 2**16)), draw(st.floats(0.0, 0.5))


def _program(mesh_shape, sp, schedule, microbatches, zero, batch):
    cfg = TrainConfig(mesh=tuple(mesh_shape.items()), sp=sp, zero=zero, microbatches=microbatches)
    mcfg = gpt.config("tiny", n_layers=4 if schedule == "interleaved_1f1b" else 2, **MODEL)
    mesh = Mesh(tuple(mesh_shape.values()), tuple(mesh_shape))
    opt = optim.adamw(1e-2, weight_decay=0.1)
    params = gpt.init(colofn.random.key(0), mcfg)
    out = []
    for cls in (PipelineTrainer, PsumTrainer):
        trainer = cls(mcfg, cfg.plan(), mesh, opt, params, opt.init(params), schedule, microbatches, zero_stage=zero)
        losses = [trainer.step(batch) for _ in range(2)]
        out.append((losses, trainer.export(), trainer.shares))
    return out, mcfg


@settings(max_examples=4)
@given(runs())
def test_loss_shares_give_the_psum_paths_numbers(run):
    mesh_shape, sp, schedule, microbatches, zero, seed, ignored = run
    g = torch.Generator().manual_seed(seed)
    rows = 2 * microbatches * mesh_shape.get("dp", 1)
    t = torch.randint(0, MODEL["vocab_size"], (rows, MODEL["seq_len"] + 1), generator=g)
    targets = t[:, 1:].clone()
    targets[torch.rand(targets.shape, generator=g) < ignored] = vocab.IGNORE
    targets[:, 0] = t[:, 1]  # every row keeps a token: no microbatch is empty
    batch = {"tokens": t[:, :-1], "targets": targets}
    for (shares, psum), mcfg in colofn.launch(_program, mesh_shape, sp, schedule, microbatches, zero, batch,
                                              world_size=4):
        (got, (p1, s1), split), (want, (p0, s0), kept) = shares, psum
        assert split and not kept
        for a, b in zip(colofn.tree.leaves((p1, s1)), colofn.tree.leaves((p0, s0)), strict=True):
            assert torch.equal(a, b)  # the same gradients, so the same update, bit for bit
        assert all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(got, want, strict=True)), (got, want)
        params = gpt.init(colofn.random.key(0), mcfg)
        one = [gpt.loss(params, {k: v[r] for k, v in batch.items()}, mcfg)
               for r in microbatch_rows(rows, mesh_shape.get("dp", 1), microbatches)]
        assert abs(got[0] - float(torch.stack(one).mean())) < 1e-5
