"""toy.py: the task generator, the two styles, ground-truth labels, the tokenizer, and the --fast build."""

import json
import random

import pytest

import toy
from eval_aime import extract_answer


def _tokens(text):
    """Response text -> token strings the way the toy tokenizer splits it (\\boxed is one token)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("\\boxed", i):
            out.append("\\boxed")
            i += len("\\boxed")
        else:
            out.append(text[i])
            i += 1
    return out


def test_generator_is_seeded_and_answers_are_correct_by_construction():
    a = [toy.make_problem(random.Random(5)) for _ in range(3)]
    b = [toy.make_problem(random.Random(5)) for _ in range(3)]
    assert [(p.operands, p.ops) for p in a] == [(p.operands, p.ops) for p in b]
    rng = random.Random(0)
    for _ in range(500):
        p = toy.make_problem(rng)
        expr = str(p.operands[0]) + "".join(f"{op}{b}" for op, b in zip(p.ops, p.operands[1:]))
        assert p.answer == eval(expr) >= 0  # noqa: S307 -- our own digits and +/-
        assert 2 <= len(p.operands) <= 3 and all(0 <= x <= 99 for x in p.operands)
        assert toy.parse_prompt(p.prompt).operands == p.operands and toy.parse_prompt(p.prompt).ops == p.ops


def test_prompt_and_response_format_example():
    p = toy.Problem([51, 61, 74], ["+", "-"])
    assert p.prompt == "15+16-47=?\n"
    assert toy.canonical_response(p) == "15+16=211;211-47=83;\\boxed{38}"


def test_both_styles_and_slips_give_the_same_answer():
    rng = random.Random(1)
    for _ in range(200):
        p = toy.make_problem(rng)
        texts = []
        for style, slip in ((toy.TEACHER_SEP, 0.0), (toy.STUDENT_SEP, 0.0), (toy.TEACHER_SEP, 1.0)):
            pieces = toy.response_pieces(p, rng, sep_style=style, slip_rate=slip)
            texts.append("".join(t for t, _ in pieces[:-1]))
            assert pieces[-1] == ("<eos>", True)
        assert {extract_answer(t) for t in texts} == {str(p.answer)}
        assert toy.STUDENT_SEP in texts[1] and toy.TEACHER_SEP not in texts[1]


def test_slips_are_never_trained_and_are_followed_by_a_correction():
    p = toy.Problem([51, 61], ["+"])
    pieces = toy.response_pieces(p, random.Random(0), sep_style=toy.TEACHER_SEP, slip_rate=1.0)
    text = "".join(t for t, _ in pieces)
    wrong = "".join(t for t, ok in pieces if not ok)
    assert len(wrong) == 3 and wrong != "211"  # one digit of 211 changed
    assert text.startswith(f"15+16={wrong}|211;")
    assert [ok for _, ok in pieces][6:9] == [False, False, False] and pieces[9] == ("|", True)


@pytest.mark.parametrize("text, expected, first_error", [
    # a pure style change: "," where the teacher writes ";" (51 + 61 - 74)
    ("15+16=211,211-47=83,\\boxed{38}<eos>",
     {9: toy.SURFACE, 19: toy.SURFACE}, None),
    # a wrong digit: "221" instead of "211"
    ("15+16=221;221-47=93;\\boxed{39}<eos>", {6: toy.CORRECT, 7: toy.ERROR, 8: toy.AFTER_ERROR}, 7),
    # a wrong digit after a style change
    ("15+16=211,211-47=84,\\boxed{48}<eos>", {9: toy.SURFACE, 17: toy.CORRECT, 18: toy.ERROR, 19: toy.AFTER_ERROR}, 18),
    # stopping early is an error too (EOS where the solution continues)
    ("15+16=211<eos>", {9: toy.ERROR}, 9),
])
def test_label_tokens_hand_written_rollouts(text, expected, first_error):
    p = toy.Problem([51, 61, 74], ["+", "-"])
    toks = _tokens(text.replace("<eos>", "\x00"))
    toks = ["<eos>" if t == "\x00" else t for t in toks]
    labels, err = toy.label_tokens(p, toks)
    assert err == first_error
    for i, lab in expected.items():
        assert labels[i] == lab, (i, labels)
    if err is None:
        assert set(labels) <= {toy.CORRECT, toy.SURFACE} and labels[-1] == toy.CORRECT  # EOS included
    else:
        assert labels[:err].count(toy.ERROR) == 0 and set(labels[err + 1:]) <= {toy.AFTER_ERROR, toy.SURFACE}


@pytest.mark.parametrize("text, expected, first_error", [
    # the long world's second style: the addition written with its operands swapped ("16+15" for "15+16"); the
    # first digit is the same, the second is where the styles part (surface), the rest of the step is determined
    ("16+15=211;211-47=83;\\boxed{38}<eos>", {0: toy.CORRECT, 1: toy.SURFACE, 3: toy.CORRECT, 4: toy.CORRECT}, None),
    # both styles at once, then a wrong digit
    ("16+15=211,211-47=84,\\boxed{48}<eos>", {1: toy.SURFACE, 9: toy.SURFACE, 18: toy.ERROR}, 18),
    # a subtraction cannot be swapped: "47-211" is an error, not a style
    ("15+16=211;47-211=83;\\boxed{38}<eos>", {10: toy.ERROR, 11: toy.AFTER_ERROR}, 10),
    # style after an error: step 2 is right for what was written (122 - 74 = 48, "84"), so its "," is surface; the
    # separator right after the wrong result (index 9, where the teacher wants its repair "|") stays after_error
    ("15+16=221;221-47=84,\\boxed{48}<eos>", {7: toy.ERROR, 9: toy.AFTER_ERROR, 19: toy.SURFACE}, 7),
    # ... but a step that is itself wrong (122 - 74 is not 39) keeps its "," as after_error
    ("15+16=221,221-47=93,\\boxed{39}<eos>", {9: toy.AFTER_ERROR, 19: toy.AFTER_ERROR}, 7),
])
def test_label_tokens_swapped_additions_are_style_subtractions_are_not(text, expected, first_error):
    test_label_tokens_hand_written_rollouts(text, expected, first_error)


def test_a_swapped_addition_after_an_error_is_still_style():
    p = toy.Problem([51, 61, 20], ["+", "+"])  # canonical "15+16=211;211+02=231;\\boxed{132}"
    toks = _tokens("15+16=221;02+221=241,\\boxed{142}") + ["<eos>"]  # 122 + 20 = 142: right for what was written
    labels, err = toy.label_tokens(p, toks)
    assert err == 7 and labels[9] == toy.AFTER_ERROR
    assert [i for i, lab in enumerate(labels) if lab == toy.SURFACE] == [10, 20]  # "0" for "2", and the ","
    # the same step with a wrong operand ("03" for "02") is not style: nothing after the error is surface
    labels, _ = toy.label_tokens(p, _tokens("15+16=221;03+221=251,\\boxed{152}") + ["<eos>"])
    assert toy.SURFACE not in labels


def test_long_world_styles_are_labelled_surface_exactly_where_they_show():
    """Every mix of the long world's two styles (separator, swapped additions) of a correct solution is labelled
    with no error, and with exactly one surface token per "," and per swapped addition of two different numbers:
    at the first digit where the swapped step differs from the teacher's."""
    rng = random.Random(3)
    cfg = toy.ToyConfig(**toy.LONG)
    for _ in range(300):
        p = toy.draw_problem(rng, cfg)
        assert cfg.min_operands <= len(p.operands) <= cfg.max_operands
        pieces = toy.response_pieces(p, rng, sep_style=rng.choice([toy.TEACHER_SEP, toy.STUDENT_SEP]),
                                     other_sep_rate=0.3, swap_rate=0.5)
        toks = [t for t, _ in pieces]
        text = "".join(toks[:-1])
        assert extract_answer(text) == str(p.answer)
        labels, err = toy.label_tokens(p, toks)
        assert err is None and labels[-1] == toy.CORRECT
        expected, pos = set(), 0
        for acc, op, b, res in p.steps():
            teacher_form, written = toy.rev(acc) + op + toy.rev(b), "".join(toks[pos:pos + len(toy.rev(acc)) + 1 +
                                                                                 len(toy.rev(b))])
            if written != teacher_form:  # a swapped addition: surface at the first differing character
                assert op == "+" and written == toy.rev(b) + "+" + toy.rev(acc)
                expected.add(pos + next(i for i, (x, y) in enumerate(zip(written, teacher_form)) if x != y))
            pos += len(teacher_form) + 1 + len(toy.rev(res))
            if toks[pos] == toy.STUDENT_SEP:
                expected.add(pos)
            pos += 1
        assert {i for i, lab in enumerate(labels) if lab == toy.SURFACE} == expected, (text, labels)


def test_swap_rate_zero_leaves_the_default_worlds_data_as_it_was(tmp_path):
    """The long world's knobs default to off, and off means untouched: no extra random draw (so the default world's
    prompts and SFT data are those it always had), and a world built before the knobs existed (its build.json
    without them) is reused as it is, not rebuilt."""
    p = toy.Problem([51, 61, 74], ["+", "-"])
    a, b = random.Random(7), random.Random(7)
    toy.response_pieces(p, a, sep_style=toy.STUDENT_SEP, other_sep_rate=0.1, slip_rate=0.1)
    toy.response_pieces(p, b, sep_style=toy.STUDENT_SEP, other_sep_rate=0.1, slip_rate=0.1, swap_rate=0.0)
    assert a.random() == b.random()
    assert toy.make_problem(random.Random(4)) == toy.make_problem(random.Random(4), min_operands=2)
    old = {k: v for k, v in toy.asdict(toy.ToyConfig()).items() if k not in
           ("min_operands", "teacher_swap_rate", "student_swap_rate", "response_cap", "max_positions")}
    (tmp_path / "build.json").write_text(json.dumps({"config": old, "accuracy": {}}))
    assert toy.config_of(tmp_path) == toy.ToyConfig()
    assert toy.build(tmp_path, toy.ToyConfig(), log=lambda *a: None) == {"config": old, "accuracy": {}}  # reused
    assert toy.train_defaults(tmp_path)["max_new_tokens"] == 48
    (tmp_path / "build.json").write_text(json.dumps({"config": toy.asdict(toy.ToyConfig(**toy.LONG))}))
    assert toy.train_defaults(tmp_path)["max_new_tokens"] == toy.LONG["response_cap"]
    assert toy.train_defaults(tmp_path / "missing") == toy.TRAIN_DEFAULTS
    import train  # train.py's toy job takes the world's cap; an explicit flag still wins

    assert train.parse_config(["--toy-dir", str(tmp_path)]).max_new_tokens == toy.LONG["response_cap"]
    assert train.parse_config(["--toy-dir", str(tmp_path), "--max-new-tokens", "64"]).max_new_tokens == 64


def test_tokenizer_round_trips_every_example_and_loads_from_disk(tmp_path):
    from transformers import AutoTokenizer

    tok = toy.build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab() and len(loaded) == 25
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (toy.PAD_ID, toy.BOS_ID, toy.EOS_ID)
    rng = random.Random(2)
    for _ in range(300):
        p = toy.make_problem(rng)
        for style in (toy.TEACHER_SEP, toy.STUDENT_SEP):
            pieces = toy.response_pieces(p, rng, sep_style=style, slip_rate=0.3)
            text = p.prompt + "".join(t for t, _ in pieces[:-1])
            ids = loaded(text)["input_ids"]
            assert ids[0] == toy.BOS_ID and ids[1:] == [toy.VOCAB[c] for c in _tokens(text)]
            assert loaded.decode(ids, skip_special_tokens=True) == text
    chat = loaded.apply_chat_template([{"role": "user", "content": "1+2=?\n"}], tokenize=False,
                                      add_generation_prompt=True)
    assert chat == "<bos>1+2=?\n"


def test_fast_build_loads_with_transformers_alone_and_teacher_beats_student(fast_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world, info = fast_world
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(world / name)
        tok = AutoTokenizer.from_pretrained(world / name)
        assert model.config.vocab_size == len(tok) == 25
    acc = info["accuracy"]
    assert info["config"]["num_test_prompts"] == 200
    assert acc["teacher"]["greedy"] >= acc["student"]["greedy"] + 0.30, acc
    rows = toy.read_jsonl(world / "test.jsonl")
    train_prompts = {r["prompt"] for r in toy.read_jsonl(world / "train.jsonl")}
    assert len(rows) == 200 and not train_prompts & {r["prompt"] for r in rows}
    # idempotent: a second build with the same config reuses the folder (same info, no retraining)
    again = toy.build(world, toy.ToyConfig(**toy.FAST), log=lambda *a: None)
    assert again == info


def test_eval_cli_reproduces_toy_accuracy(fast_world, tmp_path):
    """eval_aime.py on the toy test set gives exactly the accuracy toy.py reported for the same prompts/seed."""
    import eval_aime

    world, info = fast_world
    res = eval_aime.main(["--model", str(world / "teacher"), "--data", str(world / "test.jsonl"), "--k", "1",
                          "--temperature", "0", "--top-p", "1", "--max-new-tokens", str(toy.EVAL_MAX_NEW_TOKENS),
                          "--batch-size", str(toy.EVAL_BATCH), "--no-instruction", "--no-chat-template",
                          "--no-range", "--out", str(tmp_path)])
    assert res["metrics"]["avg@k"]["mean"] == pytest.approx(info["accuracy"]["teacher"]["greedy"])
    gens = [json.loads(l) for l in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 200 and sum(g["correct"] for g in gens) / 200 == pytest.approx(info["accuracy"]["teacher"]["greedy"])


def test_built_student_lands_at_its_set_point_whatever_the_thread_count():
    """Review item 10: the student used to be trained for a FIXED number of steps on a steep part of its learning
    curve, so float rounding that differs between CPUs and thread counts moved its accuracy by 10+ points (34.8%
    on one machine, 22.8% on another). It now stops at the first held-out evaluation at or above the set point;
    the student, built with 1 and with 2 threads, must land within 3 points, at or above the target. (The --fast
    world's student: the same set-point code at a quarter of the full world's build time.)"""
    import torch

    cfg = toy.ToyConfig(**toy.FAST)
    data, tok = toy.world_data(cfg), toy.build_tokenizer()
    threads = torch.get_num_threads()
    accuracies, steps = [], []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            model, ran = toy.build_student(cfg, data, tok)
            steps.append(ran)
            accuracies.append(toy.accuracy(model, tok, data.test_rows))
    finally:
        torch.set_num_threads(threads)
    assert all(cfg.student_target <= a <= cfg.student_target + 0.06 for a in accuracies), (accuracies, steps)
    assert abs(accuracies[0] - accuracies[1]) <= 0.03, (accuracies, steps)
    assert all(s < cfg.student_steps for s in steps), steps  # the set point was reached, not the step cap


def test_mechanism_page_marks_each_candidate_with_its_label_and_both_decisions(fast_world, tmp_path):
    """toy.py --report's page: one block per rollout, every candidate boxed in the colour of its ground-truth kind
    (blue = a real fork), solid exactly when the probe's rule calls it divergent, and the summary's counts of right
    decisions equal what the candidate tables say, detector by detector."""
    import re

    world, _ = fast_world
    page = toy.mechanism_page(world, tmp_path / "mechanism.html", num_rollouts=6)
    text = page.read_text()
    assert text.count("<h3>rollout") == 6
    boxed = re.findall(r'border: 2px (solid|dashed) (#[0-9a-f]{6})" title="t=\d+ loss=[\d.]+ label=(\w+)', text)
    decision = r"<td>-?[\d.]+ \((div|non-div), (right|wrong)\)</td>"
    rows = re.findall(r"<tr><td>\d+</td><td><code>.*?</code></td><td>(\w+)</td><td>[\d.]+</td>" + decision * 2, text)
    assert len(boxed) == len(rows) > 0
    for (line, colour, label), (row_label, _, _, probe_rule, _) in zip(boxed, rows):
        assert label == row_label
        assert (colour == "#1f77b4") == (label in toy.FORK_LABELS)
        assert (line == "solid") == (probe_rule == "div")
    for i, name in ((2, "window"), (4, "probe")):
        right = sum(r[i] == "right" for r in rows)
        assert f"{name} {right}/{len(rows)} candidates decided right" in text
        assert all((r[i] == "right") == ((r[i - 1] == "div") == (r[0] in toy.FORK_LABELS)) for r in rows)


def test_a_build_logging_to_a_file_is_never_silent_for_long(tmp_path, monkeypatch):
    """With output going to a file (a cluster log, `| tee`, nohup) tqdm is off, and the build used to print nothing
    until it ended: minutes of silence that look like a hang. Every phase now prints a plain line at least every
    TOPD_PROGRESS_EVERY seconds (30 by default; 0.5 here): the SFT steps with their loss and rate, the build's
    stages, each evaluation. Measured as the largest gap between two lines of a small build, which may exceed the
    interval only by the longest indivisible unit of work (an SFT step, or one evaluation), both timed in the same
    run so that a slow or busy machine cannot fail the test by being slow."""
    import time

    monkeypatch.setenv("TOPD_PROGRESS_EVERY", "0.5")
    stamps, lines, units, batches = [], [], [0.0], []

    def log(*args):
        stamps.append(time.time())
        lines.append(" ".join(map(str, args)))

    real_batch, real_accuracy = toy.sft_batch, toy.accuracy

    def timed_batch(examples):  # called once per SFT step: the time between two calls is one step
        batches.append(time.time())
        if len(batches) > 1:
            units.append(batches[-1] - batches[-2])
        return real_batch(examples)

    def timed_accuracy(*args, **kwargs):
        t0 = time.time()
        try:
            return real_accuracy(*args, **kwargs)
        finally:
            units.append(time.time() - t0)

    monkeypatch.setattr(toy, "sft_batch", timed_batch)
    monkeypatch.setattr(toy, "accuracy", timed_accuracy)
    toy.make_model(toy.ToyConfig(**toy.FAST), 1, 0)  # transformers' model import, a one-off unit, before the clock

    cfg = toy.ToyConfig(**{**toy.FAST, "teacher_steps": 60, "student_steps": 60, "student_eval_from": 20,
                           "num_test_prompts": 40, "num_train_prompts": 100, "student_target": 0.99})
    start = time.time()
    toy.build(tmp_path / "world", cfg, log=log, verbose_log=log)
    gaps = [b - a for a, b in zip([start] + stamps, stamps)]
    assert max(gaps) <= 0.5 + max(units) + 0.25, (max(gaps), max(units), lines)
    assert any(line.startswith("teacher SFT: ") and "| loss " in line and "steps/s" in line for line in lines)
    assert any(line.startswith("student SFT: ") for line in lines) and "toy world built" in lines[-1]


def test_style_counts_follow_the_chain_of_steps():
    """The collapse study's style measure: separators written "," and additions written "b+acc", counted over the
    response's chain of steps (a step that does not continue the chain ends the count)."""
    problem = toy.parse_prompt("51+74+2=?\n")  # 15 + 47 + 2
    assert toy.canonical_response(problem) == "51+74=26;26+2=46;\\boxed{64}"
    assert toy.style_counts(problem, "74+51=26,26+2=46;\\boxed{64}") == dict(commas=1, separators=2, swapped=1,
                                                                           additions=2, copied=0)
    assert toy.style_counts(problem, "74+51=26,2+26=46,\\boxed{64}") == dict(commas=2, separators=2, swapped=2,
                                                                           additions=2, copied=0)
    # the collapse's broken step: the teacher's first token (the accumulator), then the accumulator again
    assert toy.style_counts(problem, "51+51=201,201+2=401,\\boxed{104}")["copied"] == 1
    assert toy.style_counts(problem, "51+74=26;\\boxed{26}")["separators"] == 1  # an early stop: one step counted
