"""
train.py -- TOPD training: one process or many (torchrun), CPU or GPU, the toy world by default.

    python train.py                                           # the main job: toy world, 1 process
    torchrun --standalone --nproc_per_node=2 train.py         # the same on 2 processes (CPU: gloo, GPU: nccl)
    torchrun --standalone --nproc_per_node=8 train.py --student Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-8B \\
        --prompts math.jsonl --eval-prompts aime24.jsonl --chat-template --max-new-tokens 8192 ...

With no --student/--teacher the toy world (toy.py) is built if missing and the toy student is distilled from the
toy teacher, with held-out accuracy printed before and after.

One optimizer step, in order (spec "Modes" and sections 1-5):
  0. every rank takes its contiguous share of the step's prompts and samples one rollout per prompt with the
     CURRENT student (on-policy), micro-batch by micro-batch, each with its own seeded generator;
  1. the response-token count of the whole step is summed over ranks: the loss normaliser N, known before any
     backward (OPD trap 5);
  2. phase A, per micro-batch: teacher scores (no grad) -> student forward (grad) -> per-token loss l_t ->
     [opd_suppress, topd] candidates, detector (window: free; probe: K+K sampled continuations per candidate),
     divergence -> weights -> backward of L_OPD(w) * world_size (DDP averages gradients; we want the sum/N);
  3. phase B [topd]: the teacher windows collected at divergent states are replayed through the student with
     gradient; L_guide's normaliser (total window weight of the step, all ranks) is all-reduced first. Every
     rank runs the same number of guide micro-batches (an empty one is a zero-loss forward), so DDP stays in step;
  4. only the LAST backward of the step synchronises gradients (no_sync() on all others); clip; skip the step if
     the loss or the gradient norm is not finite; AdamW; warmup + cosine schedule.
L_TOPD = L_OPD(w) + lambda * L_guide is a sum, so back-propagating its two parts separately (phases A and B)
gives exactly its gradient; topd.topd_objective shows the same objective as one expression.

Checkpoints (out/ckpt-NNNNNN): an HF folder (`save_pretrained`, loadable by transformers / vLLM as is),
trainer_state.pt (optimizer, scheduler, step, RNG) and meta.json; written under a temporary name, then renamed,
then `out/latest` is switched atomically: a crash never leaves a broken "latest". --resume continues from it and
reproduces the uninterrupted run (every random draw is seeded by (seed, step, rank, micro-batch, purpose)).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import sample
import teacher as teacher_lib
import topd


# ----------------------------------------------------------------------------------------------------------------
# Config: one dataclass, every field a --kebab-case flag
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    # models and data (empty student/teacher/prompts = the toy world)
    student: str = ""              # student checkpoint: local folder or hub id
    teacher: str = ""              # teacher checkpoint: same tokenizer as the student (checked)
    prompts: str = ""              # training prompts, JSONL {"prompt": ...} (answers not needed)
    eval_prompts: str = ""         # held-out JSONL {"prompt"/"problem", "answer"} for accuracy
    toy_dir: str = "runs/toy"      # where the toy world is built / found when no models are given
    chat_template: bool = False    # wrap prompts in the tokenizer's chat template (instruct models)
    enable_thinking: str = ""      # "", "true" or "false": passed to templates that take it (Qwen3)
    instruction: bool = False      # append eval_aime's boxed-answer instruction to every prompt
    max_prompt_len: int = 1024     # longer prompts are left-truncated (counted), or rejected with --strict
    strict: bool = False
    # the method (TOPD_SPEC.md; defaults are the spec's)
    mode: str = "topd"             # opd | opd_suppress | topd
    kl: str = "full"               # full (exact reverse KL) | sampled (one-sample REINFORCE estimate)
    num_candidates: int = 4        # high-loss candidates per rollout
    min_gap: int = 8               # minimum distance between candidates
    detector: str = "probe"        # probe (sampled futures, margin W1) | window (mean loss of the next H tokens)
    probe_samples: int = 4         # K continuations per model per candidate
    horizon: int = 32              # H tokens per continuation / window
    div_rule: str = "relative"     # relative: tau = mean + alpha * std of D per rollout | absolute: tau = threshold
    div_alpha: float = 0.5         # alpha of the relative rule
    div_threshold: float = 1.0     # tau of the absolute rule, in D's units (nats/token); may be negative (--kl sampled)
    suppress_weight: float = 0.0   # weight of non-divergent candidates in L_OPD
    guide_weight: float = 1.0      # lambda
    guide_decay: float = 1.0       # gamma over the window
    # rollouts
    rollout_batch: int = 64        # prompts per optimizer step, all ranks together
    micro_batch: int = 32          # rollouts per forward/backward (per rank)
    max_new_tokens: int = 48       # response cap; capped rollouts count as truncated
    temperature: float = 1.0       # 1.0 = on-policy; the estimators assume it (any other value: warned, biased)
    ignore_eos: bool = False       # benchmarks only: always sample max_new_tokens tokens
    # optimisation
    steps: int = 300
    lr: float = 3e-4
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
    eval_temperature: float = 0.0  # 0 = greedy
    save_every: int = 0            # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2      # this run's newest checkpoints kept; older ones of THIS run are deleted
    out: str = ""                  # run folder; "" = runs/<mode> (opd) or runs/<mode>-<detector>
    resume: bool = False           # continue from out/latest (the flags must match the checkpoint's)
    overwrite: bool = False        # start afresh in an --out that holds another run, deleting its checkpoints
    stop_at_step: int = 0          # stop early (e.g. a job time limit) after this step; the schedule still uses --steps
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    dtype: str = "auto"            # auto (fp32 on CPU, bf16 autocast on CUDA) | float32 | bfloat16
    chunk_size: int = 1024         # positions per chunk in the fp32 log-softmax kernels
    gradient_checkpointing: bool = False  # recompute student activations in backward (long rollouts on a GPU)
    log_every: int = 1
    logp_check_every: int = 10     # steps between sampler-vs-learner log-prob checks (one extra pass over logits)
    self_check: bool = True        # at start: score one rollout twice and through the KV cache; fail on disagreement
    allow_stop_mismatch: bool = False  # warn instead of failing when the two models' stop tokens differ


CHOICES = {"mode": topd.MODES, "kl": ("full", "sampled"), "detector": ("probe", "window"),
           "div_rule": ("relative", "absolute"),
           "device": ("auto", "cpu", "cuda"), "dtype": ("auto", "float32", "bfloat16"),
           "enable_thinking": ("", "true", "false")}


# The toy world's responses are ~25 tokens, so the spec's 32-token horizon would span whole answers and make the
# probe cost more than everything else; these defaults apply to the toy world only, and an explicit flag wins.
TOY_DEFAULTS = {"horizon": 8}


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
    toy_defaults = TOY_DEFAULTS if not explicit.get("student") else {}
    cfg = TrainConfig(**{**toy_defaults, **explicit})
    positive = ["num_candidates", "probe_samples", "horizon", "rollout_batch", "micro_batch", "max_new_tokens",
                "steps", "chunk_size", "max_bad_steps", "keep_checkpoints", "log_every", "logp_check_every"]
    for name in positive:
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("min_gap", "warmup", "eval_every", "save_every", "stop_at_step", "weight_decay", "guide_weight",
                 "suppress_weight", "div_alpha"):
        if getattr(cfg, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0 < cfg.guide_decay <= 1 or cfg.lr <= 0 or cfg.temperature <= 0:
        parser.error("--guide-decay must be in (0, 1], --lr and --temperature > 0")
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
    if cfg.temperature != 1.0:
        warnings.warn(f"--temperature {cfg.temperature}: rollouts are not samples of the student's policy, so both "
                      "estimators of the reverse KL (full and sampled) are biased; OPD's theory assumes 1.0",
                      stacklevel=2)
    cfg.out = cfg.out or (f"runs/{cfg.mode}" if cfg.mode == "opd" else f"runs/{cfg.mode}-{cfg.detector}")
    return cfg


# Flags that may differ between a run and its --resume: they change what is logged, saved or checked, never the
# trajectory of the weights. Any other difference (--steps, --lr, ...) would silently change the schedule or the
# method half-way, so resume refuses it.
RESUME_MAY_CHANGE = {"resume", "overwrite", "stop_at_step", "eval_every", "save_every", "keep_checkpoints",
                     "log_every", "logp_check_every", "max_bad_steps", "self_check", "device", "chunk_size",
                     "gradient_checkpointing"}


def resume_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The flags whose value differs from the checkpoint's config, as '--flag saved -> now' strings."""
    now = dataclasses.asdict(cfg)
    return [f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in now
            if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun-native; the same code runs with 1 process)
# ----------------------------------------------------------------------------------------------------------------

def dist_init(device_kind: str):
    """(rank, world, local_rank). torchrun sets RANK/WORLD_SIZE; a plain `python train.py` is world 1."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def print0(*args, rank: int = 0, **kw):
    if rank == 0:
        print(*args, **kw, flush=True)


def set_checkpointing(model, on: bool):
    """Activation (gradient) checkpointing on or off, under either of transformers' names for it."""
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


@contextlib.contextmanager
def eval_mode(model):
    """Sampling and probing with dropout off (trap 6), back to train() afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

def load_prompts(path: str, require_answer: bool):
    """JSONL rows -> [{"id", "problem", "answer"}]; a bad line raises ValueError naming path:line."""
    from eval_aime import load_problems

    rows = load_problems(path, require_answer=require_answer)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def step_prompt_indices(num_prompts: int, step: int, global_batch: int, seed: int) -> list[int]:
    """The global_batch prompt indices of optimizer step `step`: consecutive slices of seeded permutations
    (one permutation per epoch), so every prompt is seen once per epoch and a resumed run sees the same ones."""
    out, start, perms = [], step * global_batch, {}
    for pos in range(start, start + global_batch):
        epoch, offset = divmod(pos, num_prompts)
        if epoch not in perms:  # one permutation per epoch (a step spans at most two)
            perms[epoch] = torch.randperm(num_prompts, generator=sample.make_generator(seed, 10**6 + epoch)).tolist()
        out.append(perms[epoch][offset])
    return out


# ----------------------------------------------------------------------------------------------------------------
# The two detectors' model-side work (the arithmetic lives in topd.py)
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Probe:
    """What the probe produced for one micro-batch: scores D (B, C), and, for the states in the order of
    torch.nonzero(candidates >= 0), the student's encoded prefixes and the teacher's continuations (logits kept in
    topd mode): at the divergent ones they are the guidance windows, no second sampling needed."""
    scores: torch.Tensor
    student_prefixes: sample.EncodedPrefixes | None = None
    teacher_conts: sample.Continuations | None = None


def state_prefixes(model, ro: sample.Rollouts, rows, ts, cache, pad_id) -> sample.EncodedPrefixes:
    """States (rows[i], ts[i]) of the rollouts as encoded prefixes: cut from `cache` (a KV cache of the whole batch
    that sampling or teacher scoring already built) when there is one, else run through the model once each."""
    enc = sample.prefixes_from_cache(cache, ro, rows, ts) if cache is not None else None
    if enc is None:
        enc = sample.encode_prefixes(model, [ro.prefix(int(b), int(t)) for b, t in zip(rows, ts)], pad_id)
    return enc


def probe_divergence(student, teacher, ro: sample.Rollouts, candidates, cfg: TrainConfig, pad_id, eos_ids,
                     generator, vocab_size, keep_teacher_logits: bool = False, teacher_cache=None) -> Probe:
    """`--detector probe` (spec sec. 3): from each candidate state s_t, K continuations of H tokens by each model;
    each continuation's margin mu = mean_j [log pi_T - log pi_theta]; D = W1(sorted margins).

    Cost control (spec "Cost rule"): no prefix is re-encoded when the rollout's KV caches are at hand (the student's
    from sampling, ro.cache; the teacher's from its scoring pass, teacher_cache), and each state's cache serves both
    that model's sampling and its scoring of the other model's continuations. At temperature 1 the sampler's own
    log-probs are exact, so each continuation needs one extra scoring pass, by the other model only.
    """
    where = torch.nonzero(candidates >= 0)  # (N, 2): (row, slot) of every real candidate
    scores = torch.zeros(candidates.shape, dtype=torch.float32, device=candidates.device)
    if len(where) == 0:
        return Probe(scores)
    rows, ts = where[:, 0], candidates[where[:, 0], where[:, 1]]  # state s_t: the rollout `row` before token t
    probe_sampling = sample.SamplingConfig(temperature=1.0, vocab_size=vocab_size)  # the policies themselves
    K, H = cfg.probe_samples, cfg.horizon
    s_enc = state_prefixes(student, ro, rows, ts, ro.cache, pad_id)
    t_enc = state_prefixes(teacher, ro, rows, ts, teacher_cache, pad_id)
    s_conts = sample.sample_continuations(student, s_enc, K, H, sampling=probe_sampling, eos_ids=eos_ids,
                                          pad_id=pad_id, generator=generator)
    t_conts = sample.sample_continuations(teacher, t_enc, K, H, sampling=probe_sampling, eos_ids=eos_ids,
                                          pad_id=pad_id, generator=generator, keep_logits=keep_teacher_logits)
    teacher_on_student = teacher_lib.score_continuations(teacher, t_enc, s_conts, vocab_size=vocab_size)
    student_on_teacher = teacher_lib.score_continuations(student, s_enc, t_conts, vocab_size=vocab_size)
    mu_student = topd.continuation_margin(teacher_on_student, s_conts.logprobs, s_conts.mask)  # (N, K)
    mu_teacher = topd.continuation_margin(t_conts.logprobs, student_on_teacher, t_conts.mask)  # (N, K)
    scores[where[:, 0], where[:, 1]] = topd.margin_w1(mu_teacher, mu_student)
    return Probe(scores, s_enc, t_conts)


def teacher_windows(student, teacher, ro, candidates, divergent, cfg, pad_id, eos_ids, generator,
                    probe: Probe | None, teacher_cache=None, vocab_size=None):
    """The guidance windows of spec sec. 5 at the divergent states: (student prefixes, teacher continuations with
    logits), or (None, None) when no state is divergent.

    With the probe detector they exist already (the teacher's probe continuations, logits kept); the window
    detector samples them now, only at the divergent states."""
    where = torch.nonzero(candidates >= 0)
    picked = torch.nonzero(divergent[where[:, 0], where[:, 1]]).squeeze(-1)  # indices into `where`
    if len(picked) == 0:
        return None, None
    if probe is not None and probe.teacher_conts is not None:
        return probe.student_prefixes.select(picked), probe.teacher_conts.select(picked)
    rows, ts = where[picked, 0], candidates[where[picked, 0], where[picked, 1]]
    t_enc = state_prefixes(teacher, ro, rows, ts, teacher_cache, pad_id)
    conts = sample.sample_continuations(teacher, t_enc, cfg.probe_samples, cfg.horizon,
                                        sampling=sample.SamplingConfig(temperature=1.0, vocab_size=vocab_size),
                                        eos_ids=eos_ids, pad_id=pad_id, generator=generator, keep_logits=True)
    return state_prefixes(student, ro, rows, ts, ro.cache, pad_id), conts


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: write to a temporary name, rename, then switch `latest` atomically
# ----------------------------------------------------------------------------------------------------------------

def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, scheduler, cfg: TrainConfig, extra: dict):
    """Write out/ckpt-{step}, switch out/latest to it, then delete this run's checkpoints older than it beyond
    cfg.keep_checkpoints. extra["run_id"] names the run; rotation never touches another run's checkpoints, nor
    one newer than the checkpoint just written."""
    final = out / f"ckpt-{step:06d}"
    tmp = out / f".tmp-ckpt-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)  # safetensors + config.json + generation_config.json
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "bad_steps": extra.get("bad_steps", 0)}, tmp / "trainer_state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "config": dataclasses.asdict(cfg), **extra}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # a directory rename: the checkpoint appears complete or not at all
    pointer = out / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, out / "latest")  # the switch of "latest" is one atomic rename
    older = sorted(p for p in out.glob("ckpt-*") if p.is_dir() and p.name < final.name
                   and checkpoint_run_id(p) == extra.get("run_id"))
    for old in older[:max(0, len(older) - (cfg.keep_checkpoints - 1))]:  # keep_checkpoints counts `final` too
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_run_id(path: Path) -> str | None:
    """The run a checkpoint belongs to (meta.json's run_id), or None when it has none or cannot be read."""
    try:
        return json.loads((path / "meta.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def prepare_out(out: Path, cfg: TrainConfig, rank: int) -> None:
    """Make sure a run never silently mixes with another run's files in the same --out.

    A fresh run in a folder that already holds a run (a `latest` pointer, checkpoints or metrics) is refused unless
    --overwrite (delete them first) or --resume (continue that run) is given; --resume with nothing to resume is
    refused too, naming the folder. Called before any model is loaded, so a refusal costs nothing.
    """
    held = [p for p in (out / "latest", out / "metrics.jsonl") if p.exists()] + sorted(out.glob("ckpt-*"))
    if cfg.resume:
        if not (out / "latest").exists():
            raise FileNotFoundError(f"--resume: {out} holds no checkpoint to resume from (no {out / 'latest'})")
        return
    if held and not cfg.overwrite:
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(p.name for p in held[:4])}{' ...' if len(held) > 4 else ''}): "
            "pass --resume to continue it, --overwrite to delete it and start afresh, or another --out")
    if held and rank == 0:
        for p in held + sorted(out.glob(".tmp-ckpt-*")) + [out / "results.json"]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def latest_checkpoint(out: Path) -> Path:
    pointer = out / "latest"
    if not pointer.exists():
        raise FileNotFoundError(f"{out} holds no checkpoint (no {pointer})")
    path = out / pointer.read_text().strip()
    if not (path / "trainer_state.pt").exists():
        raise RuntimeError(f"{pointer} points to {path}, which has no trainer_state.pt")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (held-out accuracy through eval_aime's one grading path, sharded over ranks)
# ----------------------------------------------------------------------------------------------------------------

def held_out_accuracy(model, tokenizer, rows, cfg: TrainConfig, rank, world, integer_range) -> float:
    from eval_aime import evaluate

    sampling = sample.SamplingConfig(temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens,
                                     vocab_size=len(tokenizer))
    with eval_mode(model):
        _, records = evaluate(model, tokenizer, rows, k=1, sampling=sampling, seed=cfg.seed, batch_size=250,
                              instruction=cfg.instruction, chat_template=cfg.chat_template,
                              enable_thinking=None if not cfg.enable_thinking else cfg.enable_thinking == "true",
                              integer_range=integer_range, max_prompt_len=cfg.max_prompt_len, rank=rank, world=world)
    counts = torch.tensor([sum(r["correct"] for r in records), len(records)], dtype=torch.float64)
    all_reduce(counts)
    return float(counts[0] / counts[1])


# ----------------------------------------------------------------------------------------------------------------
# Setup: everything a step needs, built once
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    autocast: object            # a context-manager factory: bf16 autocast on CUDA, a no-op on CPU
    student: torch.nn.Module    # the raw module (sampling, probing, saving)
    model: torch.nn.Module      # what the loss goes through: DDP(student), or the student itself
    teacher: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    prompts: list
    prompt_ids: list
    eval_rows: list
    integer_range: tuple | None
    vocab_size: int
    pad_id: int
    eos_ids: list
    special_ids: list           # never candidates: special and added tokens of the tokenizer, EOS included
    run_id: str = ""            # names this run's checkpoints (rotation deletes only its own)
    accuracy_before: float | None = None  # held-out accuracy at step 0, carried through resumes
    start_step: int = 0
    bad_steps: int = 0


def setup(cfg: TrainConfig, device_kind: str, rank: int = 0, world: int = 1, local_rank: int = 0,
          log=print) -> Run:
    from transformers import AutoConfig, AutoTokenizer

    from eval_aime import build_prompt

    device = torch.device(f"cuda:{local_rank}" if device_kind == "cuda" else "cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(device)
    if cfg.rollout_batch % world:
        raise ValueError(f"--rollout-batch {cfg.rollout_batch} must be divisible by the number of processes {world}")
    prepare_out(Path(cfg.out), cfg, rank)  # before anything slow: a refused --out costs nothing
    sample.quiet_progress_bars()
    # Device and dtype, decided here once: fp32 on CPU; on CUDA fp32 master weights and optimizer state with bf16
    # autocast for the student, and a bf16 teacher (it never trains).
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device_kind == "cuda")
    autocast = (lambda: torch.autocast(device_kind, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    teacher_dtype = torch.bfloat16 if use_bf16 else torch.float32

    # --- the toy world when no models are given (rank 0 builds it, the others wait) ---
    toy_mode = not cfg.student
    if toy_mode:
        import toy
        if rank == 0:
            # torchrun gives every process one thread; the build is rank 0's job alone, so let it use every core
            threads = torch.get_num_threads()
            torch.set_num_threads(max(threads, os.cpu_count() or 1))
            try:
                info = toy.build(cfg.toy_dir, log=log)
            finally:
                torch.set_num_threads(threads)
            log(f"toy world: {cfg.toy_dir} (teacher {info['accuracy']['teacher']['greedy']:.1%}, "
                f"student {info['accuracy']['student']['greedy']:.1%} greedy at build time)")
        else:  # wait without holding a core (a collective may spin); torchrun stops us if rank 0 fails
            while not (Path(cfg.toy_dir) / "build.json").exists():
                time.sleep(2)
        if dist.is_initialized():
            dist.barrier()
        cfg.student, cfg.teacher = f"{cfg.toy_dir}/student", f"{cfg.toy_dir}/teacher"
        cfg.prompts = cfg.prompts or f"{cfg.toy_dir}/train.jsonl"
        cfg.eval_prompts = cfg.eval_prompts or f"{cfg.toy_dir}/test.jsonl"

    # --- every input checked before any model weight is loaded ---
    prompts = load_prompts(cfg.prompts, require_answer=False)
    eval_rows = load_prompts(cfg.eval_prompts, require_answer=True)[:cfg.eval_limit] if cfg.eval_prompts else []
    s_tok, t_tok = AutoTokenizer.from_pretrained(cfg.student), AutoTokenizer.from_pretrained(cfg.teacher)
    s_conf, t_conf = AutoConfig.from_pretrained(cfg.student), AutoConfig.from_pretrained(cfg.teacher)
    vocab_size = teacher_lib.check_compatible(
        s_tok, t_tok, s_conf, t_conf, cfg.student, cfg.teacher, allow_stop_mismatch=cfg.allow_stop_mismatch, warn=log,
        student_stop=sample.stop_token_ids(s_tok, s_conf, generation_config(cfg.student)),
        teacher_stop=sample.stop_token_ids(t_tok, t_conf, generation_config(cfg.teacher)))
    enable_thinking = None if not cfg.enable_thinking else cfg.enable_thinking == "true"
    prompt_ids, n_truncated = sample.encode_prompts(
        s_tok, [build_prompt(p["problem"], cfg.instruction) for p in prompts], chat_template=cfg.chat_template,
        max_prompt_len=cfg.max_prompt_len, strict=cfg.strict, enable_thinking=enable_thinking)

    # --- a resumed run must be the same run: every flag that shapes the trajectory equal to the checkpoint's ---
    resume_from, meta = None, {}
    if cfg.resume:
        resume_from = latest_checkpoint(Path(cfg.out))
        meta = json.loads((resume_from / "meta.json").read_text())
        differ = resume_differences(meta["config"], cfg)
        if differ:
            raise ValueError(f"--resume from {resume_from}: these flags differ from the checkpoint's run: "
                             f"{'; '.join(differ)}. Use the run's own flags (meta.json), or start a new run "
                             f"(--overwrite / another --out)")

    # --- models, optimiser, schedule ---
    student, tokenizer = sample.load_policy(str(resume_from or cfg.student), device, torch.float32)
    teacher, _ = teacher_lib.load_teacher(cfg.teacher, device, teacher_dtype)
    if cfg.mode != "opd":  # the probe and the guidance windows start from prefixes cut out of KV caches
        sample.check_prefix_cache(student)
        sample.check_prefix_cache(teacher)
    if cfg.gradient_checkpointing:
        set_checkpointing(student, True)  # HF only checkpoints in train(): sampling in eval() keeps its KV cache
    student.train()
    model = student
    if dist.is_initialized():
        # broadcast_buffers=False: LLMs have no buffers that need syncing (rotary tables are recomputed identically
        # on every rank), and a broadcast in every forward would be one more collective to keep in step.
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[local_rank] if device_kind == "cuda" else None, broadcast_buffers=False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)

    def lr_lambda(step):  # linear warmup, then cosine from 1 to min_lr_ratio over the remaining steps
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    run = Run(cfg, rank, world, device, autocast, student, model, teacher, tokenizer, optimizer,
              torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda), prompts, prompt_ids, eval_rows,
              None if toy_mode else (0, 999), vocab_size, sample.pad_token_id(tokenizer),
              sample.eos_token_ids(student, tokenizer), [], run_id=meta.get("run_id") or new_run_id())
    run.special_ids = sample.special_token_ids(tokenizer, run.eos_ids)
    if resume_from is not None:
        state = torch.load(resume_from / "trainer_state.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state)
        run.start_step, run.bad_steps = state["step"], state["bad_steps"]
        run.accuracy_before = meta.get("accuracy_before")
        log(f"resumed from {resume_from} at step {run.start_step}")
    if cfg.self_check:
        teacher_self_check(run, log)
    log(f"{len(prompts)} prompts ({n_truncated} left-truncated to {cfg.max_prompt_len} tokens), {len(eval_rows)} "
        f"held-out; {world} process(es) on {device_kind}; vocab {vocab_size}")
    return run


def generation_config(path: str):
    """The checkpoint's GenerationConfig (for its EOS ids only; never its sampling settings), or None if absent."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def new_run_id() -> str:
    import uuid

    return uuid.uuid4().hex[:12]


def restore_rng(state: dict) -> None:
    """The global RNG states saved with a checkpoint: CPU always, CUDA when both the checkpoint and this machine
    have it (sampling itself uses seeded generators, but dropout and any library code use the global ones)."""
    torch.set_rng_state(state["torch_rng"].cpu())
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])


def teacher_self_check(run: Run, log) -> None:
    """teacher.self_check on a few real rollouts of the student before training starts (trap 20)."""
    cfg = run.cfg
    sampling = sample.SamplingConfig(temperature=cfg.temperature, max_new_tokens=min(cfg.max_new_tokens, 64),
                                     vocab_size=run.vocab_size)
    with torch.no_grad(), eval_mode(run.student), run.autocast():
        ro = sample.sample_rollouts(run.student, run.prompt_ids[:2], sampling=sampling, pad_id=run.pad_id,
                                    eos_ids=run.eos_ids, generator=sample.make_generator(cfg.seed, -1, run.rank))
    r = teacher_lib.self_check(run.teacher, ro, vocab_size=run.vocab_size, chunk_size=cfg.chunk_size)
    log(f"teacher self-check: KL between two scoring passes {r['repeat']:.1e}, plain vs KV-cached {r['cached']:.1e} "
        f"nats (max over {r['tokens']} tokens; tolerance {r['tolerance']:g})")


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------------------

def train_step(run: Run, step: int) -> dict:
    cfg, device, world, rank = run.cfg, run.device, run.world, run.rank
    student, model, teacher = run.student, run.model, run.teacher
    t_start = time.time()
    timings = {"sample": 0.0, "teacher": 0.0, "probe": 0.0, "train": 0.0}
    per_rank = cfg.rollout_batch // world
    micro = [slice(i, min(i + cfg.micro_batch, per_rank)) for i in range(0, per_rank, cfg.micro_batch)]
    threshold = cfg.div_threshold if cfg.div_rule == "absolute" else None
    special = torch.tensor(run.special_ids, device=device)
    sampling = sample.SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                     vocab_size=run.vocab_size)
    # the probe and the guidance windows start from states of the rollouts: keep the KV caches that sampling and
    # teacher scoring build anyway, so that no prefix is ever encoded twice
    keep_caches = cfg.mode == "topd" or (cfg.mode == "opd_suppress" and cfg.detector == "probe")

    def generator(j, purpose):  # every random draw: (seed, step, global micro-batch index, purpose)
        return sample.make_generator(cfg.seed, step, rank * len(micro) + j, purpose, device=device)

    # ---- 0. rollouts from the current policy; rank r takes the r-th contiguous share of the step's prompts ----
    indices = step_prompt_indices(len(run.prompts), step, cfg.rollout_batch, cfg.seed)[rank * per_rank:][:per_rank]
    rollouts = []
    with torch.no_grad(), eval_mode(student), run.autocast():
        for j, rows in enumerate(micro):
            rollouts.append(sample.sample_rollouts(
                student, [run.prompt_ids[i] for i in indices[rows]], sampling=sampling, pad_id=run.pad_id,
                eos_ids=[-1] if cfg.ignore_eos else run.eos_ids, generator=generator(j, 0), keep_cache=keep_caches))
    timings["sample"] = time.time() - t_start

    # ---- 1. the loss normaliser N: response tokens of the whole step, all ranks, known before any backward ----
    num_tokens = all_reduce(torch.tensor(float(sum(r.response_mask.sum() for r in rollouts)), device=device))
    optimizer = run.optimizer
    optimizer.zero_grad(set_to_none=True)
    stats_parts, guide_items = [], []
    sync_in_phase_a = cfg.mode != "topd"  # in topd mode the last guide backward synchronises instead

    # ---- 2. phase A: L_OPD(w), micro-batch by micro-batch ----
    for j, ro in enumerate(rollouts):
        t0 = time.time()
        teacher_cache = sample.new_cache(teacher) if keep_caches else None
        with run.autocast():
            teacher_out = teacher_lib.score_rollouts(teacher, ro, cfg.kl, vocab_size=run.vocab_size,
                                                     chunk_size=cfg.chunk_size, cache=teacher_cache)  # (b, R, V) / (b, R)
        timings["teacher"] += time.time() - t0
        t0 = time.time()
        last = sync_in_phase_a and j == len(rollouts) - 1
        with (contextlib.nullcontext() if last or world == 1 else model.no_sync()):
            with run.autocast():
                s_logits = teacher_lib.response_logits(model, ro)  # (b, R, V) with grad
            token_loss = topd.opd_token_loss(
                s_logits, ro.response_ids, estimator=cfg.kl, vocab_size=run.vocab_size, chunk_size=cfg.chunk_size,
                teacher_logits=teacher_out if cfg.kl == "full" else None,
                teacher_logprobs=teacher_out if cfg.kl == "sampled" else None)
            parts, probe_time = {}, 0.0
            if cfg.mode != "opd":
                tp = time.time()
                cands = topd.select_candidates(token_loss.loss, ro.response_mask, cfg.num_candidates, cfg.min_gap,
                                               special=torch.isin(ro.response_ids, special))  # (b, C)
                probe = None
                with torch.no_grad(), eval_mode(student), run.autocast():
                    if cfg.detector == "probe":
                        probe = probe_divergence(student, teacher, ro, cands, cfg, run.pad_id, run.eos_ids,
                                                 generator(j, 1), run.vocab_size, keep_teacher_logits=cfg.mode == "topd",
                                                 teacher_cache=teacher_cache)
                        scores = probe.scores
                    else:
                        scores = topd.window_divergence(token_loss.loss, ro.response_mask, cands, cfg.horizon)
                    divergent = topd.divergent_mask(scores, cands >= 0, alpha=cfg.div_alpha, threshold=threshold)
                    if cfg.mode == "topd":
                        s_prefixes, conts = teacher_windows(student, teacher, ro, cands, divergent, cfg, run.pad_id,
                                                            run.eos_ids, generator(j, 2), probe, teacher_cache,
                                                            vocab_size=run.vocab_size)
                        if conts is not None:
                            guide_items.append((s_prefixes, conts))
                parts = dict(candidates=cands, scores=scores, divergent=divergent, suppress_weight=cfg.suppress_weight)
                probe_time = time.time() - tp
                timings["probe"] += probe_time
            loss, stats = topd.topd_objective(cfg.mode, token_loss, ro.response_mask, num_tokens, **parts)
            (loss * world).backward()  # DDP AVERAGES gradients over ranks; sum over all tokens / N needs * world
        n_rows = torch.tensor(float(len(ro.truncated)))
        stats["rollout/len_mean"] = (ro.response_mask.sum().float(), n_rows)
        stats["rollout/truncated_frac"] = (ro.truncated.sum().float(), n_rows)
        stats["rollout/eos_frac"] = (n_rows - ro.truncated.sum().float(), n_rows)
        if step % cfg.logp_check_every == 0:  # the same steps on every rank, so metric keys stay in step
            with torch.no_grad():  # sampler vs learner log-probs of the same tokens: ~0 unless something is off (trap 14)
                learner = topd.token_logprobs(s_logits.detach(), ro.response_ids, vocab_size=run.vocab_size)
                stats["rollout/logp_mismatch"] = (((learner - ro.logprobs).abs() * ro.response_mask).sum(),
                                                  ro.response_mask.sum().float())
        stats_parts.append(stats)
        del s_logits, teacher_out, token_loss, loss, teacher_cache
        ro.cache = None  # the probe is done with it; the guidance windows keep only their own states' slices
        timings["train"] += time.time() - t0 - probe_time

    # ---- 3. phase B: future-distributed guidance along the teacher's windows ----
    if cfg.mode == "topd":
        t0 = time.time()
        local_total = sum((topd.guide_weights(c.mask, cfg.guide_decay).sum() for _, c in guide_items),
                          torch.zeros((), device=device))
        guide_total = all_reduce(local_total.clone()).clamp(min=1e-9)  # L_guide's normaliser, all ranks
        n_rounds = torch.tensor(len(guide_items), device=device)
        if world > 1:
            dist.all_reduce(n_rounds, op=dist.ReduceOp.MAX)
        n_rounds = max(int(n_rounds), 1)  # at least one round: it carries the gradient synchronisation
        g_num, g_den, g_tok = (torch.zeros((), device=device) for _ in range(3))
        for r in range(n_rounds):
            with (contextlib.nullcontext() if r == n_rounds - 1 or world == 1 else model.no_sync()), run.autocast(), \
                    without_checkpointing(student, cfg.gradient_checkpointing):
                if r < len(guide_items):
                    s_enc, conts = guide_items[r]  # the states' cached prefixes (no grad) and the teacher's windows
                    s_win = teacher_lib.continuation_logits(model, s_enc, conts.ids)  # (Nd, K, H, V) with grad
                    window_kl = topd.kl_divergence(conts.logits, s_win, vocab_size=run.vocab_size,
                                                   chunk_size=cfg.chunk_size)  # KL(teacher || student), (Nd, K, H)
                    g_loss = topd.guide_loss(window_kl, conts.mask, cfg.guide_decay, guide_total)
                    w = topd.guide_weights(conts.mask, cfg.guide_decay)
                    g_num, g_den, g_tok = g_num + (window_kl.detach() * w).sum(), g_den + w.sum(), g_tok + conts.mask.sum()
                else:  # nothing to guide on this rank this round: a zero-loss forward keeps DDP's collectives in step
                    g_loss = model(input_ids=rollouts[0].ids[:1, :1]).logits.float().sum() * 0.0
            (cfg.guide_weight * g_loss * world).backward()
        stats_parts.append({"guide/loss": (g_num, g_den), "guide/tokens": (g_tok, torch.ones(()))})
        timings["train"] += time.time() - t0

    # ---- 4. metrics over micro-batches and ranks, clip, step (or skip a non-finite step) ----
    metrics = reduce_over_ranks(stats_parts, device)
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    finite = math.isfinite(metrics.get("opd/loss", float("nan"))) and bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
        run.bad_steps = 0
    else:  # keep the weights; the gradient of this step is thrown away
        optimizer.zero_grad(set_to_none=True)
        run.bad_steps += 1
        print0(f"step {step + 1}: non-finite loss or gradient norm; step skipped, weights kept "
               f"({run.bad_steps}/{cfg.max_bad_steps} in a row)", rank=rank)
        if run.bad_steps >= cfg.max_bad_steps:
            raise RuntimeError(f"{run.bad_steps} non-finite steps in a row at step {step + 1}: stopping. Lower --lr, "
                               "check the data, or try --dtype float32.")
    with warnings.catch_warnings():  # a skipped step still advances the schedule: it follows the step count
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        run.scheduler.step()
    elapsed = time.time() - t_start
    metrics.update({"step": step + 1, "grad_norm": float(grad_norm), "lr": run.scheduler.get_last_lr()[0],
                    "skipped": not finite, "tokens_per_s": float(num_tokens) / elapsed,
                    **{f"time/{k}": round(v, 4) for k, v in timings.items()}, "time/step": round(elapsed, 4)})
    return metrics


def reduce_over_ranks(stats_parts: list[dict], device) -> dict:
    """Sum every (numerator, denominator) over micro-batches and ranks, then divide (counts stay counts)."""
    keys = sorted({k for part in stats_parts for k in part})  # the same on every rank: keys depend on the mode
    local = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)
    for part in stats_parts:  # tensor adds on the device: no host sync per statistic
        for i, k in enumerate(keys):
            if k in part:
                local[i] += torch.stack([torch.as_tensor(x, device=device).double() for x in part[k]])
    all_reduce(local)
    out = {k: (float(local[i, 0] / local[i, 1]) if local[i, 1] else float("nan")) for i, k in enumerate(keys)}
    if "guide/tokens" in out:  # a count per step, not a ratio
        out["guide/tokens"] = float(local[keys.index("guide/tokens"), 0])
    return out


def all_gather_checksum(model, world: int) -> list[float]:
    """Sum of all parameters on every rank: DDP ranks must hold identical weights; a mismatch is a desync bug."""
    local = torch.tensor([sum(float(p.detach().double().sum()) for p in model.parameters())], dtype=torch.float64,
                         device=next(model.parameters()).device)
    if world == 1:
        return [float(local)]
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    sums = [float(g) for g in gathered]
    if len(set(sums)) != 1:
        raise RuntimeError(f"ranks hold different weights (parameter sums {sums}): DDP desynchronised")
    return sums


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


def format_line(m: dict, total_steps: int) -> str:
    line = f"step {m['step']}/{total_steps} | loss {m['opd/loss']:.4f} | kl {m['opd/teacher_kl']:.4f}"
    if "topd/nondiv_frac" in m:
        line += f" | nondiv {m['topd/nondiv_frac']:.2f}"
    if "guide/loss" in m:
        line += f" | guide {m['guide/loss']:.3f}"
    return line + (f" | len {m['rollout/len_mean']:.1f} | trunc {m['rollout/truncated_frac']:.2f} | gn "
                   f"{m['grad_norm']:.2f} | lr {m['lr']:.1e} | tok/s {m['tokens_per_s']:.0f} | {m['time/step'] * 1000:.0f}ms")


# ----------------------------------------------------------------------------------------------------------------
# Main: the loop, evaluation, checkpoints
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_config(argv)
    device_kind = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    rank, world, local_rank = dist_init(device_kind)
    try:
        return train(cfg, device_kind, rank, world, local_rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, device_kind: str, rank: int, world: int, local_rank: int):
    run = setup(cfg, device_kind, rank, world, local_rank, log=lambda *a: print0(*a, rank=rank))
    print0(f"config: {json.dumps(dataclasses.asdict(cfg))}", rank=rank)
    out = Path(cfg.out)
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if metrics_path.exists():  # keep lines up to the resume point, drop a crashed run's tail (or all: fresh run)
            kept = [l for l in metrics_path.read_text().splitlines()
                    if cfg.resume and json.loads(l).get("step", 0) <= run.start_step]
            metrics_path.write_text("".join(l + "\n" for l in kept))

    def log_metrics(record):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(step):
        acc = held_out_accuracy(run.student, run.tokenizer, run.eval_rows, cfg, rank, world, run.integer_range)
        print0(f"held-out accuracy at step {step}: {acc:.1%}", rank=rank)
        log_metrics({"step": step, "eval/accuracy": acc})
        return acc

    results = {}
    if run.eval_rows:  # the starting point: measured once, at step 0; a resumed run carries it in its checkpoint
        if run.accuracy_before is None:
            run.accuracy_before = evaluate(run.start_step)
        results["accuracy_before"] = run.accuracy_before
    last_step = min(cfg.steps, cfg.stop_at_step) if cfg.stop_at_step else cfg.steps
    bar, watch = None, TruncationWatch()
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
                bar.write(format_line(metrics, cfg.steps))  # through the bar's writer: one clean line per step
            if warning:
                bar.write(warning)
            bar.update(1)
        done = step + 1 == last_step
        if run.eval_rows and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not done:
            evaluate(step + 1)
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or done:
            checksums = all_gather_checksum(run.student, world)
            if rank == 0:
                save_checkpoint(out, step + 1, run.student, run.tokenizer, run.optimizer, run.scheduler, cfg,
                                {"run_id": run.run_id, "accuracy_before": run.accuracy_before,
                                 "bad_steps": run.bad_steps, "metrics": metrics, "param_checksums": checksums})
            if dist.is_initialized():
                dist.barrier()
    if bar is not None:
        bar.close()
    if run.eval_rows:
        results["accuracy_after"] = evaluate(last_step)
        print0(f"held-out accuracy: before {results['accuracy_before']:.1%} -> after {results['accuracy_after']:.1%} "
               f"({cfg.mode}{'' if cfg.mode == 'opd' else ', ' + cfg.detector + ' detector'}, {last_step} steps)", rank=rank)
    if rank == 0:
        (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), **results}, indent=2))
    return results


if __name__ == "__main__":
    main()
