"""reproduce.py --smoke: the whole pipeline (8 rows, detector report, curves) runs and writes well-formed files."""

import csv
import json
import threading
import time

import pytest

import reproduce

# The pipeline tests train several tiny runs each; two at a time with one thread each keeps CI's two cores busy
TWO_LANES = ["--jobs", "2", "--threads", "1"]


def test_smoke_run_writes_the_table_and_files(fast_world, tmp_path):
    world, _ = fast_world
    out = tmp_path / "repro"
    # two runs side by side, one thread each: CI's two cores (and the equal-compute row must wait for its inputs)
    summary = reproduce.main(["--smoke", "--out", str(out), "--world", str(world), *TWO_LANES])
    rows = summary["rows"]
    assert [(r["mode"], r["detector"]) for r in rows] == reproduce.ROWS
    assert all(0.0 <= r["accuracy_mean"] <= 1.0 and len(r["accuracy_runs"]) == 1 for r in rows)
    md = (out / "results.md").read_text()
    assert md.count("\n| opd |") == 1 and md.count("| opd_suppress |") == 2 and md.count("| topd |") == 2
    assert md.count("| guide_only |") == 3 and md.count("| opd_equal_compute |") == 1
    # guidance without suppression is topd with suppress weight 1; equal compute runs at least the others' steps,
    # scaled by topd + probe's student forward tokens over opd's on the same seed (the probe costs forwards)
    config = json.loads((out / "guide_only-probe-seed0" / "results.json").read_text())["config"]
    assert config["mode"] == "topd" and config["suppress_weight"] == 1.0
    control = json.loads((out / "guide_only-random-seed0" / "results.json").read_text())["config"]
    assert control["detector"] == "random" and control["suppress_weight"] == 1.0
    eqc = next(r for r in rows if r["mode"] == "opd_equal_compute")
    tokens = {r["mode"] + r["detector"]: r["student_tokens"] for r in rows}
    assert tokens["topdprobe"] > tokens["opd-"] > 0
    assert eqc["steps"] == [max(4, round(4 * tokens["topdprobe"] / tokens["opd-"]))] and eqc["steps"][0] > 4
    assert eqc["student_tokens"] == pytest.approx(tokens["topdprobe"], rel=0.35)  # same budget, whole steps
    assert "x the student forward tokens" in md
    assert "precision" in md
    det = json.loads((out / "detector.json").read_text())
    assert abs(sum(det["candidates"][k] for k in ("surface", "correct", "error", "after_error")) - 1) < 1e-6
    with open(out / "curves.csv") as f:
        curve = list(csv.DictReader(f))
    assert {r["mode"] for r in curve} == {m for m, _ in reproduce.ROWS}
    assert max(int(r["step"]) for r in curve if r["mode"] != "opd_equal_compute") == 4
    # resumable: a second call reuses every finished run (no training happens, same numbers)
    again = reproduce.main(["--smoke", "--out", str(out), "--world", str(world), *TWO_LANES])
    assert [r["accuracy_runs"] for r in again["rows"]] == [r["accuracy_runs"] for r in rows]


def test_sweep_moves_one_knob_at_a_time_and_writes_its_table(fast_world, tmp_path, monkeypatch):
    """reproduce.py --sweep: each point is topd with exactly the swept knob changed (a threshold on the absolute
    rule), one run per detector and seed, plus opd per seed as the reference; a default value is one run shared by
    the knobs that sweep through it; sweep.csv and sweep.md hold every point."""
    world, _ = fast_world
    out = tmp_path / "sweep"
    monkeypatch.setattr(reproduce, "SWEEP", {"div_threshold": {"window": [0.5], "probe": [2.0]},
                                             "horizon": {"window": [4, 8], "probe": [4]},
                                             "guide_weight": {"window": [1.0]}})
    result = reproduce.main(["--smoke", "--sweep", "--out", str(out), "--world", str(world), *TWO_LANES])
    points = result["sweep"]
    assert [(p["knob"], p["value"], p["detector"]) for p in points] == [
        ("-", "", "opd"), ("div_threshold", 0.5, "window"), ("div_threshold", 2.0, "probe"),
        ("horizon", 4, "window"), ("horizon", 8, "window"), ("horizon", 4, "probe"), ("guide_weight", 1.0, "window")]
    folders = {p.name for p in out.iterdir() if (p / "results.json").exists()}
    assert folders == {"opd-none-seed0", "sweep-div_threshold0.5-window-seed0", "sweep-div_threshold2.0-probe-seed0",
                       "sweep-horizon4-window-seed0", "sweep-horizon4-probe-seed0", "sweep-default-window-seed0"}
    for p in points[1:]:
        is_default = (p["knob"], p["value"]) in {("horizon", 8), ("guide_weight", 1.0)}
        folder = out / (f"sweep-default-{p['detector']}-seed0" if is_default else
                        f"sweep-{p['knob']}{p['value']}-{p['detector']}-seed0")
        run = json.loads((folder / "results.json").read_text())
        config = run["config"]
        assert config["mode"] == "topd" and config["detector"] == p["detector"] and config["steps"] == 4
        assert config[p["knob"]] == p["value"]
        assert config["div_rule"] == ("absolute" if p["knob"] == "div_threshold" else "relative")
        assert config["horizon"] == (4 if (p["knob"], p["value"]) == ("horizon", 4) else 8)
        assert config["guide_weight"] == 1.0 and p["accuracy"] == run["accuracy_after"]
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == len(points)
    assert (out / "sweep.md").read_text().count("| horizon | 4 |") == 2


def test_sweep_runs_the_probe_on_probe_seeds_only(tmp_path, capsys):
    """--probe-seeds: the window's points (and opd) on every seed, the probe's on the chosen ones; a probe seed that
    is not among --seeds is an error that names both flags."""
    args = reproduce.parse_args(["--sweep", "--seeds", "0", "1", "--probe-seeds", "1"])
    jobs = reproduce.sweep_jobs(tmp_path, args)
    per_seed = {s: [(j["row"], j["detector"]) for j in jobs if j["seed"] == s] for s in (0, 1)}
    n_window = sum(len(grid["window"]) for grid in reproduce.SWEEP.values())
    n_probe = sum(len(grid["probe"]) for grid in reproduce.SWEEP.values())
    assert per_seed[0].count(("topd", "window")) == n_window and ("topd", "probe") not in per_seed[0]
    assert per_seed[1].count(("topd", "probe")) == n_probe and per_seed[1].count(("opd", "-")) == 1
    # H = 8 and lambda = 1 are one run per detector and seed: the window on 2 seeds, the probe on 1
    assert len({j["path"] for j in jobs}) == len(jobs) - 3
    # --probe-knobs: the probe's lambda points left out, its default run kept (the H line shares it)
    args = reproduce.parse_args(["--sweep", "--seeds", "0", "--probe-knobs", "div_threshold", "horizon"])
    probe = {j["path"].name for j in reproduce.sweep_jobs(tmp_path, args) if j["detector"] == "probe"}
    assert probe == {"sweep-default-probe-seed0", "sweep-horizon4-probe-seed0", "sweep-horizon16-probe-seed0",
                     *(f"sweep-div_threshold{t}-probe-seed0" for t in reproduce.SWEEP["div_threshold"]["probe"])}
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--sweep", "--seeds", "0", "--probe-seeds", "2"])
    assert "--probe-seeds [2] must be among --seeds [0]" in capsys.readouterr().err


def test_sweep_table_and_plot_leave_out_the_probe_knobs_not_run(tmp_path):
    """With --probe-knobs div_threshold, sweep.md has the probe's tau rows only (opd's mean and spread and a window
    mean over the seeds that ran, computed by hand here) and the plot draws the panels without the probe's missing lines."""
    args = reproduce.parse_args(["--sweep", "--seeds", "0", "1", "--probe-seeds", "0", "--probe-knobs", "div_threshold"])
    points = [{**job["point"], "accuracy": 0.40 + 0.1 * job["seed"] + 0.01 * i}
              for i, job in enumerate(reproduce.sweep_jobs(tmp_path, args))]
    lines = reproduce.sweep_markdown(points, args)
    opd = [p["accuracy"] for p in points if p["knob"] == "-"]  # seed 0: 0.40 (job 0); seed 1: 0.50 + 0.01 * its index
    assert opd[0] == pytest.approx(0.40) and lines[0].endswith(f"{(opd[0] + opd[1]) / 2:.1%} ± {(opd[1] - opd[0]) / 2:.1%}.")
    rows = [line.split(" | ") for line in lines[4:]]
    probe = [r for r in rows if r[2] == "probe"]
    assert [r[0] for r in probe] == ["| div_threshold"] * 3  # no probe H or lambda rows: they did not run
    window_h4 = [p["accuracy"] for p in points if (p["knob"], p["value"], p["detector"]) == ("horizon", 4, "window")]
    assert len(window_h4) == 2 and f"{sum(window_h4) / 2:.1%}" in next(
        " | ".join(r) for r in rows if r[:3] == ["| horizon", "4", "window"])
    if reproduce.pyplot() is not None:  # matplotlib is optional
        assert reproduce.plot_sweep(points, tmp_path / "sweep.png") and (tmp_path / "sweep.png").stat().st_size > 0


def test_equal_compute_to_another_row_sizes_opd_by_that_row_in_its_own_folder(fast_world, tmp_path, capsys):
    """--equal-compute-to topd:window: opd_equal_compute gets topd + window's student forward tokens (not the
    probe's), in a folder of its own, so a table resumed with another target never reuses a run of another budget;
    and a finished run of another number of steps is an error, not a silent reuse."""
    world, _ = fast_world
    out = tmp_path / "eqw"
    summary = reproduce.main(["--smoke", "--out", str(out), "--world", str(world), "--rows", "opd:-", "topd:window",
                              "opd_equal_compute:-", "--equal-compute-to", "topd:window", *TWO_LANES])
    tokens = {r["mode"] + r["detector"]: r["student_tokens"] for r in summary["rows"]}
    eqc = next(r for r in summary["rows"] if r["mode"] == "opd_equal_compute")
    assert tokens["topdwindow"] > tokens["opd-"] > 0
    assert eqc["steps"] == [max(4, round(4 * tokens["topdwindow"] / tokens["opd-"]))] and eqc["steps"][0] > 4
    assert (out / "opd_equal_compute-to-topd-window-seed0" / "results.json").exists()
    assert not (out / "opd_equal_compute-none-seed0").exists()
    assert "topd + window over opd, same steps" in (out / "results.md").read_text()
    args = reproduce.parse_args(["--smoke"])
    with pytest.raises(RuntimeError, match="holds a finished run of 4 steps, not 5"):
        reproduce.run_one(world, out / "opd-none-seed0", "opd", "-", 0, args, 5)
    for bad in (["--rows", "opd:-", "opd_equal_compute:-", "--equal-compute-to", "topd:window"],
                ["--equal-compute-to", "opd:-"], ["--equal-compute-to", "topd"]):
        with pytest.raises(SystemExit):
            reproduce.parse_args(bad)
        assert "--equal-compute-to" in capsys.readouterr().err


def test_mean_curve_averages_only_the_steps_every_seed_reached():
    """Equal-compute runs end at a different step per seed: the plotted mean must not show one seed as the row."""
    row = lambda seed, step, acc: {"seed": seed, "step": step, "accuracy": acc}  # noqa: E731
    rows = [row(0, 0, 0.4), row(0, 50, 0.2), row(0, 60, ""), row(0, 307, 0.5),
            row(1, 0, 0.4), row(1, 50, 0.4), row(1, 60, ""), row(1, 312, 0.0)]
    assert reproduce.mean_curve(rows, "accuracy") == ([0, 50], [pytest.approx(0.4), pytest.approx(0.3)])


def test_jobs_run_side_by_side_and_equal_compute_waits_for_its_inputs(tmp_path, monkeypatch):
    """--jobs 2: two runs at once, never more; a seed's opd_equal_compute starts only after that seed's opd and
    target runs ended, with steps from their tokens; after a failed run no queued job starts, and the error is raised."""
    args = reproduce.parse_args(["--seeds", "0", "1", "--steps", "10", "--jobs", "2", "--equal-compute-to",
                                 "topd:window", "--rows", "opd:-", "topd:window", "opd_equal_compute:-"])
    tokens = {("opd", 0): 100, ("topd", 0): 250, ("opd", 1): 100, ("topd", 1): 140}
    lock, events, active = threading.Lock(), [], [0]

    def fake_run_one(world, out, row, detector, seed, args, steps, extra=()):
        with lock:
            active[0] += 1
            events.append(("start", out.name, active[0]))
        time.sleep(0.05 if row == "opd" else 0.15)  # opd ends first: the target is what equal compute waits for
        with lock:
            active[0] -= 1
            events.append(("end", out.name, steps))
        if out.name == "explode-seed9":
            raise RuntimeError("run failed: boom")
        return {"student_tokens": tokens.get((row, seed), 0), "accuracy_after": 0.5}

    monkeypatch.setattr(reproduce, "run_one", fake_run_one)
    jobs, follow_up = reproduce.table_jobs(tmp_path, args)
    assert [j["path"].name for j in jobs] == ["opd-none-seed0", "topd-window-seed0", "opd-none-seed1",
                                              "topd-window-seed1"]
    results = reproduce.run_jobs(tmp_path, args, jobs, follow_up)
    assert max(n for kind, _, n in events if kind == "start") == 2
    order = [(kind, name) for kind, name, _ in events]
    for seed, steps in ((0, 25), (1, 14)):  # 10 steps x 250/100 and x 140/100
        eqc = f"opd_equal_compute-to-topd-window-seed{seed}"
        assert order.index(("start", eqc)) > max(order.index(("end", f"opd-none-seed{seed}")),
                                                 order.index(("end", f"topd-window-seed{seed}")))
        assert ("end", eqc, steps) in events and results[("opd_equal_compute", "-", seed)]["path"].name == eqc
    # a failure: the run that raised is reported, the job queued behind it never starts
    events.clear()
    args = reproduce.parse_args(["--jobs", "1"])
    bad = [{"key": name, "path": tmp_path / name, "row": "opd", "detector": "-", "seed": 0, "steps": 1}
           for name in ("explode-seed9", "never-seed0")]
    with pytest.raises(RuntimeError, match="boom"):
        reproduce.run_jobs(tmp_path, args, bad)
    assert [name for kind, name, _ in events if kind == "start"] == ["explode-seed9"]


def test_run_one_sets_the_thread_count_and_records_it(tmp_path, monkeypatch, capsys):
    """Each train.py process gets --threads torch threads through its environment (float sums differ between thread
    counts, so it is part of what makes a run reproducible) and time.json records it; --jobs / --threads below 1
    are errors naming the flag; the default is the caller's OMP_NUM_THREADS when set, else the cores shared out."""
    seen = {}

    def fake_run(cmd, cwd, capture_output, text, env):
        seen.update(env)
        out = tmp_path / "run"
        (out / "results.json").write_text(json.dumps({"config": {"steps": 3}, "accuracy_after": 0.1}))
        (out / "metrics.jsonl").write_text(json.dumps({"compute/student_tokens": 7}) + "\n")
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(reproduce.subprocess, "run", fake_run)
    (tmp_path / "run").mkdir()
    monkeypatch.setattr("toy.train_defaults", lambda world: {"max_new_tokens": 48})
    args = reproduce.parse_args(["--jobs", "2", "--threads", "3"])
    res = reproduce.run_one(tmp_path / "world", tmp_path / "run", "opd", "-", 0, args, 3)
    assert seen["OMP_NUM_THREADS"] == "3" and seen["MKL_NUM_THREADS"] == "3" and res["student_tokens"] == 7
    assert json.loads((tmp_path / "run" / "time.json").read_text())["threads"] == 3
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert reproduce.parse_args(["--jobs", "3"]).threads == 2 and reproduce.parse_args(["--jobs", "16"]).threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the caller's own setting wins over the computed share
    assert reproduce.parse_args(["--jobs", "1"]).threads == 1
    assert reproduce.parse_args(["--jobs", "1", "--threads", "4"]).threads == 4
    for bad in (["--jobs", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            reproduce.parse_args(bad)
        assert bad[0] in capsys.readouterr().err


def test_a_given_world_is_used_as_built_and_named_by_its_hash(tmp_path, monkeypatch):
    """--world names a world built before (the long-80 student variant, say): it is used as it is, never rebuilt
    because its config differs from the flags' (toy.build would rebuild it), and its identity line names the table
    world whose hash it has, or says it has none."""
    import toy

    world = tmp_path / "variant"
    world.mkdir()
    (world / "build.json").write_text(json.dumps({"accuracy": {"student": {"greedy": 0.45}}}))

    def no_build(*a, **k):
        raise AssertionError("a built --world must not be rebuilt")

    monkeypatch.setattr(toy, "build", no_build)
    args = reproduce.parse_args(["--world", str(world), "--seeds", "0"])
    assert reproduce.world_build(world, args)["accuracy"]["student"]["greedy"] == 0.45
    monkeypatch.setattr(toy, "world_hash", lambda w: reproduce.TABLE_WORLDS["long-80"])
    assert "the tables' long-80 world" in reproduce.world_check(world, "given")
    monkeypatch.setattr(toy, "world_hash", lambda w: "0123456789abcdef")
    assert "not a world the tables" in reproduce.world_check(world, "given")
    assert "WARNING" in reproduce.world_check(world, "long")  # --long on another build: loud


def test_the_shipped_long80_world_is_the_one_the_fresh_seeds_ran_on():
    """data/toy-long-80 is the fresh-seed table's world: its weights hash to the table's hash (a changed or corrupted
    file changes it), build.json records the same, and its student loads through from_pretrained at its 45% set
    point's size."""
    from pathlib import Path

    import sample
    import toy

    world = Path(reproduce.ROOT) / "data" / "toy-long-80"
    assert toy.world_hash(world) == reproduce.TABLE_WORLDS["long-80"]
    build = json.loads((world / "build.json").read_text())
    assert build["world_hash"] == reproduce.TABLE_WORLDS["long-80"] and build["accuracy"]["student"]["greedy"] == 0.45
    student, _ = sample.load_policy(str(world / "student"))
    assert sum(p.numel() for p in student.parameters()) == build["params"]["student"]
    assert "long-80" in reproduce.world_check(world, "given")


def test_paired_difference_hand_case_and_errors():
    """The docstring's example by hand: differences 0.1, 0.2, 0.1 -> mean 0.1333, sample sd 0.0577, t(2) 4.303:
    half-width 4.303 * 0.0577 / sqrt(3) = 0.1434; and a difference that is the same on every seed has a zero-width
    interval that excludes 0."""
    d = reproduce.paired_difference([0.5, 0.6, 0.7], [0.4, 0.4, 0.6])
    assert d["mean"] == pytest.approx(0.13333, abs=1e-4)
    assert d["low"] == pytest.approx(0.13333 - 0.14342, abs=1e-4) and d["high"] == pytest.approx(0.27676, abs=1e-4)
    assert (d["wins"], d["losses"], d["n"]) == (3, 0, 3)
    same = reproduce.paired_difference([0.3, 0.5], [0.1, 0.3])
    assert same["low"] == pytest.approx(0.2) and same["high"] == pytest.approx(0.2)
    behind = reproduce.paired_difference([0.1, 0.2, 0.3, 0.2], [0.2, 0.2, 0.1, 0.4])
    assert (behind["wins"], behind["losses"]) == (1, 2)  # the tie counts as neither
    with pytest.raises(ValueError, match="two equal lists"):
        reproduce.paired_difference([0.1], [0.2])


def test_largest_fall_reads_the_runs_evaluations(tmp_path):
    """The stability test of the recipe rule: the start minus the lowest held-out accuracy along the run, from
    metrics.jsonl (steps without an evaluation ignored); 0 for a run that never fell below its start."""
    rows = [{"step": 0, "eval/accuracy": 0.47}, {"step": 1, "loss": 1.0}, {"step": 25, "eval/accuracy": 0.01},
            {"step": 50, "eval/accuracy": 0.40}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert reproduce.largest_fall(tmp_path) == pytest.approx(0.46)
    rows = [{"step": 0, "eval/accuracy": 0.45}, {"step": 25, "eval/accuracy": 0.57}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert reproduce.largest_fall(tmp_path) == 0.0


def test_paired_lines_name_every_comparison_the_plan_reports():
    """The pre-registered comparisons: each row minus opd, topd:window minus opd at its compute, guidance at the
    window detector's states minus the random control; the numbers are paired_difference's."""
    runs = {("opd", "-"): [0.40, 0.50, 0.45], ("topd", "window"): [0.50, 0.55, 0.50],
            ("guide_only", "window"): [0.52, 0.58, 0.50], ("guide_only", "random"): [0.50, 0.50, 0.50],
            ("opd_equal_compute", "-"): [0.45, 0.52, 0.40]}
    table = [{"mode": m, "detector": d, "accuracy_runs": a} for (m, d), a in runs.items()]
    lines = reproduce.paired_lines(table, ("topd", "window"))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ") and " - " in line}
    assert set(rows) == {"topd:window - opd", "guide_only:window - opd", "guide_only:random - opd",
                         "opd_equal_compute - opd", "topd:window - opd_equal_compute",
                         "guide_only:window - guide_only:random"}
    d = reproduce.paired_difference(runs[("topd", "window")], runs[("opd_equal_compute", "-")])
    assert f"{d['mean']:+.1%}" in rows["topd:window - opd_equal_compute"] and "3 / 0 of 3" in rows["topd:window - opd"]
