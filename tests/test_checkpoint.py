"""colofn.checkpoint: resharding round trips, atomic saves under failure, and the errors of bad checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

import colofn
from colofn import P, checkpoint
from colofn.checkpoint import _manifest
from colofn.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    TreeTypeError,
)

W = torch.arange(64.0).reshape(8, 8)
B = torch.arange(8.0) - 3
E = torch.arange(12, dtype=torch.int64).reshape(4, 3)


def _state(w, b):
    return {
        "params": {"w": w, "b": b, "emb": E.clone()},
        "opt": {"step": 100, "cfg": {"lr": 0.1, "name": "adam", "nesterov": False, "betas": (0.9, 0.99)}},
        "dtype": torch.bfloat16,  # not JSON: stored tagged, {"dtype": "bfloat16"}
    }


def save_2x2(path):
    with colofn.Mesh((2, 2), ("dp", "tp")):
        w = colofn.device_put(W, P("dp", "tp"))
        b = colofn.device_put(B, P(None))
        return checkpoint.save(path, _state(w, b))


def _check_loaded(state, w_placements):
    assert isinstance(state["params"]["w"], DTensor) and state["params"]["w"].placements == w_placements
    assert torch.equal(state["params"]["w"].full_tensor(), W)
    b = state["params"]["b"]
    assert torch.equal(b.full_tensor() if isinstance(b, DTensor) else b, B)
    assert torch.equal(colofn.gather(state["params"]["emb"]), E) and state["params"]["emb"].dtype == torch.int64
    assert state["opt"] == {"step": 100, "cfg": {"lr": 0.1, "name": "adam", "nesterov": False, "betas": (0.9, 0.99)}}
    assert state["dtype"] is torch.bfloat16


def load_tp4(path):
    with colofn.Mesh((4,), ("tp",)):
        like = {"params": {"w": P(None, "tp"), "b": torch.empty(8), "emb": P()}, "opt": None, "dtype": None}
        like["opt"] = {"step": 0, "cfg": {"lr": 0.0, "name": "", "nesterov": True, "betas": (0.0, 0.0)}}
        like["dtype"] = torch.float32
        state = checkpoint.load(path, like)
        _check_loaded(state, (Shard(1),))
        return True


def load_prefix_on_2(path):
    with colofn.Mesh((2,), ("dp",)):
        template = colofn.device_put(torch.zeros(8, 8), P("dp"))
        state = checkpoint.load(path, like={"params": {"w": template, "b": P("dp"), "emb": P()}, "opt": P(), "dtype": P()})
        _check_loaded(state, (Shard(0),))
        assert state["params"]["b"].placements == (Shard(0),)
        assert torch.equal(template.full_tensor(), torch.zeros(8, 8))  # like is not modified
        everything = checkpoint.load(path, like=P())  # one sharding for every tensor
        _check_loaded(everything, (Replicate(),))
        return True


def test_save_on_one_mesh_load_on_others(tmp_path):
    path = str(tmp_path / "step_000100")
    assert colofn.launch(save_2x2, path, world_size=4)[0] == path
    assert colofn.launch(load_tp4, path, world_size=4) == [True] * 4
    assert colofn.launch(load_prefix_on_2, path, world_size=2) == [True] * 2
    plain = checkpoint.load(path)  # outside any world: plain full tensors
    assert type(plain["params"]["w"]) is torch.Tensor and torch.equal(plain["params"]["w"], W)
    manifest = json.loads((tmp_path / "step_000100" / checkpoint.MARKER).read_text())
    by_path = {leaf["path"]: leaf for leaf in manifest["leaves"]}
    assert by_path["['params']['w']"] == {
        "path": "['params']['w']", "kind": "tensor", "shape": [8, 8], "dtype": "float32",
        "sharding": "mesh(dp=2, tp=2) {dp: Shard(0), tp: Shard(1)}",
    }
    assert by_path["['opt']['step']"] == {"path": "['opt']['step']", "kind": "value", "value": 100}
    assert by_path["['dtype']"] == {"path": "['dtype']", "kind": "value", "value": {"dtype": "bfloat16"}}
    assert manifest["world_size"] == 4 and manifest["version"] == 2
    assert manifest["tree"]["keys"] == ["params", "opt", "dtype"]  # data, in insertion order


def _save_partial(path):
    with colofn.Mesh((2,), ("dp",)):
        total = colofn.device_put(W, P("dp")).sum(0)  # a pending sum (Partial)
        checkpoint.save(path, {"total": total})
        return checkpoint.load(path, like={"total": P()})["total"].full_tensor()


def test_pending_sums_are_reduced_before_saving(tmp_path):
    got = colofn.launch(_save_partial, str(tmp_path / "ck"), world_size=2)
    assert torch.equal(got[0], W.sum(0)) and torch.equal(got[1], W.sum(0))


def test_overwrite_and_unsaveable_leaves(tmp_path):
    path = tmp_path / "ck"
    checkpoint.save(path, {"x": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"ck already exists; pass overwrite=True to replace it"):
        checkpoint.save(path, {"x": torch.zeros(2)})
    checkpoint.save(path, {"x": torch.zeros(2), "n": 3}, overwrite=True)
    assert checkpoint.load(path)["n"] == 3 and torch.equal(checkpoint.load(path)["x"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary or old directory left behind
    with pytest.raises(TreeTypeError, match=r"\['f'\]: a function is not a plain value a checkpoint can store"):
        checkpoint.save(tmp_path / "other", {"f": lambda: 0, "x": torch.ones(1)})
    assert not (tmp_path / "other").exists()


def test_latest_skips_incomplete_and_temporary(tmp_path):
    assert checkpoint.latest(tmp_path / "nothing") is None
    assert checkpoint.latest(tmp_path) is None
    for step in (100, 20):
        checkpoint.save(tmp_path / f"step_{step:06d}", {"step": step})
    (tmp_path / "step_000300").mkdir()  # a crashed save that left a directory without a marker
    (tmp_path / ".step_000400.tmp-abc").mkdir()
    (tmp_path / "notes_999").write_text("a file, not a checkpoint")
    assert checkpoint.latest(tmp_path) == str(tmp_path / "step_000100")
    assert checkpoint.is_complete(tmp_path / "step_000020") and not checkpoint.is_complete(tmp_path / "step_000300")


# ----------------------------------------------------------------------------- failures during a save


def _save_step(path, step, fail_rank=None, where=None):
    if fail_rank is not None and colofn.process_index() == fail_rank:
        where()
    with colofn.Mesh((2,), ("dp",)):
        return checkpoint.save(path, {"w": colofn.device_put(W * step, P("dp")), "step": step})


def _load_step(path):
    with colofn.Mesh((2,), ("dp",)):
        s = checkpoint.load(path, like={"w": P("dp"), "step": 0})
        return s["step"], s["w"].full_tensor()


class Boom(RuntimeError):
    pass


def _fail_in_writer(monkeypatch):
    import torch.distributed.checkpoint as dcp

    original = dcp.FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if dist.get_rank() == 1:
            raise Boom("disk full on rank 1")
        return original(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", write_data)


def _fail_before_marker(monkeypatch):
    original = _manifest.file_digest

    def file_digest(path):
        if dist.get_rank() == 1:
            raise Boom("rank 1 died after writing its data")
        return original(path)

    monkeypatch.setattr(_manifest, "file_digest", file_digest)


@pytest.mark.parametrize("inject", [_fail_in_writer, _fail_before_marker], ids=["in-dcp-write", "before-marker"])
def test_a_failing_rank_leaves_the_previous_checkpoint(tmp_path, monkeypatch, inject):
    colofn.launch(_save_step, str(tmp_path / "step_1"), 1, world_size=2)
    inject(monkeypatch)
    with pytest.raises((Boom, CheckpointSaveError)) as e:
        colofn.launch(_save_step, str(tmp_path / "step_2"), 2, world_size=2)
    if isinstance(e.value, CheckpointSaveError):  # DCP collected the writer's error on every rank
        assert "failed on rank(s) [1] (rank 1: Boom: disk full on rank 1)" in str(e.value)
        assert str(e.value).endswith("step_2 was left as it was")
        assert isinstance(e.value.failures[1], Boom)
    else:  # rank 1 raised between DCP and the marker; rank 0 saw the deadlock
        assert any("step_2') did not complete" in n for n in e.value.__notes__)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["step_1"]  # nothing half-written; the temporary directory was removed
    assert checkpoint.latest(tmp_path) == str(tmp_path / "step_1")
    step, w = colofn.launch(_load_step, checkpoint.latest(tmp_path), world_size=2)[0]
    assert step == 1 and torch.equal(w, W)


# ----------------------------------------------------------------------------- errors of bad checkpoints


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ck"
    checkpoint.save(path, {"w": W, "b": B, "step": 7})
    return path


def test_missing_and_incomplete_checkpoints(tmp_path, saved):
    with pytest.raises(CheckpointNotFoundError, match=r"No checkpoint at .*/nope: the directory does not exist$"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / ".nope.tmp-1234").mkdir()
    with pytest.raises(FileNotFoundError, match=r"an unfinished save left '.nope.tmp-1234'"):
        checkpoint.load(tmp_path / "nope")
    os.remove(saved / checkpoint.MARKER)
    with pytest.raises(CheckpointError, match=r"Checkpoint .*/ck is incomplete: it has no completion marker colofn_checkpoint.json"):
        checkpoint.load(saved)


def test_corrupt_manifest(saved):
    (saved / checkpoint.MARKER).write_text('{"format": "colofn.checkpoint", "leaves": [')
    with pytest.raises(CheckpointError, match=r"ck is corrupt: its manifest colofn_checkpoint.json cannot be read \(JSONDecodeError"):
        checkpoint.load(saved)


def test_like_that_does_not_match_names_the_leaves(saved):
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(saved, like={"w": torch.empty(8, 4), "b": torch.empty(8, dtype=torch.float64), "step": torch.ones(1)})
    text = str(e.value)
    assert "does not match like (3 leaf(s)):" in text
    assert "* ['w']: the checkpoint has float32[8, 8], like has shape [8, 4]" in text
    assert "* ['b']: the checkpoint has float32[8], like has dtype float64" in text
    assert "* ['step']: the checkpoint has a plain value there, like has a tensor (1,)" in text
    with pytest.raises(CheckpointError, match=r"(?s)does not match like: its tree is .*missing keys \['step'\]"):
        checkpoint.load(saved, like={"w": P(), "b": P()})


def test_damaged_data_files(saved):
    data = sorted(n for n in os.listdir(saved) if n.endswith(".distcp"))[0]
    blob = (saved / data).read_bytes()
    (saved / data).write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=rf"\* {data}: content differs from the save \(SHA-256"):
        checkpoint.load(saved)
    (saved / data).write_bytes(blob[:10])
    with pytest.raises(CheckpointError, match=rf"\* {data}: 10 bytes, the manifest says {len(blob)} \(truncated or replaced\)"):
        checkpoint.load(saved)
    (saved / data).write_bytes(blob)
    meta = (saved / ".metadata").read_bytes()
    (saved / ".metadata").write_bytes(b"\0" * len(meta))  # same size; without verify its reader fails
    with pytest.raises(CheckpointError, match=r"ck is corrupt or not safe to read: its DCP metadata .metadata cannot be read"):
        checkpoint.load(saved, verify=False)
    os.remove(saved / data)
    with pytest.raises(CheckpointError, match=rf"\* {data}: missing"):
        checkpoint.load(saved)


# ----------------------------------------------------------------------------- real processes


def gloo_save(path):
    with colofn.Mesh((2,), ("dp",)):
        return checkpoint.save(path, _state(colofn.device_put(W, P("dp", None)), colofn.device_put(B, P("dp"))))


def gloo_load(path):
    with colofn.Mesh((2, 2), ("dp", "tp")):
        state = checkpoint.load(path, like={"params": {"w": P("tp", "dp"), "b": P(("dp", "tp")), "emb": P()}, "opt": P(), "dtype": P()})
        _check_loaded(state, (Shard(1), Shard(0)))
        return True


def gloo_crash(path):
    if dist.get_rank() == 1:
        _manifest.file_digest = lambda p: os._exit(3)  # killed after writing its data, before the marker
    return gloo_save(path)


@pytest.mark.gloo
def test_gloo_save_at_2_load_at_4_and_a_killed_rank(tmp_path):
    first = str(tmp_path / "step_1")
    colofn.launch(gloo_save, first, world_size=2, backend="gloo")
    assert colofn.launch(gloo_load, first, world_size=4, backend="gloo") == [True] * 4
    # rank 0 then fails too (its peer is gone: connection reset, or the collective timeout)
    with pytest.raises(Exception, match="rank 1 exited with code 3|Connection|[Tt]imed out"):  # noqa: B017
        colofn.launch(gloo_crash, str(tmp_path / "step_2"), world_size=2, backend="gloo", timeout=5)
    assert checkpoint.latest(tmp_path) == first
    assert not (tmp_path / "step_2").exists()
