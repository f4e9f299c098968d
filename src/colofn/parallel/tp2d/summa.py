"""SUMMA matrix products on a ``q x q`` grid of two mesh axes, under ``shard_map``.

SUMMA (van de Geijn and Watts 1997, "SUMMA: Scalable Universal Matrix
Multiplication Algorithm") computes ``C = A B`` with every matrix split in
``q x q`` blocks, rank ``(i, j)`` holding ``A_ij``, ``B_ij`` and ``C_ij``:

    C_ij = sum_k A_ik B_kj,  step k: A_ik broadcast along grid row i, B_kj along grid column j.

Optimus (Xu et al. 2021, "An Efficient 2D Method for Training Super-Large Deep
Learning Models", arXiv:2104.05343, sec. 3) runs a transformer's linear layers
this way, and their backward as the transposed products ``dA = dC B^T`` and
``dB = A^T dC``, whose communication is the transpose of the forward's: each
broadcast becomes a reduce to the block's owner.

Here the ``q`` broadcasts of one operand along a grid row are, together, one
``all_gather`` over the ``col`` axis (every rank receives the ``q - 1`` blocks
it lacks: the bytes of the broadcasts), and their ``q`` transposed reduces are
one ``psum_scatter``: colofn's differentiable collectives, so the backward is
the transpose of the forward by construction, not hand-written. Rows of the
activations (tokens) are split over ``row``, columns (features) over ``col``;
a weight ``[k, n]`` has ``k`` over ``row`` and ``n`` over ``col``. Autograd
keeps the gathered panels for the backward (so it sends only the
reduce-scatters); under :func:`~colofn.parallel.tp2d.rematerialize` it keeps
the blocks and gathers them again, as the papers do.

Under Tesseract (2.5D) the same grid is replicated over a depth axis that
splits the batch; a weight's gradient is then also summed over depth (and over
data parallel axes): :func:`weight_panel` marks the block varying there first,
so that sum is of the ``1/q^2`` block, in the gradient buckets.
"""

from __future__ import annotations

import dataclasses

import torch

from colofn._vma import vary_over
from colofn.collectives import all_gather, psum_scatter
from colofn.parallel.plan import Plan
from colofn.parallel.tp2d import remat

__all__ = ["Grid", "matmul", "matmul_nt", "panel", "weight_panel"]


@dataclasses.dataclass(frozen=True)
class Grid:
    """The grid of a 2D / 2.5D plan: its ``row`` and ``col`` axes, ``depth`` (2.5D) and the token axes.

    >>> Grid.of(Plan(dp="dp", tp_mode="2.5d", tp_grid=("r", "c", "z")))
    Grid(row='r', col='c', depth='z', token_axes=('dp', 'r', 'z'))
    """

    row: str
    col: str
    depth: str | None
    token_axes: tuple[str, ...]

    @classmethod
    def of(cls, plan: Plan) -> Grid:
        grid = plan.tp_grid or ()
        return cls(grid[0], grid[1], grid[2] if len(grid) > 2 else None, plan.token_axes)


def panel(x: torch.Tensor, grid: Grid, dim: int = -1) -> torch.Tensor:
    """``X_ij -> X_i*``: the row panel of an activation block (all-gather of ``dim`` over ``col``; backward reduce-scatter)."""
    out = all_gather(x, grid.col, axis_dim=dim, tiled=True)
    remat.register(out, x, grid.col, dim % x.ndim)
    return out


def weight_panel(w: torch.Tensor, grid: Grid, dim: int = 0) -> torch.Tensor:
    """``W_ij -> W_*j``: the column panel of a weight block (all-gather of ``dim`` over ``row``; backward reduce-scatter).

    The block is first marked varying over the token axes it is replicated on
    (data parallel, depth), so its gradient is summed there once, as a block.
    """
    w = vary_over(w, grid.token_axes)
    out = all_gather(w, grid.row, axis_dim=dim, tiled=True)
    remat.register(out, w, grid.row, dim % w.ndim)
    return out


def matmul(x: torch.Tensor, w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``C = X W`` (SUMMA): ``x`` ``[..., k/q]`` (tokens over ``row``), ``w`` ``[k/q, n/q]`` -> ``[..., n/q]``."""
    return panel(x, grid) @ weight_panel(w, grid)


def matmul_nt(x: torch.Tensor, w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``C = X W^T`` (Optimus's ``A B^T``): ``x`` ``[..., k/q]``, ``w`` ``[n/q, k/q]`` (``n`` over ``row``) -> ``[..., n/q]``.

    Each rank multiplies its ``X_ij`` by the gathered ``W_*j^T`` (all of ``n``,
    its ``k`` block), and the partial products are summed over ``col`` and
    scattered by ``n``: one ``all_gather`` over ``row`` and one
    ``psum_scatter`` over ``col`` (backward: the transposes).
    """
    partial = x @ weight_panel(w, grid).T
    return psum_scatter(partial, grid.col, scatter_dimension=-1, tiled=True)
