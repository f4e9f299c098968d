"""Exception types for user mistakes and distributed failures.

User mistakes (bad specs, shapes, meshes, trees, arguments) raise subclasses of
:class:`ValueError` or :class:`TypeError`, before any communication starts, so
that ``except ValueError`` keeps working for code written against plain PyTorch.
Messages collect every failure found, one bullet each, and say how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ColofnError",
    "CollectiveMismatchError",
    "CollectiveTimeoutError",
    "DeadlockError",
    "MeshError",
    "ShapeError",
    "ShardingError",
    "SpecError",
    "TreeError",
    "TreeTypeError",
    "WorldError",
    "format_failures",
]


class ColofnError(Exception):
    """Base class of every error colofn raises on purpose."""


class SpecError(ColofnError, ValueError):
    """A ``PartitionSpec`` that does not fit its mesh or its tensor."""


class MeshError(ColofnError, ValueError):
    """A ``Mesh`` whose shape or axis names do not fit the world."""


class ShapeError(ColofnError, ValueError):
    """A tensor shape that a spec or an operation cannot take."""


class ShardingError(ColofnError, ValueError):
    """A sharding that cannot be applied (non-divisible dims, wrong mesh, ...)."""


class TreeError(ColofnError, ValueError):
    """Two pytrees that should match (or prefix one another) do not."""


class TreeTypeError(ColofnError, TypeError):
    """A pytree leaf of the wrong type (for instance a list where a tensor belongs)."""


class WorldError(ColofnError, ValueError):
    """A world that cannot be started as asked (bad ``world_size``, backend, ...)."""


class DeadlockError(ColofnError, RuntimeError):
    """Ranks wait on each other in a way that can never complete.

    Raised in every rank of a simulated world as soon as the world can prove it
    (every live rank is blocked), and after the timeout on real backends.
    """


class CollectiveMismatchError(ColofnError, RuntimeError):
    """Ranks of one group called different collectives at the same point of the program."""


class CollectiveTimeoutError(ColofnError, TimeoutError):
    """A collective or point-to-point operation did not complete in time."""


def format_failures(header: str, failures: Iterable[str], fix: str | None = None) -> str:
    """Return ``header`` followed by one bullet per failure and an optional fix line.

    >>> print(format_failures("Bad specs:", ["a", "b"], fix="use P()"))
    Bad specs:
      * a
      * b
    Fix: use P()
    """
    lines = [header]
    lines += [f"  * {f}" for f in failures]
    if fix:
        lines.append(f"Fix: {fix}")
    return "\n".join(lines)


class OptimizerError(ColofnError, ValueError):
    """An optimizer hyperparameter out of range (negative ``lr``, ``b1`` outside [0, 1), ...)."""


class OptimizerTypeError(ColofnError, TypeError):
    """An optimizer given the wrong kind of object (another optimizer's state, a bad ``lr``)."""


__all__ += ["OptimizerError", "OptimizerTypeError"]


class ConfigError(ColofnError, ValueError):
    """A model configuration that cannot be built (``n_heads`` not dividing ``d_model``, ...)."""


__all__ += ["ConfigError"]


class DTypeError(ColofnError, TypeError):
    """A tensor of the wrong dtype (float token ids, integer parameters, ...)."""


__all__ += ["DTypeError"]


class ScheduleError(ColofnError, ValueError):
    """A pipeline schedule (or its cost model) that is malformed or breaks a rule.

    Raised by ``colofn.pipeline``: a bad action text, a schedule built for sizes
    it cannot take, or one that :func:`colofn.pipeline.validate` proves incomplete,
    misordered or deadlocking. ``violations`` holds the structured failures
    (``colofn.pipeline.Violation``) when there are any.
    """

    def __init__(self, message: str, violations: tuple = ()) -> None:
        super().__init__(message)
        self.violations = tuple(violations)


__all__.append("ScheduleError")


class JitError(ColofnError, ValueError):
    """``colofn.jit`` cannot run an op on the shardings its inputs have.

    Raised where DTensor has no sharding rule for an op (or its rule fails) on
    the input placements; the message names the op, each input's sharding, the
    line of the user's function, and the fix (a ``with_sharding_constraint``
    before the op, or ``shard_map`` for that part). ``original`` holds
    DTensor's own exception.
    """

    def __init__(self, message: str, original: BaseException | None = None) -> None:
        super().__init__(message)
        self.original = original


class CheckpointError(ColofnError, ValueError):
    """A checkpoint that cannot be loaded as asked: incomplete, corrupt, or not matching ``like``."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint directory at the path given."""


__all__ += ["CheckpointError", "CheckpointNotFoundError", "JitError"]


class CheckpointSaveError(ColofnError, RuntimeError):
    """A checkpoint save that failed on some rank; the target path was left as it was.

    ``failures`` maps each failing rank to its exception (as far as it is known).
    """

    def __init__(self, message: str, failures: dict | None = None) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})


__all__ += ["CheckpointSaveError"]


class CollectiveError(ColofnError, RuntimeError):
    """A collective on a real backend (gloo, NCCL) failed because a peer broke off.

    A peer that raised, died or closed its connections leaves the others with a
    transport error ("Connection closed by peer"); colofn raises this instead,
    with what each rank of the world was last doing (collective, group, call
    number), read from the world's status board.
    """


class RankError(ColofnError, RuntimeError):
    """A rank of a real world failed in a way the launcher can only describe.

    Raised by ``launch(..., backend="gloo")`` when a rank died without a result
    (a signal, ``os._exit``), or raised an exception whose type the launcher
    does not rebuild (only builtin and :mod:`colofn.errors` types are: the
    launcher never unpickles what another process sent). ``rank``,
    ``type_name`` (``"module.QualName"`` of the original exception, or ``None``)
    and ``rank_traceback`` (its text) keep what is known.
    """

    def __init__(self, message: str, rank: int | None = None, type_name: str | None = None, rank_traceback: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.type_name = type_name
        self.rank_traceback = rank_traceback


__all__ += ["CollectiveError", "RankError"]
