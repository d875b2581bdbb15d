"""Response-based KD against an exact head plus a sampled tail: :class:`SampledTailKDLoss`, and
:func:`tail_counts`, the draws that make such a tail from a teacher's full distribution.

A row (one token position) holds the k head ids with their **full-vocabulary** teacher log-probabilities (as the
top-k cache does), the log of the rest mass R = 1 − Σ_head p, and N draws with replacement from the teacher's
distribution over the ids **outside** the head (each v ∉ head with probability p_v / R), kept as the sampled ids u
and their counts c (Σ c = N; an id may come up several times). ``k = 0`` is Sparse Logit Sampling (Anshumann et
al., ACL 2025: R = 1, the whole distribution is sampled); ``k > 0`` is an exact head with a sampled tail.

* Target over the vocabulary: w_v = p_v on the head, w_u = R · c_u / N on the sampled ids, 0 elsewhere. Σ w = 1
  exactly, and E[w] = p, because a draw lands on v ∉ head with probability p_v / R.
* Loss: KL(w‖q) with q = softmax(z_s), the student's full-vocabulary distribution. Its gradient at the student's
  logits is q − w (Σ w = 1), whose expectation over the draws is q − p: **the gradient of the full-vocabulary
  forward KL, KL(p‖q), without bias**, at every position. Through the model the parameters' gradient is a linear
  map of the logits' gradient for a given batch, so it is unbiased too.
* The loss **value** is not an unbiased estimate of KL(p‖q): E[KL(w‖q)] = KL(p‖q) + E[Σ w log w] − Σ p log p, and
  the difference depends on the teacher and the draws only, not the student (no gradient). It is ≥ 0, 0 when the
  student's distribution is w itself, and tends to KL(p‖q) as N grows.
* What is refused, and why:

  - T ≠ 1. The tempered target p^(1/T) / Z needs the teacher's mass at every tail id and its normaliser; draws at
    T = 1 give those only through a self-normalised importance weight, which is biased. Use T = 1, or no sampled
    tail (the top-k loss, whose rest bucket is an approximation at T ≠ 1).
  - reverse KL and JSD. Their gradients weight the student's own mass by log p at every id where the student has
    any, and the draws give p at a handful of ids: no unbiased estimate exists from counts. Use forward KL.

The divergence is averaged over the masked positions; 0.0 (with grad) when the mask is empty. The teacher side
gets no gradient. The loss computes in float32 whatever its inputs' dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from kdflow.cache_format import LOGPROB_FLOOR
from kdflow.losses.ce import ce_targets
from kdflow.losses.gathered import gathered_logprobs
from kdflow.topk import block_topk, exp_rows_


class SampledTailKDLoss(nn.Module):
    """Forward KL against an exact head plus a sampled tail; definitions in the module docstring.

    Shapes: ``student_logits`` [B, L, V]; ``head_ids`` [B, L, k] (int) and ``head_logprobs`` [B, L, k] (k may be 0);
    ``rest_logprob`` [B, L] (log R); ``sample_ids`` [B, L, m] (int, the unique sampled ids, padded with −1) and
    ``sample_counts`` [B, L, m] (their counts, 0 at padding); ``mask`` [B, L] (1 = the position counts) -> scalar.
    ``samples`` is N, the number of draws each row's counts sum to. Values at masked-out positions are never read.
    """

    def __init__(self, samples: int, temperature: float = 1.0, divergence: str = "forward_kl") -> None:
        super().__init__()
        if temperature != 1:
            raise ValueError(
                f"SampledTailKDLoss: temperature {temperature}: a sampled tail gives an unbiased KD gradient only at "
                "T = 1 (the tempered tail would need the teacher's logits outside the head); set the temperature to "
                "1, or use a cache without samples (samples: 0)"
            )
        if divergence != "forward_kl":
            raise ValueError(
                f"SampledTailKDLoss: divergence {divergence!r}: counts of draws from the teacher estimate only the "
                "forward KL's gradient without bias (reverse KL and JSD need the teacher's log-probability wherever "
                "the student has mass); use forward_kl, or a cache without samples (samples: 0)"
            )
        if not (isinstance(samples, int) and samples > 0):
            raise ValueError(
                f"SampledTailKDLoss: samples must be a positive int (the draws per position), got {samples!r}; a cache "
                "with samples: 0 is a top-k cache, for TopKKDLoss"
            )
        self.samples = samples

    def extra_repr(self) -> str:
        return f"samples={self.samples}"

    def target(
        self,
        head_logprobs: torch.Tensor,
        rest_logprob: torch.Tensor,
        sample_counts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The target weights (w on the head, w on the sampled ids), fp32: [..., k], [...], [..., m] -> [..., k],
        [..., m]. Head entries at the cache's floor (−10000) are zero mass."""
        head = head_logprobs.detach().float()
        head_w = torch.where(head > LOGPROB_FLOOR, head.exp(), torch.zeros((), device=head.device))
        rest = rest_logprob.detach().float()
        rest_w = torch.where(rest > LOGPROB_FLOOR, rest.exp(), torch.zeros((), device=rest.device))
        tail_w = rest_w.unsqueeze(-1) * sample_counts.detach().float() / self.samples
        return head_w, tail_w

    def _rows(self, student_logits, head_ids, head_logprobs, rest_logprob, sample_ids, sample_counts, mask):
        """Shape, id and count checks; then, for every row of the flattened (viewed, not copied) logits, the ids
        [N, k + m] whose log-probabilities the loss reads and their target weights w [N, k + m]. Rows that do not
        count get id 0 and weight 0, so they add nothing to the loss or its gradient, whatever they held."""
        b, l = mask.shape
        if (
            student_logits.dim() != 3
            or student_logits.shape[:2] != (b, l)
            or head_ids.shape[:2] != (b, l)
            or head_logprobs.shape != head_ids.shape
            or rest_logprob.shape != (b, l)
            or sample_ids.shape[:2] != (b, l)
            or sample_counts.shape != sample_ids.shape
        ):
            raise ValueError(
                "SampledTailKDLoss: expected student_logits [B, L, V], head_ids and head_logprobs [B, L, k], "
                "rest_logprob and mask [B, L], sample_ids and sample_counts [B, L, m]; got "
                f"{tuple(student_logits.shape)}, {tuple(head_ids.shape)}, {tuple(head_logprobs.shape)}, "
                f"{tuple(rest_logprob.shape)}, {tuple(mask.shape)}, {tuple(sample_ids.shape)}, "
                f"{tuple(sample_counts.shape)}"
            )
        keep = mask != 0
        vocab = student_logits.shape[-1]
        counts = sample_counts[keep]
        kept_ids = torch.cat([head_ids[keep].long(), torch.where(counts > 0, sample_ids[keep].long(), 0)], -1)
        if bool(((kept_ids < 0) | (kept_ids >= vocab)).any()):
            raise ValueError(
                f"SampledTailKDLoss: a teacher id at a masked-in position is outside the student's vocabulary "
                f"[0, {vocab}); is the student using the teacher's tokenizer?"
            )
        drawn = counts.sum(-1)
        if bool((drawn != self.samples).any()):
            bad = int(drawn[drawn != self.samples][0])
            raise ValueError(
                f"SampledTailKDLoss: a position's sample counts sum to {bad}, not samples = {self.samples}; the cache "
                "and the loss disagree on the number of draws"
            )
        live = keep.unsqueeze(-1)
        zero = torch.zeros((), dtype=torch.long, device=head_ids.device)
        head = torch.where(live, head_ids.long(), zero)
        samp = torch.where(live & (sample_counts > 0), sample_ids.long(), zero)
        floor = torch.full((), LOGPROB_FLOOR, device=head_logprobs.device)
        head_w, tail_w = self.target(
            torch.where(live, head_logprobs.float(), floor),
            torch.where(keep, rest_logprob.float(), floor),
            torch.where(live, sample_counts, torch.zeros((), dtype=sample_counts.dtype, device=sample_counts.device)),
        )
        width = head.shape[-1] + samp.shape[-1]
        ids = torch.cat([head, samp], -1).reshape(-1, width)
        w = torch.cat([head_w, tail_w], -1).reshape(-1, width)  # Σ = 1 up to the cache's rounding; 0 off the mask
        return keep, ids, w

    @staticmethod
    def _kl_sum(w: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Σ over rows of KL(w‖q) = Σ w (log w − log q), 0 · log 0 = 0; repeated ids are fine (linear in w)."""
        live = w > 0
        log_w = torch.where(live, w, torch.ones((), device=w.device)).log()
        return torch.where(live, w * (log_w - log_q), torch.zeros((), device=w.device)).sum()

    def forward(
        self,
        student_logits: torch.Tensor,
        head_ids: torch.Tensor,
        head_logprobs: torch.Tensor,
        rest_logprob: torch.Tensor,
        sample_ids: torch.Tensor,
        sample_counts: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        keep, ids, w = self._rows(
            student_logits, head_ids, head_logprobs, rest_logprob, sample_ids, sample_counts, mask
        )
        if not bool(keep.any()):
            return student_logits.sum().float() * 0.0  # exactly 0, still on the student's graph
        log_q, _ = gathered_logprobs(student_logits.reshape(-1, student_logits.shape[-1]).float(), ids)
        return self._kl_sum(w, log_q) / keep.sum()

    def forward_with_ce(
        self,
        student_logits: torch.Tensor,
        input_ids: torch.Tensor,
        ce_mask: torch.Tensor,
        head_ids: torch.Tensor,
        head_logprobs: torch.Tensor,
        rest_logprob: torch.Tensor,
        sample_ids: torch.Tensor,
        sample_counts: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CELoss()(student_logits, input_ids, ce_mask), self(student_logits, head_ids, …, mask))`` from one pass
        over the vocabulary (the CE target is one more gathered id), as :meth:`TopKKDLoss.forward_with_ce`."""
        keep, ids, w = self._rows(
            student_logits, head_ids, head_logprobs, rest_logprob, sample_ids, sample_counts, mask
        )
        targets = ce_targets(input_ids, ce_mask).reshape(-1)
        counted = targets >= 0
        all_ids = torch.cat([ids, targets.clamp_min(0).unsqueeze(-1)], -1)
        picked, _ = gathered_logprobs(student_logits.reshape(-1, student_logits.shape[-1]).float(), all_ids)
        ce_rows = torch.where(counted, -picked[:, -1], torch.zeros((), dtype=picked.dtype, device=picked.device))
        ce = ce_rows.sum() / counted.sum().clamp_min(1)
        if not bool(keep.any()):
            return ce, student_logits.sum().float() * 0.0
        return ce, self._kl_sum(w, picked[:, :-1]) / keep.sum()


BLOCK = 256  # ids a block of the two-level CDF (tail_counts)


SAMPLINGS = ("multinomial", "systematic")  # how tail_counts places a row's draws (teacher_cache.sampling)


def uniform_width(samples: int, sampling: str) -> int:
    """Uniforms a position needs for ``samples`` draws: one each, or one in all for systematic draws."""
    return 1 if sampling == "systematic" else samples


def tail_counts(
    teacher_logprobs: torch.Tensor,
    k: int,
    samples: int,
    uniforms: torch.Tensor,
    sampling: str = "multinomial",
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head and the sampled tail of each row of a teacher's full distribution.

    ``teacher_logprobs`` [n, V] (log-softmax of the teacher's logits at T = 1, or the logits themselves: each row
    is normalised here), ``uniforms`` in [0, 1) (the caller seeds them; the draws are a function of them alone):
    [n, samples] for ``sampling="multinomial"``, [n, 1] for ``"systematic"`` -> ``head_ids`` [n, k] (most probable
    first), ``head_logprobs`` [n, k] (full-vocabulary),
    ``rest_logprob`` [n] (log of the mass outside the head), ``sample_ids`` [n, samples] and ``sample_counts``
    [n, samples]: the unique drawn ids, most drawn first, padded with −1 and count 0.

    ``sampling``: where the N draws of a row fall on the tail's CDF.

    * ``multinomial``: N independent draws, each at its own uniform u_j (Sparse Logit Sampling).
    * ``systematic``: the N evenly spaced points (u + j) / N, j = 0 … N − 1, of one uniform u a row (systematic
      resampling). Each point is uniform on [0, 1), so E[c_v] = N · p_v / R exactly, as for multinomial draws,
      and the target stays unbiased; but c_v is now ⌊N p_v / R⌋ or ⌈N p_v / R⌉, never further: an id holding a
      1/N share of the tail is always drawn, and the count's variance is at most 1/4 instead of N q (1 − q).

    Each draw is the inverse CDF of the tail's distribution p_v / R (v ∉ head) at its point, found in two
    levels: the CDF over blocks of ``BLOCK`` ids (float64 cumulative sums of the blocks' float32 sums), then the
    CDF inside the block drawn. One exp pass (unshifted where the row's maximum allows: kdflow.topk.exp_rows_) and
    one summing pass over the vocabulary, never a [n, V] float64 tensor; the row's total is the tail's mass plus
    the head's.
    ``overwrite``: ``teacher_logprobs`` (float32) is the caller's scratch, overwritten by the masses instead of a new
    [n, V] tensor (whose first touch costs more than the exp itself on a CPU); the results are the same.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"tail_counts: sampling {sampling!r} is none of {list(SAMPLINGS)}")
    width = uniform_width(samples, sampling)
    if uniforms.shape != (teacher_logprobs.shape[0], width):
        raise ValueError(
            f"tail_counts: uniforms must be [{teacher_logprobs.shape[0]}, {width}] for {sampling} sampling, got "
            f"{tuple(uniforms.shape)}"
        )
    z = teacher_logprobs.float()
    n, vocab = z.shape
    if k:
        values, head_ids = block_topk(z, k)
        top = values[:, :1]
    else:
        values, head_ids = z[:, :0], z[:, :0].long()
        top = z.amax(-1, keepdim=True)
    # [n, V] float32: exp(z - shift), shifted only where the row maximum calls for it (kdflow.topk.exp_rows_)
    mass = z if overwrite or z is not teacher_logprobs else z.clone()  # (z is already a copy when it was cast)
    shift = exp_rows_(mass, top)
    head = values - shift
    if k:
        mass.scatter_(-1, head_ids, 0.0)
    blocks = -(-vocab // BLOCK)
    # (a copy only when the vocabulary is no multiple of BLOCK)
    padded = mass if vocab % BLOCK == 0 else torch.nn.functional.pad(mass, (0, blocks * BLOCK - vocab))
    padded = padded.view(n, blocks, BLOCK)
    block_mass = padded.sum(-1).double()  # [n, blocks]: float32 sums of BLOCK values, accurate to ~1e-7
    block_cdf = block_mass.cumsum(-1)
    rest = block_cdf[:, -1]
    log_total = (rest + head.double().exp().sum(-1)).log()  # the rest and the head: the whole row's mass
    head_logprobs = (head - log_total.unsqueeze(-1)).float()
    rest_logprob = torch.where(rest > 0, rest.log() - log_total, torch.full_like(rest, LOGPROB_FLOOR)).float()
    points = uniforms.to(z.device).double()
    if sampling == "systematic":  # (u + j) / N: sorted, one uniform a row
        points = (points + torch.arange(samples, device=z.device, dtype=torch.float64)) / samples
    target = (points * rest.unsqueeze(-1)).contiguous()  # [n, N]
    # the block of each draw: the first whose cumulative mass exceeds the target (it has mass). A target rounded to
    # the total itself (u within 2^-53 of 1) goes to the last block with mass, the one whose step it is.
    blk = torch.searchsorted(block_cdf, target, right=True)  # [n, N]
    if bool((blk >= blocks).any()):
        blk_ids = torch.arange(blocks, device=z.device)
        last_blk = torch.where(block_mass > 0, blk_ids, torch.full_like(blk_ids, -1)).amax(-1, keepdim=True)
        blk = torch.minimum(blk, last_blk.clamp_min(0))
    before = torch.where(blk > 0, block_cdf.gather(-1, (blk - 1).clamp_min(0)), torch.zeros_like(target))
    inside = padded.gather(1, blk.unsqueeze(-1).expand(-1, -1, BLOCK)).double()  # [n, N, BLOCK]
    local_cdf = before.unsqueeze(-1) + inside.cumsum(-1)
    pos = torch.searchsorted(local_cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    # local_cdf rises only at ids with mass, so the id found has mass unless the target is at or past the block's
    # total (float32 block sums against float64 cumulative sums): pos = BLOCK, the draw then the last id with mass.
    over = pos >= BLOCK
    if bool(over.any()):
        pos_ids = torch.arange(BLOCK, device=z.device)
        last_pos = torch.where(inside[over] > 0, pos_ids, torch.full_like(pos_ids, -1)).amax(-1).clamp_min(0)
        pos[over] = last_pos
    draws = blk * BLOCK + pos
    m = draws.shape[1]
    sorted_draws, _ = draws.sort(-1)
    first = torch.ones_like(sorted_draws, dtype=torch.bool)
    first[:, 1:] = sorted_draws[:, 1:] != sorted_draws[:, :-1]
    counts = torch.zeros_like(sorted_draws)
    group = first.long().cumsum(-1) - 1  # index of each draw's unique id within its row
    counts.scatter_add_(-1, group, torch.ones_like(sorted_draws))
    uniq = torch.full_like(sorted_draws, -1)
    uniq.scatter_(-1, group, sorted_draws)
    order = counts.argsort(dim=-1, descending=True, stable=True)
    sample_counts = counts.gather(-1, order)
    sample_ids = torch.where(sample_counts > 0, uniq.gather(-1, order), torch.full_like(uniq, -1))
    if m and rest.le(0).any():  # a row whose head holds all its mass: nothing to draw
        none = rest.le(0)
        sample_ids[none] = -1
        sample_counts[none] = 0
        sample_counts[none, 0] = samples  # the counts still sum to N; their weight R · c / N is 0
        sample_ids[none, 0] = head_ids[none, 0] if k else 0
    return head_ids, head_logprobs, rest_logprob, sample_ids, sample_counts
