"""kdflow.losses against naive references (plain loops, float64, full-vocabulary math)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdflow.losses import CELoss, FeatureKDLoss, RelationKDLoss, TopKKDLoss, combine

B, L, V, K = 2, 5, 11, 4


def teacher_cache(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the top-k cache stores for full teacher logits [B, L, V]: ids, full-vocab logprobs, rest."""
    lp = teacher_logits.double().log_softmax(-1)
    top_lp, ids = lp.topk(k, dim=-1)
    outside = teacher_logits.double().scatter(-1, ids, float("-inf"))
    rest = outside.logsumexp(-1) - teacher_logits.double().logsumexp(-1)
    return ids, top_lp.float(), rest.float().clamp_min(-1e4)


def random_case(seed: int = 0, k: int = K, vocab: int = V):
    torch.manual_seed(seed)
    student = torch.randn(B, L, vocab) * 2
    ids, lp, rest = teacher_cache(torch.randn(B, L, vocab) * 2, k)
    mask = torch.ones(B, L)
    mask[1, 3:] = 0
    return student, ids, lp, rest, mask


def log_buckets_naive(z, ids, lp, rest, t, missing_mass):
    """Per position, loops over buckets in float64: (log p teacher, log q student) as Python lists."""
    z = [float(x) / t for x in z]
    lse = math.log(sum(math.exp(x) for x in z))
    ls_k = [z[int(i)] - lse for i in ids]
    tk = [float(x) / t for x in lp]
    if missing_mass == "renormalize":
        tn = math.log(sum(math.exp(x) for x in tk))
        sn = math.log(sum(math.exp(x) for x in ls_k))
        return [x - tn for x in tk], [x - sn for x in ls_k]
    tb = tk + [float(rest) / t]
    tn = math.log(sum(math.exp(x) for x in tb))
    student_rest = math.log(1 - sum(math.exp(x) for x in ls_k))
    return [x - tn for x in tb], ls_k + [student_rest]


def kl_naive(la, lb):
    return sum(math.exp(a) * (a - b) for a, b in zip(la, lb, strict=False))


def div_naive(lp, lq, divergence, beta=0.5):
    if divergence == "forward_kl":
        return kl_naive(lp, lq)
    if divergence == "reverse_kl":
        return kl_naive(lq, lp)
    lm = [math.log(beta * math.exp(a) + (1 - beta) * math.exp(b)) for a, b in zip(lp, lq, strict=False)]
    return beta * kl_naive(lp, lm) + (1 - beta) * kl_naive(lq, lm)


def kd_naive(student, ids, lp, rest, mask, t=1.0, divergence="forward_kl", missing_mass="rest_bucket", beta=0.5):
    total, n = 0.0, 0
    for b in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            if mask[b, j]:
                p, q = log_buckets_naive(student[b, j], ids[b, j], lp[b, j], rest[b, j], t, missing_mass)
                total += div_naive(p, q, divergence, beta) * t * t
                n += 1
    return total / n


# --------------------------------------------------------------------------- CE


def test_ce_equals_cross_entropy_on_shifted_masked_positions():
    torch.manual_seed(0)
    logits, ids = torch.randn(B, L, V), torch.randint(0, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    rows, targets = [], []
    for b in range(B):
        for j in range(L - 1):
            if mask[b, j] and mask[b, j + 1]:
                rows.append(logits[b, j])
                targets.append(ids[b, j + 1])
    expected = F.cross_entropy(torch.stack(rows), torch.stack(targets))
    assert torch.allclose(CELoss()(logits, ids, mask), expected, atol=1e-6)


def test_ce_right_padding_does_not_change_it():
    torch.manual_seed(1)
    logits, ids = torch.randn(1, L, V), torch.randint(0, V, (1, L))
    ce = CELoss()
    plain = ce(logits, ids, torch.ones(1, L))
    padded_logits = torch.cat([logits, torch.randn(1, 3, V) * 50], 1)
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    padded_mask = torch.cat([torch.ones(1, L), torch.zeros(1, 3)], 1)
    assert torch.allclose(ce(padded_logits, padded_ids, padded_mask), plain, atol=1e-6)


def test_ce_alignment_position_j_predicts_j_plus_1():
    torch.manual_seed(2)
    ids = torch.randint(0, V, (1, L))
    right = torch.full((1, L, V), -20.0)
    shifted = torch.full((1, L, V), -20.0)
    for j in range(L):
        if j + 1 < L:
            right[0, j, ids[0, j + 1]] = 20.0
        shifted[0, j, ids[0, j]] = 20.0  # predicts the token it reads: off by one
    mask = torch.ones(1, L)
    assert CELoss()(right, ids, mask) < 1e-6
    if not torch.equal(ids[0, 1:], ids[0, :-1]):
        assert CELoss()(shifted, ids, mask) > 5


def test_ce_empty_and_bf16():
    logits = torch.randn(B, L, V, requires_grad=True)
    loss = CELoss()(logits, torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    half = torch.randn(B, L, V).bfloat16()
    ids = torch.randint(0, V, (B, L))
    assert CELoss()(half, ids, torch.ones(B, L)).dtype == torch.float32


# --------------------------------------------------------------------------- top-k KD


def test_rest_bucket_with_k_equal_v_is_the_full_vocabulary_kl():
    torch.manual_seed(3)
    student, teacher = torch.randn(B, L, V) * 2, torch.randn(B, L, V) * 2
    ids, lp, _ = teacher_cache(teacher, V)
    rest = torch.full((B, L), -30.0)  # ~0 mass outside: all ids are in the k
    mask = torch.ones(B, L)
    full = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="sum") / (B * L)
    got = TopKKDLoss()(student, ids, lp, rest, mask)
    assert torch.isfinite(got)
    assert torch.allclose(got, full, atol=1e-5)
    # the cache's own value for an empty rest: −10000
    assert torch.allclose(TopKKDLoss()(student, ids, lp, torch.full((B, L), -1e4), mask), full, atol=1e-5)


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("missing_mass", ["rest_bucket", "renormalize"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_equals_naive_loop(divergence, missing_mass, t):
    student, ids, lp, rest, mask = random_case(4)
    loss = TopKKDLoss(temperature=t, divergence=divergence, missing_mass=missing_mass)
    got = loss(student, ids, lp, rest, mask)
    expected = kd_naive(student, ids, lp, rest, mask, t, divergence, missing_mass)
    assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert got.item() > 0


def test_jsd_beta_is_the_weight_of_the_teacher():
    student, ids, lp, rest, mask = random_case(5)
    got = TopKKDLoss(divergence="jsd", jsd_beta=0.2)(student, ids, lp, rest, mask)
    expected = kd_naive(student, ids, lp, rest, mask, divergence="jsd", beta=0.2)
    assert got.item() == pytest.approx(expected, rel=1e-4)
    swapped = kd_naive(student, ids, lp, rest, mask, divergence="jsd", beta=0.8)
    assert abs(swapped - expected) > 1e-3  # so the test above does tell β from 1 − β


def test_student_rest_bucket_is_log_one_minus_topk_mass():
    student, ids, lp, rest, _ = random_case(6)
    _, log_q = TopKKDLoss().bucket_logprobs(student, ids, lp, rest)
    probs = student.double().softmax(-1)
    naive = torch.log(1 - probs.gather(-1, ids).sum(-1))
    assert torch.allclose(log_q[..., -1].double(), naive, atol=1e-5)
    # k+1 student buckets hold all the mass
    assert torch.allclose(log_q.exp().sum(-1), torch.ones(B, L), atol=1e-5)


def test_student_rest_bucket_is_accurate_when_tiny():
    # The k ids hold all but ~1e-12 of the student's mass: 1 − sum in fp32 would give 0 or rounding noise.
    logits = torch.full((1, 1, V), -30.0)
    logits[0, 0, :K] = torch.tensor([2.0, 1.0, 0.5, 0.0])
    ids = torch.arange(K).view(1, 1, K)
    _, log_q = TopKKDLoss().bucket_logprobs(logits, ids, torch.zeros(1, 1, K), torch.zeros(1, 1))
    p = logits.double().softmax(-1)[0, 0]
    naive = math.log(float(p[K:].sum()))  # the mass outside, summed directly in float64
    assert log_q[0, 0, -1].item() == pytest.approx(naive, rel=1e-5)


def test_zero_when_student_equals_teacher():
    torch.manual_seed(7)
    logits = torch.randn(B, L, V) * 3
    ids, lp, rest = teacher_cache(logits, K)
    mask = torch.ones(B, L)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        assert TopKKDLoss(divergence=divergence)(logits, ids, lp, rest, mask).abs() < 1e-5
        for t in (0.5, 2.0):  # renormalised over the k, tempering is exact
            kd = TopKKDLoss(temperature=t, divergence=divergence, missing_mass="renormalize")
            assert kd(logits, ids, lp, rest, mask).abs() < 1e-5


def test_rest_bucket_at_t_not_1_treats_the_rest_as_one_pseudo_token():
    # Documented approximation: a student equal to the teacher is not at exactly 0 when T ≠ 1.
    torch.manual_seed(8)
    logits = torch.randn(B, L, V) * 3
    ids, lp, rest = teacher_cache(logits, K)
    mask = torch.ones(B, L)
    got = TopKKDLoss(temperature=2.0)(logits, ids, lp, rest, mask)
    assert got.item() > 1e-4
    assert got.item() == pytest.approx(kd_naive(logits, ids, lp, rest, mask, t=2.0), rel=1e-4)


def test_temperature_scaling_is_t_squared_times_softened_kl():
    torch.manual_seed(9)
    t = 3.0
    student, teacher = torch.randn(1, L, V) * 2, torch.randn(1, L, V) * 2
    ids, lp, rest = teacher_cache(teacher, K)
    mask = torch.ones(1, L)
    got = TopKKDLoss(temperature=t, missing_mass="renormalize")(student, ids, lp, rest, mask)
    # softened distributions over the k ids, straight from the two sets of logits
    p = (teacher.gather(-1, ids) / t).log_softmax(-1)
    q = (student.gather(-1, ids) / t).log_softmax(-1)
    expected = t * t * F.kl_div(q, p, log_target=True, reduction="sum") / L
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, expected / (t * t), atol=1e-3)


def test_jsd_with_half_beta_is_symmetric():
    # Swap roles: a student equal to teacher A against a cache of B, and vice versa (k = V: exact).
    torch.manual_seed(10)
    a, b = torch.randn(1, L, V) * 2, torch.randn(1, L, V) * 2
    mask = torch.ones(1, L)
    jsd = TopKKDLoss(divergence="jsd")
    ab = jsd(a, *teacher_cache(b, V), mask)
    ba = jsd(b, *teacher_cache(a, V), mask)
    assert torch.allclose(ab, ba, atol=1e-5)
    fkl = TopKKDLoss(divergence="forward_kl")
    assert not torch.allclose(fkl(a, *teacher_cache(b, V), mask), fkl(b, *teacher_cache(a, V), mask), atol=1e-3)


def test_divergences_are_non_negative():
    for seed in range(20):
        student, ids, lp, rest, mask = random_case(100 + seed)
        for divergence in ("forward_kl", "reverse_kl", "jsd"):
            for missing_mass in ("rest_bucket", "renormalize"):
                loss = TopKKDLoss(temperature=1.5, divergence=divergence, missing_mass=missing_mass)
                assert loss(student, ids, lp, rest, mask).item() >= -1e-6


def test_masked_positions_do_not_matter():
    student, ids, lp, rest, mask = random_case(11)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        loss = TopKKDLoss(divergence=divergence)
        before = loss(student, ids, lp, rest, mask)
        off = mask == 0
        s2, i2, l2, r2 = student.clone(), ids.clone(), lp.clone(), rest.clone()
        s2[off] = torch.randn_like(s2[off]) * 100
        i2[off] = -1
        l2[off] = float("nan")
        r2[off] = float("nan")
        assert torch.equal(loss(s2, i2, l2, r2, mask), before)


def test_empty_mask_is_zero_and_backward_works():
    student, ids, lp, rest, _ = random_case(12)
    student.requires_grad_(True)
    loss = TopKKDLoss()(student, ids, lp, rest, torch.zeros(B, L))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_gradient_reaches_student_logits_only(divergence):
    student, ids, lp, rest, mask = random_case(13)
    student.requires_grad_(True)
    loss = TopKKDLoss(divergence=divergence)(student, ids, lp, rest, mask)
    assert loss.requires_grad
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert torch.equal(student.grad[mask == 0], torch.zeros_like(student.grad[mask == 0]))
    # teacher tensors that do require grad (say, by mistake) are still not trained through the loss
    lp2, rest2 = lp.clone().requires_grad_(True), rest.clone().requires_grad_(True)
    loss2 = TopKKDLoss(divergence=divergence)(student, ids, lp2, rest2, mask)
    loss2.backward()
    assert lp2.grad is None and rest2.grad is None


def test_gradients_finite_when_k_covers_the_vocabulary():
    torch.manual_seed(14)
    student = torch.randn(B, L, V, requires_grad=True)
    ids, lp, rest = teacher_cache(torch.randn(B, L, V), V)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        student.grad = None
        loss = TopKKDLoss(divergence=divergence)(student, ids, lp, rest, torch.ones(B, L))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("missing_mass", ["rest_bucket", "renormalize"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_student_zero_mass_at_a_teacher_id_counts_zero_not_nan(divergence, missing_mass):
    # A student may hold −inf logits (e.g. disabled vocabulary rows); where it has no mass its terms
    # are 0 · log 0 = 0: the limit of a very negative logit, not NaN.
    student, ids, lp, rest, mask = random_case(17)
    loss = TopKKDLoss(divergence=divergence, missing_mass=missing_mass)
    limit = student.clone()
    limit.scatter_(-1, ids[..., 1:2], -1e30)
    hard = student.clone().scatter_(-1, ids[..., 1:2], float("-inf")).requires_grad_(True)
    got = loss(hard, ids, lp, rest, mask)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(hard.grad).all()
    assert torch.allclose(got, loss(limit, ids, lp, rest, mask), atol=1e-6)


def test_fp16_teacher_values_and_int32_ids_accepted():
    student, ids, lp, rest, mask = random_case(15)
    ref = TopKKDLoss()(student, ids, lp.half().float(), rest.half().float(), mask)
    got = TopKKDLoss()(student, ids.int(), lp.half(), rest.half(), mask)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.isfinite(TopKKDLoss()(student.bfloat16(), ids, lp.half(), rest.half(), mask))


def test_topk_refuses_bad_settings_and_ids():
    with pytest.raises(ValueError):
        TopKKDLoss(divergence="kl")
    with pytest.raises(ValueError):
        TopKKDLoss(missing_mass="ignore")
    with pytest.raises(ValueError):
        TopKKDLoss(temperature=0)
    with pytest.raises(ValueError):
        TopKKDLoss(divergence="jsd", jsd_beta=1.0)
    student, ids, lp, rest, mask = random_case(16)
    ids[0, 0, 0] = V  # beyond the student's vocabulary at a real position
    with pytest.raises(ValueError, match="vocabulary"):
        TopKKDLoss()(student, ids, lp, rest, mask)


# --------------------------------------------------------------------------- feature KD


def feature_case(seed: int, ds: int = 6, dt: int = 9, p: int = 4):
    torch.manual_seed(seed)
    student = torch.randn(B, L, ds, requires_grad=True)
    teacher = torch.randn(B, p, dt).half()
    positions = torch.tensor([[0, 2, 3, 4], [1, 4, -1, -1]])
    return student, teacher, positions


def feature_naive(loss: FeatureKDLoss, student, teacher, positions) -> float:
    w = loss.projector.weight.detach().double()
    total, n = 0.0, 0
    for b in range(positions.shape[0]):
        for i in range(positions.shape[1]):
            pos = int(positions[b, i])
            if pos < 0:
                continue
            s = w @ student[b, pos].detach().double()
            t = teacher[b, i].double()
            if loss.kind == "mse":
                total += float(((s - t) ** 2).sum())
                n += t.numel()
            else:
                total += 1 - float(s @ t / (s.norm() * t.norm()))
                n += 1
    return total / n


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_kd_equals_naive_and_trains_the_projector(kind):
    student, teacher, positions = feature_case(20)
    loss = FeatureKDLoss(6, 9, kind=kind)
    got = loss(student, teacher, positions)
    assert got.item() == pytest.approx(feature_naive(loss, student, teacher, positions), rel=1e-5)
    got.backward()
    assert loss.projector.weight.grad is not None and loss.projector.weight.grad.abs().sum() > 0
    assert student.grad.abs().sum() > 0
    # rows of the student that no cached position points at get no gradient
    assert torch.equal(student.grad[0, 1], torch.zeros(6)) and torch.equal(student.grad[1, 0], torch.zeros(6))


def test_feature_kd_ignores_padded_positions():
    student, teacher, positions = feature_case(21)
    loss = FeatureKDLoss(6, 9)
    before = loss(student, teacher, positions)
    teacher2 = teacher.clone()
    teacher2[positions < 0] = float("nan")
    assert torch.equal(loss(student, teacher2, positions), before)


def test_feature_kd_zero_when_projected_student_matches_and_empty():
    student, _, positions = feature_case(22, ds=6, dt=6)
    loss = FeatureKDLoss(6, 6)
    with torch.no_grad():
        loss.projector.weight.copy_(torch.eye(6))
    teacher = torch.stack([student.detach()[b, positions[b].clamp_min(0)] for b in range(B)])
    assert loss(student, teacher, positions).item() < 1e-10
    empty = loss(student, teacher, torch.full_like(positions, -1))
    assert empty.item() == 0.0
    empty.backward()
    assert loss.projector.weight.grad is not None


def test_feature_kd_refuses_positions_beyond_the_student():
    student, teacher, positions = feature_case(23)
    positions[0, 0] = L
    with pytest.raises(ValueError, match="beyond"):
        FeatureKDLoss(6, 9)(student, teacher, positions)


# --------------------------------------------------------------------------- relation KD


def rkd_naive(s: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
    s, t = s.double(), t.double()
    n = s.shape[0]

    def huber(x):
        return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5

    def dists(e):
        d = {(i, j): float((e[i] - e[j]).norm()) for i in range(n) for j in range(n) if i != j}
        mean = sum(d.values()) / len(d)
        return {key: v / mean for key, v in d.items()}

    ds, dt = dists(s), dists(t)
    distance = sum(huber(ds[key] - dt[key]) for key in ds) / len(ds)

    def cos(e, i, j, k):
        a, b = e[i] - e[j], e[k] - e[j]
        return float(a @ b / (a.norm() * b.norm()))

    triplets = [(i, j, k) for i in range(n) for j in range(n) for k in range(n) if len({i, j, k}) == 3]
    angle = sum(huber(cos(s, *tr) - cos(t, *tr)) for tr in triplets) / len(triplets)
    return distance, angle


def random_rotation(d: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q.float()


def test_rkd_equals_naive_with_different_widths():
    torch.manual_seed(30)
    s, t = torch.randn(6, 5), torch.randn(6, 8) * 3
    rkd = RelationKDLoss(distance_weight=1.0, angle_weight=2.0)
    got = rkd(s, t)
    distance, angle = rkd_naive(s, t)
    assert rkd.last_terms["distance"] == pytest.approx(distance, rel=1e-4)
    assert rkd.last_terms["angle"] == pytest.approx(angle, rel=1e-4)
    assert got.item() == pytest.approx(distance + 2 * angle, rel=1e-4)
    assert distance > 0 and angle > 0


def test_rkd_zero_for_same_geometry_and_invariances():
    torch.manual_seed(31)
    t = torch.randn(7, 8)
    rkd = RelationKDLoss()
    assert rkd(t.clone(), t).item() < 1e-10
    # the student is the teacher scaled, rotated, translated, and embedded in a wider space (Ds != Dt)
    wide = torch.cat([t * 0.01, torch.zeros(7, 4)], 1) @ random_rotation(12) + torch.randn(12)
    assert rkd(wide, t).item() < 1e-8
    # a student with other geometry: the loss is positive, and the same whatever the teacher's scale,
    # rotation or translation
    s = torch.randn(7, 5, requires_grad=True)
    base = rkd(s, t)
    assert base.item() > 1e-3
    moved = t * 37.0 @ random_rotation(8) - 5.0
    assert rkd(s, moved).item() == pytest.approx(base.item(), rel=1e-4)


def test_rkd_gradient_to_student_only():
    torch.manual_seed(32)
    s, t = torch.randn(5, 4, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    RelationKDLoss()(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_rkd_small_batches():
    rkd = RelationKDLoss()
    one = torch.randn(1, 4, requires_grad=True)
    loss = rkd(one, torch.randn(1, 6))
    assert loss.item() == 0.0 and rkd.last_terms == {"distance": 0.0, "angle": 0.0}
    loss.backward()
    assert torch.equal(one.grad, torch.zeros_like(one))
    two = torch.randn(2, 4, requires_grad=True)
    loss = rkd(two, torch.randn(2, 6))  # one pair: both normalised distances are 1; no triplet
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and rkd.last_terms["angle"] == 0.0
    loss.backward()
    assert torch.isfinite(two.grad).all()


# --------------------------------------------------------------------------- combine


def test_combine_weighted_sum():
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    total = combine({"ce": a, "kd": b}, {"ce": 0.5, "kd": 2.0, "fb": 9.0})
    assert total.item() == pytest.approx(7.0)
    total.backward()
    assert a.grad.item() == 0.5 and b.grad.item() == 2.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_combine_refuses_non_finite_terms_by_name(bad):
    with pytest.raises(FloatingPointError, match=r"'kd'.*(nan|inf)"):
        combine({"ce": torch.tensor(1.0), "kd": torch.tensor(bad)}, {"ce": 1.0, "kd": 0.0})


def test_combine_refuses_term_without_weight():
    with pytest.raises(KeyError, match="relb"):
        combine({"relb": torch.tensor(1.0)}, {"ce": 1.0})


# --------------------------------------------------------------------------- the fused vocabulary pass


@pytest.mark.parametrize("n_rest", [0, 3])
def test_gathered_logprobs_values_and_gradients_equal_the_naive_formulas(n_rest):
    from kdflow.losses import gathered_logprobs

    g = torch.Generator().manual_seed(3)
    z = (torch.randn(6, 13, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ids = torch.stack([torch.randperm(13, generator=g)[:5] for _ in range(6)])
    ids[:, 4] = ids[:, 1]  # a repeated id (a CE target among the teacher's k)
    torch.autograd.gradcheck(lambda x: gathered_logprobs(x, ids, n_rest), (z,))
    picked, rest = gathered_logprobs(z, ids, n_rest)
    ls = z.log_softmax(-1)
    assert torch.allclose(picked, ls.gather(-1, ids))
    if n_rest:
        outside = ls.scatter(-1, ids[:, :n_rest], float("-inf")).logsumexp(-1, keepdim=True)
        assert torch.allclose(rest, outside)


@pytest.mark.parametrize("t,missing_mass", [(1.0, "rest_bucket"), (2.0, "rest_bucket"), (1.0, "renormalize")])
def test_forward_with_ce_equals_the_two_separate_losses(t, missing_mass):
    student, ids, lp, rest, mask = random_case(5)
    input_ids = torch.randint(0, student.shape[-1], mask.shape)
    loss = TopKKDLoss(temperature=t, missing_mass=missing_mass)
    a = student.clone().requires_grad_(True)
    ce, rb = loss.forward_with_ce(a, input_ids, mask, ids, lp, rest, mask)
    (ce + 0.3 * rb).backward()
    b = student.clone().requires_grad_(True)
    ce_ref, rb_ref = CELoss()(b, input_ids, mask), loss(b, ids, lp, rest, mask)
    (ce_ref + 0.3 * rb_ref).backward()
    assert torch.allclose(ce, ce_ref, atol=1e-6) and torch.allclose(rb, rb_ref, atol=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
