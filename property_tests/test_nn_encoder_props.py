"""Stacks of ``nn.TransformerEncoderLayer`` under the shipped plan equal the unmodified stack on one device.

Hypothesis draws the stack (``d_model``, heads, feed-forward width, layers,
``norm_first``, ``batch_first``, relu or gelu, bias on or off, inside an
``nn.TransformerEncoder`` or an ``nn.Sequential``), the mask (none, causal,
key padding, per head), the sequence length, the mesh (dp and tp sizes 1, 2 or 4),
Megatron-SP on or off, and the optimizer path: three AdamW steps on the mesh,
or ZeRO 1-3 over dp with SGD. The attention runs tensor parallel: the packed
``in_proj_weight`` split by heads over ``tp``, ``num_heads / tp`` local heads,
``out_proj`` row parallel. The loss, the gradient of every parameter and the
parameters after the steps must equal the module's own (``torch.autograd.grad``,
``torch.optim``) in float64, to rounding; a wrong collective is off by whole factors.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import colofn
from _nn_steps import (
    loss_grads_and_adamw_steps,  # a module of property_tests/ (on sys.path under pytest)
)
from colofn import P, optim, zero
from colofn.nn import hf, parallelize, to_state_dict
from colofn.testing import assert_trees_close

EXAMPLES = max(3, settings.default.max_examples // 2)  # 6 under the quick profile, 150 under long
RTOL, ATOL = 1e-7, 1e-10
# the key bias's gradient is 0 up to rounding (softmax ignores a per-query constant); AdamW scales that
# rounding to ~lr * 1e-9 in a few steps, so the parameters after AdamW are compared to 1e-8
STEP_ATOL = 1e-8
STEPS, LR = 3, 1e-2


@st.composite
def setups(draw):
    dp = draw(st.sampled_from([1, 2]))
    tp = draw(st.sampled_from([s for s in (2, 1, 4) if dp * s <= 4]))
    sp = tp > 1 and draw(st.booleans())
    heads = tp * draw(st.sampled_from([1, 2]))
    layer = dict(
        d_model=heads * draw(st.sampled_from([2, 4])),  # not 1: a LayerNorm over one feature is constant
        nhead=heads,
        dim_feedforward=tp * draw(st.integers(1, 4)),
        dropout=0.0,
        activation=draw(st.sampled_from(["relu", "gelu"])),
        batch_first=draw(st.booleans()),
        norm_first=draw(st.booleans()),
        bias=draw(st.booleans()),
    )
    mask = draw(st.sampled_from(["none", "causal", "padding", "per_head"]))
    container = "encoder" if mask != "none" else draw(st.sampled_from(["encoder", "sequential"]))
    return {
        "mesh": {"dp": dp, "tp": tp}, "sp": sp, "layer": layer, "layers": draw(st.integers(1, 3)),
        "container": container, "mask": mask, "batch": dp * draw(st.integers(1, 2)),
        "seq": tp * draw(st.integers(1, 3)) if sp else draw(st.integers(1, 5)),
        "zero": draw(st.sampled_from([None, 1, 2, 3])) if dp > 1 else None, "seed": draw(st.integers(0, 2**16)),
    }


def _stack(s):
    torch.manual_seed(s["seed"])
    layers = [nn.TransformerEncoderLayer(**s["layer"]) for _ in range(s["layers"])]
    if s["container"] == "sequential":
        return nn.Sequential(*layers).double()
    stack = nn.TransformerEncoder(layers[0], s["layers"], enable_nested_tensor=False)
    for i, layer in enumerate(layers):  # nn.TransformerEncoder deep-copies one layer: give each its own weights
        stack.layers[i] = layer
    return stack.double()


def _data(s):
    g = torch.Generator().manual_seed(s["seed"])
    b, n, d = s["batch"], s["seq"], s["layer"]["d_model"]
    data = {"x": torch.randn(b, n, d, generator=g, dtype=torch.float64),
            "y": torch.randn(b, n, d, generator=g, dtype=torch.float64)}
    if s["mask"] == "padding":  # the first token of each row is kept, some of the rest padded
        pad = torch.rand(b, n, generator=g) < 0.4
        pad[:, 0] = False
        data["pad"] = pad
    if s["mask"] == "per_head":  # an additive [batch * heads, L, L] mask: each rank takes its heads' rows
        data["head_mask"] = torch.randn(b * s["layer"]["nhead"], n, n, generator=g, dtype=torch.float64)
    return data


def _loss(apply, s, params, b):
    """Mean squared error of the stack's output; ``b["x"]`` is ``[batch, seq, d]`` whatever the layout."""
    x = b["x"] if s["layer"]["batch_first"] else b["x"].transpose(0, 1)
    kwargs = {}
    if s["mask"] == "causal":
        kwargs = {"mask": nn.Transformer.generate_square_subsequent_mask(s["seq"], dtype=torch.float64),
                  "is_causal": True}
    elif s["mask"] == "padding":
        kwargs = {"src_key_padding_mask": b["pad"]}
    elif s["mask"] == "per_head":
        kwargs = {"mask": b["head_mask"]}
    out = apply(params, x, **kwargs)
    out = out if s["layer"]["batch_first"] else out.transpose(0, 1)
    return (out - b["y"]).square().mean()


def _reference(net, s, data):
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    loss_fn = lambda: _loss(lambda _p, *a, **k: net(*a, **k), s, None, data)  # noqa: E731
    loss = loss_fn()
    grads = dict(zip(names, torch.autograd.grad(loss, params), strict=True))
    opt = (torch.optim.AdamW(params, lr=LR, weight_decay=0.01) if s["zero"] is None
           else torch.optim.SGD(params, lr=LR, momentum=0.9))
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return float(loss.detach()), grads, {n: p.detach().clone() for n, p in net.named_parameters()}


@settings(max_examples=EXAMPLES, deadline=None)
@given(s=setups())
def test_encoder_stack_under_plan_equals_one_device(s):
    net = _stack(s)
    data = _data(s)
    axes = {a: n for a, n in s["mesh"].items() if n > 1} or {"dp": 1}
    dp, tp = ("dp" if "dp" in axes else None), ("tp" if "tp" in axes else None)

    def program():
        mesh = colofn.Mesh(tuple(axes.values()), tuple(axes))
        par = parallelize(net, hf.plan_for(net, dp=dp, tp=tp, sp=s["sp"]), mesh)
        local = lambda p, b: _loss(par.apply, s, p, b)  # noqa: E731
        batch_specs = {k: P(dp) for k in data}
        loss_fn = colofn.shard_map(lambda p, b: colofn.pmean(local(p, b), "dp") if dp else local(p, b), mesh=mesh,
                                   in_specs=(par.specs, batch_specs), out_specs=P())
        if s["zero"] is None:
            return loss_grads_and_adamw_steps(par, loss_fn, data, STEPS, LR)
        out = loss_grads_and_adamw_steps(par, loss_fn, data, 0, LR)
        opt = optim.sgd(LR, momentum=0.9)  # ZeRO owns dp: the per-device loss is this rank's mean
        state = zero.init(par.shard(), opt, mesh, axis="dp", stage=s["zero"])
        for _ in range(STEPS):
            state, _ = zero.train_step(local, opt, state, data)
        out["params"] = to_state_dict(par.module_params(zero.export_state(state)["params"]))
        return out

    got = colofn.launch(program, world_size=math.prod(axes.values()))[0]
    ref_loss, ref_grads, ref_params = _reference(net, s, data)
    what = f"{s['layers']} x {s['layer']} in {s['container']}, mask {s['mask']}, on {axes} sp={s['sp']} zero={s['zero']}"
    assert abs(got["loss"] - ref_loss) <= RTOL * abs(ref_loss), what
    assert_trees_close(got["grads"], ref_grads, rtol=RTOL, atol=ATOL, what=f"gradient of {what}")
    assert_trees_close(got["params"], ref_params, rtol=RTOL, atol=STEP_ATOL, what=f"params after {STEPS} steps of {what}")
