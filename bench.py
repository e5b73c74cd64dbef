"""
bench.py -- measured speed and memory, side by side with the baselines people would otherwise use.

Claims like "the chunked KL saves memory" or "the window detector is free" are only worth something measured, on
the same model, batch and lengths as the thing they are compared with. One command runs seven sections:

  section       ours                                    baseline                                    target
  1 sampling    sample.sample_rollouts, tokens/s        model.generate(do_sample, T=1, top_k=0,     >= 0.95x
                                                        top_p=1, min_new_tokens=max_new_tokens=L)
  2 kl          topd.per_token_kl fwd+bwd over          naive log_softmax(s.float()), log_softmax(  memory <= 0.25x,
                (B, T, V) bf16 and fp32 logits          t.float()), sum p_s (logp_s - logp_t)        time <= 1.10x
  3 step        train.train_step of opd_suppress and    the same step in `opd` mode                 window <= 1.10x,
                topd, window and probe detectors                                                    probe <= 1.41x
  4 trl         train.train_step, `opd` mode            TRL's on-policy distillation trainer        ours <= 1.00x
                                                        (trl.DistillationTrainer, beta=1: reverse KL)
  5 scaling     opd, topd/window, topd/probe step time  opd at the same length                      (reported)
                and memory at L = 64, 128, 256, 512
  6 memory      the same at Qwen's vocabulary, 512-4096 the same step of an older revision          (see targets)
  7 decode      compiled decoding (--decode compiled):  eager decoding and HF generate, same model, GPU: >= 3x
                tokens/s on the toy and a Qwen3-0.6B-      batch and length; the toy's topd step      CPU step: >= 1.5x
                shaped model (8 x 512 and 2048 tokens;   with each decode mode
                8 x 128 on a CPU), compile time once

How it measures:
  * Alternation. Compared variants run in turns (A B A B ...) after an untimed warm-up round, so a slow drift of
    the machine (another job, thermal throttling) hits every variant alike; we report medians of the repeats.
  * Peak memory ABOVE what was in use before, in a FRESH subprocess per variant (allocator caches and the other
    variants' leftovers never blur it). On CPU: /proc/self/clear_refs resets the kernel's high-water mark
    (VmHWM), and the peak is VmHWM - VmRSS(before); where /proc is not writable we fall back to ru_maxrss
    before/after (a lower bound, flagged in bench.json). On CUDA: torch.cuda.max_memory_allocated.
    Section 2: "before" = once the inputs exist, so the student's gradient (one (B, T, V) tensor in the logits'
    dtype, the op's own output) is inside both peaks. Section 5: "before" = models loaded; the peak is that of
    the first optimizer step (AdamW state included), its time the median of the following steps.
  * Section 3 uses the toy's training defaults (64 rollouts, micro-batch 32, EOS-terminated, <= 48 tokens), every variant
    at the same step index, hence the same prompts and seeds; at two horizons: the toy's (toy.TRAIN_DEFAULTS)
    and the spec's 32.
  * Threads. torch.set_num_threads(--threads) in this process and every child: the thread count moves CPU timings
    by more than most effects measured here, so it is printed and saved.
  * Device. CUDA when available (bf16 models and logits, cuda memory stats), else CPU fp32 (section 2 runs both
    dtypes on both).
  * Same work. Section 1 makes both samplers produce exactly L tokens (ours: eos_ids=[-1], i.e. "never stop";
    generate: min_new_tokens=L, which only masks EOS). Sections 4 and 5 sample exactly L tokens per rollout
    (make_run(ignore_eos=True), TRL: min_new_tokens), so every variant trains on the same number of tokens.

The toy world (toy.py) is used as found: --world, default runs/toy (runs/toy-fast with --quick), built only if it
does not exist. Its models accept 128 positions; section 5 copies them with a larger max_position_embeddings (RoPE
weights do not depend on it) to reach 512-token responses.

Commands:
    python bench.py --quick                    # every section at small sizes: a smoke run (numbers are noisy)
    python bench.py                            # the full benchmark (budgeted for ~10 minutes on 2 CPU cores)
    python bench.py --sections 2,3 --repeats 5 # some sections, more repeats
    pip install trl                            # optional, for section 4 (never a requirement of this repo)
Results: a markdown table of medians and ratios on stdout, everything (raw times included) in --out (bench.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import sample
import teacher as teacher_lib
import topd
import toy
import train

ROOT = Path(__file__).resolve().parent


@dataclass
class BenchConfig:
    quick: bool = False                  # small sizes everywhere: a smoke run of every code path (< ~1 min)
    out: str = "runs/bench/bench.json"   # where the JSON results go
    sections: str = "1,2,3,4,5,6,7"      # which sections to run, comma-separated
    repeats: int = 0                     # timed repeats per variant; 0 = the per-section default below
    warmup: int = 1                      # untimed rounds before the alternation starts
    threads: int = 0                     # torch threads here and in every child; 0 = all cores
    world: str = ""                      # toy world folder; "" = runs/toy (runs/toy-fast with --quick)
    device: str = "auto"                 # auto | cpu | cuda
    seed: int = 0
    reference: str = ""                  # section 6: a git revision whose `opd` step runs side by side (e.g. the
                                         # last one before the fused head); "" = no reference rows
    decode_models: str = ""              # section 7's models, comma-separated (toy, qwen3-0.6b); "" = both
    child: str = ""                      # internal: a JSON job for a fresh measuring subprocess


# Sizes per section. One place for every number; --repeats overrides each section's `repeats`.
FULL = {
    1: dict(batch=8, prompt_len=(8, 48), new_tokens=128, vocab=32000, hidden=256, layers=4, repeats=5),
    2: dict(shape=(4, 2048, 32000), repeats=3),            # 3 fresh processes per (variant, dtype)
    3: dict(extra=[], repeats=3),                          # the toy's defaults: 64 rollouts, micro-batch 32
    4: dict(batch=32, new_tokens=48, repeats=3),
    5: dict(lengths=(64, 128, 256, 512), batch=16, repeats=2, horizon=0),  # horizon 0 = the spec's default (32)
    6: dict(lengths=(512, 1024, 2048, 4096), batch={512: 2, 1024: 2, 2048: 1, 4096: 1}, vocab=151936, hidden=64,
            layers=2, horizon=32, repeats=1, reference_length=2048),
    # section 7: the Qwen3-0.6B-shaped model decodes 512 and 2048 tokens on a GPU; on a CPU 128 (8 x 2048 tokens
    # would take about an hour of two cores per variant and repeat)
    7: dict(models=("toy", "qwen3-0.6b"), lengths=(512, 2048), cpu_lengths=(128,), batch=8, repeats=2, steps=15),
}
QUICK = {  # every code path, minimal work: the ratios are noise at these sizes
    1: dict(batch=4, prompt_len=(4, 16), new_tokens=16, vocab=32000, hidden=64, layers=2, repeats=2),
    2: dict(shape=(2, 128, 32000), repeats=1),
    3: dict(extra=["--rollout-batch", "4", "--micro-batch", "4", "--max-new-tokens", "16"], repeats=1),
    4: dict(batch=4, new_tokens=16, repeats=1),
    5: dict(lengths=(16, 32), batch=2, repeats=1, horizon=8),
    6: dict(lengths=(32, 64), batch={32: 2, 64: 1}, vocab=151936, hidden=32, layers=1, horizon=8, repeats=1,
            reference_length=64),
    7: dict(models=("toy",), lengths=(16,), cpu_lengths=(16,), batch=2, repeats=1, steps=1),
}
NAMES = {1: "sampling", 2: "kl", 3: "step", 4: "trl", 5: "scaling", 6: "memory", 7: "decode"}
# (op, value) targets on the ratio ours / baseline
TARGETS = {"sampling": (">=", 0.95), "kl_memory": ("<=", 0.25), "kl_time": ("<=", 1.10),
           "window": ("<=", 1.10), "probe": ("<=", 1.41), "trl": ("<=", 1.00),
           # section 6, at the reference length (2048): ours vs the reference revision's opd, and topd+probe vs opd
           "opd_memory_vs_reference": ("<=", 0.35), "opd_time_vs_reference": ("<=", 1.05),
           "probe_memory": ("<=", 1.5), "probe_time": ("<=", 1.5), "probe_time_vs_floor": ("<=", 1.15),
           # section 7: compiled decoding vs eager: the toy step's sampling time at least 1.5x lower on the CPU
           # (compiled / eager <= 0.67), rollout tokens/s 3x eager's on a GPU at 8 x 2048
           "decode_cpu": ("<=", 0.67), "decode_gpu": (">=", 3.0)}


def parse_config(argv=None) -> BenchConfig:
    parser = argparse.ArgumentParser(description="speed and memory benchmark (see the module docstring)")
    for f in dataclasses.fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type={"int": int, "str": str}[f.type], default=f.default,
                                help=f"default: {f.default!r}")
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    try:
        parse_sections(cfg.sections)
    except ValueError as e:
        parser.error(str(e))
    unknown = set(filter(None, cfg.decode_models.split(","))) - set(FULL[7]["models"])
    if unknown:
        parser.error(f"--decode-models: expected names among {list(FULL[7]['models'])}, got {sorted(unknown)}")
    if cfg.repeats < 0 or cfg.warmup < 0 or cfg.threads < 0:
        parser.error("--repeats, --warmup and --threads must be >= 0")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers: statistics, the alternating schedule, targets, the table (tested in tests/test_bench.py)
# ----------------------------------------------------------------------------------------------------------------

def parse_sections(text: str) -> list[int]:
    """"1,3" -> [1, 3] (sorted, unique); anything outside 1..7 is an error."""
    out = sorted({int(x) for x in text.split(",") if x.strip()})
    if not out or any(s not in NAMES for s in out):
        raise ValueError(f"--sections: expected numbers among {sorted(NAMES)}, got {text!r}")
    return out


def median(xs) -> float:
    xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    return statistics.median(xs) if xs else float("nan")


def ratio(value, baseline) -> float:
    """value / baseline, NaN when either is missing or the baseline is 0 (never a fake 0 or inf)."""
    if value is None or baseline is None or not baseline or math.isnan(value) or math.isnan(baseline):
        return float("nan")
    return float(value) / float(baseline)


def alternating_schedule(variants: list[str], repeats: int, warmup: int) -> list[tuple[int, str, bool]]:
    """[(round, variant, timed)]: `warmup` untimed rounds, then `repeats` timed ones, every round A B C ...

    Example: (["a", "b"], repeats=2, warmup=1) -> (0,a,F) (0,b,F) (1,a,T) (1,b,T) (2,a,T) (2,b,T).
    Running the variants in turns rather than all repeats of A then all of B spreads any drift of the machine
    evenly over them; the round index doubles as the training step, so every variant sees the same prompts.
    """
    return [(r, v, r >= warmup) for r in range(warmup + repeats) for v in variants]


def target_met(value: float, target) -> bool | None:
    """Is the ratio on the right side of an (op, bound) target? None when there is no target or no number."""
    if target is None or value is None or math.isnan(value):
        return None
    op, bound = target
    return value >= bound if op == ">=" else value <= bound


def target_gap(value: float, target) -> str:
    """How far a ratio is from its target, in words: '0.12x over the <= 1.10x target'."""
    met = target_met(value, target)
    if met is None:
        return "no number" if target is not None else "no target"
    op, bound = target
    gap = abs(value - bound)
    side = ("above" if value >= bound else "below") if op == ">=" else ("under" if value <= bound else "over")
    return f"{value:.2f}x: {gap:.2f}x {side} the {op} {bound:.2f}x target ({'met' if met else 'NOT met'})"


def make_row(section: str, variant: str, value, unit: str, baseline=None, target=None, note: str = "") -> dict:
    """One table row; ratio = value / baseline (None when the row is itself the baseline)."""
    r = None if baseline is None else ratio(value, baseline)
    return {"section": section, "variant": variant, "median": value, "unit": unit, "ratio": r,
            "target": list(target) if target else None, "met": target_met(r, target) if r is not None else None,
            "note": note}


def format_value(value, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not run"
    if unit == "tok/s":
        return f"{value:,.0f} tok/s"
    if unit == "MB":
        return f"{value:,.1f} MB"
    if unit == "s":
        return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"
    return f"{value:.4g} {unit}".strip()


def format_table(rows: list[dict]) -> str:
    """Markdown: section | variant | median | ratio vs baseline | target | met?"""
    lines = ["| section | variant | median | ratio vs baseline | target | met? |", "|---|---|---|---|---|---|"]
    for r in rows:
        rat = "baseline" if r["ratio"] is None else ("-" if math.isnan(r["ratio"]) else f"{r['ratio']:.2f}x")
        tgt = f"{r['target'][0]} {r['target'][1]:.2f}x" if r["target"] else "-"
        if r["median"] is None:
            met = r["note"] or "not run"
        else:
            met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(f"| {r['section']} | {r['variant']} | {format_value(r['median'], r['unit'])} | {rat} | {tgt} "
                     f"| {met} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The two KL implementations of section 2 (the naive one is what most OPD code writes)
# ----------------------------------------------------------------------------------------------------------------

def naive_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) x (B, T, V) -> (B, T) reverse KL through full fp32 log-softmaxes: ~5 fp32 (B, T, V) tensors live."""
    logp_s = torch.log_softmax(student_logits.float(), dim=-1)  # (B, T, V) fp32, saved for backward
    logp_t = torch.log_softmax(teacher_logits.float(), dim=-1)  # (B, T, V) fp32
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1)


def chunked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Ours: topd.per_token_kl, exact over the vocabulary, O(chunk x V) fp32 temporaries."""
    return topd.per_token_kl(student_logits, teacher_logits)


KL_VARIANTS = {"naive": naive_kl, "ours": chunked_kl}


def kl_forward_backward(variant: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Forward + backward of sum(KL) into student_logits.grad (the caller clears it). Returns the KL (B, T)."""
    kl = KL_VARIANTS[variant](student_logits, teacher_logits)
    kl.sum().backward()
    return kl.detach()


# ----------------------------------------------------------------------------------------------------------------
# Clocks and memory
# ----------------------------------------------------------------------------------------------------------------

def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), wall seconds), with the GPU drained before and after so queued kernels are counted."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def run_alternating(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Times of each fns[name](round) over alternating_schedule; warm-up rounds are run but not kept."""
    times = {name: [] for name in fns}
    for rnd, name, keep in alternating_schedule(list(fns), repeats, warmup):
        _, seconds = timed(lambda: fns[name](rnd), device)
        if keep:
            times[name].append(seconds)
    return times


def _status_kb(field: str) -> int:
    """A `field: N kB` line of /proc/self/status (Linux): VmRSS = resident now, VmHWM = peak resident."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def measure(fn, device: torch.device):
    """Run fn() once: (result, seconds, peak bytes ABOVE what was in use just before, method name)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out, seconds = timed(fn, device)
        return out, seconds, torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    try:  # "5" resets the high-water mark to the current RSS (Linux >= 4.0), so VmHWM becomes the peak of fn alone
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
    except OSError:
        base = None
    if base is not None:
        out, seconds = timed(fn, device)
        return out, seconds, (_status_kb("VmHWM") - base) * 1024, "VmHWM after clear_refs"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, kB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, seconds = timed(fn, device)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return out, seconds, grown * scale, "ru_maxrss delta (lower bound: earlier peaks hide growth)"


def run_child(job: dict, threads: int, timeout: float = 900, code: Path = ROOT) -> dict:
    """Run one measurement in a fresh `python bench.py --child JSON` process; its last stdout line is the result.
    code: the checkout whose bench.py (and train.py) runs it: this one, or a reference revision's (section 6)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(code / "bench.py"), "--threads", str(threads), "--child", json.dumps(job)]
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {job} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH_RESULT "):])


# ----------------------------------------------------------------------------------------------------------------
# Shared setup: devices, the toy world, a train.Run
# ----------------------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def model_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def prepare_world(cfg: BenchConfig) -> Path:
    """The toy world to benchmark on, used as found: only speed and memory are measured, so a world built with an
    older ToyConfig serves as well as a fresh one (toy.build would rebuild it: minutes of CPU for nothing)."""

    world = Path(cfg.world or ("runs/toy-fast" if cfg.quick else "runs/toy"))
    if not (world / "build.json").exists():
        print(f"toy world {world} not found: building it (toy.build)", flush=True)
        toy.build(world, toy.ToyConfig(**toy.FAST) if cfg.quick else toy.ToyConfig())
    return world


def make_run(world: Path, mode: str, detector: str, horizon: int, device: torch.device, extra=(), seed=0,
             ignore_eos: bool = False):
    """A train.Run on the toy world, as `python train.py --student ... --mode M --detector D` builds it with the
    toy's training defaults (toy.TRAIN_DEFAULTS). A fresh TrainConfig every time: train.setup writes resolved paths
    into the config it is given. ignore_eos: rollouts always run to --max-new-tokens (every variant then trains on
    the same number of tokens); a benchmark-only setting, so it is set on the Run, not a flag of train.py."""
    argv = ["--student", str(world / "student"), "--teacher", str(world / "teacher"),
            "--prompts", str(world / "train.jsonl"), *toy.train_flags(), "--mode", mode, "--detector", detector,
            "--horizon", str(horizon), "--seed", str(seed), "--device", device.type, "--no-self-check",
            "--out", tempfile.mkdtemp(prefix="bench-unused-"), *map(str, extra)]
    run = train.setup(train.parse_config(argv), device.type, log=lambda *a: None)
    if ignore_eos:
        run.eos_ids = [-1]  # no token ends a rollout; candidates still skip the real EOS (run.special_ids)
    return run


def long_context_world(world: Path, max_positions: int, into: Path) -> Path:
    """A copy of the toy world's student, teacher and prompts whose configs accept max_positions positions.

    The toy models are built with max_position_embeddings=128. Llama's rotary embedding computes its angles from
    the position ids, and no weight depends on that maximum, so raising it in config.json runs the SAME trained
    weights at longer lengths (what they generate past 128 tokens is irrelevant to time and memory).
    """
    for name in ("student", "teacher"):
        shutil.copytree(world / name, into / name, dirs_exist_ok=True)
        path = into / name / "config.json"
        config = json.loads(path.read_text())
        config["max_position_embeddings"] = max(int(config.get("max_position_embeddings", 0)), max_positions)
        path.write_text(json.dumps(config, indent=2))
    shutil.copy(world / "train.jsonl", into / "train.jsonl")
    return into


def step_fn(run):
    return lambda k: train.train_step(run, k)


# ----------------------------------------------------------------------------------------------------------------
# Section 1: sampling throughput
# ----------------------------------------------------------------------------------------------------------------

def section_sampling(cfg, size, device, world, threads):
    from transformers import LlamaConfig, LlamaForCausalLM

    B, L, V = size["batch"], size["new_tokens"], size["vocab"]
    torch.manual_seed(cfg.seed)
    model_cfg = LlamaConfig(vocab_size=V, hidden_size=size["hidden"], intermediate_size=4 * size["hidden"],
                            num_hidden_layers=size["layers"], num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(model_cfg).to(device=device, dtype=model_dtype(device)).eval()
    rng = random.Random(cfg.seed)
    lo, hi = size["prompt_len"]
    prompts = [[1] + [rng.randrange(3, V) for _ in range(rng.randint(lo, hi))] for _ in range(B)]  # ragged
    sampling = sample.SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=L)

    def ours(k):
        ro = sample.sample_rollouts(model, prompts, sampling=sampling, eos_ids=[-1], pad_id=0,  # -1: never stops
                                    generator=sample.make_generator(cfg.seed, k, device=device))
        assert ro.response_ids.shape == (B, L), ro.response_ids.shape

    def generate(k):
        ids, mask = sample.left_pad(prompts, 0, device)  # the same left-padded batch ours builds internally
        # every sampling setting explicit (a checkpoint's generation_config could change them otherwise);
        # min_new_tokens = max_new_tokens masks EOS so that exactly L tokens come out, as with ours
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=L, min_new_tokens=L, pad_token_id=0, eos_token_id=2)
        assert out.shape == (B, ids.shape[1] + L), out.shape

    times = run_alternating({"ours": ours, "generate": generate}, size["repeats"], cfg.warmup, device)
    tps = {k: B * L / median(v) for k, v in times.items()}  # tokens per second of the median call
    r = ratio(tps["ours"], tps["generate"])
    print(f"  sampling {B} x {L} tokens (Llama h={size['hidden']} x{size['layers']}, V={V}): ours "
          f"{tps['ours']:,.0f} tok/s, generate {tps['generate']:,.0f} tok/s -> {target_gap(r, TARGETS['sampling'])}")
    rows = [make_row("1 sampling", "model.generate", tps["generate"], "tok/s"),
            make_row("1 sampling", "ours: sample.sample_rollouts", tps["ours"], "tok/s", tps["generate"],
                     TARGETS["sampling"])]
    return rows, {"tokens_per_s": tps, "seconds": times, "batch": B, "new_tokens": L}


# ----------------------------------------------------------------------------------------------------------------
# Section 2: full-vocabulary KL, memory and time
# ----------------------------------------------------------------------------------------------------------------

def child_kl(job, device):
    """In a fresh process: build (B, T, V) logits, warm up on a slice, then one measured fwd+bwd (time and memory)."""
    B, T, V = job["shape"]
    dtype = getattr(torch, job["dtype"])
    gen = torch.Generator(device=device).manual_seed(job["seed"])
    # drawn directly in the logits' dtype (no fp32 detour: seconds and GBs at full size), scale 3 for peaked,
    # LM-like distributions; the student is a leaf in that dtype, as a model's output would be
    student = torch.randn(B, T, V, generator=gen, device=device, dtype=dtype).mul_(3).requires_grad_(True)
    teacher = torch.randn(B, T, V, generator=gen, device=device, dtype=dtype).mul_(3)
    warm = student[:, :8].detach().clone().requires_grad_(True)  # kernels and thread pools, not the sizes
    kl_forward_backward(job["variant"], warm, teacher[:, :8])
    del warm
    # one measured call gives both numbers: every full-size temporary is a fresh mmap (glibc returns blocks this
    # big to the OS on free), so a second call would pay the same page faults and add only minutes
    _, seconds, peak, method = measure(lambda: kl_forward_backward(job["variant"], student, teacher), device)
    return {"peak_bytes": peak, "seconds": seconds, "method": method,
            "input_bytes": 2 * student.numel() * student.element_size()}


def kl_agreement(dtype: torch.dtype, V: int, device, seed: int) -> dict:
    """Max |difference| of the KL and of its gradient between the two variants, on a (2, 64, V) input."""
    gen = torch.Generator(device=device).manual_seed(seed)
    s = (3 * torch.randn(2, 64, V, generator=gen, device=device)).to(dtype)
    t = (3 * torch.randn(2, 64, V, generator=gen, device=device)).to(dtype)
    out = {}
    for name in KL_VARIANTS:
        leaf = s.clone().requires_grad_(True)
        out[name] = (kl_forward_backward(name, leaf, t), leaf.grad.float())
    (k1, g1), (k2, g2) = out["naive"], out["ours"]
    return {"kl_max_abs_diff": float((k1 - k2).abs().max()), "grad_max_abs_diff": float((g1 - g2).abs().max()),
            "kl_mean": float(k1.mean())}


def section_kl(cfg, size, device, world, threads):
    B, T, V = size["shape"]
    rows, details = [], {"shape": [B, T, V]}
    for dtype in ("bfloat16", "float32"):
        agree = kl_agreement(getattr(torch, dtype), V, device, cfg.seed)
        results = {"naive": [], "ours": []}
        # fresh subprocesses, alternating naive / ours, `repeats` of each
        for rnd, variant, _ in alternating_schedule(list(results), size["repeats"], 0):
            job = {"kind": "kl", "variant": variant, "dtype": dtype, "shape": [B, T, V], "seed": cfg.seed + rnd,
                   "device": device.type}
            results[variant].append(run_child(job, threads))
        mem = {k: median([r["peak_bytes"] for r in v]) / 2**20 for k, v in results.items()}
        sec = {k: median([r["seconds"] for r in v]) for k, v in results.items()}
        inputs_mb = results["ours"][0]["input_bytes"] / 2**20
        label = f"2 kl {dtype} ({B}x{T}x{V})"
        rows += [make_row(label, "naive peak above inputs", mem["naive"], "MB"),
                 make_row(label, "ours peak above inputs", mem["ours"], "MB", mem["naive"], TARGETS["kl_memory"]),
                 make_row(label, "naive fwd+bwd", sec["naive"], "s"),
                 make_row(label, "ours fwd+bwd", sec["ours"], "s", sec["naive"], TARGETS["kl_time"])]
        print(f"  {dtype}: inputs {inputs_mb:,.0f} MB | peak above inputs naive {mem['naive']:,.0f} MB, ours "
              f"{mem['ours']:,.0f} MB -> {target_gap(ratio(mem['ours'], mem['naive']), TARGETS['kl_memory'])}")
        print(f"  {dtype}: fwd+bwd naive {sec['naive']:.3f} s, ours {sec['ours']:.3f} s -> "
              f"{target_gap(ratio(sec['ours'], sec['naive']), TARGETS['kl_time'])}")
        print(f"  {dtype}: same KL? max |naive - ours| = {agree['kl_max_abs_diff']:.2e} (KL ~ {agree['kl_mean']:.2f}),"
              f" gradient {agree['grad_max_abs_diff']:.2e}   [memory via {results['ours'][0]['method']}]")
        details[dtype] = {"peak_mb": mem, "seconds": sec, "inputs_mb": inputs_mb, "agreement": agree, "raw": results}
    return rows, details


# ----------------------------------------------------------------------------------------------------------------
# Section 3: one optimizer step per mode and detector, relative to opd
# ----------------------------------------------------------------------------------------------------------------

STEP_VARIANTS = [("opd", "probe"), ("opd_suppress", "window"), ("opd_suppress", "probe"), ("topd", "window"),
                 ("topd", "probe")]  # opd ignores the detector


def variant_name(mode: str, detector: str) -> str:
    return mode if mode == "opd" else f"{mode}/{detector}"


def section_step(cfg, size, device, world, threads):
    rows, details = [], {}
    horizons = {"toy default": toy.TRAIN_DEFAULTS["horizon"], "spec default": train.TrainConfig().horizon}
    for label, H in horizons.items():
        runs = {variant_name(m, d): make_run(world, m, d, H, device, size["extra"], cfg.seed) for m, d in STEP_VARIANTS}
        torch.set_num_threads(threads)
        times = run_alternating({n: step_fn(r) for n, r in runs.items()}, size["repeats"], cfg.warmup, device)
        med = {n: median(t) for n, t in times.items()}
        batch = runs["opd"].cfg.rollout_batch
        section = f"3 step H={H} ({label}, {batch} rollouts)"
        rows.append(make_row(section, "opd", med["opd"], "s"))
        print(f"  H={H} ({label}): opd {med['opd']:.2f} s/step")
        for name in list(runs)[1:]:
            target = TARGETS[name.split("/")[1]]
            rows.append(make_row(section, name, med[name], "s", med["opd"], target))
            print(f"    {name:20s} {med[name]:.2f} s/step  {target_gap(ratio(med[name], med['opd']), target)}")
        details[f"H={H}"] = {"seconds": times, "median": med, "rollout_batch": batch}
        del runs
        gc.collect()
    return rows, details


# ----------------------------------------------------------------------------------------------------------------
# Section 4: the peer, TRL's on-policy distillation trainer
# ----------------------------------------------------------------------------------------------------------------

def section_trl(cfg, size, device, world, threads):
    B, L = size["batch"], size["new_tokens"]
    section = f"4 trl ({B} rollouts x {L} tokens)"
    try:
        import datasets
        import trl
        from transformers import PrinterCallback, TrainerCallback
    except ImportError as e:
        reason = f"TRL is not installed ({e}). Install it to run this section: pip install trl (optional)"
        print("  " + reason)
        return [make_row(section, "trl.DistillationTrainer", None, "s", note="not run")], {"status": "not run",
                                                                                           "reason": reason}
    if not hasattr(trl, "DistillationTrainer"):
        reason = (f"trl {trl.__version__} has no DistillationTrainer (TRL's current on-policy distillation "
                  "trainer); pip install -U trl")
        print("  " + reason)
        return [make_row(section, "trl.DistillationTrainer", None, "s", note="not run")], {"status": "not run",
                                                                                           "reason": reason}
    # Why DistillationTrainer: in current TRL it is THE on-policy distillation trainer (GKDTrainer moved to
    # trl.experimental). It always samples from the student (GKD's lmbda = 1) and beta = 1 selects the reverse KL,
    # the OPD objective; its loss is chunked over the LM head, so it is a strong peer.
    n_steps = cfg.warmup + size["repeats"]
    extra = ["--rollout-batch", B, "--micro-batch", B, "--max-new-tokens", L]
    run = make_run(world, "opd", "window", toy.TRAIN_DEFAULTS["horizon"], device, extra, cfg.seed, ignore_eos=True)
    student, tokenizer = sample.load_policy(str(world / "student"), device)  # TRL trains its own copy
    teacher, _ = teacher_lib.load_teacher(str(world / "teacher"), device, model_dtype(device))
    prompts = [row["problem"] for row in run.prompts][:B * n_steps]  # the same prompt text ours encodes
    settings = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=B,
        gradient_accumulation_steps=1, max_steps=n_steps, learning_rate=run.cfg.lr, lr_scheduler_type="constant",
        adam_beta1=run.cfg.adam_beta1, adam_beta2=run.cfg.adam_beta2, weight_decay=run.cfg.weight_decay,
        max_grad_norm=run.cfg.grad_clip, beta=1.0, temperature=1.0, top_k=0, top_p=1.0, max_completion_length=L,
        generation_kwargs={"min_new_tokens": L},  # exactly L tokens, like our ignore_eos
        # TRL defaults to activation (gradient) checkpointing, which recomputes the forward; ours does not
        activation_checkpointing=False, gradient_checkpointing=False,
        bf16=device.type == "cuda", use_cpu=device.type == "cpu", report_to="none", save_strategy="no",
        logging_steps=n_steps + 1, disable_tqdm=True, shuffle_dataset=False, dataloader_num_workers=0, seed=cfg.seed)
    known = {f.name for f in dataclasses.fields(trl.DistillationConfig)}
    dropped = sorted(set(settings) - known)  # a renamed option in another TRL version: reported, not fatal
    args = trl.DistillationConfig(**{k: v for k, v in settings.items() if k in known})
    times = {"trl": [], "ours": []}
    ours_tokens = []

    class Alternate(TrainerCallback):
        """TRL's own loop drives the alternation: its step (generation + teacher + loss + backward + AdamW) is timed
        from on_step_begin to on_step_end, then our opd train_step runs once, timed: A B A B ..."""

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            times["trl"].append(time.perf_counter() - self.t0)
            torch.set_num_threads(threads)
            metrics, seconds = timed(lambda: train.train_step(run, state.global_step - 1), device)
            times["ours"].append(seconds)
            ours_tokens.append(metrics["rollout/len_mean"])

    with warnings.catch_warnings():  # deprecation notices of transformers' renames, not our business here
        warnings.simplefilter("ignore", FutureWarning)
        trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                                          train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
                                          callbacks=[Alternate()])
        trainer.remove_callback(PrinterCallback)  # its end-of-training dict; we read log_history instead
        torch.set_num_threads(threads)
        trainer.train()
    shutil.rmtree(settings["output_dir"], ignore_errors=True)
    trl_len = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    kept = {k: v[cfg.warmup:] for k, v in times.items()}
    med = {k: median(v) for k, v in kept.items()}
    r = ratio(med["ours"], med["trl"])
    print(f"  trl {trl.__version__} DistillationTrainer {med['trl']:.2f} s/step, ours (opd) {med['ours']:.2f} s/step"
          f" -> {target_gap(r, TARGETS['trl'])}\n  mean response length: ours {median(ours_tokens):.1f}, trl "
          f"{median([float(x) for x in trl_len]):.1f} (both should be L={L})")
    if dropped:
        print(f"  note: this TRL version does not know {dropped}; left at its defaults")
    rows = [make_row(section, f"trl {trl.__version__} DistillationTrainer", med["trl"], "s"),
            make_row(section, "ours: train_step (opd)", med["ours"], "s", med["trl"], TARGETS["trl"])]
    return rows, {"status": "ok", "trl_version": trl.__version__, "seconds": kept, "median": med,
                  "dropped_options": dropped, "our_response_len": ours_tokens,
                  "trl_response_len": trl_len}


# ----------------------------------------------------------------------------------------------------------------
# Section 5: scaling with the response length
# ----------------------------------------------------------------------------------------------------------------

SCALE_VARIANTS = [("opd", "probe"), ("topd", "window"), ("topd", "probe")]


def child_step(job, device):
    """In a fresh process: build the Run, measure the first step's time and peak memory, then time `steps` more."""
    run = make_run(Path(job["world"]), job["mode"], job["detector"], job["horizon"], device, job["extra"],
                   job["seed"], ignore_eos=True)
    _, first, peak, method = measure(lambda: train.train_step(run, 0), device)
    timed_steps = [timed(lambda: train.train_step(run, k), device) for k in range(1, 1 + job["steps"])]
    scale = 1 if sys.platform == "darwin" else 1024
    return {"seconds": [t for _, t in timed_steps], "first_seconds": first, "peak_bytes": peak, "method": method,
            "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "metrics": {k: v for k, v in timed_steps[-1][0].items() if isinstance(v, (int, float))}}


def section_scaling(cfg, size, device, world, threads):
    lengths, B = size["lengths"], size["batch"]
    H = size["horizon"] or train.TrainConfig().horizon
    tmp = Path(tempfile.mkdtemp(prefix="bench-longctx-"))
    rows, details = [], {"horizon": H, "batch": B, "lengths": list(lengths), "results": {}}
    try:
        long_world = long_context_world(world, 64 + max(lengths) + H, tmp)  # prompt + response + probe horizon
        for L in lengths:
            extra = ["--rollout-batch", B, "--micro-batch", B, "--max-new-tokens", L]
            res = {}
            for m, d in SCALE_VARIANTS:  # one fresh process per (variant, length), variants in turn
                job = {"kind": "step", "world": str(long_world), "mode": m, "detector": d, "horizon": H,
                       "extra": [str(x) for x in extra], "steps": size["repeats"], "seed": cfg.seed,
                       "device": device.type}
                res[variant_name(m, d)] = run_child(job, threads)
            sec = {n: median(r["seconds"]) for n, r in res.items()}
            mem = {n: r["peak_bytes"] / 2**20 for n, r in res.items()}
            section = f"5 scaling L={L} ({B} rollouts, H={H})"
            rows += [make_row(section, "opd step", sec["opd"], "s"), make_row(section, "opd peak", mem["opd"], "MB")]
            for n in list(res)[1:]:
                rows += [make_row(section, f"{n} step", sec[n], "s", sec["opd"]),
                         make_row(section, f"{n} peak", mem[n], "MB", mem["opd"])]
            print(f"  L={L:4d}: " + " | ".join(f"{n} {sec[n]:.2f} s, {mem[n]:,.0f} MB" for n in res))
            details["results"][L] = {"seconds": sec, "peak_mb": mem, "raw": res}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # growth per doubling of L: ~2x is linear in L, ~4x quadratic
    res = details["results"]
    for a, b in zip(lengths, lengths[1:]):
        growth = {n: ratio(res[b]["seconds"][n], res[a]["seconds"][n]) for n in res[b]["seconds"]}
        print(f"  step time growth, L {a} -> {b}: " + ", ".join(f"{n} {g:.2f}x" for n, g in growth.items()))
    return rows, details


# ----------------------------------------------------------------------------------------------------------------
# Section 6: the memory plan at Qwen's vocabulary (151,936 columns), rollouts of 512 .. 4096 tokens
# ----------------------------------------------------------------------------------------------------------------

MEMORY_VARIANTS = [("opd", "window"), ("topd", "window"), ("topd", "probe")]


def qwen_tokenizer(head_width: int, padding: int = 267):
    """A tokenizer of head_width - padding entries (Qwen3: 151,936 head columns, 151,669 tokens): pad/bos/eos, the
    toy's characters (one token per character, so digit strings encode to as many tokens as characters) and
    never-produced filler entries up to the size. What the runs measure is the cost of a Qwen-sized vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>"] + list("0123456789+-=?;,|\n{}")
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"<t{i}>": i for i in range(len(vocab), head_width - padding)})
    core = Tokenizer(models.WordLevel(vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   padding_side="left")


def qwen_vocab_world(into: Path, size: dict, padding: int = 267) -> Path:
    """Random Llama student (`layers`) and teacher (`layers` + 1) with Qwen3's head width (151,936 columns) and a
    tokenizer of 151,669 entries (Qwen3's own count: the last `padding` = 267 columns are padding, never sampled),
    small hidden states, and toy prompts. Random weights serve for time and memory: what is measured is the cost of
    (T, V). padding=0 gives a tokenizer as wide as the head: revisions before the padded-vocabulary fix (review
    item 2) sample padding ids and crash on the padded world, so the reference comparison runs on that one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    V, h = size["vocab"], size["hidden"]
    tok = qwen_tokenizer(V, padding)
    for name, layers, seed in (("student", size["layers"], 0), ("teacher", size["layers"] + 1, 1)):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                             max_position_embeddings=max(size["lengths"]) + 256, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0)
        LlamaForCausalLM(config).save_pretrained(into / name)
        tok.save_pretrained(into / name)
    rng = random.Random(0)
    with open(into / "train.jsonl", "w") as f:
        for _ in range(256):
            f.write(json.dumps({"prompt": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=?\n"}) + "\n")
    return into


def token_floor(mode: str, detector: str, L: int, metrics: dict, K: int, H: int, batch: int) -> float:
    """The step-time ratio to `opd` that the extra tokens alone predict, in token-forwards per rollout.

    opd: L sampled + L scored by the teacher + 3L for the student's forward and backward = 5L. The probe adds, per
    candidate, K x H tokens generated by each model and as many scored by the other (4 K H); guidance adds its
    window tokens forward and backward (3 per token); the window detector samples K x H teacher tokens per
    divergent state. Sequential decoding and batching are ignored: this is the floor a perfect implementation
    would pay on a machine where cost is proportional to tokens, as on a CPU.
    """
    if mode == "opd":
        return 1.0
    c = metrics.get("topd/candidates", 0.0)
    divergent = c * (1 - (metrics.get("topd/nondiv_frac") or 0.0))
    guide = metrics.get("guide/tokens", 0.0) / batch
    extra = 3 * guide + (4 * c * K * H if detector == "probe" else divergent * K * H)
    return (5 * L + extra) / (5 * L)


def section_memory(cfg, size, device, world, threads):
    tmp = Path(tempfile.mkdtemp(prefix="bench-qwen-vocab-"))
    H, K = size["horizon"], train.TrainConfig().probe_samples
    rows, details = [], {"horizon": H, "vocab": size["vocab"], "hidden": size["hidden"], "results": {}}
    reference = None
    try:
        qwen = qwen_vocab_world(tmp / "world", size)
        if cfg.reference:  # the reference revision's own code, in a detached worktree (removed afterwards)
            unpadded = qwen_vocab_world(tmp / "world-unpadded", size, padding=0)
            reference = tmp / "reference"
            subprocess.run(["git", "worktree", "add", "--detach", str(reference), cfg.reference], cwd=ROOT,
                           check=True, capture_output=True)
        for L in size["lengths"]:
            B = size["batch"][L]
            extra = [str(x) for x in ("--rollout-batch", B, "--micro-batch", B, "--max-new-tokens", L)]
            res = {}
            for m, d in MEMORY_VARIANTS:  # one fresh process per (variant, length)
                job = {"kind": "step", "world": str(qwen), "mode": m, "detector": d, "horizon": H, "extra": extra,
                       "steps": size["repeats"], "seed": cfg.seed, "device": device.type}
                res[variant_name(m, d)] = run_child(job, threads, timeout=3600)
            if reference is not None and L == size["reference_length"]:  # both codes on the unpadded world
                job = {"kind": "step", "world": str(unpadded), "mode": "opd", "detector": "window", "horizon": H,
                       "extra": extra, "steps": size["repeats"], "seed": cfg.seed, "device": device.type}
                res["opd, unpadded"] = run_child(job, threads, timeout=3600)
                # --ignore-eos: the reference revisions still had the flag (ours passes eos_ids=[-1] itself)
                res["reference opd, unpadded"] = run_child({**job, "extra": extra + ["--ignore-eos"]}, threads,
                                                           timeout=3600, code=reference)
            sec = {n: median(r["seconds"]) for n, r in res.items()}
            mem = {n: r["peak_bytes"] / 2**20 for n, r in res.items()}
            floor = {variant_name(m, d): token_floor(m, d, L, res[variant_name(m, d)].get("metrics", {}), K, H, B)
                     for m, d in MEMORY_VARIANTS}
            section = f"6 memory L={L} ({B} rollouts, V={size['vocab']}, H={H})"
            rows += [make_row(section, "opd step", sec["opd"], "s"), make_row(section, "opd peak", mem["opd"], "MB")]
            if "reference opd, unpadded" in res:
                ours, old = "opd, unpadded", "reference opd, unpadded"
                rows += [make_row(section, "opd step vs reference (unpadded world)", sec[ours], "s", sec[old],
                                  TARGETS["opd_time_vs_reference"]),
                         make_row(section, "opd peak vs reference (unpadded world)", mem[ours], "MB", mem[old],
                                  TARGETS["opd_memory_vs_reference"])]
            for n in ("topd/window", "topd/probe"):
                probe = n == "topd/probe" and L == size["reference_length"]
                rows += [make_row(section, f"{n} step (floor {floor[n]:.2f}x)", sec[n], "s", sec["opd"],
                                  TARGETS["probe_time"] if probe else None),
                         make_row(section, f"{n} peak", mem[n], "MB", mem["opd"],
                                  TARGETS["probe_memory"] if probe else None)]
                if probe:
                    rows.append(make_row(section, f"{n} time / token floor", ratio(sec[n], sec["opd"]), "x",
                                         floor[n], TARGETS["probe_time_vs_floor"]))
            print(f"  L={L:5d}, {B} rollouts: " + " | ".join(f"{n} {sec[n]:.2f} s, {mem[n]:,.0f} MB" for n in res)
                  + " | floors " + ", ".join(f"{n} {f:.2f}x" for n, f in floor.items() if n != "opd"))
            details["results"][L] = {"batch": B, "seconds": sec, "peak_mb": mem, "floor": floor, "raw": res}
    finally:
        if reference is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(reference)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows, details


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# Section 7: compiled decoding (sample.py "Compiled decoding") against eager and HF generate
# ----------------------------------------------------------------------------------------------------------------

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)


def decode_model(name: str, world: Path, device: torch.device):
    """(model, prompts as id lists, pad id) for section 7: the toy world's student, or a Qwen3-0.6B-shaped random
    model (its real config's sizes) with toy-length prompts."""
    if name == "toy":
        model, tok = sample.load_policy(str(world / "student"), device)
        rows = toy.read_jsonl(world / "test.jsonl")
        return model, sample.encode_prompts(tok, [r["prompt"] for r in rows])[0], toy.PAD_ID
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(**QWEN3_06B, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Qwen3ForCausalLM(config).to(device=device, dtype=model_dtype(device)).eval()
    rng = random.Random(0)
    return model, [[1] + [rng.randrange(3, 1000) for _ in range(rng.randint(8, 48))] for _ in range(64)], 0


def section_decode(cfg, size, device, world, threads):
    """Rollout tokens/s of eager and compiled decoding and of HF generate, the same model, batch, length and
    sampling settings (every row runs to the length: no stop token), the compile time paid once (the first compiled
    call minus a steady one), and the toy training step with each decode mode."""
    torch.set_num_threads(threads)
    rows, details = [], {"results": {}}
    B = size["batch"]
    for name in cfg.decode_models.split(",") if cfg.decode_models else size["models"]:
        model, prompts, pad = decode_model(name, world, device)
        prompts = prompts[:B]
        lengths = size["lengths"] if device.type == "cuda" or name == "toy" else size["cpu_lengths"]
        if name == "toy":  # the toy accepts 128-160 positions: every length is cut to what fits, measured once
            lengths = sorted({min(L, model.config.max_position_embeddings - max(map(len, prompts))) for L in lengths})
        for L in lengths:
            fns, first = {}, {}
            for decode in sample.DECODE_MODES:
                sampling = sample.SamplingConfig(max_new_tokens=L, decode=decode)
                fns[decode] = (lambda k, s=sampling: sample.sample_rollouts(
                    model, prompts, sampling=s, eos_ids=[-1], pad_id=pad,
                    generator=sample.make_generator(cfg.seed, k, device=device)))

            def generate(k):
                ids, mask = sample.left_pad(prompts, pad, device)
                model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                               top_p=1.0, max_new_tokens=L, min_new_tokens=L, pad_token_id=pad)
            fns["generate"] = generate
            with torch.no_grad():
                for decode in fns:  # the first call of each: compile time for `compiled`, warm-up for the others
                    first[decode] = timed(lambda: fns[decode](0), device)[1]
                times = run_alternating(fns, size["repeats"], 0, device)
            tps = {k: B * L / median(v) for k, v in times.items()}
            compile_s = first["compiled"] - median(times["compiled"])
            section = f"7 decode, {name}, {B} x {L} tokens"
            target = TARGETS["decode_gpu"] if device.type == "cuda" else None
            rows += [make_row(section, "eager", tps["eager"], "tok/s"),
                     make_row(section, "compiled", tps["compiled"], "tok/s", tps["eager"], target),
                     make_row(section, "HF generate", tps["generate"], "tok/s", tps["eager"]),
                     make_row(section, "compile time (once)", compile_s, "s")]
            print(f"  {name}, {B} x {L}: eager {tps['eager']:,.0f} tok/s, compiled {tps['compiled']:,.0f} "
                  f"({ratio(tps['compiled'], tps['eager']):.2f}x; compile {compile_s:.0f} s once), generate "
                  f"{tps['generate']:,.0f} ({ratio(tps['generate'], tps['eager']):.2f}x)", flush=True)
            details["results"][f"{name}-{L}"] = {"tokens_per_s": tps, "compile_seconds": compile_s}
        del model
    # the toy's training step, eager vs compiled decoding, the two runs stepping in turns (alternating_schedule: the
    # same prompts at each step; a drift of the shared machine falls on both; measured: two 20-step train.py runs one
    # after the other gave 1.88x and 1.32x sampling ratios on the same code). Round 0 compiles / warms up.
    runs = {decode: make_run(world, "topd", "probe", toy.TRAIN_DEFAULTS["horizon"], device, ["--decode", decode])
            for decode in sample.DECODE_MODES}
    steps = {decode: [] for decode in runs}
    for k, decode, keep in alternating_schedule(list(runs), size["steps"], 1):
        metrics = train.train_step(runs[decode], k)
        if keep:
            steps[decode].append(metrics)
    sample_s = {d: median([m["time/sample"] for m in ms]) for d, ms in steps.items()}
    step_s = {d: median([m["time/step"] for m in ms]) for d, ms in steps.items()}
    section = "7 decode, toy topd + probe step"
    rows += [make_row(section, "sampling per step, eager", sample_s["eager"], "s"),
             make_row(section, "sampling per step, compiled", sample_s["compiled"], "s", sample_s["eager"],
                      TARGETS["decode_cpu"] if device.type == "cpu" else None),
             make_row(section, "step, eager", step_s["eager"], "s"),
             make_row(section, "step, compiled", step_s["compiled"], "s", step_s["eager"])]
    print(f"  toy step: sampling {sample_s['eager']:.2f} s eager, {sample_s['compiled']:.2f} s compiled; step "
          f"{step_s['eager']:.2f} s eager, {step_s['compiled']:.2f} s compiled", flush=True)
    details["toy_step"] = {"sample_seconds": sample_s, "step_seconds": step_s}
    return rows, details


SECTIONS = {1: section_sampling, 2: section_kl, 3: section_step, 4: section_trl, 5: section_scaling,
            6: section_memory, 7: section_decode}


def child_main(job: dict):
    device = torch.device(job["device"])
    result = {"kl": child_kl, "step": child_step}[job["kind"]](job, device)
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def main(argv=None):
    cfg = parse_config(argv)
    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generation-config chatter and weight-loading bars would bury the results
    hf_logging.disable_progress_bar()
    if cfg.child:
        return child_main(json.loads(cfg.child))
    device = resolve_device(cfg.device)
    sizes = QUICK if cfg.quick else FULL
    sections = parse_sections(cfg.sections)
    if cfg.repeats:
        sizes = {k: {**v, "repeats": cfg.repeats} for k, v in sizes.items()}
    world = prepare_world(cfg) if {3, 4, 5, 7} & set(sections) else None
    import transformers

    env = {"device": str(device), "threads": threads, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "world": str(world) if world else None}
    print(f"bench: {'quick' if cfg.quick else 'full'} | sections {sections} | {env}", flush=True)
    results = {"config": dataclasses.asdict(cfg), "env": env, "sizes": {NAMES[s]: sizes[s] for s in sections},
               "sections": {}, "rows": []}
    t_all, failed = time.time(), []
    for s in sections:
        print(f"\n== section {s}: {NAMES[s]} ==", flush=True)
        t0 = time.time()
        try:
            rows, details = SECTIONS[s](cfg, sizes[s], device, world, threads)
        except Exception as e:  # one broken section must not cost the others' numbers
            traceback.print_exc()
            failed.append(s)
            rows = [make_row(f"{s} {NAMES[s]}", "all", None, "", note=f"failed: {type(e).__name__}")]
            details = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        details["elapsed_s"] = round(time.time() - t0, 1)
        print(f"-- section {s} ({NAMES[s]}) took {details['elapsed_s']:.1f} s", flush=True)
        results["sections"][NAMES[s]] = details
        results["rows"] += rows
    results["elapsed_s"] = round(time.time() - t_all, 1)
    print("\n" + format_table(results["rows"]))
    print(f"\ntotal {results['elapsed_s']:.1f} s; " + ", ".join(
        f"{name} {d['elapsed_s']:.0f} s" for name, d in results["sections"].items()))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, out)  # a reader never sees half a file
    print(f"wrote {out}")
    if failed:
        sys.exit(f"sections {failed} failed (see above)")
    return results


if __name__ == "__main__":
    main()
