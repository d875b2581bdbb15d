"""Response-based KD ("rb") against the teacher top-k cache: :class:`TopKKDLoss`.

The cache (docs/cache_format.md) stores, for each token position j (row j predicts token j+1):
``topk_ids`` [k] (most probable first), ``topk_logprobs`` [k] = the teacher's **full-vocabulary**
log-probabilities at T = 1 (not renormalised over the k), and ``rest_logprob`` = the log of the
teacher mass outside the k ids. Log-probabilities of −10000 mean "zero mass" (the cache's floor);
a −inf teacher value is read as −10000 too.

* Student log-probs at temperature T over the full vocabulary: ``ls = log_softmax(z_s / T)``; gather
  at the teacher's k ids: ``ls_k`` [.., k].
* ``missing_mass="renormalize"``: both sides renormalised over the k ids: teacher
  ``p_t = softmax(topk_logprobs / T)`` over k; student ``q = softmax(ls_k)`` over k (i.e. log_softmax
  of the gathered student logits / T). Divergence over k entries. The mass outside the k is ignored on
  both sides.
* ``missing_mass="rest_bucket"`` (default): k+1 buckets. Teacher: ``[topk_logprobs, rest_logprob]``
  scaled by 1/T and log-softmaxed over the k+1 entries. This is exact at T = 1 (those k+1
  log-probabilities already sum to one; the log-softmax only removes float16 rounding). At T ≠ 1 the
  rest bucket is treated as **one pseudo-token** whose logit is ``rest_logprob``: the true tempered
  mass of the rest would need the teacher's individual logits outside the k, which are not stored, so
  the teacher's rest bucket is an approximation at T ≠ 1 (a student equal to the teacher then has a
  small non-zero loss). Student: its log-probs at T over the k ids plus
  ``log(1 - sum(exp(ls_k)))`` for the rest, computed stably as ``logsumexp`` of the student's scaled
  logits over the ids NOT in the k minus the full logsumexp (the k ids are masked with −inf; ``1 - sum``
  is never computed, it would cancel catastrophically when the rest is small). The student's k+1
  buckets are exact at every T. The student rest is floored at −10000 like the cache: when the k ids
  cover the whole student vocabulary it is empty (log 0) and counts as zero mass.
* Divergences on the resulting distributions p (teacher) and q (student), summed over the buckets:

  - ``forward_kl`` = KL(p‖q) = Σ p (log p − log q) (PyTorch
    ``kl_div(input=log q, target=log p, log_target=True)`` summed over buckets): mass-covering.
  - ``reverse_kl`` = KL(q‖p) = Σ q (log q − log p): mode-seeking.
  - ``jsd`` = β KL(p‖m) + (1−β) KL(q‖m) with m = β p + (1−β) q, β = ``jsd_beta`` in (0, 1) (the
    generalised JSD of Agarwal et al. 2024, "GKD"). β = 0.5 is the symmetric Jensen–Shannon
    divergence, bounded by log 2 per position.

  Terms with zero mass in the first argument count 0 (0 · log 0 = 0), not NaN.
* The divergence is scaled by T² (Hinton et al. 2015: keeps the gradient magnitude independent of T),
  then averaged over the masked positions; 0.0 (with grad) when the mask is empty. The teacher side
  gets no gradient.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from kdflow.cache_format import LOGPROB_FLOOR  # the cache's "zero mass"
from kdflow.losses.ce import CELoss, ce_targets
from kdflow.losses.gathered import gathered_logprobs

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
MissingMass = Literal["renormalize", "rest_bucket"]


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) over the last dim from log-probabilities, with 0 · log 0 = 0. [..., K] -> [...]."""
    a = log_a.exp()
    live = a > 0
    # Where a has no mass log_b may be −inf too (an empty student rest bucket); zeroing the difference
    # there (not the product) keeps both the value and the gradient free of 0 · inf = NaN.
    diff = torch.where(live, log_a - log_b, torch.zeros((), dtype=log_a.dtype, device=log_a.device))
    return (a * diff).sum(-1)


class TopKKDLoss(nn.Module):
    """Response-based KD against the teacher top-k cache; definitions in the module docstring.

    Shapes: ``student_logits`` [B, L, V], ``topk_ids`` [B, L, k] (int), ``topk_logprobs`` [B, L, k],
    ``rest_logprob`` [B, L], ``mask`` [B, L] (1 = the position has a cached teacher row and a student
    logit row) -> scalar. Values at masked-out positions are never read (ids there may be −1, values NaN).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        divergence: Divergence = "forward_kl",
        missing_mass: MissingMass = "rest_bucket",
        jsd_beta: float = 0.5,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"TopKKDLoss: temperature must be > 0, got {temperature}")
        if divergence not in ("forward_kl", "reverse_kl", "jsd"):
            raise ValueError(f"TopKKDLoss: divergence must be forward_kl, reverse_kl or jsd, got {divergence!r}")
        if missing_mass not in ("renormalize", "rest_bucket"):
            raise ValueError(f"TopKKDLoss: missing_mass must be renormalize or rest_bucket, got {missing_mass!r}")
        if divergence == "jsd" and not 0 < jsd_beta < 1:
            # At β = 0 or 1 the mixture equals one side and the JSD is identically 0: no training signal.
            raise ValueError(f"TopKKDLoss: jsd_beta must be in (0, 1), got {jsd_beta}")
        self.temperature = float(temperature)
        self.divergence = divergence
        self.missing_mass = missing_mass
        self.jsd_beta = float(jsd_beta)

    def extra_repr(self) -> str:
        beta = f", jsd_beta={self.jsd_beta}" if self.divergence == "jsd" else ""
        return f"temperature={self.temperature}, divergence={self.divergence}, missing_mass={self.missing_mass}{beta}"

    def bucket_logprobs(
        self,
        student_logits: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_logprobs: torch.Tensor,
        rest_logprob: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p teacher, log q student) over the buckets, fp32: [..., V], [..., k], [..., k], [...] ->
        two [..., k] (renormalize) or [..., k+1] (rest_bucket). ``keep`` [...] (optional) marks the rows that
        count; the others get finite placeholder values whatever the logits hold there."""
        t = self.temperature
        vocab = student_logits.shape[-1]
        lead = topk_ids.shape[:-1]
        k = topk_ids.shape[-1]
        z = student_logits.reshape(-1, vocab).float()
        if t != 1:
            z = z / t
        ids = topk_ids.reshape(-1, k).long()
        teacher_k = topk_logprobs.detach().reshape(-1, k).float().clamp_min(LOGPROB_FLOOR) / t
        if self.missing_mass == "renormalize":
            # Renormalised over the k ids, the student's full-vocabulary normaliser cancels: only z at the k ids
            # matters.
            z_k = z.gather(-1, ids)
            if keep is not None:  # rows that do not count: finite values whatever the logits hold there
                z_k = torch.where(keep.reshape(-1, 1), z_k, torch.zeros((), dtype=z_k.dtype, device=z_k.device))
            log_p, log_q = teacher_k.log_softmax(-1), z_k.log_softmax(-1)
        else:
            ls_k, rest = gathered_logprobs(z, ids, k)
            teacher_rest = rest_logprob.detach().reshape(-1, 1).float().clamp_min(LOGPROB_FLOOR) / t
            log_p = torch.cat([teacher_k, teacher_rest], -1).log_softmax(-1)
            # An empty rest (k ids covering the vocabulary) is log 0; the floor makes it the cache's "zero
            # mass", so a teacher rest that is tiny but not 0 costs ~0, not an infinite KL.
            log_q = torch.cat([ls_k, rest.clamp_min(LOGPROB_FLOOR)], -1)
        return log_p.reshape(*lead, -1), log_q.reshape(*lead, -1)

    def divergence_per_row(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """The chosen divergence of each row, unscaled: [..., K], [..., K] -> [...]."""
        if self.divergence == "forward_kl":
            return _kl(log_p, log_q)
        if self.divergence == "reverse_kl":
            return _kl(log_q, log_p)
        beta = self.jsd_beta
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)

    def _checked(self, student_logits, topk_ids, topk_logprobs, rest_logprob, mask):
        """Shape and id checks; the inputs with harmless values (id 0, value 0) at the rows that do not count."""
        b, l = mask.shape
        if (
            student_logits.dim() != 3
            or student_logits.shape[:2] != (b, l)
            or topk_ids.shape[:2] != (b, l)
            or topk_logprobs.shape != topk_ids.shape
            or rest_logprob.shape != (b, l)
        ):
            raise ValueError(
                f"TopKKDLoss: expected student_logits [B, L, V], topk_ids and topk_logprobs [B, L, k], "
                f"rest_logprob and mask [B, L]; got {tuple(student_logits.shape)}, {tuple(topk_ids.shape)}, "
                f"{tuple(topk_logprobs.shape)}, {tuple(rest_logprob.shape)}, {tuple(mask.shape)}"
            )
        keep = mask != 0
        vocab = student_logits.shape[-1]
        ids = topk_ids[keep]
        if bool(((ids < 0) | (ids >= vocab)).any()):
            raise ValueError(
                f"TopKKDLoss: a teacher top-k id at a masked-in position is outside the student's "
                f"vocabulary [0, {vocab}); is the student using the teacher's tokenizer?"
            )
        # Every row of the (viewed, not copied) logits is used; padding rows get harmless inputs and drop out
        # of the mean, so they never put NaN into the sum or its gradient.
        live = keep.unsqueeze(-1)
        safe_ids = torch.where(live, topk_ids.long(), torch.zeros((), dtype=torch.long, device=topk_ids.device))
        safe_lp = torch.where(live, topk_logprobs.float(), torch.zeros((), device=topk_logprobs.device))
        safe_rest = torch.where(keep, rest_logprob.float(), torch.zeros((), device=rest_logprob.device))
        return keep, safe_ids, safe_lp, safe_rest

    def _reduce(self, log_p: torch.Tensor, log_q: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        per_row = self.divergence_per_row(log_p, log_q)
        per_row = torch.where(keep, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
        return per_row.sum() / keep.sum() * self.temperature**2

    def forward(
        self,
        student_logits: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_logprobs: torch.Tensor,
        rest_logprob: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        keep, ids, lp, rest = self._checked(student_logits, topk_ids, topk_logprobs, rest_logprob, mask)
        if not bool(keep.any()):
            return student_logits.sum().float() * 0.0  # exactly 0, still on the student's graph
        log_p, log_q = self.bucket_logprobs(student_logits, ids, lp, rest, keep)
        return self._reduce(log_p, log_q, keep)

    def forward_with_ce(
        self,
        student_logits: torch.Tensor,
        input_ids: torch.Tensor,
        ce_mask: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_logprobs: torch.Tensor,
        rest_logprob: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CELoss()(student_logits, input_ids, ce_mask), self(student_logits, topk_ids, …, mask))`` with one
        pass over the vocabulary for both at T = 1 with ``rest_bucket`` (the CE target is one more gathered id);
        otherwise the two separate calls."""
        if self.temperature != 1 or self.missing_mass != "rest_bucket":
            return CELoss()(student_logits, input_ids, ce_mask), self(
                student_logits, topk_ids, topk_logprobs, rest_logprob, mask
            )
        keep, ids, lp, rest = self._checked(student_logits, topk_ids, topk_logprobs, rest_logprob, mask)
        targets = ce_targets(input_ids, ce_mask)
        counted = targets >= 0
        k, vocab = ids.shape[-1], student_logits.shape[-1]
        all_ids = torch.cat([ids, targets.clamp_min(0).unsqueeze(-1)], -1).reshape(-1, k + 1)
        picked, student_rest = gathered_logprobs(student_logits.reshape(-1, vocab).float(), all_ids, k)
        flat_counted = counted.reshape(-1)
        ce_rows = torch.where(flat_counted, -picked[:, k], torch.zeros((), dtype=picked.dtype, device=picked.device))
        ce = ce_rows.sum() / flat_counted.sum().clamp_min(1)
        if not bool(keep.any()):
            return ce, student_logits.sum().float() * 0.0
        teacher = torch.cat(
            [lp.reshape(-1, k).clamp_min(LOGPROB_FLOOR), rest.reshape(-1, 1).clamp_min(LOGPROB_FLOOR)], -1
        )
        log_q = torch.cat([picked[:, :k], student_rest.clamp_min(LOGPROB_FLOOR)], -1)
        return ce, self._reduce(teacher.log_softmax(-1).reshape(*keep.shape, -1), log_q.reshape(*keep.shape, -1), keep)
