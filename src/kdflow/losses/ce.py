"""Next-token cross-entropy on the data (the "hard" targets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ce_targets(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row j's next-token target ``input_ids[j + 1]`` where ``mask[j]`` and ``mask[j + 1]`` are set, −100 (ignored)
    elsewhere, including every last column: [B, L] -> [B, L] long."""
    real = mask != 0
    counted = torch.zeros_like(real)
    counted[:, :-1] = real[:, :-1] & real[:, 1:]
    targets = torch.full_like(input_ids, -100, dtype=torch.long)
    targets[:, :-1] = input_ids[:, 1:].long()
    return torch.where(counted, targets, torch.full_like(targets, -100))


class CELoss(nn.Module):
    """Next-token cross-entropy: position j predicts ``input_ids[j + 1]``.

    Shapes: ``logits`` [B, L, V], ``input_ids`` [B, L], ``mask`` [B, L] (1 = real token) -> scalar.
    A target counts only where ``mask[j]`` and ``mask[j + 1]`` are both set; the mean is over the counted
    targets; 0.0 (with grad) if there are none.
    """

    def forward(self, logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3 or logits.shape[:2] != input_ids.shape or input_ids.shape != mask.shape:
            raise ValueError(
                f"CELoss: expected logits [B, L, V], input_ids and mask [B, L]; got "
                f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(mask.shape)}"
            )
        real = mask != 0
        counted = real[:, :-1] & real[:, 1:]
        if not bool(counted.any()):
            return logits.sum() * 0.0  # exactly 0, still on the student's graph
        # Every row of the flattened view (no copy of the logits): non-counted targets are ignored, which
        # zeroes their gradient without boolean-index copies of vocabulary-sized rows.
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), ce_targets(input_ids, mask).reshape(-1), ignore_index=-100
        )
