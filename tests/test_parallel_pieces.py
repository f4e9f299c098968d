"""Each strategy's building block against the single-device piece it replaces, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import colofn
from colofn import P, random
from colofn.models import gpt
from colofn.parallel import ep, sp, tp
from colofn.parallel.sp import blockwise
from colofn.testing import assert_equivalent


def _mapped(f, mesh_shape, in_specs, out_specs):
    def parallel(*args):
        mesh = colofn.Mesh(tuple(mesh_shape.values()), tuple(mesh_shape))
        return colofn.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)

    return parallel


def _qkv(b=2, h=4, s=12, hd=4, dtype=torch.float64):
    return tuple(random.normal(random.key(i), (b, h, s, hd), dtype) for i in range(3))


def test_blockwise_merge_of_every_split_equals_causal_attention():
    q, k, v = _qkv()
    want = gpt.attention_core(q, k, v)
    for cut in (3, 6, 9):
        o1, l1 = blockwise.block(q, k[:, :, :cut], v[:, :, :cut], q_offset=0, kv_offset=0)
        o2, l2 = blockwise.block(q, k[:, :, cut:], v[:, :, cut:], q_offset=0, kv_offset=cut)
        o, _ = blockwise.merge(o1, l1, o2, l2)
        torch.testing.assert_close(o, want)


def test_fully_masked_block_has_zero_weight_and_no_nan():
    q, k, v = (t.requires_grad_() for t in _qkv(s=4))
    o1, l1 = blockwise.block(q, k, v, q_offset=4, kv_offset=4)
    o2, l2 = blockwise.block(q, k, v, q_offset=4, kv_offset=8)  # entirely in the future
    o, _ = blockwise.merge(o1, l1, o2, l2)
    torch.testing.assert_close(o, o1)
    (g,) = torch.autograd.grad(o.sum(), v)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ring_attention_contiguous(n):
    q, k, v = _qkv()
    f = _mapped(
        lambda q, k, v: sp.ring.ring_attention(q, k, v, "sp", "contiguous"),
        {"sp": n},
        P(None, None, "sp"),
        P(None, None, "sp"),
    )
    assert_equivalent(f, gpt.attention_core, q, k, v, world_size=n)


@pytest.mark.parametrize("n", [2, 3])
def test_ring_attention_zigzag(n):
    """The zig-zag layout: the inputs permuted by ``zigzag_order`` and the output permuted back."""
    q, k, v = _qkv()
    order = sp.chunks.zigzag_order(q.shape[-2], n)
    inverse = torch.argsort(order)
    ring = _mapped(
        lambda q, k, v: sp.ring.ring_attention(q, k, v, "sp"),
        {"sp": n},
        P(None, None, "sp"),
        P(None, None, "sp"),
    )

    def f(q, k, v):
        return ring(q[:, :, order], k[:, :, order], v[:, :, order]).full_tensor()[:, :, inverse]

    assert_equivalent(f, gpt.attention_core, q, k, v, world_size=n)


def test_ring_attention_communication():
    n = 4

    def program():
        mesh = colofn.Mesh((n,), ("sp",))
        q, k, v = (t.requires_grad_() for t in _qkv())
        f = colofn.shard_map(
            lambda q, k, v: sp.ring.ring_attention(q, k, v, "sp", "contiguous"),
            mesh=mesh,
            in_specs=P(None, None, "sp"),
            out_specs=P(None, None, "sp"),
        )
        with colofn.comm_trace() as records:
            out = f(q, k, v)
            fwd = [(r.op, r.shape) for r in records]
            out.to_local().sum().backward()
        return fwd, [r.op for r in records[len(fwd) :] if r.op in ("send", "recv")]

    fwd, bwd = colofn.launch(program, world_size=n)[1]
    assert fwd == [("send", (2, 2, 4, 3, 4)), ("recv", (2, 2, 4, 3, 4))] * (
        n - 1
    )  # k and v stacked
    assert bwd.count("send") == n - 1 and bwd.count("recv") == n - 1


@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_ulysses_attention(pos):
    cfg = gpt.config("tiny", pos=pos)
    params = gpt.init(random.key(0), cfg)["layers"][0]["attn"]
    x = random.normal(random.key(1), (2, 8, cfg.d_model))

    def local(p, x):
        return sp.ulysses.attention(p, x, cfg, "sp", sp.local_positions(x.shape[1], "sp"))

    f = _mapped(local, {"sp": 2}, (P(), P(None, "sp")), P(None, "sp"))
    assert_equivalent(f, lambda p, x: gpt.attention(p, x, cfg), params, x, world_size=2)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_vocab_parallel_embedding_and_cross_entropy(n):
    vocab, d = 16, 3
    tok = random.normal(random.key(0), (vocab, d), torch.float64)
    ids = random.randint(random.key(1), (2, 5), 0, vocab)
    targets = random.randint(random.key(2), (2, 5), 0, vocab)
    targets[0, 1] = -100

    def local(tok, ids, targets):
        x = colofn.psum(tp.embed_partial(tok, ids, "tp"), "tp")
        nll, count = tp.cross_entropy_sums(x @ tok.T, targets, "tp")
        return x, nll / count

    def single(tok, ids, targets):
        x = F.embedding(ids, tok)
        return x, F.cross_entropy((x @ tok.T).reshape(-1, vocab), targets.reshape(-1))

    f = _mapped(local, {"tp": n}, (P("tp"), P(), P()), (P(), P()))
    assert_equivalent(f, single, tok, ids, targets, world_size=n)


def test_vocab_parallel_cross_entropy_never_gathers_logits():
    def program():
        mesh = colofn.Mesh((4,), ("tp",))
        logits = random.normal(random.key(0), (6, 40)).requires_grad_()
        f = colofn.shard_map(
            lambda z, t: tp.cross_entropy_sums(z, t, "tp")[0],
            mesh=mesh,
            in_specs=(P(None, "tp"), P()),
            out_specs=P(),
        )
        with colofn.comm_trace() as records:
            f(logits, torch.arange(6)).to_local().backward()
        return [(r.op, r.shape, r.phase) for r in records]

    records = colofn.launch(program, world_size=4)[0]
    inner = [r for r in records if r[0] == "all_reduce"]
    assert inner == [
        ("all_reduce", (6,), "forward"),
        ("all_reduce", (2, 6), "forward"),
    ]  # max; sum-exp and target


@pytest.mark.parametrize("capacity", [None, 0.5, 1.0])
@pytest.mark.parametrize(("batch_n", "seq_n"), [(2, 1), (1, 2), (2, 2)])
def test_routing_with_whole_batch_statistics(capacity, batch_n, seq_n):
    cfg = gpt.config("tiny", n_experts=4, top_k=2, capacity_factor=capacity)
    router = random.normal(random.key(0), (cfg.d_model, 4), torch.float64)
    x = random.normal(random.key(1), (4, 6, cfg.d_model), torch.float64)
    names = ("b", "s")

    def local(router, x):
        r = ep.route(router, x, cfg, batch_axes=("b",), seq_axis="s")
        b, s = x.shape[:2]
        return r.gates.reshape(b, s, -1), r.keep.reshape(b, s, -1).double(), r.aux_loss

    def single(router, x):
        r = gpt.route(router, x.reshape(-1, x.shape[-1]), cfg)
        return r.gates.reshape(4, 6, -1), r.keep.reshape(4, 6, -1).double(), r.aux_loss

    f = _mapped(
        local,
        dict(zip(names, (batch_n, seq_n), strict=True)),
        (P(), P("b", "s")),
        (P("b", "s"), P("b", "s"), P()),
    )
    assert_equivalent(f, single, router, x, world_size=batch_n * seq_n)


@pytest.mark.parametrize("capacity", [0.5, 1.0])
@pytest.mark.parametrize(("batch_n", "seq_n"), [(1, 3), (2, 2)])
def test_routing_in_the_zigzag_layout(capacity, batch_n, seq_n):
    """Ring attention's tokens (two chunks a rank) drop by capacity in global token order, as one device."""
    cfg = gpt.config("tiny", n_experts=4, top_k=2, capacity_factor=capacity)
    router = random.normal(random.key(0), (cfg.d_model, 4), torch.float64)
    x = random.normal(random.key(1), (4, 12, cfg.d_model), torch.float64)
    order = sp.chunks.zigzag_order(12, seq_n)

    def local(router, x):
        r = ep.route(router, x, cfg, batch_axes=("b",), seq_axis="s", seq_layout="zigzag")
        b, s = x.shape[:2]
        return r.gates.reshape(b, s, -1), r.keep.reshape(b, s, -1).double(), r.aux_loss

    mapped = _mapped(local, {"b": batch_n, "s": seq_n}, (P(), P("b", "s")), (P("b", "s"), P("b", "s"), P()))

    def parallel(router, x):
        gates, keep, aux = mapped(router, x[:, order])
        back = torch.argsort(order)
        return gates.full_tensor()[:, back], keep.full_tensor()[:, back], aux

    def single(router, x):
        r = gpt.route(router, x.reshape(-1, x.shape[-1]), cfg)
        return r.gates.reshape(4, 12, -1), r.keep.reshape(4, 12, -1).double(), r.aux_loss

    assert_equivalent(parallel, single, router, x, world_size=batch_n * seq_n)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_expert_parallel_equals_local_experts(n):
    cfg = gpt.config("tiny", n_experts=4, top_k=2, capacity_factor=1.0)
    params = gpt.init(random.key(0), gpt.config("tiny", n_experts=4, dtype=torch.float64))[
        "layers"
    ][0]["moe"]
    x = random.normal(random.key(1), (8, cfg.d_model), torch.float64)

    def local(params, x):
        r = ep.route(params["router"], x[None], cfg, batch_axes=("ep",))
        return ep.expert_parallel(params, x, r, cfg, "ep"), r.aux_loss

    def single(params, x):
        y, aux = gpt.moe(params, x, cfg)
        return y, aux

    specs = {"router": P(), "w1": P("ep"), "w2": P("ep")}
    f = _mapped(local, {"ep": n}, (specs, P("ep")), (P("ep"), P()))
    assert_equivalent(f, single, params, x, world_size=n)
    assert math.isfinite(float(single(params, x)[1]))


def test_counts_in_the_statistics_sum_are_the_gathered_counts_and_size_the_dispatch():
    cfg = gpt.config("tiny", n_experts=4, top_k=2, capacity_factor=1.0, dtype=torch.float64)
    params = gpt.init(random.key(0), cfg)["layers"][0]["moe"]
    x = random.normal(random.key(1), (4, 6, cfg.d_model), torch.float64)  # [batch, seq, d]

    def local(params, x):
        r, table = ep.route_and_count(params["router"], x, cfg, batch_axes=("dp", "ep"), count_axis="ep")
        kept = torch.bincount(r.expert_index[r.keep], minlength=4)
        gathered = colofn.all_gather(kept, "ep", axis_dim=0, to="invariant")
        assert table is not None and torch.equal(table, gathered), (table, gathered)
        y = ep.expert_parallel(params, x.flatten(0, 1), r, cfg, "ep", table)
        return y.reshape(x.shape), r.aux_loss

    def single(params, x):
        return gpt.moe(params, x, cfg)

    specs = {"router": P(), "w1": P("ep"), "w2": P("ep")}
    f = _mapped(local, {"dp": 2, "ep": 2}, (specs, P(("dp", "ep"))), (P(("dp", "ep")), P()))
    assert_equivalent(f, single, params, x, world_size=4)
