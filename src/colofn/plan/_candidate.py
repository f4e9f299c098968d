"""A candidate: one way to run a model (mesh, sequence parallelism, ZeRO, pipeline, recompute).

>>> c = Candidate(mesh=(("dp", 4), ("tp", 2)), zero=1)
>>> c.size("dp"), c.size("pp"), c.devices, str(c)
(4, 1, 8, 'dp=4,tp=2 zero1')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

__all__ = ["Candidate", "Recompute", "SP"]

SP = Literal["none", "megatron"]
Recompute = Literal["none", "selective", "full"]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A composition of strategies on a mesh.

    Attributes:
        mesh: ``(axis, size)`` pairs, row-major (``pp``, ``dp``, ``tp`` are modelled).
        sp: ``"megatron"``: sequence parallelism over the ``tp`` axis (Korthikanti et al. 2022).
        zero: ZeRO stage 0-3 over ``dp`` (``None``: plain data parallelism, same as 0).
        schedule: pipeline schedule name (used when ``pp > 1``).
        microbatches: microbatches per step (pipeline).
        recompute: activation recomputation: none, selective (attention core) or full.
    """

    mesh: tuple[tuple[str, int], ...]
    sp: SP = "none"
    zero: int | None = None
    schedule: str = "1f1b"
    microbatches: int = 1
    recompute: Recompute = "none"

    def size(self, axis: str) -> int:
        return dict(self.mesh).get(axis, 1)

    @property
    def devices(self) -> int:
        return math.prod(n for _, n in self.mesh)

    @property
    def stage(self) -> int:
        return self.zero or 0

    def __str__(self) -> str:
        parts = [",".join(f"{a}={n}" for a, n in self.mesh)]
        if self.sp != "none":
            parts.append(f"sp={self.sp}")
        if self.zero:
            parts.append(f"zero{self.zero}")
        if self.size("pp") > 1:
            parts.append(f"{self.schedule} m={self.microbatches}")
        if self.recompute != "none":
            parts.append(f"rc={self.recompute}")
        return " ".join(parts)
