"""
sample.py -- student trajectories: loading a policy, encoding prompts, sampling rollouts and near-future probes.

On-policy distillation is only on-policy if the tokens really come from the student. This file owns everything
between "a list of prompts" and "the exact token ids the student sampled", and gets right what published OPD code
often gets wrong (docs/traps.md lists them, with the tests that pin each):

  * sampling settings are passed explicitly on every call: we run our own KV-cached decoding loop, so a checkpoint's
    generation_config.json (Qwen ships top_k=20, top_p=0.8, temperature=0.7) can never silently change them (trap 2);
  * prompts are left-padded, and the attention mask and position ids used for generation are exactly the ones the
    scorers in teacher.py rebuild (trap 3);
  * the response mask runs up to AND INCLUDING the first EOS of any of the model's EOS ids, and is never derived
    from the pad id, which may equal EOS (trap 4); rollouts that hit max_new_tokens are flagged `truncated`;
  * token ids are returned as ids (never decoded and re-encoded, trap 10), prompts are truncated from the left
    before generation (trap 12), and randomness comes from a torch.Generator seeded by (seed, step, rank, ...)
    so a run is reproducible and ranks never share samples (trap 16).

The near-future machinery of TOPD (spec sec. 3 and 5) lives here too. A probed state s_t is a prefix of a rollout,
so `prefixes_from_cache` cuts it out of the KV cache that sampling (or the teacher's scoring pass) already built;
`encode_prefixes` runs states through a model once when no such cache is at hand. `sample_continuations` draws K
continuations of H tokens from those caches, and teacher.py scores continuations from the same caches.

Commands:
    python sample.py                          # demo on a tiny random Llama built from a config (CPU, seconds)
    python sample.py --model runs/toy/student # sample from a real checkpoint folder (or a hub id)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import inspect
import sys
import weakref
from dataclasses import dataclass

import torch

import parallel
from fused_kernels import DEFAULT_CHUNK, Head, token_logprobs


# ----------------------------------------------------------------------------------------------------------------
# Loading and randomness
# ----------------------------------------------------------------------------------------------------------------

def load_policy(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, shard=None):
    """Any causal LM that transformers supports (a local folder or a hub id) plus its tokenizer, in eval mode.

    eval() switches dropout off: sampling with dropout on would draw from a different policy than the one whose
    log-probs we train (trap 6). train.py switches the student back to train() for its own forward pass.
    shard: parallel.shard_student under --parallel fsdp, applied while loading so that no rank ever holds the whole
    model on its device (parallel.from_pretrained).
    """
    from transformers import AutoTokenizer  # heavy import kept out of module import time

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = parallel.from_pretrained(path, dtype, torch.device(device), shard=shard).eval()
    return model, tokenizer


def quiet_progress_bars() -> None:
    """transformers draws a progress bar for every save_pretrained / load; in a log file (stderr not a terminal)
    those redraws are only noise between the step lines, so switch them off there."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


@contextlib.contextmanager
def eval_mode(model):
    """Sampling and probing with dropout off (trap 6), back to train() afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def set_checkpointing(model, on: bool):
    """Activation (gradient) checkpointing on or off, under either of transformers' names for it. HF only
    checkpoints in train(): sampling in eval() keeps its KV cache."""
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    getattr(model, f"{name}_{'enable' if on else 'disable'}")()


@contextlib.contextmanager
def without_checkpointing(model, enabled: bool):
    """Checkpointed layers drop the KV cache, which the guidance windows need (their prefix is cached). The
    windows are only H tokens long, so their activations are small: switch checkpointing off around them."""
    if enabled:
        set_checkpointing(model, False)
    try:
        yield
    finally:
        if enabled:
            set_checkpointing(model, True)


def make_generator(seed: int, *indices: int, device: str | torch.device) -> torch.Generator:
    """A torch.Generator whose seed is a hash of (seed, *indices), e.g. (seed, step, rank, purpose).

    Hashing (rather than seed + rank) keeps streams independent: (seed=1, rank=0) and (seed=0, rank=1) differ.
    `device` is required, never implicit: a generator draws only for tensors on its own device, so a CPU generator
    handed to a sampler of CUDA probabilities fails at the first draw of a GPU run, a bug that every CPU test
    passes. Pass the device of the model that will sample (`next(model.parameters()).device`); _pick checks it.
    """
    digest = hashlib.sha256(repr((seed,) + tuple(int(i) for i in indices)).encode()).digest()
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus all EOS ids in the model's configs.

    Qwen instruct models end turns with <|im_end|> (in generation_config) while tokenizer.eos_token may be
    <|endoftext|>: stopping on only one of them makes rollouts run on past the real end (trap 4). We read the
    EOS *ids* from generation_config, never its sampling settings.
    """
    return stop_token_ids(tokenizer, model.config, getattr(model, "generation_config", None))


def stop_token_ids(tokenizer, config, generation_config=None) -> list[int]:
    """eos_token_ids from the parts, so that teacher.check_checkpoints can compare two models' stop sets before
    loading weights."""
    ids: list[int] = []
    sources = [getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None),
               getattr(generation_config, "eos_token_id", None)]
    for src in sources:
        for i in ([src] if isinstance(src, int) else (src or [])):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("the model and tokenizer define no EOS token id; set tokenizer.eos_token")
    return ids


def generation_config(path: str):
    """A checkpoint's GenerationConfig (for its EOS ids only; never its sampling settings), or None if absent."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def special_token_ids(tokenizer, eos_ids=()) -> list[int]:
    """Every id that is markup rather than text: the tokenizer's special tokens, every ADDED token, and the EOS ids.

    Added tokens count even when not flagged special: Qwen3's `<think>` / `</think>` are added with special=False,
    and chat markers (`<|im_start|>`, `<|im_end|>`) are where a template puts structure. They are often the
    highest-loss tokens of a rollout (the teacher and student disagree about when to stop thinking), but "where the
    template puts a marker" is not a reasoning fork: TOPD never picks them as candidates (trap 21).
    """
    ids = set(int(i) for i in eos_ids) | set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {})}
    return sorted(ids)


def pad_token_id(tokenizer) -> int:
    """The id written after EOS and in the left padding. Masks never depend on it (it may equal EOS)."""
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------

def encode_prompts(tokenizer, prompts, *, chat_template: bool = False, max_prompt_len: int | None = None,
                   strict: bool = False, enable_thinking: bool | None = None):
    """Prompts (strings, or lists of token ids passed through untouched) -> (list of id lists, number truncated).

    chat_template: wrap each string as one user turn with the tokenizer's template and the generation prompt.
    The template is rendered to text and then tokenised with add_special_tokens=False, because templates write
    their own BOS; adding it again is a classic off-by-one between teacher and student (trap 11).
    enable_thinking: passed to templates that take it (Qwen3); None leaves the template's default.
    max_prompt_len: keep the LAST max_prompt_len tokens (the question sits at the end of a prompt; trap 12), or
    raise with strict=True.
    """
    encoded, truncated = [], 0
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"prompt {i} is empty")
            if chat_template and not getattr(tokenizer, "chat_template", None):
                raise ValueError("chat_template=True but the tokenizer has no chat template")
            try:
                if chat_template:
                    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
                    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                         add_generation_prompt=True, **extra)
                    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                else:
                    ids = tokenizer(prompt)["input_ids"]  # the tokenizer's own special-token convention (e.g. BOS)
            except Exception as e:  # e.g. a character-level toy tokenizer given AIME text: say which prompt
                raise ValueError(f"prompt {i} ({prompt[:60]!r}...) cannot be encoded by this tokenizer: {e}") from e
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} encodes to zero tokens")
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            if strict:
                raise ValueError(f"prompt {i} has {len(ids)} tokens > --max-prompt-len {max_prompt_len} (--strict)")
            ids = ids[-max_prompt_len:]
            truncated += 1
        encoded.append(list(ids))
    return encoded, truncated


def step_prompt_indices(num_prompts: int, step: int, global_batch: int, seed: int) -> list[int]:
    """The global_batch prompt indices of optimizer step `step`: consecutive slices of seeded permutations
    (one permutation per epoch), so every prompt is seen once per epoch and a resumed run sees the same ones."""
    out, start, perms = [], step * global_batch, {}
    for pos in range(start, start + global_batch):
        epoch, offset = divmod(pos, num_prompts)
        if epoch not in perms:  # one permutation per epoch (a step spans at most two)
            # the data order is host-side bookkeeping: a CPU permutation, the same on every device
            perms[epoch] = torch.randperm(num_prompts, generator=make_generator(seed, 10**6 + epoch, device="cpu")).tolist()
        out.append(perms[epoch][offset])
    return out


def left_pad(sequences, pad_id: int, device=None):
    """List of id lists -> (ids (B, W), attention_mask (B, W)), padded on the LEFT.

    Example: [[5, 6, 7], [8]] with pad 0 -> ids [[5, 6, 7], [0, 0, 8]], mask [[1, 1, 1], [0, 0, 1]].
    Left padding puts every row's last real token in the last column, so one decoding step serves the whole batch.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: mask [0, 0, 1, 1, 1] -> [0, 0, 0, 1, 2].

    The model must see the same positions when it generates and when it is scored; HF's generate builds them this
    way, and so do all our forward passes (trap 3). Padding slots get 0 (they are masked anyway).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------------------------
# The decoding loop
# ----------------------------------------------------------------------------------------------------------------

DECODE_MODES = ("eager", "compiled")


@dataclass
class SamplingConfig:
    """Every setting that shapes the sampling distribution, always passed explicitly (trap 2)."""
    temperature: float = 1.0   # 1.0 = the policy itself; OPD's estimators assume it
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1.0 = off
    max_new_tokens: int = 256  # response length cap; rollouts that hit it are `truncated`
    vocab_size: int | None = None  # the TOKENIZER's size: columns at or past it get probability 0 (None = all)
    lockstep: bool = False     # decode until the rows of EVERY rank have ended: required when the model is sharded
                               # (FSDP: each forward is a collective, see parallel.py); costs one tiny all-reduce
    decode: str = "eager"      # how, not what: eager = transformers' forward over a growing cache (the readable
                               # reference); compiled = a preallocated cache and a torch.compile'd one-token step
                               # (CUDA graphs on a GPU). Both draw the same tokens (see "Compiled decoding" below)

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1 \
                or (self.vocab_size is not None and self.vocab_size < 1) or self.decode not in DECODE_MODES:
            raise ValueError(f"invalid sampling settings: {self}")


def cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` in forward(); support both spellings.
    A DDP wrapper forwards keyword arguments to the module it wraps, so look at that module's signature."""
    inner = getattr(model, "module", model)
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def new_cache(model):
    """An empty DynamicCache built for this model's layer types (sliding-window layers included)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def model_step(model, ids, attention_mask, position_ids, cache, logits_to_keep: int = 0):
    """One forward pass that extends `cache` in place. Returns logits (N, L or keep, V) in the model's dtype."""
    return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 logits_to_keep=logits_to_keep, **{cache_kwarg(model): cache}).logits


def head_of(model, hidden: torch.Tensor) -> Head:
    """The fused-loss view of a model's next-token logits at `hidden` (the LM head's input): fused_kernels.Head with the
    head's weight (the embedding matrix when tied) and the final logit transform of the model's family.

    Families that transform the head's output: Gemma 2/3 soft-cap it (config.final_logit_softcapping), Cohere
    multiplies by logit_scale, Granite divides by config.logits_scaling. An unknown transform would make the fused
    logits differ from the model's own; teacher.self_check compares the two at the start of every run.
    """
    inner = getattr(model, "module", model)  # a DDP wrapper's module
    return Head(hidden, _full_weight(inner, inner.get_output_embeddings()), *_logit_transform(inner))


def _logit_transform(inner) -> tuple[float, float | None]:
    """(scale, soft-cap) of the model family's final logit transform (see head_of)."""
    config = inner.config
    scale = float(getattr(inner, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    return scale, getattr(config, "final_logit_softcapping", None)


def check_head(model, name: str = "model", head=None) -> None:
    """Raise ValueError, naming the model, unless its LM head is what fused_kernels.Head computes: logits =
    transform(hidden @ weight.T). A head with a bias (Phi-2's and GPT-J's `lm_head.bias`) would be silently dropped
    by every fused loss and by the sampler's fp32 logits, so such a model is refused before any compute (train.py
    checks both models at start; every Head built from a model checks again)."""
    inner = getattr(model, "module", model)
    head = head if head is not None else inner.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{name} ({type(inner).__name__}) has no LM head weight (get_output_embeddings()): the fused "
                         "head-and-loss path needs one")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{name} ({type(inner).__name__}) has an LM head bias (lm_head.bias, as Phi-2 and GPT-J do): "
                         "fused_kernels.Head computes hidden @ weight.T without a bias, so every sampled and scored "
                         "log-prob would be wrong. Such heads are not supported: use a model without lm_head.bias.")


def _full_weight(inner, head_module) -> torch.Tensor:
    """The LM head's weight as a full tensor; an FSDP shard (a DTensor) here is a bug of the caller. A head with a
    bias is refused (check_head)."""
    if getattr(head_module, "bias", None) is not None:
        check_head(inner, head=head_module)
    weight = head_module.weight
    if hasattr(weight, "full_tensor"):
        raise RuntimeError(f"the LM head of {type(inner).__name__} is sharded (FSDP) here: read it after a forward "
                           "of the whole model and before its backward, when FSDP holds it unsharded "
                           "(sample.hidden_states_out does), or keep it out of the sharding (parallel.shard_teacher)")
    return weight


_IDENTITY = torch.nn.Identity()


@contextlib.contextmanager
def hidden_states_out(model):
    """Within this block, model(...).logits holds the final hidden states (what the LM head would read) instead of
    logits: the head is swapped for an identity and the family's logit transform switched off, so no (B, T, V)
    tensor is ever computed. Yields head_of(model, .) to turn those hidden states into a fused_kernels.Head. The head's
    weight is untouched (tied embeddings stay tied) and everything is restored on exit, errors included.

    The yielded function reads the head's weight when it is CALLED, i.e. after the forward: under FSDP the root
    module's weights are full tensors from its forward until its backward and shards (DTensors) otherwise
    (parallel.py), so reading the weight before the forward would hand a shard to the loss."""
    inner = getattr(model, "module", model)
    head, config = inner.get_output_embeddings(), inner.config
    switched = [(obj, name, getattr(obj, name)) for obj, name in ((config, "final_logit_softcapping"),
                                                                   (inner, "logit_scale"), (config, "logits_scaling"))
                if getattr(obj, name, None) is not None]
    transform = _logit_transform(inner)  # read before it is switched off
    inner.set_output_embeddings(_IDENTITY)  # one shared instance: a compiled step sees the same module every call
    for obj, name, _ in switched:
        setattr(obj, name, None if name == "final_logit_softcapping" else 1.0)
    try:
        yield lambda hidden: Head(hidden, _full_weight(inner, head), *transform)  # the weight as it is NOW
    finally:
        inner.set_output_embeddings(head)
        for obj, name, value in switched:
            setattr(obj, name, value)


def sampling_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Raw logits (N, V) -> fp32 logits of the distribution we actually sample from, (N, cfg.vocab_size or V).

    The model's padding columns go first (trap 17): models pad config.vocab_size past the tokenizer (Qwen3: 151936
    columns for 151669 tokens), the padding rows of the head are untrained, and one draw of such an id would crash
    every scorer downstream (they slice to the tokenizer's size). Slicing them off gives them probability exactly 0.
    Temperature divides LOGITS (never log-probs, trap 2). Top-k / top-p set excluded logits to -inf.
    """
    z = logits[..., :cfg.vocab_size].float()
    if cfg.temperature != 1.0:
        z = z / max(cfg.temperature, 1e-6)
    if cfg.top_k and cfg.top_k < z.shape[-1]:
        kth = torch.topk(z, cfg.top_k, dim=-1).values[..., -1:]  # (N, 1)
        z = z.masked_fill(z < kth, -torch.inf)
    if cfg.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        z = z.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), -torch.inf)
    return z


def _draw(head: Head, cfg: SamplingConfig, generator: torch.Generator):
    """Sample one token per row from the fp32 logits of head (N rows). Returns (token (N,), its log-prob under the
    sampled distribution (N,))."""
    z = sampling_logits(head.logits(width=cfg.vocab_size), cfg)
    token = _pick(z, cfg, generator)
    return token, token_logprobs(z, token)


def _pick(z: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """The drawn token (N,) from the sampling distribution's logits or log-probs z (N, V): its argmax at temperature
    0 (greedy decoding: evaluation only, not a sample from the policy), else one multinomial draw per row."""
    if cfg.temperature == 0:
        return z.argmax(-1)
    if generator.device.type != z.device.type:  # torch would fail deep inside multinomial; say what to fix
        raise ValueError(f"the sampling generator is on {generator.device}, the logits on {z.device}: build it "
                         "with make_generator(..., device=<the sampling model's device>)")
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator).squeeze(-1)


def _sampling_logprobs(hidden, weight, scale, softcap, cfg: SamplingConfig) -> torch.Tensor:
    """log-probs (N, V) of the sampling distribution: the fp32 head, sampling_logits, log_softmax, in one function
    that compiled decoding compiles (_StaticCache.draw)."""
    return torch.log_softmax(sampling_logits(Head(hidden, weight, scale, softcap).logits(width=cfg.vocab_size), cfg),
                             dim=-1)


@torch.no_grad()
def _decode(step, to_head, first_hidden, next_position, num_steps, cfg, generator, eos_ids, pad_id,
            keep_hidden: bool = False):
    """KV-cached sampling of up to num_steps tokens after a prefilled cache.

    step(token (N,), attend (N,) bool, position (N,)) -> (N, d) feeds one token per row to the model and returns the
    final hidden states that predict the next one (_GrowingCache, the eager reference, or _StaticCache, compiled);
    `attend` is False for rows that have ended, whose new column the model must then never attend to. The model
    runs inside hidden_states_out, and each draw (step.draw: _draw, or its compiled twin) uses the fp32 logits of
    to_head(hidden) (fused_kernels.Head: the head's matmul in fp32, the family's logit transform). The sampler's
    log-probs therefore come from fp32 logits like every score they are compared with (the probe's margins, the
    sampler-vs-learner check): a bf16 model's own logits would round them by up to ~0.1 nats.
    first_hidden (N, d) predicts the first new token; next_position (N,) is the position id of the first new token.
    Returns tokens (N, S), their sampler log-probs (N, S), the valid mask (N, S): 1 up to and including the first
    EOS, 0 after (rows that finished keep being fed `pad_id`, which nothing ever attends to), and (keep_hidden) the
    S hidden states (N, d) that predicted them, else []. S <= num_steps: decoding stops early once every row has
    ended (with cfg.lockstep: every row of every rank, so that all ranks run the same number of forwards).
    """
    eos = torch.as_tensor(eos_ids, device=first_hidden.device)
    done = torch.zeros(first_hidden.shape[0], dtype=torch.bool, device=first_hidden.device)
    tokens, logps, valid, kept = [], [], [], []
    hidden = first_hidden
    finished = False  # every row of THIS rank has ended (under lockstep another rank may still be decoding)
    for i in range(num_steps):
        if finished:  # lockstep only: feed padding, draw nothing, so the random stream is the one without lockstep
            token, logp = torch.full_like(done, pad_id, dtype=torch.long), torch.zeros(done.shape, device=done.device)
        else:
            token, logp = step.draw(to_head(hidden), cfg, generator)  # (N,), (N,)
        if keep_hidden:  # a copy: a CUDA graph's output lives in memory that the graph's next replay reuses
            kept.append(hidden.clone())
        token = torch.where(done, pad_id, token)
        valid.append(~done)  # tokens up to and including the EOS are valid
        tokens.append(token)
        logps.append(logp)
        done = done | torch.isin(token, eos)
        finished = bool(done.all())  # one host sync per token, as in HF generate
        if i == num_steps - 1 or not parallel.any_rank(not finished, cfg.lockstep):
            break  # (under lockstep: one all-reduce of a single flag per token, "is any rank still decoding?")
        hidden = step(token, ~done, next_position)  # (N, d); finished rows' new column masked
        next_position = next_position + 1
    return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(valid, 1).long(), kept


class _GrowingCache:
    """The eager decoding step, the readable reference: the model's own forward over one new token per row, with
    transformers' DynamicCache growing by one column per step and the attention mask concatenated to match.
    cache holds attention_mask.shape[1] columns; each call appends one."""

    draw = staticmethod(_draw)  # how _decode draws from this step's hidden states

    def __init__(self, model, cache, attention_mask: torch.Tensor):
        self.model, self.cache, self.attention_mask = model, cache, attention_mask

    def __call__(self, token, attend, position) -> torch.Tensor:
        self.attention_mask = torch.cat([self.attention_mask, attend.long()[:, None]], dim=-1)  # (N, W + 1)
        return model_step(self.model, token[:, None], self.attention_mask, position[:, None], self.cache)[:, -1]


# ----------------------------------------------------------------------------------------------------------------
# Compiled decoding (SamplingConfig.decode = "compiled"): a preallocated cache and one compiled one-token step
# ----------------------------------------------------------------------------------------------------------------
#
# Eager decoding runs transformers' forward in Python for every token: dozens of small kernel launches per layer and
# a cache that grows by concatenation. Compiled decoding keeps the same model, the same left padding, position ids
# and masks, and the same draws from the same fp32 logits, and changes only how each one-token forward runs:
#   * the KV cache is transformers' StaticCache, preallocated for the rollout's longest length: the same column
#     layout as the eager cache ([left-padded prompt | response]), so the probe cuts its states out of it in the same
#     way (cache_rows), with the columns not yet written masked out;
#   * the step is the model's decoder (no LM head: the fused head computes the fp32 logits) under torch.compile,
#     mode="reduce-overhead" on CUDA (CUDA graphs: one launch per token), inductor's C++ code on the CPU, where the
#     rollouts' prefill is compiled too (COMPILED_PREFILL), its prompt width symbolic;
#   * shapes are bucketed, rows to a power of two and cache columns to a multiple of 64, so that a run compiles a
#     handful of times, not at every step; the padding rows attend to one column, are never drawn from, and never
#     touch the real rows (every operation of a decoder is per row);
#   * each step attends to the columns in use rounded up to a power of two (window_bucket), through views of the
#     cache's tensors: a preallocated cache would otherwise make every token attend over the whole final length
#     (about twice eager's attention reads, averaged over a long rollout).
#   * the rollouts' caches are reused from one sampling phase to the next (take_static_cache / recycle_cache), as a
#     serving engine keeps its KV pool: no allocation per rollout, and on CUDA the same addresses for the graphs;
#   * the probe's and the guidance windows' continuations decode compiled only where that pays (continuation_decode).
# The draws are exact: the real rows' logits differ from eager only by float summation order (~1e-7 in fp32), and
# only the real rows are drawn from, in the same order, so the same generator gives the same ids (tested).

_COMPILED: dict = {}  # (function, device type) -> its compiled version


def _one_token(model, cache_kw: str, token, attention_mask, position, cache_position, cache):
    """One token per row through the model inside hidden_states_out (its LM head an identity: the output is the final
    hidden states), writing its keys and values into the static cache. Returns the hidden states (B, d). The whole
    model, not only its decoder, is called so that FSDP's hooks on the root run as in any forward."""
    return model(input_ids=token, attention_mask=attention_mask, position_ids=position, cache_position=cache_position,
                 use_cache=True, logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]


def _prefill(model, cache_kw: str, ids, attention_mask, position, cache_position, cache):
    """The prompts (B, P) through the model into the static cache's first P columns: _one_token's forward over P
    tokens per row. Compiled on its own where that pays (COMPILED_PREFILL), without CUDA graphs: prompt widths vary
    from batch to batch, so dynamo specialises on the first width and makes it symbolic at the second, and every
    later width reuses that graph. Returns the hidden states (B, d) that predict the first new token, contiguous (a
    view into a (B, P, d) tensor would give the first draw's compiled head a stride that changes with P, hence a
    graph per width)."""
    return _one_token(model, cache_kw, ids, attention_mask, position, cache_position, cache).contiguous()


def _one_token_and_logprobs(model, cache_kw: str, token, attention_mask, position, cache_position, cache, weight,
                            scale, softcap, cfg: SamplingConfig):
    """_one_token, then the next draw's log-probs from its hidden states (_sampling_logprobs), in one compiled graph:
    one guard check and one call per token instead of two (_StaticCache.draw uses them when the head is the last
    draw's). Returns (hidden (B, d), log-probs (B, V))."""
    hidden = _one_token(model, cache_kw, token, attention_mask, position, cache_position, cache)
    return hidden, _sampling_logprobs(hidden, weight, scale, softcap, cfg)


def _compiled(fn, device: torch.device):
    """fn under torch.compile, once per device type: the one-token steps (_one_token, _one_token_and_logprobs) with
    CUDA graphs on CUDA (mode="reduce-overhead"); the rollouts' prefill (_prefill, on the CPU), a loop's first draw
    (from the prefill's hidden states, or the continuation's first step) and the draws from a head that is a new
    tensor each time (_sampling_logprobs) as plain compiled code, without graphs."""
    if (fn, device.type) not in _COMPILED:
        import torch._dynamo

        # one compiled graph per (model, rows bucket, window bucket, sampling settings): room for both models, a
        # few buckets each and the rollouts' and continuations' settings (past the limit dynamo runs new cases
        # uncompiled: the same numbers, eager speed)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # Guard on modules' hooks (torch skips those guards by default): the same graph serves every model of the
        # same shapes, so without them a graph traced for a model with no hook silently skips the hooks of one
        # that has them (measured: train.py's token counter, checkpoint.ForwardTokens, then counted the prefill
        # and none of the decoding steps), and FSDP's hooks are what gather a sharded model's weights.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        graphs = fn in (_one_token, _one_token_and_logprobs) and device.type == "cuda"
        _COMPILED[fn, device.type] = torch.compile(fn, mode="reduce-overhead" if graphs else None)
    return _COMPILED[fn, device.type]


def row_bucket(n: int) -> int:
    """Rows of a compiled step: the next power of two (a few shapes over a whole run)."""
    return 1 << max(0, (n - 1).bit_length())


def column_bucket(n: int) -> int:
    """Columns of a static cache: the next multiple of 64."""
    return -(-n // 64) * 64


def window_bucket(columns_in_use: int, width: int) -> int:
    """Columns a compiled step attends to when the first `columns_in_use` of a cache `width` wide hold tokens: the
    next power of two, at least 64, at most the width (a few graphs per rollout, each reading at most twice the
    columns in use)."""
    return min(width, max(64, 1 << (columns_in_use - 1).bit_length()))


# Continuations (the probe's, the guidance windows') are short, H tokens, from batches of hundreds of states. On
# the CPU a compiled step is no faster there (measured on the toy's probe, 512 rows: 20 ms per token either way, the
# work being the rows, not the launches) and every chunk would first copy its states' prefixes into a static cache
# (the toy step's probe phase took 2.2 s compiled vs 1.7 s eager), so compiled decoding leaves them eager except on
# the device types listed here, where CUDA graphs replace a few hundred kernel launches per token by one.
COMPILED_CONTINUATIONS = {"cuda"}


# The rollouts' prefill is one forward per batch. On the CPU toy transformers' Python around a tiny model makes it
# cost ~7 compiled tokens (profiled: 13.5 ms vs 1.9 ms); compiling it took the toy step's sampling from 0.69-0.71x
# eager to 0.62-0.68x. On CUDA it is one forward of large kernels whose launches are a small share of it, and
# compiling it would only add compile time and dynamic-shape graphs (transformers advises against compiling a
# prefill), so it stays eager there.
COMPILED_PREFILL = {"cpu"}


def continuation_decode(decode: str, device) -> str:
    """How continuations decode on `device` when rollouts decode `decode`: compiled only where it pays."""
    return decode if torch.device(device).type in COMPILED_CONTINUATIONS else "eager"


def laid_out_tokens(rows: int, columns: int, decode: str) -> int:
    """KV-cache tokens that a decoding batch of rows x columns really holds: that product in eager decoding, the
    buckets' product in compiled decoding (topd.state_chunks bounds the probe's caches by it)."""
    return rows * columns if decode == "eager" else row_bucket(rows) * column_bucket(columns)


class _StaticCache:
    """The compiled decoding step over a StaticCache of B rows x L columns (buckets; the first n rows are real).
    mask (B, L) is the attention mask over every column, updated in place as columns are written; `written` is the
    number of columns the cache already holds."""

    def __init__(self, model, cache, mask: torch.Tensor, written: int, rows: int):
        self.model, self.cache, self.mask, self.column, self.rows = model, cache, mask, written, rows
        self.cache_kw, self.step = cache_kwarg(model), _compiled(_one_token, mask.device)
        # the last draw's head (weight, scale, softcap, cfg): once known, each step also computes the next draw's
        # log-probs (_one_token_and_logprobs), kept in `ahead` with the hidden states it returned
        self.draw_with, self.ahead, self.head_changes = None, None, False
        # width -> the cache seen through its first `width` columns (see window), kept with the cache: a reused cache
        # comes back with the same view tensors, at the same addresses
        self.windows = _WINDOWS.setdefault(cache, {})
        # windows need plain, allocated StaticLayers (the prefill has run): checked once, not per token
        self.windowed = all(type(layer).__name__ == "StaticLayer" and getattr(layer, "is_initialized", True)
                            for layer in cache.layers)

    def __call__(self, token, attend, position) -> torch.Tensor:
        n, pad = self.rows, self.mask.shape[0] - self.rows
        if self.column >= self.mask.shape[1]:
            raise RuntimeError(f"static cache of {self.mask.shape[1]} columns is full")
        self.mask[:n, self.column] = attend.long()
        self.mask[n:, self.column] = 1  # padding rows attend to their own new column: never an all-masked row
        token = torch.cat([token, token.new_zeros(pad)]) if pad else token
        position = torch.cat([position, position.new_zeros(pad)]) if pad else position
        width = window_bucket(self.column + 1, self.mask.shape[1])
        args = (self.model, self.cache_kw, token[:, None], self.mask[:, :width], position[:, None],
                torch.tensor([self.column], device=self.mask.device), self.window(width))
        self.column += 1
        if self.draw_with is None:
            self.ahead = None
            return self.step(*args)[:n]
        hidden, logp = _compiled(_one_token_and_logprobs, self.mask.device)(*args, *self.draw_with)
        self.ahead = (hidden[:n], logp[:n])
        return self.ahead[0]

    def draw(self, head: Head, cfg: SamplingConfig, generator: torch.Generator):
        """_draw, compiled: the head, the sampling transforms and the log-softmax run as one compiled function, the
        multinomial draw (it needs the generator) stays eager, on the distribution's log-probs (softmax(log p) = p,
        the same probabilities up to float rounding: the same ids, tested). Eager's draw is a dozen small operations,
        token_logprobs' checks and chunking included: on the CPU toy (32 rows, 25 columns) 0.45 ms vs 0.25 ms.
        From the second draw of a loop on, the step that returned head.hidden has already computed these log-probs
        in its own graph, when the head is the same: the same weight tensor, scale, softcap and cfg. (FSDP2 keeps
        one unsharded Parameter per weight and refills it in place, so that holds under FSDP too; a head whose
        weight were a new tensor at every draw would make each draw compute its own, which a test simulates.)"""
        now = (head.weight, head.scale, head.softcap, cfg)
        same_head = self.draw_with is not None and self.draw_with[0] is now[0] and self.draw_with[1:] == now[1:]
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] is head.hidden and same_head:
            logp = ahead[1]  # (N, V)
        else:
            logp = _compiled(_sampling_logprobs, head.hidden.device)(head.hidden, *now)  # (N, V)
        if self.draw_with is None and not self.head_changes:  # the loop's first draw: the steps compute ahead
            self.draw_with = now  # (the weight is a Parameter: CUDA graphs read it in place, never copy it)
        elif not same_head:  # a new head at every draw (see above): each draw computes its own from here on
            self.draw_with, self.head_changes = None, True
        token = _pick(logp, cfg, generator)
        return token, logp.gather(-1, token[:, None]).squeeze(-1)

    def window(self, width: int):
        """The cache seen through its first `width` columns: views of the same key/value tensors (writes land in the
        full cache), so attention reads only the columns in use, rounded up to a bucket, instead of the whole
        preallocated length (at 8 x 2048 tokens the full cache would double attention's reads on average).
        A cache with any layer other than a plain, allocated StaticLayer (sliding windows, say) is always seen
        whole."""
        if width == self.mask.shape[1] or not self.windowed:
            return self.cache
        if width not in self.windows:
            view = copy.copy(self.cache)  # the same Cache settings; its own list of layers
            view.layers = []
            for layer in self.cache.layers:
                narrow = copy.copy(layer)  # shares the write counter (a tensor, transformers 5) with the full layer
                narrow.keys, narrow.values = layer.keys[:, :, :width], layer.values[:, :, :width]
                narrow.max_cache_len = width
                if narrow.keys.is_cuda:  # CUDA graphs replay reads/writes at fixed addresses: the views' are fixed
                    torch._dynamo.mark_static_address(narrow.keys)
                    torch._dynamo.mark_static_address(narrow.values)
                view.layers.append(narrow)
            self.windows[width] = view
        return self.windows[width]


# The cache pool. A fresh StaticCache per rollout batch costs its zero-filled allocation (on the toy: 13 ms of a
# 64-row batch's prefill) and, on CUDA, hands the recorded graphs new addresses, which makes them re-record.
# So compiled rollouts take their cache from a pool and give it back when done with it: sample_rollouts at once, or,
# when the Rollouts keep the cache for the probe, whoever drops it (train.py, after the probe). The pool holds, per
# model, the caches of one shape only, the last one given back: never more memory than one sampling phase held at
# once (an evaluation's batch replaces the training ones; a cache never given back is simply garbage-collected).
# The price: between sampling phases that memory stays allocated (a serving engine keeps its KV pool too); eager
# decoding frees its cache instead.
_POOL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> (key, [free caches of that key])
_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # cache -> its key (caches from the pool only)
_WINDOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> {width: its view} (_StaticCache.window)


def take_static_cache(model, rows: int, columns: int, device: torch.device):
    """A StaticCache of rows x columns for `model`: a free one of the same key from the pool, reset (every layer
    zeroed: nothing of the last rollout, a NaN say, can reach this one), else a new one. The key has the dtype the
    keys will have (autocast's, else the weights'), which a reused cache must match."""
    from transformers import StaticCache

    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    key = (rows, columns, autocast, next(model.parameters()).dtype)
    pooled_key, free = _POOL.get(model, (None, []))
    if pooled_key == key and free:
        cache = free.pop()
        cache.reset()
        return cache
    cache = StaticCache(config=model.config, max_cache_len=columns)
    # Allocated now, not at the first write as transformers does by default: that write is the compiled prefill's,
    # which would then allocate the layers inside its graph and need a second graph for the caches that come back
    # from the pool already allocated. (Layers that cannot be allocated early, a sliding window's, stay lazy; so do
    # all of them on a transformers without early_initialization: the same numbers, one more graph.)
    if hasattr(cache, "early_initialization"):
        text = model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        cache.early_initialization(rows, text.num_key_value_heads, head_dim, autocast or key[3], device)
    _KEYS[cache] = key
    return cache


def recycle_cache(model, cache) -> None:
    """Give a cache from take_static_cache back to the pool for `model`'s next rollouts (anything else, an eager
    DynamicCache or None, is left to the garbage collector). The caller must not use the cache afterwards."""
    key = _KEYS.get(cache) if cache is not None else None
    if key is None:
        return
    pooled_key, free = _POOL.get(model, (None, []))
    free = free if pooled_key == key else []  # another shape: the old ones are dropped
    if all(c is not cache for c in free):
        free.append(cache)
    _POOL[model] = (key, free)


def _static_rollout_cache(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int):
    """Prefill for compiled rollouts: a StaticCache of row_bucket(B) x column_bucket(P + new_tokens) from the pool,
    the left-padded prompts (B, P) written into its first P columns by _prefill (compiled on the CPU). Returns (the
    step, the prompts' last hidden states (B, d))."""
    B, P = ids.shape
    rows, columns = row_bucket(B), column_bucket(P + new_tokens)
    full = torch.zeros(rows, columns, dtype=torch.long, device=ids.device)  # (rows, L) the mask over every column
    full[:B, :P] = mask
    full[B:, P - 1] = 1  # padding rows: one attended column (a pad token), never an all-masked row
    padded = torch.cat([ids, ids.new_zeros(rows - B, P)]) if rows > B else ids
    positions = position_ids_from_mask(full[:, :P])
    cache = take_static_cache(model, rows, columns, ids.device)
    prefill = _compiled(_prefill, ids.device) if ids.device.type in COMPILED_PREFILL else _prefill
    hidden = prefill(model, cache_kwarg(model), padded, full, positions, torch.arange(P, device=ids.device),
                     cache)[:B]  # (B, d)
    return _StaticCache(model, cache, full, P, B), hidden


def _static_prefix_cache(model, cache, mask: torch.Tensor, new_tokens: int):
    """Compiled continuations from encoded states: their (n, W) DynamicCache copied into a StaticCache of
    row_bucket(n) x column_bucket(W + new_tokens) (the prefix in its first W columns, every layer). Returns the step."""
    from transformers import StaticCache

    n, W = mask.shape
    rows, columns = row_bucket(n), column_bucket(W + new_tokens)
    full = torch.zeros(rows, columns, dtype=torch.long, device=mask.device)
    full[:n, :W] = mask
    static = StaticCache(config=model.config, max_cache_len=columns)
    for i, layer in enumerate(getattr(cache, "layers", [])):
        if W and getattr(layer, "is_initialized", True):
            keys, values = layer.keys[:, :, :W], layer.values[:, :, :W]
            pad = rows - n
            if pad:
                keys = torch.cat([keys, keys.new_zeros((pad,) + keys.shape[1:])])
                values = torch.cat([values, values.new_zeros((pad,) + values.shape[1:])])
            static.update(keys, values, i)
    return _StaticCache(model, static, full, W, n)


@dataclass
class Rollouts:
    """A batch of student responses, ready for the scorers in teacher.py.

    ids            (B, P+R) long: left-padded prompt (P columns) then response (R columns), pad after EOS
    attention_mask (B, P+R) long: 1 on real prompt tokens and on response tokens up to and including EOS
    prompt_width   P: the response of every row starts at column P
    response_mask  (B, R) long: the loss mask m_t of the spec (1 up to and including the first EOS)
    truncated      (B,) bool: hit max_new_tokens without EOS
    prompt_lens    (B,) long: real (unpadded) prompt lengths
    logprobs       (B, R) fp32: the sampler's log-probs of the sampled tokens (for the sampler/learner check, trap 14)
    cache          the sampling model's KV cache of the whole batch (keep_cache=True), else None: the probe's
                   states are prefixes of these rows, so it can start from this cache instead of re-encoding them
    """
    ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    response_mask: torch.Tensor
    truncated: torch.Tensor
    prompt_lens: torch.Tensor
    logprobs: torch.Tensor
    cache: object = None

    @property
    def response_ids(self) -> torch.Tensor:
        return self.ids[:, self.prompt_width:]  # (B, R)

    def prefix(self, row: int, t: int) -> torch.Tensor:
        """State s_t as ids: the row's real prompt followed by its first t response tokens (1-D)."""
        start = self.prompt_width - int(self.prompt_lens[row])
        return self.ids[row, start:self.prompt_width + t]


@torch.no_grad()
def sample_rollouts(model, prompt_ids, *, sampling: SamplingConfig, eos_ids, pad_id: int,
                    generator: torch.Generator, keep_cache: bool = False) -> Rollouts:
    """Sample one response per prompt (list of id lists) with our cached loop. The model must be in eval().
    keep_cache: return the KV cache that sampling built anyway (for probing from states of these rollouts); with
    compiled decoding, hand it back with recycle_cache once done with it, or the next rollouts allocate anew."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, pad_id, device)  # (B, P)
    with hidden_states_out(model) as to_head:  # forwards return final hidden states; _decode draws from fp32 logits
        if sampling.decode == "compiled":
            step, last = _static_rollout_cache(model, ids, mask, sampling.max_new_tokens)
        else:
            step = _GrowingCache(model, new_cache(model), mask)
            last = model_step(model, ids, mask, position_ids_from_mask(mask), step.cache, logits_to_keep=1)[:, -1]
        tokens, logps, valid, _ = _decode(step, to_head, last, mask.sum(-1), sampling.max_new_tokens, sampling,
                                          generator, eos_ids, pad_id)  # (B, R) each
    if not keep_cache:
        recycle_cache(model, step.cache)  # compiled: back to the pool for the next rollouts (eager: nothing to do)
    eos = torch.isin(tokens, torch.as_tensor(eos_ids, device=device)) & valid.bool()
    return Rollouts(ids=torch.cat([ids, tokens], 1), attention_mask=torch.cat([mask, valid], 1),
                    prompt_width=ids.shape[1], response_mask=valid, truncated=~eos.any(-1),
                    prompt_lens=mask.sum(-1), logprobs=logps * valid, cache=step.cache if keep_cache else None)


# ----------------------------------------------------------------------------------------------------------------
# Watching the rollouts: length, truncation, the sampler-vs-learner gap
# ----------------------------------------------------------------------------------------------------------------

def rollout_stats(ro: Rollouts, learner=None, vocab_size=None, chunk_size: int = DEFAULT_CHUNK) -> dict:
    """Length, truncation and EOS of the rollouts; with the learner's fused_kernels.Head, the sampler-vs-learner log-prob
    gap (trap 14: ~0 unless padding, positions or dtypes differ between sampling and training). Values are
    (numerator, denominator) pairs, as topd.reduce_stats sums them over micro-batches and ranks."""
    n = torch.tensor(float(len(ro.truncated)))
    truncated = ro.truncated.sum().float().cpu()
    stats = {"rollout/len_mean": (ro.response_mask.sum().float(), n), "rollout/truncated_frac": (truncated, n),
             "rollout/eos_frac": (n - truncated, n)}
    if learner is not None:
        with torch.no_grad():
            logp = token_logprobs(learner, ro.response_ids, vocab_size=vocab_size, chunk_size=chunk_size)
            stats["rollout/logp_mismatch"] = (((logp - ro.logprobs).abs() * ro.response_mask).sum(),
                                              ro.response_mask.sum().float())
    return stats


class TruncationWatch:
    """Flags a run whose rollouts keep hitting the length cap: truncated_frac above `limit` for `patience` steps in a
    row is the first sign of a stop-token mismatch or a length explosion (traps 4 and 18)."""

    def __init__(self, limit: float = 0.5, patience: int = 10):
        self.limit, self.patience, self.streak = limit, patience, 0

    def update(self, truncated_frac: float) -> str | None:
        """Count one step; returns a warning line when the streak reaches `patience` (and every `patience` after)."""
        self.streak = self.streak + 1 if truncated_frac > self.limit else 0
        if self.streak and self.streak % self.patience == 0:
            return (f"WARNING: {self.streak} steps in a row with more than {self.limit:.0%} of rollouts truncated at "
                    "--max-new-tokens: the student is not stopping (stop tokens that differ between the models? a "
                    "cap too small for the task?)")
        return None


# ----------------------------------------------------------------------------------------------------------------
# Near-future probes: encode each state once, reuse its KV cache for all K continuations (spec sec. 3 and 5)
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class EncodedPrefixes:
    """N states s_t, run through one model once.

    The cache holds every prefix token EXCEPT the last one; the last token is fed again by whoever uses the cache.
    That way both sampling (feed last token -> logits of c_0) and scoring (feed [last, c_0 .. c_{H-2}] -> logits of
    c_0 .. c_{H-1}, with gradient when wanted) start from the same cached computation.
    cache: KV cache of (N, W) left-padded tokens; attention_mask (N, W); last_token (N,); last_position (N,).
    """
    cache: object
    attention_mask: torch.Tensor
    last_token: torch.Tensor
    last_position: torch.Tensor

    def repeated(self, k: int):
        """(cache, attention_mask, last_token, last_position) with every state repeated k times, row-major
        (state 0 x k, state 1 x k, ...). A fresh cache (the K continuations extend it), the original untouched:
        one gather per layer, the only copy made (HF attention needs each row's keys in its own batch slot)."""
        rows = torch.arange(len(self), device=self.last_token.device)
        return (cache_rows(self.cache, rows, self.attention_mask.shape[1], repeats=k),
                self.attention_mask.repeat_interleave(k, 0), self.last_token.repeat_interleave(k, 0),
                self.last_position.repeat_interleave(k, 0))

    def select(self, index: torch.Tensor) -> "EncodedPrefixes":
        """The subset of states `index` (1-D long), e.g. the divergent ones, as a new object (those rows copied)."""
        return EncodedPrefixes(cache=cache_rows(self.cache, index, self.attention_mask.shape[1]),
                               attention_mask=self.attention_mask[index], last_token=self.last_token[index],
                               last_position=self.last_position[index])

    def __len__(self) -> int:
        return len(self.last_token)


def cache_rows(cache, rows: torch.Tensor, width: int, repeats: int = 1):
    """A new KV cache holding the given batch rows (each `repeats` times, row-major) and the first `width` columns of
    `cache`. Only those rows and columns are copied, one gather per layer: at 16k-token prefixes a deep copy of a
    whole batch's cache (then cut) would cost gigabytes per probed micro-batch.

    A compiled rollout's StaticCache has the same column layout (its columns past the rollout were never written and
    are never copied), so it is cut the same way, into a DynamicCache. Sliding-window caches keep their own layer
    types (a copy, then HF's own row operations); they are never cut to fewer columns here (prefixes_from_cache
    re-encodes their states instead).
    """
    from transformers import DynamicCache

    index = rows.repeat_interleave(repeats) if repeats > 1 else rows
    layers = getattr(cache, "layers", [])
    if width == 0 or not layers or not getattr(layers[0], "is_initialized", True):
        return DynamicCache()  # nothing cached yet: an empty cache that the next forward fills
    if not all(_cuttable(layer) for layer in layers):
        out = copy.deepcopy(cache)
        out.batch_select_indices(index)
        return out
    out = DynamicCache()
    for i, layer in enumerate(layers):
        out.update(layer.keys[index, :, :width], layer.values[index, :, :width], i)
    return out


def _cuttable(layer) -> bool:
    """A cache layer that holds one key/value column per token, every column from the first: the eager DynamicLayer
    and the compiled StaticLayer (not their sliding-window kinds, nor recurrent states)."""
    from transformers.cache_utils import DynamicLayer, StaticLayer

    return type(layer) in (DynamicLayer, StaticLayer)


def check_prefix_cache(model, cut: bool = False) -> None:
    """Raise ValueError unless every layer of this model keeps per-token keys and values that can be cut to a prefix.

    The probe and the guidance windows start from states s_t cut out of a KV cache (prefixes_from_cache) or encoded
    with left padding (encode_prefixes); both assume that a layer's cache is one key/value column per token.
    Linear-attention / state-space layers (Qwen3-Next's gated delta net, Mamba, hybrid models) keep a recurrent
    state instead: it cannot be cropped to an earlier position, and left padding leaks into it. Those models would
    get WRONG prefixes silently, so they are refused here, naming the layer type, before any compute.
    Sliding-window layers are fine: their prefixes are re-encoded (see prefixes_from_cache), except with cut=True
    (models sharded with FSDP: a re-encoding is a forward that only the ranks with divergent states would run).
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = new_cache(model)
    config = getattr(model, "config", None)
    layer_types = list(getattr(config, "layer_types", None) or getattr(getattr(config, "text_config", None),
                                                                         "layer_types", None) or [])
    for i, layer in enumerate(getattr(cache, "layers", [])):
        kind = layer_types[i] if i < len(layer_types) else "?"
        if cut and type(layer) is DynamicSlidingWindowLayer:
            raise ValueError(f"layer {i} of {type(model).__name__} is a sliding-window layer ({kind!r}): its prefixes "
                             "are re-encoded, not cut from the rollout's cache, which --parallel fsdp does not "
                             "support yet (the ranks' forwards would differ). Use --parallel ddp or --mode opd.")
        if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) or type(layer).__name__ == "DummyLayer":
            continue
        raise ValueError(
            f"layer {i} of {type(model).__name__} is of type {kind!r} (cache {type(layer).__name__}): it keeps a "
            "recurrent state, not per-token keys and values, so the probe and the guidance windows cannot start "
            "from a prefix of a rollout. Use --mode opd, or a model with attention layers only.")


def prefixes_from_cache(cache, rollouts: Rollouts, rows: torch.Tensor, ts: torch.Tensor) -> EncodedPrefixes | None:
    """States s_t = (row, t) of `rollouts` as EncodedPrefixes cut out of a KV cache of the whole rollout batch
    (the sampler's, or the teacher's scoring pass), instead of running every prefix through the model again.

    Every state of a rollout is a prefix of that rollout, so its keys and values are already in the cache: we keep
    the rows, crop the columns to the longest state, and MASK the columns beyond each state's own end. The new
    tokens then go after column W with their true position ids; masked columns are simply never attended to.
    Example (P = 3, state t = 2 of a row with prompt [pad, x1, x2] and response [y1, y2, y3]):
        columns   pad x1 x2 y1 | feed y2 next   -> mask [0, 1, 1, 1], last_token y2, last_position 3
    Returns None for caches with sliding-window layers (they no longer hold every column) or with no column to
    keep: the caller encodes those states instead.
    """
    P = rollouts.prompt_width
    width = P + int(ts.max()) - 1  # cached columns needed: everything before each state's last token
    from transformers.cache_utils import DynamicLayer, StaticLayer
    if any(not isinstance(layer, (DynamicLayer, StaticLayer)) for layer in getattr(cache, "layers", [])):
        raise ValueError(f"a cache with {sorted({type(l).__name__ for l in cache.layers})} layers cannot be cut to "
                         "a prefix (see check_prefix_cache)")
    sliding = getattr(cache, "is_sliding", False)
    if width < 1 or (any(sliding) if isinstance(sliding, (list, tuple)) else sliding):
        return None
    cut = cache_rows(cache, rows, width)  # only the states' rows and the columns before their last token
    cols = torch.arange(width, device=rows.device)
    start = P - rollouts.prompt_lens[rows]  # first real (non-pad) column of each row
    mask = ((cols[None, :] >= start[:, None]) & (cols[None, :] < (P + ts - 1)[:, None])).long()  # (N, W)
    last = rollouts.ids[rows, P + ts - 1]
    return EncodedPrefixes(cache=cut, attention_mask=mask, last_token=last,
                           last_position=rollouts.prompt_lens[rows] + ts - 1)


@torch.no_grad()
def encode_prefixes(model, prefixes, pad_id: int) -> EncodedPrefixes:
    """Run the N states (list of 1-D id tensors, each >= 1 token) through the model once, without gradient."""
    device = next(model.parameters()).device
    if any(len(p) < 1 for p in prefixes):
        raise ValueError("every prefix needs at least one token")
    ids, mask = left_pad([p[:-1].tolist() for p in prefixes], pad_id, device)  # (N, W)
    cache = new_cache(model)
    if ids.shape[1]:
        model_step(model, ids, mask, position_ids_from_mask(mask), cache, logits_to_keep=1)
    last = torch.stack([p[-1] for p in prefixes]).to(device)
    return EncodedPrefixes(cache=cache, attention_mask=mask, last_token=last, last_position=mask.sum(-1))


@dataclass
class Continuations:
    """K sampled continuations of up to H tokens from each of N states (H below is the longest one's length).

    ids (N, K, H) long, mask (N, K, H) long (1 up to and including EOS), logprobs (N, K, H) fp32 under the
    sampling distribution (at temperature 1 these are the sampling model's own log-probs: no rescoring needed),
    head: the sampling model's distribution along its continuation as a fused_kernels.Head over (N, K, H, d) hidden states
    when asked for (the guidance windows need the teacher's full distribution there; keeping it saves a second
    teacher forward, and hidden states are V/d times smaller than logits: 60x for Qwen3-4B), else None.
    """
    ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    head: Head | None = None

    def select(self, index: torch.Tensor) -> "Continuations":
        """The continuations of the states `index` (1-D long)."""
        return Continuations(ids=self.ids[index], mask=self.mask[index], logprobs=self.logprobs[index],
                             head=None if self.head is None else self.head.select(index))


@torch.no_grad()
def sample_continuations(model, prefixes: EncodedPrefixes, k: int, horizon: int, *, sampling: SamplingConfig,
                         eos_ids, pad_id: int, generator: torch.Generator, keep_hidden: bool = False) -> Continuations:
    """K continuations of up to `horizon` tokens from each encoded state (the probe and the guidance windows).
    Shapes are (N, K, S) with S <= horizon the length of the longest continuation.

    The candidate token itself is re-drawn (rollback 1, spec sec. 3): the prefixes are s_t, which ends BEFORE y_t.
    Only `horizon` and the EOS ids bound a continuation (sampling.max_new_tokens is not used here).
    """
    cache, mask, last, pos = prefixes.repeated(k)  # N*K rows
    step = (_static_prefix_cache(model, cache, mask, horizon + 1)
            if continuation_decode(sampling.decode, mask.device) == "compiled" else _GrowingCache(model, cache, mask))
    with hidden_states_out(model) as to_head:  # forwards return final hidden states; _decode draws from fp32 logits
        first = step(last, torch.ones_like(last, dtype=torch.bool), pos)  # (N*K, d): the state's last token fed
        tokens, logps, valid, kept = _decode(step, to_head, first, pos + 1, horizon, sampling, generator, eos_ids,
                                             pad_id, keep_hidden=keep_hidden)
        # S <= horizon columns: decoding stopped once every continuation had ended, and nothing downstream needs the
        # all-padding tail (scoring it would be wasted work: a toy continuation often ends long before H)
        shape = (len(prefixes), k, tokens.shape[1])
        # keep_hidden: the LM head's input at every decoding step, (N, K, S, d), as a Head (weight read now)
        head = to_head(torch.stack(kept, 1).view(shape + kept[0].shape[-1:])) if keep_hidden else None
    return Continuations(ids=tokens.view(shape), mask=valid.view(shape), logprobs=(logps * valid).view(shape),
                         head=head)


# ----------------------------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------------------------

def _tiny_random_model():
    """A 2-layer Llama with a 64-token vocabulary and a stand-in tokenizer-free setup, for the demo and tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: a tiny random Llama)")
    parser.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts with the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sampling = SamplingConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    if args.model is None:
        model, tokenizer, pad, eos = _tiny_random_model(), None, 0, [2]
        prompt_ids = [[1, 10, 11, 12], [1, 20]]
    else:
        model, tokenizer = load_policy(args.model)
        pad, eos = pad_token_id(tokenizer), eos_token_ids(model, tokenizer)
        prompt_ids, n_trunc = encode_prompts(tokenizer, args.prompt or ["1+2=?\n"], chat_template=args.chat_template)
    gen = make_generator(args.seed, 0, 0, device=next(model.parameters()).device)
    ro = sample_rollouts(model, prompt_ids, sampling=sampling, eos_ids=eos, pad_id=pad, generator=gen)
    print(f"prompt width P={ro.prompt_width}, response columns R={ro.response_ids.shape[1]}")
    for b in range(len(prompt_ids)):
        resp = ro.response_ids[b][ro.response_mask[b].bool()].tolist()
        text = tokenizer.decode(resp) if tokenizer is not None else resp
        print(f"row {b}: prompt_len={int(ro.prompt_lens[b])} truncated={bool(ro.truncated[b])} response={text!r}")
    enc = encode_prefixes(model, [ro.prefix(0, 3), ro.prefix(1, 1)], pad)
    cont = sample_continuations(model, enc, k=2, horizon=5, sampling=sampling, eos_ids=eos, pad_id=pad, generator=gen)
    print("probe: 2 states x 2 continuations x 5 tokens, from one encoding of each state:")
    print(cont.ids.tolist())


if __name__ == "__main__":
    main()
