"""The fused head-and-loss kernels (fused_kernels.Head): equal to the unfused path in values and gradients, for every
logit transform a model family applies, and without any (positions, V) logits tensor in the training path."""

import pytest
import torch

import fused_kernels
import sample
import teacher as teacher_mod
from toy import EOS_ID, PAD_ID

V, D, M = 40, 12, 9


def _unfused(x, w, width, scale=1.0, softcap=None):
    """The reference: full fp32 logits from the same hidden states and weight, then the same transforms."""
    z = (x.float() @ w[:width].float().T) * scale
    return torch.tanh(z / softcap) * softcap if softcap is not None else z


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("scale, softcap", [(1.0, None), (0.5, None), (1.0, 4.0), (2.0, 3.0)])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_fused_kl_equals_unfused_in_value_and_gradients(scale, softcap, chunk):
    """fp32: values and gradients (hidden states and head weights of BOTH sides) to 1e-5; the weights have 3
    padding rows beyond the tokenizer's V (sliced away, no gradient)."""
    g = torch.Generator().manual_seed(0)
    xs, ws = torch.randn(M, D, generator=g), torch.randn(V + 3, D, generator=g)
    xt, wt = torch.randn(M, D, generator=g), torch.randn(V, D, generator=g)
    a = _leaves(xs, ws, xt, wt)
    fused = fused_kernels.kl_divergence(fused_kernels.Head(a[0], a[1], scale, softcap), fused_kernels.Head(a[2], a[3], scale, softcap),
                                  vocab_size=V, chunk_size=chunk)
    (fused * torch.linspace(0.5, 2, M)).sum().backward()
    b = _leaves(xs, ws, xt, wt)
    ref = fused_kernels.kl_divergence(_unfused(b[0], b[1], V, scale, softcap), _unfused(b[2], b[3], V, scale, softcap))
    (ref * torch.linspace(0.5, 2, M)).sum().backward()
    assert torch.allclose(fused, ref, atol=1e-5)
    for got, want in zip(a, b):
        assert torch.allclose(got.grad, want.grad, atol=1e-5)
    assert a[1].grad[V:].abs().max() == 0  # padding rows of the head get no gradient


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_fused_token_logprobs_and_entropy_equal_unfused(softcap):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(M, D, generator=g), torch.randn(V, D, generator=g)
    ids = torch.randint(0, V, (M,), generator=g)
    a, b = _leaves(x, w), _leaves(x, w)
    lp, ent = fused_kernels.token_logprobs(fused_kernels.Head(a[0], a[1], 1.0, softcap), ids, chunk_size=4, return_entropy=True)
    lp.sum().backward()
    ref, ref_ent = fused_kernels.token_logprobs(_unfused(b[0], b[1], V, 1.0, softcap), ids, return_entropy=True)
    ref.sum().backward()
    assert torch.allclose(lp, ref, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    assert torch.allclose(a[0].grad, b[0].grad, atol=1e-5) and torch.allclose(a[1].grad, b[1].grad, atol=1e-5)


def test_bf16_hidden_states_give_the_fp32_logits_of_those_hidden_states():
    """The logits of bf16 hidden states are computed in fp32 (not rounded to bf16 first): the fused KL equals the
    unfused KL of fp32 logits computed from the same bf16 values, and differs from bf16-rounded logits."""
    g = torch.Generator().manual_seed(2)
    xs, xt = (torch.randn(M, D, generator=g) * 3).bfloat16(), (torch.randn(M, D, generator=g) * 3).bfloat16()
    ws, wt = torch.randn(V, D, generator=g), torch.randn(V, D, generator=g)
    fused = fused_kernels.kl_divergence(fused_kernels.Head(xs, ws), fused_kernels.Head(xt, wt))
    ref = fused_kernels.kl_divergence(_unfused(xs, ws, V), _unfused(xt, wt, V))
    rounded = fused_kernels.kl_divergence(_unfused(xs, ws, V).bfloat16(), _unfused(xt, wt, V).bfloat16())
    assert fused.dtype == torch.float32
    assert torch.allclose(fused, ref, atol=1e-5)
    assert (rounded - ref).abs().max() > 1e-3  # what the fp32 rule avoids: the test can tell the two apart


def test_a_head_and_logits_cannot_be_mixed():
    with pytest.raises(TypeError, match="two Heads"):
        fused_kernels.kl_divergence(fused_kernels.Head(torch.zeros(2, D), torch.zeros(V, D)), torch.zeros(2, V))


def _tiny(family, **extra):
    """A tiny model of a family whose logits go through a transform after the head."""
    import transformers

    common = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
                             "cohere": ("CohereConfig", "CohereForCausalLM"),
                             "granite": ("GraniteConfig", "GraniteForCausalLM")}[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**common, **extra})
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("family, extra", [
    ("llama", {"tie_word_embeddings": True}),                  # tied embeddings: the head IS the embedding matrix
    ("llama", {"tie_word_embeddings": False}),
    ("gemma2", {"final_logit_softcapping": 3.0, "head_dim": 8}),  # a final logit soft-cap
    ("cohere", {"logit_scale": 0.25}),                          # logits multiplied by a scale
    ("granite", {"logits_scaling": 4.0}),                       # logits divided by a scale
])
def test_response_head_equals_the_models_own_logits_and_gradients(family, extra):
    """teacher.response_head (the training path) against the model's own logits, for families whose head output is
    transformed: the same log-probs, and the same gradients for every parameter (embeddings included)."""
    model = _tiny(family, **extra)
    ro = sample.sample_rollouts(model, [[1, 5, 6, 7], [1, 9]], sampling=sample.SamplingConfig(max_new_tokens=6),
                                eos_ids=[EOS_ID], pad_id=PAD_ID, generator=sample.make_generator(0, device="cpu"))
    ids = ro.response_ids
    weights = torch.linspace(0.5, 1.5, ids.numel()).view(ids.shape) * ro.response_mask

    def grads(use_head):
        model.zero_grad()
        source = teacher_mod.response_head(model, ro) if use_head else teacher_mod.response_logits(model, ro)
        lp = fused_kernels.token_logprobs(source, ids, chunk_size=3)
        (lp * weights).sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lp_fused, g_fused = grads(True)
    lp_plain, g_plain = grads(False)
    assert torch.allclose(lp_fused, lp_plain, atol=1e-5)
    assert g_fused.keys() == g_plain.keys()
    for name in g_plain:
        assert torch.allclose(g_fused[name], g_plain[name], atol=1e-5), name
    # the swap is undone: the model computes real logits again, with its transform
    out = model(input_ids=ro.ids).logits
    assert out.shape[-1] == model.config.vocab_size
    assert teacher_mod.self_check(model, ro)["fused"] < 1e-6


def test_self_check_catches_a_logit_transform_it_does_not_know():
    """A family that post-processes its logits in a way sample.head_of does not know would make every fused loss
    silently wrong: the start-up self-check compares the fused logits with the model's own and fails."""
    model = _tiny("llama")
    ro = sample.sample_rollouts(model, [[1, 5, 6, 7]], sampling=sample.SamplingConfig(max_new_tokens=6),
                                eos_ids=[EOS_ID], pad_id=PAD_ID, generator=sample.make_generator(0, device="cpu"))
    model.lm_head.register_forward_hook(lambda m, i, out: out * 3.0)  # an unknown scale after the head
    with pytest.raises(RuntimeError, match="fused"):
        teacher_mod.self_check(model, ro)


# ------------------------------------------------------------------------------- precision and memory rules

@pytest.mark.parametrize("fused", [False, True])
def test_kernels_ignore_an_enclosing_autocast(fused):
    """Under the student's bf16 autocast the kernels still compute in fp32: torch.linalg.vecdot and matmuls are on
    autocast's low-precision list (CPU and CUDA alike), so without the kernels switching it off the KL would be a
    difference of two bf16 sums (~1e-2 off here) and every gradient read from it as wrong."""
    g = torch.Generator().manual_seed(3)
    xs, ws, xt, wt = (torch.randn(n, D, generator=g) for n in (M, V, M, V))
    ids = torch.randint(0, V, (M,), generator=g)
    results = []
    for autocast in (False, True):
        a = _leaves(xs, ws, xt, wt)
        sides = ((fused_kernels.Head(a[0], a[1]), fused_kernels.Head(a[2], a[3])) if fused
                 else (a[0] @ a[1].T, a[2] @ a[3].T))  # logits built outside autocast: only the kernel is tested
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            kl = fused_kernels.kl_divergence(*sides, chunk_size=4)
            logp = fused_kernels.token_logprobs(sides[0], ids, chunk_size=4)
        (kl.sum() + logp.sum()).backward()  # outside autocast, as torch recommends (train.py does the same)
        results.append((kl.detach(), logp.detach(), [t.grad for t in a]))
    (kl0, lp0, g0), (kl1, lp1, g1) = results
    assert kl0.dtype == kl1.dtype == torch.float32
    assert torch.allclose(kl1, kl0, atol=1e-5, rtol=1e-5) and torch.allclose(lp1, lp0, atol=1e-5, rtol=1e-5)
    for got, want in zip(g1, g0):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def _fp32_storages_at_least(numel: int):
    """A dispatch mode that records the distinct fp32 storages of at least `numel` elements created by any op (views
    share their base's storage and count once)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= numel:
                    self.storages.add(t.untyped_storage().data_ptr())
            return out

    return Record()


def test_bf16_head_never_copies_the_whole_weight_to_fp32(monkeypatch):
    """A bf16 head of (V, d): forward and backward upcast it VOCAB_BLOCK rows at a time, never whole. The one
    (V, d) fp32 tensor allowed is the weight's own gradient accumulator. (Before, each chunk of positions made a full
    fp32 copy in forward and in backward: 1.6 GB per chunk for Qwen3-4B's head.) Values and gradients still equal
    the fp32 reference computed from the same bf16 numbers."""
    monkeypatch.setattr(fused_kernels, "VOCAB_BLOCK", 7)  # several blocks over the 40 columns
    g = torch.Generator().manual_seed(4)
    x = torch.randn(M, D, generator=g).bfloat16()
    w = torch.randn(V, D, generator=g).bfloat16()
    xt, wt = torch.randn(M, D, generator=g).bfloat16(), torch.randn(V, D, generator=g).bfloat16()
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with _fp32_storages_at_least(V * D) as record:
        kl = fused_kernels.kl_divergence(fused_kernels.Head(xs, ws), fused_kernels.Head(xt, wt), chunk_size=2)
        (kl * torch.linspace(0.5, 2, M)).sum().backward()
    assert len(record.storages) == 1  # the fp32 accumulator of the weight's gradient, nothing else
    a = _leaves(x.float(), w.float())
    ref = fused_kernels.kl_divergence(_unfused(a[0], a[1], V), _unfused(xt, wt, V))
    (ref * torch.linspace(0.5, 2, M)).sum().backward()
    assert torch.allclose(kl, ref, atol=1e-5)
    assert torch.allclose(xs.grad.float(), a[0].grad, atol=1e-2, rtol=1e-2)  # bf16 outputs: their own rounding
    assert torch.allclose(ws.grad.float(), a[1].grad, atol=1e-2, rtol=1e-2)
