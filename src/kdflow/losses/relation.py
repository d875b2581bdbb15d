"""Relation-based KD ("relb", RKD) against the teacher embedding cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RelationKDLoss(nn.Module):
    """Relation-based KD (RKD, Park et al. 2019) on per-document embeddings.

    Shapes: ``student_emb`` [N, Ds], ``teacher_emb`` [N, Dt] -> scalar; Ds may differ from Dt (only
    distances and angles within each side are compared).

    * distance term: pairwise Euclidean distance matrices of each side, each divided by its mean
      off-diagonal distance, then smooth-L1 (Huber, β = 1) between them, mean over the off-diagonal
      pairs. N < 2 -> 0.
    * angle term: for every triplet (i, j, k) of distinct documents the cosine of the angle at j, i.e.
      <e_i − e_j, e_k − e_j> / (‖e_i − e_j‖ ‖e_k − e_j‖), compared with smooth-L1, mean over those
      N(N−1)(N−2) triplets. N < 3 -> 0.

    Returns ``distance_weight · distance + angle_weight · angle``; the two unweighted terms of the last
    call are in ``last_terms`` ({"distance": float, "angle": float}) for logging. Both terms are
    invariant to a global scaling, rotation or translation of either side.
    """

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0) -> None:
        super().__init__()
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)
        self.last_terms: dict[str, float] = {"distance": 0.0, "angle": 0.0}

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"

    @staticmethod
    def _distances(emb: torch.Tensor, off_diag: torch.Tensor) -> torch.Tensor:
        """Off-diagonal pairwise distances normalised by their mean: [N, D] -> [N(N−1)]."""
        d = (emb.unsqueeze(0) - emb.unsqueeze(1)).norm(dim=-1)[off_diag]
        # The clamp only matters when every embedding is the same point; the distances are then all 0.
        return d / d.mean().clamp_min(1e-12)

    @staticmethod
    def _angles(emb: torch.Tensor, distinct: torch.Tensor) -> torch.Tensor:
        """Cosines of the angle at j for the distinct triplets (i, j, k): [N, D] -> [N(N−1)(N−2)]."""
        unit = F.normalize(emb.unsqueeze(0) - emb.unsqueeze(1), dim=-1)  # [j, i, D] = (e_i − e_j)/‖·‖
        return torch.bmm(unit, unit.transpose(1, 2))[distinct]  # [j, i, k]

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
        if student_emb.dim() != 2 or teacher_emb.dim() != 2 or student_emb.shape[0] != teacher_emb.shape[0]:
            raise ValueError(
                f"RelationKDLoss: expected student_emb [N, Ds] and teacher_emb [N, Dt]; got "
                f"{tuple(student_emb.shape)}, {tuple(teacher_emb.shape)}"
            )
        n = student_emb.shape[0]
        student = student_emb.float()
        teacher = teacher_emb.detach().float()
        zero = student.sum() * 0.0  # on the student's graph, so backward works for N < 2 too
        distance, angle = zero, zero
        eye = torch.eye(n, dtype=torch.bool, device=student.device)
        if n >= 2:
            off_diag = ~eye
            distance = F.smooth_l1_loss(self._distances(student, off_diag), self._distances(teacher, off_diag))
        if n >= 3:
            # Triplets with i = j or k = j have a zero vector (no angle); i = k is cos 0 = 1 on both sides.
            # Both only dilute the mean, so only distinct triplets count.
            distinct = ~(eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0))  # [j, i, k]
            angle = F.smooth_l1_loss(self._angles(student, distinct), self._angles(teacher, distinct))
        self.last_terms = {"distance": float(distance.detach()), "angle": float(angle.detach())}
        return self.distance_weight * distance + self.angle_weight * angle
