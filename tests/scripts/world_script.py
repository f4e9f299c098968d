"""One SPMD script, three ways to run it, unchanged:

    colofn run --devices 4 tests/scripts/world_script.py      # simulated: 4 threads
    torchrun --standalone --nproc-per-node 4 tests/scripts/world_script.py
    torchrun --nnodes 2 --node-rank {0,1} --nproc-per-node 2 \\
        --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT tests/scripts/world_script.py

Each rank prints one line starting with ``VERDICT``.
"""

import os

import torch
import torch.distributed as dist

import colofn
from colofn import P

# Under torchrun, even ranks ask process_index() before any Mesh, odd ranks build
# the Mesh first: either joins the world (it once answered 0 on every rank).
early = colofn.process_index() if int(os.environ.get("RANK", "0")) % 2 == 0 else None
mesh = colofn.Mesh((2, 2), ("dp", "tp"))  # joins the world (initialize) when needed
r, n = colofn.process_index(), colofn.process_count()
early_ok = early in (None, r)
dp, tp = mesh.axis_index("dp"), mesh.axis_index("tp")

x = torch.arange(32.0).reshape(4, 8)
xs = colofn.device_put({"x": x, "b": torch.ones(8)}, {"x": P("dp", "tp"), "b": P()}, mesh=mesh)
local = xs["x"].to_local()
block_ok = torch.equal(local, x[2 * dp : 2 * dp + 2, 4 * tp : 4 * tp + 4])

t = torch.full((3,), float(r))
dist.all_reduce(t)  # plain torch.distributed over the whole world
allreduce_ok = torch.equal(t, torch.full((3,), float(sum(range(n)))))

row = local.sum(1)
dist.all_reduce(row, group=mesh.axis_group("tp"))  # over one mesh axis
tp_ok = torch.equal(row, x[2 * dp : 2 * dp + 2].sum(1))

back = colofn.gather(xs)
gather_ok = torch.equal(back["x"], x) and torch.equal(back["b"], torch.ones(8))

ok = n == 4 and early_ok and block_ok and allreduce_ok and tp_ok and gather_ok
line = (
    f"VERDICT rank={r} world={n} dp={dp} tp={tp} backend={dist.get_backend()} early_index={early_ok} "
    f"block={block_ok} all_reduce={allreduce_ok} tp_reduce={tp_ok} gather={gather_ok} "
    f"{'OK' if ok else 'FAIL'}\n"
)
# One write per line: print() writes the text and the newline separately, and the
# four torchrun processes share one stdout pipe.
print(line, end="", flush=True)
