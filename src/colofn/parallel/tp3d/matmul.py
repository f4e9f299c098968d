"""The 3D matrix product and the LayerNorm of a ``d_model`` split over the output axis (Bian et al. 2021).

Bian et al. 2021, "Maximizing Parallelism in Distributed Training for Huge
Neural Networks" (arXiv:2105.14450), sec. 3: ``Y = X W`` on a cube of devices
``(i, j, k)``. Each device multiplies one block of ``X`` by one block of ``W``
and the blocks of ``Y`` are summed over the third axis:

* ``X`` ``[m, n]``: rows split over (weight, input), columns (the contraction)
  over output; all-gathered along **input** (rows), so the device has the rows
  of its weight coordinate;
* ``W`` ``[n, l]``: rows over output, columns over input, and each block split
  once more over **weight**; all-gathered along weight;
* ``Y = X W`` is a partial sum over output; reduce-scattered along **output**
  (rows), so ``Y`` ends with rows over (weight, output) and columns over input.

The backward is the transposed communication, by colofn's differentiable
collectives (not hand-written): ``dY`` all-gathered along output, ``dX``
reduce-scattered along input, ``dW`` reduce-scattered along weight.

``Y``'s layout is ``X``'s with input and output swapped, so the next product
swaps them back (``flip=True``), as ColossalAI's ``Linear3D`` swaps its
input and output parallel modes between the two linears of an MLP: the
transformer's pairs (``wq``/``wk``/``wv`` then ``wo``, ``w1`` then ``w2``,
the embedding and the head) leave the residual stream where it was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from colofn.collectives import all_gather, psum, psum_scatter
from colofn.models.gpt._layers import upcast
from colofn.parallel.tp3d.grid import Grid

__all__ = ["matmul", "norm"]


def matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    g: Grid,
    *,
    flip: bool = False,
    w_dim: int = -1,
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul,
    out_dim: int = 0,
) -> torch.Tensor:
    """``op(X, W)`` on the cube, per device: gather ``x`` and ``w``, multiply, reduce-scatter.

    Args:
        x: this rank's block, rows (dim 0) split over (weight, input) and the
            contraction over output (``flip``: rows over (weight, output), the
            contraction over input).
        w: this rank's block of the weight; ``w_dim`` is the dim split over weight.
        g: the grid.
        flip: the second product of a pair (input and output swapped).
        w_dim: the dim of ``w`` split over the weight axis (gathered).
        op: the product of the gathered blocks (``torch.matmul`` or an einsum).
        out_dim: the dim of ``op``'s result that holds ``x``'s rows.

    Returns:
        ``op(X, W)``'s block: rows over (weight, output) (``flip``: (weight, input)).

    >>> import colofn, torch
    >>> from colofn import P, random, shard_map
    >>> g = Grid("i", "w", "o")
    >>> x, w = random.normal(random.key(0), (8, 4)), random.normal(random.key(1), (4, 8))
    >>> def program():
    ...     mesh = colofn.Mesh((2, 2, 2), g)
    ...     f = shard_map(lambda x, w: matmul(x, w, g), mesh=mesh,
    ...                   in_specs=(P(("w", "i"), "o"), P("o", ("i", "w"))), out_specs=P(("w", "o"), "i"))
    ...     return f(x, w).full_tensor()
    >>> torch.allclose(colofn.launch(program, world_size=8)[0], x @ w, atol=1e-6)
    True
    """
    x_axis, y_axis = (g.out, g.inp) if flip else (g.inp, g.out)
    xs = all_gather(x, x_axis, axis_dim=0, tiled=True)
    ws = all_gather(w, g.wt, axis_dim=w_dim, tiled=True)
    return psum_scatter(op(xs, ws), y_axis, scatter_dimension=out_dim, tiled=True)


def norm(params: dict[str, torch.Tensor], x: torch.Tensor, g: Grid, eps: float, d_model: int) -> torch.Tensor:
    """LayerNorm (``scale`` and ``bias``) or RMSNorm (``scale`` only) of ``x`` ``[..., d_model / p_out]``.

    The statistics over ``d_model`` are ``psum``s over the output axis of
    ``[..., 1]`` sums (two for LayerNorm, mean then variance, as
    ``torch.nn.functional.layer_norm`` computes them; one for RMSNorm); ``scale``
    and ``bias`` are this rank's ``d_model / p_out`` slice. Computed in at least
    float32, returned in ``x.dtype``.
    """
    wide = upcast(x)
    if "bias" in params:
        c = wide - psum(wide.sum(-1, keepdim=True), g.out) / d_model
        var = psum((c * c).sum(-1, keepdim=True), g.out) / d_model
        return (c * torch.rsqrt(var + eps)).to(x.dtype) * params["scale"] + params["bias"]
    ms = psum(wide.pow(2).sum(-1, keepdim=True), g.out) / d_model
    return (wide * torch.rsqrt(ms + eps)).to(x.dtype) * params["scale"]
