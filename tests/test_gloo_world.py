"""The same rank programs as tests/test_sim_world.py, on real gloo processes.

The simulated world claims to behave like torch.distributed on gloo: here the
identical module-level programs (tests/_programs.py) run through
``colofn.launch(..., backend="gloo")``. Each launch costs seconds, so every
check runs in one launch per world size.
"""

from __future__ import annotations

import pytest

import _programs  # a module of tests/ (on sys.path under pytest), shared with the sim tests
import colofn

SEEDS = [1000, 1001, 1002]


@pytest.mark.gloo
@pytest.mark.parametrize("world_size", [2, 4])
def test_every_check_on_gloo(world_size: int) -> None:
    out = colofn.launch(
        _programs.gloo_suite, SEEDS, world_size=world_size, backend="gloo", timeout=60
    )
    assert len(out) == world_size
    for done, counts in out:
        assert done == list(_programs.CHECKS)
        assert len(counts) == len(SEEDS) and min(counts) >= 5
    # the sim world gives the very same answers (the programs check values, not just run)
    sim = colofn.launch(_programs.gloo_suite, SEEDS, world_size=world_size)
    assert sim == out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


@pytest.mark.gloo
def test_gloo_ranks_share_the_cores() -> None:
    """Each rank gets its share of the cores, not one thread per core each (as torchrun's OMP_NUM_THREADS=1)."""
    from colofn._world.procs import rank_threads

    assert colofn.launch(_threads, world_size=2, backend="gloo", timeout=60) == [rank_threads(2)] * 2


@pytest.mark.gloo
def test_rank_exception_on_gloo() -> None:
    with pytest.raises(KeyError) as e:
        colofn.launch(_programs.raise_on_rank, 1, world_size=2, backend="gloo", timeout=30)
    assert e.value.args == ("boom on 1",)
    notes = e.value.__notes__
    assert notes[0] == "(raised on rank 1 of a gloo world of 2)"
    assert notes[1].startswith("Traceback in that rank:\n") and "raise_on_rank" in notes[1]


def test_transport_errors_caused_by_a_peer_are_secondary() -> None:
    # Regression: rank 0, left in a barrier when rank 1 raised, reported gloo's
    # "Read error ...: Connection reset by peer", which hid rank 1's KeyError.
    from colofn._world.procs import _secondary

    for text in (
        "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:54459: Connection reset by peer.",
        "[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234",
        "[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation",
        "Broken pipe",
    ):
        assert _secondary(RuntimeError(text)), text
    assert not _secondary(KeyError("Connection reset by peer"))
    assert not _secondary(RuntimeError("rank 1 exited with code -11 without a result"))
    assert not _secondary(RuntimeError("shape mismatch"))
