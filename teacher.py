"""
teacher.py -- scoring token sequences with a frozen teacher (and, with the same functions, with the student).

The teacher never generates the student's trajectory; it only scores the exact ids the student sampled. Getting
that right is mostly bookkeeping, and this file keeps the bookkeeping in one place:

  * `check_compatible` refuses a teacher whose tokenizer maps ids to different strings (or has different
    special tokens) BEFORE any forward pass, naming both models and the first differing token. Models of one
    family whose `config.vocab_size` differ only by padding rows (Qwen2.5: 151936 vs 152064) are accepted; the
    logits are sliced to the tokenizer's size (trap 10). `check_checkpoints` runs it on two checkpoints' tokenizers
    and configs, before any weight is loaded.
  * `response_logits` rebuilds the attention mask and the position ids of left-padded rows exactly as
    sample.py generated them (trap 3), and returns the logits ALIGNED with the response ids: the logit at
    position i predicts token i+1, so response column r (sequence index P+r) is predicted by sequence index
    P+r-1 (trap 1). Only the response positions are kept (`logits_to_keep`), so a long prompt costs nothing.
  * The training path never builds logits at all: `response_head` / `continuation_head` run the same forwards
    with the LM head switched off (sample.hidden_states_out) and return a fused_kernels.Head over the final hidden states
    (B, R, d); the fused kernels compute fp32 logits chunk by chunk inside the loss (trap 7). For Qwen3-4B at
    8k tokens that is 42 MB of hidden states instead of 2.5 GB of bf16 logits per rollout and model.
  * The teacher runs in eval(), with requires_grad_(False), under torch.no_grad() -- NOT torch.inference_mode():
    inference tensors cannot enter autograd later, and the teacher's outputs do enter the student's loss (trap 6).
  * `self_check` scores one rollout several ways (twice, token by token through the KV cache, and through the
    fused head) and fails if they disagree (trap 20); `self_check_on_samples` runs it on fresh student rollouts.

The same scoring functions serve the student side of TOPD (its grad-carrying forward over its rollouts, its
scores of the teacher's probe continuations, its forward over the guidance windows): one implementation of the
shift and the padding logic for both models.

Commands:
    python teacher.py                                         # demo: tiny random teacher/student, KL per token
    python teacher.py --student runs/toy/student --teacher runs/toy/teacher   # check and score real checkpoints
    python teacher.py --self-check [--student A --teacher B]                  # is the teacher's scoring reliable?
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import parallel
from fused_kernels import DEFAULT_CHUNK, Head, kl_divergence, token_logprobs
from sample import (Continuations, EncodedPrefixes, Rollouts, SamplingConfig, cache_kwarg, eval_mode,
                    generation_config, hidden_states_out, model_step, position_ids_from_mask, sample_rollouts,
                    stop_token_ids)


def load_teacher(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, shard=None):
    """A frozen teacher: eval mode, no parameter requires grad. Returns (model, tokenizer). shard: as
    sample.load_policy's (parallel.shard_teacher under --parallel fsdp)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = parallel.from_pretrained(path, dtype, torch.device(device), shard=shard).eval()
    model.requires_grad_(False)
    return model, tokenizer


def check_compatible(student_tokenizer, teacher_tokenizer, student_config=None, teacher_config=None,
                     student_name: str = "student", teacher_name: str = "teacher", *, student_stop=None,
                     teacher_stop=None, allow_stop_mismatch: bool = False, warn=print) -> int:
    """Raise ValueError unless both models read token ids the same way. Returns the shared vocabulary size.

    Same mapping = every id decodes to the same token string in both vocabularies, and the BOS / EOS / PAD tokens
    agree. config.vocab_size may differ (padding rows), but each must cover the tokenizer.
    Stop sets (student_stop / teacher_stop: every EOS id of each model, sample.stop_token_ids) must be equal too
    (trap 18): when the student stops on a token the teacher reads as text (a base student with an instruct
    teacher, or templates with different end-of-turn tokens), the teacher scores the student's stop as unlikely,
    OPD drives the stop probability to zero and rollouts run to the length cap. allow_stop_mismatch=True turns the
    error into a warning, for users who know why their sets differ.
    """
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        s_by_id = {i: tok for tok, i in s_vocab.items()}
        t_by_id = {i: tok for tok, i in t_vocab.items()}
        for i in range(max(len(s_by_id), len(t_by_id), max(s_by_id, default=0) + 1, max(t_by_id, default=0) + 1)):
            if s_by_id.get(i) != t_by_id.get(i):
                raise ValueError(
                    f"tokenizers differ: {student_name} and {teacher_name} map id {i} to "
                    f"{s_by_id.get(i)!r} vs {t_by_id.get(i)!r} (vocab sizes {len(s_vocab)} vs {len(t_vocab)}). "
                    "On-policy distillation needs the teacher to score the student's exact ids.")
    for attr in ("bos_token", "eos_token", "pad_token"):
        s_tok, t_tok = getattr(student_tokenizer, attr, None), getattr(teacher_tokenizer, attr, None)
        if attr != "pad_token" and s_tok != t_tok:
            raise ValueError(f"{attr} differs: {student_name} has {s_tok!r}, {teacher_name} has {t_tok!r}")
    if student_stop is not None and teacher_stop is not None and set(student_stop) != set(teacher_stop):
        def named(ids):
            return "{" + ", ".join(f"{i} {student_tokenizer.convert_ids_to_tokens(int(i))!r}" for i in sorted(ids)) + "}"
        message = (f"stop tokens differ: {student_name} stops on {named(student_stop)}, {teacher_name} on "
                   f"{named(teacher_stop)}. The teacher would score the student's stop token as text and OPD would "
                   "teach the student never to stop (rollouts run to --max-new-tokens).")
        if not allow_stop_mismatch:
            raise ValueError(message + " Align the models' eos_token_id / generation_config, or pass "
                             "--allow-stop-mismatch if you know why they differ.")
        warn("WARNING: " + message + " (--allow-stop-mismatch: continuing)")
    size = len(student_tokenizer)
    for name, cfg in ((student_name, student_config), (teacher_name, teacher_config)):
        if cfg is not None and getattr(cfg, "vocab_size", size) < size:
            raise ValueError(f"{name}: config.vocab_size={cfg.vocab_size} is smaller than its tokenizer ({size})")
    return size


def check_checkpoints(student: str, teacher: str, *, allow_stop_mismatch: bool = False, warn=print):
    """check_compatible on two checkpoints (folders or hub ids) from their tokenizers and configs alone, before any
    weight is loaded; each stop set is read from the tokenizer, the config and the generation config together.
    Returns (the shared vocabulary size, the student's tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    s_tok, t_tok = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(teacher)
    s_conf, t_conf = AutoConfig.from_pretrained(student), AutoConfig.from_pretrained(teacher)
    vocab_size = check_compatible(
        s_tok, t_tok, s_conf, t_conf, student, teacher, allow_stop_mismatch=allow_stop_mismatch, warn=warn,
        student_stop=stop_token_ids(s_tok, s_conf, generation_config(student)),
        teacher_stop=stop_token_ids(t_tok, t_conf, generation_config(teacher)))
    return vocab_size, s_tok


def response_logits(model, rollouts: Rollouts, cache=None) -> torch.Tensor:
    """Logits (B, R, V), model dtype, ALIGNED with rollouts.response_ids (gradient iff the caller allows it).

    Worked example (P = 3 prompt columns, R = 2 response tokens, one left-padded row):
        ids      [pad, x1, x2 | y1, y2]      attention [0, 1, 1 | 1, 1]     positions [0, 0, 1 | 2, 3]
        logits index            1   2   3   (index i predicts token i+1)
        predicts               x2  y1  y2   -> we keep indices P-1 .. P+R-2 = [2, 3] for [y1, y2]
    `logits_to_keep = R + 1` returns indices P-1 .. P+R-1; the last one (predicting past the end) is dropped.
    Positions after a row's EOS are masked out of the attention; their logits exist but the loss mask drops them.
    cache: an empty sample.new_cache(model) to be filled with this pass's keys and values (the probe reuses them),
    or None for a cache-free forward.
    """
    R = rollouts.ids.shape[1] - rollouts.prompt_width
    extra = {} if cache is None else {cache_kwarg(model): cache}
    logits = model(input_ids=rollouts.ids, attention_mask=rollouts.attention_mask,
                   position_ids=position_ids_from_mask(rollouts.attention_mask), use_cache=cache is not None,
                   logits_to_keep=R + 1, **extra).logits  # (B, R+1, V)
    return logits[:, :-1]


def response_head(model, rollouts: Rollouts, cache=None) -> Head:
    """response_logits without the logits: a fused_kernels.Head over the (B, R, d) final hidden states aligned with the
    response ids, for the fused losses (the training path). Same forward, same alignment; the LM head is not run."""
    with hidden_states_out(model) as to_head:
        return to_head(response_logits(model, rollouts, cache))  # "logits" are hidden states inside the block


@torch.no_grad()
def score_rollouts(model, rollouts: Rollouts, estimator: str, *, vocab_size: int | None = None,
                   chunk_size: int = DEFAULT_CHUNK, cache=None) -> torch.Tensor:
    """What topd.opd_token_loss needs from the teacher.

    estimator "full":    the teacher's distribution at every response position as a fused_kernels.Head (hidden states
                         (B, R, d) in the model's dtype: the (B, R, V) logits are never built);
    estimator "sampled": log pi_T(y_t | s_t) of the sampled tokens (B, R) fp32, masked positions set to 0.
    cache: filled with the teacher's keys and values when given (see response_logits).
    """
    head = response_head(model, rollouts, cache)
    if estimator == "full":
        return head
    if estimator == "sampled":
        logp = token_logprobs(head, rollouts.response_ids, vocab_size=vocab_size, chunk_size=chunk_size)
        return logp * rollouts.response_mask
    raise ValueError(f"unknown estimator {estimator!r}")


def continuation_logits(model, prefixes: EncodedPrefixes, ids: torch.Tensor) -> torch.Tensor:
    """Logits (N, K, H, V) for K continuations `ids` (N, K, H) of each encoded state, reusing its KV cache.

    The cache holds each prefix minus its last token (sample.EncodedPrefixes), so we feed
    [last, c_0, ..., c_{H-2}] and the H outputs predict c_0 .. c_{H-1}: every continuation token, including the
    first, gets a logit computed in THIS forward, which is what lets the guidance loss put gradient on all H.
    Gradient flows iff the caller has it enabled (the cache itself is constant).
    """
    N, K, H = ids.shape
    cache, mask, last, pos = prefixes.repeated(K)  # N*K rows
    inputs = torch.cat([last[:, None], ids.reshape(N * K, H)[:, :-1]], dim=1)  # (N*K, H)
    mask = torch.cat([mask, torch.ones_like(inputs)], dim=1)  # tokens after a continuation's EOS only affect
    positions = pos[:, None] + torch.arange(H, device=ids.device)  # later, masked positions (causal attention)
    logits = model_step(model, inputs, mask, positions, cache)  # (N*K, H, V)
    return logits.view(N, K, H, -1)


def continuation_head(model, prefixes: EncodedPrefixes, ids: torch.Tensor) -> Head:
    """continuation_logits as a fused_kernels.Head over (N, K, H, d) hidden states (the fused path: no logits)."""
    with hidden_states_out(model) as to_head:
        return to_head(continuation_logits(model, prefixes, ids))


@torch.no_grad()
def score_continuations(model, prefixes: EncodedPrefixes, conts: Continuations, *, vocab_size: int | None = None,
                        chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log pi(c_j | s_t, c_<j) (N, K, H) fp32 of another model's continuations, 0 after each EOS (probe margins)."""
    head = continuation_head(model, prefixes, conts.ids)
    return token_logprobs(head, conts.ids, vocab_size=vocab_size, chunk_size=chunk_size) * conts.mask


@torch.no_grad()
def self_check(model, rollouts: Rollouts, *, vocab_size: int | None = None, tolerance: float | None = None,
               chunk_size: int = DEFAULT_CHUNK) -> dict:
    """Score one real rollout batch several ways and fail unless they agree (trap 20). Returns the numbers.

      repeat      KL(teacher || teacher) between two identical scoring passes: a non-deterministic kernel (some
                  fused attention or MoE routing kernels are) makes the teacher disagree with itself by as much as
                  the OPD signal it is supposed to give;
      cached      the same scores computed token by token through the KV cache (prefill the prompt, then one token
                  at a time), the path that sampling and the probe's prefixes use: a wrong cache, wrong position
                  ids or a padding mistake shows up here as a disagreement with the plain forward.
      fused       the logits of the fused head-and-loss path (final hidden states x the head's weight, with the
                  family's logit scale and soft-cap, sample.head_of) against the model's own: an unknown logit
                  transform would make every fused loss silently wrong.
    Each is the largest per-token KL over the response tokens (nats). tolerance defaults to 1e-4 for fp32 models
    and 2e-2 for bf16 / fp16 ones (their kernels round differently between a batched and an incremental pass).
    Raises RuntimeError naming the check that failed.
    """
    dtype = next(model.parameters()).dtype
    tolerance = tolerance if tolerance is not None else (1e-4 if dtype == torch.float32 else 2e-2)
    mask = rollouts.response_mask.bool()  # (B, R)
    first = response_logits(model, rollouts)  # (B, R, V)
    second = response_logits(model, rollouts)
    # token by token through the cache: prefill the left-padded prompts, then feed the response one token at a time
    from sample import new_cache
    P, R = rollouts.prompt_width, rollouts.response_ids.shape[1]
    cache, att = new_cache(model), rollouts.attention_mask
    positions = position_ids_from_mask(att)
    steps = [model_step(model, rollouts.ids[:, :P], att[:, :P], positions[:, :P], cache, logits_to_keep=1)[:, -1]]
    for r in range(R - 1):  # response token r predicts r + 1
        col = P + r
        steps.append(model_step(model, rollouts.ids[:, col:col + 1], att[:, :col + 1], positions[:, col:col + 1],
                                cache)[:, -1])
    cached = torch.stack(steps, 1)  # (B, R, V)
    # the fused path's logits (hidden @ head weight, the family's scale and soft-cap), built in full only here
    fused = response_head(model, rollouts).flat().logits().view(first.shape[:-1] + (-1,))
    result = {}
    for name, other in (("repeat", second), ("cached", cached), ("fused", fused[..., :first.shape[-1]])):
        kl = kl_divergence(first, other, vocab_size=vocab_size, chunk_size=chunk_size)  # (B, R)
        result[name] = float(kl[mask].abs().max()) if mask.any() else 0.0
    result["tokens"] = int(mask.sum())
    result["tolerance"] = tolerance
    for name, what in (("repeat", "two identical scoring passes of the same rollout (non-deterministic kernels?)"),
                       ("cached", "a plain forward and the KV-cached token-by-token pass (cache / position ids / "
                                  "padding bug?)"),
                       ("fused", "the model's own logits and the fused head-and-loss path's (a logit transform of "
                                 "this model family that sample.head_of does not know?)")):
        if not result[name] <= tolerance:
            raise RuntimeError(f"teacher self-check failed: KL between {what} is {result[name]:.3g} nats on some "
                               f"token, above the tolerance {tolerance:g}. The teacher's scores are not reliable; "
                               "fix this before training (or --no-self-check to skip the check).")
    return result


def self_check_on_samples(student, teacher, prompt_ids, *, sampling: SamplingConfig, pad_id: int, eos_ids, generator,
                          chunk_size: int = DEFAULT_CHUNK, autocast=contextlib.nullcontext, log=print) -> dict:
    """self_check on rollouts the student samples from `prompt_ids` (train.py's start-up check on two of its
    prompts, and `python teacher.py --self-check`): raises if the teacher disagrees with itself, else logs the
    three gaps on one line and returns them."""
    with torch.no_grad(), eval_mode(student), autocast():
        ro = sample_rollouts(student, prompt_ids, sampling=sampling, pad_id=pad_id, eos_ids=eos_ids,
                             generator=generator)
    r = self_check(teacher, ro, vocab_size=sampling.vocab_size, chunk_size=chunk_size)
    log(f"teacher self-check: KL between two scoring passes {r['repeat']:.1e}, plain vs KV-cached {r['cached']:.1e}, "
        f"own vs fused-head logits {r['fused']:.1e} nats (max over {r['tokens']} tokens; tolerance {r['tolerance']:g})")
    return r


def main(argv=None):
    from sample import _tiny_random_model, encode_prompts, eos_token_ids, load_policy, make_generator, pad_token_id
    parser = argparse.ArgumentParser(description="score student rollouts with a teacher (demo)")
    parser.add_argument("--student", default=None)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--prompt", default="12+34=?\n")
    parser.add_argument("--self-check", action="store_true",
                        help="score one rollout twice and token by token through the KV cache; fail on disagreement")
    args = parser.parse_args(argv)
    if args.student is None:
        student, teacher = _tiny_random_model(), _tiny_random_model()
        with torch.no_grad():  # perturb the teacher so that the KL is not zero
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn_like(p))
        teacher.requires_grad_(False)
        prompt_ids, pad, eos, vocab = [[1, 5, 6, 7], [1, 9]], 0, [2], None
    else:
        vocab, _ = check_checkpoints(args.student, args.teacher)  # before any weight is loaded
        student, s_tok = load_policy(args.student)
        teacher, _ = load_teacher(args.teacher)
        eos = eos_token_ids(student, s_tok)
        prompt_ids, _ = encode_prompts(s_tok, [args.prompt])
        pad = pad_token_id(s_tok)
    sampling = SamplingConfig(max_new_tokens=16, vocab_size=vocab)
    if args.self_check:
        return self_check_on_samples(student, teacher, prompt_ids, sampling=sampling, pad_id=pad, eos_ids=eos,
                                     generator=make_generator(0, 0, 0, device=next(student.parameters()).device))
    ro = sample_rollouts(student, prompt_ids, sampling=sampling, eos_ids=eos, pad_id=pad,
                         generator=make_generator(0, 0, 0, device=next(student.parameters()).device))
    with torch.no_grad():
        # reverse KL per token, KL(student || teacher): what topd.per_token_kl computes, from the kernel itself
        kl = kl_divergence(response_head(student, ro), score_rollouts(teacher, ro, "full"), vocab_size=vocab)
    for b in range(kl.shape[0]):
        n = int(ro.response_mask[b].sum())
        print(f"row {b}: {n} response tokens, reverse KL per token:", [round(x, 3) for x in kl[b, :n].tolist()])


if __name__ == "__main__":
    main()
