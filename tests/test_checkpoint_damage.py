"""Checkpoints under damage: truncated files, killed saves, disagreeing ranks, unwritable or full disks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import warnings

import pytest
import torch

import colofn
from colofn import checkpoint
from colofn.checkpoint import _manifest, _save, _stale
from colofn.errors import CheckpointError, CheckpointSaveError


def _data_file(path):
    return next(n for n in _manifest.data_files(str(path)) if n.endswith(".distcp"))


def test_latest_skips_damaged_checkpoints_with_a_warning(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path / f"step_{step}", {"w": torch.ones(64) * step, "step": step})
    name = _data_file(tmp_path / "step_4")
    blob = (tmp_path / "step_4" / name).read_bytes()
    (tmp_path / "step_4" / name).write_bytes(blob[:10])  # truncated: a disk that filled up, a copy cut short
    (tmp_path / "step_3" / checkpoint.MARKER).write_text("{")  # an unreadable manifest
    os.remove(tmp_path / "step_2" / ".metadata")
    with pytest.warns(UserWarning) as caught:
        assert checkpoint.latest(tmp_path) == str(tmp_path / "step_1")
    texts = [str(w.message) for w in caught]
    assert texts[0] == (f"colofn.checkpoint.latest: skipping the damaged checkpoint {tmp_path}/step_4: "
                        f"{name}: 10 bytes, the manifest says {len(blob)} (truncated or replaced)")
    assert "the damaged checkpoint" in texts[1] and "step_3" in texts[1] and "its manifest colofn_checkpoint.json cannot be read" in texts[1]
    assert texts[2].endswith("step_2: .metadata: missing") and len(texts) == 3
    (tmp_path / "step_4" / name).write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact newest checkpoint: no warning
        assert checkpoint.latest(tmp_path) == str(tmp_path / "step_4")


# ----------------------------------------------------------------------------- stale temporary directories

def _killed_save(path):
    """A real process that dies in the middle of a save (after DCP wrote its data, before the marker)."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup of any kind runs
        try:
            dcp_save = _save._dcp_save

            def killed(state, directory):
                dcp_save(state, directory)
                os._exit(3)

            _save._dcp_save = killed
            checkpoint.save(path, {"w": torch.ones(1000)})
        finally:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3


def _fake_tmp(parent, name, info):
    d = parent / name
    d.mkdir()
    (d / "__0_0.distcp").write_bytes(b"x" * 100)
    if info is not None:
        (d / _stale.OWNER).write_text(json.dumps(info))
    return d


def test_a_later_save_removes_temporary_directories_of_killed_saves(tmp_path):
    _killed_save(str(tmp_path / "step_2"))
    (killed,) = [n for n in os.listdir(tmp_path) if n.startswith(".step_2.tmp-")]
    info = json.loads((tmp_path / killed / _stale.OWNER).read_text())
    assert info["host"] == socket.gethostname() and _stale.is_dead(info)
    me = _stale.owner()
    live = _fake_tmp(tmp_path, ".step_5.tmp-live", me)  # a save still running (this very process)
    remote = _fake_tmp(tmp_path, ".step_6.tmp-remote", dict(info, host="another-host"))  # cannot prove anything
    unknown = _fake_tmp(tmp_path, ".step_7.tmp-unknown", None)  # no owner file
    reused = _fake_tmp(tmp_path, ".step_8.tmp-reused", dict(me, start="1"))  # our pid, another process's start time
    rebooted = _fake_tmp(tmp_path, ".step_9.tmp-reboot", dict(me, boot_id="an-earlier-boot"))
    assert not _stale.is_dead(me) and _stale.is_dead(json.loads((reused / _stale.OWNER).read_text()))
    checkpoint.save(tmp_path / "step_3", {"w": torch.ones(3)})
    assert sorted(os.listdir(tmp_path)) == sorted(["step_3", live.name, remote.name, unknown.name])
    assert sorted(os.listdir(tmp_path / "step_3")) == [".metadata", "__0_0.distcp", checkpoint.MARKER]  # no owner file
    assert not rebooted.exists()


# ----------------------------------------------------------------------------- ranks that disagree


def _save_per_rank_path(root):
    path = f"{root}/step_{colofn.process_index()}"  # a bug: the path depends on the rank
    try:
        checkpoint.save(path, {"w": torch.ones(2)})
    except CheckpointError as e:
        return str(e)
    return "saved"


def test_different_paths_on_different_ranks_raise_on_every_rank(tmp_path):
    got = colofn.launch(_save_per_rank_path, str(tmp_path), world_size=2)
    for rank, text in enumerate(got):
        assert text.startswith(f"colofn.checkpoint.save: the ranks were given different paths (this is rank {rank})")
        assert f"* rank 0: '{tmp_path}/step_0'\n  * rank 1: '{tmp_path}/step_1'\nFix: pass the same path on every rank" in text
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- unwritable parents, full disks


def _save_in_world(path):
    with colofn.Mesh((2,), ("dp",)):
        try:
            checkpoint.save(path, {"w": colofn.device_put(torch.ones(4, 2), colofn.P("dp"))})
        except CheckpointSaveError as e:
            return str(e), {r: type(x).__name__ for r, x in e.failures.items()}
    return "saved", {}


def test_a_parent_that_is_a_file_or_read_only(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("not a directory")
    for target in (tmp_path / "afile" / "step_1", tmp_path / "afile" / "deeper" / "step_1"):
        with pytest.raises(CheckpointSaveError) as e:
            checkpoint.save(target, {"w": torch.ones(2)})
        assert str(e.value) == (f"colofn.checkpoint.save('{target}') cannot create the checkpoint: "
                                f"{tmp_path}/afile is a file, not a directory; nothing was written")
        assert isinstance(e.value.failures[0], NotADirectoryError)

    def read_only(prefix, dir):  # tests run as root, where chmod does not stop writes
        raise PermissionError(errno.EACCES, "Permission denied", dir)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    got = colofn.launch(_save_in_world, str(tmp_path / "ro" / "step_1"), world_size=2)
    want = (f"colofn.checkpoint.save('{tmp_path}/ro/step_1') cannot create the checkpoint: "
            f"{tmp_path}/ro is not writable (permission denied); nothing was written")
    assert got == [(want, {0: "PermissionError"})] * 2  # every rank raises the same error

    def read_only_fs(prefix, dir):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only_fs)
    with pytest.raises(CheckpointSaveError, match=r"ro is not writable \(a read-only file system\); nothing was written$"):
        checkpoint.save(tmp_path / "ro" / "step_1", {"w": torch.ones(2)})


class _FullDisk(contextlib.AbstractContextManager):
    """A stream that accepts ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        if self.room < len(b):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_is_said_so(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with open(path, mode) as f:
            yield _FullDisk(f, 200) if "w" in mode and str(path).endswith(".distcp") else f

    monkeypatch.setattr(fs.FileSystem, "create_stream", create_stream)
    text, failures = colofn.launch(_save_in_world, str(tmp_path / "step_1"), world_size=2)[0]
    assert text.startswith(f"colofn.checkpoint.save('{tmp_path}/step_1') failed on rank(s) [0, 1] (rank 0: ")
    assert "RuntimeError: [enforce fail at inline_container.cc" in text  # what torch's writer says, kept
    assert "; a data file could not be written in full: is the disk full? (" in text
    assert text.endswith(f" bytes free on the file system of {tmp_path}); {tmp_path}/step_1 was left as it was")
    assert failures == {0: "RuntimeError", 1: "RuntimeError"} and os.listdir(tmp_path) == []  # the temporary directory was removed

    def write_marker(directory, content):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.undo()
    monkeypatch.setattr(_manifest, "write_marker", write_marker)  # rank 0 finishing the save
    (text, failures), (text1, failures1) = colofn.launch(_save_in_world, str(tmp_path / "step_1"), world_size=2)
    assert text1 == text and failures1 == {0: "RuntimeError"}  # rank 1 raises the same text (the OSError stays on rank 0)
    assert text.startswith(f"colofn.checkpoint.save('{tmp_path}/step_1') failed on rank 0 while finishing the save "
                           f"(OSError: [Errno 28] No space left on device); the file system of {tmp_path} is full (")
    assert failures == {0: "OSError"} and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- colofn train --resume


def test_train_resume_takes_the_same_safe_paths(tmp_path, capsys):
    """--resume DIR falls back past a truncated newest checkpoint (warning); a crafted one is refused."""
    import pickle

    from colofn.train import TrainConfig, parse_mesh, train

    def run(out, **kw):
        return train(TrainConfig(mesh=tuple(parse_mesh("dp=2").items()), out=str(out), steps=2, warmup=1, check=False, **kw))

    assert run(tmp_path / "a", checkpoint_every=1) == 0
    ckpts = tmp_path / "a" / "checkpoints"
    newest = ckpts / "step_000002"
    name = _data_file(newest)
    (newest / name).write_bytes((newest / name).read_bytes()[:100])
    capsys.readouterr()
    with pytest.warns(UserWarning, match=rf"skipping the damaged checkpoint {newest}: {name}: 100 bytes"):
        assert run(tmp_path / "b", resume=str(ckpts)) == 0
    assert "resumed at step 1" in capsys.readouterr().out
    first = ckpts / "step_000001"
    (first / ".metadata").write_bytes(pickle.dumps(_Plant(str(tmp_path / "pwned"))))
    content = json.loads((first / checkpoint.MARKER).read_text())
    content["files"][".metadata"] = _manifest.file_digest(str(first / ".metadata"))  # sealed, as an attacker would
    (first / checkpoint.MARKER).write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"step_000001 is corrupt or not safe to read: its DCP metadata .metadata cannot be read"):
        run(tmp_path / "c", resume=str(first))
    assert not (tmp_path / "pwned").exists()


class _Plant:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (os.mkdir, (self.flag,))
