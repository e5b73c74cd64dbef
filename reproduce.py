"""
reproduce.py -- the paper's table on the controlled testbed: modes x detectors x seeds, with ground truth.

The paper claims (abstract, Qwen3 on AIME) that
  (1) about 30% of high-loss tokens are low-divergence, surface-form mismatches;
  (2) suppressing them improves OPD a little   (47.8 -> 48.2 average accuracy);
  (3) TOPD's near-future guidance improves it a lot (-> 52.2).
Real-scale runs need GPUs and weights we do not have here. The toy world (toy.py) lets us test the same claims
where the truth is known: which tokens are style, which are errors.

What this script does, all from the same toy student and teacher:
  * runs train.py for opd, opd_suppress and topd, each detector (window, probe), over several seeds;
  * evaluates every final checkpoint on the held-out toy prompts (train.py's eval = eval_aime.evaluate);
  * writes results.md / results.json (held-out accuracy mean and std per row, teacher and student baselines,
    training time per run), detector.json (toy.detector_report: the label mix of the high-loss candidates, the
    non-divergent fraction, precision / recall of "divergent" for real forks), curves.csv (accuracy and teacher
    KL per step and run) and curves.png when matplotlib is installed.
Every run lives in its own folder under --out; a rerun skips the runs that already finished.

Commands:
    python reproduce.py                 # the full table: 3 seeds x 5 rows (about 40 minutes on 2 CPU cores)
    python reproduce.py --smoke         # 1 seed, a few steps on the --fast world: checks the pipeline (CI)
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ROWS = [("opd", "-"), ("opd_suppress", "window"), ("opd_suppress", "probe"), ("topd", "window"), ("topd", "probe")]


def run_one(world: Path, out: Path, mode: str, detector: str, seed: int, args) -> dict:
    """One train.py run in its own folder (skipped when its results.json exists). Returns its summary."""
    done = out / "results.json"
    if not done.exists():
        # --toy-dir: train.py's toy-world job on this world, with the toy's training defaults (toy.TRAIN_DEFAULTS)
        cmd = [sys.executable, str(ROOT / "train.py"), "--toy-dir", str(world), "--mode", mode, "--seed", str(seed),
               "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--out", str(out),
               "--rollout-batch", str(args.rollout_batch), "--horizon", str(args.horizon), "--overwrite",
               *args.train_args]  # --overwrite: an unfinished run (no results.json) starts again from scratch
        if detector != "-":
            cmd += ["--detector", detector]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"run failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        (out / "time.json").write_text(json.dumps({"seconds": time.time() - t0}))
    res = json.loads(done.read_text())
    res["seconds"] = json.loads((out / "time.json").read_text())["seconds"]
    return res


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


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, detector in sorted({(r["mode"], r["detector"]) for r in rows}, key=ROWS.index):
        label = mode if detector == "-" else f"{mode} ({detector})"
        mine = [r for r in rows if r["mode"] == mode and r["detector"] == detector]
        for key, ax in (("accuracy", ax_acc), ("teacher_kl", ax_kl)):
            pts = {}
            for r in mine:
                if r[key] != "":
                    pts.setdefault(r["step"], []).append(r[key])
            steps = sorted(pts)
            ax.plot(steps, [statistics.fmean(pts[s]) for s in steps], label=label, marker="o" if key == "accuracy" else None)
    ax_acc.set(xlabel="step", ylabel="held-out accuracy (mean over seeds)")
    ax_kl.set(xlabel="step", ylabel="teacher KL per token (mean over seeds)", yscale="log")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description="the paper's table on the toy testbed")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--world", default=None, help="toy world folder (default runs/toy; --smoke: <out>/toy-fast)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--rollout-batch", type=int, default=64)
    p.add_argument("--horizon", type=int, default=8, help="the toy world's horizon (toy.TRAIN_DEFAULTS)")
    p.add_argument("--report-prompts", type=int, default=200, help="rollouts for the detector report")
    p.add_argument("--rows", nargs="+", default=None, help="a subset of rows as mode:detector, e.g. topd:probe")
    p.add_argument("--smoke", action="store_true", help="1 seed, 4 steps, the --fast world: a pipeline check")
    p.add_argument("train_args", nargs="*", help="extra train.py flags after --, e.g. -- --lr 5e-4")
    args = p.parse_args(argv)
    selected = ROWS if args.rows is None else [tuple(r.split(":")) for r in args.rows]
    if any(r not in ROWS for r in selected):
        p.error(f"--rows must be among {[f'{m}:{d}' for m, d in ROWS]}")
    import toy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.seeds, args.steps, args.eval_every, args.rollout_batch, args.report_prompts = [0], 4, 2, 16, 32
        args.train_args = args.train_args + ["--eval-limit", "40", "--micro-batch", "16"]
    world = Path(args.world or (out / "toy-fast" if args.smoke else "runs/toy"))
    build = toy.build(world, toy.ToyConfig(**toy.FAST) if args.smoke else toy.ToyConfig())
    t_start = time.time()

    # --- the runs (resumable) ---
    results, run_dirs = {}, {}
    for seed in args.seeds:
        for mode, detector in selected:
            path = out / f"{mode}-{detector.replace('-', 'none')}-seed{seed}"
            print(f"[{time.time() - t_start:6.0f}s] {mode:12s} {detector:6s} seed {seed}", flush=True)
            results[(mode, detector, seed)] = run_one(world, path, mode, detector, seed, args)
            run_dirs[(mode, detector, seed)] = path

    # --- the table ---
    acc = build["accuracy"]
    table = []
    for mode, detector in selected:
        runs = [results[(mode, detector, s)] for s in args.seeds]
        after = [r["accuracy_after"] for r in runs]
        table.append({"mode": mode, "detector": detector, "accuracy_mean": statistics.fmean(after),
                      "accuracy_std": statistics.pstdev(after) if len(after) > 1 else 0.0, "accuracy_runs": after,
                      "accuracy_before": runs[0]["accuracy_before"],
                      "minutes_per_run": statistics.fmean(r["seconds"] for r in runs) / 60})
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
             "", "| method | detector | held-out accuracy (mean ± std) | per seed | minutes / run |", "|---|---|---|---|---|",
             f"| teacher | - | {acc['teacher']['greedy']:.1%} | - | - |",
             f"| student before distillation | - | {table[0]['accuracy_before']:.1%} | - | - |"]
    if args.train_args:
        lines[0] += f" Extra train.py flags: `{' '.join(args.train_args)}`."
    for row in table:
        runs = " / ".join(f"{a:.1%}" for a in row["accuracy_runs"])
        lines.append(f"| {row['mode']} | {row['detector']} | {row['accuracy_mean']:.1%} ± {row['accuracy_std']:.1%} | "
                     f"{runs} | {row['minutes_per_run']:.1f} |")
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
    print(f"\nwrote {out}/results.md, results.json, detector.json, curves.csv" + (", curves.png" if png else
          " (no curves.png: pip install matplotlib)") + f" in {(time.time() - t_start) / 60:.1f} min")
    return summary


if __name__ == "__main__":
    main()
