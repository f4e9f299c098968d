"""The dense GPT: layout, determinism, causality, gradients, training, and the pieces parallel code reuses."""

import itertools
import math

import pytest
import torch

from colofn import data, random, tree
from colofn.errors import DTypeError, ShapeError, TreeError
from colofn.models import gpt

TINY = gpt.config("tiny")


def _tokens(seed, shape=(2, 16), vocab=TINY.vocab_size):
    return random.randint(random.key(seed), shape, 0, vocab)


def _batch(seed, shape=(2, 16)):
    t = _tokens(seed, (shape[0], shape[1] + 1))
    return {"tokens": t[:, :-1], "targets": t[:, 1:]}


def _paths(params):
    return {tree.keystr(p): tuple(x.shape) for p, x in tree.leaves_with_path(params)}


def test_param_layout_tiny():
    d, h, hd, ff, v = 32, 4, 8, 128, 256
    shapes = _paths(gpt.init(random.key(0), TINY))
    expected = {"['embed']['tok']": (v, d), "['embed']['pos']": (32, d),
                "['final_norm']['scale']": (d,), "['final_norm']['bias']": (d,)}  # fmt: skip
    for i in range(2):
        pre = f"['layers'][{i}]"
        expected |= {
            f"{pre}['norm1']['scale']": (d,), f"{pre}['norm1']['bias']": (d,),
            f"{pre}['norm2']['scale']": (d,), f"{pre}['norm2']['bias']": (d,),
            f"{pre}['attn']['wq']": (d, h, hd), f"{pre}['attn']['wk']": (d, h, hd),
            f"{pre}['attn']['wv']": (d, h, hd), f"{pre}['attn']['wo']": (h, hd, d),
            f"{pre}['mlp']['w1']": (d, ff), f"{pre}['mlp']['w2']": (ff, d),
        }  # fmt: skip
    assert shapes == expected


def test_layout_options_rotary_rmsnorm_untied():
    cfg = gpt.config("tiny", pos="rotary", norm="rmsnorm", tie_embeddings=False)
    shapes = _paths(gpt.init(random.key(0), cfg))
    assert "['embed']['pos']" not in shapes
    assert "['final_norm']['bias']" not in shapes and "['final_norm']['scale']" in shapes
    assert shapes["['head']"] == (32, 256)


def test_init_deterministic_and_path_keyed():
    a, b = gpt.init(random.key(0), TINY), gpt.init(random.key(0), TINY)
    c = gpt.init(random.key(1), TINY)
    assert all(torch.equal(x, y) for x, y in zip(tree.leaves(a), tree.leaves(b), strict=True))
    assert not torch.equal(a["embed"]["tok"], c["embed"]["tok"])
    assert not torch.equal(a["layers"][0]["attn"]["wq"], a["layers"][1]["attn"]["wq"])
    deeper = gpt.init(random.key(0), gpt.config("tiny", n_layers=3))
    assert torch.equal(a["layers"][1]["attn"]["wq"], deeper["layers"][1]["attn"]["wq"])


def test_apply_shape_dtype_and_determinism():
    params = gpt.init(random.key(0), TINY)
    logits = gpt.apply(params, _tokens(1), TINY)
    assert logits.shape == (2, 16, 256) and logits.dtype == torch.float32
    assert torch.equal(logits, gpt.apply(params, _tokens(1), TINY))


@pytest.mark.parametrize("overrides", [{}, {"pos": "rotary"}, {"norm": "rmsnorm", "tie_embeddings": False},
                                       {"n_experts": 4, "top_k": 2}])  # fmt: skip
def test_causal(overrides):
    cfg = gpt.config("tiny", **overrides)
    params = gpt.init(random.key(0), cfg)
    tokens = _tokens(1)
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % cfg.vocab_size
    a, b = gpt.apply(params, tokens, cfg), gpt.apply(params, changed, cfg)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().amax(-1).min() > 0


def test_loss_at_init_is_log_vocab():
    params = gpt.init(random.key(0), TINY)
    assert abs(float(gpt.loss(params, _batch(2, (8, 32)), TINY)) - math.log(256)) < 0.05


@pytest.mark.parametrize(
    "overrides", [{}, {"pos": "rotary", "norm": "rmsnorm", "tie_embeddings": False}]
)
def test_gradients_reach_every_parameter(overrides):
    cfg = gpt.config("tiny", **overrides)
    params = gpt.init(random.key(0), cfg)
    grads = torch.func.grad(gpt.loss)(params, _batch(3), cfg)
    assert tree.structure(grads) == tree.structure(params)
    for path, g in tree.leaves_with_path(grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, tree.keystr(path)


def test_sgd_on_tiny_decreases_loss():
    params = gpt.init(random.key(0), TINY)
    tokens = data.encode(data.text())
    batch = data.sample_batch(random.key(4), tokens, 8, TINY.seq_len)
    grad_fn = torch.func.grad_and_value(gpt.loss)
    losses = []
    for _ in range(12):
        grads, value = grad_fn(params, batch, TINY)
        losses.append(float(value))
        params = tree.map(lambda p, g: p - 0.2 * g, params, grads)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 1.5, losses


def test_tied_embeddings_equal_untied_with_copied_head():
    tied = gpt.init(random.key(0), TINY)
    untied_cfg = gpt.config("tiny", tie_embeddings=False)
    untied = {**tied, "head": tied["embed"]["tok"].T.clone()}
    assert gpt.head_weight(tied, TINY).data_ptr() == tied["embed"]["tok"].data_ptr()
    tokens = _tokens(5)
    torch.testing.assert_close(gpt.apply(tied, tokens, TINY), gpt.apply(untied, tokens, untied_cfg))
    # Tied: the embedding's gradient is the sum of its input and output uses.
    g_tied = torch.func.grad(gpt.loss)(tied, _batch(5), TINY)["embed"]["tok"]
    g_untied = torch.func.grad(gpt.loss)(untied, _batch(5), untied_cfg)
    torch.testing.assert_close(g_tied, g_untied["embed"]["tok"] + g_untied["head"].T)


def test_rotary_scores_depend_only_on_relative_position():
    cfg = gpt.config("tiny", pos="rotary")
    attn = gpt.init(random.key(0), cfg)["layers"][0]["attn"]
    x = random.normal(random.key(1), (1, 6, 32))
    q0, k0, _ = gpt.qkv(attn, x, cfg)
    q1, k1, _ = gpt.qkv(attn, x, cfg, positions=torch.arange(6) + 11)
    torch.testing.assert_close(
        q0 @ k0.transpose(-1, -2), q1 @ k1.transpose(-1, -2), atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(q0, q1)


def test_rotary_and_learned_differ_and_both_train():
    for pos in ("learned", "rotary"):
        cfg = gpt.config("tiny", pos=pos)
        params = gpt.init(random.key(0), cfg)
        assert ("pos" in params["embed"]) == (pos == "learned")
        assert torch.isfinite(gpt.loss(params, _batch(6), cfg))


def test_pieces_compose_to_apply_and_layers_slice():
    """A pipeline runs any slice of params["layers"] with block; the stages compose to apply."""
    params = gpt.init(random.key(0), gpt.config("tiny", n_layers=3))
    cfg = gpt.config("tiny", n_layers=3)
    tokens = _tokens(7)
    x = gpt.embed(params["embed"], tokens, cfg)
    for stage in (params["layers"][:1], params["layers"][1:]):
        for layer in stage:
            x, aux = gpt.block(layer, x, cfg)
            assert float(aux) == 0.0
    logits = gpt.final_norm_and_logits(params["final_norm"], gpt.head_weight(params, cfg), x, cfg)
    torch.testing.assert_close(logits, gpt.apply(params, tokens, cfg))


def test_head_and_column_splits_sum_to_full():
    """The layouts shard as documented: heads (wq/wk/wv dim 1, wo dim 0) and d_ff (w1 dim 1, w2 dim 0)."""
    layer = gpt.init(random.key(0), TINY)["layers"][0]
    x = random.normal(random.key(1), (2, 8, 32))
    full = gpt.attention(layer["attn"], x, TINY)
    halves = [{n: w[:, s] if n != "wo" else w[s] for n, w in layer["attn"].items()}
              for s in (slice(0, 2), slice(2, 4))]  # fmt: skip
    torch.testing.assert_close(
        sum(gpt.attention(h, x, TINY) for h in halves), full, atol=1e-6, rtol=1e-5
    )
    mlp = layer["mlp"]
    parts = [{"w1": mlp["w1"][:, s], "w2": mlp["w2"][s]} for s in (slice(0, 64), slice(64, 128))]
    torch.testing.assert_close(
        sum(gpt.mlp(p, x, TINY) for p in parts), gpt.mlp(mlp, x, TINY), atol=1e-6, rtol=1e-5
    )


def test_attention_core_chunks_match_full():
    """Sequence-parallel building block: a query chunk over all earlier keys equals the slice of full attention."""
    q, k, v = (random.normal(random.key(i), (2, 4, 12, 8)) for i in range(3))
    full = gpt.attention_core(q, k, v)
    explicit = gpt.attention_core(q, k, v, dropout_rate=1e-9, key=random.key(0))  # keeps everything
    torch.testing.assert_close(explicit, full, atol=1e-6, rtol=1e-5)
    for lo in (0, 4, 8):
        chunk = gpt.attention_core(
            q[:, :, lo : lo + 4], k[:, :, : lo + 4], v[:, :, : lo + 4], q_offset=lo
        )
        torch.testing.assert_close(chunk, full[:, :, lo : lo + 4], atol=1e-6, rtol=1e-5)
    # Keys of a later-offset chunk: positions 4..7 seen by queries 8..11 with no mask.
    part = gpt.attention_core(q[:, :, 8:], k[:, :, 4:8], v[:, :, 4:8], q_offset=8, kv_offset=4)
    scores = torch.softmax(q[:, :, 8:] @ k[:, :, 4:8].transpose(-1, -2) / math.sqrt(8), -1)
    torch.testing.assert_close(part, scores @ v[:, :, 4:8], atol=1e-6, rtol=1e-5)
    # Queries 0..3 see none of keys 4..7: zero rows, with or without dropout.
    for kw in ({}, {"dropout_rate": 0.5, "key": random.key(0)}):
        none = gpt.attention_core(q[:, :, :4], k[:, :, 4:8], v[:, :, 4:8], kv_offset=4, **kw)
        assert torch.equal(none, torch.zeros_like(none))


def test_dropout_needs_a_key_and_is_deterministic_in_it():
    cfg = gpt.config("tiny", dropout=0.2)
    params = gpt.init(random.key(0), cfg)
    tokens = _tokens(8)
    no_key = gpt.apply(params, tokens, cfg)
    torch.testing.assert_close(no_key, gpt.apply(params, tokens, TINY))
    a = gpt.apply(params, tokens, cfg, key=random.key(1))
    assert torch.equal(a, gpt.apply(params, tokens, cfg, key=random.key(1)))
    assert not torch.allclose(a, no_key)
    assert not torch.allclose(a, gpt.apply(params, tokens, cfg, key=random.key(2)))
    grads = torch.func.grad(gpt.loss)(params, _batch(8), cfg, key=random.key(3))
    assert all(torch.isfinite(g).all() for g in tree.leaves(grads))


def test_bfloat16():
    cfg = gpt.config("tiny", dtype=torch.bfloat16, pos="rotary", n_experts=2)
    params = gpt.init(random.key(0), cfg)
    assert all(p.dtype == torch.bfloat16 for p in tree.leaves(params))
    assert gpt.apply(params, _tokens(9), cfg).dtype == torch.bfloat16
    assert gpt.loss(params, _batch(9), cfg).dtype == torch.float32


def test_input_errors():
    params = gpt.init(random.key(0), TINY)
    with pytest.raises(
        DTypeError, match=r"tokens must be an integer tensor \(token ids\), got dtype torch.float32"
    ):
        gpt.apply(params, torch.zeros(1, 4), TINY)
    with pytest.raises(ShapeError) as e:
        gpt.apply(params, torch.zeros(1, 33, dtype=torch.int64), TINY)
    assert (
        str(e.value)
        == "tokens has seq 33, longer than config.seq_len=32; crop the sequence or raise seq_len"
    )
    with pytest.raises(ShapeError, match=r"tokens must be \[batch, seq\], got shape \(4,\)"):
        gpt.apply(params, torch.zeros(4, dtype=torch.int64), TINY)
    with pytest.raises(
        TreeError,
        match=r"needs batch = \{\"tokens\": \.\.\., \"targets\": \.\.\.\}, got \['tokens'\]",
    ):
        gpt.loss(params, {"tokens": _tokens(1)}, TINY)
    with pytest.raises(ShapeError, match="must have the same shape"):
        gpt.loss(params, {"tokens": _tokens(1), "targets": _tokens(1)[:, :-1]}, TINY)
