"""Per-op cost of varying/invariant tracking inside a ``shard_map`` body, against the same op outside.

A body runs ``N`` iterations of ``h = h * 1.0001 + y`` (two torch ops) on a
varying ``[4, 4]`` block ``h``, for three kinds of ``y``; the per-op time is
(body with the loop - empty body) / 2N, best of 7, rank 0 of a simulated world
of 2. The plain row is the same loop on plain tensors, no shard_map::

    python benchmarks/bench_tracking.py

* ``varying``: ``y = h`` (every operand varies alike: the op is only tagged);
* ``argument``: ``y`` is the replicated argument ``w`` itself (the implicit
  ``pvary`` is made once per argument and cached, so later uses only tag);
* ``slice``: ``y = w[0]``, a fresh invariant tensor each time, so every use is
  a new implicit ``pvary`` (an autograd node whose backward is a ``psum``).
"""

from __future__ import annotations

import time

import torch

import colofn
from colofn import P

N = 200


def rank_program() -> dict[str, float]:
    mesh = colofn.Mesh((1,), ("dp",))
    x, w = torch.randn(4, 4), torch.randn(4, 4, requires_grad=True)
    kinds = {"varying": lambda h, w: h, "argument": lambda h, w: w, "slice": lambda h, w: w[0]}

    def loop(y: object) -> object:
        def body(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            h = x
            for _ in range(N):
                h = h * 1.0001 + y(h, w)  # type: ignore[operator]
            return h
        return body

    def best(fn: object) -> float:
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            ts.append(time.perf_counter() - t0)
        return min(ts)

    empty = colofn.shard_map(lambda w, x: x * 1.0, mesh=mesh, in_specs=(P(), P("dp")), out_specs=P("dp"))
    base = best(lambda: empty(w, x))
    out = {"plain": best(lambda: loop(kinds["varying"])(w, x)) / (2 * N) * 1e6}
    for name, y in kinds.items():
        f = colofn.shard_map(loop(y), mesh=mesh, in_specs=(P(), P("dp")), out_specs=P("dp"))
        out[name] = (best(lambda f=f: f(w, x)) - base) / (2 * N) * 1e6
    return out


def main() -> None:
    import os

    r = colofn.launch(rank_program, world_size=1)[0]
    print(f"# tracking overhead per op, simulated world 1, load average {os.getloadavg()[0]:.1f}")
    print("| operand y | µs per op | over plain |")
    print("| --- | ---: | ---: |")
    for name, us in r.items():
        print(f"| {name} | {us:.1f} | {us - r['plain']:+.1f} |")


if __name__ == "__main__":
    main()
