"""
topd.py -- the whole TOPD method: divergence detection and the future-distributed loss.

TOPD (Trajectory-aware On-Policy Distillation; Jiang & Ferraro, arXiv:2606.00305) starts from plain on-policy
distillation (OPD): the student samples its own answer, the teacher scores every sampled token, and the student
minimises a per-token reverse KL. The paper observes that many of the highest-loss tokens are harmless
surface-form differences (the student writes "," where the teacher writes ";"), while the real reasoning forks
need guidance over several future tokens, not one. TOPD therefore

  1. picks the highest-loss tokens of each rollout (candidates),
  2. looks at the near future after each one to decide whether it is a real fork (divergent) or not,
  3. suppresses the non-divergent ones in the OPD loss, and
  4. at divergent states teaches the teacher's own continuation over a short window (future-distributed guidance).

The file reads top-down as the method. Sections 1-5 and "the three modes" are pure tensor functions (tensors in,
tensors out: the part to check against docs/method.md and to lift into another trainer); "the model side" after
them asks the models for what the detectors need (continuations, their log-probs, the guidance windows) through
sample.py and teacher.py; the memory-bounded fp32 kernels live in fused_kernels.py.

Map of this file to the method (docs/method.md, same section numbers)  | where it comes from
-----------------------------------------------------------------------+------------------------------------------
TOPDConfig                                every knob, spec defaults    | docs/method.md "Knobs"
per_token_kl, opd_token_loss              sec. 1, l_t (full / sampled)  | paper ("local reverse-KL correction")
select_candidates                         sec. 2, H                     | paper + author code (3 candidates, gap 8)
window_divergence                         sec. 3, `window` detector     | OURS (no extra generation)
continuation_margin, margin_w1            sec. 3, `probe` detector      | author code (probe + sorted-margin 1-D OT)
divergent_mask                            sec. 3, threshold rule        | author code (mean + alpha * std) / OURS (abs.)
suppression_weights, opd_loss             sec. 4 + L_OPD                | paper ("suppressing non-divergent ...")
guide_weights, guide_loss                 sec. 5, L_guide               | OURS: direction (forward KL on the teacher's
                                                                        |   branch), decay gamma, normalisation
opd_objective, guide_objective,           the three modes: L_OPD(w) and | paper's three table rows
  topd_objective, reduce_stats              lambda L_guide, diagnostics |
detect, probe_divergence, teacher_windows the model side of sec. 3 + 5  | author code (probe) / OURS (cost rule)
guidance_kl                               the student on the windows    | OURS

Reconstructed parts (the paper's text is not public beyond its abstract) are marked OURS here and in the README.
Shapes use one notation throughout: B rollouts, T response positions, V vocabulary, C candidates per rollout,
N probed states, K continuations per state, H horizon (tokens per continuation).

Run `python topd.py` for a worked example on hand-made tensors (CPU, about a second).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

import parallel
import sample
import teacher as teacher_lib
from fused_kernels import DEFAULT_CHUNK, kl_divergence, token_logprobs

MODES = ("opd", "opd_suppress", "topd")
DETECTORS = ("probe", "window", "random")  # random: a control (random_states), not a detector


@dataclass
class TOPDConfig:
    """Every knob of the method, with the spec's defaults (docs/method.md). train.TrainConfig extends it, so each
    field is also a --kebab-case flag of train.py."""
    mode: str = "topd"             # opd | opd_suppress | topd: the paper's three rows (see "the three modes")
    kl: str = "full"               # l_t: full (exact reverse KL) | sampled (one-sample REINFORCE estimate)
    num_candidates: int = 4        # high-loss candidates per rollout (sec. 2)
    min_gap: int = 8               # minimum distance between candidates, in tokens
    detector: str = "probe"        # probe (sampled futures, margin W1) | window (mean loss of the next H tokens)
                                   # | random (a control: the window's count of divergent states, at random states)
    probe_samples: int = 4         # K continuations per model per candidate; K guidance windows per divergent state
    probe_tokens: int = 65536      # the probe's memory bound: cached prefix tokens (states x K x length) per chunk
    horizon: int = 32              # H tokens per continuation / window
    guide_horizon: int = 0         # tokens per guidance window (sec. 5) if not H; 0 = H (the spec: one H for both)
    div_rule: str = "relative"     # relative: tau = mean + alpha * std of D per rollout | absolute: tau = threshold
    div_alpha: float = 0.5         # alpha of the relative rule
    div_threshold: float = 1.0     # tau of the absolute rule, in D's units (nats/token); may be negative (--kl sampled)
    suppress_weight: float = 0.0   # weight of non-divergent candidates in L_OPD (sec. 4)
    guide_weight: float = 1.0      # lambda (sec. 5)
    guide_decay: float = 1.0       # gamma over the window (1 = uniform)

    @property
    def window_horizon(self) -> int:
        """The length of the guidance windows of sec. 5. The spec uses one H for the detector's look-ahead (sec. 3)
        and the windows; --guide-horizon sets the windows' alone, an ablation that tells which of the two a longer H
        helps through."""
        return self.guide_horizon or self.horizon

    @property
    def threshold(self) -> float | None:
        """The absolute tau, or None for the relative rule (divergent_mask's convention)."""
        return self.div_threshold if self.div_rule == "absolute" else None


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

    student_logits: (B, T, V) with grad, aligned with ids (B, T) (logits[:, t] produced ids[:, t]), or a
    fused_kernels.Head over (B, T, d) hidden states (the fused path that train.py uses; then teacher_logits is one too).
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
        return TokenLoss(loss=kl.detach(), surrogate=kl, entropy=entropy)
    if estimator == "sampled":
        if teacher_logprobs is None:
            raise ValueError("estimator='sampled' needs teacher_logprobs")
        student_logp, entropy = token_logprobs(student_logits, ids, vocab_size=vocab_size, chunk_size=chunk_size,
                                               return_entropy=True)  # (B, T), (B, T)
        reward_free_loss = student_logp.detach() - teacher_logprobs.detach().float()  # l_t, no grad
        return TokenLoss(loss=reward_free_loss, surrogate=reward_free_loss * student_logp,  # sg(l_t) * log pi(y_t)
                         entropy=entropy)
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


@torch.no_grad()
def random_states(divergent: torch.Tensor, mask: torch.Tensor, special: torch.Tensor, num_candidates: int,
                  min_gap: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`--detector random` (OURS, a control, not a detector): as many "divergent" states per rollout as the window
    detector found (`divergent`, (B, C) bool), but placed at random response positions instead of at the
    detector's high-loss, high-D states. With guidance on and nothing suppressed (`--mode topd --suppress-weight 1`)
    it gives OPD the same number of teacher-sampled windows as guidance with the window detector, so a table can
    tell "detecting the forks helps" from "extra teacher samples help".

    The random positions obey select_candidates' rules (in the mask, no special token, min_gap apart): they are
    select_candidates run on uniform noise instead of the loss. Returns (candidates (B, C), divergent (B, C)), the
    first n_b slots of row b divergent, n_b the window detector's count on that row (fewer if the row has fewer
    eligible positions). The noise comes from `generator`, on the rollouts' device."""
    noise = torch.rand(mask.shape, generator=generator, device=mask.device)
    candidates = select_candidates(noise, mask, num_candidates, min_gap, special)
    wanted = divergent.sum(dim=-1, keepdim=True)  # (B, 1) the window detector's count per rollout
    slots = torch.arange(candidates.shape[1], device=mask.device)[None, :]  # (1, C)
    return candidates, (slots < wanted) & (candidates >= 0)


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
        raise ValueError(f"margin sets differ in shape: {tuple(teacher_margins.shape)} vs "
                         f"{tuple(student_margins.shape)}")
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
# Sec. 4 and 5: the two loss terms
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


# ----------------------------------------------------------------------------------------------------------------
# The three modes: L_TOPD = L_OPD(w) + lambda * L_guide, and the diagnostics
# ----------------------------------------------------------------------------------------------------------------

# Statistics are (numerator, denominator) pairs, summed over micro-batches and ranks before dividing (reduce_stats).
# These few are counts per optimizer step instead of ratios: reduce_stats reports their summed numerator (the
# compute/ ones are train.py's, forward tokens of the step: checkpoint.ForwardTokens).
COUNTS = ("guide/tokens", "compute/student_tokens", "compute/teacher_tokens")


def opd_objective(mode: str, token_loss: TokenLoss, mask: torch.Tensor, num_tokens, *,
                  candidates: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                  divergent: torch.Tensor | None = None, suppress_weight: float = 0.0):
    """L_OPD(w) of one micro-batch, for the paper's three rows (spec "Modes"); train.py's phase A.

      mode          | weights w
      opd           | 1 everywhere
      opd_suppress  | suppress_weight at non-divergent candidates, 1 elsewhere
      topd          | as opd_suppress (its guidance term is guide_objective)

    token_loss from opd_token_loss; candidates, scores (D) and divergent from detect (or select_candidates / a
    detector / divergent_mask); num_tokens is the step's global normaliser N.
    Returns (loss, stats): stats maps a name to (numerator, denominator) float tensors, nothing in it carries grad.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    m = mask.float()
    stats = {"opd/teacher_kl": ((token_loss.loss * m).sum(), m.sum())}
    if token_loss.entropy is not None:
        stats["entropy"] = ((token_loss.entropy * m).sum(), m.sum())
    weights = None
    if mode != "opd":
        if candidates is None or scores is None or divergent is None:
            raise ValueError(f"mode {mode!r} needs candidates, scores and divergent")
        weights = suppression_weights(mask, candidates, divergent, suppress_weight)
        valid = candidates >= 0
        nondiv = valid & ~divergent
        stats["topd/candidates"] = (valid.sum().float(), torch.tensor(float(mask.shape[0])))  # per rollout
        stats["topd/nondiv_frac"] = (nondiv.sum().float(), valid.sum().float())  # the paper's "~30%", live
        stats["topd/D_div_mean"] = ((scores * divergent).sum(), divergent.sum().float())
        stats["topd/D_nondiv_mean"] = ((scores * nondiv).sum(), nondiv.sum().float())
    loss = opd_loss(token_loss.surrogate, mask, weights, num_tokens)
    trained = m if weights is None else m * weights
    stats["opd/loss"] = ((token_loss.loss * trained).sum(), m.sum())  # the weighted KL actually trained on
    return loss, _detached(stats)


def guide_objective(window_kl: torch.Tensor, window_mask: torch.Tensor, guide_total, *, guide_weight: float = 1.0,
                    guide_decay: float = 1.0):
    """lambda * L_guide over one batch of guidance windows (sec. 5); train.py's phase B.

    window_kl (N, K, H) with grad (guidance_kl), window_mask (N, K, H), guide_total the step's global normaliser
    (sum of guide_weights over all windows of all micro-batches and ranks). Returns (loss, stats).
    """
    w = guide_weights(window_mask, guide_decay)
    loss = guide_weight * guide_loss(window_kl, window_mask, guide_decay, guide_total)
    return loss, _detached({"guide/loss": ((window_kl.detach() * w).sum(), w.sum()),
                            "guide/tokens": (window_mask.float().sum(), torch.tensor(1.0))})


def no_guidance_stats() -> dict:
    """The guidance statistics of a micro-batch (or rank) with no divergent state: keys stay the same everywhere."""
    return _detached({"guide/loss": (torch.tensor(0.0), torch.tensor(0.0)),
                      "guide/tokens": (torch.tensor(0.0), torch.tensor(1.0))})


def topd_objective(mode: str, token_loss: TokenLoss, mask: torch.Tensor, num_tokens, *,
                   candidates: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                   divergent: torch.Tensor | None = None, suppress_weight: float = 0.0,
                   window_kl: torch.Tensor | None = None, window_mask: torch.Tensor | None = None,
                   guide_total=None, guide_weight: float = 1.0, guide_decay: float = 1.0):
    """L_TOPD = L_OPD(w) + lambda * L_guide as one expression: opd_objective + guide_objective (topd mode only).

    train.py back-propagates the two terms separately (phase A per micro-batch, phase B over the windows of the
    whole step); since L_TOPD is a sum, that is exactly this function's gradient, through the same two functions.
    """
    loss, stats = opd_objective(mode, token_loss, mask, num_tokens, candidates=candidates, scores=scores,
                                divergent=divergent, suppress_weight=suppress_weight)
    if mode != "topd":
        return loss, stats
    if window_kl is None or window_kl.numel() == 0:
        return loss, {**stats, **no_guidance_stats()}
    if window_mask is None or guide_total is None:
        raise ValueError("guidance needs window_mask and guide_total")
    guide, guide_stats = guide_objective(window_kl, window_mask, guide_total, guide_weight=guide_weight,
                                         guide_decay=guide_decay)
    return loss + guide, {**stats, **guide_stats}


def _detached(stats: dict) -> dict:
    return {k: (torch.as_tensor(n, dtype=torch.float32).detach(), torch.as_tensor(d, dtype=torch.float32).detach())
            for k, (n, d) in stats.items()}


def reduce_stats(parts: list[dict], all_reduce=None) -> dict[str, float]:
    """Sum (numerator, denominator) pairs over micro-batches (and, with all_reduce, over ranks), then divide.

    all_reduce: a function that sums a tensor over ranks in place (train.py passes its own); every rank must hold
    the same keys (they depend only on the mode). A ratio with a zero denominator (e.g. no non-divergent candidate
    this step) is NaN, not 0, so a plot never shows a fake value; COUNTS are reported as sums.
    One host sync in all: the pairs are stacked on the device, reduced, and read once.
    """
    keys = sorted({k for part in parts for k in part})
    device = next((n.device for part in parts for n, _ in part.values()), torch.device("cpu"))
    local = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)
    for part in parts:
        for i, k in enumerate(keys):
            if k in part:
                local[i] += torch.stack([torch.as_tensor(x, device=device).double() for x in part[k]])
    if all_reduce is not None:
        all_reduce(local)
    sums = local.tolist()
    return {k: (n if k in COUNTS else (n / d if d else float("nan"))) for k, (n, d) in zip(keys, sums)}


# ----------------------------------------------------------------------------------------------------------------
# The model side of sec. 3 and 5: candidates -> scores D -> divergent -> guidance windows
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Windows:
    """The guidance windows of sec. 5 at some divergent states: the student's encoded prefixes s_t* (a KV cache, no
    grad) and the teacher's K continuations of each, with the teacher's distribution along them as a fused_kernels.Head
    over its hidden states (the target of L_guide; no (N, K, H, V) logits are kept)."""
    student_prefixes: sample.EncodedPrefixes
    teacher_conts: sample.Continuations


@dataclass
class Detection:
    """What detect() found in one micro-batch of rollouts.

    candidates (B, C) positions (-1 = empty slot), scores (B, C) D_t, divergent (B, C) bool, windows: the guidance
    windows at the divergent states (topd mode; a list, one item per probe chunk with a divergent state)."""
    candidates: torch.Tensor
    scores: torch.Tensor
    divergent: torch.Tensor
    windows: list = dataclasses.field(default_factory=list)


@torch.no_grad()
def detect(student, teacher, rollouts: sample.Rollouts, token_loss: TokenLoss, cfg: TOPDConfig, *, special_ids,
           pad_id: int, eos_ids, vocab_size: int | None, generator: torch.Generator,
           windows_generator: torch.Generator | None = None, teacher_cache=None, lockstep: bool = False,
           decode: str = "eager") -> Detection:
    """Sec. 2-3 and the windows of sec. 5 for one micro-batch: candidates, D, the threshold rule, and (topd mode) the
    teacher's windows at the divergent states. The models must be in eval() (sample.eval_mode).

    special_ids: ids never to pick as candidates (sample.special_token_ids). teacher_cache: the teacher's KV cache of
    these rollouts from its scoring pass (teacher.score_rollouts(cache=...)); with rollouts.cache (the sampler's)
    the probe and the windows cut their prefixes out of them instead of re-encoding. generator draws the probe's
    continuations (or, --detector random, the random states), windows_generator (default: the same) the window
    and random detectors' guidance windows. lockstep: the models are sharded (FSDP), so every rank must run the same
    forwards whatever its candidates (parallel.py).
    """
    mask = rollouts.response_mask
    special = torch.isin(rollouts.response_ids, torch.as_tensor(list(special_ids), device=mask.device))
    candidates = select_candidates(token_loss.loss, mask, cfg.num_candidates, cfg.min_gap, special)  # (B, C)
    probe = None
    # the probe's teacher continuations are the guidance windows when they have the windows' length; with another
    # --guide-horizon the windows are sampled afresh at the divergent states, as for the window detector
    probe_makes_windows = cfg.mode == "topd" and cfg.window_horizon == cfg.horizon
    if cfg.detector == "probe":
        probe = probe_divergence(student, teacher, rollouts, candidates, k=cfg.probe_samples, horizon=cfg.horizon,
                                 pad_id=pad_id, eos_ids=eos_ids, vocab_size=vocab_size, generator=generator,
                                 keep_teacher_windows=probe_makes_windows, teacher_cache=teacher_cache,
                                 max_tokens=cfg.probe_tokens, lockstep=lockstep, decode=decode)
        scores = probe.scores
    else:
        scores = window_divergence(token_loss.loss, mask, candidates, cfg.horizon)
    divergent = divergent_mask(scores, candidates >= 0, alpha=cfg.div_alpha, threshold=cfg.threshold)
    if cfg.detector == "random":
        candidates, divergent = random_states(divergent, mask, special, cfg.num_candidates, cfg.min_gap, generator)
        scores = window_divergence(token_loss.loss, mask, candidates, cfg.horizon)  # D where the states now are
    windows = []
    if cfg.mode == "topd":
        windows = teacher_windows(student, teacher, rollouts, candidates, divergent, k=cfg.probe_samples,
                                  horizon=cfg.window_horizon, pad_id=pad_id, eos_ids=eos_ids, vocab_size=vocab_size,
                                  generator=windows_generator or generator,
                                  probe=probe if probe_makes_windows else None,
                                  teacher_cache=teacher_cache, lockstep=lockstep, max_tokens=cfg.probe_tokens,
                                  decode=decode)
    return Detection(candidates=candidates, scores=scores, divergent=divergent, windows=windows)


@dataclass
class Probe:
    """What the probe produced for one micro-batch: scores D (B, C), and, in topd mode, per chunk of states (see
    probe_divergence), the states' indices into torch.nonzero(candidates >= 0) and the teacher's continuations with
    its hidden states: at the divergent ones they are the guidance windows, no second sampling needed. No KV cache
    is kept: the divergent states' student prefixes are cut again from the rollout's cache (teacher_windows)."""
    scores: torch.Tensor
    chunks: list = dataclasses.field(default_factory=list)  # [(state indices, Continuations)]


def state_prefixes(model, rollouts: sample.Rollouts, rows, ts, cache, pad_id) -> sample.EncodedPrefixes:
    """States (rows[i], ts[i]) of the rollouts as encoded prefixes: cut from `cache` (a KV cache of the whole batch
    that sampling or teacher scoring already built) when there is one, else run through the model once each."""
    enc = sample.prefixes_from_cache(cache, rollouts, rows, ts) if cache is not None else None
    if enc is None:
        enc = sample.encode_prefixes(model, [rollouts.prefix(int(b), int(t)) for b, t in zip(rows, ts)], pad_id)
    return enc


def state_chunks(widths: torch.Tensor, k: int, horizon: int, max_tokens: int,
                 decode: str = "eager") -> list[torch.Tensor]:
    """Consecutive groups of states whose KV caches, as they are really laid out, hold at most max_tokens tokens.

    A chunk of n states is sampled from one cache of n * k rows (each continuation needs its own copy of its state's
    prefix in the batch), every row padded to the chunk's widest prefix and then extended by the horizon's tokens:
    n * k * (max width + horizon) cached tokens per model (147 KB per token for Qwen3-4B in bf16). widths (N,) are
    the states' cached prefix widths (the rollout batch's prompt width + t when cut from its cache). At the toy's
    30-token prefixes every state of a micro-batch fits in one chunk; at 16k-token prefixes the default (65536)
    probes one state at a time. A state whose own cache exceeds the budget gets a chunk of its own. Compiled decoding
    pads rows and columns to its buckets (sample.laid_out_tokens), and the bound counts the padded layout.
    Example: widths [10, 20, 30, 5], k 2, horizon 0, max 100 -> [[0, 1], [2], [3]]
             ([0, 1]: 2 x 2 x 20 = 80; adding 2 would make 3 x 2 x 30 = 180; [2, 3]: 2 x 2 x 30 = 120 > 100).
    """
    chunks, current, widest = [], [], 0
    for i, width in enumerate(widths.tolist()):
        if current and sample.laid_out_tokens((len(current) + 1) * k, max(widest, width) + horizon,
                                              decode) > max_tokens:
            chunks.append(current)
            current, widest = [], 0
        current.append(i)
        widest = max(widest, width)
    if current:
        chunks.append(current)
    return [torch.tensor(c, dtype=torch.long, device=widths.device) for c in chunks]


@torch.no_grad()
def probe_divergence(student, teacher, rollouts: sample.Rollouts, candidates: torch.Tensor, *, k: int, horizon: int,
                     pad_id: int, eos_ids, vocab_size: int | None, generator: torch.Generator,
                     keep_teacher_windows: bool = False, teacher_cache=None,
                     max_tokens: int = 65536, lockstep: bool = False, decode: str = "eager") -> Probe:
    """`--detector probe` (sec. 3): from each candidate state s_t, K continuations of H tokens by each model;
    each continuation's margin mu = mean_j [log pi_T - log pi_theta]; D = W1(sorted margins).

    Cost control (spec "Cost rule"): no prefix is re-encoded when the rollout's KV caches are at hand (the student's
    from sampling, rollouts.cache; the teacher's from its scoring pass, teacher_cache), and each state's cache serves
    both that model's sampling and its scoring of the other model's continuations. At temperature 1 the sampler's
    own log-probs are exact, so each continuation needs one extra scoring pass, by the other model only. States are
    probed in chunks of at most max_tokens cached prefix tokens (state_chunks, `--probe-tokens`), which bounds the
    memory at any rollout length; the teacher's window data is kept as hidden states, never as logits.
    lockstep (FSDP): every rank probes as many chunks as the busiest rank; a rank with fewer probes a stand-in
    state (its first rollout after one token) in the chunks it lacks and drops the result.
    """
    where = torch.nonzero(candidates >= 0)  # (N, 2): (row, slot) of every real candidate
    scores = torch.zeros(candidates.shape, dtype=torch.float32, device=candidates.device)
    probe = Probe(scores=scores)
    rows, ts = where[:, 0], candidates[where[:, 0], where[:, 1]]  # state s_t: the rollout `row` before token t
    decode = sample.continuation_decode(decode, candidates.device)  # how the continuations really decode
    chunks = state_chunks(rollouts.prompt_width + ts, k, horizon, max_tokens, decode) if len(where) else []
    probe_sampling = sample.SamplingConfig(temperature=1.0, vocab_size=vocab_size, lockstep=lockstep,  # the policies
                                           decode=decode)
    for i in range(parallel.max_over_ranks(len(chunks), lockstep)):
        chunk = chunks[i] if i < len(chunks) else None  # None: a stand-in chunk (lockstep only), result dropped
        state_rows, state_ts = (rows[chunk], ts[chunk]) if chunk is not None else _stand_in_state(candidates.device)
        s_enc = state_prefixes(student, rollouts, state_rows, state_ts, rollouts.cache, pad_id)
        t_enc = state_prefixes(teacher, rollouts, state_rows, state_ts, teacher_cache, pad_id)
        s_conts = sample.sample_continuations(student, s_enc, k, horizon, sampling=probe_sampling, eos_ids=eos_ids,
                                              pad_id=pad_id, generator=generator)
        t_conts = sample.sample_continuations(teacher, t_enc, k, horizon, sampling=probe_sampling, eos_ids=eos_ids,
                                              pad_id=pad_id, generator=generator, keep_hidden=keep_teacher_windows)
        teacher_on_student = teacher_lib.score_continuations(teacher, t_enc, s_conts, vocab_size=vocab_size)
        student_on_teacher = teacher_lib.score_continuations(student, s_enc, t_conts, vocab_size=vocab_size)
        mu_student = continuation_margin(teacher_on_student, s_conts.logprobs, s_conts.mask)  # (n, K)
        mu_teacher = continuation_margin(t_conts.logprobs, student_on_teacher, t_conts.mask)  # (n, K)
        if chunk is not None:
            scores[where[chunk, 0], where[chunk, 1]] = margin_w1(mu_teacher, mu_student)
            if keep_teacher_windows:
                probe.chunks.append((chunk, t_conts))
    return probe


def _stand_in_state(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, ts) of one state that every rollout batch has, row 0 after its first response token: what a rank
    with nothing (more) to probe runs so that its forwards match the other ranks' under FSDP."""
    return torch.zeros(1, dtype=torch.long, device=device), torch.ones(1, dtype=torch.long, device=device)


@torch.no_grad()
def teacher_windows(student, teacher, rollouts: sample.Rollouts, candidates, divergent, *, k: int, horizon: int,
                    pad_id: int, eos_ids, vocab_size: int | None, generator: torch.Generator,
                    probe: Probe | None = None, teacher_cache=None, lockstep: bool = False,
                    max_tokens: int = 65536, decode: str = "eager") -> list[Windows]:
    """The guidance windows of sec. 5 at the divergent states, as a list of Windows (empty when no state is
    divergent): one per chunk of states (a probe chunk that has a divergent state, or a chunk of the window
    detector's divergent states).

    With the probe detector they exist already (the teacher's probe continuations, hidden states kept): only the
    divergent states' rows are kept. The window detector samples them now, only at the divergent states, in chunks of
    at most max_tokens cached tokens (--probe-tokens, the bound the probe obeys; state_chunks). Under lockstep every
    rank samples as many chunks as the busiest rank, a rank with fewer running a stand-in state and dropping it."""
    where = torch.nonzero(candidates >= 0)
    is_divergent = divergent[where[:, 0], where[:, 1]]  # (N,) over the states in `where` order
    rows, ts = where[:, 0], candidates[where[:, 0], where[:, 1]]
    if probe is not None:  # (with no chunk kept: no divergent state here; under lockstep, no collective either)
        windows = []
        for chunk, t_conts in probe.chunks:
            picked = torch.nonzero(is_divergent[chunk]).squeeze(-1)  # indices into the chunk
            if len(picked):
                states = chunk[picked]
                windows.append(Windows(teacher_conts=t_conts.select(picked), student_prefixes=state_prefixes(
                    student, rollouts, rows[states], ts[states], rollouts.cache, pad_id)))
        return windows
    picked = torch.nonzero(is_divergent).squeeze(-1)  # the divergent states, in `where` order
    # in chunks of at most max_tokens cached tokens (state_chunks, --probe-tokens), as the probe's states are
    decode = sample.continuation_decode(decode, candidates.device)  # how the continuations really decode
    chunks = state_chunks(rollouts.prompt_width + ts[picked], k, horizon, max_tokens, decode) if len(picked) else []
    sampling = sample.SamplingConfig(temperature=1.0, vocab_size=vocab_size, lockstep=lockstep, decode=decode)
    windows = []
    for i in range(parallel.max_over_ranks(len(chunks), lockstep)):
        chunk = picked[chunks[i]] if i < len(chunks) else None  # None: a stand-in chunk (lockstep only), dropped
        state_rows, state_ts = (rows[chunk], ts[chunk]) if chunk is not None else _stand_in_state(candidates.device)
        t_enc = state_prefixes(teacher, rollouts, state_rows, state_ts, teacher_cache, pad_id)
        conts = sample.sample_continuations(teacher, t_enc, k, horizon, sampling=sampling, eos_ids=eos_ids,
                                            pad_id=pad_id, generator=generator, keep_hidden=True)
        if chunk is not None:
            windows.append(Windows(teacher_conts=conts, student_prefixes=state_prefixes(
                student, rollouts, state_rows, state_ts, rollouts.cache, pad_id)))
    return windows


def guidance_kl(student, windows: Windows, *, vocab_size: int | None = None,
                chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """KL(pi_T || pi_theta) at every token of the teacher's windows, (N, K, H) with gradient to the student.

    The student runs once over the K windows of each state from that state's cached prefix (no grad through the
    prefix: the cost rule), so only the H window tokens carry gradient (teacher.continuation_head). Both sides are
    fused_kernels.Heads: the fused kernel never builds the (N, K, H, V) logits of either model."""
    student_head = teacher_lib.continuation_head(student, windows.student_prefixes, windows.teacher_conts.ids)
    return kl_divergence(windows.teacher_conts.head, student_head, vocab_size=vocab_size, chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------------------------
# Worked example
# ----------------------------------------------------------------------------------------------------------------

def main():
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
    d = margin_w1(torch.tensor([[3.0, 1.0]]), torch.tensor([[0.0, 0.0]])).item()
    print("probe D for margins mu_T=[3,1], mu_S=[0,0]:", d)
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


if __name__ == "__main__":
    main()
