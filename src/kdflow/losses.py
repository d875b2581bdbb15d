"""Training losses: next-token cross-entropy and the three kinds of knowledge distillation (KD).

Every loss is a small ``torch.nn.Module`` that does its arithmetic in float32 whatever the dtype of
its inputs (student bf16/fp16 activations, float16 cached teacher values), ignores padding, and
returns a scalar. The teacher side never receives a gradient. When nothing is left after masking the
result is ``0.0`` and still attached to the student's graph, so ``loss.backward()`` works on any batch.

* :class:`CELoss` – next-token cross-entropy on the data (the "hard" targets).
* :class:`TopKKDLoss` – response-based KD ("rb") against the teacher top-k cache.
* :class:`FeatureKDLoss` – feature-based KD ("fb") against the teacher hidden-state cache.
* :class:`RelationKDLoss` – relation-based KD ("relb", RKD) against the teacher embedding cache.
* :func:`combine` – the weighted sum of the terms, refusing NaN/inf.

Response-based KD against a top-k cache (``TopKKDLoss``)
--------------------------------------------------------

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
import torch.nn.functional as F
from torch import nn

# Same value as kdflow.teacher_pass.LOGPROB_FLOOR (the cache's "zero mass"); not imported from there so
# that the losses do not pull in the teacher-pass dependencies.
LOGPROB_FLOOR = -1.0e4

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


class _GatheredLogSoftmax(torch.autograd.Function):
    """``log_softmax(z)`` at chosen ids, and the log of the mass outside the first ``n_rest`` of them, without
    materialising ``log_softmax`` (or its gradient) as more [N, V] tensors than needed.

    ``z`` [N, V] float, ``ids`` [N, m] long -> ``picked`` [N, m] = z[ids] − logsumexp(z), ``rest`` [N, 1] =
    log Σ_{j ∉ ids[:, :n_rest]} softmax(z)_j, summed directly over those entries (no ``1 − Σ`` cancellation;
    −inf when empty). Ids may repeat (a CE target is usually among the teacher's k), but the first ``n_rest``
    must be distinct. Backward, with s = softmax(z), g = grad of picked, g_r = grad of rest, q_r = exp(rest):
    ∂/∂z_j = Σ_{i: ids_i = j} g_i − s_j (Σ g + g_r) + [j ∉ K] s_j g_r / q_r: one exp pass, one multiply, two
    small scatters. ``z`` itself is saved (it is the model's logits, alive anyway), softmax is recomputed.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, ids: torch.Tensor, n_rest: int):
        lse = torch.logsumexp(z, -1, keepdim=True)
        picked = z.gather(-1, ids) - lse
        rest_mass = None
        if n_rest:
            s = (z - lse).exp_()
            s.scatter_(-1, ids[:, :n_rest], 0.0)
            rest_mass = s.sum(-1, keepdim=True)
            del s
            rest = rest_mass.log()
        else:
            rest = z.new_zeros((z.shape[0], 1))
        ctx.n_rest = n_rest
        ctx.save_for_backward(z, ids, lse, rest_mass if rest_mass is not None else lse)
        return picked, rest

    @staticmethod
    def backward(ctx, g_picked, g_rest):
        z, ids, lse, rest_mass = ctx.saved_tensors
        n_rest = ctx.n_rest
        if g_picked is None:
            g_picked = torch.zeros_like(ids, dtype=z.dtype)
        total = g_picked.sum(-1, keepdim=True)
        grad = (z - lse).exp_()  # softmax
        if n_rest and g_rest is not None:
            # rows whose outside mass is 0 (k covers the vocabulary) get no rest gradient: nothing is there
            per_out = torch.where(rest_mass > 0, g_rest / rest_mass, torch.zeros_like(rest_mass))
            grad.mul_(per_out - total - g_rest)
            k_ids = ids[:, :n_rest]
            grad.scatter_add_(-1, k_ids, -(z.gather(-1, k_ids) - lse).exp() * per_out)
        else:
            grad.mul_(-total)
        grad.scatter_add_(-1, ids, g_picked)
        return grad, None, None


def gathered_logprobs(z: torch.Tensor, ids: torch.Tensor, n_rest: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_softmax(z)[ids], log of the softmax mass outside ids[:, :n_rest])``: [N, V], [N, m] -> [N, m], [N, 1].
    See :class:`_GatheredLogSoftmax`; the same values as the naive formulas, at a fraction of their cost."""
    return _GatheredLogSoftmax.apply(z, ids.long(), int(n_rest))


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
            raise ValueError(f"CELoss: expected logits [B, L, V], input_ids and mask [B, L]; got "
                             f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(mask.shape)}")
        real = mask != 0
        counted = real[:, :-1] & real[:, 1:]
        if not bool(counted.any()):
            return logits.sum() * 0.0  # exactly 0, still on the student's graph
        # Every row of the flattened view (no copy of the logits): non-counted targets are ignored, which
        # zeroes their gradient without boolean-index copies of vocabulary-sized rows.
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ce_targets(input_ids, mask).reshape(-1),
                               ignore_index=-100)


class TopKKDLoss(nn.Module):
    """Response-based KD against the teacher top-k cache; definitions in the module docstring.

    Shapes: ``student_logits`` [B, L, V], ``topk_ids`` [B, L, k] (int), ``topk_logprobs`` [B, L, k],
    ``rest_logprob`` [B, L], ``mask`` [B, L] (1 = the position has a cached teacher row and a student
    logit row) -> scalar. Values at masked-out positions are never read (ids there may be −1, values NaN).
    """

    def __init__(self, temperature: float = 1.0, divergence: Divergence = "forward_kl",
                 missing_mass: MissingMass = "rest_bucket", jsd_beta: float = 0.5) -> None:
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

    def bucket_logprobs(self, student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                        rest_logprob: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
        if (student_logits.dim() != 3 or student_logits.shape[:2] != (b, l) or topk_ids.shape[:2] != (b, l)
                or topk_logprobs.shape != topk_ids.shape or rest_logprob.shape != (b, l)):
            raise ValueError(
                f"TopKKDLoss: expected student_logits [B, L, V], topk_ids and topk_logprobs [B, L, k], "
                f"rest_logprob and mask [B, L]; got {tuple(student_logits.shape)}, {tuple(topk_ids.shape)}, "
                f"{tuple(topk_logprobs.shape)}, {tuple(rest_logprob.shape)}, {tuple(mask.shape)}")
        keep = mask != 0
        vocab = student_logits.shape[-1]
        ids = topk_ids[keep]
        if bool(((ids < 0) | (ids >= vocab)).any()):
            raise ValueError(f"TopKKDLoss: a teacher top-k id at a masked-in position is outside the student's "
                             f"vocabulary [0, {vocab}); is the student using the teacher's tokenizer?")
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
        return per_row.sum() / keep.sum() * self.temperature ** 2

    def forward(self, student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                rest_logprob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep, ids, lp, rest = self._checked(student_logits, topk_ids, topk_logprobs, rest_logprob, mask)
        if not bool(keep.any()):
            return student_logits.sum().float() * 0.0  # exactly 0, still on the student's graph
        log_p, log_q = self.bucket_logprobs(student_logits, ids, lp, rest, keep)
        return self._reduce(log_p, log_q, keep)

    def forward_with_ce(self, student_logits: torch.Tensor, input_ids: torch.Tensor, ce_mask: torch.Tensor,
                        topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, rest_logprob: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CELoss()(student_logits, input_ids, ce_mask), self(student_logits, topk_ids, …, mask))`` with one
        pass over the vocabulary for both at T = 1 with ``rest_bucket`` (the CE target is one more gathered id);
        otherwise the two separate calls."""
        if self.temperature != 1 or self.missing_mass != "rest_bucket":
            return CELoss()(student_logits, input_ids, ce_mask), self(student_logits, topk_ids, topk_logprobs,
                                                                      rest_logprob, mask)
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
        teacher = torch.cat([lp.reshape(-1, k).clamp_min(LOGPROB_FLOOR), rest.reshape(-1, 1).clamp_min(LOGPROB_FLOOR)], -1)
        log_q = torch.cat([picked[:, :k], student_rest.clamp_min(LOGPROB_FLOOR)], -1)
        return ce, self._reduce(teacher.log_softmax(-1).reshape(*keep.shape, -1), log_q.reshape(*keep.shape, -1), keep)


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

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        b, l, _ = student_hidden.shape
        if teacher_hidden.shape[:2] != positions.shape or positions.shape[0] != b:
            raise ValueError(f"FeatureKDLoss: expected student_hidden [B, L, Ds], teacher_hidden [B, P, Dt], "
                             f"positions [B, P]; got {tuple(student_hidden.shape)}, "
                             f"{tuple(teacher_hidden.shape)}, {tuple(positions.shape)}")
        valid = positions >= 0
        pos = positions[valid].long()
        if pos.numel() and int(pos.max()) >= l:
            # A cached position beyond the student's sequence means the two were tokenised or truncated
            # differently: the pairing would be wrong, so refuse rather than drop rows silently.
            raise ValueError(f"FeatureKDLoss: cached position {int(pos.max())} is beyond the student's "
                             f"sequence length {l}")
        batch = torch.arange(b, device=positions.device).unsqueeze(1).expand_as(positions)[valid]
        # F.linear with an fp32 copy of the weight keeps the math in fp32 even if the module was cast down.
        student = F.linear(student_hidden[batch, pos].float(), self.projector.weight.float())  # [N, Dt]
        teacher = teacher_hidden[valid].detach().float()
        if student.shape[0] == 0:
            return student.sum()  # exactly 0, still on the student's and the projector's graph
        if self.kind == "mse":
            return F.mse_loss(student, teacher)
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


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
            raise ValueError(f"RelationKDLoss: expected student_emb [N, Ds] and teacher_emb [N, Dt]; got "
                             f"{tuple(student_emb.shape)}, {tuple(teacher_emb.shape)}")
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


def combine(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum ``Σ weights[name] · terms[name]`` of scalar loss terms.

    Every term needs a weight (KeyError otherwise); weights of terms not given are ignored, so one
    weights dict can serve every KD mode. Raises FloatingPointError naming the term and its value if a
    term is NaN or inf: a diverged run should stop at the step that diverged, with the culprit named.
    """
    if not terms:
        raise ValueError("combine: no loss terms given")
    total: torch.Tensor | None = None
    for name, term in terms.items():
        if name not in weights:
            raise KeyError(f"combine: loss term {name!r} has no weight (weights given: {sorted(weights)})")
        if term.dim() != 0:
            raise ValueError(f"combine: loss term {name!r} must be a scalar, got shape {tuple(term.shape)}")
        if not bool(torch.isfinite(term.detach())):
            raise FloatingPointError(f"combine: loss term {name!r} is {float(term.detach())} (weight "
                                     f"{weights[name]}); training diverged or an input holds NaN/inf")
        weighted = term * weights[name]
        total = weighted if total is None else total + weighted
    assert total is not None
    return total
