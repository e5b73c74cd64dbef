"""Tiny-model tests of sample.py and teacher.py: real HF models built from a config, saved and loaded back."""

import pytest
import torch

import sample
import teacher as teacher_mod
import fused_kernels
import topd
from toy import EOS_ID, PAD_ID, build_tokenizer


def _llama(seed, vocab_size=25, layers=2, logit_scale=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a sharper distribution than the near-uniform init, so tests can tell samplers apart
        model.lm_head.weight.mul_(logit_scale if logit_scale is not None else 30.0)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Student and teacher checkpoints on disk, loaded back through from_pretrained like any hub model."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = build_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        _llama(seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    student, s_tok = sample.load_policy(str(root / "student"))
    teacher, t_tok = teacher_mod.load_teacher(str(root / "teacher"))
    return root, student, s_tok, teacher, t_tok


def _rollouts(model, tok, prompts, seed=0, max_new=12, **kw):
    ids, _ = sample.encode_prompts(tok, prompts)
    return sample.sample_rollouts(model, ids, sampling=sample.SamplingConfig(max_new_tokens=max_new, **kw),
                                  eos_ids=[EOS_ID], pad_id=PAD_ID, generator=sample.make_generator(seed, 0, 0, device="cpu"))


PROMPTS = ["15+16-47=?\n", "3+4=?\n", "99-1+12=?\n"]


# ------------------------------------------------------------------------------------------------ loading

def test_loaded_models_are_in_the_right_mode(saved):
    _, student, _, teacher, _ = saved
    assert not student.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())


# ------------------------------------------------------------------------------------------------ prompts

def test_encode_prompts_truncates_from_the_left_and_counts():
    tok = build_tokenizer()
    full, n = sample.encode_prompts(tok, ["12+34=?\n", "1+2=?\n"])
    assert n == 0 and full[0][0] == 1  # <bos> first
    cut, n = sample.encode_prompts(tok, ["12+34=?\n", "1+2=?\n"], max_prompt_len=7)
    assert n == 1 and cut[0] == full[0][-7:] and cut[1] == full[1]
    with pytest.raises(ValueError, match="max-prompt-len"):
        sample.encode_prompts(tok, ["12+34=?\n"], max_prompt_len=7, strict=True)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sample.encode_prompts(tok, ["1=?\n", "  "])
    # token ids pass through untouched, and the chat template writes its own BOS exactly once
    assert sample.encode_prompts(tok, [[5, 6, 7]])[0] == [[5, 6, 7]]
    assert sample.encode_prompts(tok, ["1+2=?\n"], chat_template=True)[0] == sample.encode_prompts(tok, ["1+2=?\n"])[0]


def test_step_prompt_indices_see_every_prompt_once_per_epoch():
    """Consecutive steps slice seeded permutations: each epoch covers every prompt once, a step may span two
    epochs, and the same (seed, step) gives the same prompts (a resumed run sees what the uninterrupted one saw)."""
    steps = [sample.step_prompt_indices(10, step, 4, seed=0) for step in range(5)]  # 20 positions: two epochs
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert steps[3] == sample.step_prompt_indices(10, 3, 4, seed=0) != sample.step_prompt_indices(10, 3, 4, seed=1)


def test_left_pad_and_positions():
    ids, mask = sample.left_pad([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert sample.position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]


# ------------------------------------------------------------------------------------------------ sampling

def test_sampling_logits_top_k_top_p_temperature():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda cfg: torch.isfinite(sample.sampling_logits(z, cfg))[0].tolist()  # noqa: E731
    assert kept(sample.SamplingConfig(top_k=2)) == [True, True, False, False]
    assert kept(sample.SamplingConfig(top_p=0.8)) == [True, True, False, False]   # 0.5 + 0.3 reaches 0.8
    assert kept(sample.SamplingConfig(top_p=0.81)) == [True, True, True, False]
    assert kept(sample.SamplingConfig()) == [True] * 4
    t2 = torch.softmax(sample.sampling_logits(z, sample.SamplingConfig(temperature=2.0)), -1)
    assert torch.allclose(t2, torch.softmax(z / 2, -1))  # temperature divides logits
    with pytest.raises(ValueError):
        sample.SamplingConfig(top_p=0.0)


def test_generation_config_cannot_override_sampling(tmp_path):
    """A checkpoint shipping temperature=0.01, top_k=1 still samples from softmax(logits) (trap 2)."""
    model = _llama(3, logit_scale=8.0)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.01
    model.generation_config.top_k = 1
    model.generation_config.top_p = 0.5
    model.save_pretrained(tmp_path / "m")
    build_tokenizer().save_pretrained(tmp_path / "m")
    loaded, tok = sample.load_policy(str(tmp_path / "m"))
    assert loaded.generation_config.top_k == 1  # the preset really is in the checkpoint
    n = 20000
    prompt = sample.encode_prompts(tok, ["15+16=?\n"])[0][0]
    ro = sample.sample_rollouts(loaded, [prompt] * n, sampling=sample.SamplingConfig(max_new_tokens=1),
                                eos_ids=[EOS_ID], pad_id=PAD_ID, generator=sample.make_generator(0, 0, 0, device="cpu"))
    empirical = torch.bincount(ro.response_ids[:, 0], minlength=25).float() / n
    with torch.no_grad():
        exact = torch.softmax(loaded(torch.tensor([prompt])).logits[0, -1].float(), -1)
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert exact.max() < 0.9  # a distribution where top_k=1 would be visibly different
    assert tv < 0.03, f"total variation {tv:.3f}: samples do not follow softmax(logits)"


def test_pad_equals_eos_keeps_first_eos_in_mask():
    """pad id == EOS id (trap 4): the mask must come from the FIRST EOS, not from the pad id."""
    model = _llama(4, logit_scale=0.01)  # near-uniform over 25 tokens: EOS comes at random times
    ids = [[1, 5, 6]] * 64
    ro = sample.sample_rollouts(model, ids, sampling=sample.SamplingConfig(max_new_tokens=30), eos_ids=[EOS_ID],
                                pad_id=EOS_ID, generator=sample.make_generator(1, 0, 0, device="cpu"))
    resp, mask = ro.response_ids, ro.response_mask
    assert ro.truncated.any() and not ro.truncated.all()
    for b in range(len(ids)):
        row = resp[b].tolist()
        if EOS_ID in row:
            first = row.index(EOS_ID)
            assert mask[b, :first + 1].all() and not mask[b, first + 1:].any()
            assert not ro.truncated[b]
        else:
            assert mask[b].all() and ro.truncated[b]
    assert torch.equal(ro.attention_mask[:, ro.prompt_width:], mask)


def test_a_generator_names_its_device():
    """Review finding: a CPU generator handed to a sampler of CUDA probabilities crashed the first step of every GPU
    run (train.py's start-up self-check built one without a device). The device is a required argument now, so no
    call site can forget it; the draw checks that the generator lives where the probabilities do."""
    with pytest.raises(TypeError, match="device"):
        sample.make_generator(0, 1, 2)
    assert sample.make_generator(0, 1, device="cpu").device.type == "cpu"


def test_sampler_logprobs_come_from_fp32_logits_of_a_bf16_model():
    """The probe's margins subtract the sampler's log-probs from fused fp32 scores, so the sampler's must come from
    fp32 logits too: the head's matmul in fp32 over the model's (bf16) final hidden states, not the model's own bf16
    logits, which are rounded by ~2^-8 relative (here ~1e-2 nats on a log-prob). Checked against log_softmax of
    hidden.float() @ weight.float().T at the very hidden states each token was drawn from."""
    model = sample._tiny_random_model().to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # logits of a few units, where bf16 rounding shows
    hiddens = []
    hook = model.model.norm.register_forward_hook(lambda m, args, out: hiddens.append(out[:, -1]))
    try:
        ro = sample.sample_rollouts(model, [[1, 10, 11, 12], [1, 20]], sampling=sample.SamplingConfig(max_new_tokens=6),
                                    eos_ids=[2], pad_id=0, generator=sample.make_generator(0, device="cpu"))
    finally:
        hook.remove()
    weight, bf16_gap = model.lm_head.weight.detach().float(), 0.0
    for j in range(ro.response_ids.shape[1]):  # hiddens[j] predicted response token j
        hidden, token, keep = hiddens[j].detach(), ro.response_ids[:, j:j + 1], ro.response_mask[:, j].bool()
        want = torch.log_softmax(hidden.float() @ weight.T, -1).gather(-1, token)[:, 0]
        own = torch.log_softmax((hidden @ model.lm_head.weight.detach().T).float(), -1).gather(-1, token)[:, 0]
        assert torch.allclose(ro.logprobs[keep, j], want[keep], atol=1e-5)
        bf16_gap = max(bf16_gap, float((own - want)[keep].abs().max()))
    assert bf16_gap > 1e-4  # the precondition: the model's own bf16 logits WOULD give other log-probs


def test_same_seed_same_rollouts_other_rank_differs(saved):
    _, student, tok, _, _ = saved
    prompt_ids, _ = sample.encode_prompts(tok, PROMPTS)
    cfg = sample.SamplingConfig(max_new_tokens=16)

    def run(seed, step, rank):
        return sample.sample_rollouts(student, prompt_ids, sampling=cfg, eos_ids=[EOS_ID], pad_id=PAD_ID,
                                      generator=sample.make_generator(seed, step, rank, device="cpu")).ids

    a, b, c = run(7, 3, 0), run(7, 3, 0), run(7, 3, 1)
    assert torch.equal(a, b)
    assert a.shape != c.shape or not torch.equal(a, c)
    # hashing, not adding: (seed 1, rank 0) and (seed 0, rank 1) are different streams
    g1, g2 = sample.make_generator(1, 0, 0, device="cpu"), sample.make_generator(0, 0, 1, device="cpu")
    assert not torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


def test_eos_token_ids_collects_every_source():
    class Cfg:
        eos_token_id = [2, 7]

    class Model:
        config = Cfg()
        generation_config = type("G", (), {"eos_token_id": 9})()

    tok = build_tokenizer()
    assert sample.eos_token_ids(Model(), tok) == [2, 7, 9]


# ------------------------------------------------------------------------------------------------ scoring

def test_left_padded_batch_scores_like_each_row_alone(saved):
    _, student, tok, teacher, _ = saved
    ro = _rollouts(student, tok, PROMPTS)
    with torch.no_grad():
        batch = teacher_mod.response_logits(teacher, ro)  # (B, R, V)
    for b in range(len(PROMPTS)):
        n_prompt, n_resp = int(ro.prompt_lens[b]), int(ro.response_mask[b].sum())
        start = ro.prompt_width - n_prompt
        alone = sample.Rollouts(ids=ro.ids[b:b + 1, start:ro.prompt_width + n_resp],
                                attention_mask=torch.ones(1, n_prompt + n_resp, dtype=torch.long),
                                prompt_width=n_prompt, response_mask=ro.response_mask[b:b + 1, :n_resp],
                                truncated=ro.truncated[b:b + 1], prompt_lens=ro.prompt_lens[b:b + 1],
                                logprobs=ro.logprobs[b:b + 1, :n_resp])
        with torch.no_grad():
            single = teacher_mod.response_logits(teacher, alone)[0]
        assert (batch[b, :n_resp] - single).abs().max() < 1e-5


def test_response_logits_are_shifted_correctly(saved):
    """The logit aligned with response token r is the one computed at the token BEFORE it (trap 1)."""
    _, student, tok, _, _ = saved
    ro = _rollouts(student, tok, ["12+3=?\n"])
    with torch.no_grad():
        full = student(ro.ids).logits  # (1, P+R, V), one row so no padding
        aligned = teacher_mod.response_logits(student, ro)
    P, R = ro.prompt_width, ro.response_ids.shape[1]
    assert torch.allclose(aligned[0], full[0, P - 1:P + R - 1], atol=1e-5)
    assert not torch.allclose(aligned[0], full[0, P:P + R], atol=1e-3)


def test_sampler_logprobs_match_learner_logprobs(saved):
    """Sampler vs learner log-probs of the same tokens agree in-process (trap 14)."""
    _, student, tok, _, _ = saved
    ro = _rollouts(student, tok, PROMPTS, max_new=20)
    with torch.no_grad():
        learner = fused_kernels.token_logprobs(teacher_mod.response_logits(student, ro), ro.response_ids)
    diff = ((learner - ro.logprobs) * ro.response_mask).abs().max()
    assert diff < 1e-4


def test_teacher_equal_student_gives_zero_kl_and_other_teacher_does_not(saved):
    _, student, tok, teacher, _ = saved
    ro = _rollouts(student, tok, PROMPTS)
    with torch.no_grad():  # the training path: fused heads on both sides
        s_head = teacher_mod.response_head(student, ro)
        same = topd.per_token_kl(s_head, teacher_mod.score_rollouts(student, ro, "full"))
        other = topd.per_token_kl(s_head, teacher_mod.score_rollouts(teacher, ro, "full"))
    m = ro.response_mask.bool()
    assert same[m].abs().max() < 1e-5
    assert other[m].mean() > 0.1
    lp = teacher_mod.score_rollouts(teacher, ro, "sampled")
    assert lp.shape == ro.response_ids.shape and (lp[~m] == 0).all() and (lp[m] < 0).all()


def test_vocab_padding_accepted_and_sliced(saved):
    """A teacher with extra padding rows in config.vocab_size (151936 vs 152064 in miniature) is accepted and
    gives exactly the KL of the unpadded teacher once sliced to the tokenizer's size (trap 10)."""
    _, student, tok, teacher, t_tok = saved
    padded = _llama(1)
    padded.load_state_dict(teacher.state_dict())
    padded.resize_token_embeddings(32)  # 7 extra rows with random weights
    padded.eval().requires_grad_(False)
    assert padded.config.vocab_size == 32
    vocab = teacher_mod.check_compatible(tok, t_tok, student.config, padded.config)
    assert vocab == 25
    ro = _rollouts(student, tok, PROMPTS)
    with torch.no_grad():
        s_head = teacher_mod.response_head(student, ro)
        ref = topd.per_token_kl(s_head, teacher_mod.score_rollouts(teacher, ro, "full"))
        got = topd.per_token_kl(s_head, teacher_mod.score_rollouts(padded, ro, "full"), vocab_size=vocab)
        unfused = topd.per_token_kl(teacher_mod.response_logits(student, ro),  # the logits path agrees
                                    teacher_mod.response_logits(padded, ro), vocab_size=vocab)
    assert torch.allclose(ref, got, atol=1e-5) and torch.allclose(unfused, got, atol=1e-5)


def test_incompatible_tokenizer_rejected_with_a_clear_message():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    s_tok = build_tokenizer()
    vocab = dict(s_tok.get_vocab())
    vocab[";"], vocab[","] = vocab[","], vocab[";"]  # two tokens swapped: same size, different mapping
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=None)),
                                    bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    with pytest.raises(ValueError) as err:
        teacher_mod.check_compatible(s_tok, other, student_name="qwen-small", teacher_name="llama-big")
    msg = str(err.value)
    assert "qwen-small" in msg and "llama-big" in msg and "';'" in msg and "','" in msg
    # a different EOS is also refused
    diff_eos = build_tokenizer()
    diff_eos.eos_token = "<pad>"
    with pytest.raises(ValueError, match="eos_token"):
        teacher_mod.check_compatible(s_tok, diff_eos)


# ------------------------------------------------------------------------------------------------ probes

def test_kv_cache_reuse_matches_reencoding(saved):
    """Continuations and scores from the cached prefix equal those from re-encoding everything."""
    _, student, tok, teacher, _ = saved
    ro = _rollouts(student, tok, PROMPTS[:2], max_new=10)
    prefixes = [ro.prefix(0, 4), ro.prefix(1, 2)]
    enc = sample.encode_prefixes(student, prefixes, PAD_ID)
    H, K = 6, 3
    # greedy continuations from the cache == greedy decoding by re-running the whole sequence each step
    greedy = sample.sample_continuations(student, enc, 1, H, sampling=sample.SamplingConfig(temperature=0.0),
                                         eos_ids=[EOS_ID], pad_id=PAD_ID, generator=sample.make_generator(0, device="cpu"))
    for i, p in enumerate(prefixes):
        seq = p.clone()
        with torch.no_grad():
            for j in range(H):
                if not greedy.mask[i, 0, j]:
                    break
                nxt = student(seq[None]).logits[0, -1].argmax()
                assert nxt == greedy.ids[i, 0, j]
                seq = torch.cat([seq, nxt[None]])
    # sampled continuations (T = 1): sampler log-probs, cached scores by the teacher, and the hidden states kept
    # during sampling (as a fused Head) all equal a plain forward over prefix + continuation
    conts = sample.sample_continuations(student, enc, K, H, sampling=sample.SamplingConfig(), eos_ids=[EOS_ID],
                                        pad_id=PAD_ID, generator=sample.make_generator(1, device="cpu"), keep_hidden=True)
    t_enc = sample.encode_prefixes(teacher, prefixes, PAD_ID)
    t_scores = teacher_mod.score_continuations(teacher, t_enc, conts)
    with torch.no_grad():
        cached_logits = teacher_mod.continuation_logits(student, enc, conts.ids)
    for i, p in enumerate(prefixes):
        for k in range(K):
            seq = torch.cat([p, conts.ids[i, k]])[None]
            m = conts.mask[i, k].bool()
            with torch.no_grad():
                s_full = student(seq).logits[0, len(p) - 1:len(p) - 1 + H]
                t_full = teacher(seq).logits[0, len(p) - 1:len(p) - 1 + H]
            s_lp = fused_kernels.token_logprobs(s_full, conts.ids[i, k])
            t_lp = fused_kernels.token_logprobs(t_full, conts.ids[i, k])
            assert (conts.logprobs[i, k][m] - s_lp[m]).abs().max() < 1e-4
            assert (t_scores[i, k][m] - t_lp[m]).abs().max() < 1e-4
            assert (cached_logits[i, k][m] - s_full[m]).abs().max() < 1e-4
            kept_logits = conts.head.select((i, k)).logits()  # (H, V) from the kept hidden states
            assert (kept_logits[m] - s_full[m]).abs().max() < 1e-4


def test_continuation_logits_carry_gradient_through_the_window_only(saved):
    _, student, tok, _, _ = saved
    ro = _rollouts(student, tok, PROMPTS[:1])
    enc = sample.encode_prefixes(student, [ro.prefix(0, 3)], PAD_ID)
    ids = torch.randint(3, 25, (1, 2, 4))
    logits = teacher_mod.continuation_logits(student, enc, ids)
    assert logits.shape == (1, 2, 4, 25) and logits.requires_grad
    logits.sum().backward()
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0
    student.zero_grad(set_to_none=True)
    # the prefix cache can be reused after a backward: it holds constants
    again = teacher_mod.continuation_logits(student, enc, ids)
    assert torch.allclose(again, logits.detach(), atol=1e-6)


def test_encoded_prefixes_select_subset(saved):
    _, student, tok, _, _ = saved
    ro = _rollouts(student, tok, PROMPTS)
    prefixes = [ro.prefix(0, 2), ro.prefix(1, 1), ro.prefix(2, 3)]
    enc = sample.encode_prefixes(student, prefixes, PAD_ID)
    sub = enc.select(torch.tensor([2, 0]))
    ids = torch.randint(3, 25, (2, 1, 3))
    with torch.no_grad():
        a = teacher_mod.continuation_logits(student, sub, ids)
        b = teacher_mod.continuation_logits(student, sample.encode_prefixes(student, [prefixes[2], prefixes[0]], PAD_ID), ids)
    assert torch.allclose(a, b, atol=1e-5)


def test_prefixes_cut_from_rollout_caches_equal_fresh_encodings(saved):
    """The probe's states taken from the sampler's and the teacher-scoring pass's KV caches (no re-encoding)
    give exactly the continuation logits of states encoded from scratch; t = 0 (prompt only) included."""
    _, student, tok, teacher, _ = saved
    ids, _ = sample.encode_prompts(tok, PROMPTS)
    ro = sample.sample_rollouts(student, ids, sampling=sample.SamplingConfig(max_new_tokens=12), eos_ids=[EOS_ID],
                                pad_id=PAD_ID, generator=sample.make_generator(3, device="cpu"), keep_cache=True)
    t_cache = sample.new_cache(teacher)
    teacher_mod.score_rollouts(teacher, ro, "full", cache=t_cache)
    lens = ro.response_mask.sum(-1)
    rows = torch.tensor([0, 2, 1, 0])
    ts = torch.stack([torch.tensor(0), lens[2] - 1, lens[1] // 2, lens[0] - 1])  # incl. the prompt-only state
    cont = torch.randint(3, 25, (4, 2, 5))
    for model, cache in ((student, ro.cache), (teacher, t_cache)):
        cut = sample.prefixes_from_cache(cache, ro, rows, ts)
        fresh = sample.encode_prefixes(model, [ro.prefix(int(b), int(t)) for b, t in zip(rows, ts)], PAD_ID)
        assert torch.equal(cut.last_token, fresh.last_token) and torch.equal(cut.last_position, fresh.last_position)
        with torch.no_grad():
            a = teacher_mod.continuation_logits(model, cut, cont)
            b = teacher_mod.continuation_logits(model, fresh, cont)
        assert (a - b).abs().max() < 1e-5


def test_unencodable_prompt_is_a_clear_error():
    """The toy's character tokenizer cannot read AIME text: the error names the prompt instead of a Rust panic."""
    with pytest.raises(ValueError, match=r"prompt 1 \('Find the sum"):
        sample.encode_prompts(build_tokenizer(), ["1+2=?\n", "Find the sum of all integer bases"])


# ------------------------------------------------------------------------------- review fixes (regression tests)

def test_samplers_never_draw_a_padding_column(monkeypatch):
    """Review item 2 / trap 17: config.vocab_size pads past the tokenizer (Qwen3: 151936 columns, 151669 tokens).
    Here a 30-column head serves the 25-token toy tokenizer, and the 5 padding columns get LARGE logits: every
    sampler (rollouts, probe continuations, evaluation) must give them probability 0."""
    from eval_aime import evaluate

    import fused_kernels

    tok = build_tokenizer()
    model = _llama(0, vocab_size=30, logit_scale=1.0)
    # samplers draw from the fp32 logits of fused_kernels.Head (the head's matmul in fp32); boost its padding columns
    logits = fused_kernels.Head.logits
    monkeypatch.setattr(fused_kernels.Head, "logits", lambda self, rows=slice(None), width=None: torch.cat(
        [(z := logits(self, rows, width))[..., :25], z[..., 25:] + 50], -1))
    prompts = ["1+2=?\n", "30+4=?\n", "5-1=?\n"]
    unsafe = _rollouts(model, tok, prompts, max_new=8)  # precondition: without the size, padding ids ARE drawn
    assert int(unsafe.response_ids[unsafe.response_mask.bool()].max()) >= 25
    ro = _rollouts(model, tok, prompts, max_new=8, vocab_size=len(tok))
    assert int(ro.response_ids.max()) < 25
    enc = sample.encode_prefixes(model, [ro.prefix(0, 2), ro.prefix(1, 1)], PAD_ID)
    conts = sample.sample_continuations(model, enc, 3, 6, sampling=sample.SamplingConfig(vocab_size=len(tok)),
                                        eos_ids=[EOS_ID], pad_id=PAD_ID, generator=sample.make_generator(0, 5, device="cpu"))
    assert int(conts.ids.max()) < 25
    # evaluation takes the size from the tokenizer itself (its caller passes no vocab_size)
    drawn, real = [], sample.sample_rollouts
    monkeypatch.setattr(sample, "sample_rollouts", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    evaluate(model, tok, [{"id": "0", "problem": "1+2=?\n", "answer": "3"}], k=4,
             sampling=sample.SamplingConfig(max_new_tokens=8), instruction=False, chat_template=False,
             integer_range=None)
    assert len(drawn) == 1 and int(drawn[0].response_ids.max()) < 25
    # the probability of a padding column is exactly 0 in the sampling distribution, not just small
    z = sample.sampling_logits(torch.randn(2, 30), sample.SamplingConfig(vocab_size=25))
    assert z.shape == (2, 25)


def _thinking_tokenizer():
    """The toy tokenizer plus the markup of a thinking chat model: added <think> / </think> (not flagged special,
    as in Qwen3) and special <|im_start|> / <|im_end|>, with a Qwen-style chat template that opens a think block."""
    tok = build_tokenizer()
    tok.add_tokens(["<think>", "</think>"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|><think>{% endif %}")
    return tok


def test_candidates_never_land_on_special_or_added_tokens():
    """Review item 5 / trap 21: the highest-loss positions of a thinking model's rollout are often template
    markers (`</think>`, `<|im_end|>`); every special and added token is excluded, not only EOS."""
    tok = _thinking_tokenizer()
    ids = sample.special_token_ids(tok, [EOS_ID])
    for marker in ("<think>", "</think>", "<|im_start|>", "<|im_end|>", "<eos>", "<pad>", "<bos>"):
        assert tok.convert_tokens_to_ids(marker) in ids, marker
    assert tok.convert_tokens_to_ids("7") not in ids and tok.convert_tokens_to_ids(";") not in ids
    # the template really produces these markers, and candidates skip them even when their loss is the largest
    prompt, _ = sample.encode_prompts(tok, ["1+2=?"], chat_template=True)
    assert tok.convert_tokens_to_ids("<think>") in prompt[0]
    response = tok.convert_tokens_to_ids(["3", "</think>", "3", ";", "<|im_end|>", "<eos>"])
    response = torch.tensor([response])
    loss = torch.tensor([[0.5, 9.0, 0.4, 2.0, 8.0, 7.0]])  # markers carry the three largest losses
    special = torch.isin(response, torch.tensor(ids))
    cands = topd.select_candidates(loss, torch.ones_like(loss), num_candidates=3, min_gap=1, special=special)
    assert cands.tolist() == [[3, 0, 2]]


def test_stop_token_sets_must_match(saved):
    """Review item 6 / trap 18: a student that stops on a token the teacher reads as text is refused, naming both
    sets; allow_stop_mismatch turns the error into a warning."""
    _, student, tok, teacher, t_tok = saved
    with pytest.raises(ValueError) as err:
        teacher_mod.check_compatible(tok, t_tok, student_stop=[EOS_ID], teacher_stop=[EOS_ID, 14])
    assert "stop tokens differ" in str(err.value) and "'<eos>'" in str(err.value) and "14" in str(err.value)
    warnings = []
    assert teacher_mod.check_compatible(tok, t_tok, student_stop=[EOS_ID], teacher_stop=[EOS_ID, 14],
                                        allow_stop_mismatch=True, warn=warnings.append) == len(tok)
    assert len(warnings) == 1 and "stop tokens differ" in warnings[0]
    # the sets come from the tokenizer, the config and the generation config together
    student.generation_config.eos_token_id = [EOS_ID, 14]
    try:
        assert sample.eos_token_ids(student, tok) == [EOS_ID, 14]
    finally:
        student.generation_config.eos_token_id = EOS_ID


def test_truncation_watch_flags_ten_steps_above_half():
    """Review item 6: a truncated fraction above 50% for 10 steps in a row is flagged (stop-token mismatch)."""
    watch = sample.TruncationWatch()
    fracs = [0.9] * 9 + [0.2] + [0.6] * 10 + [0.7] * 10
    flagged = [i for i, f in enumerate(fracs) if watch.update(f)]
    assert flagged == [19, 29]


def test_teacher_self_check_passes_on_a_sound_teacher_and_catches_broken_ones(saved, capsys):
    """`teacher.py --self-check` (trap 20): a sound teacher agrees with itself (KL ~0) and with its KV-cached pass;
    a non-deterministic kernel and a broken cache are caught, each naming what differed."""
    root, student, tok, teacher, _ = saved
    ro = _rollouts(student, tok, ["12+34=?\n", "5+6=?\n"], max_new=10)
    ok = teacher_mod.self_check(teacher, ro)
    assert ok["repeat"] < 1e-6 and ok["cached"] < 1e-4 and ok["tokens"] == int(ro.response_mask.sum())
    # the command: both checkpoints checked before loading, fresh student rollouts, one line (train.py prints it too)
    cli = teacher_mod.main(["--self-check", "--student", str(root / "student"), "--teacher", str(root / "teacher")])
    assert cli["repeat"] < 1e-6 and "teacher self-check: KL between two scoring passes" in capsys.readouterr().out

    noisy = teacher.lm_head.register_forward_hook(lambda m, i, out: out + 0.5 * torch.randn_like(out))
    try:
        with pytest.raises(RuntimeError, match="two identical scoring passes"):
            teacher_mod.self_check(teacher, ro)
    finally:
        noisy.remove()
    # a cache bug: one-token (cached decoding) forwards see slightly different hidden states than full passes
    broken = teacher.model.norm.register_forward_hook(lambda m, i, out: out * 1.5 if out.shape[1] == 1 else out)
    try:
        with pytest.raises(RuntimeError, match="KV-cached"):
            teacher_mod.self_check(teacher, ro)
    finally:
        broken.remove()


def test_models_whose_cache_cannot_be_cut_are_refused_by_name():
    """Review item 8: the probe cuts prefixes out of KV caches. Linear-attention / hybrid layers keep a recurrent
    state that cannot be cut; they must be refused with the layer type named, not give wrong prefixes silently."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    cfg = Qwen3NextConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, linear_num_value_heads=2,
                          linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                          max_position_embeddings=64, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    hybrid = Qwen3NextForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="'linear_attention'"):
        sample.check_prefix_cache(hybrid)
    ro = sample.sample_rollouts(hybrid, [[1, 5, 6], [1, 7]], sampling=sample.SamplingConfig(max_new_tokens=4),
                                eos_ids=[EOS_ID], pad_id=PAD_ID, generator=sample.make_generator(0, device="cpu"), keep_cache=True)
    with pytest.raises(ValueError, match="LinearAttention"):
        sample.prefixes_from_cache(ro.cache, ro, torch.tensor([0]), torch.tensor([2]))
    sample.check_prefix_cache(_llama(0))  # attention-only models pass


# ------------------------------------------------------------------------------- the probe's memory bound

def test_state_chunks_bound_the_cached_tokens_as_laid_out():
    """A chunk's cache is n states x k copies, each padded to the chunk's WIDEST prefix and extended by the horizon:
    that product, not the sum of the prefix lengths, must stay within the budget (the sum undercounts whenever the
    widths differ: [5, 30] would count 2 x 35 = 70 but lay out 2 x 2 x 30 = 120)."""
    widths = torch.tensor([10, 20, 30, 5, 500, 1])
    chunks = topd.state_chunks(widths, 2, 0, 100)
    assert [c.tolist() for c in chunks] == [[0, 1], [2], [3], [4], [5]]  # 80, 60 ([2, 3] would lay out 120), 20, ...
    assert torch.cat(chunks).tolist() == list(range(6))
    for horizon in (0, 7):
        for c in topd.state_chunks(widths, 2, horizon, 100):
            assert len(c) * 2 * (int(widths[c].max()) + horizon) <= 100 or len(c) == 1
    assert [c.tolist() for c in topd.state_chunks(torch.tensor([5, 5, 5]), 2, 20, 100)] == [[0, 1], [2]]  # 2x2x25


def test_window_detector_samples_its_windows_within_the_probe_token_bound(saved, monkeypatch):
    """--detector window samples the guidance windows at the divergent states in chunks whose caches, as laid out
    (rows x padded width, continuations included), hold at most --probe-tokens tokens: the bound the probe obeys.
    (Before, every divergent state of a micro-batch was sampled in one batch whatever the bound.)"""
    _, student, tok, teacher, _ = saved
    ro = _rollouts(student, tok, PROMPTS, max_new=12)
    loss = torch.rand(ro.response_mask.shape, generator=torch.Generator().manual_seed(0)) * ro.response_mask
    cands = topd.select_candidates(loss, ro.response_mask, 3, 2)
    divergent = cands >= 0  # every candidate divergent: the most windows
    k, horizon = 2, 4
    budget = k * (ro.prompt_width + int(cands.max()) + horizon) * 2  # room for about two states per chunk
    laid_out = []
    real = sample.sample_continuations

    def spy(model, prefixes, k, horizon, **kw):
        laid_out.append(len(prefixes) * k * (prefixes.attention_mask.shape[1] + horizon))  # rows x (width + H)
        return real(model, prefixes, k, horizon, **kw)

    monkeypatch.setattr(sample, "sample_continuations", spy)
    windows = topd.teacher_windows(student, teacher, ro, cands, divergent, k=k, horizon=horizon, pad_id=PAD_ID,
                                   eos_ids=[EOS_ID], vocab_size=25, generator=sample.make_generator(1, device="cpu"),
                                   max_tokens=budget)
    n_states = int(divergent.sum())
    assert n_states > 3 and len(laid_out) == len(windows) > 1  # several chunks, one sampling call each
    assert max(laid_out) <= budget
    assert sum(len(w.student_prefixes) for w in windows) == n_states  # no state lost


def test_probe_in_chunks_keeps_every_state_and_only_divergent_windows(saved):
    """--probe-tokens small enough that every state is probed on its own: every candidate still gets its D, and the
    guidance windows hold exactly the divergent states (the teacher's hidden states, never logits)."""
    _, student, tok, teacher, _ = saved
    ro = _rollouts(student, tok, PROMPTS, max_new=12)
    loss = torch.rand(ro.response_mask.shape, generator=torch.Generator().manual_seed(0)) * ro.response_mask
    cands = topd.select_candidates(loss, ro.response_mask, 3, 2)
    n_states = int((cands >= 0).sum())
    probe = topd.probe_divergence(student, teacher, ro, cands, k=2, horizon=4, pad_id=PAD_ID, eos_ids=[EOS_ID],
                                  vocab_size=25, generator=sample.make_generator(0, device="cpu"), keep_teacher_windows=True,
                                  max_tokens=1)
    assert len(probe.chunks) == n_states and n_states > 2
    assert (probe.scores[cands >= 0] > 0).all() and (probe.scores[cands < 0] == 0).all()
    divergent = topd.divergent_mask(probe.scores, cands >= 0, alpha=0.0)
    windows = topd.teacher_windows(student, teacher, ro, cands, divergent, k=2, horizon=4, pad_id=PAD_ID,
                                   eos_ids=[EOS_ID], vocab_size=25, generator=sample.make_generator(1, device="cpu"), probe=probe)
    assert sum(len(w.student_prefixes) for w in windows) == int(divergent.sum()) > 0
    for w in windows:
        assert w.teacher_conts.head.hidden.shape[-1] == teacher.config.hidden_size  # hidden states, not logits
        kl = topd.guidance_kl(student, w, vocab_size=25)
        assert kl.shape == w.teacher_conts.ids.shape and torch.isfinite(kl).all()


# ------------------------------------------------------------------------------- --guide-horizon

def _detect(student, teacher, ro, token_loss, **knobs):
    """topd.detect in topd mode with 3 candidates at gap 2, K = 2, alpha 0 and no EOS, plus `knobs`."""
    cfg = topd.TOPDConfig(**{"mode": "topd", "num_candidates": 3, "min_gap": 2, "probe_samples": 2, "div_alpha": 0.0,
                             **knobs})
    return topd.detect(student, teacher, ro, token_loss, cfg, special_ids=[PAD_ID], pad_id=PAD_ID, eos_ids=[],
                       vocab_size=25, generator=sample.make_generator(0, device="cpu"))


@pytest.mark.parametrize("detector", ["window", "probe"])
def test_guide_horizon_sets_the_windows_length_and_nothing_else(saved, detector):
    """--guide-horizon (the H-ablation: look-ahead vs guidance length) changes the guidance windows' length and
    leaves the detector alone: the same D and the same divergent states as with one H for both. With the probe, the
    windows are then sampled afresh (the probe's H-token continuations are not windows of another length); with
    guide_horizon == horizon, or 0, they are the probe's own continuations, token for token."""
    _, student, tok, teacher, _ = saved
    ro = _rollouts(student, tok, PROMPTS, max_new=12)
    loss = torch.rand(ro.response_mask.shape, generator=torch.Generator().manual_seed(0)) * ro.response_mask
    token_loss = topd.TokenLoss(loss, loss)

    def run(guide_horizon):
        # no EOS: every continuation runs its full length, so the lengths below are the horizons themselves
        return _detect(student, teacher, ro, token_loss, detector=detector, horizon=6, guide_horizon=guide_horizon)

    same, explicit, short = run(0), run(6), run(3)
    assert int(same.divergent.sum()) > 0
    for d in (explicit, short):
        assert torch.equal(d.candidates, same.candidates) and torch.equal(d.scores, same.scores)
        assert torch.equal(d.divergent, same.divergent)
    if detector == "window":  # D looks 6 tokens ahead, not 3
        cands = same.candidates
        assert torch.equal(same.scores, topd.window_divergence(loss, ro.response_mask, cands, 6))
        assert not torch.equal(same.scores, topd.window_divergence(loss, ro.response_mask, cands, 3))

    def window_ids(d):
        return [w.teacher_conts.ids for w in d.windows]

    assert {ids.shape[-1] for ids in window_ids(same)} == {6} and {ids.shape[-1] for ids in window_ids(short)} == {3}
    assert sum(len(w.student_prefixes) for w in short.windows) == int(same.divergent.sum())
    assert all(torch.equal(a, b) for a, b in zip(window_ids(explicit), window_ids(same), strict=True))
    if detector == "probe":  # fresh windows, not the probe's continuations cut short
        assert not torch.equal(torch.cat(window_ids(short))[..., :3], torch.cat(window_ids(same))[..., :3])
    kl = topd.guidance_kl(student, short.windows[0], vocab_size=25)
    assert kl.shape[-1] == 3 and torch.isfinite(kl).all()


def test_the_random_control_guides_at_random_states_as_many_as_the_window_detector(saved):
    """--detector random: the same number of guidance windows per rollout as --detector window on the same
    rollouts, at other (random) states, with D reported where those states are."""
    _, student, tok, teacher, _ = saved
    ro = _rollouts(student, tok, PROMPTS, max_new=12)
    loss = torch.rand(ro.response_mask.shape, generator=torch.Generator().manual_seed(0)) * ro.response_mask
    token_loss = topd.TokenLoss(loss, loss)

    window, random = (_detect(student, teacher, ro, token_loss, detector=d, horizon=4) for d in ("window", "random"))
    assert torch.equal(random.divergent.sum(-1), window.divergent.sum(-1)) and int(window.divergent.sum()) > 0
    assert not torch.equal(random.candidates, window.candidates)
    assert torch.equal(random.scores, topd.window_divergence(loss, ro.response_mask, random.candidates, 4))
    assert sum(len(w.student_prefixes) for w in random.windows) == int(window.divergent.sum())


def test_an_lm_head_bias_is_refused_by_name():
    """Phi-2 and GPT-J have an lm_head.bias, which fused_kernels.Head (hidden @ weight.T) would silently drop from
    every sampled and scored log-prob. Such a model is refused, naming the model and the bias, for either role
    (train.py checks the student and the teacher at start), and any Head built from it refuses too."""
    model = sample._tiny_random_model()
    sample.check_head(model, "the student (x)")  # a plain head passes
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with pytest.raises(ValueError, match=r"the student \(x\).*lm_head\.bias"):
        sample.check_head(model, "the student (x)")
    with pytest.raises(ValueError, match="lm_head.bias"):
        sample.sample_rollouts(model, [[1, 5]], sampling=sample.SamplingConfig(max_new_tokens=2), eos_ids=[2],
                               pad_id=0, generator=sample.make_generator(0, device="cpu"))


def _tiny_moe(seed: int, dtype):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=8, num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0)
    model = Qwen3MoeForCausalLM(config).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits of several units, as a trained model's (random init: ~0.1)
    return model


def test_bf16_self_check_tolerance_holds_for_a_mixture_of_experts_teacher():
    """The self-check's bf16 tolerance (2e-2 nats) against a mixture-of-experts teacher, whose top-k routing can flip
    between the batched and the cached pass when bf16 rounding moves two experts' router scores past each other.
    Measured on tiny random Qwen3-MoE teachers (8 experts, 2 per token) in bf16 over 40 rollout tokens (CPU, torch
    2.13): the largest cached gap is 6.4e-4 nats over seeds 0-2, 30x inside the tolerance, and a cache bug that
    scales the cached hidden states by 1.5 gives 0.17-0.21, 10x above it: the check still catches one."""
    gaps = []
    for seed in range(3):
        teacher = _tiny_moe(seed, torch.bfloat16)
        ro = sample.sample_rollouts(teacher, [[1, 5, 6, 7], [1, 9]], sampling=sample.SamplingConfig(max_new_tokens=20),
                                    eos_ids=[-1], pad_id=0, generator=sample.make_generator(seed, device="cpu"))
        gaps.append(teacher_mod.self_check(teacher, ro))
    assert all(g["repeat"] == 0.0 and g["cached"] < g["tolerance"] / 2 and g["fused"] < g["tolerance"] / 2
               for g in gaps), gaps
    broken = teacher.model.norm.register_forward_hook(lambda m, i, out: out * 1.5 if out.shape[1] == 1 else out)
    try:
        with pytest.raises(RuntimeError, match="KV-cached"):
            teacher_mod.self_check(teacher, ro)
    finally:
        broken.remove()
