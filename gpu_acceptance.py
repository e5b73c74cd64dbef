"""
gpu_acceptance.py -- the one-shot GPU acceptance run: train.py at the paper's model shapes, DDP and FSDP, every mode.

Everything else in this repository is tested on a CPU in fp32. This command checks the place where users run it:
CUDA, bf16, NCCL, the paper's model sizes. No hub is needed: it builds random-weight models with the real configs'
shapes, saves them, and has train.py load them through the same from_pretrained path a real checkpoint takes.

  student  Qwen3-4B-Instruct-2507's shape (36 layers, d 2560, GQA 32/8 heads of 128, tied 151,936-column head)
  teacher  Qwen3-30B-A3B-Instruct-2507's shape (a mixture of experts: 128 experts of 768, 8 per token, d 2048, 32/4
           heads), with as many of its 48 layers as fit on the GPU beside the student's training state
  vocab    Qwen3's: 151,936 head columns, 151,669 tokenizer entries (bench.qwen_tokenizer)

then runs, each as `torchrun --nproc_per_node=1` over train.py's own setup and step (a child process per layout):

  ddp, fsdp   x   opd, topd --detector window, topd --detector probe   at T = 2048 new tokens, rollout batch 8, 2 steps
  memory      topd --detector probe at T = 8192 (a 7,936-token prompt and 256 new tokens: the memory of an 8k-token
              sequence in every phase without 8k decoding steps), 1 step
  decoding    our sampler next to HF `generate` on the student, same batch, same length, same autocast

and prints one table: per run the time of each phase of the second step, the peak GPU memory
(torch.cuda.max_memory_allocated), rollout tokens/s, the learner's model-FLOPs utilisation (6 x parameters x tokens +
attention, over the `train` phase, against the GPU's dense bf16 peak), the loss and gradient norm. It exits non-zero
if a run crashes or any loss or gradient norm is not finite. The full table goes to --out (acceptance.json, .md).

    python gpu_acceptance.py                          # the paper's shapes (one H100/H200; budgeted for ~8 minutes)
    python gpu_acceptance.py --size toy               # the same script at toy size, on the CPU too (tests run it)
    python gpu_acceptance.py --teacher-layers 12 --tokens 1024     # smaller, on a smaller GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent

# The real configs' shapes (Qwen3-4B-Instruct-2507 and Qwen3-30B-A3B-Instruct-2507, config.json), and a toy size
# with the same structure for the CPU test.
SIZES = {
    "paper": dict(student=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_theta=5e6),
                  teacher=dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                               num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                               num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1e7),
                  vocab=151936, padding=267, tokens=2048, batch=8, micro_batch=4, steps=2, memory_tokens=8192,
                  memory_new_tokens=256, generate_tokens=512, reserve_gb=45.0, extra=[]),
    "toy": dict(student=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=5e6),
                teacher=dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                             num_experts_per_tok=2, norm_topk_prob=True, rope_theta=1e7),
                vocab=512, padding=24, tokens=10, batch=2, micro_batch=1, steps=2, memory_tokens=48,
                memory_new_tokens=6, generate_tokens=6, reserve_gb=0.0,
                extra=["--horizon", "4", "--probe-samples", "2"]),  # the spec's H = 32 would outlast every rollout
}
RUNS = [("opd", "window"), ("topd", "window"), ("topd", "probe")]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, the vendors' sheets


# ----------------------------------------------------------------------------------------------------------------
# The models: random weights, the real shapes, saved as checkpoints
# ----------------------------------------------------------------------------------------------------------------

def layer_params(t: dict) -> int:
    """Parameters of one mixture-of-experts decoder layer of the teacher's shape (attention, router, experts)."""
    d, hd = t["hidden_size"], t["head_dim"]
    attention = d * hd * (t["num_attention_heads"] * 2 + t["num_key_value_heads"] * 2)
    return attention + d * t["num_experts"] + t["num_experts"] * 3 * d * t["moe_intermediate_size"]


def student_params(s: dict, vocab: int) -> int:
    d, hd = s["hidden_size"], s["head_dim"]
    layer = d * hd * (s["num_attention_heads"] * 2 + s["num_key_value_heads"] * 2) + 3 * d * s["intermediate_size"]
    return s["num_hidden_layers"] * layer + vocab * d * (1 if s["tie_word_embeddings"] else 2)


def teacher_layers_that_fit(size: dict, gpu_bytes: int) -> int:
    """As many teacher layers (bf16) as fit beside the student's training state under DDP (fp32 weights, gradients
    and two AdamW moments: 16 B per parameter), the teacher's embedding and head, and size["reserve_gb"] for the
    KV caches, the probe's caches, activations and the fused kernels' temporaries at T = 8192."""
    t = size["teacher"]
    fixed = 16 * student_params(size["student"], size["vocab"]) + 2 * 2 * size["vocab"] * t["hidden_size"]
    free = gpu_bytes - fixed - size["reserve_gb"] * 2**30
    return max(1, min(t["num_hidden_layers"], int(free // (2 * layer_params(t)))))


def build_models(into: Path, size: dict, teacher_layers: int, device: torch.device, log=print) -> dict:
    """student/, teacher/ (random weights, bf16 on CUDA) and prompts.jsonl under `into`. Returns what was built."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    import bench

    tok = bench.qwen_tokenizer(size["vocab"], size["padding"])
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    built = {}
    for name, cls, config in (
            ("student", Qwen3ForCausalLM, Qwen3Config(vocab_size=size["vocab"], max_position_embeddings=262144,
                                                      **size["student"], **ids)),
            ("teacher", Qwen3MoeForCausalLM, Qwen3MoeConfig(vocab_size=size["vocab"], max_position_embeddings=262144,
                                                            tie_word_embeddings=False, **{
                                                                **size["teacher"],
                                                                "num_hidden_layers": teacher_layers}, **ids))):
        t0 = time.time()
        torch.manual_seed(0 if name == "student" else 1)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = cls(config)
        finally:
            torch.set_default_dtype(default)
        with torch.no_grad():  # random init gives logits of ~0.1: scale the head so the distributions are peaked,
            model.get_output_embeddings().weight.mul_(20)  # as a trained model's are (KL and probe margins of nats)
        model.save_pretrained(into / name)
        tok.save_pretrained(into / name)
        GenerationConfig(**ids).save_pretrained(into / name)
        built[name] = {"params": sum(p.numel() for p in model.parameters()), "layers": config.num_hidden_layers,
                       "seconds": round(time.time() - t0, 1)}
        log(f"built {name}: {built[name]['params'] / 1e9:.2f}B parameters, {config.num_hidden_layers} layers, "
            f"{built[name]['seconds']} s")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rng = random.Random(0)
    with open(into / "prompts.jsonl", "w") as f:
        for _ in range(64):
            f.write(json.dumps({"prompt": f"{rng.randint(0, 999)}+{rng.randint(0, 999)}=?\n"}) + "\n")
    with open(into / "long_prompts.jsonl", "w") as f:  # the memory point's prompts: digits, one token each
        for _ in range(16):
            n = size["memory_tokens"] - size["memory_new_tokens"] - 2
            f.write(json.dumps({"prompt": "".join(rng.choice("0123456789") for _ in range(n))}) + "\n")
    return built


# ----------------------------------------------------------------------------------------------------------------
# One child: one layout, its runs in turn, the models loaded once
# ----------------------------------------------------------------------------------------------------------------

def learner_flops(config, tokens_per_row: int, rows: int) -> float:
    """Model FLOPs of one forward + backward of the student over rows x tokens_per_row tokens: 6 x parameters x
    tokens (the LM head included) + causal attention, 6 x layers x heads x head_dim x tokens^2 per row (PaLM's MFU
    definition: recomputation, here of checkpointed activations and of the fused kernels' logits, is not counted)."""
    d, hd, heads = config.hidden_size, config.head_dim, config.num_attention_heads
    per_layer = d * hd * (heads * 2 + config.num_key_value_heads * 2) + 3 * d * config.intermediate_size
    params = config.num_hidden_layers * per_layer + config.vocab_size * d
    attention = 6 * config.num_hidden_layers * heads * hd * tokens_per_row ** 2
    return rows * (6 * params * tokens_per_row + attention)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def decode_speed(run, tokens: int, device: torch.device) -> dict:
    """Our sampler and HF generate on the student, the same prompts, batch, length (every row runs to `tokens`:
    no stop token) and autocast; tokens/s of each and their ratio."""
    import sample

    prompts = run.prompt_ids[:run.cfg.rollout_batch]
    cfg = sample.SamplingConfig(max_new_tokens=tokens, vocab_size=run.vocab_size)
    model = run.student

    def ours():
        return sample.sample_rollouts(model, prompts, sampling=cfg, eos_ids=[-1], pad_id=run.pad_id,
                                      generator=sample.make_generator(0, 99, device=device))

    def generate():
        ids, mask = sample.left_pad(prompts, run.pad_id, device)
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=run.pad_id)

    out = {}
    with torch.no_grad(), sample.eval_mode(model), run.autocast():
        for name, fn in (("ours", ours), ("generate", generate)):
            fn()  # warm-up (allocator, kernels)
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out[f"{name}_tokens_per_s"] = len(prompts) * tokens / (time.perf_counter() - t0)
    out["ratio"] = out["ours_tokens_per_s"] / out["generate_tokens_per_s"]
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child(job: dict) -> None:
    """Inside `torchrun --nproc_per_node=1`: every run of job["runs"] through train.setup and train.train_step, the
    two models loaded once for all of them (each run gets a fresh optimizer and schedule). Writes job["result"]."""
    import parallel
    import train

    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world, local_rank = parallel.dist_init(device_kind)
    device = torch.device(f"cuda:{local_rank}" if device_kind == "cuda" else "cpu")
    loaded, real = {}, parallel.from_pretrained

    def load_once(path, dtype, where, shard=None):  # the same weights for every run of this layout
        key = (str(path), dtype, shard is not None)
        if key not in loaded:
            loaded[key] = real(path, dtype, where, shard=shard)
        return loaded[key]

    parallel.from_pretrained = load_once
    results = []
    try:
        for spec in job["runs"]:
            row = {k: spec[k] for k in ("name", "layout", "mode", "detector", "tokens", "prompt_tokens")}
            t0 = time.time()
            try:
                cfg = train.parse_config(spec["argv"])
                run = train.setup(cfg, device_kind, rank, world, local_rank, log=lambda *a: None)
                steps = []
                for step in range(spec["steps"]):
                    if device_kind == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    steps.append(train.train_step(run, step))
                    row["peak_gb"] = (torch.cuda.max_memory_allocated(device) / 2**30 if device_kind == "cuda"
                                      else None)
                m = steps[-1]
                rows_, new = cfg.rollout_batch, m["rollout/len_mean"]
                row["sharded"] = parallel.is_sharded(run.student) and parallel.is_sharded(run.teacher)
                row.update({f"time_{k}": m[f"time/{k}"] for k in ("sample", "teacher", "probe", "train", "step")})
                row.update(loss=m["opd/loss"], grad_norm=m["grad_norm"], skipped=m["skipped"],
                           rollout_tokens_per_s=rows_ * new / max(m["time/sample"], 1e-9),
                           finite=all(math.isfinite(s[k]) for s in steps for k in ("opd/loss", "grad_norm")))
                flops = learner_flops(run.student.config, spec["prompt_tokens"] + int(new), rows_)
                peak = peak_tflops(device)
                row["mfu"] = flops / m["time/train"] / (peak * 1e12) if peak and cfg.mode == "opd" else None
                if spec.get("decode_tokens"):
                    row["decode"] = decode_speed(run, spec["decode_tokens"], device)
                del run
            except Exception as e:  # a crash is a result: report it and go on with the next run
                import traceback
                row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:], finite=False)
            row["seconds"] = round(time.time() - t0, 1)
            results.append(row)
            print(f"[{job['layout']}] {row['name']}: {'ERROR ' + row['error'] if 'error' in row else 'ok'} "
                  f"({row['seconds']} s)", flush=True)
            gc.collect()
            if device_kind == "cuda":
                torch.cuda.empty_cache()
    finally:
        Path(job["result"]).write_text(json.dumps(results, indent=2))
        parallel.from_pretrained = real
        loaded.clear()
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# The parent: build, launch the children, print the table, decide
# ----------------------------------------------------------------------------------------------------------------

def plan(world: Path, size: dict, args, out: Path) -> list[dict]:
    """The children's jobs: one per layout with its three runs, and the memory point."""
    device = ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    common = ["--student", str(world / "student"), "--teacher", str(world / "teacher"), "--lr", "1e-6",
              "--rollout-batch", str(size["batch"]), "--micro-batch", str(size["micro_batch"]), "--eval-every", "0",
              "--steps", "10", "--gradient-checkpointing", *device, *size["extra"]]
    jobs = []
    for layout in ("ddp", "fsdp"):
        runs = []
        for mode, detector in RUNS:
            name = f"{mode}" if mode == "opd" else f"{mode} {detector}"
            runs.append({"name": name, "layout": layout, "mode": mode, "detector": detector, "tokens": args.tokens,
                         "prompt_tokens": 10, "steps": args.steps,
                         "argv": common + ["--prompts", str(world / "prompts.jsonl"), "--mode", mode, "--detector",
                                           detector, "--max-new-tokens", str(args.tokens), "--parallel", layout,
                                           "--out", str(out / "runs" / f"{layout}-{mode}-{detector}")],
                         "decode_tokens": size["generate_tokens"] if (layout, mode) == ("ddp", "opd") else 0})
        jobs.append({"layout": layout, "runs": runs, "result": str(out / f"{layout}.json")})
    prompt = size["memory_tokens"] - size["memory_new_tokens"]
    jobs.append({"layout": "memory", "result": str(out / "memory.json"), "runs": [{
        "name": f"topd probe, T={size['memory_tokens']}", "layout": "ddp", "mode": "topd", "detector": "probe",
        "tokens": size["memory_new_tokens"], "prompt_tokens": prompt, "steps": 1,
        "argv": common + ["--prompts", str(world / "long_prompts.jsonl"), "--mode", "topd", "--detector", "probe",
                          "--max-new-tokens", str(size["memory_new_tokens"]), "--max-prompt-len", str(prompt),
                          "--out", str(out / "runs" / "memory")]}]})
    return jobs


def verdict(rows: list[dict]) -> list[str]:
    """What fails the acceptance: a crashed run, a non-finite loss or gradient norm, a skipped step."""
    bad = []
    for r in rows:
        if "error" in r:
            bad.append(f"{r['layout']} {r['name']}: {r['error']}")
        elif not r.get("finite") or r.get("skipped"):
            bad.append(f"{r['layout']} {r['name']}: non-finite loss or gradient norm")
    return bad


def table(rows: list[dict]) -> list[str]:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| layout | run | new tokens | sample s | teacher s | probe s | train s | step s | peak GB | rollout tok/s "
             "| learner MFU | loss | grad norm |", "|" + "---|" * 13]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['name']} | {r['tokens']} | CRASHED: {r['error'][:80]} |" + " |" * 9)
            continue
        lines.append(f"| {r['layout']} | {r['name']} | {r['tokens']} | " + " | ".join(
            num(r[f"time_{k}"], ".2f") for k in ("sample", "teacher", "probe", "train", "step")) +
            f" | {num(r.get('peak_gb'), '.1f')} | {r['rollout_tokens_per_s']:.0f} | "
            f"{num(r.get('mfu') and 100 * r['mfu'], '.1f')}{'%' if r.get('mfu') else ''} | {r['loss']:.4f} | "
            f"{r['grad_norm']:.3g} |")
    for r in rows:
        if "decode" in r:
            d = r["decode"]
            lines += ["", f"Decoding on the student ({r['layout']}, batch {r.get('batch', '')}, "
                      f"{r['decode_tokens']} tokens per row): ours {d['ours_tokens_per_s']:.0f} tokens/s, HF generate "
                      f"{d['generate_tokens_per_s']:.0f} tokens/s ({d['ratio']:.2f}x)."]
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="the one-shot GPU acceptance run (see the module docstring)")
    p.add_argument("--size", choices=sorted(SIZES), default="paper")
    p.add_argument("--out", default="runs/gpu-acceptance")
    p.add_argument("--tokens", type=int, default=0, help="new tokens per rollout (default: the size's, 2048)")
    p.add_argument("--steps", type=int, default=0, help="steps per run (default: the size's, 2; the last is timed)")
    p.add_argument("--teacher-layers", type=int, default=0, help="0 = as many as fit (toy: all)")
    p.add_argument("--keep-models", action="store_true", help="keep the built checkpoints in --out/models")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = SIZES[args.size]
    args.tokens, args.steps = args.tokens or size["tokens"], args.steps or size["steps"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(json.loads(Path(args.child).read_text()))
        return 0
    size, t_start = SIZES[args.size], time.time()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    layers = args.teacher_layers or (teacher_layers_that_fit(size, torch.cuda.get_device_properties(device).total_memory)
                                     if device.type == "cuda" else size["teacher"]["num_hidden_layers"])
    print(f"gpu acceptance ({args.size}) on {gpu}: torch {torch.__version__}, teacher layers {layers}", flush=True)
    world = out / "models" if args.keep_models else Path(tempfile.mkdtemp(prefix="gpu-acceptance-"))
    world.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        built = build_models(world, size, layers, device)
        for job in plan(world, size, args, out):
            path = out / f"job-{job['layout']}.json"
            path.write_text(json.dumps(job))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                   str(ROOT / "gpu_acceptance.py"), "--child", str(path)]
            proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            result = Path(job["result"])
            if result.exists():
                rows += json.loads(result.read_text())
            if proc.returncode != 0 or not result.exists():
                done = {r["name"] for r in rows if r["layout"] == job["runs"][0]["layout"]}
                rows += [{**{k: s[k] for k in ("name", "layout", "mode", "detector", "tokens")}, "finite": False,
                          "error": f"the {job['layout']} child exited with {proc.returncode}"}
                         for s in job["runs"] if s["name"] not in done]
    finally:
        if not args.keep_models:
            shutil.rmtree(world, ignore_errors=True)
    for r in rows:
        r["batch"] = size["batch"]
        r["decode_tokens"] = size["generate_tokens"]
    failures = verdict(rows)
    lines = [f"GPU acceptance ({args.size} size) on {gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: "
             f"student {built['student']['params'] / 1e9:.2f}B, teacher {built['teacher']['params'] / 1e9:.2f}B "
             f"({layers} layers), rollout batch {size['batch']}, {args.steps} steps per run (the last one timed), "
             f"{(time.time() - t_start) / 60:.1f} min in all.", "", *table(rows), "",
             "verdict: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures))]
    (out / "acceptance.md").write_text("\n".join(lines) + "\n")
    (out / "acceptance.json").write_text(json.dumps({"gpu": gpu, "size": args.size, "teacher_layers": layers,
                                                     "built": built, "rows": rows, "failures": failures}, indent=2))
    print("\n".join(lines), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
