"""kdflow.losses.sampled: an exact head plus a sampled tail gives the full-vocabulary forward-KL gradient without
bias; the draws follow the teacher's tail; what is not sound is refused."""

from __future__ import annotations

import pytest
import torch

from kdflow.losses.sampled import SampledTailKDLoss, tail_counts

V, ROWS = 40, 6


def teacher_and_student(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = (torch.randn(ROWS, V, generator=g) * 2.5).log_softmax(-1)
    student = torch.randn(ROWS, V, generator=g)
    return teacher, student


def draws(teacher: torch.Tensor, k: int, samples: int, rounds: int, seed: int = 1, sampling: str = "multinomial"):
    """``rounds`` independent sets of draws of every row, stacked as a batch [rounds, ROWS, ...]."""
    g = torch.Generator().manual_seed(seed)
    width = 1 if sampling == "systematic" else samples
    uniforms = torch.rand(rounds * ROWS, width, generator=g, dtype=torch.float64)
    out = tail_counts(teacher.repeat(rounds, 1), k, samples, uniforms, sampling)
    return [t.reshape(rounds, ROWS, *t.shape[1:]) for t in out]


def per_draw_gradients(student: torch.Tensor, cache, samples: int) -> torch.Tensor:
    """The gradient at the student's logits of each round's loss, per row: [rounds, ROWS, V]."""
    rounds = cache[0].shape[0]
    z = student.expand(rounds, ROWS, V).clone().requires_grad_(True)
    loss = SampledTailKDLoss(samples)(z, *cache, torch.ones(rounds, ROWS))
    loss.backward()
    return z.grad * rounds * ROWS  # the loss averages over every position of every round


@pytest.mark.parametrize("k", [0, 4])
def test_the_mean_gradient_over_draws_is_the_full_kd_gradient(k):
    teacher, student = teacher_and_student()
    full = student.softmax(-1) - teacher.exp()  # d KL(p||q) / dz per row
    rounds, samples = 4000, 12
    grads = per_draw_gradients(student, draws(teacher, k, samples, rounds), samples).double()
    # the standard error of the mean from the draws' distribution (not the sample's: an id too rare to be drawn in
    # these rounds has a sample deviation of 0): a tail id's weight R c / N, c ~ Binomial(N, p / R), has variance
    # R p (1 - p / R) / N; the head's weights are exact
    p = teacher.double().exp()
    head = torch.zeros_like(p, dtype=torch.bool)
    if k:
        head.scatter_(-1, teacher.topk(k, -1).indices, True)
    rest = torch.where(head, 0.0, p).sum(-1, keepdim=True)
    se = torch.where(head, 0.0, (rest * p * (1 - p / rest) / samples / rounds).sqrt())
    err = (grads.mean(0) - full.double()).abs()
    assert bool((err <= 5 * se + 1e-6).all()), float(((err - 1e-6) / (se + 1e-12)).max())
    # and one round alone is not the full gradient: the test would catch a biased or a constant estimate
    assert float((grads[0] - full).abs().max()) > 10 * float(se.max())


def tail_shares(teacher: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(head mask, rest mass R [ROWS, 1], each id's share of the tail p / R, 0 on the head), float64."""
    p = teacher.double().exp()
    head = torch.zeros_like(p, dtype=torch.bool)
    if k:
        head.scatter_(-1, teacher.topk(k, -1).indices, True)
    rest = torch.where(head, 0.0, p).sum(-1, keepdim=True)
    return head, rest, torch.where(head, 0.0, p / rest)


def dense_counts(ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Counts per vocabulary id [..., V] from the (unique ids, counts) rows."""
    out = torch.zeros(*ids.shape[:-1], V, dtype=torch.long)
    return out.scatter_add_(-1, ids.clamp_min(0).long(), counts.long())


@pytest.mark.parametrize("k", [0, 4])
def test_systematic_draws_are_unbiased_and_each_count_is_the_floor_or_the_ceiling(k):
    """Systematic sampling: N points (u + j) / N of one uniform. Every id's count is ⌊N p/R⌋ or ⌈N p/R⌉ in every
    round, and the mean gradient over rounds is the full KD gradient within the draws' standard error (a count's
    variance is f (1 − f), f the fractional part of N p / R)."""
    teacher, student = teacher_and_student()
    full = student.softmax(-1) - teacher.exp()
    rounds, samples = 4000, 12
    cache = draws(teacher, k, samples, rounds, sampling="systematic")
    head, rest, share = tail_shares(teacher, k)
    c = dense_counts(cache[3], cache[4])  # [rounds, ROWS, V]
    expected = samples * share
    assert bool(((c >= expected.floor() - 1e-9) & (c <= expected.ceil() + 1e-9)).all())
    assert bool((c.sum(-1) == samples).all())
    grads = per_draw_gradients(student, cache, samples).double()
    f = expected - expected.floor()
    se = rest * (f * (1 - f)).sqrt() / samples / rounds**0.5
    err = (grads.mean(0) - full.double()).abs()
    assert bool((err <= 5 * se + 1e-6).all()), float(((err - 1e-6) / (se + 1e-12)).max())
    assert float((grads[0] - full).abs().max()) > 10 * float(se.max())  # one round alone is not the mean


def test_systematic_draws_are_less_noisy_than_independent_ones():
    """For the same N, the squared error of one round's gradient against full KD, averaged over rounds: systematic
    draws less than half of independent ones on this teacher (0.31 here; the point of the setting)."""
    teacher, student = teacher_and_student()
    full = (student.softmax(-1) - teacher.exp()).double()
    rounds, samples = 500, 12
    err = {}
    for sampling in ("multinomial", "systematic"):
        grads = per_draw_gradients(student, draws(teacher, 0, samples, rounds, sampling=sampling), samples)
        err[sampling] = float(((grads.double() - full) ** 2).sum(-1).mean())
    assert err["systematic"] < err["multinomial"] / 2, err


def test_a_biased_target_fails_the_same_check():
    """The check above has power: a top-4 cache renormalised over its head (no tail) is far outside it."""
    teacher, student = teacher_and_student()
    full = student.softmax(-1) - teacher.exp()
    head = teacher.topk(4, -1)
    renorm = torch.zeros_like(teacher).scatter(-1, head.indices, head.values.softmax(-1))
    err = ((student.softmax(-1) - renorm) - full).abs().max()
    assert float(err) > 0.05


def test_a_tail_of_one_id_is_the_full_kl_exactly():
    teacher, student = teacher_and_student()
    # the teacher's mass on 5 ids only: a head of 4 and a tail of one id, which every draw hits
    keep = teacher.topk(5, -1).indices
    masked = torch.full_like(teacher, -float("inf")).scatter(-1, keep, teacher.gather(-1, keep)).log_softmax(-1)
    cache = draws(masked, 4, 7, rounds=1)
    assert bool((cache[4][..., 0] == 7).all()) and bool((cache[3][..., 1:] == -1).all())
    z = student.unsqueeze(0).clone().requires_grad_(True)
    loss = SampledTailKDLoss(7)(z, *cache, torch.ones(1, ROWS))
    p = masked.exp()
    full_kl = (torch.where(p > 0, p * (masked - student.log_softmax(-1)), torch.zeros(()))).sum(-1).mean()
    assert float(loss) == pytest.approx(float(full_kl), rel=1e-5)
    loss.backward()
    assert torch.allclose(z.grad[0] * ROWS, student.softmax(-1) - p, atol=1e-6)


def test_the_loss_value_tends_to_the_full_kl_with_many_draws():
    teacher, student = teacher_and_student()
    full_kl = float((teacher.exp() * (teacher - student.log_softmax(-1))).sum(-1).mean())
    cache = draws(teacher, 2, 20000, rounds=1)
    loss = float(SampledTailKDLoss(20000)(student.unsqueeze(0), *cache, torch.ones(1, ROWS)))
    assert loss == pytest.approx(full_kl, abs=0.02)
    assert loss >= 0


def test_the_draws_are_a_function_of_the_uniforms_and_stay_outside_the_head():
    teacher, _ = teacher_and_student()
    a = draws(teacher, 4, 16, rounds=3, seed=5)
    b = draws(teacher, 4, 16, rounds=3, seed=5)
    c = draws(teacher, 4, 16, rounds=3, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[3], c[3])
    head_ids, head_lp, rest_lp, ids, counts = a
    assert bool((counts.sum(-1) == 16).all())
    live = counts > 0
    assert bool((ids[live] >= 0).all()) and bool((ids[~live] == -1).all())
    assert not bool((ids.unsqueeze(-1) == head_ids.unsqueeze(-2)).any(-1)[live].any())  # never a head id
    assert bool((counts[..., :-1] >= counts[..., 1:]).all())  # most drawn first
    # the head is the teacher's top 4 with their full-vocabulary log-probs; the rest is the mass outside it
    top = teacher.topk(4, -1)
    assert torch.equal(head_ids[0], top.indices) and torch.allclose(head_lp[0], top.values)
    assert torch.allclose(rest_lp[0].exp() + top.values.exp().sum(-1), torch.ones(ROWS), atol=1e-6)


def test_a_head_holding_all_the_mass_has_a_weightless_tail():
    teacher = torch.full((ROWS, V), -float("inf"))
    teacher[:, :3] = torch.tensor([0.5, 0.3, 0.2]).log()
    head_ids, _, rest_lp, ids, counts = tail_counts(teacher, 3, 8, torch.rand(ROWS, 8))
    assert bool((rest_lp == -10000).all()) and bool((counts.sum(-1) == 8).all())
    z = torch.randn(1, ROWS, V, requires_grad=True)
    loss = SampledTailKDLoss(8)(
        z,
        head_ids[None],
        teacher.gather(-1, head_ids)[None],
        rest_lp[None],
        ids[None],
        counts[None],
        torch.ones(1, ROWS),
    )
    loss.backward()
    q = z.detach()[0].softmax(-1)
    target = torch.zeros(ROWS, V)
    target[:, :3] = torch.tensor([0.5, 0.3, 0.2])
    assert torch.allclose(z.grad[0] * ROWS, q - target, atol=1e-6)


def test_masked_positions_do_not_count_and_an_empty_mask_is_zero():
    teacher, student = teacher_and_student()
    cache = draws(teacher, 4, 12, rounds=1)
    mask = torch.zeros(1, ROWS)
    mask[0, :3] = 1
    garbage = [t.clone() for t in cache]
    garbage[0][0, 3:] = -7  # ids and values at masked-out rows are never read
    garbage[1][0, 3:] = float("nan")
    garbage[3][0, 3:] = 10**6
    garbage[4][0, 3:] = 0
    loss = SampledTailKDLoss(12)
    assert float(loss(student[None], *garbage, mask)) == pytest.approx(
        float(loss(student[None, :3], *[t[:, :3] for t in cache], torch.ones(1, 3))), rel=1e-6
    )
    z = student[None].clone().requires_grad_(True)
    empty = loss(z, *cache, torch.zeros(1, ROWS))
    empty.backward()
    assert float(empty) == 0.0 and z.grad is not None


def test_unsound_settings_and_inconsistent_rows_are_refused():
    with pytest.raises(ValueError, match="temperature 2.0.*only at T = 1"):
        SampledTailKDLoss(12, temperature=2.0)
    for divergence in ("reverse_kl", "jsd"):
        with pytest.raises(ValueError, match=f"divergence '{divergence}'.*forward_kl"):
            SampledTailKDLoss(12, divergence=divergence)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        SampledTailKDLoss(0)
    teacher, student = teacher_and_student()
    cache = draws(teacher, 4, 12, rounds=1)
    with pytest.raises(ValueError, match="sum to 12, not samples = 16"):
        SampledTailKDLoss(16)(student[None], *cache, torch.ones(1, ROWS))
    bad = [t.clone() for t in cache]
    bad[3][0, 0, 0] = V
    with pytest.raises(ValueError, match="outside the student's vocabulary"):
        SampledTailKDLoss(12)(student[None], *bad, torch.ones(1, ROWS))
    with pytest.raises(ValueError, match=r"expected student_logits \[B, L, V\]"):
        SampledTailKDLoss(12)(student, *cache, torch.ones(1, ROWS))
    with pytest.raises(ValueError, match="uniforms must be"):
        tail_counts(teacher, 4, 12, torch.rand(ROWS, 11))
    with pytest.raises(ValueError, match=r"uniforms must be \[6, 1\] for systematic"):
        tail_counts(teacher, 4, 12, torch.rand(ROWS, 12), "systematic")
    with pytest.raises(ValueError, match="sampling 'stratified' is none of"):
        tail_counts(teacher, 4, 12, torch.rand(ROWS, 12), "stratified")


def test_extreme_uniforms_land_on_ids_with_mass_across_blocks():
    """The two-level CDF (blocks of BLOCK ids): uniforms 0 and just below 1 draw the first and the last id with
    mass, also when the vocabulary is no multiple of BLOCK and the ids with mass sit at block edges; the draw
    frequencies follow p within sampling error."""
    from kdflow.losses.sampled import BLOCK

    vocab = 3 * BLOCK + 17
    lp = torch.full((1, vocab), -1.0e4)
    live = [0, BLOCK - 1, BLOCK, 2 * BLOCK + 5, vocab - 1]
    lp[0, live] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25]))
    u = torch.tensor([[0.0, 1.0 - 2.0**-53, 0.5]], dtype=torch.float64)
    _, _, _, ids, counts = tail_counts(lp, 0, 3, u)
    assert set(ids[0][counts[0] > 0].tolist()) <= set(live) and {0, vocab - 1} <= set(ids[0].tolist())
    n = 20000
    u = torch.rand(1, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, _, _, ids, counts = tail_counts(lp, 0, n, u)
    freq = {int(i): int(c) / n for i, c in zip(ids[0], counts[0], strict=True) if c > 0}
    assert set(freq) == set(live)
    for i, p in zip(live, (0.1, 0.2, 0.3, 0.15, 0.25), strict=True):
        assert abs(freq[i] - p) < 4 * (p * (1 - p) / n) ** 0.5, (i, freq[i], p)


@pytest.mark.parametrize("sampling", ["multinomial", "systematic"])
def test_overwriting_the_callers_logits_gives_the_same_rows(sampling):
    """overwrite=True (the capture's scratch logits) draws exactly what the default, which leaves its input alone,
    draws; a vocabulary of several blocks, and uniforms at both ends."""
    from kdflow.losses.sampled import BLOCK

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 3 * BLOCK + 5, generator=g) * 4
    width = 1 if sampling == "systematic" else 9
    u = torch.rand(64, width, generator=g, dtype=torch.float64)
    u[0], u[1] = 0.0, 1.0 - 2.0**-53
    kept = logits.clone()
    want = tail_counts(logits, 4, 9, u, sampling)
    assert torch.equal(logits, kept)  # the default leaves the input as it was
    got = tail_counts(logits, 4, 9, u, sampling, overwrite=True)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert not torch.equal(logits, kept)  # the scratch was used


@pytest.mark.parametrize("k", [0, 4])
def test_forward_with_ce_equals_the_two_separate_losses(k):
    from kdflow.losses import CELoss

    teacher, student = teacher_and_student()
    cache = [t.clone() for t in draws(teacher, k, 12, rounds=2, sampling="systematic")]
    mask = torch.ones(2, ROWS)
    mask[1, 4:] = 0  # padding: what the cache holds there is never read
    cache[1][1, 4:] = float("nan")
    cache[4][1, 4:] = 10**6
    input_ids = torch.randint(0, V, (2, ROWS), generator=torch.Generator().manual_seed(3))
    logits = student.expand(2, ROWS, V).clone()
    loss = SampledTailKDLoss(12)
    ce_mask = torch.ones(2, ROWS)  # the student's tokens: CE counts where the KD mask does not
    a = logits.clone().requires_grad_(True)
    ce, rb = loss.forward_with_ce(a, input_ids, ce_mask, *cache, mask)
    (ce + 0.3 * rb).backward()
    b = logits.clone().requires_grad_(True)
    ce_ref, rb_ref = CELoss()(b, input_ids, ce_mask), loss(b, *cache, mask)
    (ce_ref + 0.3 * rb_ref).backward()
    assert torch.isfinite(rb) and float(rb) > 0
    assert torch.allclose(ce, ce_ref, atol=1e-6) and torch.allclose(rb, rb_ref, atol=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert float(a.grad[1, 4].abs().max()) > 0  # CE counts there
    # the KD term alone puts no gradient on a position outside its mask
    c = logits.clone().requires_grad_(True)
    loss(c, *cache, mask).backward()
    assert float(c.grad[1, 4:].abs().max()) == 0.0
