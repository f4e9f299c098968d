"""Loading a checkpoint never runs code from its files, and older pickled checkpoints are refused or converted.

Each crafted file holds a pickle that would create a directory when
unpickled; the manifest is then re-sealed (sizes and SHA-256 recomputed), as
an attacker who writes the whole checkpoint would do. Every load must raise a
``CheckpointError`` naming the file, and the directory must not appear.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import pickle
from typing import NamedTuple

import pytest
import torch

from colofn import checkpoint
from colofn import tree as jt
from colofn.checkpoint import _dcp, _manifest
from colofn.cli import main as cli_main
from colofn.errors import CheckpointError


class Plant:
    """Unpickling this creates the directory ``flag``: proof that code ran."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self):
        return (os.mkdir, (self.flag,))


class Pair(NamedTuple):
    a: torch.Tensor
    b: object


def _tree():
    return {"w": torch.arange(6.0).reshape(2, 3), "opt": Pair(torch.ones(2), None), "step": 3, "dtype": torch.float16}


def _manifest_of(path):
    return json.loads((path / checkpoint.MARKER).read_text())


def _reseal(path, content=None):
    """Rewrite the manifest with the files' current sizes and hashes (what an attacker would ship)."""
    content = content or _manifest_of(path)
    content["files"] = {n: _manifest.file_digest(str(path / n)) for n in _manifest.data_files(str(path))}
    (path / checkpoint.MARKER).write_text(json.dumps(content))


@pytest.fixture
def ck(tmp_path):
    path = tmp_path / "step_000003"
    checkpoint.save(path, _tree())
    return path


@pytest.fixture
def flag(tmp_path):
    out = str(tmp_path / "pwned")
    yield out
    assert not os.path.exists(out), "a crafted checkpoint ran code"


def _refused(path, match, **kw):
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(path, **kw)


def test_round_trip_of_every_registered_node_and_value(ck):
    got = checkpoint.load(ck)
    assert isinstance(got["opt"], Pair) and got["opt"].b is None and torch.equal(got["opt"].a, torch.ones(2))
    assert got["step"] == 3 and got["dtype"] is torch.float16 and list(got) == ["w", "opt", "step", "dtype"]
    tree = {"o": collections.OrderedDict(z=1.5, a=float("nan")), "d": collections.defaultdict(list, {3: b"\x00\xff"}),
            "t": (torch.device("cpu"), [True, "s"])}
    checkpoint.save(ck.parent / "other", tree)
    back = checkpoint.load(ck.parent / "other")
    assert jt.structure(back) == jt.structure(tree) and back["d"].default_factory is list
    assert back["d"][3] == b"\x00\xff" and back["t"] == (torch.device("cpu"), [True, "s"])
    assert back["o"]["z"] == 1.5 and back["o"]["a"] != back["o"]["a"]  # NaN


def test_crafted_manifest_structure_and_values_run_nothing(ck, flag):
    good = _manifest_of(ck)
    evil = base64.b64encode(pickle.dumps(Plant(flag))).decode()
    content = dict(good, tree=evil)  # a pickle where the structure belongs
    _reseal(ck, content)
    _refused(ck, r"step_000003 is corrupt: its manifest colofn_checkpoint.json cannot be read \(ValueError: 'gAS")
    content = dict(good, tree={"node": "list", "children": ["*"]})
    _reseal(ck, content)
    _refused(ck, r"step_000003 is corrupt: its manifest colofn_checkpoint.json cannot be read \(ValueError: its structure has 1 leaves and it lists 4")
    children = ["*"] * len(good["leaves"])
    content = dict(good, tree={"node": "dataclass", "type": "os:system", "meta": ["touch x"], "children": children})
    _reseal(ck, content)  # a function named as a node class is never called
    _refused(ck, r"the tree structure in its manifest colofn_checkpoint.json .* cannot be rebuilt here: "
             r"it needs the class os:system \(os has a builtin_function_or_method")
    leaves = [dict(d, kind="pickle", value=evil) if d["path"] == "['step']" else d for d in good["leaves"]]
    _reseal(ck, dict(good, leaves=leaves))  # a pickled value leaf
    _refused(ck, r"its manifest colofn_checkpoint.json cannot be read \(ValueError: the leaf \['step'\] has the kind 'pickle'")
    leaves = [dict(d, value={"pickle": evil}) if d["path"] == "['step']" else d for d in good["leaves"]]
    _reseal(ck, dict(good, leaves=leaves))
    _refused(ck, r"its manifest colofn_checkpoint.json cannot be read \(ValueError: \{'pickle': 'gAS.* is not a stored plain value")
    assert not checkpoint.is_complete(ck) and checkpoint.latest(ck.parent) is None


def test_crafted_dcp_metadata_runs_nothing(ck, flag):
    (ck / ".metadata").write_bytes(pickle.dumps(Plant(flag)))
    _reseal(ck)
    _refused(ck, r"step_000003 is corrupt or not safe to read: its DCP metadata .metadata cannot be read "
             r"\(UnpicklingError: it names posix.mkdir, which is not part of DCP's metadata\); nothing in it was run")
    _refused(ck, r"its DCP metadata .metadata cannot be read", verify=False)


def _rewrite_metadata(ck, edit):
    md = _dcp.read_metadata(str(ck))
    edit(md)
    (ck / ".metadata").write_bytes(pickle.dumps(md))
    _reseal(ck)


def test_dcp_metadata_may_not_point_outside_or_at_byte_entries(ck, flag):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    good = (ck / ".metadata").read_bytes()

    def outside(md):
        for info in md.storage_data.values():
            info.relative_path = "../../etc/passwd"

    _rewrite_metadata(ck, outside)
    _refused(ck, r"its DCP metadata .metadata cannot be read \(ValueError: it points at the file '../../etc/passwd'")

    def as_bytes(md):  # DCP's reader of byte entries unpickles them without restriction
        md.state_dict_metadata = {k: BytesStorageMetadata() for k in md.state_dict_metadata}

    (ck / ".metadata").write_bytes(good)
    _rewrite_metadata(ck, as_bytes)
    _refused(ck, r"\(UnpicklingError: it names torch.distributed.checkpoint.metadata.BytesStorageMetadata")


def test_crafted_data_file_runs_nothing(ck, flag, tmp_path):
    """A data file whose tensor is a pickle that creates a file: torch's weights-only reader refuses it."""
    data = _manifest.data_files(str(ck))
    name = next(n for n in data if n.endswith(".distcp"))
    torch.save(Plant(flag), tmp_path / "payload")
    payload = (tmp_path / "payload").read_bytes()
    (ck / name).write_bytes(payload)

    def to_payload(md):
        for info in md.storage_data.values():
            info.offset, info.length = 0, len(payload)

    _rewrite_metadata(ck, to_payload)
    _refused(ck, rf"step_000003 is corrupt or not safe to read: its data file {name} cannot be read "
             r"\(UnpicklingError: Weights only load failed.*\); nothing in it was run")


# ----------------------------------------------------------------------------- the older, pickled format


def _make_legacy(path, tree):
    """Rewrite a fresh checkpoint's manifest the way colofn wrote it before this format (version 1)."""
    content = _manifest_of(path)
    content["version"] = 1
    content.pop("tree")
    content["treedef"] = base64.b64encode(pickle.dumps(jt.structure(tree))).decode()
    values = dict((jt.keystr(p), x) for p, x in jt.flatten_with_path(tree)[0])
    for leaf in content["leaves"]:
        if leaf["kind"] == "value":
            x = values[leaf["path"]]
            json_ok = type(x) in (bool, int, float, str)
            leaf["kind"] = "json" if json_ok else "pickle"
            leaf["value"] = x if json_ok else base64.b64encode(pickle.dumps(x)).decode()
    (path / checkpoint.MARKER).write_text(json.dumps(content))


def test_legacy_checkpoints_are_refused_with_the_conversion_then_convert(ck, flag, capsys):
    _make_legacy(ck, _tree())
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(ck)
    text = str(e.value)
    assert "was written by an older colofn: its manifest colofn_checkpoint.json (version 1) stores the values of ['dtype'] as pickles" in text
    assert f"`colofn checkpoint convert --trust {ck}`" in text
    with pytest.raises(CheckpointError, match=r"holds pickles, which run code when read; pass trust=True"):
        checkpoint.convert(ck)
    assert checkpoint.latest(ck.parent) == str(ck)  # complete, so latest still points the user at it
    assert cli_main(["checkpoint", "convert", "--trust", str(ck)]) == 0
    assert "converted" in capsys.readouterr().out
    got = checkpoint.load(ck)
    assert isinstance(got["opt"], Pair) and got["dtype"] is torch.float16 and got["step"] == 3
    assert _manifest_of(ck)["version"] == 2 and checkpoint.convert(ck) == str(ck)  # idempotent


def test_legacy_without_pickled_values_loads_with_a_full_like_and_a_crafted_one_runs_nothing(ck, flag):
    tree = {"w": torch.ones(2), "step": 3}
    checkpoint.save(ck.parent / "plain", tree)
    plain = ck.parent / "plain"
    _make_legacy(plain, tree)
    got = checkpoint.load(plain, like={"w": torch.empty(2), "step": 0})  # like gives the structure: no pickle read
    assert got["step"] == 3
    with pytest.raises(CheckpointError, match=r"stores its tree structure as pickles"):
        checkpoint.load(plain)
    content = _manifest_of(plain)
    content["treedef"] = base64.b64encode(pickle.dumps(Plant(flag))).decode()
    (plain / checkpoint.MARKER).write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"convert --trust"):
        checkpoint.load(plain)
    assert checkpoint.load(plain, like={"w": torch.empty(2), "step": 0})["step"] == 3


def test_a_node_outside_the_registry_is_saved_and_needs_a_full_like(tmp_path):
    tree = {"d": collections.defaultdict(lambda: 0, {"k": torch.ones(2)}), "step": 1}
    checkpoint.save(tmp_path / "ck", tree)
    assert _manifest_of(tmp_path / "ck")["tree"] is None
    with pytest.raises(CheckpointError, match=r"cannot be rebuilt here: tree\['d'\]: a defaultdict whose factory .* is not one of "
                       r"\['dict', 'float', 'int', 'list', 'set', 'str', 'tuple'\]; pass like= with the whole structure"):
        checkpoint.load(tmp_path / "ck")
    got = checkpoint.load(tmp_path / "ck", like={"d": {"k": torch.empty(2)}, "step": 0})
    assert torch.equal(got["d"]["k"], torch.ones(2)) and got["step"] == 1


def test_convert_names_an_old_value_that_cannot_be_stored_as_data(tmp_path):
    checkpoint.save(tmp_path / "old", {"w": torch.ones(2), "s": "placeholder"})
    _make_legacy(tmp_path / "old", {"w": torch.ones(2), "s": {1, 2}})  # version 1 pickled any value, a set too
    with pytest.raises(CheckpointError, match=r"has values that cannot be stored as data:\n  \* \['s'\]: a set is not a plain value"):
        checkpoint.convert(tmp_path / "old", trust=True)
    assert _manifest_of(tmp_path / "old")["version"] == 1  # left as it was


def test_convert_even_when_trusted_rebuilds_only_tree_nodes_and_plain_values(ck, flag):
    _make_legacy(ck, _tree())
    content = _manifest_of(ck)
    content["treedef"] = base64.b64encode(pickle.dumps(Plant(flag))).decode()
    (ck / checkpoint.MARKER).write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"its tree structure cannot be unpickled here \(UnpicklingError: it names "
                       r".*, which is neither a tree node type nor a plain value\)"):
        checkpoint.convert(ck, trust=True)
