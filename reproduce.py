"""
reproduce.py -- the paper's table on the controlled testbed: modes x detectors x seeds, with ground truth.

The paper claims (abstract, Qwen3 on AIME) that
  (1) about 30% of high-loss tokens are low-divergence, surface-form mismatches;
  (2) suppressing them improves OPD a little   (47.8 -> 48.2 average accuracy);
  (3) TOPD's near-future guidance improves it a lot (-> 52.2).
Real-scale runs need GPUs and weights we do not have here. The toy world (toy.py) lets us test the same claims
where the truth is known: which tokens are style, which are errors.

What this script does, all from the same toy student and teacher:
  * runs train.py for opd, opd_suppress and topd, each detector (window, probe), guidance without suppression
    (guide_only) and opd at equal compute (opd_equal_compute: as many student forward tokens as topd + probe, or
    as the row named by --equal-compute-to), over several seeds (ROWS);
  * evaluates every final checkpoint on the held-out toy prompts (train.py's eval = eval_aime.evaluate);
  * writes results.md / results.json (held-out accuracy mean and std per row, teacher and student baselines,
    training time and student forward tokens per run), detector.json (toy.detector_report: the label mix of the high-loss candidates, the
    non-divergent fraction, precision / recall of "divergent" for real forks), curves.csv (accuracy and teacher
    KL per step and run) and curves.png when matplotlib is installed.
Every run lives in its own folder under --out; a rerun skips the runs that already finished. --jobs N runs N
train.py processes at once, each with --threads torch threads (default: $OMP_NUM_THREADS when set, else the cores
shared out, at least 1): on the 2-core machine the README's long-world numbers come from --jobs 2, i.e. 1 thread
per run.

Commands:
    python reproduce.py                 # the full table: 3 seeds x 8 rows on the default world
    python reproduce.py --smoke         # 1 seed, a few steps on the --fast world: checks the pipeline (CI)
    python reproduce.py --long --seeds 3 4 5 6 7 --jobs 2   # the long world (toy.LONG), the held-out seeds
    python reproduce.py --long --sweep --seeds 0 1 2   # sensitivity of topd to tau, H and lambda (SWEEP)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent
ROWS = [("opd", "-"), ("opd_suppress", "window"), ("opd_suppress", "probe"), ("topd", "window"), ("topd", "probe"),
        ("guide_only", "window"), ("guide_only", "probe"), ("guide_only", "random"), ("opd_equal_compute", "-")]
# A row's train.py flags. Two rows are not train.py modes of their own:
#   guide_only          TOPD's guidance with nothing suppressed (topd, --suppress-weight 1): with topd, it separates
#                       what suppression does from what guidance does; guide_only:random (--detector random) is its
#                       control: as many teacher-sampled windows as the window detector finds, at random states,
#                       which tells "detecting the forks helps" from "more teacher samples help";
#   opd_equal_compute   plain OPD given the compute of topd + probe (or of the row --equal-compute-to names) on the
#                       same seed: its steps scale by the student
#                       forward tokens of that run over opd's (train.py's compute/student_tokens: sampling, scoring,
#                       probe and guidance forwards, padding included), a count that is the same on every machine,
#                       where wall time depends on the machine and on what else runs on it (the table also gives
#                       the ratio of the two runs' step times). A method that costs 2-3x per step has to beat the
#                       baseline given the same budget to matter to a user.
ROW_FLAGS = {"opd": ["--mode", "opd"], "opd_suppress": ["--mode", "opd_suppress"], "topd": ["--mode", "topd"],
             "guide_only": ["--mode", "topd", "--suppress-weight", "1"], "opd_equal_compute": ["--mode", "opd"]}


# The worlds the tables in docs/results.md were made on, by toy.world_hash (the sha256 of the built weights). A world
# built on another CPU, torch version or thread count can differ (float sums round differently: the long world rebuilt
# at another thread count stopped its teacher 250 steps earlier); its numbers are then not the tables' numbers, and
# every run of this script says so loudly (and in results.md).
# The long world of the recipe-and-seeds study (built with `OMP_NUM_THREADS=1 python toy.py --long`, torch 2.13 CPU:
# teacher 98.0% after 2,250 SFT steps, student 47.0%). The collapse-recipe tables of docs/results.md predate the hash
# and were made on an earlier build (teacher 99.8%, student 47.8%).
# The long-80 world (docs/results.md, "The collapse"): the long world's teacher and a student variant writing 80% of
# its steps in its own style (built with `OMP_NUM_THREADS=1 python toy.py --long --out runs/toy-long-80 --teacher-from
# runs/toy-long --student-variant student_swap_rate=0.8 student_other_sep_rate=0.2`: student 45.0%). Two builds: the
# one the lr grid ran on (from the 98.0% teacher above; its machine and weights are gone), and the one shipped in
# data/toy-long-80 (another machine: teacher 99.8%), on which every fresh seed ran.
TABLE_WORLDS = {"long": "e34b1a378956c88a", "long-80": "79397789dfa86a96", "long-80 grid build": "6d78870bb0a4f644",
                "default": None}


def world_check(world: Path, kind: str) -> str:
    """One line on the world's identity: its hash, and a loud WARNING when it is not the world the tables used."""
    import toy

    found = toy.world_hash(world)
    if kind == "given":  # --world: whichever table world it is, if any
        named = [name for name, h in TABLE_WORLDS.items() if h == found]
        return f"World {world} (hash {found}" + (f", the tables' {named[0]} world)." if named else
                                                 ": not a world the tables in docs/results.md were made on).")
    expected = TABLE_WORLDS.get(kind)
    if expected is None or found == expected:
        return f"World {world} (hash {found}" + (", the tables' world)." if expected else ").")
    return (f"WARNING: world {world} has hash {found}, not {expected}, the {kind} world the tables in docs/results.md "
            "were made on (another CPU, torch version or thread count builds another world): these numbers are not "
            "comparable with the tables' numbers. Build it with 1 thread (OMP_NUM_THREADS=1 python toy.py "
            f"{'--long' if kind == 'long' else ''}) on torch 2.13 CPU to get that world.")


def world_build(world: Path, args) -> dict:
    """The world's build.json, building the world first when it is missing. A --world that was built before is used
    as it is, whatever its config (a student variant, say): toy.build would rebuild a world whose config is not the
    one the flags name, and an hour's build is not something to lose to a forgotten --long."""
    import toy

    if args.world and (world / "build.json").exists():
        return json.loads((world / "build.json").read_text())
    return toy.build(world, toy.ToyConfig(**toy.FAST) if args.smoke else toy.ToyConfig(**toy.LONG) if args.long
                     else toy.ToyConfig())


def run_one(world: Path, out: Path, row: str, detector: str, seed: int, args, steps: int, extra=()) -> dict:
    """One train.py run in its own folder (skipped when its results.json exists; an error when that run has another
    number of steps). Returns its summary."""
    import toy

    done = out / "results.json"
    if not done.exists():
        # --toy-dir: train.py's toy-world job on this world, with the toy's training defaults (toy.train_defaults:
        # the world's own response cap)
        cmd = [sys.executable, str(ROOT / "train.py"), "--toy-dir", str(world), *ROW_FLAGS[row], "--seed", str(seed),
               "--steps", str(steps), "--eval-every", str(args.eval_every), "--out", str(out),
               "--rollout-batch", str(args.rollout_batch), "--horizon", str(args.horizon), "--overwrite",
               "--max-new-tokens", str(toy.train_defaults(world)["max_new_tokens"]),
               *args.train_args, *extra]  # --overwrite: an unfinished run (no results.json) starts again
        if detector != "-":
            cmd += ["--detector", detector]
        # The thread count is always given explicitly (--threads, else the caller's OMP_NUM_THREADS, else a share of
        # the cores; parse_args): float sums differ between thread counts, so a run's numbers are reproducible only
        # with its count, which time.json keeps next to the wall time it explains.
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"run failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        (out / "time.json").write_text(json.dumps({"seconds": time.time() - t0, "threads": args.threads,
                                                   "jobs": args.jobs}))
    res = json.loads(done.read_text())
    if res["config"]["steps"] != steps:  # a resumed table must not mix budgets silently
        raise RuntimeError(f"{out} holds a finished run of {res['config']['steps']} steps, not {steps}: give another "
                           "--out, or delete that folder to run it again")
    res["seconds"] = json.loads((out / "time.json").read_text())["seconds"]
    res["steps"] = res["config"]["steps"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    res["student_tokens"] = sum(m.get("compute/student_tokens", 0) for m in metrics)  # the run's compute
    res["step_seconds"] = sum(m.get("time/step", 0) for m in metrics)  # its wall time without the evaluations
    return res


# Sensitivity: topd with ONE knob moved from its default at a time, under both detectors, on the tuning seeds. The
# threshold is swept on the absolute rule, in D's units, which differ between the detectors: the window's D is a
# mean future loss, the probe's a teacher-student margin. The grid is set for the long world (the regime the sweep is
# for), from the undistilled student's mean D before a style token and before an error (toy.py --long --report):
# window 1.26 / 2.43, so 1.0 (below both means), 1.8 (between them), 3.0 (above both); probe 7.94 / 8.09,
# so 6, 8, 10 (below, between, above). H and lambda move on the default (relative) rule.
SWEEP = {"div_threshold": {"window": [1.0, 1.8, 3.0], "probe": [6.0, 8.0, 10.0]},
         "horizon": {"window": [4, 8, 16], "probe": [4, 8, 16]},
         "guide_weight": {"window": [0.25, 1.0, 4.0], "probe": [0.25, 1.0, 4.0]}}


def run_jobs(world: Path, args, jobs: list[dict], follow_up=None) -> dict:
    """Runs every job (a dict with key, path, row, detector, seed, steps and optionally flags) through run_one,
    --jobs at a time, and returns {key: run_one's summary, with the run's folder as "path"}.

    follow_up(results) -> more jobs, called after each run ends: a job whose steps depend on other runs
    (opd_equal_compute's, from its seed's opd and target tokens) is submitted as soon as those are done, not after
    the whole table. On the first failure no further job starts, the running ones end, and the error is raised:
    every finished run stays on disk, and the next call resumes from there.
    Example: jobs [opd seed 0, topd seed 0], --jobs 2 -> both start at once; follow_up then adds opd_equal_compute
    seed 0 when the second one ends."""
    results, t_start = {}, time.time()

    def start(job):
        state = "read (finished)" if (job["path"] / "results.json").exists() else "start"
        print(f"[{time.time() - t_start:6.0f}s] {state} {job['path'].name} ({job['steps']} steps)", flush=True)
        return {**run_one(world, job["path"], job["row"], job["detector"], job["seed"], args, job["steps"],
                          job.get("flags", ())), "path": job["path"]}

    # Jobs are handed to the pool only when a slot is free, so that after a failure nothing new starts.
    queue, running = list(jobs), {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait: each run is its own process
        while queue or running:
            while queue and len(running) < args.jobs:
                job = queue.pop(0)
                running[pool.submit(start, job)] = job
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                results[running.pop(future)["key"]] = future.result()  # a failed run raises here
            queue[:0] = follow_up(results) if follow_up else []  # ready now: ahead of the queue
    return results


def table_jobs(out: Path, args) -> tuple[list[dict], Callable[[dict], list[dict]]]:
    """The table's runs: every selected row but opd_equal_compute on every seed (seed-major, in ROWS order), and the
    follow_up (see run_jobs) that adds a seed's opd_equal_compute once its opd and --equal-compute-to runs are done.
    opd_equal_compute gets max(steps, round(steps * target tokens / opd tokens)) steps: the same student forward
    tokens as the target row on that seed, in whole steps, never fewer than the table's."""
    def job(mode, detector, seed, steps, path=None):
        return {"key": (mode, detector, seed), "row": mode, "detector": detector, "seed": seed, "steps": steps,
                "path": path or out / f"{mode}-{detector.replace('-', 'none')}-seed{seed}"}

    rows = sorted(args.selected, key=ROWS.index)
    jobs = [job(mode, detector, seed, args.steps) for seed in args.seeds for mode, detector in rows
            if mode != "opd_equal_compute"]
    waiting = [seed for seed in args.seeds if ("opd_equal_compute", "-") in rows]

    def follow_up(results):
        new = []
        for seed in [s for s in waiting if {("opd", "-", s), (*args.equal_compute_to, s)} <= set(results)]:
            waiting.remove(seed)
            target, opd = results[(*args.equal_compute_to, seed)], results[("opd", "-", seed)]
            steps = max(args.steps, round(args.steps * target["student_tokens"] / opd["student_tokens"]))
            path = None
            if args.equal_compute_to != ("topd", "probe"):  # its own folder: another budget, another run
                path = out / f"opd_equal_compute-to-{'-'.join(args.equal_compute_to)}-seed{seed}"
            new.append(job("opd_equal_compute", "-", seed, steps, path))
        return new

    return jobs, follow_up


def sweep_jobs(out: Path, args) -> list[dict]:
    """The sweep's runs in order: per seed, opd (the reference line), then every SWEEP point x detector. Each job is
    {point: its row of sweep.csv without the accuracy, path, row, detector, seed, flags, steps, key} for run_jobs
    (key: the run's folder, so that two points sharing a run share its result).

    The probe's points run on --probe-seeds (default: the same seeds) and for --probe-knobs (default: every knob): a
    probe run costs about 2.5x a window run.
    A point whose value is the knob's default on the default rule (H = --horizon, lambda = TrainConfig's) is one
    run, `sweep-default-<detector>-seed<s>`, shared by the knobs' lines."""
    from train import TrainConfig

    defaults = {"horizon": args.horizon, "guide_weight": TrainConfig.guide_weight}
    jobs = []
    for seed in args.seeds:
        jobs.append({"point": {"knob": "-", "value": "", "detector": "opd", "seed": seed},
                     "path": out / f"opd-none-seed{seed}", "row": "opd", "detector": "-", "seed": seed, "flags": [],
                     "steps": args.steps, "key": out / f"opd-none-seed{seed}"})
        for knob, grid in SWEEP.items():
            for detector, values in grid.items():
                if detector == "probe" and (seed not in args.probe_seeds or knob not in args.probe_knobs):
                    continue
                for value in values:
                    flags = [f"--{knob.replace('_', '-')}", str(value)]
                    if knob == "div_threshold":
                        flags += ["--div-rule", "absolute"]
                    name = "default" if defaults.get(knob) == value else f"{knob}{value}"
                    path = out / f"sweep-{name}-{detector}-seed{seed}"
                    jobs.append({"point": {"knob": knob, "value": value, "detector": detector, "seed": seed},
                                 "path": path, "row": "topd", "detector": detector, "seed": seed, "flags": flags,
                                 "steps": args.steps, "key": path})
    return jobs


def sweep(world: Path, out: Path, args) -> list[dict]:
    """Every job of sweep_jobs, then sweep.csv, sweep.md and sweep.png (accuracy vs knob, one line per detector, the
    seeds' min-max as a band). Resumable like the table: finished runs are read, not rerun."""
    jobs = sweep_jobs(out, args)
    unique = list({job["key"]: job for job in jobs}.values())  # a default point shared by two knobs runs once
    results = run_jobs(world, args, unique)
    points = [{**job["point"], "accuracy": results[job["key"]]["accuracy_after"]} for job in jobs]
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)
    lines = sweep_markdown(points, args)
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    plot_sweep(points, out / "sweep.png")
    print("\n".join(lines))
    return points


def sweep_markdown(points: list[dict], args) -> list[str]:
    """sweep.md's lines: opd's mean, then one table row per (knob, value, detector) that ran, over its seeds."""
    opd = [p["accuracy"] for p in points if p["knob"] == "-"]
    lines = [f"Sensitivity of topd ({args.steps} steps; window on seeds {args.seeds}, probe on seeds "
             f"{args.probe_seeds} for {', '.join(args.probe_knobs)}); opd on seeds {args.seeds}: "
             f"{statistics.fmean(opd):.1%} ± {statistics.pstdev(opd):.1%}.", "",
             "| knob | value | detector | accuracy (mean ± std) | per seed |", "|---|---|---|---|---|"]
    for knob, grid in SWEEP.items():
        for detector, values in grid.items():
            for value in values:
                accs = [p["accuracy"] for p in points if (p["knob"], p["value"], p["detector"]) == (knob, value, detector)]
                if not accs:  # a probe knob left out by --probe-knobs
                    continue
                lines.append(f"| {knob} | {value} | {detector} | {statistics.fmean(accs):.1%} ± "
                             f"{statistics.pstdev(accs):.1%} | {' / '.join(f'{a:.1%}' for a in accs)} |")
    return lines


def style_curve(world: Path, run_dir: Path, num_prompts: int = 400) -> list[dict]:
    """What a run's student does over its checkpoints (train.py --save-every N --keep-checkpoints large): per
    checkpoint, greedy held-out accuracy and the shares of its style choices (toy.style_report: "," separators and
    "b+acc" additions, 1.0 = the long world student's own style, 0.0 = the teacher's), with the step's teacher KL,
    gradient norm and learning rate from metrics.jsonl. The collapse study reads the style transition off it."""
    import sample
    import toy

    metrics = {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "opd/teacher_kl" in m}
    rows = toy.read_jsonl(world / "test.jsonl")[:num_prompts]
    cap = toy.train_defaults(world)["max_new_tokens"]
    curve = []
    for ckpt in [world / "student"] + sorted(run_dir.glob("ckpt-*")):
        step = int(ckpt.name.split("-")[1]) if ckpt.name.startswith("ckpt-") else 0
        model, tok = sample.load_policy(str(ckpt))
        m = metrics.get(step, {})
        curve.append({"step": step, **toy.style_report(model, tok, rows, cap),
                      **{k: m.get(key) for k, key in (("teacher_kl", "opd/teacher_kl"), ("grad_norm", "grad_norm"),
                                                       ("lr", "lr"))}})
    return curve


def teacher_on_student_prefixes(world: Path, num_prompts: int = 400) -> dict:
    """Does the teacher cope with the student's style? The undistilled student's greedy held-out responses, cut
    after a correct first step written in its own style (separator included), are continued greedily by the
    teacher: its accuracy from those prefixes, next to its accuracy from the bare prompts of the same problems and
    the student's own. A teacher that broke down after the student's style would teach the student garbage from
    every state OPD visits."""
    import torch

    import eval_aime
    import sample
    import toy

    rows = toy.read_jsonl(world / "test.jsonl")[:num_prompts]
    cap = toy.train_defaults(world)["max_new_tokens"]
    student, tok = sample.load_policy(str(world / "student"))
    teacher, _ = sample.load_policy(str(world / "teacher"))
    greedy = sample.SamplingConfig(temperature=0.0, max_new_tokens=cap)
    _, records = eval_aime.evaluate(student, tok, toy.as_problems(rows), k=1, sampling=greedy,
                                    batch_size=toy.EVAL_BATCH, instruction=False, chat_template=False,
                                    integer_range=None)
    prefixes, kept = [], []
    for record in records:
        i, text = int(record["id"]), record["response"]
        first = next(toy.STEP.finditer(text), None)
        problem = toy.parse_prompt(rows[i]["prompt"])
        if first is None or first.start() != 0 or len(problem.operands) < 3:
            continue
        _, error = toy.label_tokens(problem, list(text[:first.end()]))
        if error is None and text[first.end() - 1] == toy.STUDENT_SEP:  # a correct first step, the student's ","
            prefixes.append(rows[i]["prompt"] + text[:first.end()])
            kept.append(i)
    ids, _ = sample.encode_prompts(tok, prefixes)
    with torch.no_grad():
        ro = sample.sample_rollouts(teacher, ids, sampling=greedy, eos_ids=[toy.EOS_ID], pad_id=toy.PAD_ID,
                                    generator=sample.make_generator(0, device="cpu"))
    right = sum(eval_aime.is_correct(eval_aime.extract_answer(tok.decode(
        ro.response_ids[b][ro.response_mask[b].bool()], skip_special_tokens=True)), rows[i]["answer"], None)
        for b, i in enumerate(kept))
    return {"prefixes": len(kept), "teacher_from_student_prefixes": right / max(len(kept), 1),
            "teacher_from_prompt": toy.accuracy(teacher, tok, [rows[i] for i in kept], max_new_tokens=cap),
            "student": sum(records[i]["correct"] for i in kept) / max(len(kept), 1)}


def style_curve_markdown(name: str, curve: list[dict]) -> list[str]:
    lines = [f"{name}:", "", "| step | accuracy | \",\" share | \"b+acc\" share | \"acc+acc\" share | teacher KL | "
             "grad norm | lr |", "|---|---|---|---|---|---|---|---|"]
    for c in curve:
        def num(key, fmt):
            return "-" if c.get(key) is None else format(c[key], fmt)
        lines.append(f"| {c['step']} | {c['accuracy']:.1%} | {c['comma_share']:.2f} | {c['swap_share']:.2f} | "
                     f"{c['copied_share']:.2f} | "
                     f"{num('teacher_kl', '.3f')} | {num('grad_norm', '.2f')} | {num('lr', '.1e')} |")
    return lines


def pyplot():
    """matplotlib.pyplot on the file-only backend, or None when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_sweep(points: list[dict], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(SWEEP), figsize=(4.2 * len(SWEEP), 3.6), squeeze=False)
    axes = axes[0]  # one panel per knob, also when SWEEP has one
    opd = [p["accuracy"] for p in points if p["knob"] == "-"]
    for ax, (knob, grid) in zip(axes, SWEEP.items()):
        for detector, values in grid.items():
            accs = [[p["accuracy"] for p in points if (p["knob"], p["value"], p["detector"]) == (knob, v, detector)]
                    for v in values]
            if not all(accs):  # a probe knob left out by --probe-knobs
                continue
            ax.plot(values, [statistics.fmean(a) for a in accs], marker="o", label=f"topd ({detector})")
            ax.fill_between(values, [min(a) for a in accs], [max(a) for a in accs], alpha=0.2)
        ax.axhspan(min(opd), max(opd), color="grey", alpha=0.2)
        ax.axhline(statistics.fmean(opd), color="grey", ls="--", label="opd (seed range shaded)")
        ax.set(xscale="log", xlabel={"div_threshold": "tau (absolute rule)", "horizon": "H",
                                     "guide_weight": "lambda"}[knob], ylabel="held-out accuracy")
        ticks = sorted({v for values in grid.values() for v in values})  # the grid's values, not log-scale clutter
        ax.minorticks_off()
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def curves(run_dirs: dict) -> list[dict]:
    """Per-step rows (accuracy where evaluated, teacher KL every step) of every run, from its metrics.jsonl."""
    rows = []
    for (mode, detector, seed), path in run_dirs.items():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            rows.append({"mode": mode, "detector": detector, "seed": seed, "step": m["step"],
                         "accuracy": m.get("eval/accuracy", ""), "teacher_kl": m.get("opd/teacher_kl", ""),
                         "nondiv_frac": m.get("topd/nondiv_frac", "")})
    return rows


# Student's t, two-sided 95%: the 0.975 quantile for 1-30 degrees of freedom (enough for the seed counts used here;
# more seeds than 31 fall back to the normal's 1.96, within 4% of the t quantile from 30 on).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def paired_difference(a: list[float], b: list[float]) -> dict:
    """a - b seed by seed (both lists in the same seed order): the mean difference, its 95% interval from the
    paired t (mean +- t * sd / sqrt(n), sd the sample std of the differences), and the sign count. The claim
    "a beats b" stands only if the interval's low end is above 0.
    Example: a = [0.5, 0.6, 0.7], b = [0.4, 0.4, 0.6] -> differences 0.1, 0.2, 0.1: mean 0.133, sd 0.0577,
    t(2) = 4.303, interval 0.133 +- 0.143 = [-0.010, 0.277], wins 3 of 3."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired difference needs two equal lists of at least 2 seeds, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = (T975[len(diffs) - 2] if len(diffs) - 1 <= len(T975) else 1.96) * sd / math.sqrt(len(diffs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "wins": sum(d > 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs), "n": len(diffs)}


def paired_lines(table: list[dict], equal_compute_to: tuple) -> list[str]:
    """results.md's paired table: every row minus opd, the equal-compute target minus opd_equal_compute (the same
    student forward tokens), and guidance at the detector's states minus the random control, seed by seed."""
    by_row = {(row["mode"], row["detector"]): row for row in table}
    pairs = [(row, by_row[("opd", "-")]) for row in table if ("opd", "-") in by_row and row["mode"] != "opd"]
    if ("opd_equal_compute", "-") in by_row and equal_compute_to in by_row:
        pairs.append((by_row[equal_compute_to], by_row[("opd_equal_compute", "-")]))
    if ("guide_only", "random") in by_row and ("guide_only", "window") in by_row:
        pairs.append((by_row[("guide_only", "window")], by_row[("guide_only", "random")]))
    name = lambda r: r["mode"] + ("" if r["detector"] == "-" else ":" + r["detector"])  # noqa: E731
    lines = ["", "Paired per-seed differences (95% paired-t interval; a claim stands only if it excludes 0):", "",
             "| difference | mean | 95% interval | seeds ahead / behind |", "|---|---|---|---|"]
    for a, b in pairs:
        d = paired_difference(a["accuracy_runs"], b["accuracy_runs"])
        lines.append(f"| {name(a)} - {name(b)} | {d['mean']:+.1%} | [{d['low']:+.1%}, {d['high']:+.1%}] | "
                     f"{d['wins']} / {d['losses']} of {d['n']} |")
    return lines


def largest_fall(run_dir: Path) -> float:
    """How far the run's held-out accuracy ever fell below its step-0 value (0 if it never did): the recipe rule's
    stability test (a run is stable when this stays under 10 points)."""
    accs = [m["eval/accuracy"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "eval/accuracy" in m]
    return max(0.0, accs[0] - min(accs)) if accs else 0.0


def mean_curve(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The mean over seeds of `key` per step, at the steps where EVERY seed has a value. Runs of different lengths
    (opd_equal_compute's steps differ per seed) end at different steps; a mean over whichever seeds got there would
    draw one seed's value as the row's.
    Example: seed 0 at steps 0, 50, 307 and seed 1 at 0, 50, 312 -> steps [0, 50]."""
    seeds = {r["seed"] for r in rows}
    pts = {}
    for r in rows:
        if r[key] != "":
            pts.setdefault(r["step"], []).append(r[key])
    steps = sorted(s for s, values in pts.items() if len(values) == len(seeds))
    return steps, [statistics.fmean(pts[s]) for s in steps]


def plot(rows: list[dict], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, detector in sorted({(r["mode"], r["detector"]) for r in rows}, key=ROWS.index):
        label = mode if detector == "-" else f"{mode} ({detector})"
        mine = [r for r in rows if r["mode"] == mode and r["detector"] == detector]
        for key, ax in (("accuracy", ax_acc), ("teacher_kl", ax_kl)):
            steps, means = mean_curve(mine, key)
            ax.plot(steps, means, label=label, marker="o" if key == "accuracy" else None)
    ax_acc.set(xlabel="step", ylabel="held-out accuracy (mean over seeds)")
    ax_kl.set(xlabel="step", ylabel="teacher KL per token (mean over seeds)", yscale="log")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked, with --smoke's settings applied and args.selected (the rows as (mode, detector))."""
    p = argparse.ArgumentParser(description="the paper's table on the toy testbed")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--world", default=None, help="toy world folder (default runs/toy, --long: runs/toy-long; "
                   "--smoke: <out>/toy-fast)")
    p.add_argument("--long", action="store_true", help="the long world (toy.LONG), built if missing")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--rollout-batch", type=int, default=64)
    p.add_argument("--horizon", type=int, default=8, help="the toy world's horizon (toy.TRAIN_DEFAULTS)")
    p.add_argument("--report-prompts", type=int, default=200, help="rollouts for the detector report")
    p.add_argument("--rows", nargs="+", default=None, help="a subset of rows as mode:detector, e.g. topd:probe")
    p.add_argument("--equal-compute-to", default="topd:probe", help="the row whose student forward tokens per seed "
                   "opd_equal_compute is given (default topd:probe, the dearest one)")
    p.add_argument("--jobs", type=int, default=1, help="train.py runs at once, each its own process (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: $OMP_NUM_THREADS when "
                   "set, else the machine's cores divided by --jobs, at least 1); results are reproducible for a "
                   "given thread count")
    p.add_argument("--smoke", action="store_true", help="1 seed, 4 steps, the --fast world: a pipeline check")
    p.add_argument("--sweep", action="store_true", help="the sensitivity sweep (SWEEP) instead of the table")
    p.add_argument("--probe-seeds", type=int, nargs="+", default=None, help="--sweep: run the probe's points only on "
                   "these seeds, a subset of --seeds (default: all of them; a probe run costs ~2.5x a window run)")
    p.add_argument("--probe-knobs", nargs="+", default=list(SWEEP), choices=list(SWEEP),
                   help="--sweep: the knobs swept under the probe (default: all of them)")
    p.add_argument("--curve", nargs="+", default=None, metavar="RUN_DIR", help="instead of running anything: the "
                   "style curve of finished runs (accuracy and style shares at each saved checkpoint, style_curve)")
    p.add_argument("train_args", nargs="*", help="extra train.py flags after --, e.g. -- --lr 5e-4")
    args = p.parse_args(argv)
    args.selected = ROWS if args.rows is None else [tuple(r.split(":")) for r in args.rows]
    if any(r not in ROWS for r in args.selected):
        p.error(f"--rows must be among {[f'{m}:{d}' for m, d in ROWS]}")
    args.equal_compute_to = tuple(args.equal_compute_to.split(":"))
    if args.equal_compute_to not in ROWS or args.equal_compute_to[0] in ("opd", "opd_equal_compute"):
        p.error("--equal-compute-to must be a TOPD-family row among --rows' choices, got "
                f"{':'.join(args.equal_compute_to)}")
    if ("opd_equal_compute", "-") in args.selected and not {("opd", "-"), args.equal_compute_to} <= set(args.selected):
        p.error(f"the opd_equal_compute row needs the opd:- and {':'.join(args.equal_compute_to)} rows (its steps "
                "come from their compute; --equal-compute-to names the second)")
    for flag in ("jobs", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    import toy

    # An OMP_NUM_THREADS the caller set is a choice, not something to override with a computed share
    args.threads = toy.thread_count(args.threads or 0, share=args.jobs)
    if args.smoke:
        args.seeds, args.steps, args.eval_every, args.rollout_batch, args.report_prompts = [0], 4, 2, 16, 32
        args.train_args = args.train_args + ["--eval-limit", "40", "--micro-batch", "16"]
    args.probe_seeds = args.seeds if args.probe_seeds is None else args.probe_seeds
    args.probe_knobs = list(dict.fromkeys(args.probe_knobs))  # a knob named twice is swept once
    if not set(args.probe_seeds) <= set(args.seeds):
        p.error(f"--probe-seeds {args.probe_seeds} must be among --seeds {args.seeds}")
    return args


def main(argv=None):
    args = parse_args(argv)
    selected = args.selected
    import toy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = Path(args.world or (out / "toy-fast" if args.smoke else "runs/toy-long" if args.long else "runs/toy"))
    build = world_build(world, args)
    identity = world_check(world, "given" if args.world else "long" if args.long else "fast" if args.smoke
                           else "default")
    print(identity, flush=True)
    if args.curve:
        lines = []
        for run_dir in map(Path, args.curve):
            lines += style_curve_markdown(str(run_dir), style_curve(world, run_dir)) + [""]
        (out / "style-curves.md").write_text("\n".join(lines))
        print("\n".join(lines))
        return {"curves": lines}
    t_start = time.time()
    if args.sweep:
        return {"sweep": sweep(world, out, args), "minutes_total": (time.time() - t_start) / 60}

    # --- the runs (resumable; --jobs at a time) ---
    jobs, follow_up = table_jobs(out, args)
    results = run_jobs(world, args, jobs, follow_up)
    run_dirs = {key: res["path"] for key, res in results.items()}

    # --- the table ---
    acc = build["accuracy"]
    table = []
    for mode, detector in selected:
        runs = [results[(mode, detector, s)] for s in args.seeds]
        after = [r["accuracy_after"] for r in runs]
        table.append({"mode": mode, "detector": detector, "accuracy_mean": statistics.fmean(after),
                      "accuracy_std": statistics.pstdev(after) if len(after) > 1 else 0.0, "accuracy_runs": after,
                      "accuracy_before": runs[0]["accuracy_before"], "steps": [r["steps"] for r in runs],
                      "minutes_per_run": statistics.fmean(r["seconds"] for r in runs) / 60,
                      "student_tokens": statistics.fmean(r["student_tokens"] for r in runs),
                      "step_seconds": statistics.fmean(r["step_seconds"] for r in runs),
                      "largest_fall": max(largest_fall(Path(r["path"])) for r in runs)})
    threshold = float(args.train_args[args.train_args.index("--div-threshold") + 1]) \
        if "--div-threshold" in args.train_args else None
    report = toy.detector_report(world, num_prompts=args.report_prompts, horizon=args.horizon, div_threshold=threshold)
    (out / "detector.json").write_text(json.dumps(report, indent=2))
    summary = {"world": str(world), "teacher_greedy": acc["teacher"]["greedy"], "student_greedy": acc["student"]["greedy"],
               "seeds": args.seeds, "steps": args.steps, "rollout_batch": args.rollout_batch, "horizon": args.horizon,
               "train_args": args.train_args, "rows": table, "minutes_total": (time.time() - t_start) / 60}
    (out / "results.json").write_text(json.dumps(summary, indent=2))

    lines = [f"Toy testbed: {len(args.seeds)} seed(s) {args.seeds}, {args.steps} steps x {args.rollout_batch} rollouts, "
             f"horizon {args.horizon}, greedy accuracy on {len(toy.read_jsonl(world / 'test.jsonl'))} held-out prompts.",
             "", "| method | detector | held-out accuracy (mean ± std) | per seed | steps | student forward tokens / run "
             "| minutes / run |", "|---|---|---|---|---|---|---|",
             f"| teacher | - | {acc['teacher']['greedy']:.1%} | - | - | - | - |",
             f"| student before distillation | - | {table[0]['accuracy_before']:.1%} | - | - | - | - |"]
    if args.train_args:
        lines[0] += f" Extra train.py flags: `{' '.join(args.train_args)}`."
    lines[1:1] = ["", identity]
    for row in table:
        runs = " / ".join(f"{a:.1%}" for a in row["accuracy_runs"])
        steps = "/".join(map(str, sorted(set(row["steps"]))))
        lines.append(f"| {row['mode']} | {row['detector']} | {row['accuracy_mean']:.1%} ± {row['accuracy_std']:.1%} | "
                     f"{runs} | {steps} | {row['student_tokens'] / 1e6:.2f}M | {row['minutes_per_run']:.1f} |")
    lines += ["", "Largest fall below the start along any seed's run (the recipe rule's stability test, stable under "
              "10 points): " + ", ".join(f"{r['mode']}{'' if r['detector'] == '-' else ':' + r['detector']} "
                                        f"{r['largest_fall']:.1%}" for r in table) + "."]
    by_row = {(row["mode"], row["detector"]): row for row in table}
    if len(args.seeds) > 1:
        lines += paired_lines(table, args.equal_compute_to)
    if args.equal_compute_to in by_row and ("opd", "-") in by_row:  # the two measures of compute, side by side
        target_row, opd_row = by_row[args.equal_compute_to], by_row[("opd", "-")]
        lines += ["", f"{' + '.join(args.equal_compute_to)} over opd, same steps: "
                  f"{target_row['student_tokens'] / opd_row['student_tokens']:.2f}x the student forward tokens (what "
                  f"opd_equal_compute's steps are sized by), {target_row['step_seconds'] / opd_row['step_seconds']:.2f}x "
                  f"the step time on this machine."]
    pct = lambda d: ", ".join(f"{k} {d[k]:.0%}" for k in ("surface", "correct", "error", "after_error"))  # noqa: E731
    lines += ["", f"Detector quality on {report['prompts']} rollouts of the undistilled student "
              f"(ground truth from toy.label_tokens):", "",
              f"- high-loss candidates ({report['candidates']['count']}): {pct(report['candidates'])}",
              f"- top 5% tokens by reverse KL: {pct(report['top5'])}"]
    for kind in ("surface", "error"):
        d = report["D_after"][kind]
        lines.append(f"- mean D right before every {kind} token (n={d['n']}): window {d['window']:.3f}, probe {d['probe']:.3f}")
    for name, d in report["detectors"].items():
        lines.append(f"- {name}: non-divergent {d['nondiv_frac']:.0%} of candidates; precision {d['precision']:.0%}, "
                     f"recall {d['recall']:.0%} for real forks; surface candidates flagged divergent "
                     f"{d['surface_flagged_divergent']:.0%}")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    rows = curves(run_dirs)
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png = plot(rows, out / "curves.png")
    print("\n".join(lines))
    if identity.startswith("WARNING"):
        print("\n" + identity)
    print(f"\nwrote {out}/results.md, results.json, detector.json, curves.csv" + (", curves.png" if png else
          " (no curves.png: pip install matplotlib)") + f" in {(time.time() - t_start) / 60:.1f} min")
    return summary


if __name__ == "__main__":
    main()
