"""The test matrix: ``nox -l`` lists the sessions.

Every session pins the CPU build of torch (an unpinned torch pulls a CUDA build).
"""

import nox

nox.options.sessions = ["unit", "property", "gloo", "doctests", "lint"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"


def _install(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[test]")


@nox.session
def unit(session: nox.Session) -> None:
    """Unit tests on the simulated world (no real processes)."""
    _install(session)
    session.run("pytest", "-q", "tests", "-m", "not gloo", *session.posargs)


@nox.session
def property(session: nox.Session) -> None:
    """Hypothesis equivalence tests; COLOFN_HYPOTHESIS_PROFILE=long for many more examples."""
    _install(session)
    session.run("pytest", "-q", "property_tests", "-m", "not gloo", *session.posargs)


@nox.session
def gloo(session: nox.Session) -> None:
    """Tests that spawn real torch.distributed gloo processes (and torchrun)."""
    _install(session)
    session.run("pytest", "-q", "tests", "property_tests", "-m", "gloo", *session.posargs)


@nox.session
def doctests(session: nox.Session) -> None:
    """The >>> examples in the package and docs/."""
    _install(session)
    session.run("pytest", "-q", "src/colofn", "docs", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy."""
    session.install(TORCH)
    session.install("-e", ".[lint]")
    session.run("ruff", "check", "src", "tests", "property_tests", "benchmarks")
    session.run("mypy")
