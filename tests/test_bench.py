"""bench.py: the pure helpers only (statistics, schedule, targets, table, the two KLs). No timing asserts."""

import json
import math

import pytest
import torch

import bench


def test_median_and_ratio():
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert bench.median([1.0, float("nan"), 3.0]) == 2.0  # a missing measurement does not become a zero
    assert math.isnan(bench.median([]))
    assert bench.ratio(3.0, 2.0) == 1.5
    for value, base in ((1.0, 0.0), (None, 1.0), (1.0, None), (float("nan"), 1.0)):
        assert math.isnan(bench.ratio(value, base))


def test_alternating_schedule_interleaves_after_warmup():
    sched = bench.alternating_schedule(["a", "b"], repeats=2, warmup=1)
    assert sched == [(0, "a", False), (0, "b", False), (1, "a", True), (1, "b", True), (2, "a", True),
                     (2, "b", True)]
    # never two runs of one variant in a row, and every variant gets exactly `repeats` timed runs
    names = [v for _, v, _ in bench.alternating_schedule(["a", "b", "c"], repeats=3, warmup=2)]
    assert all(x != y for x, y in zip(names, names[1:]))
    timed = [v for _, v, keep in bench.alternating_schedule(["a", "b", "c"], repeats=3, warmup=2) if keep]
    assert {v: timed.count(v) for v in "abc"} == {"a": 3, "b": 3, "c": 3}
    assert bench.alternating_schedule(["a"], repeats=0, warmup=0) == []


def test_run_alternating_keeps_only_timed_rounds_in_order():
    calls = []
    times = bench.run_alternating({"a": lambda k: calls.append(("a", k)), "b": lambda k: calls.append(("b", k))},
                                  repeats=2, warmup=1, device=torch.device("cpu"))
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]  # round index = training step
    assert [len(v) for v in times.values()] == [2, 2]


def test_targets_and_gap():
    assert bench.target_met(0.96, (">=", 0.95)) is True
    assert bench.target_met(0.94, (">=", 0.95)) is False
    assert bench.target_met(1.10, ("<=", 1.10)) is True  # the bound itself meets the target
    assert bench.target_met(1.2, ("<=", 1.10)) is False
    assert bench.target_met(float("nan"), ("<=", 1.1)) is None
    assert bench.target_met(1.0, None) is None
    assert "0.10x over" in bench.target_gap(1.2, ("<=", 1.10)) and "NOT met" in bench.target_gap(1.2, ("<=", 1.10))
    assert "0.05x above" in bench.target_gap(1.0, (">=", 0.95)) and "(met)" in bench.target_gap(1.0, (">=", 0.95))


def test_rows_and_table():
    rows = [bench.make_row("2 kl", "naive", 400.0, "MB"),
            bench.make_row("2 kl", "ours", 50.0, "MB", 400.0, ("<=", 0.25)),
            bench.make_row("3 step", "topd/probe", 1.5, "s", 1.0, ("<=", 1.41)),
            bench.make_row("4 trl", "trl", None, "s", note="not run")]
    assert rows[0]["ratio"] is None and rows[1]["ratio"] == 0.125 and rows[1]["met"] is True
    assert rows[2]["met"] is False
    json.dumps(rows)  # bench.json must be able to hold them
    table = bench.format_table(rows).splitlines()
    assert table[0] == "| section | variant | median | ratio vs baseline | target | met? |"
    assert table[2] == "| 2 kl | naive | 400.0 MB | baseline | - | - |"
    assert table[3] == "| 2 kl | ours | 50.0 MB | 0.12x | <= 0.25x | yes |"
    assert table[4] == "| 3 step | topd/probe | 1.50 s | 1.50x | <= 1.41x | NO |"
    assert table[5] == "| 4 trl | trl | not run | baseline | - | not run |"
    assert bench.format_value(1234.4, "tok/s") == "1,234 tok/s" and bench.format_value(0.0123, "s") == "12.3 ms"


def test_parse_sections_and_config():
    assert bench.parse_sections("3,1,3") == [1, 3]
    with pytest.raises(ValueError):
        bench.parse_sections("0,6")
    cfg = bench.parse_config(["--quick", "--sections", "2", "--repeats", "4", "--threads", "1"])
    assert cfg.quick and cfg.sections == "2" and cfg.repeats == 4 and cfg.threads == 1
    with pytest.raises(SystemExit):
        bench.parse_config(["--sections", "9"])
    assert bench.parse_config(["--decode-models", "toy"]).decode_models == "toy"
    with pytest.raises(SystemExit):  # a misspelt model would otherwise be benchmarked as the Qwen shape
        bench.parse_config(["--decode-models", "toy,qwen3-06b"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_naive_and_chunked_kl_agree(dtype):
    """The two section-2 variants compute the same KL and the same student gradient (through kl_forward_backward,
    the function the benchmark times), in fp32 and in bf16 logits."""
    gen = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(2, 5, 50, generator=gen)).to(dtype)
    t = (3 * torch.randn(2, 5, 50, generator=gen)).to(dtype)
    out = {}
    for name in bench.KL_VARIANTS:
        leaf = s.clone().requires_grad_(True)
        kl = bench.kl_forward_backward(name, leaf, t)
        assert kl.shape == (2, 5) and kl.dtype == torch.float32 and leaf.grad.dtype == dtype
        out[name] = (kl, leaf.grad.float())
    assert (out["naive"][0] > 0).all()  # random logits: a real, positive divergence, not a trivial zero
    torch.testing.assert_close(out["ours"][0], out["naive"][0], rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 gradients are rounded to 8 bits of mantissa
    torch.testing.assert_close(out["ours"][1], out["naive"][1], rtol=tol, atol=tol)


def test_naive_kl_hand_computed():
    """p = [.5, .5], q = [.25, .75]: KL = .5 ln 2 + .5 ln(2/3) = 0.1438."""
    s = torch.log(torch.tensor([[[0.5, 0.5]]]))
    t = torch.log(torch.tensor([[[0.25, 0.75]]]))
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert bench.naive_kl(s, t).item() == pytest.approx(expected, abs=1e-6)
    assert bench.chunked_kl(s, t).item() == pytest.approx(expected, abs=1e-6)


def test_measure_reports_growth_on_cpu():
    """measure() returns the function's result and a peak that includes a 64 MB buffer it allocates and touches."""
    out, seconds, peak, method = bench.measure(lambda: float(torch.ones(16 * 2**20).sum()), torch.device("cpu"))
    assert out == 16 * 2**20 and seconds >= 0
    if method == "VmHWM after clear_refs":  # exact on Linux; the ru_maxrss fallback is only a lower bound
        assert peak >= 60 * 2**20


def test_long_context_world_raises_max_positions(tmp_path):
    world = tmp_path / "w"
    for name in ("student", "teacher"):
        (world / name).mkdir(parents=True)
        (world / name / "config.json").write_text(json.dumps({"max_position_embeddings": 128, "hidden_size": 8}))
        (world / name / "model.safetensors").write_bytes(b"weights")
    (world / "train.jsonl").write_text('{"prompt": "1+1=?"}\n')
    out = bench.long_context_world(world, 600, tmp_path / "long")
    for name in ("student", "teacher"):
        config = json.loads((out / name / "config.json").read_text())
        assert config == {"max_position_embeddings": 600, "hidden_size": 8}
        assert (out / name / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((world / "student" / "config.json").read_text())["max_position_embeddings"] == 128  # untouched


def test_trl_section_says_not_run_without_trl(monkeypatch, capsys):
    """Without TRL, section 4 prints how to install it and its row reads "not run" (nothing heavy is built)."""
    import sys

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    cfg = bench.parse_config(["--quick"])
    rows, details = bench.section_trl(cfg, bench.QUICK[4], torch.device("cpu"), None, 1)
    assert details["status"] == "not run" and "pip install trl" in capsys.readouterr().out
    assert rows[0]["median"] is None and "not run" in bench.format_table(rows)


def test_token_floor_hand_computed():
    """Section 6's floor: opd costs 5L token-forwards per rollout (sample, teacher, student forward + backward);
    the probe adds 4KH per candidate and guidance 3 per window token (forward + backward)."""
    m = {"topd/candidates": 2.0, "topd/nondiv_frac": 0.5, "guide/tokens": 64.0}
    L, K, H, B = 100, 4, 8, 2
    assert bench.token_floor("opd", "probe", L, m, K, H, B) == 1.0
    assert bench.token_floor("topd", "probe", L, m, K, H, B) == pytest.approx((500 + 4 * 2 * 32 + 3 * 32) / 500)
    # the window detector samples K x H teacher tokens at each divergent state only (1 of the 2 candidates here)
    assert bench.token_floor("topd", "window", L, m, K, H, B) == pytest.approx((500 + 1 * 32 + 3 * 32) / 500)


def test_qwen_vocab_world_has_qwens_head_width_and_tokenizer_size(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    size = {**bench.QUICK[6], "lengths": (16,)}
    world = bench.qwen_vocab_world(tmp_path, size)
    tok = AutoTokenizer.from_pretrained(world / "student")
    assert AutoConfig.from_pretrained(world / "teacher").vocab_size == 151936 and len(tok) == 151669
    assert tok("12+3=?\n")["input_ids"][:2] == [tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")]
