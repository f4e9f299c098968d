"""The metadata of a pipeline message as plain int64s: no pickle, nothing a receiver could run.

A message's metadata is its tree structure (None for gradients) and each
leaf's shape and dtype. It is sent once per input signature, as one int64
tensor::

    [MAGIC, VERSION, n_leaves, (dtype code, ndim, *shape) per leaf, has_tree, tree...]

Dtype codes index the fixed table :data:`DTYPES`. The tree is the JSON data of
:func:`colofn._treecodec.encode_structure` (the registered node types: dict,
list, tuple, None, OrderedDict, defaultdict, NamedTuple, registered
dataclasses) written as tagged integers: ``0`` null, ``1 b`` a bool, ``2 v`` an
int, ``3 n c...`` a string of ``n`` code points, ``4 n ...`` a list, ``5 n
(key value)...`` an object, ``6 bits`` a float (its IEEE-754 bits).

>>> import torch
>>> from colofn import tree as jt
>>> x = {"h": torch.ones(2, 3), "mask": torch.zeros(2, dtype=torch.bool)}
>>> leaves, treedef = jt.flatten(x)
>>> wire = encode((treedef, ((tuple(t.shape), t.dtype) for t in leaves)))
>>> wire.dtype, decode(wire) == (treedef, (((2, 3), torch.float32), ((2,), torch.bool)))
(torch.int64, True)
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import torch

from colofn import _treecodec as codec
from colofn import tree as jt
from colofn.errors import TreeTypeError

__all__ = ["DTYPES", "decode", "encode"]

MAGIC = 0x636F6C6F  # "colo"
VERSION = 1
DTYPES: tuple[torch.dtype, ...] = tuple(
    d
    for d in (
        getattr(torch, name, None)
        for name in (
            "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
            "complex64", "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
            "float8_e4m3fnuz", "float8_e5m2fnuz", "complex32",
        )
    )
    if isinstance(d, torch.dtype)
)
"""Dtype codes: a dtype's index here (a fixed order; new dtypes are only ever appended)."""
_CODE = {d: i for i, d in enumerate(DTYPES)}
_NULL, _BOOL, _INT, _STR, _LIST, _OBJ, _FLOAT = range(7)
_MAX_DEPTH = 200


def encode(meta: tuple[jt.PyTreeSpec | None, Iterable[tuple[tuple[int, ...], torch.dtype]]]) -> torch.Tensor:
    """``meta`` as a 1-D int64 tensor; a ``TreeTypeError`` for a node type or dtype outside the tables."""
    treedef, specs = meta
    out = [MAGIC, VERSION]
    specs = list(specs)
    out.append(len(specs))
    for shape, dtype in specs:
        if dtype not in _CODE:
            raise TreeTypeError(f"Pipeline: an activation of dtype {dtype} cannot be sent between stages (dtypes: {list(DTYPES)})")
        out += [_CODE[dtype], len(shape), *(int(s) for s in shape)]
    if treedef is None:
        out.append(0)
    else:
        try:
            data = codec.encode_structure(treedef)
        except codec.Unencodable as e:
            raise TreeTypeError(f"Pipeline: a stage's output cannot be sent to the next stage: {e}") from None
        out.append(1)
        _ints(data, out)
    return torch.tensor(out, dtype=torch.int64)


def decode(wire: torch.Tensor) -> tuple[jt.PyTreeSpec | None, tuple[tuple[tuple[int, ...], torch.dtype], ...]]:
    """The metadata :func:`encode` wrote; a ``RuntimeError`` when ``wire`` is not such metadata."""
    ints = wire.cpu().tolist()
    try:
        reader = _Reader(ints)
        if reader.take() != MAGIC or reader.take() != VERSION:
            raise ValueError("it does not start with the marker of colofn's pipeline metadata")
        specs = []
        for _ in range(reader.count()):
            code, ndim = reader.take(), reader.count()
            if not 0 <= code < len(DTYPES):
                raise ValueError(f"dtype code {code} is not in the table")
            shape = tuple(reader.dim() for _ in range(ndim))
            specs.append((shape, DTYPES[code]))
        has_tree = reader.take()
        treedef = None
        if has_tree == 1:
            treedef = codec.decode_structure(reader.value(0))
        elif has_tree != 0:
            raise ValueError(f"tree flag {has_tree}")
        if reader.pos != len(ints):
            raise ValueError(f"{len(ints) - reader.pos} trailing ints")
        if treedef is not None and treedef.num_leaves != len(specs):
            raise ValueError(f"a structure of {treedef.num_leaves} leaves for {len(specs)} tensors")
    except (ValueError, IndexError) as e:
        raise RuntimeError(f"Pipeline: the metadata received from the previous stage is malformed ({e})") from None
    return treedef, tuple(specs)


def _ints(x: Any, out: list[int]) -> None:
    if x is None:
        out.append(_NULL)
    elif isinstance(x, bool):
        out += [_BOOL, int(x)]
    elif isinstance(x, int):
        if not -(2**63) <= x < 2**63:
            raise TreeTypeError(f"Pipeline: the int {x} in a tree structure does not fit in int64")
        out += [_INT, x]
    elif isinstance(x, float):
        out += [_FLOAT, struct.unpack("<q", struct.pack("<d", x))[0]]
    elif isinstance(x, str):
        out += [_STR, len(x), *(ord(c) for c in x)]
    elif isinstance(x, list):
        out += [_LIST, len(x)]
        for v in x:
            _ints(v, out)
    elif isinstance(x, dict):
        out += [_OBJ, len(x)]
        for k, v in x.items():
            _ints(k, out)
            _ints(v, out)
    else:  # pragma: no cover - the codec writes JSON data only
        raise TypeError(f"{type(x).__name__} in structure data")


class _Reader:
    def __init__(self, ints: list[int]) -> None:
        self.ints = ints
        self.pos = 0

    def take(self) -> int:
        if self.pos >= len(self.ints):
            raise ValueError("it ends early")
        self.pos += 1
        return self.ints[self.pos - 1]

    def count(self) -> int:
        """A number of items that follow (so at most the ints left)."""
        n = self.take()
        if not 0 <= n <= len(self.ints) - self.pos:
            raise ValueError(f"a count of {n}")
        return n

    def dim(self) -> int:
        n = self.take()
        if n < 0:
            raise ValueError(f"a negative size {n}")
        return n

    def value(self, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise ValueError(f"nested deeper than {_MAX_DEPTH}")
        tag = self.take()
        if tag == _NULL:
            return None
        if tag == _BOOL:
            return bool(self.take())
        if tag == _INT:
            return self.take()
        if tag == _FLOAT:
            return struct.unpack("<d", struct.pack("<q", self.take()))[0]
        if tag == _STR:
            n = self.count()
            try:
                return "".join(chr(self.take()) for _ in range(n))
            except (OverflowError, ValueError) as e:
                raise ValueError(f"a string with a bad code point ({e})") from None
        if tag == _LIST:
            return [self.value(depth + 1) for _ in range(self.count())]
        if tag == _OBJ:
            out = {}
            for _ in range(self.count()):
                key = self.value(depth + 1)
                if not isinstance(key, str):
                    raise ValueError(f"an object key {key!r}")
                out[key] = self.value(depth + 1)
            return out
        raise ValueError(f"tag {tag}")
