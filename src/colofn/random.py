"""Explicit, JAX-style random keys.

Ranks of a simulated world are threads that share torch's global RNG, so
``torch.manual_seed`` inside a rank means nothing. colofn never uses the global
RNG: every random draw takes a *key*, a small ``int64`` tensor ``[hi, lo]``
holding a 64-bit counter-based state. The same key gives the same numbers on
every rank, in every world and in every run (for a given device type).

>>> k = key(0)
>>> a, b = split(k)
>>> bool((normal(a, (3,)) == normal(a, (3,))).all())
True
>>> bool((normal(a, (3,)) == normal(b, (3,))).all())
False
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["bernoulli", "fold_in", "key", "normal", "randint", "split", "uniform"]

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1

Key = torch.Tensor
Shape = Sequence[int] | torch.Size


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijective 64-bit mixer with good avalanche."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _to_key(state: int) -> Key:
    return torch.tensor([(state >> 32) & _MASK32, state & _MASK32], dtype=torch.int64)


def _state(k: Key) -> int:
    if not isinstance(k, torch.Tensor) or k.shape != (2,) or k.dtype != torch.int64:
        raise TypeError(
            f"Expected a key from colofn.random.key (an int64 tensor of shape (2,)), got "
            f"{type(k).__name__} {getattr(k, 'shape', '')} {getattr(k, 'dtype', '')}".rstrip()
        )
    hi, lo = (int(v) for v in k.tolist())
    return ((hi & _MASK32) << 32) | (lo & _MASK32)


def key(seed: int) -> Key:
    """A key from an integer seed."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"key(seed) takes an int, got {type(seed).__name__} {seed!r}")
    return _to_key(_mix64(seed & _MASK64))


def split(k: Key, num: int = 2) -> tuple[Key, ...]:
    """``num`` new independent keys derived from ``k`` (``k`` itself should not be reused)."""
    if num < 1:
        raise ValueError(f"split(key, num) needs num >= 1, got {num}")
    s = _state(k)
    return tuple(_to_key(_mix64(s ^ _mix64(i + 1))) for i in range(num))


def fold_in(k: Key, data: int) -> Key:
    """A new key from ``k`` and an integer (a step, a rank, a layer index)."""
    return _to_key(_mix64(_state(k) ^ _mix64((int(data) & _MASK64) ^ 0xD1B54A32D192ED03)))


def _generator(k: Key, device: torch.device | str | None) -> torch.Generator:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator(device=dev)
    g.manual_seed(_mix64(_state(k)) & ((1 << 63) - 1))
    return g


def normal(
    k: Key, shape: Shape, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Standard normal samples. Drawn in float32 (or float64) then cast, so every dtype is reproducible."""
    _check_float(dtype, "normal")
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(tuple(shape), generator=_generator(k, device), dtype=draw, device=device).to(dtype)


def uniform(
    k: Key,
    shape: Shape,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    *,
    minval: float = 0.0,
    maxval: float = 1.0,
) -> torch.Tensor:
    """Uniform samples in ``[minval, maxval)`` (also after rounding to a low-precision ``dtype``)."""
    _check_float(dtype, "uniform")
    if not maxval > minval:
        raise ValueError(f"uniform needs minval < maxval, got minval={minval}, maxval={maxval}")
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.rand(tuple(shape), generator=_generator(k, device), dtype=draw, device=device)
    out = (u * (maxval - minval) + minval).to(dtype)
    # Rounding (to bfloat16 say, or of the affine map) can land on maxval itself:
    # clamp to the largest value of dtype below maxval, as JAX does.
    hi = torch.tensor(maxval, dtype=dtype, device=out.device)
    if float(hi) >= maxval:
        hi = torch.nextafter(hi, torch.tensor(-float("inf"), dtype=dtype, device=out.device))
    lo = torch.tensor(minval, dtype=dtype, device=out.device)
    if float(lo) < minval:
        lo = torch.nextafter(lo, torch.tensor(float("inf"), dtype=dtype, device=out.device))
    return out.clamp(lo, hi) if float(lo) <= float(hi) else out


def _check_float(dtype: torch.dtype, what: str) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{what} draws floats; dtype must be a floating dtype, got {dtype}")


def randint(
    k: Key,
    shape: Shape,
    low: int,
    high: int,
    dtype: torch.dtype = torch.int64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Integers in ``[low, high)``."""
    if not high > low:
        raise ValueError(f"randint needs low < high, got low={low}, high={high}")
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point and dtype != torch.bool:
        info = torch.iinfo(dtype)
        if low < info.min or high - 1 > info.max:
            raise ValueError(
                f"randint range [{low}, {high}) does not fit {dtype} ([{info.min}, {info.max}])"
            )
    return torch.randint(low, high, tuple(shape), generator=_generator(k, device), dtype=dtype, device=device)


def bernoulli(
    k: Key, p: float | torch.Tensor, shape: Shape | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Booleans that are True with probability ``p``."""
    p_t = torch.as_tensor(p, dtype=torch.float32, device=device)
    if not bool(((p_t >= 0) & (p_t <= 1)).all()):  # NaN fails too
        raise ValueError(f"bernoulli needs 0 <= p <= 1, got {p}")
    shp = tuple(shape) if shape is not None else tuple(p_t.shape)
    return uniform(k, shp, device=device) < p_t
