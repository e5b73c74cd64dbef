"""Property tests of every tensor function in topd.py (spec sections in the test names' docstrings)."""

import math

import pytest
import torch

import fused_kernels
import topd


def _brute_reverse_kl(student, teacher):
    """float64 reference: sum_v p (log p - log q), no chunking, no clamping."""
    logp = torch.log_softmax(student.double(), -1)
    logq = torch.log_softmax(teacher.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


# ------------------------------------------------------------------------------------------- log-probs and KL

def test_per_token_kl_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 50, generator=g) * 3, torch.randn(3, 7, 50, generator=g) * 3
    got = topd.per_token_kl(s, t, chunk_size=4)
    ref = _brute_reverse_kl(s, t)
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_per_token_kl_zero_when_teacher_equals_student_and_nonnegative():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 9, 33, generator=g) * 4
    assert topd.per_token_kl(s, s.clone()).abs().max() < 1e-5
    t = torch.randn(2, 9, 33, generator=g) * 4
    assert (topd.per_token_kl(s, t) >= 0).all()


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
def test_per_token_kl_and_grad_invariant_to_chunk_size(chunk):
    g = torch.Generator().manual_seed(2)
    s0, t = torch.randn(2, 5, 17, generator=g), torch.randn(2, 5, 17, generator=g)
    s_ref = s0.clone().requires_grad_(True)
    s = s0.clone().requires_grad_(True)
    w = torch.rand(2, 5, generator=g)  # a non-uniform upstream gradient
    (topd.per_token_kl(s_ref, t, chunk_size=10_000) * w).sum().backward()
    (topd.per_token_kl(s, t, chunk_size=chunk) * w).sum().backward()
    assert torch.allclose(topd.per_token_kl(s0, t, chunk_size=chunk), topd.per_token_kl(s0, t, chunk_size=10_000))
    assert torch.allclose(s.grad, s_ref.grad, atol=1e-7)


def test_per_token_kl_slices_padded_vocab():
    """Teacher with 4 extra padding columns (151936 vs 152064 in miniature): same KL as unpadded (trap 10)."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 4, 20, generator=g), torch.randn(2, 4, 20, generator=g)
    t_padded = torch.cat([t, torch.full((2, 4, 4), 30.0)], dim=-1)  # large junk logits in the padding rows
    assert torch.allclose(topd.per_token_kl(s, t_padded), topd.per_token_kl(s, t))
    # explicit tokenizer size slices both sides, also when the student is the padded one
    s_padded = torch.cat([s, torch.full((2, 4, 4), 30.0)], dim=-1)
    assert torch.allclose(topd.per_token_kl(s_padded, t_padded, vocab_size=20), topd.per_token_kl(s, t))
    with pytest.raises(ValueError, match="vocab_size"):
        topd.per_token_kl(s, t, vocab_size=21)


def test_per_token_kl_gradcheck_both_inputs():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # the kernel computes in fp32 internally, so compare against finite differences at fp32-level tolerance
    assert torch.autograd.gradcheck(lambda a, b: fused_kernels.kl_divergence(a, b, chunk_size=2), (s, t),
                                    eps=1e-3, atol=2e-3, rtol=2e-3)


def test_per_token_kl_grad_matches_autograd_of_reference():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 11, generator=g, requires_grad=True)
    t = torch.randn(4, 11, generator=g)
    s2 = s.detach().clone().requires_grad_(True)
    topd.per_token_kl(s, t, chunk_size=3).sum().backward()
    _brute_reverse_kl(s2, t).sum().backward()
    assert torch.allclose(s.grad, s2.grad.float(), atol=1e-6)


def test_per_token_kl_finite_with_minus_inf_teacher_logits():
    """A -inf teacher logit (masked token) must not turn the loss or the gradient into NaN (trap 7)."""
    s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, -math.inf, 2.0]])
    kl = topd.per_token_kl(s, t)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(s.grad).all()
    assert kl.item() > 100  # the student puts mass where the teacher has none: a huge but finite penalty


@pytest.mark.parametrize("side", ["student", "teacher", "both"])
def test_per_token_kl_gradient_finite_when_column_zero_is_minus_inf(side):
    """Regression (review item 3): the log-normaliser used to be read off column 0, so a -inf in column 0 of either
    input gave a finite KL with a NaN gradient (the step was skipped; after --max-bad-steps the run died).
    Values and gradients must match a float64 reference with the same clamped log-probs."""
    s_val = torch.tensor([[0.5, 1.0, 2.0, -1.0], [0.0, 0.3, -0.2, 1.5]])
    t_val = torch.tensor([[0.1, 0.0, 1.5, 0.7], [1.0, -0.4, 0.2, 0.0]])
    if side in ("student", "both"):
        s_val[:, 0] = -math.inf
    if side in ("teacher", "both"):
        t_val[:, 0] = -math.inf
    s, t = s_val.clone().requires_grad_(True), t_val.clone().requires_grad_(True)
    kl = fused_kernels.kl_divergence(s, t, chunk_size=1)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    s64, t64 = s_val.double().requires_grad_(True), t_val.double().requires_grad_(True)
    logp = torch.log_softmax(s64, -1).clamp_min(fused_kernels.LOGP_FLOOR)
    logq = torch.log_softmax(t64, -1).clamp_min(fused_kernels.LOGP_FLOOR)
    ref = (logp.exp() * (logp - logq)).sum(-1)
    ref.sum().backward()
    assert torch.allclose(kl.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(s.grad.double(), s64.grad, atol=1e-5)
    # d KL / d b = q - p, exact even where a column is -inf (the clamp above would cut that path of the reference)
    assert torch.allclose(t.grad.double(), torch.softmax(t64, -1) - torch.softmax(s64, -1), atol=1e-5)


def test_per_token_kl_bf16_inputs_computed_in_fp32():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(2, 3, 40, generator=g) * 5, torch.randn(2, 3, 40, generator=g) * 5
    s16, t16 = s.bfloat16(), t.bfloat16()
    got = topd.per_token_kl(s16, t16)
    assert got.dtype == torch.float32
    # the reference on the SAME rounded logits: only the reduction precision differs
    assert torch.allclose(got.double(), _brute_reverse_kl(s16.float(), t16.float()), rtol=1e-5, atol=1e-5)


def test_token_logprobs_hand_case_and_grad():
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)]], requires_grad=True)
    lp = fused_kernels.token_logprobs(logits, torch.tensor([2]))
    assert lp.item() == pytest.approx(math.log(0.5), abs=1e-6)
    lp.sum().backward()
    # d log softmax(z)_2 / dz = onehot(2) - softmax = [-.25, -.25, .5]
    assert torch.allclose(logits.grad, torch.tensor([[-0.25, -0.25, 0.5]]), atol=1e-6)


def test_token_logprobs_matches_reference_and_rejects_out_of_vocab():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 6, 13, generator=g)
    ids = torch.randint(0, 13, (3, 6), generator=g)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None]).squeeze(-1)
    assert torch.allclose(fused_kernels.token_logprobs(logits, ids, chunk_size=4).double(), ref, atol=1e-6)
    ids[0, 0] = 12
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_kernels.token_logprobs(logits, ids, vocab_size=5)


def test_token_logprobs_gradcheck():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 6, (3, 4), generator=g)
    assert torch.autograd.gradcheck(lambda x: fused_kernels.token_logprobs(x, ids, chunk_size=5), (z,),
                                    eps=1e-3, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------------------- sec. 1 estimators

def test_sampled_estimator_is_unbiased_for_the_exact_kl():
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(1, 1, 8, generator=g) * 2, torch.randn(1, 1, 8, generator=g) * 2
    exact = topd.per_token_kl(s, t).item()
    n = 200_000
    ids = torch.multinomial(torch.softmax(s[0, 0], -1), n, replacement=True, generator=g).view(1, n)
    s_rep, t_rep = s.expand(1, n, 8), t.expand(1, n, 8)
    tl = topd.opd_token_loss(s_rep, ids, estimator="sampled",
                             teacher_logprobs=fused_kernels.token_logprobs(t_rep, ids))
    est = tl.loss.mean().item()
    stderr = tl.loss.std().item() / math.sqrt(n)
    assert abs(est - exact) < 4 * stderr


def test_sampled_surrogate_gradient_is_detached_reward_times_score():
    """grad of the surrogate = sg(l) * grad log p(y): check against the hand-written formula (trap 8)."""
    z = torch.tensor([[[0.5, -1.0, 2.0]]], requires_grad=True)
    teacher_lp = torch.tensor([[-0.3]])
    y = torch.tensor([[1]])
    tl = topd.opd_token_loss(z, y, estimator="sampled", teacher_logprobs=teacher_lp)
    tl.surrogate.sum().backward()
    p = torch.softmax(z.detach(), -1)[0, 0]
    reward = math.log(p[1].item()) - (-0.3)
    expected = reward * (torch.nn.functional.one_hot(torch.tensor(1), 3).float() - p)
    assert tl.loss.item() == pytest.approx(reward, abs=1e-6)
    assert torch.allclose(z.grad[0, 0], expected, atol=1e-6)
    # the naive mistake (back-propagating l itself) gives a different gradient: our test can tell them apart
    naive = torch.nn.functional.one_hot(torch.tensor(1), 3).float() - p
    assert not torch.allclose(expected, naive, atol=1e-3)


def test_full_estimator_surrogate_is_the_kl():
    g = torch.Generator().manual_seed(10)
    s, t = torch.randn(2, 3, 5, generator=g, requires_grad=True), torch.randn(2, 3, 5, generator=g)
    tl = topd.opd_token_loss(s, torch.zeros(2, 3, dtype=torch.long), estimator="full", teacher_logits=t)
    assert tl.surrogate.requires_grad and not tl.loss.requires_grad
    assert torch.allclose(tl.loss, topd.per_token_kl(s.detach(), t))
    assert tl.entropy.shape == (2, 3)


def test_both_estimators_report_the_same_student_entropy():
    """Regression (review item 7): `entropy` was missing from the metrics with --kl sampled. Both estimators
    report the student's entropy per position, equal to a float64 reference, with a -inf column included."""
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    s[0, 0, 2] = -math.inf  # a masked token: contributes nothing to the entropy
    ids = torch.randint(0, 6, (2, 3), generator=g)
    ids[0, 0] = 1
    full = topd.opd_token_loss(s, ids, estimator="full", teacher_logits=t)
    sampled = topd.opd_token_loss(s, ids, estimator="sampled", teacher_logprobs=fused_kernels.token_logprobs(t, ids))
    logp = torch.log_softmax(s.double(), -1)
    ref = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    assert sampled.entropy is not None
    assert torch.allclose(sampled.entropy.double(), ref, atol=1e-5)
    assert torch.allclose(full.entropy.double(), ref, atol=1e-5)
    loss, stats = topd.topd_objective("opd", sampled, torch.ones(2, 3), 6.0)
    assert "entropy" in stats


def test_opd_token_loss_errors():
    s = torch.zeros(1, 2, 3)
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="teacher_logits"):
        topd.opd_token_loss(s, ids, estimator="full")
    with pytest.raises(ValueError, match="teacher_logprobs"):
        topd.opd_token_loss(s, ids, estimator="sampled")
    with pytest.raises(ValueError, match="unknown estimator"):
        topd.opd_token_loss(s, ids, estimator="k3", teacher_logits=s)


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_masked_positions_contribute_nothing(estimator):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(2, 6, 7, generator=g, requires_grad=True)
    t = torch.randn(2, 6, 7, generator=g)
    ids = torch.randint(0, 7, (2, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    tl = topd.opd_token_loss(s, ids, estimator=estimator, teacher_logits=t, teacher_logprobs=fused_kernels.token_logprobs(t, ids))
    topd.opd_loss(tl.surrogate, mask, None, mask.sum()).backward()
    assert s.grad[0, 3:].abs().max() == 0
    assert s.grad[0, :3].abs().max() > 0


# ------------------------------------------------------------------------------------------- sec. 2 candidates

def test_select_candidates_docstring_example_and_ties():
    loss = torch.tensor([[5.0, 9.0, 8.0, 1.0, 7.0]])
    mask = torch.ones(1, 5)
    assert topd.select_candidates(loss, mask, 3, 2).tolist() == [[1, 4, -1]]
    # ties: the earlier position wins, and min_gap then removes its equal neighbour
    tie = torch.tensor([[3.0, 3.0, 3.0, 0.0]])
    assert topd.select_candidates(tie, torch.ones(1, 4), 2, 2).tolist() == [[0, 2]]


def test_select_candidates_min_gap_mask_and_eos():
    loss = torch.tensor([[1.0, 2.0, 10.0, 9.0, 8.0, 3.0, 4.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])      # position 8 is padding after EOS
    special = torch.zeros(1, 9, dtype=torch.bool)
    special[0, 7] = True                                    # position 7 is the EOS: in the mask, never a candidate
    got = topd.select_candidates(loss, mask, 4, min_gap=3, special=special)
    assert got.tolist() == [[2, 6, -1, -1]]  # 2 (10), then 3,4 too close, 6 (4); 0..1 and 5 are within gap
    # min_gap 1 = only distinct positions
    assert topd.select_candidates(loss, mask, 3, 1, special).tolist() == [[2, 3, 4]]


def test_select_candidates_fewer_tokens_than_candidates_and_empty_rows():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[0, 0, 0], [1, 0, 1]])
    got = topd.select_candidates(loss, mask, 4, 1)
    assert got.tolist() == [[-1, -1, -1, -1], [2, 0, -1, -1]]


def test_select_candidates_never_picks_masked_or_special_randomized():
    g = torch.Generator().manual_seed(12)
    for _ in range(20):
        loss = torch.rand(4, 30, generator=g) * 10
        mask = (torch.rand(4, 30, generator=g) > 0.3)
        special = torch.rand(4, 30, generator=g) > 0.9
        c = topd.select_candidates(loss, mask, 5, 4, special)
        for b in range(4):
            chosen = [p for p in c[b].tolist() if p >= 0]
            assert all(mask[b, p] and not special[b, p] for p in chosen)
            assert all(abs(p - q) >= 4 for i, p in enumerate(chosen) for q in chosen[i + 1:])
            # greedy order: losses non-increasing
            vals = [loss[b, p].item() for p in chosen]
            assert vals == sorted(vals, reverse=True)



def test_random_states_keep_the_window_detectors_count_and_the_candidates_rules():
    """The random control: per rollout, as many divergent states as the window detector flagged, at positions drawn
    at random (in the mask, never special, min_gap apart), not at the high-loss ones; the same generator seed gives
    the same states, another seed other states."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(6, 40, generator=g) > 0.2
    mask[5] = False  # an empty rollout: no state at all
    special = torch.rand(6, 40, generator=g) > 0.9
    divergent = torch.tensor([[True, False, False], [True, True, False], [False, False, False], [True, True, True],
                              [False, True, False], [True, False, False]])
    cands, div = topd.random_states(divergent, mask, special, 3, 4, torch.Generator().manual_seed(0))
    assert cands.shape == (6, 3) and div.shape == (6, 3)
    assert div[:5].sum(-1).tolist() == divergent[:5].sum(-1).tolist()  # the window's count per rollout
    assert (cands[5] == -1).all() and not div[5].any()  # nothing eligible, nothing divergent
    for b in range(6):
        chosen = [p for p in cands[b].tolist() if p >= 0]
        assert all(mask[b, p] and not special[b, p] for p in chosen)
        assert all(abs(p - q) >= 4 for i, p in enumerate(chosen) for q in chosen[i + 1:])
    again, _ = topd.random_states(divergent, mask, special, 3, 4, torch.Generator().manual_seed(0))
    other, _ = topd.random_states(divergent, mask, special, 3, 4, torch.Generator().manual_seed(1))
    assert torch.equal(again, cands) and not torch.equal(other, cands)
    # uniform over the eligible positions: over many draws every eligible position of a row is picked, not only the
    # first ones (a bias toward early or late positions would show as never-picked positions)
    picked = torch.zeros(40)
    for seed in range(300):
        c, _ = topd.random_states(divergent, mask, special, 3, 4, torch.Generator().manual_seed(seed))
        picked[c[0][c[0] >= 0]] += 1
    eligible = mask[0] & ~special[0]
    assert (picked[eligible] > 0).all() and (picked[~eligible] == 0).all()


# ------------------------------------------------------------------------------------------- sec. 3 detectors

def test_window_divergence_hand_cases():
    loss = torch.tensor([[1.0, 10.0, 2.0, 4.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert topd.window_divergence(loss, mask, torch.tensor([[1]]), 3).tolist() == [[3.0]]
    # window running past the end of the tensor is cut; candidate 2 with H 10 -> only position 3 is valid
    assert topd.window_divergence(loss, mask, torch.tensor([[2]]), 10).tolist() == [[4.0]]
    # last valid token: empty window -> 0; empty slot (-1) -> 0
    assert topd.window_divergence(loss, mask, torch.tensor([[3, -1]]), 2).tolist() == [[0.0, 0.0]]
    # H = 1: only the next token
    assert topd.window_divergence(loss, mask, torch.tensor([[0]]), 1).tolist() == [[10.0]]


def test_window_divergence_ignores_loss_values_on_padding():
    loss = torch.tensor([[1.0, 1.0, 1.0, 1e6, 1e6]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    assert topd.window_divergence(loss, mask, torch.tensor([[0]]), 4).item() == pytest.approx(1.0)


def test_continuation_margin_and_margin_w1_hand_cases():
    t_lp = torch.tensor([[-1.0, -1.0, -9.0]])
    s_lp = torch.tensor([[-2.0, -4.0, -0.0]])
    mask = torch.tensor([[1, 1, 0]])  # third token after the continuation's EOS
    assert topd.continuation_margin(t_lp, s_lp, mask).item() == pytest.approx(2.0)
    assert topd.margin_w1(torch.tensor([[3.0, 1.0]]), torch.tensor([[0.0, 0.0]])).item() == pytest.approx(2.0)
    # sorting matters: unsorted pairing would give (|1-2| + |3-0|)/2 = 2, sorted gives (|1-0| + |3-2|)/2 = 1
    assert topd.margin_w1(torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 0.0]])).item() == pytest.approx(1.0)
    # identical sets -> 0 whatever the order
    assert topd.margin_w1(torch.tensor([[5.0, -1.0, 2.0]]), torch.tensor([[2.0, 5.0, -1.0]])).item() == 0.0
    with pytest.raises(ValueError):
        topd.margin_w1(torch.zeros(1, 2), torch.zeros(1, 3))


def test_divergent_mask_absolute_and_relative():
    scores = torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    assert topd.divergent_mask(scores, valid, threshold=2.0).tolist() == [[False, True, True], [True, False, False]]
    # relative: row 0 tau = 2 + 0.5 * 0.8165 = 2.41; row 1 has one candidate -> always divergent
    assert topd.divergent_mask(scores, valid, alpha=0.5).tolist() == [[False, False, True], [True, False, False]]
    # alpha 0: above-or-at the mean
    assert topd.divergent_mask(scores, valid, alpha=0.0).tolist() == [[False, True, True], [True, False, False]]
    # equal scores: std 0, all divergent (D == tau)
    eq = torch.full((1, 3), 0.3)
    assert topd.divergent_mask(eq, torch.ones(1, 3, dtype=torch.bool), alpha=1.0).all()


# ------------------------------------------------------------------------------------------- sec. 4-5, modes

def _mode_fixture(seed=13):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 10, 9, generator=g, requires_grad=True)
    t = torch.randn(2, 10, 9, generator=g)
    ids = torch.randint(0, 9, (2, 10), generator=g)
    mask = torch.ones(2, 10)
    mask[1, 7:] = 0
    tl = topd.opd_token_loss(s, ids, estimator="full", teacher_logits=t)
    cands = topd.select_candidates(tl.loss, mask, 3, 2)
    scores = topd.window_divergence(tl.loss, mask, cands, 3)
    div = topd.divergent_mask(scores, cands >= 0, alpha=0.5)
    return s, tl, mask, cands, scores, div


def test_mode_opd_is_plain_masked_mean():
    s, tl, mask, *_ = _mode_fixture()
    loss, stats = topd.topd_objective("opd", tl, mask, mask.sum())
    assert loss.item() == pytest.approx(((tl.loss * mask).sum() / mask.sum()).item(), rel=1e-6)
    assert topd.reduce_stats([stats])["opd/teacher_kl"] == pytest.approx(loss.item(), rel=1e-6)


def test_mode_opd_suppress_weight_one_equals_opd_and_zero_kills_gradient():
    s, tl, mask, cands, scores, div = _mode_fixture()
    assert (~div & (cands >= 0)).any(), "fixture must have a non-divergent candidate"
    parts = dict(candidates=cands, scores=scores, divergent=div)
    base, _ = topd.topd_objective("opd", tl, mask, mask.sum())
    same, _ = topd.topd_objective("opd_suppress", tl, mask, mask.sum(), suppress_weight=1.0, **parts)
    assert same.item() == pytest.approx(base.item(), rel=1e-6)
    supp, stats = topd.topd_objective("opd_suppress", tl, mask, mask.sum(), suppress_weight=0.0, **parts)
    assert supp.item() < base.item()
    supp.backward()
    for b, c in zip(*torch.nonzero((cands >= 0) & ~div, as_tuple=True)):
        assert s.grad[b, cands[b, c]].abs().max() == 0  # exactly zero at suppressed positions
    reduce = topd.reduce_stats([stats])
    assert 0 < reduce["topd/nondiv_frac"] < 1
    assert reduce["topd/D_div_mean"] > reduce["topd/D_nondiv_mean"]


def test_mode_topd_with_guide_weight_zero_equals_opd_suppress_and_guide_adds_grad():
    s, tl, mask, cands, scores, div = _mode_fixture()
    parts = dict(candidates=cands, scores=scores, divergent=div)
    supp, _ = topd.topd_objective("opd_suppress", tl, mask, mask.sum(), **parts)
    g = torch.Generator().manual_seed(0)
    teacher_win = torch.randn(2, 2, 4, 9, generator=g)
    student_win = torch.randn(2, 2, 4, 9, generator=g, requires_grad=True)
    wkl = fused_kernels.kl_divergence(teacher_win, student_win)  # forward KL along the teacher's branch
    wmask = torch.ones(2, 2, 4)
    total = topd.guide_weights(wmask, 1.0).sum()
    zero_guided, _ = topd.topd_objective("topd", tl, mask, mask.sum(), window_kl=wkl, window_mask=wmask,
                                         guide_total=total, guide_weight=0.0, **parts)
    assert zero_guided.item() == pytest.approx(supp.item(), rel=1e-6)
    guided, stats = topd.topd_objective("topd", tl, mask, mask.sum(), window_kl=wkl, window_mask=wmask,
                                        guide_total=total, guide_weight=2.0, **parts)
    assert guided.item() == pytest.approx(supp.item() + 2.0 * wkl.mean().item(), rel=1e-5)
    guided.backward()
    assert student_win.grad.abs().max() > 0
    assert topd.reduce_stats([stats])["guide/tokens"] == 16


def test_guide_loss_decay_and_mask():
    kl = torch.tensor([[[1.0, 2.0, 4.0]]])
    mask = torch.tensor([[[1, 1, 0]]])
    w = topd.guide_weights(mask, 0.5)
    assert w.tolist() == [[[1.0, 0.5, 0.0]]]
    assert topd.guide_loss(kl, mask, 0.5, w.sum()).item() == pytest.approx((1 + 1) / 1.5)


def test_unknown_mode_and_missing_parts():
    _, tl, mask, *_ = _mode_fixture()
    with pytest.raises(ValueError, match="unknown mode"):
        topd.topd_objective("grpo", tl, mask, 1.0)
    with pytest.raises(ValueError, match="needs candidates"):
        topd.topd_objective("topd", tl, mask, 1.0)


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_micro_batches_with_global_normaliser_give_the_whole_batch_gradient(estimator):
    """Trap 5: splitting rows of different lengths into micro-batches must not reweight tokens."""
    g = torch.Generator().manual_seed(14)
    s0, t = torch.randn(4, 8, 6, generator=g), torch.randn(4, 8, 6, generator=g)
    ids = torch.randint(0, 6, (4, 8), generator=g)
    mask = torch.zeros(4, 8)
    for b, n in enumerate([8, 2, 5, 1]):
        mask[b, :n] = 1
    t_lp = fused_kernels.token_logprobs(t, ids)

    def grad_of(rows_list, per_micro_normaliser):
        s = s0.clone().requires_grad_(True)
        for rows in rows_list:
            tl = topd.opd_token_loss(s[rows], ids[rows], estimator=estimator, teacher_logits=t[rows],
                                     teacher_logprobs=t_lp[rows])
            n = mask[rows].sum() if per_micro_normaliser else mask.sum()
            topd.opd_loss(tl.surrogate, mask[rows], None, n).backward()
        return s.grad

    whole = grad_of([slice(0, 4)], False)
    split = grad_of([slice(0, 2), slice(2, 4)], False)
    assert torch.allclose(whole, split, atol=1e-7)
    # and the classic mistake (per-micro-batch mean, then summed) really differs: the test can fail
    wrong = grad_of([slice(0, 2), slice(2, 4)], True)
    assert not torch.allclose(whole, wrong, atol=1e-4)


def test_reduce_stats_sums_before_dividing():
    a = {"x": (torch.tensor(2.0), torch.tensor(1.0))}
    b = {"x": (torch.tensor(0.0), torch.tensor(3.0)), "y": (torch.tensor(1.0), torch.tensor(0.0))}
    out = topd.reduce_stats([a, b])
    assert out["x"] == 0.5 and math.isnan(out["y"])
