"""Response-based KD against the teacher's full distribution, run online: :class:`FullKDLoss`.

The reference every logit cache is judged against: the teacher runs on the same batch inside training
(``teacher_logits.source: online``) and its logits over the whole vocabulary are compared with the student's, no
head, no rest bucket, no sampling. At temperature T both sides are ``log_softmax(z / T)`` over the vocabulary;
the divergences are those of :mod:`kdflow.losses.kd` (forward KL = KL(p‖q), reverse KL = KL(q‖p), the generalised
JSD with weight β), exact here at every T. Scaled by T², averaged over the masked positions; 0.0 (with grad) when
the mask is empty. The teacher side gets no gradient; the arithmetic is float32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdflow.losses.kd import _kl  # KL(a‖b) from log-probabilities, 0 · log 0 = 0


class FullKDLoss(nn.Module):
    """``student_logits`` and ``teacher_logits`` [B, L, V] (the same vocabulary), ``mask`` [B, L] -> scalar."""

    def __init__(self, temperature: float = 1.0, divergence: str = "forward_kl", jsd_beta: float = 0.5) -> None:
        super().__init__()
        if divergence not in ("forward_kl", "reverse_kl", "jsd"):
            raise ValueError(f"FullKDLoss: divergence {divergence!r} is none of forward_kl, reverse_kl, jsd")
        if not 0 < jsd_beta < 1:
            raise ValueError(f"FullKDLoss: jsd_beta must be in (0, 1), got {jsd_beta}")
        self.temperature, self.divergence, self.jsd_beta = float(temperature), divergence, float(jsd_beta)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, divergence={self.divergence}"

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape or student_logits.shape[:2] != mask.shape:
            raise ValueError(
                f"FullKDLoss: expected student and teacher logits of one shape [B, L, V] and mask [B, L]; got "
                f"{tuple(student_logits.shape)}, {tuple(teacher_logits.shape)}, {tuple(mask.shape)} (a teacher with "
                "another vocabulary size than the student's cannot be compared over the full vocabulary)"
            )
        keep = mask != 0
        if not bool(keep.any()):
            return student_logits.sum().float() * 0.0
        t = self.temperature
        log_q = torch.log_softmax(student_logits[keep].float() / t, -1)
        log_p = torch.log_softmax(teacher_logits[keep].detach().float() / t, -1)
        if self.divergence == "forward_kl":
            per_row = _kl(log_p, log_q)
        elif self.divergence == "reverse_kl":
            per_row = _kl(log_q, log_p)
        else:
            b = self.jsd_beta
            log_m = torch.logaddexp(log_p + math.log(b), log_q + math.log(1 - b))
            per_row = b * _kl(log_p, log_m) + (1 - b) * _kl(log_q, log_m)
        return per_row.sum() / keep.sum() * t * t
