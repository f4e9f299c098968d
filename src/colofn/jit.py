"""``jit``: run a function written on global values over sharded DTensors (pjit-style).

``f`` is written as if for one device. ``jit`` lays its arguments out as
DTensors by ``in_shardings``, runs ``f`` on them so that every op propagates
shardings by DTensor's rules (inserting the collectives those rules need),
redistributes in the middle wherever ``f`` calls :func:`with_sharding_constraint`,
and lays the results out by ``out_shardings``. ``compile=True`` runs ``f``
through ``torch.compile``, one compiled variant per input layout.

Decisions (docs/jit.md explains them):

* A plain tensor argument is a *global* value (the same on every rank); it is
  placed with no communication, and its gradient is the full global gradient.
  A DTensor argument keeps its layout unless ``in_shardings`` names another.
* Plain tensors created inside ``f`` (``torch.zeros``, ``torch.arange``, ...) are
  treated as replicated (DTensor's implicit replication), so they must be the
  same on every rank: draw random values from ``colofn.random`` keys, never
  from the global RNG.
* A result left as a pending reduction (``Partial``) by propagation is reduced
  to ``Replicate`` when its ``out_shardings`` entry is None: results are always
  ordinary global values.
* Where DTensor has no sharding rule for an op on its inputs' placements,
  :class:`~colofn.errors.JitError` names the op, the inputs' shardings and the
  line of ``f``, and says how to fix it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, overload

import torch
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.overrides import TorchFunctionMode

from colofn import _jit_cache, _jit_errors, tracing
from colofn import tree as jt
from colofn.errors import MeshError, ShardingError, format_failures
from colofn.mesh import Mesh, current_mesh
from colofn.partition_spec import PartitionSpec, dim_axes
from colofn.sharding import NamedSharding, check_spec, local_block, sharding_of

__all__ = ["Jitted", "jit", "with_sharding_constraint"]

log = logging.getLogger("colofn.jit")
F = TypeVar("F", bound=Callable[..., Any])
_CACHE_LIMIT = 64  # compiled variants kept per jitted function (least recently used dropped)


# ----------------------------------------------------------------------------- public API


@overload
def jit(
    f: F,
    /,
    *,
    in_shardings: Any = None,
    out_shardings: Any = None,
    compile: bool = False,
    static_argnums: int | Sequence[int] = (),
    donate_argnums: int | Sequence[int] = (),
) -> Jitted: ...
@overload
def jit(
    f: None = None,
    /,
    *,
    in_shardings: Any = None,
    out_shardings: Any = None,
    compile: bool = False,
    static_argnums: int | Sequence[int] = (),
    donate_argnums: int | Sequence[int] = (),
) -> Callable[[F], Jitted]: ...


def jit(
    f: Callable[..., Any] | None = None,
    /,
    *,
    in_shardings: Any = None,
    out_shardings: Any = None,
    compile: bool = False,  # noqa: A002 - JAX-style option name
    static_argnums: int | Sequence[int] = (),
    donate_argnums: int | Sequence[int] = (),
) -> Any:
    """Run ``f``, written on global values, with its arguments and results sharded.

    Args:
      f: a function of global values. Ops inside run on DTensors with PyTorch's
        sharding propagation; :func:`with_sharding_constraint` redistributes.
      in_shardings: a pytree prefix of the tuple of non-static positional
        arguments; leaves are ``NamedSharding``, ``P`` (on the ambient mesh,
        ``with mesh:``) or None (keep a DTensor's layout; replicate a plain
        tensor). Keyword arguments are treated as None.
      out_shardings: a pytree prefix of the result, with the same kinds of
        leaves; None keeps what propagation gave (a pending reduction is reduced).
      compile: run ``f`` through ``torch.compile``; one compiled variant per
        input layout (mesh, placements, shapes, dtypes) and static arguments.
      static_argnums: positions of arguments that are not tensors (ints,
        strings, configs): passed through unchanged, part of the compile cache
        key, and must be hashable.
      donate_argnums: positions of arguments the caller will not use again. A
        hint only: it is validated and has no effect (CPU tensors have no
        separate device buffers to reuse).

    Returns:
      A :class:`Jitted` callable (usable as a decorator: ``@jit(in_shardings=...)``).
      Gradients flow back to every argument: a plain tensor gets its full global
      gradient, a DTensor a DTensor with its own layout.

    >>> import colofn, torch
    >>> from colofn import P
    >>> def program():
    ...     with colofn.Mesh((2,), ("tp",)):
    ...         @colofn.jit(in_shardings=(P(), P(None, "tp")), out_shardings=P())
    ...         def mlp(x, w):
    ...             return torch.relu(x @ w).sum(-1)
    ...         y = mlp(torch.ones(2, 3), torch.arange(12.0).reshape(3, 4) - 5)
    ...         return y.placements, y.to_local().tolist()
    >>> colofn.launch(program, world_size=2)[0]
    ((Replicate(),), [9.0, 9.0])
    """
    static = _argnums(static_argnums, "static_argnums")
    donate = _argnums(donate_argnums, "donate_argnums")
    both = sorted(set(static) & set(donate))
    if both:
        raise TypeError(f"jit: arguments {both} are both static and donated; a static argument is not a buffer")
    if not isinstance(compile, bool):
        raise TypeError(f"jit: compile must be a bool, got {type(compile).__name__} {compile!r}")
    _check_sharding_prefix(in_shardings, "in_shardings")
    _check_sharding_prefix(out_shardings, "out_shardings")
    if f is None:
        return lambda g: Jitted(g, in_shardings, out_shardings, compile, static, donate)
    return Jitted(f, in_shardings, out_shardings, compile, static, donate)


class Jitted:
    """A function wrapped by :func:`jit`: call it like the original."""

    def __init__(
        self,
        f: Callable[..., Any],
        in_shardings: Any,
        out_shardings: Any,
        compile: bool,  # noqa: A002
        static_argnums: tuple[int, ...],
        donate_argnums: tuple[int, ...],
    ) -> None:
        if not callable(f):
            raise TypeError(f"jit needs a callable, got {type(f).__name__}")
        self.fun = f
        self.in_shardings = tuple(in_shardings) if isinstance(in_shardings, list) else in_shardings
        self.out_shardings = out_shardings
        self.compile = compile
        self.static_argnums = static_argnums
        self.donate_argnums = donate_argnums
        self._cache: OrderedDict[tuple[Any, ...], Callable[..., Any]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._last = threading.local()  # per rank thread: the last compile key, to explain recompiles
        self._serial = 0
        functools.update_wrapper(self, f)

    def __repr__(self) -> str:
        return f"jit({_name(self.fun)}, compile={self.compile})"

    @property
    def cache_size(self) -> int:
        """How many compiled variants are cached (0 when ``compile=False``)."""
        return len(self._cache)

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        name = _name(self.fun)
        static = _normalize_argnums(self.static_argnums, len(args), name, "static_argnums")
        _normalize_argnums(self.donate_argnums, len(args), name, "donate_argnums")
        for i in static:
            try:
                hash(args[i])
            except TypeError:
                raise TypeError(
                    f"jit of {name!r}: static argument {i} ({type(args[i]).__name__}) is not hashable; "
                    "static arguments key the compile cache: pass a tuple or a frozen dataclass"
                ) from None
        dyn = tuple(a for i, a in enumerate(args) if i not in static)
        mesh = _find_mesh(self.in_shardings, self.out_shardings, (dyn, kwargs))
        if mesh is not None:
            tracing.note_mesh(mesh.device_mesh)  # DTensor's collectives on it are recorded by axis
        where = f"jit of {name!r}"
        placed = _place_tree(dyn, self.in_shardings, mesh, where, "in_shardings", "args")
        kw = _place_tree(kwargs, None, mesh, where, "in_shardings", "kwargs") if kwargs else {}
        it = iter(placed)
        full = tuple(args[i] if i in static else next(it) for i in range(len(args)))
        body = self._compiled(full, kw, static, mesh) if self.compile and not _compiling() else self.fun
        with _inside(mesh):
            try:
                out = body(*full, **kw)
            except Exception as e:
                err = _jit_errors.translate(e, self.fun)
                if err is None:
                    raise
                raise err from None
        return _layout_outputs(out, self.out_shardings, mesh, where)

    # ------------------------------------------------------------------ compile cache
    def _compiled(self, args: tuple[Any, ...], kwargs: dict[str, Any], static: list[int], mesh: Mesh | None) -> Callable[..., Any]:
        key = _jit_cache.cache_key(args, kwargs, static)
        with self._cache_lock:
            fn = self._cache.get(key)
            if fn is not None:
                self._cache.move_to_end(key)
                self._last.key = key
                return fn
            self._serial += 1
            serial = self._serial
        prev = getattr(self._last, "key", None)
        name = _name(self.fun)
        if prev is None:
            log.debug("jit(%s): compiling for %s", name, _jit_cache.describe_key(key))
        else:
            log.debug("jit(%s): recompiling (variant %d): %s", name, serial, _jit_cache.key_diff(prev, key))
        fn = torch.compile(_jit_cache.fresh_entry(self.fun, f"{name}_{serial}"), dynamic=False)
        with self._cache_lock:
            self._cache[key] = fn
            while len(self._cache) > _CACHE_LIMIT:
                self._cache.popitem(last=False)
        self._last.key = key
        return fn


def with_sharding_constraint(x: Any, shardings: Any) -> Any:
    """Lay ``x`` (a pytree) out by ``shardings`` (a pytree prefix of ``x``).

    Inside :func:`jit` this is where a global program says how an intermediate
    value is sharded: DTensors are redistributed (the gradient is redistributed
    back). A ``P`` spec applies to a DTensor's own mesh; on a plain tensor it
    means the ambient mesh. Outside ``jit`` it places plain tensors, like
    :func:`colofn.device_put` but differentiable (their gradient is the full
    global gradient).

    >>> import colofn, torch
    >>> from colofn import P
    >>> def program():
    ...     with colofn.Mesh((2,), ("dp",)):
    ...         x = colofn.with_sharding_constraint(torch.arange(4.0), P("dp"))
    ...         return x.placements, x.to_local().tolist()
    >>> colofn.launch(program, world_size=2)[1]
    ((Shard(dim=0),), [2.0, 3.0])
    """
    if isinstance(x, torch.Tensor) and _is_sharding_leaf(shardings) and shardings is not None:
        return _constrain(x, shardings, "x", "with_sharding_constraint")  # no pytree machinery: dynamo-friendly
    sh = jt.broadcast_prefix(shardings, x, is_leaf=_is_sharding_leaf, prefix_name="shardings", full_name="x")
    pairs, treedef = jt.flatten_with_path(x)
    failures: list[str] = []
    for (path, leaf), s in zip(pairs, sh, strict=True):
        if s is not None:
            failures += _constraint_failures(leaf, s, "x" + jt.keystr(path).replace("<root>", ""))
    if failures:
        raise ShardingError(format_failures("with_sharding_constraint cannot lay out:", failures, fix=_FIX_SPEC))
    out = [leaf if s is None else _constrain(leaf, s, "", "", checked=True) for (_, leaf), s in zip(pairs, sh, strict=True)]
    return jt.unflatten(treedef, out)


# ----------------------------------------------------------------------------- arguments

_FIX_SPEC = (
    "name only mesh axes, each once, in at most as many entries as the tensor has dims, and make "
    "every sharded dim divisible by the product of its axes' sizes"
)


def _name(f: Any) -> str:
    return getattr(f, "__name__", type(f).__name__)


def _is_sharding_leaf(x: Any) -> bool:
    return x is None or isinstance(x, NamedSharding | PartitionSpec)


def _check_sharding_prefix(tree: Any, what: str) -> None:
    bad = [
        f"{what}{jt.keystr(p).replace('<root>', '')}: {type(s).__name__} {s!r:.60}"
        for p, s in jt.leaves_with_path(tree, is_leaf=_is_sharding_leaf)
        if not _is_sharding_leaf(s)
    ]
    if bad:
        raise TypeError(
            format_failures(
                f"jit: every leaf of {what} must be a NamedSharding, a P(...) or None:",
                bad,
                fix="write P('dp', None) for a dim split over 'dp', P() for replicated",
            )
        )


def _argnums(nums: int | Sequence[int], what: str) -> tuple[int, ...]:
    t = (nums,) if isinstance(nums, int) else tuple(nums)
    for n in t:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"jit: {what} must be ints, got {type(n).__name__} {n!r}")
    return t


def _normalize_argnums(nums: tuple[int, ...], n: int, name: str, what: str) -> list[int]:
    out = []
    for i in nums:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise TypeError(f"jit of {name!r}: {what} has {i} but the call passed {n} positional arguments")
        out.append(j)
    return out


def _find_mesh(in_shardings: Any, out_shardings: Any, args: Any) -> Mesh | None:
    """The ambient mesh, else the mesh of a NamedSharding, else of a DTensor argument."""
    m = current_mesh()
    if m is not None:
        return m
    for tree in (in_shardings, out_shardings):
        for s in jt.leaves(tree, is_leaf=_is_sharding_leaf):
            if isinstance(s, NamedSharding):
                return s.mesh
    for x in jt.leaves(args):
        if isinstance(x, DTensor):
            try:
                return Mesh.from_device_mesh(x.device_mesh)
            except MeshError:
                return None
    return None


def _resolve(s: NamedSharding | PartitionSpec, mesh: Mesh | None, where: str) -> NamedSharding:
    if isinstance(s, NamedSharding):
        return s
    if mesh is None:
        raise MeshError(f"{where}: the spec {s} needs a mesh: call inside `with mesh:` or pass a NamedSharding")
    return NamedSharding(mesh, s)


def _targets(
    pairs: list[tuple[Any, Any]], shardings: list[Any], mesh: Mesh | None, where: str, label: str,
    default: Callable[[Any], NamedSharding | None],
) -> tuple[list[NamedSharding | None], list[str]]:
    """The sharding each leaf goes to (``default(x)`` where none is given), and every reason one cannot."""
    failures: list[str] = []
    targets: list[NamedSharding | None] = []
    for (path, x), s in zip(pairs, shardings, strict=True):
        p = label + jt.keystr(path).replace("<root>", "")
        if s is None:
            targets.append(default(x))
            continue
        try:
            ns = _resolve(s, mesh, f"{where}, {p}")
        except (MeshError, ValueError) as e:
            failures.append(str(e))
            targets.append(None)
            continue
        targets.append(ns)
        failures += _fit_failures(x, ns, p)
    return targets, failures


def _place_tree(tree: Any, shardings: Any, mesh: Mesh | None, where: str, sname: str, tname: str) -> Any:
    """Lay a pytree of arguments out; every failure is collected before any communication."""
    sh = jt.broadcast_prefix(shardings, tree, is_leaf=_is_sharding_leaf, prefix_name=sname, full_name=f"the {tname} tuple")
    pairs, treedef = jt.flatten_with_path(tree)
    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    targets, failures = _targets(pairs, sh, mesh, where, tname, lambda x: replicated if _plain(x) else None)
    if failures:
        raise ShardingError(format_failures(f"{where}: {len(failures)} argument(s) do not fit {sname}:", failures, fix=_FIX_SPEC))
    out = [_entry(x) if t is None else _put(_entry(x), t) for (_, x), t in zip(pairs, targets, strict=True)]
    return jt.unflatten(treedef, out)


def _plain(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, DTensor)


def _fit_failures(x: Any, s: NamedSharding, path: str) -> list[str]:
    if not isinstance(x, torch.Tensor):
        return [f"{path}: a {type(x).__name__} ({x!r:.40}) cannot be sharded; make it static or give it None"]
    if isinstance(x, DTensor) and x.device_mesh != s.mesh.device_mesh:
        return [f"{path}: a DTensor on another mesh ({x.device_mesh}) than {s.mesh}"]
    return check_spec(path, s.spec, s.mesh, tuple(x.shape))


class _Place(torch.autograd.Function):
    """A global plain tensor -> a DTensor holding this rank's block; backward: the full gradient."""

    @staticmethod
    def forward(x: torch.Tensor, s: NamedSharding) -> DTensor:  # type: ignore[override]
        return _from_global(x, s)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return (g.full_tensor() if isinstance(g, DTensor) else g), None


def _trivial_replicated(placements: Sequence[Placement], device_mesh: Any) -> tuple[Placement, ...]:
    """``placements`` with a shard along a mesh axis of size 1 written as Replicate (the same layout).

    DTensor treats ``Shard`` on a size-1 axis as real sharding, and its
    backward of a reshape then fails on the resulting strided shards ("KeyError:
    1 ... Sharding propagation failed for aten.view"); the replicated form is
    the same data on every rank and takes the plain rules.
    """
    return tuple(Replicate() if n == 1 and isinstance(p, Shard) else p for p, n in zip(placements, device_mesh.shape, strict=True))


_state = threading.local()  # per rank thread: how many jit bodies are running


def _in_body() -> bool:
    return getattr(_state, "depth", 0) > 0


def _mesh_order(s: NamedSharding) -> NamedSharding:
    """``s`` with each dim's axes listed in mesh order: the layout the body of a jit computes in.

    A spec listing a dim's axes out of mesh order (``P(("b", "a"))`` on mesh
    ``("a", "b")``) is a ``_StridedShard`` DTensor, and DTensor's sharding
    propagation (torch 2.13) gives wrong values on some ops over it (a reshape
    merging a strided dim). So arguments and constraints are laid out in mesh
    order inside the body, and only results (``out_shardings``) take the exact
    order, by a redistribute.
    """
    if all(list(dim_axes(e)) == sorted(dim_axes(e), key=s.mesh.axis_names.index) for e in s.spec):
        return s
    names = s.mesh.axis_names
    return NamedSharding(s.mesh, PartitionSpec(*(tuple(sorted(dim_axes(e), key=names.index)) for e in s.spec)))


def _from_global(x: torch.Tensor, s: NamedSharding) -> DTensor:
    x = x.detach().to(s.mesh.device)
    local = local_block(x, s.spec, s.mesh).contiguous()
    placements = _trivial_replicated(s.to_placements(x.ndim), s.mesh.device_mesh)
    return DTensor.from_local(local, s.mesh.device_mesh, placements, run_check=False, shape=x.shape, stride=x.contiguous().stride())


class _GradAs(torch.autograd.Function):
    """Identity forward; the backward lays the gradient out like the forward input.

    DTensor leaves gradients in whatever layout the backward ops give (a
    pending sum, another shard), so two programs can leave a parameter's
    ``.grad`` in two layouts, and accumulating them then fails ("redistribute
    from S(0) to P(sum) not supported"). Under jit a DTensor argument's
    gradient always has the argument's own layout.
    """

    @staticmethod
    def forward(x: DTensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.mesh, ctx.placements = inputs[0].device_mesh, tuple(inputs[0].placements)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if isinstance(g, DTensor) and (tuple(g.placements) != ctx.placements or g.device_mesh != ctx.mesh):
            g = g.redistribute(ctx.mesh, ctx.placements)
        return g


def _entry(x: Any) -> Any:
    """A DTensor argument as the body sees it: its gradient comes back in its own layout."""
    if not isinstance(x, DTensor):
        return x
    if x.requires_grad and torch.is_grad_enabled():
        x = _GradAs.apply(x)
    trivial = _trivial_replicated(_unstrided(x), x.device_mesh)
    return x if trivial == tuple(x.placements) else _redistribute(x, x.device_mesh, trivial)


def _put(x: Any, s: NamedSharding, *, exact: bool = False) -> Any:
    """``x`` laid out by ``s``; in mesh order (see :func:`_mesh_order`) unless ``exact``."""
    if not exact:
        s = _mesh_order(s)
    if isinstance(x, DTensor):
        placements = _trivial_replicated(s.to_placements(x.ndim), s.mesh.device_mesh)
        return x if tuple(x.placements) == placements else _redistribute(x, s.mesh.device_mesh, placements)
    if not isinstance(x, torch.Tensor):
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _Place.apply(x, s)
    return _from_global(x, s)


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; the backward makes the gradient contiguous.

    DTensor (torch 2.13) fails in the backward of an op whose output was
    redistributed when the gradient arriving there has odd strides (the
    stride-0 gradient of a ``sum``): "view size is not compatible with input
    tensor's size and stride" (tests/test_jit.py pins it). A contiguous
    gradient avoids it.
    """

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g.contiguous()


def _unstrided(x: DTensor) -> tuple[Placement, ...]:
    """A DTensor's placements with any dim split out of mesh order split in mesh order (see :func:`_mesh_order`)."""
    if not any(isinstance(p, _StridedShard) for p in x.placements):
        return tuple(x.placements)
    return _mesh_order(sharding_of(x)).to_placements(x.ndim)


def _redistribute(x: DTensor, device_mesh: Any, placements: Sequence[Placement]) -> DTensor:
    if x.requires_grad and torch.is_grad_enabled():
        x = _ContiguousGrad.apply(x)
    return x.redistribute(device_mesh, tuple(placements))


# ----------------------------------------------------------------------------- with_sharding_constraint


def _target_placements(x: DTensor, s: NamedSharding | PartitionSpec) -> tuple[Any, tuple[Placement, ...]]:
    """(device mesh, placements) that ``s`` means for DTensor ``x`` (a P means ``x``'s own mesh).

    Inside a jit body a dim's axes are taken in mesh order (see :func:`_mesh_order`).
    """
    ns = s if isinstance(s, NamedSharding) else NamedSharding(Mesh.from_device_mesh(x.device_mesh), s)
    if _in_body():
        ns = _mesh_order(ns)
    return ns.mesh.device_mesh, _trivial_replicated(ns.to_placements(x.ndim), ns.mesh.device_mesh)


def _constraint_failures(x: Any, s: NamedSharding | PartitionSpec, path: str) -> list[str]:
    if not isinstance(x, torch.Tensor):
        return [f"{path}: a {type(x).__name__} ({x!r:.40}) cannot be sharded"]
    if isinstance(s, NamedSharding):
        return _fit_failures(x, s, path)
    if isinstance(x, DTensor):
        try:
            m = Mesh.from_device_mesh(x.device_mesh)
        except MeshError as e:
            return [f"{path}: {e}"]
        return check_spec(path, s, m, tuple(x.shape))
    cur = current_mesh()
    if cur is None:
        raise MeshError(
            f"with_sharding_constraint: the spec {s} for the plain tensor {path} needs a mesh: "
            "call it inside `with mesh:` (jit enters its mesh) or pass a NamedSharding"
        )
    return check_spec(path, s, cur, tuple(x.shape))


def _constrain(x: torch.Tensor, s: NamedSharding | PartitionSpec, path: str, what: str, checked: bool = False) -> Any:
    if not checked and not _compiling():
        failures = _constraint_failures(x, s, path)
        if failures:
            raise ShardingError(format_failures(f"{what} cannot lay out:", failures, fix=_FIX_SPEC))
    if isinstance(x, DTensor):
        dm, placements = _target_placements(x, s)
        if tuple(x.placements) == placements and x.device_mesh == dm:
            return x
        return _redistribute(x, dm, placements)
    ns = _resolve(s, current_mesh(), "with_sharding_constraint")
    return _put(x, ns, exact=not _in_body())


# ----------------------------------------------------------------------------- running the body

def _compiling() -> bool:
    """Whether dynamo is tracing this code (then the outer torch.compile covers it).

    Not ``torch.compiler.is_compiling()``: that reads a process-wide flag set
    while any thread compiles, so in a simulated world one rank's compile
    would make the other ranks skip theirs.
    """
    return bool(torch.compiler.is_dynamo_compiling())


_EMBEDDINGS = frozenset({torch.nn.functional.embedding, torch.embedding})


def _mask_partial(p: Placement) -> bool:
    return type(p).__name__ == "_MaskPartial"


class _SettleEmbeddings(TorchFunctionMode):
    """Reduce a vocab-sharded embedding's pending sum right away.

    DTensor's embedding rule leaves its output as a ``_MaskPartial`` whose
    mask is state used up by the first reduction. Consumed twice (an op's
    forward and the same op's saved input in the backward) it fails with a bare
    ``AssertionError``; reduce-scattered along the hidden dim it fails with an
    IndexError (torch 2.13). One all-reduce right after the lookup avoids both.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _EMBEDDINGS and isinstance(out, DTensor) and any(_mask_partial(p) for p in out.placements):
            settled = _redistribute(out, out.device_mesh, [Replicate() if _mask_partial(p) else p for p in out.placements])
            out = _ReduceGrad.apply(settled) if settled.requires_grad and torch.is_grad_enabled() else settled
        return out


class _ReduceGrad(torch.autograd.Function):
    """Identity forward; the backward reduces a pending-sum gradient to Replicate.

    The backward of a redistribute from ``_MaskPartial`` accepts a replicated
    gradient but not a ``Partial(sum)`` one ("Redistribution from one partial
    type (P(sum)) to another (MaskP...) is unsupported").
    """

    @staticmethod
    def forward(x: DTensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if isinstance(g, DTensor) and any(isinstance(p, Partial) for p in g.placements):
            g = g.redistribute(g.device_mesh, [Replicate() if isinstance(p, Partial) else p for p in g.placements])
        return g


@contextmanager
def _inside(mesh: Mesh | None) -> Iterator[None]:
    """Implicit replication of plain tensors (saved and restored, per thread), embeddings settled, the ambient mesh."""
    get = getattr(torch._C, "_get_dtensor_allow_implicit_replication", None)
    set_ = getattr(torch._C, "_set_dtensor_allow_implicit_replication", None)
    prev = get() if get is not None else False
    if set_ is not None:
        set_(True)
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with _SettleEmbeddings():
            if mesh is not None and current_mesh() is not mesh:
                with mesh:
                    yield
            else:
                yield
    finally:
        _state.depth -= 1
        if set_ is not None:
            set_(prev)


def _layout_outputs(out: Any, out_shardings: Any, mesh: Mesh | None, where: str) -> Any:
    sh = jt.broadcast_prefix(out_shardings, out, is_leaf=_is_sharding_leaf, prefix_name="out_shardings", full_name="the result")
    pairs, treedef = jt.flatten_with_path(out)
    targets, failures = _targets(pairs, sh, mesh, where, "result", lambda y: None)
    if failures:
        raise ShardingError(format_failures(f"{where}: the result does not fit out_shardings:", failures, fix=_FIX_SPEC))
    outs = []
    for (_, y), t in zip(pairs, targets, strict=True):
        if t is not None:
            y = _put(y, t, exact=True)
        elif isinstance(y, DTensor) and any(isinstance(p, Partial) for p in y.placements):
            y = _redistribute(y, y.device_mesh, [Replicate() if isinstance(p, Partial) else p for p in y.placements])
        outs.append(y)
    return jt.unflatten(treedef, outs)
