"""
checkpoint.py -- run folders, atomic checkpoints and exact resume for train.py; and the run's records (MetricsLog:
metrics.jsonl; Clock: wall time per phase of a step; ForwardTokens: tokens through a model's forwards;
step_line: the line printed per step).

A checkpoint is an HF folder that transformers and vLLM load as is (`save_pretrained`: config.json,
model.safetensors, the tokenizer), plus trainer_state.pt (optimizer, scheduler, step, RNG states) and meta.json (the
run's config and id, the starting accuracy, the last metrics). The rules that keep a user's work safe:

  * one run per folder: a new run in a folder that holds another is refused unless --overwrite (prepare_out);
  * under FSDP (train.py --parallel fsdp) the same HF folder, gathered on rank 0, and the optimizer state saved
    sharded with torch.distributed.checkpoint in ckpt-*/optimizer/ (resharded on load if the process count changed);
  * written under a temporary name, renamed, then `latest` switched by one atomic rename: a crash mid-save leaves
    the previous checkpoint as latest;
  * rotation deletes only this run's checkpoints older than the one just written (save_checkpoint);
  * --resume refuses a run whose flags differ from the checkpoint's, except the few that cannot change the
    trajectory of the weights (resume_point, resume_differences), restores the optimizer, the schedule and every
    RNG state (restore_trainer_state, restore_rng), and drops the metrics logged after the checkpoint
    (MetricsLog).

    python -c "import checkpoint, pathlib; print(checkpoint.latest_checkpoint(pathlib.Path('runs/topd-probe')))"
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch

import parallel


# Flags that may differ between a run and its --resume: they change what is logged, saved or checked, never the
# trajectory of the weights. Any other difference (--steps, --lr, ...) would silently change the schedule or the
# method half-way, so resume refuses it.
RESUME_MAY_CHANGE = {"resume", "overwrite", "out", "stop_at_step", "eval_every", "save_every", "keep_checkpoints",
                     "log_every", "logp_check_every", "max_bad_steps", "self_check", "device", "chunk_size",
                     "gradient_checkpointing", "sync_every_backward", "decode", "dist_timeout", "eval_batch_tokens",
                     "unshard_rollouts"}


def resume_differences(saved: dict, cfg) -> list[str]:
    """The flags whose value differs from the checkpoint's config, as '--flag saved -> now' strings."""
    now = dataclasses.asdict(cfg)
    return [f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in now
            if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]


def new_run_id() -> str:
    import uuid

    return uuid.uuid4().hex[:12]


def prepare_out(out: Path, cfg, rank: int) -> None:
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


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, scheduler, cfg, extra: dict, rank: int = 0):
    """Write out/ckpt-{step}, switch out/latest to it, then delete this run's checkpoints older than it beyond
    cfg.keep_checkpoints. extra["run_id"] names the run; rotation never touches another run's checkpoints, nor
    one newer than the checkpoint just written.

    Every rank calls it. With a model sharded by FSDP it is a collective: the weights are gathered to rank 0 (the
    HF folder is the same as without sharding) and each rank writes its shard of the optimizer state into
    ckpt-*/optimizer/ with torch.distributed.checkpoint (trainer_state.pt then holds optimizer=None). Rank 0 writes
    everything else and does the renames."""
    final = out / f"ckpt-{step:06d}"
    tmp = out / f".tmp-ckpt-{step:06d}"  # the same name on every rank: they all write into it under FSDP
    sharded = parallel.is_sharded(model)
    if rank == 0 and tmp.exists():  # a crashed save's leftovers
        shutil.rmtree(tmp)
    _barrier()
    if sharded:
        parallel.save_optimizer(model, optimizer, tmp / "optimizer")
    weights = parallel.full_state_dict(model)  # a collective under FSDP; rank 0 gets the whole model, on the CPU
    rng = parallel.all_gather_objects(rng_state())  # every rank's own RNG states (a collective), kept by rank 0
    if rank != 0:
        _barrier()  # wait until rank 0 has switched `latest`
        return final
    getattr(model, "module", model).save_pretrained(tmp, state_dict=weights)  # safetensors, config.json, ...
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": None if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step,
                "rng": rng,  # one entry per rank, in rank order (rng_state)
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
    _barrier()
    return final


def _barrier():
    parallel.barrier()


def checkpoint_run_id(path: Path) -> str | None:
    """The run a checkpoint belongs to (meta.json's run_id), or None when it has none or cannot be read."""
    try:
        return json.loads((path / "meta.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def latest_checkpoint(out: Path) -> Path:
    pointer = out / "latest"
    if not pointer.exists():
        raise FileNotFoundError(f"{out} holds no checkpoint (no {pointer})")
    path = out / pointer.read_text().strip()
    if not (path / "trainer_state.pt").exists():
        raise RuntimeError(f"{pointer} points to {path}, which has no trainer_state.pt")
    return path


def resume_point(out: Path, cfg) -> tuple[Path, dict]:
    """(the checkpoint --resume continues from, its meta.json). A resumed run must be the same run: every flag that
    shapes the trajectory equal to the checkpoint's (resume_differences), else ValueError naming them."""
    path = latest_checkpoint(out)
    meta = json.loads((path / "meta.json").read_text())
    differ = resume_differences(meta["config"], cfg)
    if differ:
        raise ValueError(f"--resume from {path}: these flags differ from the checkpoint's run: "
                         f"{'; '.join(differ)}. Use the run's own flags (meta.json), or start a new run "
                         f"(--overwrite / another --out)")
    return path, meta


def restore_trainer_state(path: Path, model, optimizer, scheduler, device, rank: int = 0) -> dict:
    """Load checkpoint `path`'s optimizer, scheduler and RNG states in place; returns trainer_state.pt (its step,
    bad_steps, ...). The weights themselves are the HF folder, loaded like any checkpoint."""
    state = torch.load(path / "trainer_state.pt", map_location=device, weights_only=False)
    if state["optimizer"] is None:  # saved sharded (--parallel fsdp); DCP reshards for another process count
        parallel.load_optimizer(model, optimizer, path / "optimizer")
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state, rank)
    return state


class MetricsLog:
    """out/metrics.jsonl, one JSON record per line, written by rank 0 only. A resumed run first drops the lines
    after its checkpoint's step (a crashed run's tail), so that the file reads as one uninterrupted run."""

    def __init__(self, out: Path, start_step: int, rank: int):
        self.path, self.rank = out / "metrics.jsonl", rank
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if self.path.exists():  # keep lines up to the resume point, drop a crashed run's tail
                kept = [l for l in self.path.read_text().splitlines() if json.loads(l).get("step", 0) <= start_step]
                self.path.write_text("".join(l + "\n" for l in kept))

    def write(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def progress_interval() -> float:
    """Seconds between two progress lines in a log file: $TOPD_PROGRESS_EVERY, default 30."""
    return float(os.environ.get("TOPD_PROGRESS_EVERY", "") or 30.0)


class Progress:
    """A long loop's progress, wherever its output goes. On a terminal: a tqdm bar. Otherwise (torchrun's output in
    a cluster log, `| tee`, nohup), where tqdm is off: a plain line at least every progress_interval() seconds and at
    the end, `desc: done/total | rate/s | key value ...`, so a slow build is never mistaken for a hang.

        progress = Progress(1500, "teacher SFT", unit="step")
        for step in ...:
            progress.update(loss=f"{loss:.3f}")
        progress.close()
    """

    def __init__(self, total: int, desc: str, unit: str = "step", log=None):
        import sys

        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.log = log or (lambda line: print(line, flush=True))
        self.every, self.start = progress_interval(), time.time()
        self.last = self.start
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
        else:
            self.log(f"{desc}: started ({total} {unit}s at most)")

    def update(self, n: int = 1, **status) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if status:
                self.bar.set_postfix(status, refresh=False)
        elif time.time() - self.last >= self.every:
            self._line(status)

    def _line(self, status: dict, final: bool = False) -> None:
        elapsed = time.time() - self.start
        self.last = time.time()
        self.log(f"{self.desc}: {self.done}/{self.total} {self.unit}s{' (done)' if final else ''} | "
                 f"{self.done / max(elapsed, 1e-9):.2f} {self.unit}s/s | {elapsed:.0f} s"
                 + "".join(f" | {k} {v}" for k, v in status.items()))

    def close(self, **status) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(status, final=True)


class Clock:
    """Wall time per phase of a step; time spent in a nested phase is not counted in the enclosing one."""

    def __init__(self):
        self.start, self.times, self.open = time.time(), dict.fromkeys(("sample", "teacher", "probe", "train"), 0.0), []

    @contextlib.contextmanager
    def __call__(self, name: str):
        now = time.time()
        if self.open:  # pause the enclosing phase
            self.times[self.open[-1][0]] += now - self.open[-1][1]
        self.open.append([name, now])
        try:
            yield
        finally:
            now = time.time()
            phase, since = self.open.pop()
            self.times[phase] += now - since
            if self.open:
                self.open[-1][1] = now


class ForwardTokens:
    """Counts the tokens that go through a model's forward passes (the size of input_ids: prompts, padding and each
    cached decoding step's one token per row included), from a forward pre-hook on the module, so every call site
    is covered: sampling, scoring, the probe, the guidance windows. train.py logs it per step as
    compute/student_tokens and compute/teacher_tokens: a measure of a step's cost that, unlike wall time, is the
    same on every machine (reproduce.py's opd_equal_compute row is sized by it)."""

    def __init__(self, model: torch.nn.Module):
        # A tensor on the model's device, not a Python int. Compiled decoding (sample.py) traces this hook inside its
        # one-token step, and torch.compile treats a module's int attributes as constants: an int counter recompiled
        # the step at every token until dynamo's cache limit, then fell back to eager behind 64 failing guard
        # checks per token (measured: the toy step's sampling 2.4x slower than eager). An in-place add on a tensor is
        # one more op of the same graph; on CUDA its fixed address lets CUDA graphs replay it.
        device = next(model.parameters()).device
        self.count = torch.zeros((), dtype=torch.long, device=device)
        if device.type == "cuda":
            torch._dynamo.mark_static_address(self.count)
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.count.add_(ids.numel() if ids is not None else kwargs["inputs_embeds"].shape[:-1].numel())

    def take(self) -> int:
        """The count since the last take(), and restart from zero (one host sync per call)."""
        count = int(self.count)
        self.count.zero_()
        return count


def step_line(m: dict, total_steps: int) -> str:
    """The one line train.py prints per step, from that step's metrics."""
    line = f"step {m['step']}/{total_steps} | loss {m['opd/loss']:.4f} | kl {m['opd/teacher_kl']:.4f}"
    if "topd/nondiv_frac" in m:
        line += f" | nondiv {m['topd/nondiv_frac']:.2f}"
    if "guide/loss" in m:
        line += f" | guide {m['guide/loss']:.3f}"
    return line + (f" | len {m['rollout/len_mean']:.1f} | trunc {m['rollout/truncated_frac']:.2f} | gn "
                   f"{m['grad_norm']:.2f} | lr {m['lr']:.1e} | tok/s {m['tokens_per_s']:.0f} | "
                   f"{m['time/step'] * 1000:.0f}ms")


def rng_state() -> dict:
    """This process's global RNG states: the CPU generator's, and the current CUDA device's when there is one.
    (Sampling uses seeded generators of its own; dropout and library code use these.)"""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def restore_rng(state: dict, rank: int = 0, warn=print) -> None:
    """Give rank `rank` back the global RNG states IT had when the checkpoint was saved (trainer_state.pt's "rng",
    one entry per rank): each rank's own, not rank 0's on every rank, and only its own CUDA device's, so a run
    resumed on fewer GPUs than it was saved from restores as well. A rank the checkpoint did not have (the run now
    has more processes) keeps its fresh state. Checkpoints from before per-rank states hold rank 0's CPU state."""
    states = state.get("rng") or [{"torch": state["torch_rng"], "cuda": None}]
    if rank >= len(states):
        warn(f"rank {rank}: the checkpoint holds the RNG states of {len(states)} rank(s); this rank keeps its own")
        return
    mine = states[rank]
    torch.set_rng_state(mine["torch"].cpu())
    if mine.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"].cpu())


def all_gather_checksum(model, world: int) -> list[float]:
    """Sum of all parameters on every rank: DDP ranks must hold identical weights; a mismatch is a desync bug."""
    local = sum(float(p.detach().double().sum()) for p in model.parameters())
    sums = [values[0] for values in parallel.all_gather_numbers([local])] if world > 1 else [local]
    if len(set(sums)) != 1:
        raise RuntimeError(f"ranks hold different weights (parameter sums {sums}): DDP desynchronised")
    return sums
