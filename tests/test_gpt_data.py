"""The shipped corpus, the byte tokenizer and random training windows."""

import itertools
from importlib import resources

import pytest
import torch

from colofn import data, random
from colofn.errors import DTypeError, ShapeError


def test_corpus_is_shipped_small_ascii_and_regenerable():
    path = resources.files("colofn.data").joinpath("stories.txt")
    text = data.text()
    assert len(path.read_bytes()) < 200_000 and len(text) >= 80_000 and text.isascii()
    assert text == data.generate_text(random.key(0), 80_000)


def test_corpus_has_consistent_facts():
    text = data.text().replace("\n", " ")
    assert "The fox was red." in text and "The fox was" + " green." not in text
    assert "Together they had" in text and 'asked, "Where is the' in text


def test_encode_decode_roundtrip():
    for s in ["", "hello, world\n", "naïve café ☕"]:
        t = data.encode(s)
        assert t.dtype == torch.int64 and t.shape == (len(s.encode()),) and bool((t < 256).all())
        assert data.decode(t) == s
    assert data.decode(torch.tensor([104, 255, 105])) == "h\ufffdi"
    with pytest.raises(DTypeError, match="encode takes a str, got bytes"):
        data.encode(b"hi")
    with pytest.raises(DTypeError, match="decode takes a 1-D integer tensor"):
        data.decode(torch.zeros(2, 2, dtype=torch.int64))


def test_sample_batch_windows_are_shifted_and_deterministic():
    stream = data.encode(data.text())
    a = data.sample_batch(random.key(0), stream, 8, 32)
    b = data.sample_batch(random.key(0), stream, 8, 32)
    c = data.sample_batch(random.key(1), stream, 8, 32)
    assert a["tokens"].shape == a["targets"].shape == (8, 32)
    assert torch.equal(a["tokens"], b["tokens"]) and not torch.equal(a["tokens"], c["tokens"])
    assert torch.equal(a["tokens"][:, 1:], a["targets"][:, :-1])
    text = data.text()
    for row in range(8):
        window = data.decode(a["tokens"][row]) + data.decode(a["targets"][row, -1:])
        assert window in text


def test_batches_step_i_is_fold_in():
    stream = torch.arange(1000)
    got = list(itertools.islice(data.batches(random.key(3), stream, 2, 16), 3))
    for i, b in enumerate(got):
        assert torch.equal(
            b["tokens"],
            data.sample_batch(random.fold_in(random.key(3), i), stream, 2, 16)["tokens"],
        )
    assert not torch.equal(got[0]["tokens"], got[1]["tokens"])


def test_short_stream_error():
    with pytest.raises(ShapeError) as e:
        data.sample_batch(random.key(0), torch.arange(8), 2, 8)
    assert (
        str(e.value)
        == "sample_batch needs a 1-D token stream longer than seq_len=8, got shape (8,)"
    )
