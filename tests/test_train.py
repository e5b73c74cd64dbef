"""train.py: bad input, DDP equivalences, resume, atomic checkpoints, and a learning test on the toy world."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import train

ROOT = Path(__file__).resolve().parents[1]


def _args(world, out, *extra):
    """train.py flags for the toy world's models named explicitly, with the toy's training values."""
    import toy
    return ["--student", str(world / "student"), "--teacher", str(world / "teacher"),
            "--prompts", str(world / "train.jsonl"), *toy.train_flags(), "--out", str(out), *extra]


def _run(args, nproc=None, timeout=600, script=ROOT / "train.py"):
    """Run train.py as a user would: `python train.py` or `torchrun --nproc_per_node=N train.py`. `script`: a test's
    driver that patches something and then calls train.main, launched the same way."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if nproc is None:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    return proc


def _weights(ckpt):
    from safetensors.torch import load_file
    return load_file(str(Path(ckpt) / "model.safetensors"))


def _metrics(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/accuracy" not in r]


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_flags_are_argparse_errors_naming_the_flag(fast_world, tmp_path, capsys):
    world, _ = fast_world
    with pytest.raises(SystemExit):
        train.parse_config(_args(world, tmp_path, "--mode", "grpo"))
    assert "--mode" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_config(["--student", "a", "--teacher", "b", "--prompts", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_config(_args(world, tmp_path, "--micro-batch", "0"))
    assert "--micro-batch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_config(["--student", str(world / "student")])
    assert "--teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_config(_args(world, tmp_path, "--guide-horizon", "-1"))
    assert "--guide-horizon" in capsys.readouterr().err
    assert train.parse_config(_args(world, tmp_path, "--horizon", "6")).window_horizon == 6  # 0: the --horizon given
    assert train.parse_config(_args(world, tmp_path, "--guide-horizon", "16")).window_horizon == 16


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "1+2=?\\n"}\n{"prompt": "3+4=?\\n"\n', ":2: not valid JSON"),
    ('{"prompt": "1+2=?\\n"}\n\n{"prompt": "   "}\n', ":3: empty"),
    ('{"text": "1+2=?\\n"}\n', ":1: missing problem text"),
])
def test_bad_prompt_files_fail_with_file_and_line_before_training(fast_world, tmp_path, content, expected):
    world, _ = fast_world
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(ValueError) as err:
        train.main(_args(world, tmp_path / "out", "--prompts", str(bad)))
    assert str(bad) + expected in str(err.value)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing ran


def test_incompatible_tokenizer_fails_before_training(fast_world, tmp_path):
    import shutil
    from transformers import AutoTokenizer

    world, _ = fast_world
    other = tmp_path / "other-teacher"
    shutil.copytree(world / "teacher", other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.eos_token = "|"  # a different EOS token: the teacher would end responses elsewhere
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="eos_token"):
        train.main(_args(world, tmp_path / "out", "--teacher", str(other)))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------- distributed

def test_torchrun_two_processes_keep_identical_weights(fast_world, tmp_path):
    world, _ = fast_world
    out = tmp_path / "ddp"
    proc = _run(_args(world, out, "--steps", "2", "--rollout-batch", "8", "--micro-batch", "2", "--mode", "topd",
                      "--detector", "probe", "--probe-samples", "2", "--horizon", "6", "--eval-every", "0"), nproc=2)
    # review item 11: with output redirected (as here, and on any cluster) the log holds one clean line per step,
    # no progress-bar redraws (carriage returns) in either stream
    step_lines = [l for l in proc.stdout.splitlines() if l.startswith("step ")]
    assert [l.split(" |")[0] for l in step_lines] == ["step 1/2", "step 2/2"], proc.stdout
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    assert "teacher self-check: KL between two scoring passes" in proc.stdout  # on by default (trap 20)
    meta = json.loads((out / "ckpt-000002" / "meta.json").read_text())
    sums = meta["param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert (out / "latest").read_text() == "ckpt-000002"
    m = _metrics(out)
    assert [r["step"] for r in m] == [1, 2] and all(r["guide/tokens"] > 0 for r in m)


@pytest.mark.parametrize("mode", ["opd", "topd"])
def test_one_process_two_micro_batches_equals_two_processes(fast_world, tmp_path, mode):
    """Same data, split differently: the update must be the same (token-mean over the whole step, trap 5)."""
    world, _ = fast_world
    common = ["--steps", "2", "--rollout-batch", "8", "--micro-batch", "4", "--mode", mode, "--detector", "window",
              "--horizon", "6", "--eval-every", "0", "--lr", "1e-3"]
    _run(_args(world, tmp_path / "one", *common))
    _run(_args(world, tmp_path / "two", *common), nproc=2)
    a, b = _weights(tmp_path / "one" / "ckpt-000002"), _weights(tmp_path / "two" / "ckpt-000002")
    init = _weights(world / "student")
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    assert moved > 1e-4  # training really changed the weights
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-6), k
    ma, mb = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    # trap 14: the learner's log-probs of the sampled tokens equal the sampler's (no padding / position / dtype bug)
    assert ma[0]["rollout/logp_mismatch"] < 1e-4 and mb[0]["rollout/logp_mismatch"] < 1e-4
    assert "rollout/logp_mismatch" not in ma[1]  # checked every --logp-check-every (10) steps only
    for ra, rb in zip(ma, mb):
        assert ra["opd/teacher_kl"] == pytest.approx(rb["opd/teacher_kl"], rel=1e-5)


def test_resume_reproduces_the_uninterrupted_run(fast_world, tmp_path):
    world, _ = fast_world
    common = ["--steps", "6", "--rollout-batch", "8", "--micro-batch", "8", "--mode", "opd_suppress",
              "--detector", "window", "--save-every", "3", "--eval-every", "0", "--lr", "1e-3"]
    _run(_args(world, tmp_path / "full", *common))
    _run(_args(world, tmp_path / "split", *common, "--stop-at-step", "3"))
    assert (tmp_path / "split" / "latest").read_text() == "ckpt-000003"
    _run(_args(world, tmp_path / "split", *common, "--resume"))
    full, split = _metrics(tmp_path / "full"), _metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    for rf, rs in zip(full, split):
        for key in ("opd/loss", "opd/teacher_kl", "grad_norm", "lr", "topd/nondiv_frac", "rollout/len_mean"):
            assert rf[key] == pytest.approx(rs[key], rel=1e-6, abs=1e-9), (rf["step"], key)
    a, b = _weights(tmp_path / "full" / "ckpt-000006"), _weights(tmp_path / "split" / "ckpt-000006")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_crash_while_saving_keeps_the_previous_checkpoint(fast_world, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world, _ = fast_world
    model = AutoModelForCausalLM.from_pretrained(world / "student")
    tok = AutoTokenizer.from_pretrained(world / "student")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = train.TrainConfig()
    out = tmp_path / "ck"
    out.mkdir()
    checkpoint.save_checkpoint(out, 1, model, tok, opt, sched, cfg, {})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save = torch.save

    def exploding_save(obj, path, *a, **k):  # the disk fills up half-way through the second checkpoint
        real_save(obj, path, *a, **k)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(out, 2, model, tok, opt, sched, cfg, {})
    monkeypatch.undo()
    latest = checkpoint.latest_checkpoint(out)
    assert latest.name == "ckpt-000001" and not (out / "ckpt-000002").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(latest)
    original = AutoModelForCausalLM.from_pretrained(world / "student")
    for (n, p), (_, q) in zip(reloaded.named_parameters(), original.named_parameters()):
        assert torch.equal(p, q), n


# ---------------------------------------------------------------------------------------------- learning

def test_opd_learns_on_the_toy_world(fast_world, tmp_path):
    """A short OPD run raises held-out accuracy and lowers the teacher KL."""
    world, _ = fast_world
    out = tmp_path / "learn"
    _run(_args(world, out, "--eval-prompts", str(world / "test.jsonl"), "--mode", "opd", "--steps", "80",
               "--rollout-batch", "64", "--micro-batch", "32", "--lr", "5e-4", "--eval-every", "0"))
    res = json.loads((out / "results.json").read_text())
    m = _metrics(out)
    first, last = sum(r["opd/teacher_kl"] for r in m[:5]) / 5, sum(r["opd/teacher_kl"] for r in m[-5:]) / 5
    assert res["accuracy_after"] > res["accuracy_before"] + 0.08, res
    assert last < 0.7 * first, (first, last)


def test_gradient_checkpointing_gives_the_same_update(fast_world, tmp_path):
    """Checkpointing only trades compute for memory; the guidance windows (which need the KV cache that
    checkpointed layers drop) must still work and give the same weights."""
    world, _ = fast_world
    common = ["--steps", "1", "--rollout-batch", "8", "--micro-batch", "8", "--mode", "topd", "--detector", "window",
              "--horizon", "6", "--eval-every", "0", "--lr", "1e-3"]
    train.main(_args(world, tmp_path / "plain", *common))
    train.main(_args(world, tmp_path / "ckpt", *common, "--gradient-checkpointing"))
    a, b = _weights(tmp_path / "plain" / "ckpt-000001"), _weights(tmp_path / "ckpt" / "ckpt-000001")
    assert _metrics(tmp_path / "ckpt")[0]["guide/tokens"] > 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_non_finite_steps_are_skipped_then_the_run_stops(fast_world, tmp_path, monkeypatch):
    """A NaN loss skips the step and keeps the weights; --max-bad-steps in a row stop the run with a message."""
    import topd

    world, _ = fast_world
    cfg = train.parse_config(_args(world, tmp_path / "nan", "--mode", "opd", "--rollout-batch", "4",
                                   "--micro-batch", "4", "--max-bad-steps", "2", "--eval-every", "0"))
    run = train.setup(cfg, "cpu", log=lambda *a: None)
    before = {k: v.clone() for k, v in run.student.state_dict().items()}
    real = topd.opd_objective
    monkeypatch.setattr(topd, "opd_objective", lambda *a, **k: (lambda out: (out[0] * float("nan"), out[1]))(real(*a, **k)))
    metrics = train.train_step(run, 0)
    assert metrics["skipped"] and run.bad_steps == 1
    for k, v in run.student.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="2 non-finite steps in a row"):
        train.train_step(run, 1)


# ---------------------------------------------------------------------------------------------- review fixes

def _save(out, step, run_id, model, tok, opt, sched, keep=2):
    cfg = train.TrainConfig(keep_checkpoints=keep)
    return checkpoint.save_checkpoint(out, step, model, tok, opt, sched, cfg, {"run_id": run_id})


def test_rotation_never_deletes_the_new_checkpoint_nor_another_runs(fast_world, tmp_path):
    """Review item 1: rotation sorted every ckpt-* by name and kept the last N, so a new run in a folder holding a
    higher-numbered checkpoint of an earlier run deleted the checkpoint it had just written (while `latest`
    pointed at it). Rotation now deletes only this run's checkpoints older than the new one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world, _ = fast_world
    model = AutoModelForCausalLM.from_pretrained(world / "student")
    tok = AutoTokenizer.from_pretrained(world / "student")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = tmp_path / "ck"
    out.mkdir()
    _save(out, 300, "earlier-run", model, tok, opt, sched)
    for step in (1, 2, 3):
        _save(out, step, "this-run", model, tok, opt, sched)
        assert (out / f"ckpt-{step:06d}").is_dir() and (out / "latest").read_text() == f"ckpt-{step:06d}"
        assert checkpoint.latest_checkpoint(out).name == f"ckpt-{step:06d}"
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-000002", "ckpt-000003", "ckpt-000300"]


def test_a_new_run_never_mixes_with_another_run_in_the_same_out(fast_world, tmp_path):
    """Review item 1: a fresh run in an --out that holds a run is refused before any work, naming --resume and
    --overwrite; --overwrite replaces the old run; --resume with nothing to resume names the folder (item 4)."""
    world, _ = fast_world
    out = tmp_path / "shared-out"
    common = ["--mode", "opd", "--rollout-batch", "4", "--micro-batch", "4", "--eval-every", "0", "--no-self-check"]
    with pytest.raises(FileNotFoundError, match=str(out)):
        train.main(_args(world, out, *common, "--steps", "1", "--resume"))
    train.main(_args(world, out, *common, "--steps", "2"))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train.main(_args(world, out, *common, "--steps", "1"))
    assert sorted(p.name for p in out.iterdir()) == before  # nothing lost, nothing written
    train.main(_args(world, out, *common, "--steps", "1", "--overwrite"))
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-000001"]
    assert (out / "latest").read_text() == "ckpt-000001" and len(_metrics(out)) == 1
    # the default --out gives every mode / detector its own folder
    assert train.parse_config(["--mode", "opd"]).out == "runs/opd"
    assert train.parse_config(["--mode", "topd", "--detector", "window"]).out == "runs/topd-window"


def test_resume_refuses_changed_flags_and_keeps_the_original_starting_accuracy(fast_world, tmp_path):
    """Review item 4: a resumed run compares its flags with the checkpoint's (a changed --steps or --lr would
    silently change the schedule) and names every difference; flags that only change logging may differ;
    accuracy_before is the original run's, not the resumed checkpoint's."""
    world, _ = fast_world
    out = tmp_path / "resumed"
    common = ["--mode", "opd", "--rollout-batch", "8", "--micro-batch", "8", "--eval-every", "0", "--steps", "2",
              "--lr", "5e-3", "--eval-prompts", str(world / "test.jsonl"), "--eval-limit", "100", "--no-self-check"]
    first = train.main(_args(world, out, *common, "--stop-at-step", "1"))
    assert first["accuracy_after"] != first["accuracy_before"]  # the step moved the accuracy: the test can tell
    with pytest.raises(ValueError) as err:
        train.main(_args(world, out, *[c if c != "5e-3" else "1e-3" for c in common], "--steps", "3", "--resume"))
    assert "--lr 0.005 -> 0.001" in str(err.value) and "--steps 2 -> 3" in str(err.value)
    resumed = train.main(_args(world, out, *common, "--resume", "--eval-every", "5", "--log-every", "2"))
    assert resumed["accuracy_before"] == first["accuracy_before"]
    assert [r["step"] for r in _metrics(out)] == [1, 2]


def test_each_rank_gets_back_its_own_rng_states_on_resume(monkeypatch):
    """Resume gives each rank the RNG states IT saved (not rank 0's on every rank), and only its own CUDA device's, so
    a run resumed on fewer GPUs than it was saved from restores too (setting every saved device's state failed
    there). A rank the checkpoint did not have keeps its own; an old checkpoint (rank 0's CPU state) still loads."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append(s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("every device's state set"))
    cpu = [torch.Generator().manual_seed(r).get_state() for r in range(2)]
    cuda = [torch.tensor([r, 7], dtype=torch.uint8) for r in range(2)]
    state = {"rng": [{"torch": cpu[r], "cuda": cuda[r]} for r in range(2)]}
    for rank in (1, 0):
        checkpoint.restore_rng(state, rank)
        assert torch.equal(torch.get_rng_state(), cpu[rank]) and torch.equal(restored[-1], cuda[rank])
    before, notes = torch.get_rng_state(), []
    checkpoint.restore_rng(state, 2, warn=notes.append)  # a third rank: nothing saved for it
    assert torch.equal(torch.get_rng_state(), before) and "rank 2" in notes[0] and len(restored) == 2
    checkpoint.restore_rng({"torch_rng": cpu[1]}, 0)  # a checkpoint from before per-rank states
    assert torch.equal(torch.get_rng_state(), cpu[1])


def test_stop_token_mismatch_fails_before_training(fast_world, tmp_path):
    """Review item 6: a teacher whose generation_config stops on an extra token is refused before any forward."""
    import shutil
    from transformers import GenerationConfig

    world, _ = fast_world
    other = tmp_path / "instruct-teacher"
    shutil.copytree(world / "teacher", other)
    GenerationConfig(eos_token_id=[2, 13], pad_token_id=0).save_pretrained(other)  # 13 is ";" in the toy vocab
    with pytest.raises(ValueError, match="stop tokens differ"):
        train.main(_args(world, tmp_path / "out", "--teacher", str(other)))
    assert not (tmp_path / "out").exists()


def test_threshold_rule_is_explicit_and_temperature_warns(tmp_path, capsys):
    """Review item 7: `--div-threshold < 0` used to mean "relative rule", so a negative absolute threshold (D can
    be negative with --kl sampled) was impossible. The rule is now a flag of its own; a threshold without the
    absolute rule is an error; a temperature other than 1 warns that both estimators are then biased."""
    cfg = train.parse_config(["--div-rule", "absolute", "--div-threshold", "-0.5"])
    assert cfg.div_rule == "absolute" and cfg.div_threshold == -0.5
    with pytest.raises(SystemExit):
        train.parse_config(["--div-threshold", "0.5"])
    assert "--div-rule absolute" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="biased"):
        train.parse_config(["--temperature", "0.7"])


def test_forward_tokens_count_every_forward_of_the_step_and_nothing_else(fast_world, tmp_path, monkeypatch):
    """compute/student_tokens and compute/teacher_tokens (what reproduce.py's equal-compute row is sized by) are the
    tokens of the step's own forwards: in opd mode the student's sampling steps plus its training forward over the
    rollouts, and the teacher's one scoring forward; the setup's self-check and evaluations are not counted. TOPD's
    probe and guidance add forwards to both models on the same rollouts."""
    import sample
    import teacher as teacher_lib

    world, _ = fast_world
    seen = {"sampling": 0, "scored": 0}
    real_step, real_score = sample.model_step, teacher_lib.score_rollouts

    def counting_step(model, ids, *a, **k):
        seen["sampling"] += ids.numel()
        return real_step(model, ids, *a, **k)

    def counting_score(model, ro, *a, **k):
        seen["scored"] += ro.ids.numel()
        return real_score(model, ro, *a, **k)

    common = ["--rollout-batch", "8", "--micro-batch", "4", "--eval-every", "0", "--horizon", "6"]
    cfg = train.parse_config(_args(world, tmp_path / "opd", "--mode", "opd", *common))
    run = train.setup(cfg, "cpu", log=lambda *a: None)  # its self-check runs forwards: they must not count
    monkeypatch.setattr(sample, "model_step", counting_step)
    monkeypatch.setattr(teacher_lib, "score_rollouts", counting_score)
    opd = train.train_step(run, 0)
    assert seen["scored"] > 0 and seen["sampling"] > 0
    assert opd["compute/teacher_tokens"] == seen["scored"]
    assert opd["compute/student_tokens"] == seen["sampling"] + seen["scored"]  # same padded ids as the teacher's
    monkeypatch.undo()

    cfg = train.parse_config(_args(world, tmp_path / "topd", "--mode", "topd", "--detector", "probe", *common))
    topd_metrics = train.train_step(train.setup(cfg, "cpu", log=lambda *a: None), 0)
    assert topd_metrics["rollout/len_mean"] == opd["rollout/len_mean"]  # the same rollouts (same seed and weights)
    assert topd_metrics["compute/student_tokens"] > opd["compute/student_tokens"]
    assert topd_metrics["compute/teacher_tokens"] > opd["compute/teacher_tokens"]


def test_the_process_group_timeout_is_a_flag(monkeypatch):
    """NCCL's default watchdog (10 minutes) kills a run whose ranks wait at a collective while another still decodes
    a long evaluation batch: --dist-timeout (minutes, default 60) reaches init_process_group."""
    import datetime

    import parallel

    seen = {}
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(parallel.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 1)
    monkeypatch.setenv("RANK", "0")
    cfg = train.parse_config(["--dist-timeout", "5"])
    assert parallel.dist_init("cpu", cfg.dist_timeout) == (0, 1, 0)
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=5)}
    assert train.parse_config([]).dist_timeout == 60
    with pytest.raises(SystemExit):
        train.parse_config(["--dist-timeout", "0"])
