"""The pipeline trainer's step has no rendezvous in the forward: the loss is summed once, after the optimizer.

The numbers (the same gradients as the last stage's ``psum``'d mean, bit for
bit, for random meshes and schedules) are in
``property_tests/test_pipe_loss_props.py``; this pins the structure by the
order of events, never by time.
"""

from __future__ import annotations

from unittest import mock

import torch

import colofn
from colofn import _comm, _dist_comm, optim
from colofn.mesh import Mesh
from colofn.models import gpt
from colofn.parallel import Plan
from colofn.train.pipe_loss import microbatch_counts
from colofn.train.trainers import PipelineTrainer

MCFG = gpt.config("tiny", vocab_size=64, seq_len=8, d_model=16, n_heads=2, d_ff=32, tie_embeddings=False)
M = 4

_events: dict[int, list[tuple]] = {}  # rank -> what its traced step did, in order


def _log(*event):
    log = _events.get(torch.distributed.get_rank())
    if log is not None:
        log.append(event)


def _step_program(batch):
    mesh = Mesh((2, 2), ("pp", "dp"))
    opt = optim.adamw(1e-2)
    params = gpt.init(colofn.random.key(0), MCFG)
    trainer = PipelineTrainer(MCFG, Plan(dp="dp", pp="pp"), mesh, opt, params, opt.init(params), "1f1b", M)
    loss = trainer.step(batch)  # the first step also exchanges activation shapes
    _events[torch.distributed.get_rank()] = log = []
    trainer.step(batch)
    del _events[torch.distributed.get_rank()]
    return log, loss, trainer._sum_axes


def _sum_axes_program():
    opt, params = optim.adamw(1e-2), gpt.init(colofn.random.key(0), MCFG)
    return PipelineTrainer(MCFG, Plan(dp="dp", pp="pp"), Mesh((2, 2), ("pp", "dp")), opt, params, opt.init(params),
                           "1f1b", M)._sum_axes


def test_a_pp_dp_step_sums_the_loss_once_asynchronously_and_waits_after_the_update():
    real_all_reduce, real_update, real_wait = torch.distributed.all_reduce, optim.update_in_place, _comm.AsyncAllReduce.wait

    def all_reduce(t, *args, **kwargs):
        _log("all_reduce", kwargs.get("async_op", False), torch._C._current_graph_task_id() != -1, tuple(t.shape))
        return real_all_reduce(t, *args, **kwargs)

    def update(*args, **kwargs):
        _log("update")
        return real_update(*args, **kwargs)

    def wait(self):
        _log("wait", tuple(self.out.shape))
        return real_wait(self)

    tokens = torch.randint(0, MCFG.vocab_size, (8, MCFG.seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    with (mock.patch.object(torch.distributed, "all_reduce", all_reduce), mock.patch.object(optim, "update_in_place", update),
          mock.patch.object(_comm.AsyncAllReduce, "wait", wait)):
        got = colofn.launch(_step_program, batch, world_size=4)
    want = float(gpt.loss(gpt.init(colofn.random.key(0), MCFG), batch, MCFG))  # the first step's (equal microbatch counts)
    with mock.patch.object(_dist_comm, "FIRST_BUCKET_BYTES", 1):  # every stage larger than the first bucket
        large = colofn.launch(_sum_axes_program, world_size=4)
    # the pipeline sums the (varying) parameters' totals once per step where a stage fits the first bucket;
    # a larger stage keeps tracking's buckets, launched during its last backward
    assert [a for _, _, a in got] == [("dp",)] * 4 and large == [()] * 4
    for log, loss, _ in got:
        reduces = [e for e in log if e[0] == "all_reduce"]
        assert reduces and all(asynchronous for _, asynchronous, _, _ in reduces), log  # nobody blocks on dp
        sums = [e for e in reduces if e[3] == (M,)]  # the loss's: once per step, one share per microbatch
        assert sums == [("all_reduce", True, False, (M,))], log
        k = log.index(sums[0])  # started once the pipeline is done, read after this rank's update
        assert log[k + 1:] == [("update",), ("wait", (M,))], log
        assert abs(loss - want) < 1e-5


def test_microbatch_counts_take_chunk_m_of_every_data_block():
    t = torch.arange(8 * 3).reshape(8, 3)
    t[t % 5 == 0] = -100
    kept = (t != -100).sum(1)  # per row
    # 2 blocks (dp) of 4 rows, each cut into 2 microbatches of 2 rows: microbatch 0 = rows 0, 1, 4, 5
    assert microbatch_counts(t, 2, 2).tolist() == [int(kept[[0, 1, 4, 5]].sum()), int(kept[[2, 3, 6, 7]].sum())]
    assert microbatch_counts(t, 1, 4).tolist() == [int(kept[2 * m:2 * m + 2].sum()) for m in range(4)]


def test_pp_dp_stages_run_untracked_and_equal_one_device():
    """pp=2 x dp=2 with the pipeline's own once-per-step sums: the stages call no collective, so they run
    without the tracking mode (no op goes through it), and two steps' losses equal one device's AdamW run."""
    import threading

    from colofn import _vma
    from colofn import tree as jt

    tracked, lock = [0], threading.Lock()
    real_tf = _vma._VmaMode.__torch_function__

    def counted(*a, **k):
        with lock:
            tracked[0] += 1
        return real_tf(*a, **k)

    t = colofn.random.randint(colofn.random.key(3), (8, MCFG.seq_len + 1), 0, MCFG.vocab_size)
    batch = {"tokens": t[:, :-1], "targets": t[:, 1:]}
    params = gpt.init(colofn.random.key(0), MCFG)
    opt = optim.adamw(1e-2)

    def program():
        mesh = Mesh((2, 2), ("pp", "dp"))
        trainer = PipelineTrainer(MCFG, Plan(dp="dp", pp="pp"), mesh, opt, params, opt.init(params), "1f1b", M)
        return trainer._untracked_stages(), [trainer.step(batch) for _ in range(2)]

    with mock.patch.object(_vma._VmaMode, "__torch_function__", counted):  # around the launch: ranks are threads
        results = colofn.launch(program, world_size=4)
    assert tracked[0] == 0
    state, ref, want = opt.init(params), params, []
    for _ in range(2):
        q = jt.map(lambda x: x.detach().requires_grad_(), ref)
        loss = gpt.loss(q, batch, MCFG)
        want.append(float(loss.detach()))
        updates, state = opt.update(jt.unflatten(jt.structure(q), torch.autograd.grad(loss, jt.leaves(q))), state, ref)
        ref = optim.apply_updates(ref, updates)
    for untracked, losses in results:
        assert untracked
        assert max(abs(a - b) for a, b in zip(losses, want, strict=True)) < 1e-5
