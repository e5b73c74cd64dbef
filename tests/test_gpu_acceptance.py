"""gpu_acceptance.py, the one-shot GPU acceptance run, at toy size on the CPU: the very script a GPU session runs, so
that it cannot rot between the sessions that are lent a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import gpu_acceptance

ROOT = Path(__file__).resolve().parents[1]


def test_the_shapes_are_the_papers_models():
    """The paper-size models have the real models' parameter counts (Qwen3-4B: 4.02B; Qwen3-30B-A3B: 30.5B with all
    48 layers), and on a 141 GB H200 the teacher keeps the layers that fit beside the student's 64 GB of training
    state and the reserve for caches and activations."""
    size = gpu_acceptance.SIZES["paper"]
    assert 4.0e9 < gpu_acceptance.student_params(size["student"], size["vocab"]) < 4.05e9
    teacher = 48 * gpu_acceptance.layer_params(size["teacher"]) + 2 * size["vocab"] * size["teacher"]["hidden_size"]
    assert 30.4e9 < teacher < 30.6e9
    assert gpu_acceptance.teacher_layers_that_fit(size, 141 * 2**30) == 30
    assert gpu_acceptance.teacher_layers_that_fit(size, 1000 * 2**30) == 48  # never more than the real model has


def test_verdict_fails_a_crash_a_non_finite_loss_and_a_skipped_step():
    ok = {"layout": "ddp", "name": "opd", "finite": True, "skipped": False}
    assert gpu_acceptance.verdict([ok]) == []
    bad = [{**ok, "finite": False}, {**ok, "skipped": True}, {**ok, "error": "RuntimeError: CUDA out of memory"}]
    assert len(gpu_acceptance.verdict([ok, *bad])) == 3
    assert "CUDA out of memory" in gpu_acceptance.verdict(bad)[-1]


def test_the_acceptance_run_at_toy_size(tmp_path):
    """The whole command at toy size: models built and saved, 1-process torchrun children for DDP and FSDP (the FSDP
    runs really sharded), every mode two steps, the memory point, the decoding comparison; exit 0, PASS, and a
    table with every run's numbers."""
    proc = subprocess.run([sys.executable, str(ROOT / "gpu_acceptance.py"), "--size", "toy", "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "acceptance.json").read_text())
    rows = result["rows"]
    assert [(r["layout"], r["name"]) for r in rows] == [
        ("ddp", "opd"), ("ddp", "topd window"), ("ddp", "topd probe"), ("fsdp", "opd"), ("fsdp", "topd window"),
        ("fsdp", "topd probe"), ("ddp", "topd probe, T=48")]
    assert result["failures"] == [] and "verdict: PASS" in proc.stdout
    for r in rows:
        assert r["finite"] and r["time_step"] > 0 and r["rollout_tokens_per_s"] > 0, r
        assert r["sharded"] == (r["layout"] == "fsdp"), r
        assert (r["time_probe"] > 0) == (r["mode"] == "topd"), r
    assert rows[0]["decode"]["ours_tokens_per_s"] > 0 and rows[0]["decode"]["generate_tokens_per_s"] > 0
    assert (tmp_path / "out" / "acceptance.md").read_text().count("\n| ") == 8  # header + 7 runs
