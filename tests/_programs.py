"""Rank programs shared by the simulated-world and the real gloo tests.

Every function here is module level (picklable), uses only plain
``torch.distributed`` (plus DeviceMesh, DTensor and functional collectives), and
checks each result exactly against values computed serially from the rank and
the world size. A wrong value raises ``AssertionError`` naming the check, so
``colofn.launch`` re-raises it with the rank named.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- values


def val(rank: int, rows: int = 3, cols: int = 2, salt: int = 0) -> torch.Tensor:
    """A tensor that says who made it: integer-valued floats, so sums are exact."""
    return (
        torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
        + 100.0 * rank
        + 7.0 * salt
    )


def expect(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got, want):
        raise AssertionError(
            f"{name} on rank {dist.get_rank()} of {dist.get_world_size()}: got {got.dtype} "
            f"{tuple(got.shape)} {got.tolist()}, expected {want.dtype} {tuple(want.shape)} {want.tolist()}"
        )


def _supports_avg() -> bool:
    return dist.get_backend() != "gloo"  # gloo has no ReduceOp.AVG


# ----------------------------------------------------------------------------- collectives


def check_all_reduce(r: int, n: int) -> None:
    allv = [val(i) for i in range(n)]
    ops = {
        "sum": (dist.ReduceOp.SUM, sum(allv[1:], allv[0].clone())),
        "max": (dist.ReduceOp.MAX, torch.stack(allv).amax(0)),
        "min": (dist.ReduceOp.MIN, torch.stack(allv).amin(0)),
        "product": (
            dist.ReduceOp.PRODUCT,
            torch.stack([val(i, salt=0) * 0 + (i + 2) for i in range(n)]).prod(0),
        ),
    }
    if _supports_avg():
        ops["avg"] = (dist.ReduceOp.AVG, torch.stack(allv).sum(0) / n)
    for name, (op, want) in ops.items():
        t = val(r) * 0 + (r + 2) if name == "product" else val(r)
        dist.all_reduce(t, op=op)
        expect(f"all_reduce({name})", t, want)
    # int64 and several tensors in one call (coalesced in the backend)
    t = torch.full((4,), r + 1, dtype=torch.int64)
    dist.all_reduce(t)
    expect("all_reduce(int64)", t, torch.full((4,), n * (n + 1) // 2, dtype=torch.int64))
    # async
    t = val(r, salt=1)
    work = dist.all_reduce(t, async_op=True)
    work.wait()
    expect("all_reduce(async)", t, sum((val(i, salt=1) for i in range(n)), torch.zeros(3, 2)))


def check_all_gather(r: int, n: int) -> None:
    outs = [torch.empty(3, 2) for _ in range(n)]
    dist.all_gather(outs, val(r))
    for i in range(n):
        expect(f"all_gather[{i}]", outs[i], val(i))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 2.13 prefers all_gather_single
        out = torch.empty(3 * n, 2)
        dist.all_gather_into_tensor(out, val(r, salt=2))
        expect("all_gather_into_tensor", out, torch.cat([val(i, salt=2) for i in range(n)]))
        if dist.get_backend() != "gloo":  # NCCL (and colofn_sim) also take a stacked output
            out = torch.empty(n, 3, 2)
            dist.all_gather_into_tensor(out, val(r, salt=3))
            expect(
                "all_gather_into_tensor(stacked)",
                out,
                torch.stack([val(i, salt=3) for i in range(n)]),
            )


def check_reduce_scatter(r: int, n: int) -> None:
    inputs = [val(r, salt=j) for j in range(n)]
    out = torch.empty(3, 2)
    dist.reduce_scatter(out, inputs)
    expect("reduce_scatter", out, sum((val(i, salt=r) for i in range(n)), torch.zeros(3, 2)))
    inp = torch.cat([val(r, salt=j) for j in range(n)])
    out = torch.empty(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 2.13 deprecates the name
        dist.reduce_scatter_tensor(out, inp, op=dist.ReduceOp.MAX)
    expect(
        "reduce_scatter_tensor(max)", out, torch.stack([val(i, salt=r) for i in range(n)]).amax(0)
    )


def check_all_to_all(r: int, n: int) -> None:
    outs = [torch.empty(3, 2) for _ in range(n)]
    dist.all_to_all(outs, [val(r, salt=j) for j in range(n)])
    for j in range(n):
        expect(f"all_to_all[{j}]", outs[j], val(j, salt=r))
    # even split
    out = torch.empty(3 * n, 2)
    dist.all_to_all_single(out, torch.cat([val(r, salt=j) for j in range(n)]))
    expect("all_to_all_single(even)", out, torch.cat([val(j, salt=r) for j in range(n)]))

    # uneven split sizes: rank i sends rows(i, j) rows to rank j
    def rows(i: int, j: int) -> int:
        return (i + 2 * j) % 3 + (i == j)  # some zero-row pieces too

    inp = torch.cat([val(r, rows(r, j), 2, salt=j) for j in range(n)])
    want = torch.cat([val(j, rows(j, r), 2, salt=r) for j in range(n)])
    out = torch.empty(want.shape)
    dist.all_to_all_single(
        out,
        inp,
        output_split_sizes=[rows(j, r) for j in range(n)],
        input_split_sizes=[rows(r, j) for j in range(n)],
    )
    expect("all_to_all_single(uneven)", out, want)


def check_rooted(r: int, n: int) -> None:
    for root in range(n):
        t = val(r, salt=root)
        dist.broadcast(t, src=root)
        expect(f"broadcast(src={root})", t, val(root, salt=root))
    for root in range(n):
        t = val(r, salt=root)
        dist.reduce(t, dst=root)
        if r == root:
            expect(
                f"reduce(dst={root})",
                t,
                sum((val(i, salt=root) for i in range(n)), torch.zeros(3, 2)),
            )
    for root in range(n):
        gl = [torch.empty(3, 2) for _ in range(n)] if r == root else None
        dist.gather(val(r, salt=root), gather_list=gl, dst=root)
        if gl is not None:
            for i in range(n):
                expect(f"gather(dst={root})[{i}]", gl[i], val(i, salt=root))
    for root in range(n):
        out = torch.empty(3, 2)
        sl = [val(root, salt=10 + j) for j in range(n)] if r == root else None
        dist.scatter(out, scatter_list=sl, src=root)
        expect(f"scatter(src={root})", out, val(root, salt=10 + r))
    dist.barrier()


def check_p2p(r: int, n: int) -> None:
    if n == 1:
        return
    nxt, prv = (r + 1) % n, (r - 1) % n
    # blocking ring: evens send first, odds receive first (no cycle of waiting sends)
    buf = torch.empty(3, 2)
    if r % 2 == 0:
        dist.send(val(r, salt=1), dst=nxt)
        dist.recv(buf, src=prv)
    else:
        dist.recv(buf, src=prv)
        dist.send(val(r, salt=1), dst=nxt)
    expect("send/recv ring", buf, val(prv, salt=1))
    # isend/irecv both ways round the ring, with tags
    a, b = torch.empty(3, 2), torch.empty(3, 2)
    works = [
        dist.isend(val(r, salt=2), dst=nxt, tag=2),
        dist.isend(val(r, salt=3), dst=prv, tag=3),
        dist.irecv(a, src=prv, tag=2),
        dist.irecv(b, src=nxt, tag=3),
    ]
    for w in works:
        w.wait()
    expect("isend/irecv forward", a, val(prv, salt=2))
    expect("isend/irecv backward", b, val(nxt, salt=3))
    # batch_isend_irecv
    c = torch.empty(3, 2)
    ops = [dist.P2POp(dist.isend, val(r, salt=4), nxt), dist.P2POp(dist.irecv, c, prv)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    expect("batch_isend_irecv ring", c, val(prv, salt=4))


def check_subgroups(r: int, n: int) -> None:
    evens, odds = list(range(0, n, 2)), list(range(1, n, 2))
    g_even = dist.new_group(evens)
    g_odd = dist.new_group(odds) if odds else None
    mine, group = (evens, g_even) if r % 2 == 0 else (odds, g_odd)
    t = val(r)
    dist.all_reduce(t, group=group)
    expect("new_group all_reduce", t, sum((val(i) for i in mine), torch.zeros(3, 2)))
    assert dist.get_world_size(group) == len(mine) and dist.get_rank(group) == mine.index(r)
    # broadcast inside the group from its last member (group_src is the group rank)
    t = val(r, salt=5)
    dist.broadcast(t, src=mine[-1], group=group)
    expect("new_group broadcast", t, val(mine[-1], salt=5))
    # a group of one rank
    g0 = dist.new_group([0])
    if r == 0:
        t = val(0, salt=6)
        dist.all_reduce(t, group=g0)
        expect("group of one", t, val(0, salt=6))

    # DeviceMesh dims
    from torch.distributed.device_mesh import init_device_mesh

    a = 2 if n % 2 == 0 else 1
    mesh = init_device_mesh("cpu", (a, n // a), mesh_dim_names=("a", "b"))
    ca, cb = divmod(r, n // a)
    assert tuple(mesh.get_coordinate()) == (ca, cb), mesh.get_coordinate()
    t = val(r, salt=7)
    dist.all_reduce(t, group=mesh.get_group("a"))
    expect(
        "mesh dim a", t, sum((val(i * (n // a) + cb, salt=7) for i in range(a)), torch.zeros(3, 2))
    )
    t = val(r, salt=8)
    dist.all_reduce(t, group=mesh.get_group("b"))
    expect(
        "mesh dim b",
        t,
        sum((val(ca * (n // a) + j, salt=8) for j in range(n // a)), torch.zeros(3, 2)),
    )
    flat = mesh["a", "b"]._flatten("ab")
    t = val(r, salt=9)
    dist.all_reduce(t, group=flat.get_group())
    expect("flattened mesh", t, sum((val(i, salt=9) for i in range(n)), torch.zeros(3, 2)))


def expected_local(
    x: torch.Tensor, mesh_shape: tuple[int, ...], coords: list[int], placements: list
) -> torch.Tensor:
    """The block DTensor keeps on a rank: torch.chunk along each Shard, in mesh-dim order."""
    from torch.distributed.tensor import Shard

    for size, c, p in zip(mesh_shape, coords, placements, strict=True):
        if isinstance(p, Shard):
            chunks = x.chunk(size, dim=p.dim)
            x = chunks[c] if c < len(chunks) else x.narrow(p.dim, 0, 0)
    return x


def check_dtensor(r: int, n: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (n,))
    x = torch.arange((n + 1) * (2 * n - 1), dtype=torch.float32).reshape(
        n + 1, 2 * n - 1
    )  # uneven both ways
    d = distribute_tensor(x, mesh, [Shard(0)])
    expect("distribute_tensor Shard(0)", d.to_local(), expected_local(x, (n,), [r], [Shard(0)]))
    for dst in ([Shard(1)], [Replicate()], [Shard(0)]):
        d = d.redistribute(mesh, dst)
        expect(f"redistribute to {dst}", d.to_local(), expected_local(x, (n,), [r], dst))
    expect("full_tensor", d.full_tensor(), x)
    y = (d * 2 + 1).sum(0)  # sharding propagation with a pending reduction
    expect("dtensor math", y.full_tensor(), (x * 2 + 1).sum(0))
    if n % 2 == 0 and n > 2:
        mesh2 = init_device_mesh("cpu", (2, n // 2), mesh_dim_names=("p", "q"))
        coords = mesh2.get_coordinate()
        src, dst = [Shard(0), Shard(1)], [Shard(1), Shard(0)]
        d2 = distribute_tensor(x, mesh2, src)
        expect("2d distribute", d2.to_local(), expected_local(x, (2, n // 2), coords, src))
        d2 = d2.redistribute(mesh2, dst)
        expect("2d redistribute", d2.to_local(), expected_local(x, (2, n // 2), coords, dst))
        expect("2d full_tensor", d2.full_tensor(), x)


def check_functional(r: int, n: int) -> None:
    import torch.distributed._functional_collectives as funcol

    group = dist.group.WORLD
    expect(
        "funcol.all_reduce",
        funcol.all_reduce(val(r), "sum", group).wait(),
        sum((val(i) for i in range(n)), torch.zeros(3, 2)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        expect(
            "funcol.all_gather_tensor",
            funcol.all_gather_tensor(val(r, salt=1), 0, group).wait(),
            torch.cat([val(i, salt=1) for i in range(n)]),
        )
        expect(
            "funcol.reduce_scatter_tensor",
            funcol.reduce_scatter_tensor(
                torch.cat([val(r, salt=j) for j in range(n)]), "sum", 0, group
            ).wait(),
            sum((val(i, salt=r) for i in range(n)), torch.zeros(3, 2)),
        )
    expect(
        "funcol.all_to_all_single",
        funcol.all_to_all_single(
            torch.cat([val(r, salt=j) for j in range(n)]), None, None, group
        ).wait(),
        torch.cat([val(j, salt=r) for j in range(n)]),
    )
    expect(
        "funcol.broadcast",
        funcol.broadcast(val(r, salt=4), n - 1, group).wait(),
        val(n - 1, salt=4),
    )


CHECKS: dict[str, Callable[[int, int], None]] = {
    "all_reduce": check_all_reduce,
    "all_gather": check_all_gather,
    "reduce_scatter": check_reduce_scatter,
    "all_to_all": check_all_to_all,
    "rooted": check_rooted,
    "p2p": check_p2p,
    "subgroups": check_subgroups,
    "dtensor": check_dtensor,
    "functional": check_functional,
}


def run_checks(names: list[str] | None = None) -> list[str]:
    """Run the named checks (default: all) on this rank; return their names."""
    r, n = dist.get_rank(), dist.get_world_size()
    done = []
    for name in names if names is not None else list(CHECKS):
        CHECKS[name](r, n)
        done.append(name)
    return done


def raise_on_rank(bad_rank: int) -> int:
    """Rank ``bad_rank`` raises a KeyError before the barrier; the others wait in it."""
    if dist.get_rank() == bad_rank:
        raise KeyError(f"boom on {bad_rank}")
    dist.barrier()
    return dist.get_rank()


def world_info() -> tuple[int, int, str]:
    return dist.get_rank(), dist.get_world_size(), dist.get_backend()


# ----------------------------------------------------------------------------- stress


def stress_program(seed: int) -> int:
    """A random but rank-agreed sequence of collectives, a p2p ring and an uneven
    DTensor redistribute; every result checked exactly. Returns the number of checks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    rng = random.Random(seed)  # the same sequence on every rank
    r, n = dist.get_rank(), dist.get_world_size()
    checks = 0
    for _ in range(rng.randint(2, 5)):
        op = rng.choice(
            [
                "all_reduce",
                "all_gather",
                "reduce_scatter",
                "all_to_all",
                "broadcast",
                "uneven_a2a",
                "ring",
            ]
        )
        rows, cols, salt = rng.randint(1, 3), rng.randint(1, 3), rng.randint(0, 9)

        def v(i: int, s: int = salt, rows: int = rows, cols: int = cols) -> torch.Tensor:
            return val(i, rows, cols, s)

        if op == "all_reduce":
            red, fn = rng.choice(
                [
                    (dist.ReduceOp.SUM, "sum"),
                    (dist.ReduceOp.MAX, "amax"),
                    (dist.ReduceOp.MIN, "amin"),
                ]
            )
            t = v(r)
            dist.all_reduce(t, op=red)
            expect(
                f"stress all_reduce {fn}", t, getattr(torch.stack([v(i) for i in range(n)]), fn)(0)
            )
        elif op == "all_gather":
            out = torch.empty(rows * n, cols)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                dist.all_gather_into_tensor(out, v(r))
            expect("stress all_gather", out, torch.cat([v(i) for i in range(n)]))
        elif op == "reduce_scatter":
            out = torch.empty(rows, cols)
            dist.reduce_scatter(out, [v(r, s) for s in range(n)])
            expect("stress reduce_scatter", out, torch.stack([v(i, r) for i in range(n)]).sum(0))
        elif op == "all_to_all":
            outs = [torch.empty(rows, cols) for _ in range(n)]
            dist.all_to_all(outs, [v(r, s) for s in range(n)])
            expect("stress all_to_all", torch.stack(outs), torch.stack([v(j, r) for j in range(n)]))
        elif op == "broadcast":
            root = rng.randrange(n)
            t = v(r)
            dist.broadcast(t, src=root)
            expect("stress broadcast", t, v(root))
        elif op == "uneven_a2a":
            sizes = [[rng.randint(0, 2) for _ in range(n)] for _ in range(n)]  # sizes[src][dst]
            inp = torch.cat([val(r, sizes[r][j], cols, j) for j in range(n)])
            want = torch.cat([val(j, sizes[j][r], cols, r) for j in range(n)])
            out = torch.empty(want.shape)
            dist.all_to_all_single(
                out, inp, [sizes[j][r] for j in range(n)], [sizes[r][j] for j in range(n)]
            )
            expect("stress uneven all_to_all_single", out, want)
        elif op == "ring" and n > 1:
            shift = rng.randint(1, n - 1)
            buf = torch.empty(rows, cols)
            ops = [
                dist.P2POp(dist.isend, v(r), (r + shift) % n),
                dist.P2POp(dist.irecv, buf, (r - shift) % n),
            ]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            expect("stress ring", buf, v((r - shift) % n))
        checks += 1
    # Random sub-groups (every rank creates them in the same order); they also shift the
    # names of the mesh's groups from world to world, which once exposed DTensor cache
    # entries shared across worlds.
    for _ in range(rng.randint(0, 2)):
        members = sorted(rng.sample(range(n), rng.randint(1, n)))
        g = dist.new_group(members)
        if r in members:
            t = val(r, 2, 2, 3)
            dist.all_reduce(t, group=g)
            expect(
                f"stress group {members}", t, torch.stack([val(i, 2, 2, 3) for i in members]).sum(0)
            )
        checks += 1
    # An uneven DTensor redistribute (and a cached sharding propagation) on a random mesh
    divisors = [a for a in range(1, n + 1) if n % a == 0]
    a = rng.choice(divisors)
    shape = (a, n // a)
    mesh = init_device_mesh("cpu", shape)
    rows, cols = rng.randint(1, 2 * n + 1), rng.randint(1, 2 * n + 1)  # mostly uneven
    x = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    choices = [Replicate(), Shard(0), Shard(1)]
    src = [rng.choice(choices) for _ in shape]
    dst = [rng.choice(choices) for _ in shape]
    coords = mesh.get_coordinate()
    d = distribute_tensor(x, mesh, src)
    expect(f"stress distribute {src}", d.to_local(), expected_local(x, shape, coords, src))
    d = (d * 2).redistribute(mesh, dst)
    assert d.device_mesh is mesh, "stress: a DTensor came back on a DeviceMesh of another world"
    expect(
        f"stress redistribute {src}->{dst}", d.to_local(), expected_local(2 * x, shape, coords, dst)
    )
    expect("stress full_tensor", d.full_tensor(), 2 * x)
    return checks + 3


def gloo_suite(seeds: list[int]) -> tuple[list[str], list[int]]:
    """Every check, then a few stress programs, in one world (a gloo world costs seconds)."""
    return run_checks(), [stress_program(s) for s in seeds]
