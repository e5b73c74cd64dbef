"""Compiled decoding (SamplingConfig.decode = "compiled", train.py --decode compiled): a preallocated StaticCache and a
torch.compile'd one-token step must draw exactly the ids that the eager reference draws with the same generator, and
everything downstream (the probe's cuts of the rollout cache, the continuations, a whole training step in every
mode) must be the same computation."""

import copy

import pytest
import torch

import checkpoint
import sample
import topd
import train
from toy import EOS_ID, PAD_ID

PROMPTS = ["15+16-47=?\n", "3+4=?\n", "99-1+12=?\n", "7+8=?\n", "40-3=?\n"]


@pytest.fixture(scope="module")
def models(fast_world):
    world, _ = fast_world
    student, tok = sample.load_policy(str(world / "student"))
    teacher, _ = sample.load_policy(str(world / "teacher"))
    return world, student, tok, teacher


def _sample(model, tok, decode, keep_cache=False, seed=0, **settings):
    ids, _ = sample.encode_prompts(tok, PROMPTS)
    return sample.sample_rollouts(model, ids, sampling=sample.SamplingConfig(max_new_tokens=20, decode=decode,
                                                                             **settings),
                                  eos_ids=[EOS_ID], pad_id=PAD_ID, keep_cache=keep_cache,
                                  generator=sample.make_generator(seed, device="cpu"))


def test_compiled_rollouts_and_continuations_draw_what_eager_draws(models, monkeypatch):
    """The same generator gives the same ids and masks, log-probs to 1e-5; the probe's states cut from the compiled
    rollout's StaticCache equal those cut from the eager DynamicCache; continuations from them draw the same ids
    (compiled continuations forced on the CPU, where sample.continuation_decode otherwise keeps them eager)."""
    monkeypatch.setattr(sample, "COMPILED_CONTINUATIONS", {"cpu", "cuda"})
    static_prefixes = []
    made = sample._static_prefix_cache
    monkeypatch.setattr(sample, "_static_prefix_cache", lambda *a: static_prefixes.append(1) or made(*a))
    _, student, tok, _ = models
    eager, compiled = _sample(student, tok, "eager", True), _sample(student, tok, "compiled", True)
    assert torch.equal(eager.ids, compiled.ids) and torch.equal(eager.response_mask, compiled.response_mask)
    assert torch.allclose(eager.logprobs, compiled.logprobs, atol=1e-5)
    assert type(compiled.cache.layers[0]).__name__ == "StaticLayer" and compiled.cache.layers[0].keys.shape[0] == 8
    rows, ts = torch.tensor([0, 2, 3]), torch.tensor([3, 5, 1])
    a = sample.prefixes_from_cache(eager.cache, eager, rows, ts)
    b = sample.prefixes_from_cache(compiled.cache, compiled, rows, ts)
    assert torch.equal(a.attention_mask, b.attention_mask)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        assert torch.allclose(la.keys, lb.keys, atol=1e-5) and torch.allclose(la.values, lb.values, atol=1e-5)
    conts = [sample.sample_continuations(student, enc, 3, 6, sampling=sample.SamplingConfig(decode=decode),
                                         eos_ids=[EOS_ID], pad_id=PAD_ID, keep_hidden=True,
                                         generator=sample.make_generator(1, device="cpu"))
             for enc, decode in ((a, "eager"), (b, "compiled"))]
    assert torch.equal(conts[0].ids, conts[1].ids) and torch.equal(conts[0].mask, conts[1].mask)
    assert torch.allclose(conts[0].logprobs, conts[1].logprobs, atol=1e-5)
    assert torch.allclose(conts[0].head.hidden, conts[1].head.hidden, atol=1e-5)
    assert static_prefixes == [1]  # the second set of continuations really went through the compiled step


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=0.7, top_k=5),
                                      dict(temperature=1.3, top_p=0.8)])
def test_compiled_draws_what_eager_draws_greedy_and_truncated(models, settings):
    """The compiled draw runs sampling_logits (temperature, top-k's threshold, top-p's sort and cumulative sum)
    under inductor, then draws from the log-softmax: greedy picks the same argmax, and the truncated distributions
    keep and drop the same tokens, so the ids are eager's; the log-probs to 1e-5."""
    _, student, tok, _ = models
    eager, compiled = _sample(student, tok, "eager", seed=3, **settings), \
        _sample(student, tok, "compiled", seed=3, **settings)
    assert torch.equal(eager.ids, compiled.ids) and torch.equal(eager.response_mask, compiled.response_mask)
    assert torch.allclose(eager.logprobs, compiled.logprobs, atol=1e-5)
    if settings["temperature"] > 0:  # a real sample: some drawn tokens had probability below 1
        assert (eager.logprobs * eager.response_mask).sum() < 0


def test_compiled_rollouts_under_bf16_autocast_agree_with_eager(models):
    """bf16 compute (train.py on CUDA, or --dtype bfloat16): the static cache is allocated before the prefill in the
    dtype the keys will have, autocast's, not the fp32 weights' (a wrong guess fails at the first cache write), and
    compiled decoding agrees with eager to bf16 rounding: the two sum in other orders, so ids may part at a near
    tie; up to the first token where any row's ids differ (the same generator), the sampler's log-probs agree within
    0.05 nats."""
    _, student, tok, _ = models
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, compiled = (_sample(student, tok, decode, keep_cache=True, seed=5) for decode in ("eager", "compiled"))
    assert compiled.cache.layers[0].keys.dtype == torch.bfloat16
    same = (eager.ids == compiled.ids).all(0)[eager.prompt_width:]  # (R,) every row agrees at this column
    agree = int(same.long().cumprod(0).sum())  # leading columns where every row agrees
    assert agree >= 5
    mask = eager.response_mask[:, :agree].bool()
    diff = (eager.logprobs[:, :agree] - compiled.logprobs[:, :agree]).abs()[mask]
    assert diff.max() < 0.05 and (eager.logprobs[:, :agree][mask] < 0).any()  # not all exactly 0: a real check


def test_compiled_draws_take_their_logprobs_from_the_step(models, monkeypatch):
    """After a loop's first draw (from the prefill's hidden states), each compiled step computes the next draw's
    log-probs in its own graph: the separate draw function runs once per loop, not once per token."""
    world, student, tok, _ = models
    calls = []

    def counted(*args):
        calls.append(1)
        return sample._sampling_logprobs(*args)

    monkeypatch.setitem(sample._COMPILED, (sample._sampling_logprobs, "cpu"), counted)
    ro = _sample(student, tok, "compiled")
    assert len(calls) == 1 and ro.response_mask.sum(1).max() >= 5
    # a head whose weight is a new tensor at every draw (FSDP gathering it per call, rollouts not unsharded): the
    # steps' log-probs would be for the old one, so every draw computes its own, and draws what eager draws
    full_weight = sample._full_weight
    monkeypatch.setattr(sample, "_full_weight", lambda *a: full_weight(*a).clone())
    calls.clear()
    again, eager = _sample(student, tok, "compiled"), _sample(student, tok, "eager")
    assert len(calls) == again.response_mask.shape[1] and torch.equal(again.ids, eager.ids)


def test_continuations_decode_compiled_only_where_it_pays():
    """On the CPU a compiled step is no faster for the probe's hundreds of rows and its continuations would pay a
    copy into a static cache, so they stay eager there; on CUDA they follow --decode."""
    assert sample.continuation_decode("compiled", "cpu") == "eager"
    assert sample.continuation_decode("compiled", "cuda") == "compiled"
    assert sample.continuation_decode("eager", "cuda") == "eager"
    # the probe's memory bound counts the layout the continuations really have: eager on the CPU (12 rows x 38
    # columns fit in 512 tokens, where compiled buckets would lay out 16 x 64)
    assert sample.laid_out_tokens(12, 38, sample.continuation_decode("compiled", "cpu")) == 12 * 38


def test_compiled_rollouts_reuse_a_pooled_cache_that_is_reset(models):
    """Compiled rollouts take their StaticCache from a pool and give it back: the next rollouts of the same shape
    reuse the same tensors (on CUDA: the same addresses for the graphs). A reused cache is reset first, so a cache
    left full of NaN draws what a fresh one draws. A kept cache (keep_cache=True, the probe's) stays out of the pool
    until given back with recycle_cache, and a batch of another shape replaces the pool's caches."""
    _, student, tok, _ = models
    eager = _sample(student, tok, "eager")
    kept = _sample(student, tok, "compiled", keep_cache=True)
    first = _sample(student, tok, "compiled")
    key, free = sample._POOL[student]
    assert len(free) == 1 and free[0] is not kept.cache and key[:2] == (8, 64)  # 5 prompts -> 8 rows, 64 columns
    pooled = free[0]
    for layer in pooled.layers:
        layer.keys.fill_(float("nan"))
        layer.values.fill_(float("nan"))
    again = _sample(student, tok, "compiled")
    assert torch.equal(again.ids, eager.ids) and torch.equal(first.ids, eager.ids) and torch.equal(kept.ids, eager.ids)
    assert sample._POOL[student][1] == [pooled] and not torch.isnan(pooled.layers[0].keys).any()
    sample.recycle_cache(student, kept.cache)
    sample.recycle_cache(student, kept.cache)  # twice: still pooled once
    assert [id(c) for c in sample._POOL[student][1]] == [id(pooled), id(kept.cache)]
    sample.recycle_cache(student, sample.new_cache(student))  # not from the pool (eager): ignored
    assert len(sample._POOL[student][1]) == 2
    ids, _ = sample.encode_prompts(tok, PROMPTS)
    longer = sample.sample_rollouts(student, ids, sampling=sample.SamplingConfig(max_new_tokens=90, decode="compiled"),
                                    eos_ids=[-1], pad_id=PAD_ID, generator=sample.make_generator(3, device="cpu"))
    key, free = sample._POOL[student]
    assert key[:2] == (8, 128) and len(free) == 1 and longer.ids.shape[1] - longer.prompt_width == 90


def test_compiled_rollouts_that_outgrow_a_window_draw_what_eager_draws(models, monkeypatch):
    """A rollout longer than 64 columns crosses from the 64-column window of the static cache to the 128-column one
    (two views of the same tensors): the writes of the first window must be what the second one reads, so the
    draws stay those of eager decoding, token for token."""
    _, student, tok, _ = models
    widths = []
    bucket = sample.window_bucket
    monkeypatch.setattr(sample, "window_bucket", lambda *a: widths.append(bucket(*a)) or widths[-1])
    ids, _ = sample.encode_prompts(tok, PROMPTS)
    eager, compiled = (sample.sample_rollouts(student, ids, sampling=sample.SamplingConfig(max_new_tokens=90,
                                                                                           decode=decode),
                                              eos_ids=[-1], pad_id=PAD_ID, generator=sample.make_generator(
                                                  3, device="cpu")) for decode in ("eager", "compiled"))
    assert sorted(set(widths)) == [64, 128] and eager.ids.shape[1] - eager.prompt_width == 90
    assert torch.equal(eager.ids, compiled.ids)
    assert torch.allclose(eager.logprobs, compiled.logprobs, atol=1e-5)


def test_a_counted_model_compiles_once_per_shape_and_counts_exactly(models):
    """train.py counts every forward's tokens with a pre-hook on each model (checkpoint.ForwardTokens), and the
    compiled step traces that hook. With a Python int as the counter, torch.compile took it for a constant and
    recompiled the step at every token, up to its cache limit of 64 graphs, then ran eagerly behind 64 failing guard
    checks per token: the toy training step's sampling was 2.4x slower than eager. One rollout batch must add at most
    two graphs (a 64- and a 128-column window), and the count stays exact: 8 rows (5 prompts, bucketed) through the
    prefill and through each of the 29 one-token steps that follow the first draw, also when the same shapes were
    compiled before for a model without the hook."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    _, student, tok, _ = models
    ids, _ = sample.encode_prompts(tok, PROMPTS)

    def rollouts(model):
        return sample.sample_rollouts(model, ids, sampling=sample.SamplingConfig(max_new_tokens=30, decode="compiled"),
                                      eos_ids=[-1], pad_id=PAD_ID, generator=sample.make_generator(0, device="cpu"))

    # the same shapes compiled first for a model without the hook: a graph that ignores hooks must not be reused
    rollouts(student)
    model = copy.deepcopy(student)  # the hook stays off the module the other tests share
    counter = checkpoint.ForwardTokens(model)
    graphs = len(_debug_get_cache_entry_list(sample._one_token.__code__))
    ro = rollouts(model)
    assert len(_debug_get_cache_entry_list(sample._one_token.__code__)) - graphs <= 2
    assert counter.take() == 8 * ro.prompt_width + 8 * 29 and counter.take() == 0


def test_the_compiled_prefill_serves_every_prompt_width_with_two_graphs(models, monkeypatch):
    """The rollouts' prefill is compiled (sample._prefill), and prompt widths change from batch to batch: dynamo
    compiles the first width as it is and the second with the width symbolic, which then serves every later width.
    Two regressions this counts: a pooled cache must not need a graph of its own (the first batch's cache is new, the
    second's, of the same width, comes back from the pool: transformers allocates a StaticCache's layers at their
    first write, inside the prefill's graph, unless take_static_cache allocates them first), and the prefill's
    hidden states are contiguous, so the first draw's compiled head (_sampling_logprobs) sees the same strides at
    every width (a (B, P, d) view made it compile a graph per width). Ids equal eager's at each width."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    _, student, tok, _ = models
    model = copy.deepcopy(student)  # its own graphs: those of other tests' models do not count
    batches = [["15+16-47=?\n", "3+4=?\n"], ["15+16-47=?\n", "7+8=?\n"], ["99-1+12=?\n", "7+8=?\n"],
               ["40-3=?\n", "7+8=?\n"], ["3+4=?\n", "7+8=?\n"]]
    graphs = {fn: len(_debug_get_cache_entry_list(fn.__code__)) for fn in (sample._prefill, sample._sampling_logprobs)}
    def eager_and_compiled(batch, seed):
        ids, _ = sample.encode_prompts(tok, batch)
        return [sample.sample_rollouts(model, ids, sampling=sample.SamplingConfig(max_new_tokens=8, decode=decode),
                                       eos_ids=[-1], pad_id=PAD_ID, generator=sample.make_generator(seed, device="cpu"))
                for decode in ("eager", "compiled")]

    widths = []
    for k, batch in enumerate(batches):
        eager, compiled = eager_and_compiled(batch, k)
        assert torch.equal(eager.ids, compiled.ids)
        widths.append(compiled.prompt_width)
    assert len(set(widths)) == 4 and widths[0] == widths[1]
    assert len(_debug_get_cache_entry_list(sample._prefill.__code__)) - graphs[sample._prefill] <= 2
    assert len(_debug_get_cache_entry_list(sample._sampling_logprobs.__code__)) - graphs[sample._sampling_logprobs] <= 1
    # where the prefill stays eager (CUDA: sample.COMPILED_PREFILL), the same pooled, pre-allocated cache still draws
    # eager's ids, and adds no prefill graph
    monkeypatch.setattr(sample, "COMPILED_PREFILL", set())
    prefill_graphs = len(_debug_get_cache_entry_list(sample._prefill.__code__))
    eager, compiled = eager_and_compiled(batches[2], 9)
    assert torch.equal(eager.ids, compiled.ids)
    assert len(_debug_get_cache_entry_list(sample._prefill.__code__)) == prefill_graphs


def test_compiled_shapes_are_bucketed():
    """Rows to a power of two, cache columns to a multiple of 64: a run compiles for a handful of shapes, and the
    probe's memory bound counts the padded layout."""
    assert [sample.row_bucket(n) for n in (1, 2, 3, 32, 33, 250)] == [1, 2, 4, 32, 64, 256]
    assert [sample.column_bucket(n) for n in (1, 64, 65, 130)] == [64, 64, 128, 192]
    # attention reads the columns in use rounded up to a power of two (at least 64, at most the cache's width)
    assert [sample.window_bucket(n, 192) for n in (1, 64, 65, 128, 129, 192)] == [64, 64, 128, 128, 192, 192]
    assert sample.window_bucket(70, 64 * 40) == 128 and sample.window_bucket(1500, 2048 + 64) == 2048
    assert sample.laid_out_tokens(33, 65, "eager") == 33 * 65
    assert sample.laid_out_tokens(33, 65, "compiled") == 64 * 128
    assert [c.tolist() for c in topd.state_chunks(torch.tensor([30, 30, 30]), 4, 8, 8 * 64, "compiled")] == \
        [[0, 1], [2]]  # 2 states x 4 = 8 rows x 64 columns fit; 3 states would lay out 16 rows
    assert [c.tolist() for c in topd.state_chunks(torch.tensor([30, 30, 30]), 4, 8, 8 * 64, "eager")] == \
        [[0, 1, 2]]  # eager: 12 rows x 38 columns = 456


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """Two Runs on the fast world, one per decode mode, from the same checkpoints, kept for the module: each
    compiles its models' steps once."""
    world = models[0]
    made = {}
    for decode in ("eager", "compiled"):
        argv = ["--toy-dir", str(world), "--max-new-tokens", "24", "--rollout-batch", "16", "--micro-batch", "8",
                "--horizon", "4", "--probe-samples", "2", "--decode", decode, "--no-self-check", "--out",
                str(tmp_path_factory.mktemp(decode))]
        made[decode] = train.setup(train.parse_config(argv), "cpu", log=lambda *a: None)
    return made


@pytest.mark.parametrize("mode, detector", [("opd", "window")] + [(m, d) for m in ("opd_suppress", "topd")
                                                                     for d in topd.DETECTORS])
def test_a_training_step_is_the_same_with_compiled_decoding(runs, mode, detector, monkeypatch):
    """One train_step, eager and compiled, the runs in step from the same weights: the same rollouts (lengths), the
    same candidates and divergence decisions, the same losses and guidance windows, for every mode/detector pair
    (opd ignores the detector: one pair). The runs are shared across the pairs, so each decoding path compiles once,
    on the first pair that takes it (opd: rollouts; the probe: both models' continuations; the windows: the
    teacher's); the pairs after it cost about a second each. The continuations decode compiled here as they do on
    CUDA (on the CPU they would otherwise stay eager)."""
    monkeypatch.setattr(sample, "COMPILED_CONTINUATIONS", {"cpu", "cuda"})
    metrics = {}
    for decode, run in runs.items():
        run.cfg.mode, run.cfg.detector = mode, detector
        metrics[decode] = train.train_step(run, 3)
    a, b = metrics["eager"], metrics["compiled"]
    assert {"rollout/len_mean", "opd/loss", "grad_norm"} <= a.keys() and (mode == "opd" or "topd/candidates" in a)
    assert mode != "topd" or a["guide/tokens"] > 0  # the windows really ran
    for key in ("rollout/len_mean", "opd/teacher_kl", "opd/loss", "topd/candidates", "topd/nondiv_frac",
                "guide/tokens", "guide/loss", "grad_norm"):
        if key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
