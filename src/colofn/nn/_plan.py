"""Plans for existing modules as data, and applying them.

A :class:`ModulePlan` says, for a module it never edits:

* ``rules``: ordered ``(regex, spec)`` pairs; a parameter takes the spec of
  the first regex that matches its dotted path in full (``re.fullmatch``),
  and is replicated if none does;
* ``rewrites``: ordered ``(regex, Rewrite)`` pairs; every submodule whose
  dotted path matches gets the forward-side change (column/row parallel
  linears and their collectives, the vocabulary-parallel embedding, local
  head counts, entering and leaving sequence parallelism);
* ``packed``: parameters that pack several blocks along one dim (GPT-2's
  ``c_attn`` holds q, k and v side by side): in colofn's tree they carry that
  dim as ``(blocks, n)``, so a spec can split each block over ``tp``.

The rewrites are applied to each thread's private copy of the module (see
:func:`colofn.nn.functionalize`), never to the user's module.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from colofn import tree as jt
from colofn.collectives import all_gather, axis_index, axis_size, psum, psum_scatter, pvary
from colofn.errors import format_failures
from colofn.mesh import Mesh, get_mesh
from colofn.nn._functionalize import _Functional, from_state_dict, to_state_dict
from colofn.parallel import tp as tp_regions
from colofn.parallel.plan import Plan, PlanError
from colofn.parallel.sp import megatron
from colofn.partition_spec import P, PartitionSpec
from colofn.sharding import device_put

__all__ = ["ModulePlan", "Parallelized", "Rewrite", "parallelize"]

Kind = Literal["row", "vocab_embed", "enter", "enter_input", "split_seq", "gather_seq", "local", "packed", "mha"]


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """A forward-side change for the submodules a plan's regex matches.

    Kinds:
      ``"row"``: a row-parallel ``nn.Linear`` or GPT-2 ``Conv1D`` (its input dim
        split over ``tp``): the partial products are summed over ``tp`` (a
        reduce-scatter into sequence shards under sequence parallelism), then the
        bias is added once. Column-parallel linears need no change: their local
        weight gives the local output.
      ``"vocab_embed"``: an ``nn.Embedding`` split by vocabulary over ``tp``:
        look up the ids this rank holds, zero the rest, sum over ``tp``.
      ``"enter"``: the module's output enters a tensor-parallel region
        (``pvary``; an all-gather of the sequence under sequence parallelism).
      ``"enter_input"``: the same for the module's first input.
      ``"split_seq"`` / ``"gather_seq"``: the module's first input is split
        into sequence shards over ``tp`` / its first output gathered back
        (where the sequence-parallel residual stream begins and ends); with
        ``attrs=("invariant",)`` the gathered output is invariant along ``tp``
        (as a ``psum`` leaves it without sequence parallelism: what follows
        runs the same on every ``tp`` rank), else it varies (what follows is
        still split over ``tp``, as a vocabulary-parallel head).
      ``"local"``: divide the integer attributes ``attrs`` by the ``tp``
        size (head counts and split sizes of attention, a column-parallel
        ``Conv1D``'s ``nf``).
      ``"packed"``: a ``Conv1D`` whose packed weight arrives as ``(in, blocks, n)``:
        flattened back before the product.
      ``"mha"``: an ``nn.MultiheadAttention`` used for self-attention, its packed
        ``in_proj_weight``/``in_proj_bias`` carried as ``(3, embed_dim, ...)`` and
        split over ``tp`` by heads (each rank holds its heads' q, k and v rows),
        ``out_proj`` split by its input dim: runs as a functional computation
        with ``num_heads / tp`` local heads, entering the tensor-parallel region
        before the projections and leaving it after ``out_proj`` (as ``"row"``).

    Attributes:
      kind: one of the kinds above.
      attrs: the attributes ``"local"`` divides; ``("invariant",)`` for ``"gather_seq"``.
      dim: the sequence dim of the activations, which Megatron-SP splits
        (``1`` for ``[batch, seq, ...]``, ``0`` for ``[seq, batch, ...]``).
    """

    kind: Kind
    attrs: tuple[str, ...] = ()
    dim: int = 1


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    """How to run a module under ``dp``/``tp``/sequence parallelism on a mesh: data, applied by :func:`parallelize`.

    Attributes:
      rules: ordered ``(regex over dotted parameter paths, spec)``.
      rewrites: ordered ``(regex over dotted module paths, Rewrite)``.
      packed: ``(regex, dim, blocks)``: matching parameters are carried with
        ``dim`` unflattened into ``(blocks, n)``.
      dp: the batch axis (or axes), or None.
      tp: the tensor-parallel axis, or None.
      sp: Megatron sequence parallelism over ``tp``.
      checks: ``(attribute path on the module, what must divide it)`` pairs, each
        checked against the ``tp`` size (``"config.num_attention_heads"``).
      name: for messages.
    """

    rules: tuple[tuple[str, PartitionSpec], ...] = ()
    rewrites: tuple[tuple[str, Rewrite], ...] = ()
    packed: tuple[tuple[str, int, int], ...] = ()
    dp: str | tuple[str, ...] | None = None
    tp: str | None = None
    sp: bool = False
    checks: tuple[tuple[str, str], ...] = ()
    name: str = "plan"

    @property
    def region(self) -> Plan:
        """The :class:`colofn.parallel.Plan` whose tensor-parallel regions the rewrites use."""
        return Plan(dp=self.dp, tp=self.tp, sp="megatron" if self.sp else "none")

    def spec_for(self, path: str) -> PartitionSpec:
        """The spec of the dotted parameter ``path``: the first rule matching it, else ``P()``.

        >>> plan = ModulePlan(rules=((r".*\\.q_proj\\.weight", P("tp")),))
        >>> plan.spec_for("model.layers.0.self_attn.q_proj.weight"), plan.spec_for("model.norm.weight")
        (P('tp'), P())
        """
        for pattern, spec in self.rules:
            if re.fullmatch(pattern, path):
                return spec
        return P()

    def _packing(self, path: str) -> tuple[int, int] | None:
        for pattern, dim, blocks in self.packed:
            if re.fullmatch(pattern, path):
                return dim, blocks
        return None

    def pack(self, params: Any) -> Any:
        """Module-layout params -> this plan's layout (packed dims unflattened)."""
        flat = to_state_dict(params)
        out = {}
        for name, t in flat.items():
            how = self._packing(name)
            out[name] = t if how is None else t.unflatten(how[0], (how[1], -1))
        return from_state_dict(out)

    def unpack(self, params: Any) -> Any:
        """The inverse of :meth:`pack`: this plan's layout -> the module's (for :func:`colofn.nn.write_params`)."""
        flat = to_state_dict(params)
        out = {}
        for name, t in flat.items():
            how = self._packing(name)
            if how is not None:
                d = how[0] % (t.ndim - 1)
                t = t.flatten(d, d + 1)
            out[name] = t
        return from_state_dict(out)


# ----------------------------------------------------------------------------- per-device pieces


def take_chunk(x: torch.Tensor, axis: str, dim: int = 1) -> torch.Tensor:
    """This rank's block of ``x`` (invariant along ``axis``) split evenly along ``dim`` (backward: a ``psum``)."""
    n = axis_size(axis)
    blocks = pvary(x, axis).unflatten(dim, (n, x.shape[dim] // n))
    return blocks.index_select(dim, axis_index(axis).reshape(1).to(x.device)).squeeze(dim)


def _enter(x: torch.Tensor, plan: ModulePlan, dim: int) -> torch.Tensor:
    if plan.sp and dim != megatron.SEQ_DIM:
        assert plan.tp is not None
        return all_gather(x, plan.tp, axis_dim=dim, tiled=True)
    return tp_regions.enter(x, plan.region)


def _leave(y: torch.Tensor, plan: ModulePlan, dim: int) -> torch.Tensor:
    if plan.sp and dim != megatron.SEQ_DIM:
        assert plan.tp is not None
        return psum_scatter(y, plan.tp, scatter_dimension=dim, tiled=True)
    return tp_regions.leave(y, plan.region)


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D: weight [in, out]


def _product(m: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if _is_conv1d(m):
        return x @ weight
    return F.linear(x, weight)


def _row(plan: ModulePlan, m: Any, dim: int = 1) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = _leave(_product(m, x, m.weight), plan, dim)
        return y if m.bias is None else y + m.bias

    return forward


def _packed(m: Any) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x @ m.weight.flatten(-2)
        return y if m.bias is None else y + m.bias.flatten(-2)

    return forward


def _vocab_embed(plan: ModulePlan, m: Any) -> Callable[..., torch.Tensor]:
    assert plan.tp is not None
    axis = plan.tp

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return psum(tp_regions.embed_partial(m.weight, ids, axis), axis)

    return forward


def _first(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, tuple):
        return (fn(value[0]), *value[1:])
    return fn(value)


def _attention_mask(
    plan: ModulePlan, q: torch.Tensor, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
    is_causal: bool,
) -> tuple[torch.Tensor | None, bool]:
    """``(mask for scaled_dot_product_attention, is_causal)`` as ``F.multi_head_attention_forward`` forms them, for the local heads."""
    if is_causal and key_padding_mask is None:
        return None, True  # torch's hint: the mask is the causal one
    b, h, length, _ = q.shape
    mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                             target_type=q.dtype, check_other=False)
    if mask is None and is_causal:
        mask = torch.full((length, length), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    if mask is not None:
        if mask.dim() == 3:  # [batch * heads, L, S]: this rank's heads
            assert plan.tp is not None
            mask = take_chunk(mask.unflatten(0, (b, -1)), plan.tp, 1)
        else:
            mask = mask.view(1, 1, *mask.shape[-2:])
    if key_padding_mask is not None:
        kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask", other_type=None, other_name="",
                                target_type=q.dtype, check_other=False)
        assert kpm is not None
        kpm = kpm.view(b, 1, 1, -1)
        mask = kpm if mask is None else mask + kpm
    return mask, False


def _mha(plan: ModulePlan, m: Any, dim: int, tp_size: int) -> Callable[..., tuple[torch.Tensor, None]]:
    heads = m.num_heads // tp_size

    def forward(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query:
            raise ValueError("colofn's tensor-parallel nn.MultiheadAttention runs self-attention only (key and value "
                             "are the query, as in nn.TransformerEncoderLayer); cross-attention has no plan")
        if need_weights:
            raise ValueError("colofn's tensor-parallel nn.MultiheadAttention does not return attention weights "
                             "(each rank holds only its heads); call it with need_weights=False")
        if m.training and m.dropout > 0:
            raise ValueError(f"nn.MultiheadAttention(dropout={m.dropout}) in training mode: dropout is not "
                             "reproduced across ranks; set dropout=0.0 (or call model.eval())")
        x = _enter(query, plan, dim)
        if not m.batch_first:
            x = x.transpose(0, 1)  # [batch, seq, embed]
        w, bias = m.in_proj_weight, m.in_proj_bias  # [3, embed / tp, embed], [3, embed / tp]: this rank's heads
        q, k, v = (
            F.linear(x, w[i], None if bias is None else bias[i]).unflatten(-1, (heads, -1)).transpose(1, 2)
            for i in range(3)
        )
        mask, causal = _attention_mask(plan, q, attn_mask, key_padding_mask, is_causal)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal).transpose(1, 2).flatten(2)
        if not m.batch_first:
            o = o.transpose(0, 1)
        y = _leave(F.linear(o, m.out_proj.weight), plan, dim)
        return (y if m.out_proj.bias is None else y + m.out_proj.bias), None

    return forward


def _apply_rewrite(plan: ModulePlan, m: nn.Module, rw: Rewrite, tp_size: int) -> None:
    dim = rw.dim
    if rw.kind == "row":
        m.forward = _row(plan, m, dim)  # type: ignore[method-assign]
    elif rw.kind == "mha":
        m.forward = _mha(plan, m, dim, tp_size)  # type: ignore[method-assign]
    elif rw.kind == "packed":
        m.forward = _packed(m)  # type: ignore[method-assign]
    elif rw.kind == "vocab_embed":
        m.forward = _vocab_embed(plan, m)  # type: ignore[method-assign]
    elif rw.kind == "enter":
        m.register_forward_hook(lambda _m, _i, out: _first(out, lambda t: _enter(t, plan, dim)))
    elif rw.kind == "enter_input":
        m.register_forward_pre_hook(lambda _m, args: (_enter(args[0], plan, dim), *args[1:]))
    elif rw.kind == "split_seq":
        assert plan.tp is not None
        axis = plan.tp

        def split(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (take_chunk(args[0], axis, dim), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: take_chunk(kwargs[key], axis, dim)}

        m.register_forward_pre_hook(split, with_kwargs=True)
    elif rw.kind == "gather_seq":
        assert plan.tp is not None
        axis = plan.tp
        to: Literal["varying", "invariant"] = "invariant" if "invariant" in rw.attrs else "varying"
        m.register_forward_hook(lambda _m, _i, out: _first(out, lambda t: all_gather(t, axis, axis_dim=dim, tiled=True, to=to)))
    elif rw.kind == "local":
        for a in rw.attrs:
            setattr(m, a, getattr(m, a) // tp_size)
    else:  # pragma: no cover - Kind is closed
        raise ValueError(f"unknown rewrite kind {rw.kind!r}")


def _matches(plan: ModulePlan, module: nn.Module) -> list[tuple[str, nn.Module, Rewrite]]:
    out = []
    for name, m in module.named_modules():
        for pattern, rw in plan.rewrites:
            if re.fullmatch(pattern, name):
                out.append((name, m, rw))
    return out


# ----------------------------------------------------------------------------- checks


def _attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _failures(plan: ModulePlan, module: nn.Module, params: Any, mesh_shape: Mapping[str, int]) -> list[str]:
    out: list[str] = []
    axes = ([plan.tp] if plan.tp else []) + ([plan.dp] if isinstance(plan.dp, str) else list(plan.dp or ()))
    for a in axes:
        if a not in mesh_shape:
            out.append(f"axis {a!r} is not a mesh axis; the mesh axes are {tuple(mesh_shape)}")
    if plan.sp and plan.tp is None:
        out.append("sp=True splits the sequence over the tp axis, but tp is None; set tp=...")
    tp = mesh_shape.get(plan.tp, 1) if plan.tp else 1
    for path, what in plan.checks:
        try:
            value = _attr(module, path)
        except AttributeError:
            continue
        if value is not None and value % tp:
            out.append(f"{path}={value} is not divisible by tp={tp}; {what} are split over tp")
    for name, m, rw in _matches(plan, module):
        if rw.kind != "mha":
            continue
        where = name or "the module"
        if not isinstance(m, nn.MultiheadAttention):
            out.append(f"{where} is a {type(m).__name__}: Rewrite('mha') is for nn.MultiheadAttention")
        elif not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            out.append(f"{where}: Rewrite('mha') needs the packed in_proj_weight (kdim = vdim = embed_dim) and no "
                       "add_bias_kv / add_zero_attn")
        elif m.num_heads % tp:
            out.append(f"{where}.num_heads={m.num_heads} is not divisible by tp={tp}; attention heads are split over tp")
    if module.training:  # the first nn.Dropout, else the first nn.MultiheadAttention, with p > 0
        modules = list(module.named_modules())
        dropping = [(n, f"nn.Dropout(p={m.p})") for n, m in modules if isinstance(m, nn.Dropout) and m.p > 0] + [
            (n, f"nn.MultiheadAttention(dropout={m.dropout})")
            for n, m in modules
            if isinstance(m, nn.MultiheadAttention) and m.dropout > 0
        ]
        if dropping:
            name, what = dropping[0]
            out.append(
                f"{name or 'the module'} is {what} in training mode: dropout is not reproduced across ranks; "
                "set the model's dropout probabilities to 0.0 (or call model.eval())"
            )
    flat = to_state_dict(params)
    used = set()
    for name, t in flat.items():
        for i, (pattern, spec) in enumerate(plan.rules):
            if re.fullmatch(pattern, name):
                used.add(i)
                for dim, entry in enumerate(spec):
                    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
                    n = math.prod(mesh_shape.get(a, 1) for a in names)
                    if dim >= t.ndim:
                        out.append(f"{jt.keystr(_path(name))}: spec {spec} has more dims than the shape {tuple(t.shape)}")
                    elif t.shape[dim] % n:
                        out.append(
                            f"{jt.keystr(_path(name))}: dim {dim} of shape {tuple(t.shape)} is not divisible by "
                            f"{n} (spec {spec})"
                        )
                break
    if plan.rules and not used:
        out.append(f"no rule of {plan.name} matches a parameter of {type(module).__name__}: is this the model the plan is for?")
    modules = [n for n, _ in module.named_modules()]
    if plan.rewrites and not any(re.fullmatch(p, n) for p, _ in plan.rewrites for n in modules):
        out.append(f"no rewrite of {plan.name} matches a submodule of {type(module).__name__}")
    return out


def _path(name: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


# ----------------------------------------------------------------------------- parallelize


@dataclasses.dataclass(frozen=True)
class Parallelized:
    """A module under a plan on a mesh (from :func:`parallelize`).

    Attributes:
      apply: the per-device forward ``apply(params, *args, **kwargs)``: call it
        inside ``shard_map`` / ``per_device`` with this rank's blocks of ``params``.
      params: the module's parameters as global tensors, in the plan's layout
        (:meth:`ModulePlan.pack`), detached.
      specs: the spec of every parameter (a pytree like ``params``).
      plan, mesh: what it was built from.
    """

    apply: Callable[..., Any]
    params: Any
    specs: Any
    plan: ModulePlan
    mesh: Mesh

    def shard(self, params: Any | None = None) -> Any:
        """``device_put`` ``params`` (default: :attr:`params`) by :attr:`specs`: DTensors, each rank its blocks."""
        return device_put(self.params if params is None else params, self.specs, mesh=self.mesh)

    def module_params(self, params: Any) -> Any:
        """Global (gathered) params in the module's own layout, for :func:`colofn.nn.write_params`."""
        from colofn.sharding import gather

        return self.plan.unpack(gather(params))


def parallelize(module: nn.Module, plan: ModulePlan, mesh: Mesh | None = None) -> Parallelized:
    """``module`` under ``plan`` on ``mesh``: checked in full (one :class:`~colofn.parallel.PlanError`), never edited.

    >>> import colofn, torch
    >>> from torch import nn
    >>> from colofn import P
    >>> from colofn.nn import ModulePlan, Rewrite, parallelize
    >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    >>> plan = ModulePlan(rules=((r"0\\.weight", P("tp")), (r"0\\.bias", P("tp")), (r"2\\.weight", P(None, "tp"))),
    ...                   rewrites=((r"2", Rewrite("row")),), tp="tp")
    >>> x = torch.randn(3, 4)
    >>> def program():
    ...     par = parallelize(mlp, plan, colofn.Mesh((2,), ("tp",)))
    ...     f = colofn.shard_map(par.apply, mesh=par.mesh, in_specs=(par.specs, P()), out_specs=P())
    ...     return f(par.shard(), x).full_tensor()
    >>> torch.allclose(colofn.launch(program, world_size=2)[0], mlp(x), atol=1e-6)
    True
    """
    m = get_mesh(mesh, "parallelize")
    if not isinstance(plan, ModulePlan):
        raise TypeError(f"parallelize needs a colofn.nn.ModulePlan, got {type(plan).__name__}")
    named = dict(module.named_parameters())
    params = plan.pack(from_state_dict({n: p.detach() for n, p in named.items()}))
    failures = _failures(plan, module, params, m.shape)
    if failures:
        raise PlanError(
            format_failures(f"{plan.name} does not fit {type(module).__name__} on mesh {dict(m.shape)}:", failures)
        )
    tp_size = m.shape[plan.tp] if plan.tp else 1

    def prepare(skeleton: nn.Module) -> None:
        for _, sub, rw in _matches(plan, skeleton):
            _apply_rewrite(plan, sub, rw, tp_size)

    fn = _PlannedFunctional(module, prepare)
    specs = from_state_dict({n: plan.spec_for(n) for n in to_state_dict(params)})
    return Parallelized(apply=fn, params=params, specs=specs, plan=plan, mesh=m)


class _PlannedFunctional(_Functional):
    """A functionalized module whose per-thread copies carry a plan's rewrites."""

    def __init__(self, module: nn.Module, prepare: Callable[[nn.Module], None]) -> None:
        super().__init__(module, buffers=False)
        self._prepare = prepare

    def skeleton(self) -> nn.Module:
        fresh = getattr(self.local, "module", None) is None
        mine = super().skeleton()
        if fresh:
            self._prepare(mine)
        return mine
