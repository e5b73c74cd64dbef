"""reproduce.py --smoke: the whole pipeline (5 rows, detector report, curves) runs and writes well-formed files."""

import csv
import json

import reproduce


def test_smoke_run_writes_the_table_and_files(fast_world, tmp_path):
    world, _ = fast_world
    out = tmp_path / "repro"
    summary = reproduce.main(["--smoke", "--out", str(out), "--world", str(world)])
    rows = summary["rows"]
    assert [(r["mode"], r["detector"]) for r in rows] == reproduce.ROWS
    assert all(0.0 <= r["accuracy_mean"] <= 1.0 and len(r["accuracy_runs"]) == 1 for r in rows)
    md = (out / "results.md").read_text()
    assert md.count("\n| opd |") == 1 and md.count("| opd_suppress |") == 2 and md.count("| topd |") == 2
    assert "precision" in md
    det = json.loads((out / "detector.json").read_text())
    assert abs(sum(det["candidates"][k] for k in ("surface", "correct", "error", "after_error")) - 1) < 1e-6
    with open(out / "curves.csv") as f:
        curve = list(csv.DictReader(f))
    assert {r["mode"] for r in curve} == {"opd", "opd_suppress", "topd"}
    assert max(int(r["step"]) for r in curve) == 4
    # resumable: a second call reuses every finished run (no training happens, same numbers)
    again = reproduce.main(["--smoke", "--out", str(out), "--world", str(world)])
    assert [r["accuracy_runs"] for r in again["rows"]] == [r["accuracy_runs"] for r in rows]
