"""
topd.py -- the whole TOPD objective as pure tensor functions.

TOPD (Trajectory-aware On-Policy Distillation; Jiang & Ferraro, arXiv:2606.00305) starts from plain on-policy
distillation (OPD): the student samples its own answer, the teacher scores every sampled token, and the student
minimises a per-token reverse KL. The paper observes that many of the highest-loss tokens are harmless
surface-form differences (the student writes "," where the teacher writes ";"), while the real reasoning forks
need guidance over several future tokens, not one. TOPD therefore

  1. picks the highest-loss tokens of each rollout (candidates),
  2. looks at the near future after each one to decide whether it is a real fork (divergent) or not,
  3. suppresses the non-divergent ones in the OPD loss, and
  4. at divergent states teaches the teacher's own continuation over a short window (future-distributed guidance).

This file has no model code: every function takes tensors and returns tensors, so a reader can check each one
against the spec (`TOPD_SPEC.md`, section numbers below) and a researcher can lift it into their own trainer.
Model calls (sampling, teacher scoring, the probe) live in sample.py / teacher.py; train.py glues them together.

Map of this file to the spec                                        | where it comes from
--------------------------------------------------------------------+---------------------------------------------
token_logprobs, per_token_kl, kl_divergence   fp32 log-softmax, KL  | spec "Notation"; OPD traps 1, 7, 10
opd_token_loss  (`full` / `sampled`)          sec. 1, l_t           | paper ("local reverse-KL correction")
select_candidates                             sec. 2, H             | paper + author code (3 candidates, gap 8)
window_divergence                             sec. 3, `window`      | OURS (no extra generation)
continuation_margin, margin_w1                sec. 3, `probe`       | author code (probe + sorted-margin 1-D OT)
divergent_mask                                sec. 3, threshold     | author code (mean + alpha * std)
suppression_weights, opd_loss                 sec. 4 + L_OPD        | paper ("suppressing non-divergent ...")
guide_weights, guide_loss                     sec. 5, L_guide       | OURS: direction (forward KL on the teacher's
                                                                    |   branch), decay gamma, normalisation
topd_objective                                the three modes       | paper's three table rows
reduce_stats                                  diagnostics           | spec "Diagnostics"

Reconstructed parts (the paper's text is not public beyond its abstract) are marked OURS here and in the README.

Shapes use one notation throughout: B rollouts, T response positions, V vocabulary, C candidates per rollout,
N probed states, K continuations per state, H horizon (tokens per continuation).

Run `python topd.py` for a worked example on hand-made tensors (CPU, about a second).
"""

from __future__ import annotations

import math

import torch

from kernels import DEFAULT_CHUNK, kl_divergence, token_logprobs


# ----------------------------------------------------------------------------------------------------------------
# Sec. 1: the per-token OPD loss l_t, two estimators
# ----------------------------------------------------------------------------------------------------------------

def per_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, vocab_size: int | None = None,
                 chunk_size: int = DEFAULT_CHUNK, return_entropy: bool = False):
    """Reverse KL per position, KL(pi_theta || pi_T) = sum_v p_S (log p_S - log p_T)   (spec sec. 1, `full`).

    "Reverse" because the expectation is under the student: the student is pulled toward modes the teacher
    likes and pays for mass where the teacher has none (mode seeking). Gradient flows to the student logits
    analytically (no sampling noise); the teacher logits should come from a no_grad forward.
    (B, T, V) x (B, T, V') -> (B, T) fp32.
    """
    return kl_divergence(student_logits, teacher_logits, vocab_size=vocab_size, chunk_size=chunk_size,
                         return_entropy=return_entropy)


class TokenLoss:
    """What opd_token_loss returns.

    loss      (B, T) fp32, detached: l_t, the per-token reverse KL (exact, or its one-sample estimate). This is the
              number candidates are ranked by and the one logged as the teacher KL.
    surrogate (B, T) fp32 with grad: the quantity whose gradient is the estimator's gradient of l_t. For `full`
              it is l_t itself; for `sampled` it is sg(l_t) * log pi_theta(y_t) (REINFORCE), whose VALUE means
              nothing. Losses are built from the surrogate and logged from `loss`.
    entropy   (B, T) fp32, detached, or None: the student's entropy per position (diagnostic).
    """

    def __init__(self, loss, surrogate, entropy=None):
        self.loss, self.surrogate, self.entropy = loss, surrogate, entropy


def opd_token_loss(student_logits: torch.Tensor, ids: torch.Tensor, *, estimator: str = "full",
                   teacher_logits: torch.Tensor | None = None, teacher_logprobs: torch.Tensor | None = None,
                   vocab_size: int | None = None, chunk_size: int = DEFAULT_CHUNK) -> TokenLoss:
    """Per-token OPD loss of the sampled response (spec sec. 1).

    student_logits: (B, T, V) with grad, aligned with ids (B, T) (logits[:, t] produced ids[:, t]).
    estimator="full":    teacher_logits (B, T, V') required;  l_t = KL(pi_theta(.|s_t) || pi_T(.|s_t)).
    estimator="sampled": teacher_logprobs (B, T) required (log pi_T(y_t|s_t), no grad);
                         l_t = log pi_theta(y_t) - log pi_T(y_t),  surrogate = sg(l_t) * log pi_theta(y_t).

    Why the `sampled` surrogate detaches l_t (OPD trap 8): E_y[grad l_t] = E_y[grad log pi_theta(y)] = 0, so
    back-propagating the log-ratio itself trains nothing on average. The REINFORCE form has the right gradient:
    E_y[l(y) * grad log pi_theta(y)] = grad KL.
    Both estimators assume y_t was sampled from pi_theta at temperature 1 with no top-k/top-p (spec "Notation").
    """
    if estimator == "full":
        if teacher_logits is None:
            raise ValueError("estimator='full' needs teacher_logits")
        kl, entropy = per_token_kl(student_logits, teacher_logits, vocab_size=vocab_size, chunk_size=chunk_size,
                                   return_entropy=True)  # (B, T), (B, T)
        return TokenLoss(kl.detach(), kl, entropy)
    if estimator == "sampled":
        if teacher_logprobs is None:
            raise ValueError("estimator='sampled' needs teacher_logprobs")
        student_logp, entropy = token_logprobs(student_logits, ids, vocab_size=vocab_size, chunk_size=chunk_size,
                                               return_entropy=True)  # (B, T), (B, T)
        reward_free_loss = student_logp.detach() - teacher_logprobs.detach().float()  # l_t, no grad
        return TokenLoss(reward_free_loss, reward_free_loss * student_logp, entropy)  # sg(l_t) * log pi_theta(y_t)
    raise ValueError(f"unknown estimator {estimator!r}: expected 'full' or 'sampled'")


# ----------------------------------------------------------------------------------------------------------------
# Sec. 2: high-loss candidates
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def select_candidates(loss: torch.Tensor, mask: torch.Tensor, num_candidates: int, min_gap: int,
                      special: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy top-loss positions per rollout, at least `min_gap` tokens apart (spec sec. 2).

    loss (B, T), mask (B, T) bool/0-1 response mask, special (B, T) bool: positions never to pick (EOS and other
    special tokens; they are in the loss mask so the student learns to stop, but "where to stop" is not a
    reasoning fork). Returns (B, C) long positions in the order picked (highest loss first), -1 where a rollout
    has fewer eligible positions than C. Ties go to the earlier position (argmax returns the first maximum).

    Vectorised greedy: C rounds of "take the argmax, then blank out everything closer than min_gap to it".
    Example (min_gap 2): loss [5, 9, 8, 1, 7] -> pick 1 (9); blank 0..2; pick 4 (7); blank 3..4; -> [1, 4, -1].
    """
    if num_candidates < 0 or min_gap < 0:
        raise ValueError(f"num_candidates and min_gap must be >= 0, got {num_candidates}, {min_gap}")
    B, T = loss.shape
    eligible = mask.bool() if special is None else mask.bool() & ~special.bool()
    score = loss.detach().float().masked_fill(~eligible, -math.inf)  # (B, T)
    positions = torch.arange(T, device=loss.device)  # (T,)
    picked = torch.full((B, num_candidates), -1, dtype=torch.long, device=loss.device)
    for c in range(num_candidates):
        best = score.argmax(dim=-1)  # (B,)
        found = torch.isfinite(score.gather(-1, best[:, None]).squeeze(-1))  # (B,) False once a row is exhausted
        picked[:, c] = torch.where(found, best, -1)
        too_close = (positions[None, :] - best[:, None]).abs() < max(min_gap, 1)  # (B, T), includes `best` itself
        score = score.masked_fill(too_close & found[:, None], -math.inf)
    return picked


# ----------------------------------------------------------------------------------------------------------------
# Sec. 3: near-future divergence D_t (two detectors) and the threshold rule
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def window_divergence(loss: torch.Tensor, mask: torch.Tensor, candidates: torch.Tensor, horizon: int) -> torch.Tensor:
    """`--detector window` (OURS): D_t = mean of l over the next `horizon` response tokens, t+1 .. t+H.

    loss, mask: (B, T); candidates: (B, C) positions, -1 = empty slot. Returns (B, C) fp32.
    Only masked-in positions count (the window stops at EOS, and is cut at the end of the tensor); an empty window
    (a candidate on the last token of a truncated rollout) gives D = 0, i.e. "no evidence of drift".
    Idea: after a surface-form slip the teacher agrees with what follows (small l); after a real fork the student
    keeps drifting away from what the teacher would do (large l).

    Example: loss [1, 10, 2, 4, 0], mask [1, 1, 1, 1, 0], candidate 1, H = 3 -> mean(2, 4) = 3.0 (position 4 masked).
    """
    B, T = loss.shape
    m = mask.float()
    # prefix sums with a leading zero: window sum over (t, t+H] = cs[min(t+H, T-1) + 1] - cs[t + 1]
    zeros = torch.zeros(B, 1, device=loss.device)
    loss_cs = torch.cat([zeros, torch.cumsum(loss.detach().float() * m, dim=-1)], dim=-1)  # (B, T+1)
    count_cs = torch.cat([zeros, torch.cumsum(m, dim=-1)], dim=-1)  # (B, T+1)
    start = candidates.clamp(min=0) + 1  # (B, C) index into cs: positions < start excluded
    end = (candidates.clamp(min=0) + horizon).clamp(max=T - 1) + 1  # (B, C) positions < end included
    end = torch.maximum(end, start)  # an empty window when the candidate is the last position
    window_sum = loss_cs.gather(-1, end) - loss_cs.gather(-1, start)
    window_count = count_cs.gather(-1, end) - count_cs.gather(-1, start)
    score = window_sum / window_count.clamp(min=1)  # empty window -> 0 / 1 = 0
    return score.masked_fill(candidates < 0, 0.0)


def continuation_margin(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """mu(c) = mean_j [log pi_T(c_j | ...) - log pi_theta(c_j | ...)] over the continuation's valid tokens.

    (..., H) x (..., H) x (..., H) -> (...). Valid = up to and including the continuation's EOS (spec sec. 3).
    A continuation the teacher likes more than the student does has a large positive margin.
    """
    m = mask.float()
    return ((teacher_logprobs.float() - student_logprobs.float()) * m).sum(-1) / m.sum(-1).clamp(min=1)


def margin_w1(teacher_margins: torch.Tensor, student_margins: torch.Tensor) -> torch.Tensor:
    """`--detector probe` (author code): D_t = 1-D Wasserstein distance between the two margin sets.

    teacher_margins (N, K): mu of K continuations the TEACHER sampled from s_t; student_margins (N, K): of K the
    STUDENT sampled. Between two empirical distributions with K equal-weight atoms each, W1 pairs them in sorted
    order: D = (1/K) sum_k |sort(mu_T)_k - sort(mu_S)_k|. Returns (N,).

    At a surface-form mismatch the student's continuations are about as acceptable to the teacher as the teacher's
    own (similar margins, small D); at a real fork the teacher's continuations are far better by the teacher's own
    measure (large D). Example: mu_T = [3, 1], mu_S = [0, 0] -> (|1 - 0| + |3 - 0|) / 2 = 2.0.
    """
    if teacher_margins.shape != student_margins.shape:
        raise ValueError(f"margin sets differ in shape: {tuple(teacher_margins.shape)} vs {tuple(student_margins.shape)}")
    t_sorted = teacher_margins.float().sort(dim=-1).values
    s_sorted = student_margins.float().sort(dim=-1).values
    return (t_sorted - s_sorted).abs().mean(dim=-1)


def divergent_mask(scores: torch.Tensor, valid: torch.Tensor, *, alpha: float = 0.5,
                   threshold: float | None = None) -> torch.Tensor:
    """Which candidates are real forks: D_t >= tau (spec sec. 3).

    scores (B, C) fp32, valid (B, C) bool (False for empty candidate slots). Returns (B, C) bool, False where invalid.
    threshold given: tau is that absolute number (nats/token).
    threshold None:  tau = mean + alpha * std of D over the rollout's valid candidates (population std), the
                     author code's relative rule. With one candidate std = 0 and tau = D: always divergent.
    Example (alpha 0.5): D = [1, 2, 3] -> mean 2, std 0.816, tau 2.41 -> [False, False, True].
    """
    valid = valid.bool()
    if threshold is not None:
        return (scores >= threshold) & valid
    v = valid.float()
    n = v.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    mean = (scores * v).sum(-1, keepdim=True) / n
    std = (((scores - mean) ** 2) * v).sum(-1, keepdim=True).div(n).sqrt()
    # a tiny tolerance so that equal scores (std = 0, D == tau) compare as >= despite rounding
    tau = mean + alpha * std - 1e-6 * (1.0 + mean.abs())
    return (scores >= tau) & valid


# ----------------------------------------------------------------------------------------------------------------
# Sec. 4 and 5: the two loss terms, and the three modes
# ----------------------------------------------------------------------------------------------------------------

def suppression_weights(mask: torch.Tensor, candidates: torch.Tensor, divergent: torch.Tensor,
                        suppress_weight: float) -> torch.Tensor:
    """w (B, T): suppress_weight at the non-divergent candidates, 1 everywhere else (spec sec. 4).

    candidates (B, C) positions (-1 = none), divergent (B, C) bool.
    """
    weights = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)  # (B, T)
    suppressed = (candidates >= 0) & ~divergent.bool()  # (B, C)
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(candidates)  # (B, C)
    weights[rows[suppressed], candidates[suppressed]] = float(suppress_weight)
    return weights


def opd_loss(token_loss: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None,
             num_tokens: float | torch.Tensor) -> torch.Tensor:
    """L_OPD = sum_{b,t} w m l / N  (spec sec. 1, with sec. 4's weights).

    token_loss (B, T): pass TokenLoss.surrogate to train, TokenLoss.loss to log. mask (B, T), weights (B, T) or None.
    num_tokens N: the number of response tokens in the WHOLE optimizer step (all micro-batches, all ranks), computed
    before any backward (OPD trap 5). Dividing each micro-batch by its own count would weight a token from a short
    micro-batch more than one from a long micro-batch; with the global N the micro-batch sums add up exactly.
    """
    w = mask.float() if weights is None else mask.float() * weights
    return (token_loss * w).sum() / num_tokens


def guide_weights(mask: torch.Tensor, decay: float) -> torch.Tensor:
    """gamma^j over each guidance window (OURS), zero after the window's EOS.  (..., H) -> (..., H) fp32.

    The sum of these over the optimizer step (all ranks) is L_guide's normaliser; train.py all-reduces it.
    """
    H = mask.shape[-1]
    gamma = decay ** torch.arange(H, dtype=torch.float32, device=mask.device)  # (H,)
    return mask.float() * gamma


def guide_loss(window_kl: torch.Tensor, mask: torch.Tensor, decay: float,
               total_weight: float | torch.Tensor) -> torch.Tensor:
    """L_guide = sum_{t*,k,j} gamma^j KL(pi_T || pi_theta)(s_t*, c^T_{k,<j}) / sum gamma^j   (spec sec. 5, OURS).

    window_kl (N, K, H) with grad: the FORWARD KL along the teacher's continuation c^T of each divergent state, from
    kl_divergence(teacher_logits, student_logits). mask (N, K, H): up to and including the continuation's EOS.
    total_weight: sum of guide_weights over the optimizer step (all micro-batches and ranks).

    Why forward KL here (our reading): on the teacher's branch the question is "does the student cover what the
    teacher would do next?", i.e. mass-covering supervision of the teacher's trajectory, the opposite role to the
    on-policy reverse KL on the student's own trajectory.
    """
    return (window_kl * guide_weights(mask, decay)).sum() / total_weight


MODES = ("opd", "opd_suppress", "topd")


def topd_objective(mode: str, token_loss: TokenLoss, mask: torch.Tensor, num_tokens, *,
                   candidates: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                   divergent: torch.Tensor | None = None, suppress_weight: float = 0.0,
                   window_kl: torch.Tensor | None = None, window_mask: torch.Tensor | None = None,
                   guide_total=None, guide_weight: float = 1.0, guide_decay: float = 1.0):
    """L_TOPD = L_OPD(w) + lambda * L_guide for the paper's three rows (spec "Modes").

      mode          | weights w                                  | guidance
      opd           | 1 everywhere                               | none
      opd_suppress  | suppress_weight at non-divergent candidates | none
      topd          | as opd_suppress                            | lambda * guide_loss over the divergent windows

    Parts are computed elsewhere (the model calls live in train.py): token_loss from opd_token_loss; candidates,
    scores (D) and divergent from select_candidates / a detector / divergent_mask; window_kl + window_mask for the
    teacher windows of the divergent states (topd only). num_tokens and guide_total are the global normalisers.

    Returns (loss, stats). stats maps a name to (numerator, denominator) float tensors so that micro-batches and
    ranks can be summed before dividing (see reduce_stats); nothing in it carries grad.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    m = mask.float()
    zero, one = m.new_zeros(()), m.new_ones(())
    weights = None
    stats = {"opd/teacher_kl": ((token_loss.loss * m).sum(), m.sum())}
    if token_loss.entropy is not None:
        stats["entropy"] = ((token_loss.entropy * m).sum(), m.sum())

    if mode != "opd":
        if candidates is None or scores is None or divergent is None:
            raise ValueError(f"mode {mode!r} needs candidates, scores and divergent")
        weights = suppression_weights(mask, candidates, divergent, suppress_weight)
        valid = candidates >= 0
        nondiv = valid & ~divergent
        stats["topd/candidates"] = (valid.sum().float(), float(mask.shape[0]) * one)  # per rollout
        stats["topd/nondiv_frac"] = (nondiv.sum().float(), valid.sum().float())
        stats["topd/D_div_mean"] = ((scores * divergent).sum(), divergent.sum().float())
        stats["topd/D_nondiv_mean"] = ((scores * nondiv).sum(), nondiv.sum().float())

    loss = opd_loss(token_loss.surrogate, mask, weights, num_tokens)
    weighted = m if weights is None else m * weights
    stats["opd/loss"] = ((token_loss.loss * weighted).sum(), m.sum())  # the weighted KL actually trained on

    if mode == "topd" and window_kl is not None and window_kl.numel() > 0:
        if window_mask is None or guide_total is None:
            raise ValueError("guidance needs window_mask and guide_total")
        guide = guide_loss(window_kl, window_mask, guide_decay, guide_total)
        loss = loss + guide_weight * guide
        wsum = guide_weights(window_mask, guide_decay).sum()
        stats["guide/loss"] = ((window_kl.detach() * guide_weights(window_mask, guide_decay)).sum(), wsum)
        stats["guide/tokens"] = (window_mask.float().sum(), one)
    elif mode == "topd":
        stats["guide/loss"] = (zero, zero)
        stats["guide/tokens"] = (zero, one)
    return loss, {k: (torch.as_tensor(n, dtype=torch.float32).detach(), torch.as_tensor(d, dtype=torch.float32).detach())
                  for k, (n, d) in stats.items()}


def reduce_stats(parts: list[dict]) -> dict[str, float]:
    """Sum (numerator, denominator) pairs over micro-batches (and, in train.py, ranks) and divide.

    A ratio with a zero denominator (e.g. no non-divergent candidate this step) is reported as NaN, not 0, so a
    plot never shows a fake value.
    """
    sums: dict[str, list[float]] = {}
    for part in parts:
        for k, (n, d) in part.items():
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] += float(n)
            acc[1] += float(d)
    return {k: (n / d if d else float("nan")) for k, (n, d) in sums.items()}


# ----------------------------------------------------------------------------------------------------------------
# Worked example
# ----------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    torch.manual_seed(0)
    print("One rollout of 12 response tokens over a 6-token vocabulary; the teacher agrees except at two places.")
    B, T, V = 1, 12, 6
    student = torch.randn(B, T, V) * 2
    teacher = student.clone()
    teacher[0, 3, :] = torch.tensor([6.0, 0, 0, 0, 0, 0])    # t=3: a surface-form slip, the future agrees again
    teacher[0, 7:11, :] = torch.randn(4, V) * 4               # t=7..10: a real fork, the teacher drifts away
    student.requires_grad_(True)
    ids = torch.distributions.Categorical(logits=student.detach()).sample()  # (B, T) the student's own tokens
    mask = torch.ones(B, T)
    mask[0, -1] = 0                                                          # one padding slot after EOS

    tl = opd_token_loss(student, ids, estimator="full", teacher_logits=teacher)
    print("l_t (reverse KL per token):", [round(x, 2) for x in tl.loss[0].tolist()])
    cands = select_candidates(tl.loss, mask, num_candidates=3, min_gap=2)
    print("candidates (greedy, gap 2): ", cands[0].tolist())
    D = window_divergence(tl.loss, mask, cands, horizon=3)
    print("window D (mean l of next 3):", [round(x, 2) for x in D[0].tolist()])
    div = divergent_mask(D, cands >= 0, alpha=0.5)
    print("divergent (mean + 0.5 std):", div[0].tolist())
    print("probe D for margins mu_T=[3,1], mu_S=[0,0]:", margin_w1(torch.tensor([[3.0, 1.0]]), torch.tensor([[0.0, 0.0]])).item())
    N = mask.sum()
    for mode in MODES:
        window_kl = window_mask = None
        if mode == "topd":  # pretend the teacher continued for 3 tokens from each divergent state
            n_div = int(div.sum())
            window_kl = torch.rand(n_div, 2, 3, requires_grad=True)
            window_mask = torch.ones(n_div, 2, 3)
        loss, stats = topd_objective(mode, tl, mask, N, candidates=cands, scores=D, divergent=div,
                                     window_kl=window_kl, window_mask=window_mask,
                                     guide_total=None if window_mask is None else guide_weights(window_mask, 1.0).sum())
        shown = {k: round(v, 3) for k, v in reduce_stats([stats]).items()}
        print(f"{mode:13s} loss {loss.item():.3f} | {shown}")
