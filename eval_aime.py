"""
eval_aime.py -- AIME evaluation: answer extraction, grading, avg@k / pass@k, and problem loading.

What is measured
----------------
The benchmark is AIME 2024 and AIME 2025: 30 problems each (contests I and II, 15 problems per contest).
Every AIME answer is an integer in 0..999, so grading is exact integer match -- no symbolic checker needed.

For each problem we sample k completions from the model and grade each one:

    avg@k  = mean accuracy over all 30 * k samples            (the paper's "average accuracy")
           = (1/P) sum_p c_p / k,    c_p = number of correct samples for problem p
    pass@k = probability that at least one of k samples is correct, estimated without bias from
             n >= k samples with c correct (Chen et al. 2021, "Evaluating LLMs trained on code"):
             pass@k = 1 - C(n - c, k) / C(n, k)

avg@k is what reasoning papers report as "pass@1 averaged over k samples" (e.g. DeepSeek-R1 uses k=64); it
has lower variance than a single greedy run, which on 30 problems moves by 3.3 points per problem.

Protocol (the field's convention; where the TOPD paper does not state a number, the value is our reconstruction)
------------------------------------------------------------------------------------------------------------
- prompt: the problem text followed by the standard instruction (INSTRUCTION below), put in the model's chat
  template as a single user turn.
- sampling: temperature 0.6, top-p 0.95, a long generation budget (32768 new tokens in DeepSeek-R1 / Qwen3
  style evaluations; long chains of thought on AIME routinely need > 16k tokens).
- grading: the answer is the content of the LAST \\boxed{...} in the completion (extract_answer), normalised
  (normalize_answer) and compared as an integer in 0..999 (is_correct).
- a completion that hits the token limit before closing its box, or never boxes an answer, counts as WRONG.
  We never fall back to "the last number in the text": that would reward truncated outputs.

extract_answer is the ONE grading function of the project: the toy world (toy.py) imports it too, so the toy
task and AIME are graded by identical code.

Data
----
- shipped with the repository, offline: data/aime24.jsonl and data/aime25.jsonl ({"id", "problem", "answer"} per
  line; provenance and licence in data/README.md), read with load_problems(path); `--data aime24` / `aime25`
  name these files.
- or any public Hugging Face dataset, read with load_hub_dataset(name): e.g. Maxwell-Jia/AIME_2024,
  HuggingFaceH4/aime_2024 (AIME 2024) and math-ai/aime25 (AIME 2025).

Try it (CPU, no model needed)
-----------------------------
    python -c "from eval_aime import extract_answer; print(extract_answer(r'so the answer is \\boxed{033}.'))"
    python -c "from eval_aime import pass_at_k; print(pass_at_k(n=16, c=4, k=8))"
    python -m pytest tests/test_eval_aime.py -q
"""

import contextlib
import dataclasses
import json
import math
import operator
import re
from pathlib import Path

# The standard instruction appended to every problem (DeepSeek-R1, Qwen2.5-Math, and most OPD papers use it
# verbatim). The model's final answer then sits in \boxed{}, which is what extract_boxed looks for.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


# -----------------------------------------------------------------------------
# answer extraction


# `\boxed` or `\fbox`, not followed by a letter (so `\boxedsep`-like macros are not boxes).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    r"""Content of the LAST \boxed{...} / \fbox{...} in `text`, or None.

    Examples:
        "so x = \boxed{\frac{1}{2}}."    -> "\frac{1}{2}"   (nested braces: brace counting)
        "\boxed{1} ... then \boxed{2}"   -> "2"             (the last box wins: models revise their answer)
        "\boxed 5"                        -> "5"             (brace-less TeX form: up to whitespace or `$`)
        "\boxed{}"                        -> ""              (empty; normalize_answer turns it into None)
        "\boxed{12"                       -> None            (unclosed: a completion truncated mid-answer)
        "no box here"                     -> None
    """
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    # Only the last box counts. If it is broken we return None rather than falling back to an earlier box:
    # an earlier box was an answer the model moved away from.
    i = matches[-1].end()
    # TeX allows spaces between the macro and its argument: `\boxed {5}` == `\boxed{5}`.
    while i < len(text) and text[i].isspace():
        i += 1
    if i == len(text):
        return None  # `\boxed` is the very last thing: truncated
    if text[i] != "{":
        # Brace-less form `\boxed 5`: the argument runs to the next whitespace or `$` (end of math mode).
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    # Brace counting from the opening `{`. A backslash escapes the next character, so `\{` and `\}` (literal
    # braces in set notation) do not count, and `\\` (a TeX line break) is consumed as a pair.
    depth, start, j = 0, i + 1, i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:j]
        j += 1
    return None  # ran off the end with the brace still open


# -----------------------------------------------------------------------------
# answer normalisation

# Formatting wrappers whose content is the answer: `\text{33}` -> `33`. `[^{}]*` matches innermost wrappers
# only; normalize_answer loops, so `\text{\mathrm{33}}` unwraps in two passes.
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|boldsymbol)\s*\{([^{}]*)\}")
# Degree signs: `90^\circ`, `90^{\circ}`, `90°`. AIME angle answers are graded as plain integers.
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
# TeX spacing commands that can sit inside a number (`1\,000`) or around it. `\ ` is an explicit space.
_SPACING_RE = re.compile(r"\\[,!;:> ]|~")
# Thousands separators only in a well-formed grouping (`1,000`, `12,345,678`), so a list `1,2` stays a list.
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# An integer, possibly written with a zero fractional part: `033`, `+7`, `-3`, `12.0`, `12.00`.
_INTEGER_RE = re.compile(r"[+-]?\d+(?:\.0+)?")


def _strip_outer_braces(s: str) -> str:
    """`{197}` -> `197`, but only when the first `{` closes at the very last character: `{1}{2}` is two groups
    and stays as it is. A TeX group that wraps the whole answer changes nothing in its meaning."""
    if len(s) < 2 or s[0] != "{" or s[-1] != "}":
        return s
    depth = 0
    for i, ch in enumerate(s):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return s[1:-1] if i == len(s) - 1 else s
    return s


def normalize_answer(s: str | None) -> str | None:
    r"""Canonical form of an answer string, or None if nothing is left.

    Integers get a canonical spelling, so string equality == integer equality:
        " 033 " -> "33"     "000" -> "0"     "$1,000$" -> "1000"    "\text{33}." -> "33"
        "+7"    -> "7"      "12.0" -> "12"   "90^\circ" -> "90"     "1\,000"     -> "1000"
        "\$5"   -> "5"      "-0"   -> "0"     "{197}"  -> "197"   "{{7}}"      -> "7"
    Anything else is only cleaned (whitespace, `$`, wrappers, spacing, trailing `.`) and otherwise returned
    unchanged, e.g. "\frac{1}{2}" -> "\frac{1}{2}", so the same function serves AIME and the toy world.
    """
    if s is None:
        return None
    prev = None
    # Cleaning steps can expose each other (`\text{ $33$ }` needs unwrap -> strip `$` -> strip spaces),
    # so repeat until nothing changes. Each pass only shortens the string, so this terminates.
    while s != prev:
        prev = s
        s = s.strip()
        s = s.replace("\\$", "")  # an escaped `\$` is a currency sign: drop it whole, not leave a `\`
        s = s.replace("$", "")  # math-mode delimiters carry no content
        s = _WRAPPER_RE.sub(r"\1", s)
        s = _SPACING_RE.sub("", s)
        s = _DEGREE_RE.sub("", s)
        s = s.replace("{,}", ",")  # `1{,}000` is how some TeX writers stop `,` adding space
        s = _strip_outer_braces(s)  # `{197}` -> `197`: a redundant group around the whole answer
        # A sentence-final period after the box content: "\boxed{33.}" -> "33".
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1]
    if s == "":
        return None  # empty box (or only formatting): no answer
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if _INTEGER_RE.fullmatch(s):
        # int() drops the sign `+`, leading zeros and (after we cut it) a zero fraction; `-0` becomes `0`.
        return str(int(s.split(".")[0]))
    return s


def extract_answer(text: str) -> str | None:
    """The graded answer of a completion: normalize_answer(extract_boxed(text)). None means no answer.

    Shared by AIME (this file) and the toy world (toy.py): keep the name and signature fixed.
    """
    return normalize_answer(extract_boxed(text))


# -----------------------------------------------------------------------------
# grading


def _as_int(s: str | None) -> int | None:
    """int(s) if s is a canonical integer string (as produced by normalize_answer), else None."""
    if s is not None and re.fullmatch(r"-?\d+", s):
        return int(s)
    return None


def is_correct(predicted: str | None, reference: str, integer_range: tuple[int, int] | None = (0, 999)) -> bool:
    """Is the extracted answer `predicted` correct for `reference`?

    - predicted None (no box, empty box, truncated) is wrong.
    - an integer reference is compared as an integer; a prediction that is not an integer is wrong, and with
      `integer_range=(lo, hi)` so is one outside [lo, hi] (AIME answers lie in 0..999; pass None to disable,
      e.g. for the toy world).
    - any other reference is compared as a normalised string (exact match, no symbolic equivalence).
    Both sides go through normalize_answer, so raw strings ("033", "$204$") are accepted too.
    """
    pred = normalize_answer(predicted)
    ref = normalize_answer(str(reference))
    if pred is None or ref is None:
        return False
    ref_int = _as_int(ref)
    if ref_int is None:
        return pred == ref
    pred_int = _as_int(pred)
    if pred_int is None:
        return False
    if integer_range is not None:
        lo, hi = integer_range
        if not lo <= pred_int <= hi:
            return False
    return pred_int == ref_int


# -----------------------------------------------------------------------------
# metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021).

        pass@k = 1 - C(n - c, k) / C(n, k)
               = 1 - prod_{i = n-c+1}^{n} (1 - k / i)      (product form: no huge binomials, no overflow)

    Worked example: n=4, c=1, k=2 -> 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5 (half of the 6 pairs contain the
    correct sample); product form: 1 - (1 - 2/4) = 0.5.
    """
    # operator.index accepts int-likes (numpy ints) and rejects floats such as 2.0, which would hide a bug.
    n, c, k = operator.index(n), operator.index(c), operator.index(k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if c < 0:
        raise ValueError(f"c must be >= 0, got c={c}")
    if c > n:
        raise ValueError(f"c must be <= n, got c={c} > n={n}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"k must be <= n, got k={k} > n={n}")
    if n - c < k:
        return 1.0  # every k-subset must contain a correct sample
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (i - k) / i; each factor lies in [0, 1).
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(correct_counts: list[int], n: int) -> float:
    """Mean accuracy over all samples: sum(correct_counts) / (len(correct_counts) * n).

    correct_counts[p] = how many of the n samples for problem p are correct. Example: counts [2, 0, 4], n=4
    -> (2 + 0 + 4) / 12 = 0.5. Equal to the mean over problems of pass_at_k(n, c_p, 1).
    """
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if len(correct_counts) == 0:
        raise ValueError("correct_counts is empty: no problems were evaluated")
    for p, c in enumerate(correct_counts):
        if not 0 <= c <= n:
            raise ValueError(f"correct_counts[{p}]={c} is outside 0..n={n}")
    return sum(correct_counts) / (len(correct_counts) * n)


# -----------------------------------------------------------------------------
# problem loading

# Field names seen in the wild, in priority order. Local JSONL uses problem/answer/id; the hub datasets use
# Problem/Answer/ID (Maxwell-Jia/AIME_2024) or problem/answer/id (HuggingFaceH4/aime_2024, math-ai/aime25).
_TEXT_KEYS = ("problem", "Problem", "question", "Question", "prompt")
_ANSWER_KEYS = ("answer", "Answer")
_ID_KEYS = ("id", "ID")


def _row_to_problem(row, index: int, require_answer: bool = True) -> dict:
    """One raw row -> {"id": str, "problem": str, "answer": str or None}. Raises ValueError saying what is
    wrong (the caller adds where: `path:lineno` or `source:row`). Training prompts may omit the answer
    (require_answer=False); evaluation data may not."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    # First present key wins; a present-but-empty text is an error, not a reason to look at the next key.
    text_key = next((key for key in _TEXT_KEYS if key in row), None)
    if text_key is None:
        raise ValueError(f"missing problem text (one of {', '.join(_TEXT_KEYS)})")
    text = row[text_key]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty or non-string problem text in field {text_key!r}")
    answer_key = next((key for key in _ANSWER_KEYS if key in row), None)
    # Answers come as strings ("204", "025") or numbers (204); None or "" means the row has no answer.
    has_answer = answer_key is not None and row[answer_key] is not None and str(row[answer_key]).strip() != ""
    if require_answer and not has_answer:
        raise ValueError(f"missing answer (one of {', '.join(_ANSWER_KEYS)})")
    id_key = next((key for key in _ID_KEYS if key in row), None)
    # Ids are always strings so they serialise the same in result files; default: the row's index.
    pid = str(row[id_key]) if id_key is not None else str(index)
    return {"id": pid, "problem": text, "answer": str(row[answer_key]).strip() if has_answer else None}


def load_problems(path: str, require_answer: bool = True) -> list[dict]:
    """Read a JSONL file of problems -> [{"id", "problem", "answer"}, ...] (all values str).

    Text comes from field `problem`, `question` or `prompt`; `answer` is required; `id` defaults to the
    0-based line index. Blank lines are skipped. A bad line raises ValueError("path:lineno: what is wrong"),
    lineno 1-based, so a broken data file fails loudly instead of silently shrinking the benchmark.
    """
    problems = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            try:
                problems.append(_row_to_problem(row, lineno - 1, require_answer))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return problems


def load_prompts(path: str, require_answer: bool) -> list[dict]:
    """load_problems for train.py's prompt files (training prompts need no answer, held-out ones do): a file
    with no rows is an error too."""
    rows = load_problems(path, require_answer=require_answer)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def _rows_to_problems(rows, source: str) -> list[dict]:
    """Hub rows (dicts in any of the known schemas) -> [{"id", "problem", "answer"}, ...].

    Schemas: Maxwell-Jia/AIME_2024 {ID, Problem, Solution, Answer}, HuggingFaceH4/aime_2024 {id, problem,
    solution, answer, url, year}, math-ai/aime25 {problem, answer, id}. Extra fields are dropped. A bad row
    raises ValueError("source:row i: what is wrong"), i 0-based.
    """
    problems = []
    for i, row in enumerate(rows):
        try:
            problems.append(_row_to_problem(row, i))
        except ValueError as e:
            raise ValueError(f"{source}:row {i}: {e}") from None
    return problems


def _read_parquet_rows(path: Path) -> list[dict]:
    """Rows of a parquet file as dicts. pyarrow or pandas are optional extras: imported only here."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        return pq.read_table(path).to_pylist()
    try:
        import pandas as pd
        return pd.read_parquet(path).to_dict("records")
    except ImportError:
        raise ImportError(f"reading {path.name} needs a parquet reader: pip install pyarrow") from None


def load_hub_dataset(name: str, split: str | None = None) -> list[dict]:
    """Download a public Hugging Face dataset repo and read its problems -> [{"id", "problem", "answer"}].

    name: e.g. "Maxwell-Jia/AIME_2024", "HuggingFaceH4/aime_2024", "math-ai/aime25".
    split: keep only data files whose path contains this string (e.g. "train", "test"); None reads every
    data file. (Maxwell-Jia/AIME_2024 has a single file without a split in its name: use split=None.)
    Needs network access the first time; later calls hit the local huggingface_hub cache.
    """
    # Lazy import: the rest of this file (and the tests) must work without huggingface_hub.
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("load_hub_dataset needs huggingface_hub: pip install huggingface_hub") from None
    suffixes = (".jsonl", ".json", ".parquet")
    root = Path(snapshot_download(repo_id=name, repo_type="dataset", allow_patterns=[f"*{s}" for s in suffixes]))
    # Sorted for a deterministic problem order; skip hidden folders (e.g. .cache) that are not data.
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if split is not None:
        files = [p for p in files if split in p.relative_to(root).as_posix()]
    # Concatenate the rows of every data file; the three readers below cover the formats those repos use.
    rows = []
    for p in files:
        if p.suffix == ".parquet":
            rows += _read_parquet_rows(p)
        elif p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as f:
                rows += [json.loads(line) for line in f if line.strip()]
        else:
            data = json.loads(p.read_text(encoding="utf-8"))
            # A .json file is data only if it is a list of rows; dicts are metadata (dataset_infos.json).
            if isinstance(data, list):
                rows += data
    if not rows:
        raise ValueError(f"no rows found in dataset {name!r} (split={split!r}); files: "
                         f"{[p.relative_to(root).as_posix() for p in files] or 'none'}")
    return _rows_to_problems(rows, source=name)


# -----------------------------------------------------------------------------
# generation and grading (sample.py's loop: the same explicit sampling settings as training rollouts)

# --data shortcuts: the offline copies shipped in data/ (no network needed; see data/README.md for provenance)
DATA_DIR = Path(__file__).resolve().parent / "data"
DATASETS = {"aime24": str(DATA_DIR / "aime24.jsonl"), "aime25": str(DATA_DIR / "aime25.jsonl")}


def build_prompt(problem: str, instruction: bool) -> str:
    """The user turn: the problem, then the standard instruction on its own line (instruction=False: as is)."""
    return f"{problem}\n{INSTRUCTION}" if instruction else problem


def evaluate(model, tokenizer, problems: list[dict], *, k: int = 1, sampling=None, seed: int = 0,
             batch_size: int = 64, batch_tokens: int | None = None, instruction: bool = True,
             chat_template: bool = True, enable_thinking: bool | None = None, integer_range=(0, 999),
             max_prompt_len: int | None = None, rank: int = 0, world: int = 1, progress: bool = False,
             autocast=contextlib.nullcontext, log=None):
    """Sample k completions per problem and grade them. Returns (summary, records).

    The (problem, sample) pairs are laid out problem-major and dealt to the ranks in turn (rank r of `world` takes
    pairs r, r + world, ...: every rank has work, at most one pair more than another), then each rank decodes its
    share in batches of batch_size rows, or, with batch_tokens, of as many rows as fit in that many KV-cached tokens
    (rows x (longest prompt + max_new_tokens): the memory a batch really takes, whatever the lengths). Every rank runs
    the same number of batches; under a sharded model (sampling.lockstep) a rank whose share ran out runs a stand-in
    batch, not recorded, to join the others' collectives. Batch b of rank r samples with make_generator(seed, r, b):
    greedy results do not depend on the number of processes, sampled ones do (as any batch split would).
    autocast: the context manager the generation runs under (train.py passes its bf16 autocast on CUDA).
    log: called with one line per batch ("eval batch i/n ...") when given, so a long evaluation is never silent.
    records: one dict per generation {id, sample, answer, extracted, correct, truncated, tokens, response}; the caller
    merges the records of all ranks. summary: avg@k, pass@k (unbiased, for every power of two <= k and k itself),
    per-problem correct counts, truncated fraction and mean response length; see summarize().
    """
    import time

    from sample import SamplingConfig, encode_prompts, eos_token_ids, make_generator, pad_token_id, sample_rollouts

    sampling = sampling or SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=32768)
    if sampling.vocab_size is None:  # never sample a padding column of the model's head (trap 17)
        sampling = dataclasses.replace(sampling, vocab_size=len(tokenizer))
    chat = chat_template and bool(getattr(tokenizer, "chat_template", None))
    texts = [build_prompt(p["problem"], instruction) for p in problems]
    prompt_ids, _ = encode_prompts(tokenizer, texts, chat_template=chat, max_prompt_len=max_prompt_len,
                                   enable_thinking=enable_thinking)
    jobs = [(i, s) for i in range(len(problems)) for s in range(k)]  # (problem index, sample index)
    if batch_tokens:  # the longest row of ANY rank: every rank computes the same batch size
        batch_size = max(1, batch_tokens // (max(map(len, prompt_ids)) + sampling.max_new_tokens))
    mine = jobs[rank::world]
    batches = [mine[j:j + batch_size] for j in range(0, len(mine), batch_size)]
    most = math.ceil(math.ceil(len(jobs) / world) / batch_size)  # rank 0's count, the largest
    if sampling.lockstep:
        batches += [[]] * (most - len(batches))  # stand-in batches: this rank's share ran out before the others'
    eos, pad = eos_token_ids(model, tokenizer), pad_token_id(tokenizer)
    device = next(model.parameters()).device
    order = range(len(batches))
    if progress:
        from tqdm import tqdm
        order = tqdm(order, desc="eval", unit="batch")
    records, t0 = [], time.time()
    model.eval()
    for b in order:
        batch = batches[b] or jobs[:1]  # an empty batch: the stand-in (lockstep only), not recorded
        with autocast():
            ro = sample_rollouts(model, [prompt_ids[i] for i, _ in batch], sampling=sampling, eos_ids=eos,
                                 pad_id=pad, generator=make_generator(seed, rank, b, device=device))
        for row, (i, s) in enumerate(batches[b]):
            ids = ro.response_ids[row][ro.response_mask[row].bool()]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            extracted = extract_answer(text)
            records.append({"id": problems[i]["id"], "sample": s, "answer": problems[i]["answer"],
                            "extracted": extracted, "correct": is_correct(extracted, problems[i]["answer"],
                                                                          integer_range),
                            "truncated": bool(ro.truncated[row]), "tokens": int(ids.numel()), "response": text})
        if log is not None:
            log(f"eval batch {b + 1}/{len(batches)}: {len(batches[b])} rows, {ro.response_ids.shape[1]} tokens, "
                f"{time.time() - t0:.0f} s")
    return summarize(records, [p["id"] for p in problems], k), records


def held_out_accuracy(model, tokenizer, problems: list[dict], *, sampling, seed: int = 0, instruction: bool = True,
                      chat_template: bool = True, enable_thinking: bool | None = None, integer_range=(0, 999),
                      max_prompt_len: int | None = None, rank: int = 0, world: int = 1,
                      batch_tokens: int = 65536, autocast=contextlib.nullcontext, log=None) -> float:
    """train.py's held-out accuracy: one sample per problem (greedy at temperature 0) through evaluate, the one
    grading path, with the problems dealt to the `world` ranks and the counts summed over them (parallel.all_reduce
    runs the sum on the process group's own device)."""
    import torch

    from parallel import all_reduce
    from sample import eval_mode

    with eval_mode(model):  # evaluate leaves the model in eval(); a student in training goes back to train()
        _, records = evaluate(model, tokenizer, problems, k=1, sampling=sampling, seed=seed, batch_tokens=batch_tokens,
                              instruction=instruction, chat_template=chat_template, enable_thinking=enable_thinking,
                              integer_range=integer_range, max_prompt_len=max_prompt_len, rank=rank, world=world,
                              autocast=autocast, log=log)
    counts = torch.tensor([sum(r["correct"] for r in records), len(records)], dtype=torch.float64)
    all_reduce(counts)
    return float(counts[0] / counts[1])


def summarize(records: list[dict], ids: list[str], k: int) -> dict:
    """avg@k, pass@k, per-problem counts, truncation and length from generation records (any order)."""
    counts = {pid: 0 for pid in ids}
    for r in records:
        counts[r["id"]] += bool(r["correct"])
    n = len(records)
    ks = sorted({2 ** e for e in range(k.bit_length()) if 2 ** e <= k} | {k})
    return {"problems": len(ids), "k": k, "samples": n,
            "avg@k": avg_at_k(list(counts.values()), k) if n == len(ids) * k else sum(counts.values()) / max(n, 1),
            **{f"pass@{kk}": sum(pass_at_k(k, c, kk) for c in counts.values()) / len(ids) for kk in ks},
            "truncated_frac": sum(r["truncated"] for r in records) / max(n, 1),
            "mean_tokens": sum(r["tokens"] for r in records) / max(n, 1),
            "correct_per_problem": counts}


def main(argv=None):
    import argparse
    import statistics

    import torch

    from sample import SamplingConfig, load_policy

    p = argparse.ArgumentParser(description="AIME-style evaluation: avg@k, pass@k, every generation audited")
    p.add_argument("--model", required=True, help="checkpoint folder (train.py writes them) or hub id")
    p.add_argument("--data", default="aime24", help="a JSONL file, aime24 / aime25 (the copies in data/), or a hub dataset name")
    p.add_argument("--split", default=None, help="hub datasets: keep data files whose path contains this")
    p.add_argument("--k", type=int, default=8, help="samples per problem (avg@k over k >= 8 is the norm)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32768)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batch-tokens", type=int, default=None, help="rows per batch from a budget of KV-cached tokens, "
                   "rows x (longest prompt + max new tokens); overrides --batch-size")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="repeat the whole run per seed: mean, std")
    p.add_argument("--no-chat-template", action="store_true", help="feed the raw prompt text")
    p.add_argument("--no-instruction", action="store_true", help="do not append the boxed-answer instruction")
    p.add_argument("--enable-thinking", choices=["true", "false"], default=None, help="for templates that take it")
    p.add_argument("--no-range", action="store_true", help="do not restrict integer answers to 0..999")
    p.add_argument("--max-prompt-len", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="folder for results.json and generations.jsonl")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("--k must be >= 1")
    dtype = {"auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    args.data = DATASETS.get(args.data, args.data)
    if Path(args.data).suffix == ".jsonl" or Path(args.data).exists():
        if not Path(args.data).exists():
            p.error(f"--data {args.data}: file not found")
        problems = load_problems(args.data)
    else:
        problems = load_hub_dataset(args.data, args.split)
    model, tokenizer = load_policy(args.model, args.device, dtype)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens)
    out = Path(args.out or Path(args.model) / f"eval-{Path(args.data).stem}")
    out.mkdir(parents=True, exist_ok=True)
    runs, all_records = [], []
    for seed in args.seeds:
        summary, records = evaluate(model, tokenizer, problems, k=args.k, sampling=sampling, seed=seed,
                                    batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                                    instruction=not args.no_instruction,
                                    chat_template=not args.no_chat_template,
                                    enable_thinking=None if args.enable_thinking is None else args.enable_thinking == "true",
                                    integer_range=None if args.no_range else (0, 999),
                                    max_prompt_len=args.max_prompt_len, progress=True)
        runs.append(summary)
        all_records += [{"seed": seed, **r} for r in records]
    metrics = [m for m in runs[0] if m == "avg@k" or m.startswith("pass@") or m in ("truncated_frac", "mean_tokens")]
    table = {m: {"mean": statistics.fmean(r[m] for r in runs),
                 "std": statistics.pstdev([r[m] for r in runs]) if len(runs) > 1 else 0.0} for m in metrics}
    result = {"model": args.model, "data": args.data, "problems": len(problems), "k": args.k, "seeds": args.seeds,
              "sampling": vars(sampling), "chat_template": not args.no_chat_template,
              "instruction": not args.no_instruction, "metrics": table, "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    with open(out / "generations.jsonl", "w") as f:
        for r in all_records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"\n{args.model} on {args.data}: {len(problems)} problems x k={args.k} x {len(args.seeds)} seed(s), "
          f"T={args.temperature} top-p={args.top_p} max_new_tokens={args.max_new_tokens}")
    print("| metric | mean | std |\n|---|---|---|")
    for m, v in table.items():
        scale = 100 if m not in ("mean_tokens",) else 1
        print(f"| {m} | {v['mean'] * scale:.2f} | {v['std'] * scale:.2f} |")
    print(f"wrote {out / 'results.json'} and {out / 'generations.jsonl'}")
    return result


if __name__ == "__main__":
    main()

