"""``functionalize``: an ``nn.Module`` as a pure function over a nested-dict parameter pytree.

``torch.func.functional_call`` swaps the given tensors into the module for the
duration of the call and swaps the originals back afterwards. That is a
mutation of the module: two simulated ranks (threads) calling it on one shared
module swap each other's tensors mid-forward. :func:`functionalize` never
touches the module after it returns: each thread calls ``functional_call`` on
its own *skeleton*, a copy of the module whose parameters live on the ``meta``
device (no memory), made once per thread.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from colofn import tree as jt
from colofn.errors import TreeError

__all__ = ["from_state_dict", "functionalize", "to_state_dict", "write_params"]

Params = dict[str, Any]
_INDEX = re.compile(r"\d+")


def from_state_dict(flat: Mapping[str, Any]) -> Params:
    """Dotted names (``model.layers.0.mlp.up_proj.weight``) -> a nested pytree.

    Numbered children ``0..n-1`` become lists; numbered children with gaps (a
    ``Sequential`` whose activation has no parameters) become int dict keys.

    >>> tree = from_state_dict({"layers.0.w": 1, "layers.1.w": 2, "head.b": 3})
    >>> tree
    {'layers': [{'w': 1}, {'w': 2}], 'head': {'b': 3}}
    >>> to_state_dict(tree)
    {'layers.0.w': 1, 'layers.1.w': 2, 'head.b': 3}
    """
    root: dict[str, Any] = {}
    for name, value in flat.items():
        node = root
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TreeError(f"state dict names {name!r} both as a tensor and as a module")
        node[leaf] = value
    return _listify(root)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    out = {k: _listify(v) for k, v in node.items()}
    keys = list(out)
    if keys and all(_INDEX.fullmatch(k) for k in keys) and sorted(map(int, keys)) == list(range(len(keys))):
        return [out[str(i)] for i in range(len(keys))]
    return {int(k) if _INDEX.fullmatch(k) else k: v for k, v in out.items()}  # children 0, 2 (1 has none)


def to_state_dict(params: Any) -> dict[str, Any]:
    """The inverse of :func:`from_state_dict`: ``{dotted name: leaf}`` in tree order."""
    out: dict[str, Any] = {}
    _flatten_into(params, "", out)
    return out


def _flatten_into(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping):
        for k, v in node.items():
            _flatten_into(v, f"{prefix}{k}.", out)
    elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):  # lists, and ZeRO-3's lazily gathered units
        for i, v in enumerate(node):
            _flatten_into(v, f"{prefix}{i}.", out)
    else:
        out[prefix[:-1]] = node


def _skeleton(module: nn.Module, keep: Iterable[torch.Tensor]) -> nn.Module:
    """A deep copy of ``module`` whose parameters (and buffers not in ``keep``) live on ``meta``."""
    kept = {id(t) for t in keep}
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b if id(b) in kept else torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


class _Functional:
    """``apply(params, *args, **kwargs)``: ``module``'s forward with ``params``; thread-safe, never mutates ``module``."""

    def __init__(
        self,
        module: nn.Module,
        *,
        buffers: bool,
        prepare: Callable[[nn.Module], None] | None = None,
        names: Iterable[str] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"functionalize needs a torch.nn.Module, got {type(module).__name__}")
        self.module_name = type(module).__name__
        self.names = list(names) if names is not None else [n for n, _ in module.named_parameters()]
        if buffers:
            self.names += [n for n, _ in module.named_buffers()]
        self.expected = set(self.names)
        # the buffers apply keeps as constants (shared read-only between threads)
        self.constants = {} if buffers else {n: b.detach().clone() for n, b in module.named_buffers()}
        self.template = _skeleton(module, ())
        accessor = torch.nn.utils._named_member_accessor.NamedMemberAccessor(self.template)
        for n, b in self.constants.items():
            accessor.set_tensor(n, b)
        if prepare is not None:
            prepare(self.template)
        self.local = threading.local()
        self.__name__ = f"functionalized {self.module_name}"

    def skeleton(self) -> nn.Module:
        """This thread's copy of the module (parameters on ``meta``)."""
        mine = getattr(self.local, "module", None)
        if mine is None:
            keep = list(self.constants.values())
            memo: dict[int, Any] = {id(t): t for t in keep}
            mine = self.local.module = copy.deepcopy(self.template, memo)
        return mine

    def flat(self, params: Any) -> dict[str, Any]:
        if not isinstance(params, (Mapping, Sequence)) or isinstance(params, (str, bytes)):
            raise TreeError(
                f"apply of a functionalized {self.module_name} takes the params tree functionalize returned, "
                f"got {type(params).__name__}"
            )
        flat = to_state_dict(params)
        if set(flat) != self.expected:
            missing = sorted(self.expected - set(flat))
            extra = sorted(set(flat) - self.expected)
            raise TreeError(
                f"params do not match the parameters of {self.module_name}: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {_paths(missing)}" if missing else "",
                        f"unexpected {_paths(extra)}" if extra else "",
                    )
                    if part
                )
                + " (pass the tree functionalize returned, or one with the same structure)"
            )
        return flat

    def __call__(self, params: Any, /, *args: Any, **kwargs: Any) -> Any:
        flat = self.flat(params)
        versions = {n: b._version for n, b in self.constants.items()}
        out = torch.func.functional_call(self.skeleton(), flat, args, kwargs, tie_weights=True, strict=False)
        changed = [n for n, b in self.constants.items() if b._version != versions[n]]
        if changed:
            raise TreeError(
                f"the forward of {self.module_name} wrote into its buffers {changed}; they are shared by "
                "every caller of apply: call functionalize(module, buffers=True) to pass them in params"
            )
        return out


def _paths(names: list[str], limit: int = 4) -> str:
    shown = [jt.keystr(tuple(int(p) if p.isdigit() else p for p in n.split("."))) for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def functionalize(module: nn.Module, *, buffers: bool = False) -> tuple[Callable[..., Any], Params]:
    """``module`` as ``(apply, params)``: a pure function and a nested-dict parameter pytree.

    ``apply(params, *args, **kwargs)`` runs ``module``'s forward with the
    tensors of ``params`` (via ``torch.func.functional_call``). ``params``
    follows the module tree: ``params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]``
    (numbered children such as ``nn.ModuleList`` entries become lists). Its
    leaves are the module's parameters, detached (they share memory with the
    module until you replace them), and with ``buffers=True`` copies of its
    buffers. Tied parameters appear once, at their first name.

    ``apply`` never mutates ``module``: every thread calls its own copy of the
    module with parameters on the ``meta`` device, so it is safe to call from
    every simulated rank at once, and composes with ``torch.func``,
    :func:`colofn.shard_map`, :mod:`colofn.zero` and pipelines.

    Args:
      module: any ``nn.Module`` (a Hugging Face model included). Its mode
        (``train()``/``eval()``) at this call is the mode ``apply`` runs in.
      buffers: also put the buffers in ``params`` (pass them explicitly, for
        modules whose forward updates them, like batch norm's running stats).
        Without it buffers are constants of ``apply`` (copied once), read-only:
        a forward that writes into one raises.

    Returns:
      ``(apply, params)``. :func:`write_params` writes a pytree back into a module.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> apply, params = functionalize(net)
    >>> jt_shapes = {k: tuple(v.shape) for k, v in params[0].items()}
    >>> jt_shapes
    {'weight': (4, 3), 'bias': (4,)}
    >>> sorted(params)
    [0, 2]
    >>> x = torch.ones(5, 3)
    >>> torch.equal(apply(params, x), net(x))
    True
    >>> grads = torch.func.grad(lambda p: apply(p, x).sum())(params)
    >>> grads[2]["bias"].tolist()
    [5.0, 5.0]
    """
    fn = _Functional(module, buffers=buffers)
    named: dict[str, torch.Tensor] = dict(module.named_parameters())
    if buffers:
        named.update(dict(module.named_buffers()))
    buffer_names = {n for n, _ in module.named_buffers()}
    return fn, from_state_dict({n: named[n].detach().clone() if n in buffer_names else named[n].detach() for n in fn.names})


def write_params(module: nn.Module, params: Any) -> nn.Module:
    """Copy a pytree (as from :func:`functionalize`) into ``module``'s parameters and buffers, in place.

    DTensor leaves are gathered first (``full_tensor()``), so sharded training
    state goes back into an ordinary module for saving (``save_pretrained``) or
    other tools. Returns ``module``.

    >>> from torch import nn
    >>> net = nn.Linear(2, 2)
    >>> _, params = functionalize(net)
    >>> new = {"weight": params["weight"] * 0, "bias": params["bias"] + 1}
    >>> write_params(net, new).weight.abs().sum().item()
    0.0
    """
    from torch.distributed.tensor import DTensor

    flat = to_state_dict(params)
    targets: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    targets.update(dict(module.named_buffers(remove_duplicate=False)))
    unknown = sorted(set(flat) - set(targets))
    if unknown:
        raise TreeError(f"write_params: {type(module).__name__} has no parameter or buffer {_paths(unknown)}")
    with torch.no_grad():
        for name, value in flat.items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            target = targets[name]
            if tuple(value.shape) != tuple(target.shape):
                raise TreeError(
                    f"write_params: {_paths([name])} has shape {tuple(value.shape)} but the module's is "
                    f"{tuple(target.shape)}"
                )
            target.copy_(value)
    return module
