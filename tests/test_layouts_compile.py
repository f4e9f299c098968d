"""torch.compile traces the einops layouts whole: attention's head split and merge, and blockwise attention.

``gpt.qkv`` and ``gpt.attention_out`` split and merge heads with ``einops.einsum``;
``blockwise.block`` (ring attention's step) computes its scores and weighted
values with it. ``fullgraph=True`` fails on any graph break, so a pattern dynamo
cannot trace fails here. The backend is ``aot_eager``: dynamo and AOTAutograd's
forward and backward graphs, which is where einops could break a graph, in
seconds rather than inductor's tens of seconds of code generation (inductor
over a whole compiled step is ``tests/test_jit_compile.py``'s subject).
"""

from __future__ import annotations

import torch

from colofn import random, tree
from colofn.models import gpt
from colofn.parallel.sp.blockwise import block
from colofn.testing import assert_trees_close

CFG = gpt.config("tiny", pos="rotary")


def _attention(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A sequence chunk's causal self-attention through the blockwise path (ring attention, one block)."""
    q, k, v = gpt.qkv(params, x, CFG, positions=torch.arange(4, 4 + x.shape[1]))
    o, _ = block(q, k, v, q_offset=4, kv_offset=4)
    return gpt.attention_out(params, o.to(x.dtype))


def _value_and_grads(fn, params, x):
    params = tree.map(lambda p: p.detach().requires_grad_(), params)
    x = x.detach().requires_grad_()
    y = fn(params, x)
    grads = torch.autograd.grad(y.square().sum(), [*tree.leaves(params), x])
    return y.detach(), grads


def test_compiled_attention_layouts_equal_eager():
    params = gpt.init(random.key(0), CFG)["layers"][0]["attn"]
    x = random.normal(random.key(1), (2, 8, CFG.d_model))
    want = _value_and_grads(_attention, params, x)
    torch._dynamo.reset()
    compiled = torch.compile(_attention, fullgraph=True, backend="aot_eager")
    got = _value_and_grads(compiled, params, x)
    assert_trees_close(got, want, what="torch.compile vs eager")
    # and the compiled path is the model's: equal to causal attention over the chunk
    whole = gpt.attention(params, x, CFG, positions=torch.arange(4, 12))
    assert_trees_close(got[0], whole, what="blockwise vs gpt.attention")
