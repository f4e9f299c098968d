"""The test matrix: ``nox -l`` lists the sessions.

* ``unit``, ``property``, ``gloo``, ``doctests``, ``lint``: on every interpreter
  of ``TORCH_PYTHONS``, the ones for which torch's CPU build can be installed
  here. ``pip install torch==2.13.0`` takes the CPU wheel that lies on this
  machine's disk, built for CPython 3.11 only; for any other interpreter, and
  for every older torch, PyPI offers only CUDA builds (several GB with their
  ``nvidia-*`` dependencies), which are not a test dependency.
* ``minimum``: the default pytest run with the oldest version ``pyproject.toml``
  allows of every dependency and test dependency (each pinned to its ``>=``
  bound, so the bound must name a real release).
* ``syntax``: the other interpreters ``requires-python`` admits byte-compile
  every source file (warnings are errors); they cannot import torch here.

Every session builds its own virtualenv and installs the project from its
metadata (``nox -r`` reuses them), so a dependency missing from
``pyproject.toml`` fails there first. Interpreters installed by pyenv are found
without activating them; none is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox
from packaging.requirements import Requirement

TORCH = "torch==2.13.0"  # the CPU build on this machine's disk (Python 3.11)
TORCH_PYTHONS = ["3.11"]
SYNTAX_PYTHONS = ["3.10", "3.12", "3.13"]

nox.options.sessions = ["unit", "property", "gloo", "doctests", "lint", "minimum", "syntax"]
nox.options.download_python = "never"  # the matrix is what this machine has


def _activate_pyenv_versions() -> None:
    """Let pyenv's shims answer for every interpreter of the matrix (they answer only for activated versions)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if not shutil.which("pyenv") or not root.is_dir():
        return
    # The active versions stay first (a shim-started nox already has PYENV_VERSION set).
    active = os.environ.get("PYENV_VERSION") or subprocess.run(
        ["pyenv", "version-name"], capture_output=True, text=True
    ).stdout.strip()
    wanted = [p.name for v in TORCH_PYTHONS + SYNTAX_PYTHONS for p in sorted(root.glob(f"{v}.*"))]
    os.environ["PYENV_VERSION"] = ":".join(dict.fromkeys([*filter(None, active.split(":")), *wanted]))


_activate_pyenv_versions()


def _install(session: nox.Session, extra: str = "test") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extra}]")


@nox.session(python=TORCH_PYTHONS)
def unit(session: nox.Session) -> None:
    """Unit tests on the simulated world (no real processes)."""
    _install(session)
    session.run("pytest", "-q", "tests", "-m", "not gloo", *session.posargs)


@nox.session(python=TORCH_PYTHONS)
def property(session: nox.Session) -> None:
    """Hypothesis equivalence tests; COLOFN_HYPOTHESIS_PROFILE=long for many more examples."""
    _install(session)
    session.run("pytest", "-q", "property_tests", "-m", "not gloo", *session.posargs)


@nox.session(python=TORCH_PYTHONS)
def gloo(session: nox.Session) -> None:
    """Tests that spawn real torch.distributed gloo processes (and torchrun)."""
    _install(session)
    session.run("pytest", "-q", "tests", "property_tests", "-m", "gloo", *session.posargs)


@nox.session(python=TORCH_PYTHONS)
def doctests(session: nox.Session) -> None:
    """The >>> examples in the package and docs/."""
    _install(session)
    session.run("pytest", "-q", "src/colofn", "docs", *session.posargs)


@nox.session(python=TORCH_PYTHONS)
def lint(session: nox.Session) -> None:
    """ruff and mypy."""
    _install(session, "lint")
    session.run("ruff", "check", "src", "tests", "property_tests", "benchmarks")
    session.run("mypy")


def lowest_pins(pyproject: str = "pyproject.toml") -> list[str]:
    """``name==bound`` for every dependency and test dependency, from its ``>=`` bound.

    >>> [p for p in lowest_pins() if p.startswith(("torch", "einops"))]
    ['torch==2.13', 'einops==0.8']
    """
    project = nox.project.load_toml(pyproject)["project"]
    pins = []
    for text in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        req = Requirement(text)
        if req.name == project.get("name", "colofn"):  # an extra of colofn itself (colofn[hf]): exact pins, tested as they are
            continue
        bounds = [s.version for s in req.specifier if s.operator == ">="]
        if len(bounds) != 1:
            raise ValueError(f"pyproject.toml: {text!r} needs one '>=' lower bound for the minimum session")
        pins.append(f"{req.name}=={bounds[0]}")
    return pins


@nox.session(python=TORCH_PYTHONS)
def minimum(session: nox.Session) -> None:
    """The default pytest run with the oldest versions the metadata allows (torch, optree, einops, numpy, hypothesis, pytest)."""
    pins = Path(session.create_tmp()) / "lowest.txt"
    pins.write_text("\n".join(lowest_pins()) + "\n")
    session.install("-c", str(pins), "-e", ".[test]")
    session.run("python", "-c", "from importlib.metadata import version as v; "
                "print(*(f'{p} {v(p)}' for p in ('torch', 'optree', 'einops', 'numpy', 'hypothesis', 'pytest')), sep=', ')")
    session.run("pytest", "-q", *session.posargs)


@nox.session(python=SYNTAX_PYTHONS)
def syntax(session: nox.Session) -> None:
    """Byte-compile every source file on an interpreter that requires-python admits but torch's CPU build does not."""
    session.run("python", "-W", "error", "-m", "compileall", "-q", "-f", "-x", r"/\.", "src", "tests",
                "property_tests", "benchmarks", "noxfile.py", "conftest.py")
