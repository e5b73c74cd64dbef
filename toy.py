"""
toy.py -- a built-in world where on-policy distillation can be watched on a laptop CPU.

Nothing can be downloaded here and most readers have no GPU, yet the main job must run with one command and show
the method working. This file builds a complete, small world from nothing, with REAL Hugging Face models saved by
`save_pretrained` and loaded back by the same `from_pretrained` code paths that load Qwen or Llama:

  the task     chains of 2-3 integers in 0..99 joined by + and -, solved step by step, answer in \\boxed{}.
               Every number inside the prompt and the steps is written least-significant digit first ("46" is
               written 64), which makes carrying learnable left to right; the final answer is written normally:
                   prompt   15+16-47=?\\n                 (51 + 61 - 74)
                   teacher  15+16=211;211-47=83;\\boxed{38}<eos>
                   student  15+16=211,211-47=83,\\boxed{38}<eos>
  two styles   the teacher separates steps with ";", the student (mostly) with ",": equally correct, and the
               teacher's data contains "," at a low rate so it finds it unlikely but understands it. Every student
               "," is a high-loss token that is NOT a reasoning error: the paper's surface-form mismatch.
  real forks   a wrong digit. The teacher's data contains occasional slips followed by a correction
               ("15+16=221|211;...", the slip itself is masked out of its loss, so it never learns to slip), so
               after a student's error the teacher wants to repair it for several tokens (short-horizon drift),
               while after a "," it just continues.
  ground truth label_tokens() marks each response token as surface / correct / error / after_error, so detector
               precision and recall can be measured, not argued.
  long world   toy.LONG (python toy.py --long): 4-7 operands, 25-70-token answers and a second style kind (the
               student writes additions "b+acc=", the teacher "acc+b="), tuned so that style tokens are ~30% of the
               undistilled student's top-5% loss tokens: the situation the paper's method is for.
  the models   a character-level tokenizer (tokenizers WordLevel -> PreTrainedTokenizerFast, pad/bos/eos and a chat
               template), a 4-layer Llama teacher (~1M params, >= 95% held-out) and a 2-layer student that saw
               only 800 labelled problems (~20-60%): room for distillation from prompts alone.

Commands:
    python toy.py                   # build runs/toy/ (about 5 minutes on 2 cores), print both accuracies
    python toy.py --fast            # the quick test world (under a minute)
    python toy.py --long            # the long world into runs/toy-long/ (about 26 minutes, see README)
    python toy.py --report          # detector report on rollouts of the finished student, and the mechanism page
                                    # runs/toy/mechanism.html (+ .png): every token coloured by its loss
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import sample


def say(*args) -> None:
    """print, flushed at once: progress lines must reach a log file when they happen, not when a buffer fills."""
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer: one token per character, plus \boxed
# ----------------------------------------------------------------------------------------------------------------

SPECIALS = ["<pad>", "<bos>", "<eos>"]
SYMBOLS = list("0123456789+-*=?;,|\n{}") + ["\\boxed"]
TEACHER_SEP, STUDENT_SEP, CORRECTION = ";", ",", "|"


def build_tokenizer():
    """A PreTrainedTokenizerFast over 25 tokens; `tok(text)` prepends <bos>, padding side is left."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + SYMBOLS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed|."), behavior="isolated")  # \boxed, else 1 char
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  padding_side="left")
    # A chat template so that --chat-template code paths run on the toy too: one user turn, no role markers.
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


VOCAB = {tok: i for i, tok in enumerate(SPECIALS + SYMBOLS)}  # the same mapping, for building ids without a call
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------------------

def rev(n: int) -> str:
    """46 -> "64": numbers inside prompts and steps are written least-significant digit first."""
    return str(n)[::-1]


@dataclass
class Problem:
    operands: list[int]
    ops: list[str]  # "+" or "-", len(operands) - 1

    def steps(self):
        """[(acc, op, b, result), ...]: the chain evaluated left to right."""
        out, acc = [], self.operands[0]
        for op, b in zip(self.ops, self.operands[1:]):
            res = acc + b if op == "+" else acc - b
            out.append((acc, op, b, res))
            acc = res
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    @property
    def prompt(self) -> str:
        text = rev(self.operands[0]) + "".join(op + rev(b) for op, b in zip(self.ops, self.operands[1:]))
        return text + "=?\n"


def make_problem(rng: random.Random, max_value: int = 99, max_operands: int = 3, min_operands: int = 2) -> Problem:
    """min_operands..max_operands integers in 0..max_value; a "-" that would go negative becomes "+" (answers
    stay >= 0)."""
    operands = [rng.randint(0, max_value) for _ in range(rng.randint(min_operands, max_operands))]
    ops, acc = [], operands[0]
    for b in operands[1:]:
        op = rng.choice("+-")
        if op == "-" and acc - b < 0:
            op = "+"
        acc = acc + b if op == "+" else acc - b
        ops.append(op)
    return Problem(operands=operands, ops=ops)


def response_pieces(problem: Problem, rng: random.Random, *, sep_style: str, other_sep_rate: float = 0.0,
                    slip_rate: float = 0.0, swap_rate: float = 0.0):
    """The worked solution as a list of (token, trained) pairs, ending with <eos>.

    sep_style: the writer's separator; other_sep_rate: chance of the other style at each separator.
    swap_rate: chance that an addition step is written with its operands swapped, "b+acc=" instead of "acc+b=" (the
    second style kind of the long world: a different step order, equally correct, and the first token of the step
    is where it shows).
    slip_rate: chance that a step's result is first written with one wrong digit, then "|" and the right result;
    the wrong digits are returned with trained=False so SFT never teaches making slips, only repairing them.
    """
    other = STUDENT_SEP if sep_style == TEACHER_SEP else TEACHER_SEP
    pieces = []
    for acc, op, b, res in problem.steps():
        # (the draw only when the rate is set: the default world's random stream, hence its data, stays as it was)
        swapped = swap_rate > 0 and op == "+" and rng.random() < swap_rate
        pieces += [(c, True) for c in (rev(b) + op + rev(acc) if swapped else rev(acc) + op + rev(b)) + "="]
        if rng.random() < slip_rate:
            wrong = list(rev(res))
            i = rng.randrange(len(wrong))
            wrong[i] = rng.choice([d for d in "0123456789" if d != wrong[i]])
            pieces += [(c, False) for c in wrong] + [(CORRECTION, True)]
        pieces += [(c, True) for c in rev(res)]
        pieces.append((other if rng.random() < other_sep_rate else sep_style, True))
    pieces += [("\\boxed", True), ("{", True)] + [(c, True) for c in str(problem.answer)] + [("}", True)]
    return pieces + [("<eos>", True)]


def canonical_response(problem: Problem) -> str:
    """The teacher-style solution text (no slips, no EOS)."""
    return "".join(t for t, _ in response_pieces(problem, random.Random(0), sep_style=TEACHER_SEP)[:-1])


def write_prompts(path: Path, problems) -> None:
    """JSONL in the format train.py and eval_aime.py read: {"prompt": ..., "answer": ...}."""
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "answer": str(p.answer)}) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Ground truth for the detectors
# ----------------------------------------------------------------------------------------------------------------

SURFACE, CORRECT, ERROR, AFTER_ERROR = "surface", "correct", "error", "after_error"


def parse_prompt(prompt: str) -> Problem:
    """Inverse of Problem.prompt: "15+16-47=?\\n" -> Problem([51, 61, 74], ["+", "-"])."""
    body = prompt.split("=")[0]
    operands, ops, cur = [], [], ""
    for ch in body:
        if ch in "+-":
            operands.append(int(cur[::-1]))
            ops.append(ch)
            cur = ""
        else:
            cur += ch
    operands.append(int(cur[::-1]))
    return Problem(operands=operands, ops=ops)


def solution_segments(problem: Problem) -> list[list[list[str]]]:
    """Every correct solution of `problem`, as a chain of segments; a segment is a list of equally long
    alternatives (token lists), the teacher's own form first:
        per step   the expression "acc+b=" (for an addition also "b+acc=", the swapped step order), the result,
                   the separator (";" or ",");
        at the end "\\boxed{answer}" and <eos>.
    Slips and corrections are not in it: a correct solution never needs one."""
    segments = []
    for acc, op, b, res in problem.steps():
        forms = [list(rev(acc) + op + rev(b) + "=")]
        if op == "+" and acc != b:
            forms.append(list(rev(b) + op + rev(acc) + "="))
        segments += [forms, [list(rev(res))], [[TEACHER_SEP], [STUDENT_SEP]]]
    return segments + [[["\\boxed", "{", *str(problem.answer), "}", "<eos>"]]]


def label_tokens(problem: Problem, tokens: list[str]):
    """Label every response token: (labels, first_error_index or None).

    tokens: the response as token strings, e.g. tokenizer.convert_ids_to_tokens(response ids up to EOS).
    Walks the response through solution_segments, keeping the alternatives of the current segment that the
    tokens so far still match:
      correct      the token the teacher's own form has here, or the only token a correct solution can have here
                   (the rest of a swapped step once its first differing token is written; EOS included);
      surface      the token where the response leaves the teacher's form for another correct one: a "," where the
                   teacher writes ";", or the first differing token of a swapped addition. A harmless style change;
      error        the first token that no correct solution could have here (a wrong digit, a "|" with nothing to
                   correct, a missing separator, ...): the real reasoning fork;
      after_error  everything after the first error (the trajectory has left every correct solution), except
                   the style choices of the steps that follow the erroneous one (style_after_error): those are
                   surface too.
    Example, problem 51 + 61 (canonical "15+16=211;\\boxed{112}"):
        "15+16=211,\\boxed{112}"  -> all correct except "," (index 9): surface; first_error None
        "16+15=211;\\boxed{112}"  -> index 1 ("6" for "5") surface, the rest correct
        "15+16=221;\\boxed{122}"  -> indices 0-6 correct, index 7 ("2" for "1") error, the rest after_error
    """
    segments = solution_segments(problem)
    labels, first_error = [], None
    segment, pos, alive = 0, 0, list(range(len(segments[0])))
    for i, tok in enumerate(tokens):
        if first_error is not None:
            labels.append(AFTER_ERROR)
            continue
        forms = segments[segment] if segment < len(segments) else []
        matching = [f for f in alive if forms[f][pos] == tok]
        if not matching:  # no correct solution goes on like this (or the response goes on past <eos>)
            first_error = i
            labels.append(ERROR)
            continue
        labels.append(SURFACE if 0 in alive and 0 not in matching else CORRECT)
        alive, pos = matching, pos + 1
        if pos == len(forms[0]):  # the segment is complete: on to the next, every alternative open again
            segment, pos = segment + 1, 0
            alive = list(range(len(segments[segment]))) if segment < len(segments) else []
    if first_error is not None:
        style_after_error(problem, tokens, labels, first_error)
    return labels, first_error


STEP = re.compile(r"(\d+)([+-])(\d+)=(\d+)([;,])")  # one written step: a op b = result, separator


def style_after_error(problem: Problem, tokens: list[str], labels: list[str], first_error: int) -> None:
    """Relabel, in place, the style choices made AFTER the first error: a student that slipped at step 2 still
    writes "," and swapped additions at steps 3-6, and those are the same harmless surface mismatches as before the
    slip. A later step counts when it is well formed given what was written before it: it continues from the
    previous step's written result with the problem's next operand and operator (either order for an addition),
    and its result is right for its written operands (the teacher, trained to repair slips, wants "|" only after a
    result that is wrong for its own operands). Its "," and the first differing token of a swapped addition become
    surface. The step that holds the first error keeps its separator as after_error: that is where the teacher
    wants its repair ("|"), the fork's own near future."""
    text, offsets, pos = "", [], 0  # character offset -> token index (steps are single-character tokens)
    for i, tok in enumerate(tokens):
        offsets += [i] * len(tok)
        text += tok
    previous = rev(problem.operands[0])
    for k, m in enumerate(STEP.finditer(text)):
        if k + 1 >= len(problem.operands) or m.start() != pos:  # not a chain of steps from the start any more
            return
        a, op, b, result, sep = m.groups()
        operand = rev(problem.operands[k + 1])
        ordered = (a, b) == (previous, operand) or (op == "+" and (a, b) == (operand, previous) and a != b)
        value = int(a[::-1]) + int(b[::-1]) if op == "+" else int(a[::-1]) - int(b[::-1])
        well_formed = op == problem.ops[k] and ordered and rev(value) == result
        if offsets[m.start()] > first_error and well_formed:  # a step wholly after the one with the error
            if sep == STUDENT_SEP:
                labels[offsets[m.end() - 1]] = SURFACE
            if a != previous:  # swapped: the first character where "b+acc" differs from "acc+b"
                teacher_form = previous + op + operand
                labels[offsets[m.start() + next(i for i, (x, y) in enumerate(zip(a + op + b, teacher_form))
                                                if x != y)]] = SURFACE
        previous, pos = result, m.end()


def style_counts(problem: Problem, text: str) -> dict:
    """How a response writes the long world's two style kinds, over its chain of steps from the start:
      commas      separators written "," (the student's; the teacher writes ";"), of `separators`;
      swapped     additions that start with the new operand, "b+acc=" (the student's order), of `additions` (the
                  additions whose two operands are written differently, so that the order shows);
      copied      additions that start with the accumulator and repeat it, "acc+acc=": the teacher's first token
                  followed by what the student's order puts second (the accumulator), a broken step.
    The chain is followed through the steps' written results (a wrong result is carried on, as the student does).
    Example, prompt 51+74+2=? (15 + 47 + 2; the teacher writes "51+74=26;26+2=46;\\boxed{64}"):
    "74+51=26,26+2=46;\\boxed{64}" -> commas 1 of 2 separators, swapped 1 of 2 additions, copied 0."""
    counts = dict(commas=0, separators=0, swapped=0, additions=0, copied=0)
    previous, pos = rev(problem.operands[0]), 0
    for k, m in enumerate(STEP.finditer(text)):
        if k + 1 >= len(problem.operands) or m.start() != pos:  # the chain of steps ends here
            break
        a, op, b, result, sep = m.groups()
        operand = rev(problem.operands[k + 1])
        counts["separators"] += 1
        counts["commas"] += sep == STUDENT_SEP
        if op == "+" and operand != previous:
            counts["additions"] += 1
            counts["swapped"] += a == operand
            counts["copied"] += a == previous and b == previous
        previous, pos = result, m.end()
    return counts


def style_report(model, tokenizer, rows, max_new_tokens: int) -> dict:
    """Greedy held-out accuracy of `model` and the shares of its style choices over those responses:
    {"accuracy", "comma_share" (of separators), "swap_share" and "copied_share" (of additions)}: where the student is
    between its own style (1.0 and 1.0 for the long world's) and the teacher's (0.0), and how often it breaks an
    addition by writing the accumulator twice."""
    from eval_aime import evaluate
    from sample import SamplingConfig

    summary, records = evaluate(model, tokenizer, as_problems(rows), k=1, batch_size=EVAL_BATCH,
                                sampling=SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens),
                                instruction=False, chat_template=False, integer_range=None)
    total = dict(commas=0, separators=0, swapped=0, additions=0, copied=0)
    for record in records:
        for k, v in style_counts(parse_prompt(rows[int(record["id"])]["prompt"]), record["response"]).items():
            total[k] += v
    return {"accuracy": summary["avg@k"], "comma_share": total["commas"] / max(total["separators"], 1),
            "swap_share": total["swapped"] / max(total["additions"], 1),
            "copied_share": total["copied"] / max(total["additions"], 1)}


# ----------------------------------------------------------------------------------------------------------------
# Models and supervised training
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class ToyConfig:
    """Everything that defines the world; its hash-free JSON is stored in build.json and checked on reuse."""
    seed: int = 0
    max_value: int = 99            # operands in 0..max_value
    max_operands: int = 3          # min_operands..max_operands numbers per problem
    min_operands: int = 2
    num_train_prompts: int = 20000  # unlabelled prompts for distillation (train.jsonl)
    num_test_prompts: int = 500    # held-out prompts (test.jsonl)
    teacher_layers: int = 4
    student_layers: int = 2
    hidden: int = 128
    teacher_steps: int = 1600      # fresh random problems every step
    teacher_target: float = 0.0    # > 0: stop the teacher's SFT at the first evaluation (every 250 steps) >= this
    teacher_other_sep_rate: float = 0.02  # the teacher's data has the student's "," at this rate
    teacher_slip_rate: float = 0.10       # steps written with a slip + correction in the teacher's data
    student_pool: int = 800        # the student's only labelled problems
    student_steps: int = 1500      # the schedule's length; training stops earlier, at the set point below
    student_target: float = 0.35   # stop the student's SFT at the first held-out evaluation >= this accuracy
    student_eval_every: int = 10   # steps between those evaluations ...
    student_eval_from: int = 150   # ... from this step on (below it the student is near 0%)
    student_other_sep_rate: float = 0.10  # the student's data has the teacher's ";" at this rate
    teacher_swap_rate: float = 0.0  # additions written "b+acc=" in the teacher's data (the long world's 2nd style)
    student_swap_rate: float = 0.0  # ... and in the student's data
    response_cap: int = 48         # max_new_tokens of every toy rollout and evaluation: a solution fits with room
    max_positions: int = 128       # the models' max_position_embeddings (prompt + response must fit)
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50


FAST = dict(max_value=19, num_train_prompts=2000, num_test_prompts=200, teacher_steps=350, student_pool=500,
            student_steps=400, student_eval_from=50, hidden=96)

# The long world (python toy.py --long -> runs/toy-long): the regime the paper's premise is about. Chains of LONG
# operands give 25-70-token solutions, so a rollout has several candidates at gap 8; the student writes two kinds of
# style the teacher understands but rarely writes ("," for ";", and additions with their operands swapped), so style
# tokens are many and surprising; the teacher's rarer slips make the repair signal after an error weaker. The
# teacher's knobs were set beforehand, the student's by measuring the label mix of the top-5% loss tokens (README,
# "The long world").
LONG = dict(min_operands=4, max_operands=7, max_value=49, teacher_steps=4000, teacher_target=0.97,
            teacher_other_sep_rate=0.005,
            teacher_swap_rate=0.01, student_swap_rate=1.0, student_other_sep_rate=0.0, teacher_slip_rate=0.05,
            student_pool=800, student_steps=3000, student_target=0.45, student_eval_every=25,
            student_eval_from=300, response_cap=112, max_positions=160, num_test_prompts=400)


def draw_problem(rng: random.Random, cfg: ToyConfig) -> Problem:
    return make_problem(rng, cfg.max_value, cfg.max_operands, cfg.min_operands)


def config_of(world: str | Path) -> ToyConfig:
    """The ToyConfig a built world was made with (its build.json); fields added since it was built take their
    defaults, which reproduce the world as it was."""
    stored = json.loads((Path(world) / "build.json").read_text())["config"]
    known = {f for f in asdict(ToyConfig())}
    return ToyConfig(**{k: v for k, v in stored.items() if k in known})


def make_model(cfg: ToyConfig, layers: int, seed: int):
    """A Llama from a config, as a real checkpoint of any size would be; tied embeddings keep it ~1M params."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=cfg.max_positions, tie_word_embeddings=True, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return LlamaForCausalLM(config)


def sft_batch(examples):
    """[(prompt, pieces)] -> ids, attention_mask, position_ids, labels (-100 = not trained), left-padded."""
    from sample import left_pad, position_ids_from_mask

    seqs, trained = [], []
    for prompt, pieces in examples:
        p_ids = [BOS_ID] + [VOCAB[c] for c in prompt]
        seqs.append(p_ids + [VOCAB[t] for t, _ in pieces])
        trained.append([False] * len(p_ids) + [ok for _, ok in pieces])
    ids, mask = left_pad(seqs, PAD_ID)
    flags = torch.zeros_like(ids, dtype=torch.bool)
    for row, tr in enumerate(trained):
        flags[row, ids.shape[1] - len(tr):] = torch.tensor(tr)
    labels = ids.masked_fill(~flags, -100)
    return ids, mask, position_ids_from_mask(mask), labels


def train_sft(model, example_fn, steps: int, cfg: ToyConfig, seed: int, desc: str, stop_when=None, log=None):
    """Plain next-token cross-entropy on the trained response tokens; AdamW, warmup, cosine to 0.1x.

    stop_when(step, model) -> bool, when given, is asked after every step and ends training early when it says so
    (the student's set-point stop below). Progress: a bar on a terminal, else a line through `log` every ~30 s with
    the loss and the rate (checkpoint.Progress). Returns (model in eval mode, number of steps run).
    """
    from checkpoint import Progress

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) *
                                              (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    progress = Progress(steps, desc, log=log)
    step, loss = 0, torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        ids, mask, pos, labels = sft_batch([example_fn(rng) for _ in range(cfg.batch_size)])
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1]  # predicts ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        progress.update(loss=f"{loss.item():.3f}")
        if stop_when is not None and stop_when(step, model):
            break
    progress.close(loss=f"{loss.item():.3f}")
    return model.eval(), step


def set_point_stop(rows, tokenizer, target: float, every: int, first: int, log=None,
                   max_new_tokens: int = ToyConfig.response_cap, near_every: int = 2, who: str = "student"):
    """stop_when for the student: True at the first evaluation (every `every` steps from step `first`, every
    `near_every` steps once within 10 points of the target) whose greedy accuracy on `rows` is >= target. (The long
    world's teacher uses it too, with near_every = every: its curve is flat near its target, and each evaluation
    of the long world costs more.)

    Why a set point and not a fixed step count: a student trained on a few labels climbs its learning curve
    steeply (a few points per 10 steps), and where it is after a FIXED number of steps depends on float rounding,
    i.e. on the CPU and the thread count: the same seed gave 34.8% on one machine and 22.8% on another. Stopping at
    the first evaluation at or above the target lands every machine, thread count and seed in
    [target, target + one interval's climb]. The evaluation rows are the held-out prompts, so that the accuracy
    printed as "before" is the one that was aimed at; they choose one number (when to stop), nothing else, and the
    selection can only push the starting accuracy up by the noise of one evaluation, i.e. make the gains that
    distillation reports smaller, never larger.
    """
    near = {"since": None}  # close to the target the curve climbs a few points per 10 steps: check every 2 steps

    def stop_when(step: int, model) -> bool:
        interval = every if near["since"] is None else near_every
        if step < first or (step - (near["since"] or 0)) % interval:
            return False
        acc = accuracy(model, tokenizer, rows, max_new_tokens=max_new_tokens)
        model.train()
        if log is not None:
            log(f"{who} SFT step {step}: held-out accuracy {acc:.1%} (target {target:.0%})")
        if near["since"] is None and acc >= target - 0.10:
            near["since"] = step
        return acc >= target
    return stop_when


EVAL_MAX_NEW_TOKENS = ToyConfig.response_cap  # the default world's solutions are <= 30 tokens; caps runaways
EVAL_BATCH = 250


def as_problems(rows) -> list[dict]:
    """{"prompt", "answer"} rows -> the {"id", "problem", "answer"} dicts eval_aime.evaluate grades."""
    return [{"id": str(i), "problem": r["prompt"], "answer": r["answer"]} for i, r in enumerate(rows)]


def accuracy(model, tokenizer, rows, *, temperature: float = 0.0, seed: int = 0,
             max_new_tokens: int = EVAL_MAX_NEW_TOKENS) -> float:
    """Held-out accuracy through eval_aime.evaluate, the project's one evaluation path: same extraction
    (extract_answer), same batching and seeding. The CLI equivalent (same number for the same prompts and seed):
        python eval_aime.py --model runs/toy/teacher --data runs/toy/test.jsonl --k 1 --temperature 0 --top-p 1 \
            --max-new-tokens 48 --batch-size 250 --no-instruction --no-chat-template --no-range
    """
    from eval_aime import evaluate
    from sample import SamplingConfig

    summary, _ = evaluate(model, tokenizer, as_problems(rows), k=1, seed=seed, batch_size=EVAL_BATCH,
                          sampling=SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens),
                          instruction=False, chat_template=False, integer_range=None)
    return summary["avg@k"]


# ----------------------------------------------------------------------------------------------------------------
# Building the world (idempotent, cached, written atomically)
# ----------------------------------------------------------------------------------------------------------------

def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class WorldData:
    """The problems of a world, all drawn from one seeded stream (so every build of a config has the same ones)."""
    test: list        # held-out prompts with answers (test.jsonl)
    train: list       # unlabelled distillation prompts (train.jsonl), disjoint from test
    pool: list        # the student's few labelled problems, disjoint from test

    @property
    def test_rows(self) -> list[dict]:
        return [{"prompt": p.prompt, "answer": str(p.answer)} for p in self.test]


def world_data(cfg: ToyConfig) -> WorldData:
    data_rng = random.Random(cfg.seed)
    test = [draw_problem(data_rng, cfg) for _ in range(cfg.num_test_prompts)]
    held_out = {p.prompt for p in test}

    def draw(n):  # n problems whose prompts are not held out
        out = []
        while len(out) < n:
            p = draw_problem(data_rng, cfg)
            if p.prompt not in held_out:
                out.append(p)
        return out
    train = draw(cfg.num_train_prompts)
    return WorldData(test=test, train=train, pool=draw(cfg.student_pool))


def build_teacher(cfg: ToyConfig, data: WorldData, tokenizer=None, log=None, progress_log=say):
    """SFT on fresh problems (never a held-out one), in the teacher's style, with slips and their corrections; all
    cfg.teacher_steps of them, or (cfg.teacher_target > 0) up to the first evaluation at or above the target."""
    held_out = {p.prompt for p in data.test}

    def teacher_example(rng):
        p = draw_problem(rng, cfg)
        while p.prompt in held_out:
            p = draw_problem(rng, cfg)
        return p.prompt, response_pieces(p, rng, sep_style=TEACHER_SEP, other_sep_rate=cfg.teacher_other_sep_rate,
                                         slip_rate=cfg.teacher_slip_rate, swap_rate=cfg.teacher_swap_rate)
    stop_when = None if not cfg.teacher_target else set_point_stop(
        data.test_rows, tokenizer or build_tokenizer(), cfg.teacher_target, 250, 750, log=log,
        max_new_tokens=cfg.response_cap, near_every=250, who="teacher")
    model, _ = train_sft(make_model(cfg, cfg.teacher_layers, cfg.seed + 1), teacher_example, cfg.teacher_steps, cfg,
                         cfg.seed + 11, "teacher SFT", stop_when=stop_when, log=progress_log)
    return model


def build_student(cfg: ToyConfig, data: WorldData, tokenizer, log=None, progress_log=say):
    """SFT on the same few labelled problems (data.pool) over and over, in the student's style, stopped at the
    set point cfg.student_target (see set_point_stop). Returns (model, steps run)."""
    def student_example(rng):
        p = rng.choice(data.pool)
        return p.prompt, response_pieces(p, rng, sep_style=STUDENT_SEP, other_sep_rate=cfg.student_other_sep_rate,
                                         swap_rate=cfg.student_swap_rate)
    return train_sft(make_model(cfg, cfg.student_layers, cfg.seed + 2), student_example, cfg.student_steps, cfg,
                     cfg.seed + 12, "student SFT", log=progress_log,
                     stop_when=set_point_stop(data.test_rows, tokenizer, cfg.student_target, cfg.student_eval_every,
                                              cfg.student_eval_from, log=log, max_new_tokens=cfg.response_cap))


def weights_hash(model) -> str:
    """sha256 of a model's weights (every tensor of its state dict, by name, in name order, as raw bytes).

    Two builds of one ToyConfig give the same world only if their float sums round alike: the thread count and the
    CPU change that (a long world rebuilt at another thread count stopped its teacher 250 steps earlier and started
    its student 0.8 points lower). Results are only comparable between worlds with the same hash."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def world_hash_of(weights_sha256: dict) -> str:
    """The world's short id: 16 hex digits of the sha256 over the teacher's and the student's weight hashes."""
    import hashlib

    return hashlib.sha256(f"{weights_sha256['teacher']}:{weights_sha256['student']}".encode()).hexdigest()[:16]


def world_hash(world: str | Path) -> str:
    """The hash of a built world (build.json's world_hash; computed from the saved weights for a world built before
    the hash was recorded)."""
    world = Path(world)
    info = json.loads((world / "build.json").read_text())
    if "world_hash" in info:
        return info["world_hash"]
    from transformers import AutoModelForCausalLM

    return world_hash_of({name: weights_hash(AutoModelForCausalLM.from_pretrained(world / name))
                          for name in ("teacher", "student")})


def thread_count(requested: int = 0, share: int = 1) -> int:
    """Torch threads for a CPU job: `requested` when > 0, else $OMP_NUM_THREADS when set (a choice the caller made,
    never overridden), else the machine's cores divided among `share` jobs running side by side (at least 1).
    The count changes float sums, hence the world a build produces and the numbers a run ends with."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if requested > 0:
        return requested
    return int(env) if env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 1) // share)


def build(out: str | Path = "runs/toy", cfg: ToyConfig | None = None, force: bool = False, log=say,
          verbose_log=None, teacher_from: str | Path | None = None) -> dict:
    """Build (or reuse) the world in `out`: tokenizer, teacher/, student/, train.jsonl, test.jsonl, build.json.

    verbose_log, when given, receives one line per student evaluation (the set-point stop).
    Reuse happens when build.json exists and records the same ToyConfig. Everything is written into a temporary
    sibling folder and renamed at the end, so an interrupted build never leaves a half world behind.
    teacher_from: a built world whose teacher this one shares (a STUDENT variant of it: every knob but the
    student_* ones must be equal); its teacher is copied instead of trained again (an hour for the long world).
    """
    cfg = cfg or ToyConfig()
    out = Path(out)
    if (out / "build.json").exists() and not force:
        info = json.loads((out / "build.json").read_text())
        if config_of(out) == cfg:
            return info
        log(f"{out}: built with a different config; rebuilding")
    sample.quiet_progress_bars()
    t0 = time.time()
    log(f"building the toy world into {out} with {torch.get_num_threads()} thread(s): the teacher's SFT, the student's "
        f"SFT to its {cfg.student_target:.0%} set point, then both models' held-out accuracy")
    data, tokenizer = world_data(cfg), build_tokenizer()
    if teacher_from is not None:
        base = asdict(config_of(teacher_from))
        differ = [k for k, v in asdict(cfg).items() if not k.startswith("student_") and base[k] != v]
        if differ:
            raise ValueError(f"--teacher-from {teacher_from}: a student variant may change only student_* knobs, "
                             f"not {differ}")
        from transformers import AutoModelForCausalLM
        teacher = AutoModelForCausalLM.from_pretrained(Path(teacher_from) / "teacher").eval()
        log(f"the teacher is {teacher_from}'s, copied; only the student is trained")
    else:
        teacher = build_teacher(cfg, data, tokenizer, log=verbose_log, progress_log=log)
    t1 = time.time()
    student, student_steps = build_student(cfg, data, tokenizer, log=verbose_log, progress_log=log)
    t2 = time.time()
    log(f"both models trained ({t2 - t0:.0f} s); measuring their held-out accuracy (greedy and at T=1)")
    acc = {}
    for name, m in (("teacher", teacher), ("student", student)):
        acc[name] = {}
        for kind, temperature in (("greedy", 0.0), ("t1", 1.0)):
            acc[name][kind] = accuracy(m, tokenizer, data.test_rows, temperature=temperature, seed=cfg.seed,
                                       max_new_tokens=cfg.response_cap)
            log(f"  {name} held-out accuracy, {'greedy' if kind == 'greedy' else 'T=1'}: {acc[name][kind]:.1%}")
    info = {"config": asdict(cfg), "accuracy": acc, "student_sft_steps": student_steps,
            "threads": torch.get_num_threads(),
            "weights_sha256": {name: weights_hash(m) for name, m in (("teacher", teacher), ("student", student))},
            "seconds": {"teacher_sft": round(t1 - t0, 1), "student_sft": round(t2 - t1, 1),
                        "total": round(time.time() - t0, 1)},
            "params": {"teacher": sum(p.numel() for p in teacher.parameters()),
                       "student": sum(p.numel() for p in student.parameters())}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    for name, model in (("teacher", teacher), ("student", student)):
        model.generation_config.pad_token_id = PAD_ID
        model.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
    write_prompts(tmp / "train.jsonl", data.train)
    write_prompts(tmp / "test.jsonl", data.test)
    info["world_hash"] = world_hash_of(info["weights_sha256"])
    if teacher_from is not None:
        info["teacher_from"] = {"world": str(teacher_from), "world_hash": world_hash(teacher_from)}
    (tmp / "build.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"toy world built in {info['seconds']['total']:.0f} s (world hash {info['world_hash']})")
    return info


# ----------------------------------------------------------------------------------------------------------------
# The toy world as train.py's default job
# ----------------------------------------------------------------------------------------------------------------

# train.py's defaults are a pretrained LLM's (lr 1e-6, thousands of tokens, the spec's horizon). The toy's own values,
# applied by train.parse_config when no --student is given (an explicit flag still wins):
TRAIN_DEFAULTS = {
    "lr": 3e-4,             # a 0.5M-parameter model from scratch learns at SFT-like rates (1e-4 and 1e-3 were worse)
    "max_new_tokens": EVAL_MAX_NEW_TOKENS,  # the world's response_cap (train_defaults); 48 for the default world
    "horizon": 8,           # a toy answer is ~25 tokens: the spec's 32 would span whole answers
    "micro_batch": 32,      # tiny models: 32 rollouts per forward/backward
    "steps": 300,
    "eval_range": "",       # toy answers are any non-negative integer, not AIME's 0..999
}


def train_defaults(world: str | Path | None = None) -> dict:
    """TRAIN_DEFAULTS for the world in `world`: its own response cap once it is built (the long world's solutions
    need 112 tokens, where 48 would truncate every rollout)."""
    if world is not None and (Path(world) / "build.json").exists():
        return {**TRAIN_DEFAULTS, "max_new_tokens": config_of(world).response_cap}
    return dict(TRAIN_DEFAULTS)


def train_flags(world: str | Path | None = None) -> list[str]:
    """train_defaults as train.py flags, for runs that name the toy's models explicitly (--student ...) and so do
    not get the toy's values by default (bench.py, the tests)."""
    return [x for k, v in train_defaults(world).items() for x in (f"--{k.replace('_', '-')}", str(v))]


def world_for_training(world: str | Path, rank: int = 0, log=print) -> dict:
    """The one call train.py makes for the toy world: build it into `world` if it is missing (rank 0, with every
    core: torchrun gives each process one thread), the other ranks wait; returns the paths train.py needs.

    An existing build is used as it is (whatever its ToyConfig, e.g. a --fast world); a missing one is built with
    the default ToyConfig.
    """
    import parallel

    world = Path(world)
    if rank == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, os.cpu_count() or 1))
        try:
            info = build(world, log=log, verbose_log=log) if not (world / "build.json").exists() else \
                json.loads((world / "build.json").read_text())
        finally:
            torch.set_num_threads(threads)
        log(f"toy world: {world} (teacher {info['accuracy']['teacher']['greedy']:.1%}, "
            f"student {info['accuracy']['student']['greedy']:.1%} greedy at build time)")
    else:  # wait without holding a core (a collective may spin); torchrun stops us if rank 0 fails
        while not (world / "build.json").exists():
            time.sleep(2)
    parallel.barrier()
    return {"student": str(world / "student"), "teacher": str(world / "teacher"),
            "prompts": str(world / "train.jsonl"), "eval_prompts": str(world / "test.jsonl")}


# ----------------------------------------------------------------------------------------------------------------
# Detector report: can this world tell surface-form mismatches from real forks at all?
# ----------------------------------------------------------------------------------------------------------------

FORK_LABELS = (ERROR, AFTER_ERROR)  # a candidate at or after the first wrong token is a real fork


@torch.no_grad()
def labelled_rollouts(world: str | Path = "runs/toy", *, student_path: str | None = None, num_prompts: int = 200,
                      seed: int = 0, max_new_tokens: int | None = None) -> dict:
    """The student's rollouts on the first num_prompts held-out prompts, each token's reverse KL to the teacher
    (l_t, full vocabulary) and its ground-truth label: what the detector report and the mechanism page look at.
    Returns {student, teacher, tok, rows, rollouts, loss (B, R), mask (B, R) bool, labels (B lists of R strings,
    "" past the end), special (B, R) bool: tokens that can never be candidates}."""
    import teacher as teacher_lib
    import topd

    world = Path(world)
    max_new_tokens = max_new_tokens or config_of(world).response_cap
    student, tok = sample.load_policy(str(student_path or world / "student"))
    teacher, _ = teacher_lib.load_teacher(str(world / "teacher"))
    rows = read_jsonl(world / "test.jsonl")[:num_prompts]
    prompt_ids, _ = sample.encode_prompts(tok, [r["prompt"] for r in rows])
    ro = sample.sample_rollouts(student, prompt_ids, sampling=sample.SamplingConfig(max_new_tokens=max_new_tokens),
                                eos_ids=[EOS_ID], pad_id=PAD_ID, generator=sample.make_generator(seed, 0, 0, device="cpu"))
    loss = topd.per_token_kl(teacher_lib.response_head(student, ro), teacher_lib.score_rollouts(teacher, ro, "full"))
    mask = ro.response_mask.bool()
    labels = []  # (B, R) label strings, "" on masked positions
    for b, row in enumerate(rows):
        toks = tok.convert_ids_to_tokens(ro.response_ids[b][mask[b]].tolist())
        lab, _ = label_tokens(parse_prompt(row["prompt"]), toks)
        labels.append(lab + [""] * (mask.shape[1] - len(lab)))
    special = torch.isin(ro.response_ids, torch.tensor(sample.special_token_ids(tok, [EOS_ID])))
    return {"student": student, "teacher": teacher, "tok": tok, "rows": rows, "rollouts": ro, "loss": loss,
            "mask": mask, "labels": labels, "special": special}


def probe_scores(scored: dict, cands: torch.Tensor, *, k: int, horizon: int, generator) -> torch.Tensor:
    """The probe's D (B, C) at candidates `cands` of labelled_rollouts' rollouts, exactly as train.py runs it."""
    import topd

    return topd.probe_divergence(scored["student"], scored["teacher"], scored["rollouts"], cands, k=k,
                                 horizon=horizon, pad_id=PAD_ID, eos_ids=[EOS_ID], vocab_size=len(scored["tok"]),
                                 generator=generator).scores


@torch.no_grad()
def detector_report(world: str | Path = "runs/toy", *, student_path: str | None = None, num_prompts: int = 200,
                    seed: int = 0, num_candidates: int = 4, min_gap: int = 8, horizon: int = 32,
                    probe_samples: int = 4, div_alpha: float = 0.5, div_threshold: float | None = None,
                    max_new_tokens: int | None = None) -> dict:
    """Sample the student on held-out prompts, score with the teacher, label every token, and measure:

      top1/top5        share of each label among the top 1% / 5% tokens by full-vocab reverse KL
      D_after          mean near-future divergence D of each detector at EVERY surface token and EVERY first error
                       (s_t taken right before the token, as for a candidate), the cleanest "can it tell" number
      candidates       label mix of the high-loss candidates (select_candidates), the paper's "~30%" question
      detectors        per detector: non-divergent fraction, precision / recall of "divergent" for real forks
                       (relative rule with div_alpha, or the absolute div_threshold when given)
    """
    import topd

    scored = labelled_rollouts(world, student_path=student_path, num_prompts=num_prompts, seed=seed,
                               max_new_tokens=max_new_tokens)
    rows = scored["rows"]
    loss, mask, labels, special = scored["loss"], scored["mask"], scored["labels"], scored["special"]
    flat = [(float(loss[b, t]), labels[b][t]) for b in range(len(rows)) for t in range(mask.shape[1]) if mask[b, t]]
    flat.sort(key=lambda x: -x[0])
    kinds = (SURFACE, CORRECT, ERROR, AFTER_ERROR)

    def mix(items):
        n = max(len(items), 1)
        return {k: sum(1 for _, lab in items if lab == k) / n for k in kinds}

    report = {"prompts": len(rows), "tokens": len(flat), "label_share": mix(flat),
              "top1": mix(flat[:max(1, len(flat) // 100)]), "top5": mix(flat[:max(1, len(flat) // 20)])}

    def probe(cands, generator):
        return probe_scores(scored, cands, k=probe_samples, horizon=horizon, generator=generator)

    def scores_at(positions):  # D of both detectors at the given (row, t) states, as (C=1) candidates
        cands = torch.full((len(rows), 1), -1, dtype=torch.long)
        out = {"window": [], "probe": []}
        for slot in range(max((len(v) for v in positions.values()), default=0)):
            cands.fill_(-1)
            for b, ts in positions.items():
                if slot < len(ts):
                    cands[b, 0] = ts[slot]
            valid = cands[:, 0] >= 0
            w = topd.window_divergence(loss, mask, cands, horizon)[:, 0]
            p = probe(cands, sample.make_generator(seed, 1, slot, device="cpu"))[:, 0]
            out["window"] += w[valid].tolist()
            out["probe"] += p[valid].tolist()
        return {k: (sum(v) / len(v) if v else float("nan")) for k, v in out.items()} | {"n": len(out["window"])}

    surface_pos = {b: [t for t, lab in enumerate(labels[b]) if lab == SURFACE] for b in range(len(rows))}
    error_pos = {b: [t for t, lab in enumerate(labels[b]) if lab == ERROR] for b in range(len(rows))}
    report["D_after"] = {"surface": scores_at(surface_pos), "error": scores_at(error_pos)}

    cands = topd.select_candidates(loss, mask, num_candidates, min_gap, special)
    valid = cands >= 0
    cand_labels = [labels[b][int(cands[b, c])] for b, c in torch.nonzero(valid).tolist()]
    report["candidates"] = {"count": len(cand_labels), **{k: cand_labels.count(k) / max(len(cand_labels), 1)
                                                           for k in kinds}}
    is_fork = torch.zeros_like(valid)
    for b, c in torch.nonzero(valid).tolist():
        is_fork[b, c] = labels[b][int(cands[b, c])] in FORK_LABELS
    report["detectors"] = {}
    for name in ("window", "probe"):
        if name == "window":
            d = topd.window_divergence(loss, mask, cands, horizon)
        else:
            d = probe(cands, sample.make_generator(seed, 2, device="cpu"))
        div = topd.divergent_mask(d, valid, alpha=div_alpha, threshold=div_threshold)
        tp = int((div & is_fork).sum())
        report["detectors"][name] = {
            "nondiv_frac": float((valid & ~div).sum() / valid.sum().clamp(min=1)),
            "precision": tp / max(int(div.sum()), 1), "recall": tp / max(int(is_fork.sum()), 1),
            "surface_flagged_divergent": float(sum(bool(div[b, c]) for b, c in torch.nonzero(valid).tolist()
                                                   if labels[b][int(cands[b, c])] == SURFACE)
                                               / max(cand_labels.count(SURFACE), 1))}
    return report


def print_report(r: dict) -> None:
    pct = lambda d: " ".join(f"{k} {v:.0%}" for k, v in d.items() if k not in ("count", "n"))  # noqa: E731
    print(f"detector report: {r['prompts']} student rollouts, {r['tokens']} response tokens")
    print(f"  all tokens:              {pct(r['label_share'])}")
    print(f"  top 1% by reverse KL:    {pct(r['top1'])}")
    print(f"  top 5% by reverse KL:    {pct(r['top5'])}")
    print(f"  candidates ({r['candidates']['count']}):        {pct(r['candidates'])}")
    for kind in ("surface", "error"):
        d = r["D_after"][kind]
        print(f"  mean D at {kind:8s} (n={d['n']}): window {d['window']:.3f}  probe {d['probe']:.3f}")
    for name, d in r["detectors"].items():
        print(f"  {name:6s} detector: non-divergent {d['nondiv_frac']:.0%} of candidates | precision "
              f"{d['precision']:.0%} recall {d['recall']:.0%} for real forks | surface flagged divergent "
              f"{d['surface_flagged_divergent']:.0%}")


# How the page colours a token: its reverse KL l_t as the red channel's opacity, saturating at LOSS_CAP nats; and how
# it marks a candidate: a box, solid when the probe calls it divergent, dashed when not; blue for a real fork
# (an error or a token after one), orange for a token that is not one (a harmless "," or a correct but unsure
# token). So a dashed orange box (suppressed, harmless) and a solid blue box (guided, a fork) are the detector right;
# a solid orange or a dashed blue box is the detector wrong.
LOSS_CAP = 4.0


@torch.no_grad()
def mechanism_page(world: str | Path = "runs/toy", out: str | Path | None = None, *, num_rollouts: int = 12,
                   seed: int = 0, horizon: int | None = None, probe_samples: int = 4, num_candidates: int = 4,
                   min_gap: int = 8, div_alpha: float = 0.5) -> Path:
    """A page for readers: the first num_rollouts held-out rollouts of the (undistilled) student, every token
    coloured by its loss, the candidates boxed, each candidate's D under both detectors, the relative rule's
    decision, and its ground-truth label. Writes `out` (default world/mechanism.html) and, with matplotlib installed,
    the same picture as a PNG next to it. Detector settings are the toy's training defaults (horizon 8)."""
    import html

    import topd

    horizon = horizon or TRAIN_DEFAULTS["horizon"]
    out = Path(out or Path(world) / "mechanism.html")
    scored = labelled_rollouts(world, num_prompts=num_rollouts, seed=seed)
    tok, rows, ro, loss, mask = (scored[k] for k in ("tok", "rows", "rollouts", "loss", "mask"))
    labels = scored["labels"]
    cands = topd.select_candidates(loss, mask, num_candidates, min_gap, scored["special"])  # (B, C)
    valid = cands >= 0
    scores = {"window": topd.window_divergence(loss, mask, cands, horizon),
              "probe": probe_scores(scored, cands, k=probe_samples, horizon=horizon,
                                    generator=sample.make_generator(seed, 2, device="cpu"))}
    divergent = {name: topd.divergent_mask(d, valid, alpha=div_alpha) for name, d in scores.items()}
    right = {name: 0 for name in scores}
    blocks, pictures = [], []
    for b in range(len(rows)):
        toks = tok.convert_ids_to_tokens(ro.response_ids[b][mask[b]].tolist())
        slot = {int(cands[b, c]): c for c in range(cands.shape[1]) if valid[b, c]}  # position -> candidate slot
        spans, table = [], []
        for t, text in enumerate(toks):
            shown = html.escape({"\n": "⏎"}.get(text, text))
            alpha = min(float(loss[b, t]) / LOSS_CAP, 1.0)
            tip = f"t={t} loss={float(loss[b, t]):.2f} label={labels[b][t]}"
            style = f"background: rgba(214, 39, 40, {alpha:.2f})"
            if t in slot:
                c = slot[t]
                fork = labels[b][t] in FORK_LABELS
                for name in scores:
                    right[name] += int(bool(divergent[name][b, c]) == fork)
                style += (f"; border: 2px {'solid' if divergent['probe'][b, c] else 'dashed'} "
                          f"{'#1f77b4' if fork else '#ff7f0e'}")
                tip += f" | D window {float(scores['window'][b, c]):.2f}, probe {float(scores['probe'][b, c]):.2f}"
                table.append(
                    f"<tr><td>{t}</td><td><code>{shown}</code></td><td>{labels[b][t]}</td>"
                    f"<td>{float(loss[b, t]):.2f}</td>"
                    + "".join(f"<td>{float(scores[n][b, c]):.2f} ({'div' if divergent[n][b, c] else 'non-div'}, "
                              f"{'right' if bool(divergent[n][b, c]) == fork else 'wrong'})</td>" for n in scores)
                    + "</tr>")
            spans.append(f'<span class="tok" style="{style}" title="{html.escape(tip)}">{shown}</span>')
        answer_ok = labels[b] and ERROR not in labels[b]
        blocks.append(
            f"<h3>rollout {b + 1}: <code>{html.escape(rows[b]['prompt'].strip())}</code> "
            f"({'no error' if answer_ok else 'has an error'})</h3><div class='line'>{''.join(spans)}</div>"
            "<table><tr><th>t</th><th>token</th><th>label</th><th>loss</th><th>window D (rule)</th>"
            f"<th>probe D (rule)</th></tr>{''.join(table)}</table>")
        pictures.append((toks, loss[b, :len(toks)].tolist(), {t: (labels[b][t] in FORK_LABELS,
                                                                   bool(divergent["probe"][b, slot[t]]))
                                                               for t in slot}))
    total = int(valid.sum())
    summary = ", ".join(f"{name} {right[name]}/{total} candidates decided right" for name in scores)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = "TOPD on the toy world: which high-loss tokens are forks"
    out.write_text(f"""<!doctype html><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} .line{{font-family:monospace;font-size:1.3em;
line-height:2.2em}} .tok{{padding:2px 1px;margin:0 1px}} table{{border-collapse:collapse;font-size:.9em}}
td,th{{border:1px solid #ccc;padding:2px 6px}}</style>
<h1>Which high-loss tokens are real forks?</h1>
<p>{len(rows)} held-out rollouts of the undistilled student (<code>{html.escape(str(world))}</code>, seed {seed}).
Each token's background is its per-token reverse KL to the teacher (full vocabulary; white = 0, full red &ge;
{LOSS_CAP:g} nats; hover for numbers). Boxes are TOPD's candidates (top {num_candidates} per rollout, gap
{min_gap}): <b style="color:#1f77b4">blue</b> = a real fork by the ground-truth labels (an error, or a token after
one), <b style="color:#ff7f0e">orange</b> = not a fork (a harmless <code>,</code> or a correct token); <b>solid</b> =
the probe calls it divergent (kept and guided), <b>dashed</b> = non-divergent (suppressed). Solid blue and dashed
orange are the detector right. Horizon H = {horizon}, K = {probe_samples}, relative rule (alpha {div_alpha}).</p>
<p>On this page: {summary}. Produced by <code>python toy.py --report</code>.</p>
{''.join(blocks)}
""")
    _mechanism_png(pictures, out.with_suffix(".png"))
    return out


def _mechanism_png(pictures, path: Path) -> Path | None:
    """The page's token lines as a PNG (matplotlib, optional): one row per rollout."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    width = max(len(toks) for toks, _, _ in pictures)
    fig, ax = plt.subplots(figsize=(0.28 * width + 1, 0.45 * len(pictures) + 1))
    for row, (toks, losses, boxes) in enumerate(pictures):
        y = len(pictures) - 1 - row
        for t, (text, value) in enumerate(zip(toks, losses)):
            ax.add_patch(plt.Rectangle((t, y), 0.95, 0.8, color=(0.84, 0.15, 0.16, min(value / LOSS_CAP, 1.0))))
            if t in boxes:
                fork, div = boxes[t]
                ax.add_patch(plt.Rectangle((t, y), 0.95, 0.8, fill=False, lw=2, ls="-" if div else "--",
                                           edgecolor="#1f77b4" if fork else "#ff7f0e"))
            ax.text(t + 0.47, y + 0.4, {"\n": "⏎"}.get(text, text), ha="center", va="center", fontsize=8,
                    family="monospace")
    ax.set_xlim(0, width)
    ax.set_ylim(0, len(pictures))
    ax.axis("off")
    ax.set_title("per-token reverse KL (red), candidates boxed: blue = real fork, orange = not; solid = probe says "
                 "divergent, dashed = suppressed", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="build the toy world (teacher, student, prompts)")
    parser.add_argument("--out", default=None, help="output folder (default runs/toy, or runs/toy-fast with --fast)")
    parser.add_argument("--fast", action="store_true", help="the small, quick world used by the tests")
    parser.add_argument("--long", action="store_true", help="the long world (toy.LONG): 4-7-step solutions with two "
                        "kinds of style, where style is ~30%% of the high-loss tokens")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    parser.add_argument("--report", action="store_true", help="detector report on the built student's rollouts")
    parser.add_argument("--student-variant", nargs="+", default=None, metavar="KNOB=VALUE",
                        help="a world that shares --teacher-from's teacher with a student trained with these student_* "
                        "knobs changed, e.g. student_swap_rate=0.5 student_other_sep_rate=0.5")
    parser.add_argument("--teacher-from", default=None, help="the built world whose teacher a --student-variant shares")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: $OMP_NUM_THREADS when set, "
                        "else every core); the count changes the world built, recorded in build.json with its hash")
    args = parser.parse_args(argv)
    torch.set_num_threads(thread_count(args.threads))
    if args.fast and args.long:
        parser.error("--fast and --long are two different worlds: give one")
    cfg = ToyConfig(**FAST) if args.fast else ToyConfig(**LONG) if args.long else ToyConfig()
    out = args.out or ("runs/toy-fast" if args.fast else "runs/toy-long" if args.long else "runs/toy")
    if args.student_variant:
        if not args.teacher_from or not args.out:
            parser.error("--student-variant needs --teacher-from (the world whose teacher it shares) and --out")
        overrides = dict(kv.split("=", 1) for kv in args.student_variant)
        fields = {f: type(getattr(cfg, f)) for f in asdict(cfg)}
        if any(k not in fields or not k.startswith("student_") for k in overrides):
            parser.error(f"--student-variant takes student_* knobs of ToyConfig, got {sorted(overrides)}")
        cfg = ToyConfig(**{**asdict(config_of(args.teacher_from)), **{k: fields[k](v) for k, v in overrides.items()}})
    info = build(out, cfg, force=args.force, verbose_log=say, teacher_from=args.teacher_from)
    a = info["accuracy"]
    print(f"toy world in {out} ({info['seconds']['total']} s to build at {info.get('threads', '?')} thread(s); params "
          f"teacher {info['params']['teacher']:,}, student {info['params']['student']:,}; world hash {world_hash(out)})")
    print(f"held-out accuracy ({cfg.num_test_prompts} prompts): teacher {a['teacher']['greedy']:.1%} greedy / "
          f"{a['teacher']['t1']:.1%} at T=1 | student {a['student']['greedy']:.1%} greedy / {a['student']['t1']:.1%} at T=1")
    if args.report:
        print_report(detector_report(out, horizon=TRAIN_DEFAULTS["horizon"]))  # as train.py and reproduce.py
        print(f"mechanism page: {mechanism_page(out)} (and a .png beside it when matplotlib is installed)")


if __name__ == "__main__":
    main()
