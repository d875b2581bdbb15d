"""Work on the rows of a wide matrix (a teacher's logits over its vocabulary) that a logit-cache capture does
once per position, with as few passes over the row as the result allows: the k largest entries
(:func:`block_topk`) and the exponentials (:func:`exp_rows_`).

The k largest entries, in two levels.

``torch.topk`` over a 49k-149k vocabulary is the largest cost of a logit-cache capture after the forward itself
on a CPU (about three quarters of the work on the logits: bench/capture.py). :func:`block_topk` finds the same
entries with one cheap pass: the row is cut into blocks of ``block`` entries, each block's maximum is taken (one
vectorised reduction), and the k largest entries are looked for only in the k blocks of the largest maxima.

Why that is exact: let x_k be the k-th largest value of a row. Every block that holds one of the k largest
entries has a maximum ≥ x_k, and at most k blocks have a maximum ≥ x_k (each holds a distinct entry ≥ x_k), so
the k blocks of the largest maxima hold all k largest entries. The values returned are exactly ``torch.topk``'s;
the ids too, except among entries of equal value at the k-th place, where either choice is a top-k.
"""

from __future__ import annotations

import torch

BLOCK = 128  # entries a block: 49,152 ids -> 384 block maxima, 16 blocks (2,048 entries) searched for k = 16
# Row maxima inside which exp of the raw logits is taken without a shift: exp(64) = 6e27, so the sum of a 2^18-id
# row stays below 2e33 (float32 overflows at 3e38); exp(-32) = 1e-14, so entries 70 nats below the maximum still
# count (float32's smallest normal is exp(-87)), and what is lost below that is under e^-70 of the row's mass.
EXP_RAW = (-32.0, 64.0)


def block_topk(x: torch.Tensor, k: int, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` largest entries of each row of ``x`` [n, V], largest first, as
    ``torch.topk(x, k, -1)`` returns them (module docstring). Falls back to ``torch.topk`` where the blocks
    would not save work (k blocks cover a quarter of the row or more) or ``x`` is on a GPU (its topk is fast)."""
    if x.dim() != 2:
        raise ValueError(f"block_topk: expected a [n, V] matrix, got shape {tuple(x.shape)}")
    n, width = x.shape
    blocks = -(-width // block)
    if k == 0 or x.device.type != "cpu" or 4 * k >= blocks:
        return torch.topk(x, k, dim=-1)
    if width % block:  # pad the last block with -inf (never chosen while a row has k finite entries)
        x = torch.nn.functional.pad(x, (0, blocks * block - width), value=-float("inf"))
    tiles = x.view(n, blocks, block)
    best_blocks = tiles.amax(-1).topk(k, dim=-1).indices  # [n, k]
    candidates = tiles.gather(1, best_blocks.unsqueeze(-1).expand(-1, -1, block))  # [n, k, block]
    values, where = candidates.view(n, k * block).topk(k, dim=-1)
    ids = best_blocks.gather(1, where // block) * block + where % block
    if width % block and bool((ids >= width).any()):  # a row of fewer than k entries above -inf took padding
        return torch.topk(x[:, :width], k, dim=-1)
    return values, ids


def exp_rows_(x: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """exp of every entry of ``x`` [n, V] in place, and the shift s [n, 1] that each row's values carry: x becomes
    exp(x − s). s = 0 where the row's maximum ``row_max`` [n, 1] lies in ``EXP_RAW`` (one pass over the row,
    where a shift by the maximum would cost a second), else the maximum itself (those rows alone are shifted).
    The caller's sums over a row are then e^−s times the true ones, which every log-ratio cancels."""
    lo, hi = EXP_RAW
    outside = (row_max < lo) | (row_max > hi)
    shift = torch.where(outside, row_max, torch.zeros((), dtype=row_max.dtype, device=row_max.device))
    if bool(outside.any()):
        rows = outside.squeeze(-1).nonzero().squeeze(-1)
        x.index_copy_(0, rows, x.index_select(0, rows).sub_(shift.index_select(0, rows)))
    x.exp_()
    return shift
