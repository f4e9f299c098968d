"""jit(compile=True): torch.compile (inductor) inside the simulated world, checked against eager.

Compiling is slow (seconds per variant), so this file holds one program that
checks everything compile-specific: results and gradients equal to eager, a
cache hit on the same layout, and a logged recompile when a layout changes.
"""

from __future__ import annotations

import logging

import torch

import colofn
from colofn import P, jit, with_sharding_constraint
from colofn.testing import assert_trees_close


def mlp(x, w1, w2):
    h = torch.relu(x @ w1)
    h = with_sharding_constraint(h, P(None, "tp"))
    return torch.tanh(h @ w2).sum(-1)


IN = (None, P(None, "tp"), P("tp"))  # x: a plain tensor is replicated, a DTensor keeps its layout
ARGS = tuple(torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate([(4, 8), (8, 16), (16, 8)]))


def _run(f, args):
    args = [a.clone().requires_grad_() for a in args]
    y = f(*args)
    y.full_tensor().pow(2).sum().backward()
    return [y.full_tensor().detach()] + [colofn.gather(a.grad) for a in args]


def _program():
    with colofn.Mesh((2,), ("tp",)):
        compiled = jit(mlp, in_shardings=IN, compile=True)
        eager = _run(jit(mlp, in_shardings=IN), ARGS)
        first = _run(compiled, ARGS)
        again = _run(compiled, ARGS)  # same layout: a cache hit
        # another layout for x (sharded rows instead of replicated): a new variant
        x = colofn.device_put(ARGS[0], P("tp"))
        other = _run(compiled, (x, *ARGS[1:]))
        return eager, first, again, other


def test_compiled_equals_eager_and_recompiles_on_a_new_layout(caplog):
    caplog.set_level(logging.DEBUG, logger="colofn.jit")
    results = colofn.launch(_program, world_size=2)
    for eager, first, again, other in results:
        assert_trees_close(first, eager, what="compiled vs eager")
        assert_trees_close(again, eager, what="cached compiled vs eager")
        assert_trees_close(other, eager, what="recompiled vs eager")
    messages = [r.getMessage() for r in caplog.records if r.name == "colofn.jit"]
    compiles = [m for m in messages if "): compiling for" in m]
    recompiles = [m for m in messages if "): recompiling" in m]
    assert len(compiles) == 2, messages  # one per rank; the second call hit the cache
    assert len(recompiles) == 2, messages  # one per rank, for the new layout of x
    assert recompiles[0].endswith(
        "leaf 0: float32[4, 8] P() requires_grad -> float32[4, 8] P('tp') requires_grad"
    ), recompiles[0]
