"""Tests for the model-free half of eval_aime.py: extraction, normalisation, grading, metrics, loading.

Every test asserts a value (the extracted answer, the metric, the error message), so a regression in the
grader -- the one function both AIME and the toy world trust -- shows up here first.
"""

import itertools
import json
import math
import sys
from pathlib import Path

import pytest

# The concept files live flat in the repo root (no package): make them importable from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval_aime import (  # noqa: E402
    INSTRUCTION,
    _rows_to_problems,
    avg_at_k,
    extract_answer,
    extract_boxed,
    is_correct,
    load_problems,
    normalize_answer,
    pass_at_k,
)


# -----------------------------------------------------------------------------
# extraction + normalisation: a table of hand-written model outputs -> graded answer

EXTRACT_CASES = [
    # plain and nested
    ("The answer is \\boxed{204}.", "204"),
    ("so $x = \\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
    ("\\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),
    ("\\boxed{{197}}", "197"),  # redundant outer braces around the whole answer (issue: read as "{197}")
    ("\\boxed{{{7}}}", "7"),
    ("\\boxed{ {42} }", "42"),
    ("\\boxed{{1}{2}}", "{1}{2}"),  # two groups, not one redundant wrapper: left alone, graded wrong
    # several boxes: the last one wins (the model revised its answer)
    ("First I got \\boxed{12}, but that is wrong. Final: \\boxed{13}", "13"),
    ("\\boxed{1} \\boxed{2} \\boxed{3}", "3"),
    # box in the middle of the reasoning, followed by more text
    ("Thus m+n = \\boxed{116}. Let me double check: 116 = 97 + 19, consistent.", "116"),
    ("<think>long chain</think>\nThe final answer is $\\boxed{540}$.\n\nI hope this helps!", "540"),
    # integer normalisation
    ("\\boxed{033}", "33"),
    ("\\boxed{000}", "0"),
    ("\\boxed{33.}", "33"),
    ("\\boxed{\\text{33}}", "33"),
    ("\\boxed{\\textbf{33}}", "33"),
    ("\\boxed{\\mathrm{33}}", "33"),
    ("\\boxed{ 33 }", "33"),
    ("$\\boxed{1,000}$", "1000"),
    ("\\boxed{1\\,000}", "1000"),
    ("\\boxed{1{,}000}", "1000"),
    ("\\boxed{+7}", "7"),
    ("\\boxed{-3}", "-3"),
    ("\\boxed{-0}", "0"),
    ("\\boxed{12.0}", "12"),
    ("\\boxed{12.00}", "12"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{90^{\\circ}}", "90"),
    ("\\boxed{\\$5}", "5"),
    ("\\boxed{\\text{ $204$ }}", "204"),
    ("\\boxed{~42~}", "42"),
    # \fbox and the brace-less form
    ("\\fbox{12}", "12"),
    ("\\boxed 5", "5"),
    ("$\\boxed 5$ is the answer", "5"),
    ("\\boxed {17}", "17"),
    # no answer: no box, empty box, unclosed (truncated) box
    ("The answer is 204.", None),
    ("", None),
    ("\\boxed{}", None),
    ("\\boxed{ }", None),
    ("\\boxed{\\text{}}", None),
    ("\\boxed{12", None),
    ("\\boxed{\\frac{1}{2}", None),
    ("earlier \\boxed{5}, then truncated mid-answer \\boxed{7", None),  # no fallback to the earlier box
    ("ends with \\boxed", None),
    # unicode around the box
    ("答案是 \\boxed{42}", "42"),
    ("→ \\boxed{7} ✓", "7"),
    ("Réponse : \\boxed{ 25 } — fin", "25"),
    # non-integers are cleaned but otherwise left alone
    ("\\boxed{\\frac{1}{2}.}", "\\frac{1}{2}"),
    ("\\boxed{1,2}", "1,2"),  # not a thousands grouping: stays a list
    ("\\boxed{0.5}", "0.5"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not close the box
    # macros that merely start with "boxed"/"fbox" are not boxes
    ("\\fboxsep=2pt \\boxed{8}", "8"),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer_table(text, expected):
    assert extract_answer(text) == expected


def test_extract_table_is_large_enough():
    # The brief asks for at least 30 hand-written outputs; keep the table from silently shrinking.
    assert len(EXTRACT_CASES) >= 30


def test_extract_boxed_raw_content():
    # extract_boxed returns the raw content; only normalize_answer cleans it.
    assert extract_boxed("\\boxed{ 033 }") == " 033 "
    assert extract_boxed("\\boxed{}") == ""
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{a\\\\b}") == "a\\\\b"  # `\\` (TeX line break) consumed as a pair
    assert extract_boxed("\\boxed{5\\}") is None  # `\}` is a literal brace, so the box never closes


def test_normalize_answer_direct():
    assert normalize_answer(None) is None
    assert normalize_answer("   ") is None
    assert normalize_answer("$$") is None
    assert normalize_answer("0033") == "33"
    assert normalize_answer("12,345,678") == "12345678"
    assert normalize_answer("\\frac{1}{2}") == "\\frac{1}{2}"
    assert normalize_answer("  x + 1 ") == "x + 1"  # inner spaces of non-integers are kept


def test_instruction_is_the_standard_one():
    assert INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."


# -----------------------------------------------------------------------------
# grading


@pytest.mark.parametrize(
    "predicted,reference,kwargs,expected",
    [
        ("204", "204", {}, True),
        ("33", "033", {}, True),  # zero-padded reference (Qwen2.5-Math style data)
        ("025", "25", {}, True),  # raw predictions are normalised too
        ("24", "25", {}, False),
        (None, "25", {}, False),
        ("", "25", {}, False),
        ("\\frac{1}{2}", "25", {}, False),  # a non-integer can never match an integer answer
        ("25.5", "25", {}, False),
        ("1025", "25", {}, False),
        ("1000", "1000", {}, False),  # outside AIME's 0..999 range
        ("1000", "1000", {"integer_range": None}, True),  # range check disabled (toy world)
        ("-3", "-3", {}, False),
        ("-3", "-3", {"integer_range": None}, True),
        ("-3", "-3", {"integer_range": (-10, 10)}, True),
        ("0", "0", {}, True),
        ("999", "999", {}, True),
        ("\\frac{1}{2}", "\\frac{1}{2}", {}, True),  # non-integer reference: string comparison
        ("\\frac{1}{2}", "\\frac12", {}, False),  # no symbolic equivalence
        ("1,2", "1,2", {}, True),
        (None, "\\frac{1}{2}", {}, False),
    ],
)
def test_is_correct(predicted, reference, kwargs, expected):
    assert is_correct(predicted, reference, **kwargs) is expected


def test_is_correct_end_to_end():
    # A realistic completion graded through extract_answer, as the eval loop will do.
    completion = "... so the number of minutes is $\\boxed{204}$."
    assert is_correct(extract_answer(completion), "204")
    assert not is_correct(extract_answer(completion + " Wait, recheck: \\boxed{205}"), "204")
    assert not is_correct(extract_answer("... so the number of minutes is \\boxed{20"), "204")


# -----------------------------------------------------------------------------
# metrics


def _pass_at_k_brute(n, c, k):
    """Fraction of all k-subsets of n samples (the first c correct) that contain a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    checked = 0
    for n in range(1, 7):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12), (n, c, k)
                checked += 1
    assert checked == sum((n + 1) * n for n in range(1, 7))  # every (n, c, k) was visited


def test_pass_at_k_edges_and_hand_cases():
    for n in range(1, 9):
        for k in range(1, n + 1):
            assert pass_at_k(n, 0, k) == 0.0
            assert pass_at_k(n, n, k) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs contain the correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 == c / n
    # large n: the product form stays finite and matches exact integer binomials
    exact = 1 - math.comb(1024 - 100, 64) / math.comb(1024, 64)
    assert pass_at_k(1024, 100, 64) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize(
    "args,name",
    [
        ((4, 1, 5), "k"),  # k > n
        ((4, 5, 2), "c"),  # c > n
        ((4, -1, 2), "c"),
        ((4, 1, 0), "k"),
        ((4, 1, -1), "k"),
        ((0, 0, 0), "n"),
        ((-1, 0, 1), "n"),
    ],
)
def test_pass_at_k_bad_args(args, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        pass_at_k(*args)


def test_pass_at_k_rejects_floats():
    with pytest.raises(TypeError):
        pass_at_k(4.0, 1, 2)


def test_avg_at_k():
    assert avg_at_k([2, 0, 4], 4) == pytest.approx(0.5)
    assert avg_at_k([0, 0], 8) == 0.0
    assert avg_at_k([8, 8, 8], 8) == 1.0
    assert avg_at_k([1], 1) == 1.0
    assert avg_at_k([3, 1], 4) == pytest.approx(0.5)
    # equals the mean of per-problem pass@1
    counts, n = [5, 0, 16, 7], 16
    assert avg_at_k(counts, n) == pytest.approx(sum(pass_at_k(n, c, 1) for c in counts) / len(counts))
    with pytest.raises(ValueError, match="empty"):
        avg_at_k([], 4)
    with pytest.raises(ValueError, match=r"correct_counts\[1\]"):
        avg_at_k([1, 5], 4)
    with pytest.raises(ValueError, match="n"):
        avg_at_k([0], 0)


# -----------------------------------------------------------------------------
# loading

# Real rows copied from data/aime24.jsonl and data/aime25.jsonl (kept inline so that these tests read as examples).
REAL_ROWS = [
    {"id": "2024-I-2", "problem": "There exist real numbers $x$ and $y$, both greater than 1, such that "
     "$$\\log_x(y^x) = \\log_y(x^{4y}) = 10.$$ Find $xy$.", "answer": "25",
     "source": "eth-sri/matharena/data/aime/aime_2024_I/problems/2.tex"},
    {"id": "2024-I-7", "problem": "Find the largest possible real part of $$(75+117i)z+\\frac{96+144i}{z}$$"
     "where $z$ is a complex number with $|z|=4$.", "answer": "540",
     "source": "eth-sri/matharena/data/aime/aime_2024_I/problems/7.tex"},
    {"id": "2025-I-1", "problem": "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of "
     "$97_b.$", "answer": "70", "source": "eth-sri/matharena/data/aime/aime_2025_I/problems/1.tex"},
]


def _write(tmp_path, lines, name="problems.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_problems_real_rows(tmp_path):
    path = _write(tmp_path, [json.dumps(r) for r in REAL_ROWS])
    problems = load_problems(str(path))
    assert [p["id"] for p in problems] == ["2024-I-2", "2024-I-7", "2025-I-1"]
    assert [p["answer"] for p in problems] == ["25", "540", "70"]
    assert problems[1]["problem"].startswith("Find the largest possible real part of $$(75+117i)z")
    assert set(problems[0]) == {"id", "problem", "answer"}  # extra fields (source) are dropped


def test_load_problems_alt_fields_default_ids_blank_lines(tmp_path):
    path = _write(tmp_path, [
        json.dumps({"question": "What is 2+3?", "answer": 5}),  # numeric answer -> "5"
        "",
        "   ",
        json.dumps({"prompt": "What is 7*6?", "answer": "42"}),
    ])
    problems = load_problems(str(path))
    # blank lines skipped; default id = 0-based line index (line 4 -> "3")
    assert problems == [
        {"id": "0", "problem": "What is 2+3?", "answer": "5"},
        {"id": "3", "problem": "What is 7*6?", "answer": "42"},
    ]


@pytest.mark.parametrize(
    "bad_line,what",
    [
        ('{"problem": "x", "answer": "1"', "not valid JSON"),
        ('["problem", "answer"]', "JSON object"),
        ('{"problem": "Find x.", "id": "a"}', "missing answer"),
        ('{"problem": "Find x.", "answer": ""}', "missing answer"),
        ('{"problem": "Find x.", "answer": null}', "missing answer"),
        ('{"problem": "", "answer": "3"}', "empty"),
        ('{"problem": "   ", "answer": "3"}', "empty"),
        ('{"text": "Find x.", "answer": "3"}', "missing problem text"),
    ],
)
def test_load_problems_bad_line_names_file_and_line(tmp_path, bad_line, what):
    # The bad line is line 3 (after one good row and one blank line): the message must say `path:3`.
    path = _write(tmp_path, [json.dumps(REAL_ROWS[0]), "", bad_line, json.dumps(REAL_ROWS[1])])
    with pytest.raises(ValueError) as err:
        load_problems(str(path))
    assert f"{path}:3:" in str(err.value)
    assert what in str(err.value)


def test_rows_to_problems_hub_schemas():
    # Maxwell-Jia/AIME_2024: ID / Problem / Solution / Answer (answer stored as an integer)
    maxwell = [{"ID": "2024-I-1", "Problem": "Every morning Aya goes ...", "Solution": "...", "Answer": 204}]
    assert _rows_to_problems(maxwell, "Maxwell-Jia/AIME_2024") == [
        {"id": "2024-I-1", "problem": "Every morning Aya goes ...", "answer": "204"}]
    # HuggingFaceH4/aime_2024: integer id, string answer, extra url / year / solution
    h4 = [{"id": 60, "problem": "Every morning Aya goes ...", "solution": "...", "answer": "204",
           "url": "https://artofproblemsolving.com/...", "year": "2024"}]
    assert _rows_to_problems(h4, "HuggingFaceH4/aime_2024") == [
        {"id": "60", "problem": "Every morning Aya goes ...", "answer": "204"}]
    # math-ai/aime25: problem / answer / id (string id)
    mathai = [{"problem": "Find the sum of all integer bases $b>9$ ...", "answer": "70", "id": "0"},
              {"problem": "On $\\triangle ABC$ ...", "answer": "588", "id": "1"}]
    assert _rows_to_problems(mathai, "math-ai/aime25") == [
        {"id": "0", "problem": "Find the sum of all integer bases $b>9$ ...", "answer": "70"},
        {"id": "1", "problem": "On $\\triangle ABC$ ...", "answer": "588"}]
    # rows without any id get their 0-based index
    assert [p["id"] for p in _rows_to_problems([{"question": "a", "answer": 1}, {"question": "b", "answer": 2}],
                                               "x")] == ["0", "1"]


def test_rows_to_problems_bad_row_names_source_and_row():
    rows = [{"Problem": "ok", "Answer": 1}, {"Problem": "no answer here"}]
    with pytest.raises(ValueError, match=r"Maxwell-Jia/AIME_2024:row 1: missing answer"):
        _rows_to_problems(rows, "Maxwell-Jia/AIME_2024")


# ---------------------------------------------------------------------------------------------------------------
# end to end: a tiny byte-level model through the real CLI on the AIME 2024 file

def _tiny_bytelevel_checkpoint(path, texts):
    """A byte-level BPE tokenizer trained on `texts` + a random 2-layer Llama, saved like any hub checkpoint."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}assistant:"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def test_cli_end_to_end_on_aime24_with_a_tiny_model(tmp_path):
    from eval_aime import DATASETS
    data = DATASETS["aime24"]  # the repository's own offline copy, data/aime24.jsonl
    problems = load_problems(data)
    _tiny_bytelevel_checkpoint(tmp_path / "model", [p["problem"] for p in problems] + [INSTRUCTION])
    out = tmp_path / "eval"
    from eval_aime import main
    result = main(["--model", str(tmp_path / "model"), "--data", "aime24", "--k", "2", "--max-new-tokens", "16",
                   "--batch-size", "16", "--device", "cpu", "--out", str(out)])
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(problems) == 30 and len(gens) == 60
    from collections import Counter
    assert Counter(g["id"] for g in gens) == {p["id"]: 2 for p in problems}  # every problem exactly k times
    saved = json.loads((out / "results.json").read_text())
    assert saved["problems"] == 30 and saved["k"] == 2
    # a random model never closes a box in 16 tokens: all wrong, and the numbers say so consistently
    assert result["metrics"]["avg@k"]["mean"] == sum(g["correct"] for g in gens) / 60
    assert result["metrics"]["truncated_frac"]["mean"] == sum(g["truncated"] for g in gens) / 60
    assert all(g["tokens"] <= 16 for g in gens)


# ------------------------------------------------------------------------------- evaluation under torchrun

def _toy_eval_setup():
    """A tiny random Llama over the toy tokenizer, and 7 toy problems."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from toy import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    problems = [{"id": str(i), "problem": f"{i}+{i}=?\n", "answer": str(2 * i)} for i in range(7)]
    return model, tok, problems


def test_evaluation_batches_come_from_a_token_budget_and_every_rank_runs_as_many(monkeypatch):
    """train.py's held-out evaluation under torchrun: rows are dealt to the ranks in turn (no rank is left without
    work while another decodes, as 250-row batches left 6 of 8 ranks), batches are sized by a budget of KV-cached
    tokens (rows x (prompt + max_new_tokens): 250 rows x 8k tokens of cache was the old fixed batch), every rank runs
    the same number of batches under a sharded model (a stand-in batch, not recorded), generation runs under the
    autocast it is given, and each batch prints a line."""
    import contextlib

    import torch

    import eval_aime
    import sample

    model, tok, problems = _toy_eval_setup()
    sampling = sample.SamplingConfig(temperature=0.0, max_new_tokens=10)
    widest = max(len(i) for i in sample.encode_prompts(tok, [p["problem"] for p in problems])[0])
    calls, autocast_on = [], []
    real = sample.sample_rollouts
    monkeypatch.setattr(sample, "sample_rollouts", lambda m, ids, **kw: calls.append(len(ids)) or real(m, ids, **kw))
    hook = model.register_forward_pre_hook(lambda m, a: autocast_on.append(torch.is_autocast_enabled("cpu")))
    counts, lines = {}, []
    for rank in (0, 1):
        calls.clear()
        _, records = eval_aime.evaluate(model, tok, problems, k=1, sampling=sampling, rank=rank, world=2,
                                        batch_tokens=2 * (widest + 10), instruction=False, chat_template=False,
                                        integer_range=None, log=lines.append)
        counts[rank] = (list(calls), sorted(r["id"] for r in records))
    assert counts[0] == ([2, 2], ["0", "2", "4", "6"]) and counts[1] == ([2, 1], ["1", "3", "5"])
    assert len(lines) == 4 and lines[0].startswith("eval batch 1/2: 2 rows")
    # a sharded model (lockstep): rank 1 of 3 has 2 rows, rank 0 has 3 -> rank 1 runs a stand-in batch, unrecorded
    lockstep = sample.SamplingConfig(temperature=0.0, max_new_tokens=10, lockstep=True)
    calls.clear()
    _, records = eval_aime.evaluate(model, tok, problems, k=1, sampling=lockstep, rank=2, world=3,
                                    batch_tokens=1 * (widest + 10), instruction=False, chat_template=False,
                                    integer_range=None)
    assert calls == [1, 1, 1] and sorted(r["id"] for r in records) == ["2", "5"]
    # generation under the caller's autocast (train.py: bf16 on CUDA), never in the default dtype by accident
    autocast_on.clear()
    eval_aime.held_out_accuracy(model, tok, problems[:2], sampling=sampling, instruction=False, chat_template=False,
                                integer_range=None, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert autocast_on and all(autocast_on)
    autocast_on.clear()
    eval_aime.held_out_accuracy(model, tok, problems[:2], sampling=sampling, instruction=False, chat_template=False,
                                integer_range=None, autocast=contextlib.nullcontext)
    assert autocast_on and not any(autocast_on)
    hook.remove()
