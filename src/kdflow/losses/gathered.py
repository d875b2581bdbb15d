"""Log-softmax at chosen ids, and the log of the mass outside them, in one pass over the vocabulary."""

from __future__ import annotations

import torch


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
