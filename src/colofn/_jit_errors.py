"""Errors of ``jit``: DTensor failures turned into :class:`~colofn.errors.JitError`.

DTensor reports an op it cannot shard in several ways (``NotImplementedError``
for an op with no rule, ``RuntimeError`` when a rule fails, assorted errors from
inside its redistributions). :func:`translate` recognises them, reads the op and
its inputs' shardings from the frames that raised, finds the user's line, and
says how to fix it.
"""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import Partial, Placement, Replicate, Shard

from colofn.errors import JitError, format_failures


def chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    c: BaseException | None = e
    while c is not None and c not in out:
        out.append(c)
        c = c.__cause__ or c.__context__
    return out


def _find_schema(chain: list[BaseException]) -> Any:
    """DTensor's ``OpSchema`` of the failing op, read from the frames that raised (None if not found)."""
    try:
        from torch.distributed.tensor._op_schema import OpSchema
    except ImportError:  # pragma: no cover - private module moved
        return None
    for c in chain:
        tb = c.__traceback__
        while tb is not None:
            loc = tb.tb_frame.f_locals
            for name in ("op_schema", "op_info"):
                v = loc.get(name)
                v = getattr(v, "schema", v)
                if isinstance(v, OpSchema):
                    return v
            tb = tb.tb_next
    return None


_SKIP_DIRS = tuple(
    os.path.dirname(f) + os.sep for f in (torch.__file__, functools.__file__) if f
) + (os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def _user_line(e: BaseException) -> str:
    """``file:line, in fn: source`` of the innermost frame outside torch and colofn."""
    found = ""
    for fs in traceback.extract_tb(e.__traceback__):
        if not os.path.abspath(fs.filename).startswith(_SKIP_DIRS) and "contextlib" not in fs.filename:
            found = f"{fs.filename}:{fs.lineno}, in {fs.name}: {(fs.line or '').strip()}"
    return found


def spec_text(placements: Sequence[Placement], names: Sequence[str] | None) -> str:
    names = tuple(names or (f"axis{i}" for i in range(len(placements))))
    by_dim: dict[int, list[str]] = {}
    pending = []
    for n, p in zip(names, placements, strict=False):
        if isinstance(p, Shard):
            by_dim.setdefault(p.dim, []).append(n)
        elif isinstance(p, Partial):
            pending.append(n)
    ndim = max(by_dim) + 1 if by_dim else 0
    entries = [None if d not in by_dim else by_dim[d][0] if len(by_dim[d]) == 1 else tuple(by_dim[d]) for d in range(ndim)]
    text = "P(" + ", ".join(repr(e) for e in entries) + ")"
    if pending:
        text += f" pending sum over {tuple(pending)}"
    return text


def _describe_spec(spec: Any) -> str:
    meta = getattr(spec, "tensor_meta", None)
    shape = f"{str(meta.dtype).replace('torch.', '')}{list(meta.shape)}" if meta is not None else "tensor"
    names = spec.mesh.mesh_dim_names
    mesh = "mesh(" + ", ".join(f"{n}={s}" for n, s in zip(names or (), spec.mesh.shape, strict=False)) + ")"
    return f"{shape} {spec_text(spec.placements, names)} on {mesh}, placements {tuple(spec.placements)}"


def _inputs(schema: Any) -> tuple[list[str], bool]:
    """One line per input of the op, and whether every DTensor input is replicated."""
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    lines: list[str] = []
    replicated = True

    def add(label: str, v: Any) -> None:
        nonlocal replicated
        if isinstance(v, DTensorSpec):
            lines.append(f"{label}: {_describe_spec(v)}")
            replicated &= all(isinstance(p, Replicate) for p in v.placements)
        elif isinstance(v, list | tuple) and any(isinstance(i, DTensorSpec) for i in v):
            for j, i in enumerate(v):
                add(f"{label}[{j}]", i)

    for i, a in enumerate(schema.args_schema):
        add(f"input {i}", a)
    for k, a in schema.kwargs_schema.items():
        add(f"input {k!r}", a)
    return lines, replicated


def _last_line(e: BaseException | None) -> str:
    """The first line of the innermost cause's message."""
    inner = chain(e)[-1] if e is not None else None
    return str(inner).strip().split("\n")[0][:200] if inner is not None else ""


def _fails_on_global_shapes(schema: Any) -> bool:
    """Whether the op fails on plain meta tensors of the global shapes: then the program is wrong, not its sharding."""
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    def meta(a: Any) -> Any:
        if isinstance(a, DTensorSpec) and a.tensor_meta is not None:
            m = a.tensor_meta
            return torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device="meta")
        if isinstance(a, list | tuple):
            return type(a)(meta(i) for i in a)
        return a

    try:
        schema.op(*meta(tuple(schema.args_schema)), **{k: meta(v) for k, v in schema.kwargs_schema.items()})
    except Exception:  # noqa: BLE001 - any failure means the op is wrong on global values too
        return True
    return False


def _name(f: Any) -> str:
    return getattr(f, "__name__", type(f).__name__)


def translate(e: BaseException, f: Callable[..., Any]) -> JitError | None:
    """A :class:`JitError` when DTensor cannot run an op on its inputs' shardings; None for any other error.

    An error raised inside DTensor's dispatch is a sharding problem only if the
    same op runs on plain tensors of the global shapes; otherwise (a shape
    mismatch in the program, say) the original error is the right one.
    """
    causes = chain(e)
    missing = next((c for c in causes if isinstance(c, NotImplementedError) and "does not have a sharding strategy" in str(c)), None)
    dynamic = any(type(c).__name__ in ("DynamicOutputShapeException", "DataDependentOutputException") for c in causes)
    schema = _find_schema(causes)
    if missing is None and not dynamic:
        if schema is None or _fails_on_global_shapes(schema):
            return None
    op = str(schema.op) if schema is not None else str(missing).split()[1]
    lines, replicated = _inputs(schema) if schema is not None else (["(input shardings unknown)"], False)
    name = _name(f)
    if missing is not None:
        head = f"jit of {name!r}: DTensor has no sharding rule for {op}, so it cannot run on DTensors:"
        fix = (
            f"DTensor cannot run {op} on any sharding. Run this part per block with colofn.shard_map "
            "(its body sees plain local tensors), or on global values (x.full_tensor()) if it is small"
        )
    elif dynamic:
        head = (
            f"jit of {name!r}: the output shape of {op} depends on the values of its inputs, so DTensor "
            "cannot propagate a sharding for it:"
        )
        fix = (
            "compute it on global values (for instance torch.unique(x.full_tensor())), or per block "
            "with colofn.shard_map"
        )
    elif "requires redistribution" in _last_line(e):
        head = (
            f"jit of {name!r}: DTensor cannot run {op} on these shardings without moving data, and a "
            f"view never moves data ({_last_line(e)}):"
        )
        fix = (
            "with_sharding_constraint the input just before this reshape/view so that the dims it "
            "merges or splits are not sharded (P() replicates), or reshape by dims that are not sharded"
        )
    else:
        cause = _last_line(e)
        head = (
            f"jit of {name!r}: DTensor failed to run {op} on these shardings ({type(causes[-1]).__name__}: "
            f"{cause}). The op is fine on the global shapes: this combination of shardings hits a "
            "limitation or bug of DTensor's sharding rules:"
        )
        fix = (
            "run this part per block with colofn.shard_map"
            if replicated
            else "with_sharding_constraint the inputs of this op to another layout just before it (P() "
            "replicates), so that DTensor takes another rule, or run this part per block with colofn.shard_map"
        )
    where = _user_line(e)
    failures = lines + ([f"at {where}"] if where else [])
    return JitError(format_failures(head, failures, fix=fix), original=e)
