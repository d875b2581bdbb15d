"""The k largest entries of each row of a wide matrix (a teacher's logits over its vocabulary), in two levels.

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
