"""What a training step builds, counted, so the per-step Python cost cannot silently come back.

The dense trainer's step used to wrap every parameter and its gradient as a
DTensor (``from_local``/``to_local`` and their autograd nodes) and give every
``shard_map`` argument two Python autograd nodes (its entry and its implicit
``pvary``): about 50 of each per step of the small GPT. These tests pin the
structure, not a time: no DTensor conversion in a dense step, one Python
autograd node for all of a call's arguments whatever their number, and the
same gradients as before (the equivalence suites prove the numbers).
"""

from __future__ import annotations

import threading
from typing import Any
from unittest import mock

import pytest
import torch
from torch.distributed.tensor import DTensor

import colofn
from colofn import P, optim, random
from colofn import tree as jt
from colofn.models import gpt
from colofn.parallel import Plan
from colofn.train.trainers import DenseTrainer


def python_nodes(t: torch.Tensor) -> list[str]:
    """The Python ``autograd.Function`` nodes of ``t``'s graph (each costs a Python call in the backward)."""
    seen, out, todo = set(), [], [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            out.append(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return out


@pytest.mark.parametrize("n", [2, 12])
def test_per_device_enters_all_arguments_with_one_python_node(n):
    """n replicated weights used with dp-split data: every one gets an implicit pvary (its dp sum), yet the
    graph holds one Python node for all n arguments, and each weight's gradient is still summed over dp."""
    ws = [torch.full((3,), float(i + 1)) for i in range(n)]

    def program() -> tuple[list[str], list[list[float]]]:
        mesh = colofn.Mesh((2,), ("dp",))
        x = torch.full((3,), float(colofn.process_index() + 1))  # this rank's block
        f = colofn.per_device(lambda ws, x: sum((w * x).sum() for w in ws), mesh=mesh, in_specs=(P(), P("dp")))
        leaves = [w.clone().requires_grad_() for w in ws]
        out = f(leaves, x)
        nodes = python_nodes(out)
        grads = torch.autograd.grad(out, leaves)
        return nodes, [g.tolist() for g in grads]

    for nodes, grads in colofn.launch(program, world_size=2):
        assert nodes == ["_EnterAllBackward"]
        assert grads == [[3.0, 3.0, 3.0]] * n  # x summed over the two ranks: 1 + 2


def test_a_dense_dp_step_makes_no_dtensor_and_no_python_node():
    """DenseTrainer.step on dp=2 for GPTs of 1 and 3 layers: no DTensor is built or unwrapped during the
    step, and the graph it differentiates has no Python node at all (plain dp runs untracked: its sums are
    gradient hooks, see tests/test_leaf_sums.py), whatever the number of parameters."""
    lock, on = threading.Lock(), threading.local()  # counted only inside a rank's measured step
    counts: dict[str, int] = {"from_local": 0, "to_local": 0}
    nodes: list[list[str]] = []
    real_grad, real_from, real_to = torch.autograd.grad, DTensor.from_local, DTensor.to_local

    def counting(name: str, fn: Any) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            if getattr(on, "step", False):
                with lock:
                    counts[name] += 1
            return fn(*a, **k)

        return wrapped

    def grad(outputs: Any, inputs: Any, *a: Any, **k: Any) -> Any:
        if getattr(on, "step", False):
            with lock:
                nodes.append(python_nodes(outputs))
        return real_grad(outputs, inputs, *a, **k)

    def program(layers: int) -> float:
        cfg = gpt.config("tiny", n_layers=layers)
        params = gpt.init(random.key(0), cfg)
        t = random.randint(random.key(1), (4, cfg.seq_len + 1), 0, cfg.vocab_size)
        batch = {"tokens": t[:, :-1], "targets": t[:, 1:]}
        opt = optim.adamw(1e-3)
        trainer = DenseTrainer(cfg, Plan(dp="dp"), colofn.Mesh((2,), ("dp",)), opt, params, opt.init(params))
        trainer.step(batch)
        on.step = True
        try:
            return trainer.step(batch)
        finally:
            on.step = False

    with mock.patch.object(DTensor, "from_local", staticmethod(counting("from_local", real_from))), \
         mock.patch.object(DTensor, "to_local", counting("to_local", real_to)), \
         mock.patch.object(torch.autograd, "grad", grad):
        for layers in (1, 3):
            nodes.clear()
            losses = colofn.launch(program, layers, world_size=2)
            assert losses[0] == losses[1]
            assert counts == {"from_local": 0, "to_local": 0}
            assert nodes == [[]] * 2, nodes  # one differentiation per rank
    assert len(jt.leaves(gpt.init(random.key(0), gpt.config("tiny", n_layers=3)))) > 20  # ... of many parameters
