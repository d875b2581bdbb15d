"""Feature-based KD ("fb") against the teacher hidden-state cache."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class FeatureKDLoss(nn.Module):
    """Feature-based KD: student hidden states, projected to the teacher's width, against cached ones.

    Shapes: ``student_hidden`` [B, L, Ds], ``teacher_hidden`` [B, P, Dt], ``positions`` [B, P] (token
    positions of the cached teacher rows, −1 = padding) -> scalar. The student row at each valid
    position goes through the learned ``projector`` (Ds -> Dt, no bias) and is compared with the teacher
    row: ``kind="mse"`` is the mean squared error over all elements of the valid rows, ``kind="cosine"``
    is 1 − cosine similarity averaged over the valid rows. 0.0 (with grad) if no row is valid.
    """

    def __init__(self, student_dim: int, teacher_dim: int, kind: Literal["mse", "cosine"] = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"FeatureKDLoss: kind must be mse or cosine, got {kind!r}")
        self.kind = kind
        self.projector = nn.Linear(student_dim, teacher_dim, bias=False)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"

    def forward(
        self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        b, l, _ = student_hidden.shape
        if teacher_hidden.shape[:2] != positions.shape or positions.shape[0] != b:
            raise ValueError(
                f"FeatureKDLoss: expected student_hidden [B, L, Ds], teacher_hidden [B, P, Dt], "
                f"positions [B, P]; got {tuple(student_hidden.shape)}, "
                f"{tuple(teacher_hidden.shape)}, {tuple(positions.shape)}"
            )
        valid = positions >= 0
        pos = positions[valid].long()
        if pos.numel() and int(pos.max()) >= l:
            # A cached position beyond the student's sequence means the two were tokenised or truncated
            # differently: the pairing would be wrong, so refuse rather than drop rows silently.
            raise ValueError(
                f"FeatureKDLoss: cached position {int(pos.max())} is beyond the student's sequence length {l}"
            )
        batch = torch.arange(b, device=positions.device).unsqueeze(1).expand_as(positions)[valid]
        # F.linear with an fp32 copy of the weight keeps the math in fp32 even if the module was cast down.
        student = F.linear(student_hidden[batch, pos].float(), self.projector.weight.float())  # [N, Dt]
        teacher = teacher_hidden[valid].detach().float()
        if student.shape[0] == 0:
            return student.sum()  # exactly 0, still on the student's and the projector's graph
        if self.kind == "mse":
            return F.mse_loss(student, teacher)
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
