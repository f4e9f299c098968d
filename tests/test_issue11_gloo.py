"""Issue 11 §2-§4 on real processes (gloo, world 4), one launch: what threads of one process might hide.

Axis tuples out of mesh order (``_StridedShard`` DTensors redistributed by gloo
collectives) in ``device_put``, ``shard_map`` (values and gradients) and ``jit``;
an in-place write of varying data rejected by the out_specs check; and
``comm_trace`` recording DTensor's collectives under ``jit``.
"""

from __future__ import annotations

import pytest
import torch

import colofn
from colofn import P
from colofn.sharding import NamedSharding, local_block
from colofn.testing import shard_map_reference

X = torch.arange(16.0, dtype=torch.float64).reshape(8, 2)
SPEC = P(("b", "a"))


def body(v):
    return colofn.psum(torch.tanh(v).sum(0), "a") * (colofn.axis_index(("b", "a")) + 1.0)


def rank_program() -> dict:
    mesh = colofn.Mesh((2, 2), ("a", "b"))
    out = {}
    d = colofn.device_put(X, NamedSharding(mesh, SPEC))
    out["put"] = torch.equal(d.to_local(), local_block(X, SPEC, mesh)) and torch.equal(colofn.gather(d), X)

    x = X.clone().requires_grad_()
    y = colofn.shard_map(body, mesh=mesh, in_specs=SPEC, out_specs=SPEC)(x)
    (gx,) = torch.autograd.grad((colofn.gather(y) * torch.arange(1.0, 9.0, dtype=torch.float64)).sum(), x)
    out["shard_map"] = (colofn.gather(y).detach(), gx)

    g = colofn.jit(lambda v: v.reshape(-1) * 2.0, in_shardings=NamedSharding(mesh, SPEC), out_shardings=NamedSharding(mesh, SPEC))
    with colofn.comm_trace() as records:
        r = g(d)
    out["jit"] = (colofn.sharding_of(r).spec == SPEC, colofn.gather(r),  # the spec: launch returns data, not classes
                 sorted({(rec.op, rec.axes) for rec in records}))

    def written(v):
        buf = torch.zeros(2, dtype=v.dtype)
        buf[0] = v.sum()
        return buf

    try:
        colofn.shard_map(written, mesh=mesh, in_specs=P("a"), out_specs=P())(X)
        out["mutation"] = "accepted"
    except colofn.errors.SpecError as e:
        out["mutation"] = str(e).splitlines()[1]
    return out


@pytest.mark.gloo
def test_issue11_paths_on_gloo_processes():
    results = colofn.launch(rank_program, world_size=4, backend="gloo", timeout=120)
    ref = shard_map_reference(body, mesh_shape={"a": 2, "b": 2}, in_specs=SPEC, out_specs=SPEC)
    x = X.clone().requires_grad_()
    want = ref(x)
    (want_gx,) = torch.autograd.grad((want * torch.arange(1.0, 9.0, dtype=torch.float64)).sum(), x)
    for rank, out in enumerate(results):
        assert out["put"], rank
        torch.testing.assert_close(out["shard_map"], (want.detach(), want_gx))
        same_spec, value, ops = out["jit"]
        assert same_spec and torch.equal(value, X.reshape(-1) * 2.0)
        assert ops and all(axes in {("a",), ("b",)} for _, axes in ops), ops  # DTensor's collectives, by axis
        assert "replicated across mesh axis 'a', but could not infer replication" in out["mutation"]
        assert "written into it in place" in out["mutation"]
