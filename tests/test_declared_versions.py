"""Declared support is what the nox matrix tests, and README says which versions that is.

``nox -s minimum`` pins every dependency to its ``>=`` bound in
``pyproject.toml``; these tests keep the bounds, the matrix and README's
"Tested versions" line from drifting apart.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from unittest import mock

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def noxfile():
    spec = importlib.util.spec_from_file_location("colofn_noxfile", ROOT / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ):  # it activates pyenv versions for nox; not for the tests
        spec.loader.exec_module(module)
    return module


def test_every_dependency_is_pinned_to_its_lower_bound(noxfile):
    pins = dict(p.split("==") for p in noxfile.lowest_pins(str(ROOT / "pyproject.toml")))
    assert set(pins) == {"torch", "optree", "einops", "numpy", "hypothesis", "pytest", "nox"}
    assert Version(noxfile.TORCH.split("==")[1]) == Version(pins["torch"])  # the tested torch is the oldest declared


def test_a_dependency_without_a_lower_bound_is_refused(noxfile, tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\ndependencies = ["torch>=2.13", "einops"]\n[project.optional-dependencies]\ntest = []\n'
    )
    with pytest.raises(ValueError, match="'einops' needs one '>=' lower bound"):
        noxfile.lowest_pins(str(tmp_path / "pyproject.toml"))


def test_readme_states_the_tested_versions(noxfile):
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith("Tested versions:"))
    pins = dict(p.split("==") for p in noxfile.lowest_pins(str(ROOT / "pyproject.toml")))
    for name in ("optree", "einops", "numpy", "hypothesis", "pytest"):
        assert re.search(rf"{name} {re.escape(str(Version(pins[name])))}(\.0)*\b", line), (name, line)
    assert f"torch {noxfile.TORCH.split('==')[1]}" in line
    for python in noxfile.TORCH_PYTHONS:
        assert f"CPython {python}" in line
    for python in noxfile.SYNTAX_PYTHONS:
        assert python in line
