"""
train.py -- TOPD training: one process or many (torchrun), CPU or GPU, the toy world by default.

    python train.py                                           # the main job: the toy world, 1 process
    torchrun --standalone --nproc_per_node=2 train.py         # the same on 2 processes (CPU: gloo, GPU: nccl)
    torchrun --standalone --nproc_per_node=8 train.py --student Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-8B \\
        --prompts math.jsonl --eval-prompts data/aime24.jsonl --chat-template --instruction ...
    torchrun --standalone --nproc_per_node=8 train.py --parallel fsdp --student Qwen/Qwen3-4B-Instruct-2507 \\
        --teacher Qwen/Qwen3-30B-A3B-Instruct-2507 ...   # the paper's pair: both models sharded (parallel.py)

With no --student/--teacher the toy world (toy.py) is built if missing and its student is distilled from its teacher
with the toy's own defaults (toy.train_defaults); with real models the defaults below are those of a pretrained LLM.

One optimizer step (train_step), in order (docs/method.md, "Modes" and sections 1-5):
  0. every rank takes its contiguous share of the step's prompts and samples one rollout per prompt with the
     CURRENT student (on-policy), micro-batch by micro-batch, each with its own seeded generator;
  1. the response-token count of the whole step is summed over ranks: the loss normaliser N, known before any
     backward (OPD trap 5);
  2. phase A (opd_phase), per micro-batch: teacher scores (no grad) -> student forward (grad) -> per-token loss
     l_t -> [opd_suppress, topd] topd.detect: candidates, D, divergent, guidance windows -> topd.opd_objective,
     L_OPD(w), backward times world_size (DDP averages gradients; we want the sum over all tokens / N);
  3. phase B (guidance_phase) [topd]: the windows of the whole step are replayed through the student with gradient,
     topd.guide_objective; L_guide's normaliser (total window weight, all ranks) is all-reduced first, and every
     rank runs the same number of rounds (an empty one is a zero-loss forward), so DDP and FSDP stay in step;
  4. only the LAST backward of the step synchronises gradients (DDP's no_sync() / FSDP's
     set_requires_gradient_sync(False) on all others, unless --sync-every-backward); clip; skip the step if the
     loss or the gradient norm is not finite; AdamW; warmup + cosine schedule.
L_TOPD = L_OPD(w) + lambda * L_guide is a sum, so back-propagating its two parts separately gives exactly the
gradient of topd.topd_objective, which is built from the same two functions.

Checkpoints (out/ckpt-NNNNNN, checkpoint.py): an HF folder that transformers / vLLM load as is, plus the trainer
state; written atomically, `out/latest` switched last; an --out that holds another run is refused (--overwrite
replaces it). --resume continues a run with the same flags and reproduces the uninterrupted run (every random
draw is seeded by (seed, step, rank, micro-batch, purpose)).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import eval_aime
import parallel
import sample
import teacher as teacher_lib
import topd
from fused_kernels import DEFAULT_CHUNK
from parallel import all_reduce, grad_sync


# ----------------------------------------------------------------------------------------------------------------
# Config: one dataclass, every field a --kebab-case flag (the method's knobs come from topd.TOPDConfig)
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig(topd.TOPDConfig):
    # models and data (empty student/teacher/prompts = the toy world, with toy.train_defaults)
    student: str = ""              # student checkpoint: local folder or hub id
    teacher: str = ""              # teacher checkpoint: same tokenizer and stop tokens as the student (checked)
    prompts: str = ""              # training prompts, JSONL {"prompt": ...} (answers not needed)
    eval_prompts: str = ""         # held-out JSONL {"prompt"/"problem", "answer"} for accuracy
    eval_range: str = "0,999"      # "lo,hi": integer answers outside are wrong (AIME); "" = no range check
    toy_dir: str = "runs/toy"      # where the toy world is built / found when no models are given
    chat_template: bool = False    # wrap prompts in the tokenizer's chat template (instruct models)
    enable_thinking: str = ""      # "", "true" or "false": passed to templates that take it (Qwen3)
    instruction: bool = False      # append eval_aime's boxed-answer instruction to every prompt
    max_prompt_len: int = 1024     # longer prompts are left-truncated (counted), or rejected with --strict
    strict: bool = False
    # rollouts
    rollout_batch: int = 64        # prompts per optimizer step, all ranks together
    micro_batch: int = 4           # rollouts per forward/backward (per rank); the toy uses 32
    max_new_tokens: int = 8192     # response cap; capped rollouts count as truncated (the toy uses 48)
    temperature: float = 1.0       # 1.0 = on-policy; the estimators assume it (any other value: warned, biased)
    decode: str = "eager"          # eager | compiled: how rollouts, probe continuations and evaluation decode
                                   # (sample.py "Compiled decoding": the same draws, a preallocated cache and a
                                   # torch.compile'd one-token step; bench.py section 7 measures both)
    # optimisation
    steps: int = 200
    lr: float = 1e-6               # a pretrained LLM's scale; the toy's 3e-4 would wreck one
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    warmup: int = 10               # linear warmup steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    max_bad_steps: int = 5         # consecutive non-finite steps before giving up
    # evaluation and checkpoints
    eval_every: int = 50           # steps between held-out evaluations (0 = only before and after)
    eval_limit: int = 500          # evaluate on at most this many held-out prompts
    eval_batch_tokens: int = 65536  # rows per evaluation batch: as many as fit in this many KV-cached tokens, rows x
                                    # (prompt + max_new_tokens) (9.6 GB of cache for Qwen3-4B in bf16)
    eval_temperature: float = 0.0  # 0 = greedy
    save_every: int = 0            # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2      # this run's newest checkpoints kept; older ones of THIS run are deleted
    out: str = ""                  # run folder; "" = runs/<mode> (opd) or runs/<mode>-<detector>
    resume: bool = False           # continue from out/latest (the flags must match the checkpoint's)
    overwrite: bool = False        # start afresh in an --out that holds another run, deleting its checkpoints
    stop_at_step: int = 0          # stop early (e.g. a job time limit) after this step; the schedule still uses --steps
    seed: int = 0
    dist_timeout: float = 60.0     # minutes a collective may wait for the slowest rank (NCCL's own default, 10, kills a
                                   # run whose ranks wait while one still decodes a long evaluation batch)
    device: str = "auto"           # auto | cpu | cuda
    dtype: str = "auto"            # auto (fp32 on CPU, bf16 autocast on CUDA) | float32 | bfloat16
    chunk_size: int = DEFAULT_CHUNK  # positions per chunk of the fused kernels (256): ~4 fp32 (chunk, V) temporaries
                                     # live, 0.6 GB at Qwen's 151,936 columns (1024: 2.5 GB), whatever the length
    gradient_checkpointing: bool = False  # recompute student activations in backward (long rollouts on a GPU)
    parallel: str = "ddp"          # ddp: a full replica of both models per rank | fsdp: both sharded (parallel.py)
    unshard_rollouts: bool = True  # FSDP: gather the student's weights once for the rollouts instead of per layer and
                                   # token (parallel.gathered): +the whole student in bf16 per rank during sampling
    sync_every_backward: bool = False  # reduce gradients after EVERY backward, not only the step's last: more
                                       # communication, but under FSDP no unsharded fp32 gradients (4 B x params)
    log_every: int = 1
    logp_check_every: int = 10     # steps between sampler-vs-learner log-prob checks (one extra pass over logits)
    self_check: bool = True        # at start: score one rollout twice and through the KV cache; fail on disagreement
    allow_stop_mismatch: bool = False  # warn instead of failing when the two models' stop tokens differ

    @property
    def thinking(self) -> bool | None:
        """--enable-thinking as chat templates take it: None (the template's default), True or False."""
        return None if not self.enable_thinking else self.enable_thinking == "true"


CHOICES = {"mode": topd.MODES, "kl": ("full", "sampled"), "detector": topd.DETECTORS, "decode": sample.DECODE_MODES,
           "div_rule": ("relative", "absolute"), "device": ("auto", "cpu", "cuda"), "parallel": parallel.LAYOUTS,
           "dtype": ("auto", "float32", "bfloat16"), "enable_thinking": ("", "true", "false")}


def parse_config(argv=None) -> TrainConfig:
    """argparse over the dataclass; bad values are argparse errors that name the flag."""
    parser = argparse.ArgumentParser(description="TOPD / OPD training (see the module docstring)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type],
                                default=argparse.SUPPRESS, choices=CHOICES.get(f.name),
                                help=f"default: {f.default!r}")
    explicit = vars(parser.parse_args(argv))  # only the flags actually given
    if not explicit.get("student"):  # the toy world's own values; an explicit flag still wins
        import toy
        explicit = {**toy.train_defaults(explicit.get("toy_dir", TrainConfig.toy_dir)), **explicit}  # its cap
    cfg = TrainConfig(**explicit)
    at_least = {**dict.fromkeys(("num_candidates", "probe_samples", "probe_tokens", "horizon", "rollout_batch",
                                 "eval_batch_tokens",
                                 "micro_batch", "max_new_tokens", "steps", "chunk_size", "max_bad_steps",
                                 "keep_checkpoints", "log_every", "logp_check_every"), 1),
                **dict.fromkeys(("min_gap", "warmup", "eval_every", "save_every", "stop_at_step", "weight_decay",
                                 "guide_weight", "suppress_weight", "div_alpha", "guide_horizon"), 0)}
    for name, low in at_least.items():
        if getattr(cfg, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}")
    if not 0 < cfg.guide_decay <= 1 or cfg.lr <= 0 or cfg.temperature <= 0 or cfg.dist_timeout <= 0:
        parser.error("--guide-decay must be in (0, 1], --lr, --temperature and --dist-timeout > 0")
    if bool(cfg.student) != bool(cfg.teacher):
        parser.error("give both --student and --teacher, or neither (toy world)")
    for name in ("prompts", "eval_prompts"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            parser.error(f"--{name.replace('_', '-')}: file not found: {path}")
    if cfg.student and not cfg.prompts:
        parser.error("--prompts is required with --student/--teacher")
    if "div_threshold" in explicit and cfg.div_rule != "absolute":
        parser.error("--div-threshold is the tau of the absolute rule: add --div-rule absolute (the relative rule "
                     "uses --div-alpha)")
    if cfg.resume and cfg.overwrite:
        parser.error("--resume continues the run in --out, --overwrite deletes it: give one of them")
    if cfg.eval_range and len(cfg.eval_range.split(",")) != 2:
        parser.error(f"--eval-range must be 'lo,hi' or '', got {cfg.eval_range!r}")
    if cfg.temperature != 1.0:
        warnings.warn(f"--temperature {cfg.temperature}: rollouts are not samples of the student's policy, so both "
                      "estimators of the reverse KL (full and sampled) are biased; OPD's theory assumes 1.0",
                      stacklevel=2)
    cfg.out = cfg.out or (f"runs/{cfg.mode}" if cfg.mode == "opd" else f"runs/{cfg.mode}-{cfg.detector}")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Setup: everything a step needs, built once
# ----------------------------------------------------------------------------------------------------------------

def print0(*args, rank: int = 0, **kw):
    if rank == 0:
        print(*args, **kw, flush=True)


@dataclass
class Run:
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    autocast: object            # a context-manager factory: bf16 autocast on CUDA, a no-op on CPU
    student: torch.nn.Module    # the raw module (sampling, probing, saving); under FSDP the sharded module itself
    model: torch.nn.Module      # what the loss goes through: DDP(student), or the student itself (FSDP, 1 process)
    teacher: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    prompts: list
    prompt_ids: list
    eval_rows: list
    vocab_size: int             # the tokenizer's size: logits are sliced to it, samplers never draw past it
    pad_id: int
    eos_ids: list               # every stop token (bench.py sets [-1] to sample exactly max_new_tokens)
    special_ids: list           # never candidates: special and added tokens of the tokenizer, EOS included
    run_id: str                 # names this run's checkpoints (rotation deletes only its own)
    lockstep: bool = False      # the models are sharded: every rank runs the same forwards (parallel.py)
    forward_tokens: dict = dataclasses.field(default_factory=dict)  # model name -> checkpoint.ForwardTokens
    accuracy_before: float | None = None  # held-out accuracy at step 0, carried through resumes
    start_step: int = 0
    bad_steps: int = 0


def resolve_dtype(name: str, device_kind: str) -> torch.dtype:
    """--dtype as a torch dtype: auto is bf16 on CUDA and fp32 elsewhere."""
    return torch.bfloat16 if name == "bfloat16" or (name == "auto" and device_kind == "cuda") else torch.float32


def setup(cfg: TrainConfig, device_kind: str, rank: int = 0, world: int = 1, local_rank: int = 0,
          log=print) -> Run:
    device = torch.device(f"cuda:{local_rank}" if device_kind == "cuda" else "cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(device)
    if cfg.rollout_batch % world:
        raise ValueError(f"--rollout-batch {cfg.rollout_batch} must be divisible by the number of processes {world}")
    checkpoint.prepare_out(Path(cfg.out), cfg, rank)  # before anything slow: a refused --out costs nothing
    sample.quiet_progress_bars()
    # Device and dtype, decided here once (compute_dtype): fp32 on CPU; on CUDA fp32 master weights and optimizer
    # state with bf16 compute for the student (autocast; under FSDP also the all-gathered copies, parallel.fsdp_policy),
    # and a teacher stored in the compute dtype (it never trains). --dtype float32 makes everything fp32, anywhere.
    compute_dtype = resolve_dtype(cfg.dtype, device_kind)
    use_bf16 = compute_dtype == torch.bfloat16
    autocast = (lambda: torch.autocast(device_kind, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    if not cfg.student:  # the toy world: built by rank 0 if missing, the others wait
        import toy
        paths = toy.world_for_training(cfg.toy_dir, rank, log)
        cfg.student, cfg.teacher = paths["student"], paths["teacher"]
        cfg.prompts, cfg.eval_prompts = cfg.prompts or paths["prompts"], cfg.eval_prompts or paths["eval_prompts"]

    # --- every input checked before any model weight is loaded ---
    prompts = eval_aime.load_prompts(cfg.prompts, require_answer=False)
    eval_rows = eval_aime.load_prompts(cfg.eval_prompts, require_answer=True)[:cfg.eval_limit] if cfg.eval_prompts else []
    vocab_size, s_tok = teacher_lib.check_checkpoints(cfg.student, cfg.teacher, warn=log,
                                                      allow_stop_mismatch=cfg.allow_stop_mismatch)
    prompt_ids, n_truncated = sample.encode_prompts(
        s_tok, [eval_aime.build_prompt(p["problem"], cfg.instruction) for p in prompts],
        chat_template=cfg.chat_template, max_prompt_len=cfg.max_prompt_len, strict=cfg.strict,
        enable_thinking=cfg.thinking)
    # a resumed run must be the same run: every flag that shapes the trajectory equal to the checkpoint's
    resume_from, meta = checkpoint.resume_point(Path(cfg.out), cfg) if cfg.resume else (None, {})

    # --- models, optimiser, schedule ---
    # under FSDP both models are sharded while they load: no rank ever holds a whole model on its device. Any process
    # group shards, one process included (torchrun --nproc_per_node=1: the FSDP code path on one GPU); a plain
    # `python train.py --parallel fsdp` has no group and nothing to shard
    lockstep = cfg.parallel == "fsdp" and dist.is_initialized()
    student, tokenizer = sample.load_policy(str(resume_from or cfg.student), device, torch.float32, shard=(
        (lambda m: parallel.shard_student(m, compute_dtype)) if lockstep else None))
    teacher, _ = teacher_lib.load_teacher(cfg.teacher, device, compute_dtype,
                                          shard=parallel.shard_teacher if lockstep else None)
    for m, name in ((student, f"the student ({cfg.student})"), (teacher, f"the teacher ({cfg.teacher})")):
        sample.check_head(m, name)  # the fused fp32 head must compute exactly the model's logits (no lm_head.bias)
        if cfg.mode != "opd":  # the probe and the guidance windows start from prefixes cut out of KV caches
            sample.check_prefix_cache(m, cut=lockstep)
    if cfg.gradient_checkpointing:
        sample.set_checkpointing(student, True)  # HF only checkpoints in train(): sampling in eval() keeps its KV cache
    student.train()
    model = parallel.wrap_student(student, cfg.parallel, device)  # DDP(student), or the (sharded) student itself
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)

    def lr_lambda(step):  # linear warmup, then cosine from 1 to min_lr_ratio over the remaining steps
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    eos_ids = sample.eos_token_ids(student, tokenizer)
    run = Run(cfg=cfg, rank=rank, world=world, device=device, autocast=autocast, student=student, model=model,
              teacher=teacher, tokenizer=tokenizer, optimizer=optimizer,
              scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda), prompts=prompts,
              prompt_ids=prompt_ids, eval_rows=eval_rows, vocab_size=vocab_size,
              pad_id=sample.pad_token_id(tokenizer), eos_ids=eos_ids,
              special_ids=sample.special_token_ids(tokenizer, eos_ids),
              run_id=meta.get("run_id") or checkpoint.new_run_id(), lockstep=lockstep,
              forward_tokens={"student": checkpoint.ForwardTokens(student),
                              "teacher": checkpoint.ForwardTokens(teacher)})
    if resume_from is not None:
        state = checkpoint.restore_trainer_state(resume_from, student, optimizer, run.scheduler, device, rank)
        run.start_step, run.bad_steps = state["step"], state["bad_steps"]
        run.accuracy_before = meta.get("accuracy_before")
        log(f"resumed from {resume_from} at step {run.start_step}")
    if cfg.self_check:  # teacher.self_check on two real rollouts of the student (trap 20)
        sampling = sample.SamplingConfig(temperature=cfg.temperature, max_new_tokens=min(cfg.max_new_tokens, 64),
                                         vocab_size=vocab_size, lockstep=lockstep)
        teacher_lib.self_check_on_samples(student, teacher, prompt_ids[:2], sampling=sampling, pad_id=run.pad_id,
                                          eos_ids=eos_ids, generator=sample.make_generator(cfg.seed, -1, rank, device=device),
                                          chunk_size=cfg.chunk_size, autocast=autocast, log=log)
    log(f"{len(prompts)} prompts ({n_truncated} left-truncated to {cfg.max_prompt_len} tokens), {len(eval_rows)} "
        f"held-out; {world} process(es) on {device_kind}; vocab {vocab_size}")
    return run


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------------------

def train_step(run: Run, step: int) -> dict:
    cfg, clock = run.cfg, checkpoint.Clock()
    for counter in run.forward_tokens.values():  # from here on, this step's forwards (not evaluation's)
        counter.take()
    per_rank = cfg.rollout_batch // run.world
    micro = [slice(i, min(i + cfg.micro_batch, per_rank)) for i in range(0, per_rank, cfg.micro_batch)]

    def generator(j, purpose):  # every random draw: (seed, step, global micro-batch index, purpose)
        return sample.make_generator(cfg.seed, step, run.rank * len(micro) + j, purpose, device=run.device)

    # ---- 0. rollouts from the current policy; rank r takes the r-th contiguous share of the step's prompts ----
    indices = sample.step_prompt_indices(len(run.prompts), step, cfg.rollout_batch, cfg.seed)[run.rank * per_rank:]
    # the probe and the guidance windows start from states of the rollouts: keep the KV caches that sampling and
    # teacher scoring build anyway, so that no prefix is ever encoded twice
    keep_caches = cfg.mode == "topd" or (cfg.mode == "opd_suppress" and cfg.detector == "probe")
    sampling = sample.SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                     vocab_size=run.vocab_size, lockstep=run.lockstep, decode=cfg.decode)
    with clock("sample"), torch.no_grad(), sample.eval_mode(run.student), run.autocast(), \
            parallel.gathered(run.student, cfg.unshard_rollouts):
        rollouts = [sample.sample_rollouts(run.student, [run.prompt_ids[i] for i in indices[rows]],
                                           sampling=sampling, pad_id=run.pad_id, eos_ids=run.eos_ids,
                                           generator=generator(j, 0), keep_cache=keep_caches)
                    for j, rows in enumerate(micro)]

    # ---- 1. the loss normaliser N: response tokens of the whole step, all ranks, known before any backward ----
    num_tokens = all_reduce(torch.tensor(float(sum(r.response_mask.sum() for r in rollouts)), device=run.device))
    run.optimizer.zero_grad(set_to_none=True)

    # ---- 2. phase A: L_OPD(w), micro-batch by micro-batch; in topd mode the last guidance backward syncs ----
    stats, windows = [], []
    for j, ro in enumerate(rollouts):
        sync = cfg.sync_every_backward or (cfg.mode != "topd" and j == len(rollouts) - 1)
        part, found = opd_phase(run, ro, num_tokens, sync=sync, generators=(generator(j, 1), generator(j, 2)),
                                clock=clock, check_logp=step % cfg.logp_check_every == 0)
        stats.append(part)
        windows += found

    # ---- 3. phase B: future-distributed guidance along the teacher's windows of the whole step ----
    if cfg.mode == "topd":
        with clock("train"):
            stats += guidance_phase(run, windows)

    # ---- 4. metrics over micro-batches and ranks, clip, step (or skip a non-finite step) ----
    stats.append({f"compute/{name}_tokens": (torch.tensor(float(c.take())), torch.tensor(1.0))
                  for name, c in run.forward_tokens.items()})
    metrics = topd.reduce_stats(stats, all_reduce=all_reduce if run.world > 1 else None)
    grad_norm = parallel.plain_tensor(torch.nn.utils.clip_grad_norm_(run.student.parameters(), cfg.grad_clip))
    finite = math.isfinite(metrics.get("opd/loss", float("nan"))) and bool(torch.isfinite(grad_norm))
    if finite:
        run.optimizer.step()
        run.bad_steps = 0
    else:  # keep the weights; the gradient of this step is thrown away
        skip_step(run, step)
    with warnings.catch_warnings():  # a skipped step still advances the schedule: it follows the step count
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        run.scheduler.step()
    elapsed = time.time() - clock.start
    metrics.update({"step": step + 1, "grad_norm": float(grad_norm), "lr": run.scheduler.get_last_lr()[0],
                    "skipped": not finite, "tokens_per_s": float(num_tokens) / elapsed,
                    **{f"time/{k}": round(v, 4) for k, v in clock.times.items()}, "time/step": round(elapsed, 4)})
    return metrics


def opd_phase(run: Run, ro: sample.Rollouts, num_tokens, *, sync: bool, generators, clock: checkpoint.Clock,
              check_logp: bool):
    """Phase A on one micro-batch: teacher scores -> student forward -> l_t -> [topd.detect] -> L_OPD(w) backward.
    Returns (statistics, the guidance windows found here: a list, empty outside topd mode)."""
    cfg = run.cfg
    teacher_cache = sample.new_cache(run.teacher) if ro.cache is not None else None  # the probe reuses it
    with clock("teacher"), run.autocast():  # full: a fused_kernels.Head over (b, R, d); sampled: (b, R) log-probs
        teacher_out = teacher_lib.score_rollouts(run.teacher, ro, cfg.kl, vocab_size=run.vocab_size,
                                                 chunk_size=cfg.chunk_size, cache=teacher_cache)
    with clock("train"), grad_sync(run.model, sync):
        with run.autocast():  # the fused path: (b, R, d) hidden states with grad, no (b, R, V) logits
            s_head = teacher_lib.response_head(run.model, ro)
        token_loss = topd.opd_token_loss(
            s_head, ro.response_ids, estimator=cfg.kl, vocab_size=run.vocab_size, chunk_size=cfg.chunk_size,
            teacher_logits=teacher_out if cfg.kl == "full" else None,
            teacher_logprobs=teacher_out if cfg.kl == "sampled" else None)
        found, detection = [], {}
        if cfg.mode != "opd":
            with clock("probe"), sample.eval_mode(run.student), run.autocast():
                d = topd.detect(run.student, run.teacher, ro, token_loss, cfg, special_ids=run.special_ids,
                                pad_id=run.pad_id, eos_ids=run.eos_ids, vocab_size=run.vocab_size,
                                generator=generators[0], windows_generator=generators[1], teacher_cache=teacher_cache,
                                lockstep=run.lockstep, decode=cfg.decode)
            found = d.windows
            detection = dict(candidates=d.candidates, scores=d.scores, divergent=d.divergent,
                             suppress_weight=cfg.suppress_weight)
        loss, stats = topd.opd_objective(cfg.mode, token_loss, ro.response_mask, num_tokens, **detection)
        # before the backward: under FSDP the head's full weight, which s_head reads, is freed by it
        stats.update(sample.rollout_stats(ro, s_head if check_logp else None, run.vocab_size, cfg.chunk_size))
        (loss * run.world).backward()  # DDP and FSDP AVERAGE gradients over ranks; sum over tokens / N needs * world
    # the probe is done with it (the guidance windows keep only their own states' slices): compiled decoding's
    # cache goes back to the pool for the next step's rollouts
    sample.recycle_cache(run.student, ro.cache)
    ro.cache = None
    return stats, found


def guidance_phase(run: Run, windows: list) -> list[dict]:
    """Phase B: lambda * L_guide over every window of the step, one backward per micro-batch's windows.

    L_guide's normaliser is the total window weight of the step on all ranks, known before any backward; every
    rank runs the same number of rounds (the most any rank has; an empty round is a zero-loss forward) so that
    DDP's gradient collectives stay in step, and the last round synchronises."""
    cfg = run.cfg
    local_total = sum((topd.guide_weights(w.teacher_conts.mask, cfg.guide_decay).sum() for w in windows),
                      torch.zeros((), device=run.device))
    guide_total = all_reduce(local_total.clone()).clamp(min=1e-9)
    rounds = max(parallel.max_over_ranks(len(windows), run.world > 1), 1)  # >= 1: it carries the sync
    stats = [topd.no_guidance_stats()]  # the same keys on every rank, windows or not
    for r in range(rounds):
        with grad_sync(run.model, cfg.sync_every_backward or r == rounds - 1), \
                sample.without_checkpointing(run.student, cfg.gradient_checkpointing):
            with run.autocast():  # the forward only: torch recommends backward outside autocast
                if r < len(windows):
                    window_kl = topd.guidance_kl(run.model, windows[r], vocab_size=run.vocab_size,
                                                 chunk_size=cfg.chunk_size)  # KL(teacher || student), (N, K, H)
                    loss, part = topd.guide_objective(window_kl, windows[r].teacher_conts.mask, guide_total,
                                                      guide_weight=cfg.guide_weight, guide_decay=cfg.guide_decay)
                    stats.append(part)
                else:  # nothing to guide on this rank this round: a zero-loss forward keeps DDP's collectives in step
                    loss = run.model(input_ids=torch.full((1, 1), run.pad_id, device=run.device)).logits.sum() * 0.0
            (loss * run.world).backward()
    return stats


def skip_step(run: Run, step: int) -> None:
    """A non-finite loss or gradient norm: drop the gradient, keep the weights, stop after max_bad_steps in a row."""
    run.optimizer.zero_grad(set_to_none=True)
    run.bad_steps += 1
    print0(f"step {step + 1}: non-finite loss or gradient norm; step skipped, weights kept "
           f"({run.bad_steps}/{run.cfg.max_bad_steps} in a row)", rank=run.rank)
    if run.bad_steps >= run.cfg.max_bad_steps:
        raise RuntimeError(f"{run.bad_steps} non-finite steps in a row at step {step + 1}: stopping. Lower --lr, "
                           "check the data, or try --dtype float32.")


# ----------------------------------------------------------------------------------------------------------------
# Main: the loop, evaluation, checkpoints
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_config(argv)
    device_kind = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    rank, world, local_rank = parallel.dist_init(device_kind, cfg.dist_timeout)
    try:
        results = train(cfg, device_kind, rank, world, local_rank)
        parallel.barrier()  # every rank done before any closes its connections: a rank that tore down its gloo pairs
                            # while another was still in a collective aborted it at exit
        return results
    finally:
        if dist.is_initialized():
            # The models sit in reference cycles (FSDP's hooks and state point back at their modules), so they outlive
            # train() until the next garbage collection, which may come only at interpreter exit, after the process
            # group is closed. Sharded modules torn down that late are the likely cause of a rank that aborted now and
            # then at exit ("terminate called without an active exception"). On a normal exit, free them while
            # everything is alive (after an error the traceback still holds train()'s frame, and the run dies anyway).
            gc.collect()
            dist.destroy_process_group()


def train(cfg: TrainConfig, device_kind: str, rank: int, world: int, local_rank: int):
    run = setup(cfg, device_kind, rank, world, local_rank, log=lambda *a: print0(*a, rank=rank))
    print0(f"config: {json.dumps(dataclasses.asdict(cfg))}", rank=rank)
    out = Path(cfg.out)
    log_metrics = checkpoint.MetricsLog(out, run.start_step, rank).write  # out/metrics.jsonl, from rank 0

    def evaluate(step):
        sampling = sample.SamplingConfig(temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens,
                                         vocab_size=run.vocab_size, lockstep=run.lockstep, decode=cfg.decode)
        acc = eval_aime.held_out_accuracy(
            run.student, run.tokenizer, run.eval_rows, sampling=sampling, seed=cfg.seed, rank=rank, world=world,
            instruction=cfg.instruction, chat_template=cfg.chat_template, enable_thinking=cfg.thinking,
            integer_range=tuple(map(int, cfg.eval_range.split(","))) if cfg.eval_range else None,
            max_prompt_len=cfg.max_prompt_len, batch_tokens=cfg.eval_batch_tokens, autocast=run.autocast,
            log=lambda line: print0(f"  {line}", rank=rank))  # generation in the training dtype, one line per batch
        print0(f"held-out accuracy at step {step}: {acc:.1%}", rank=rank)
        log_metrics({"step": step, "eval/accuracy": acc})
        return acc

    results = {}
    if run.eval_rows:  # the starting point: measured once, at step 0; a resumed run carries it in its checkpoint
        if run.accuracy_before is None:
            run.accuracy_before = evaluate(run.start_step)
        results["accuracy_before"] = run.accuracy_before
    last_step = min(cfg.steps, cfg.stop_at_step) if cfg.stop_at_step else cfg.steps
    bar, watch = None, sample.TruncationWatch()
    if rank == 0:
        from tqdm import tqdm
        # a bar only on a terminal: in a log file its redraws would interleave with the step lines
        bar = tqdm(total=last_step - run.start_step, desc=cfg.mode, unit="step", leave=False,
                   disable=not sys.stderr.isatty())
    for step in range(run.start_step, last_step):
        metrics = train_step(run, step)
        log_metrics(metrics)
        warning = watch.update(metrics["rollout/truncated_frac"])
        if bar is not None:
            if (step + 1) % cfg.log_every == 0:
                bar.write(checkpoint.step_line(metrics, cfg.steps))  # through the bar's writer: one clean line per step
            if warning:
                bar.write(warning)
            bar.update(1)
        done = step + 1 == last_step
        if run.eval_rows and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not done:
            evaluate(step + 1)
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or done:
            # DDP replicas must be equal (a desync check); FSDP shards are different by design
            checksums = None if run.lockstep else checkpoint.all_gather_checksum(run.student, world)
            checkpoint.save_checkpoint(out, step + 1, run.student, run.tokenizer, run.optimizer, run.scheduler, cfg,
                                       {"run_id": run.run_id, "accuracy_before": run.accuracy_before,
                                        "bad_steps": run.bad_steps, "metrics": metrics,
                                        "param_checksums": checksums}, rank=rank)
    if bar is not None:
        bar.close()
    if run.eval_rows:
        results["accuracy_after"] = evaluate(last_step)
        print0(f"held-out accuracy: before {results['accuracy_before']:.1%} -> after {results['accuracy_after']:.1%} "
               f"({cfg.mode}{'' if cfg.mode == 'opd' else ', ' + cfg.detector + ' detector'}, {last_step} steps)",
               rank=rank)
    if rank == 0:
        (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), **results}, indent=2))
    return results


if __name__ == "__main__":
    main()
