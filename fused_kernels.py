"""
fused_kernels.py -- memory-bounded fp32 log-softmax kernels: token log-probs and the exact full-vocabulary KL.

Every loss of on-policy distillation is built from two quantities over the vocabulary: the log-probability of one
token, and the KL between two distributions. Done naively (`log_softmax(logits.float())`) both create fp32 copies
of a (positions, V) tensor and keep them for backward: at Qwen's 151,936-column vocabulary and 8k-token rollouts
that is 5 GB per copy. The two custom autograd functions here process positions in chunks, upcast only the current
chunk to fp32 (spec "Notation": every log-prob from fp32 logits, whatever the model's dtype) and recompute what
backward needs from a few numbers saved per position, so the extra memory is O(chunk x V).

This is the ground floor of the repository: sample.py, teacher.py and topd.py import it, it imports nothing of
theirs. It knows nothing about TOPD; topd.py is where the method lives.

    python -c "import torch, kernels; print(fused_kernels.kl_divergence(torch.zeros(2, 5), torch.zeros(2, 5)))"
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

# Default number of positions processed at once by the chunked log-softmax kernels below. Peak extra memory is
# about 4 fp32 tensors of (CHUNK, V): 256 x 152k x 4 B x 4 = 0.6 GB for Qwen's vocabulary (1024: 2.5 GB), whatever
# the number of positions. Every caller that does not pass its own chunk_size gets this one (train.py --chunk-size).
DEFAULT_CHUNK = 256

# Log-probabilities are clamped from below before they multiply anything. A teacher that assigns exactly zero
# probability to a token the student likes (a -inf logit, e.g. a masked special token) would otherwise produce
# inf * 0 = NaN in the loss and the gradient (OPD trap 7). -1e4 nats is "impossible" for every practical purpose.
LOGP_FLOOR = -1e4

# Rows of a half-precision head weight upcast to fp32 at a time, where no fp32-output matmul of the half-precision
# operands exists (CPU): 16384 x d x 4 B = 168 MB at Qwen3-4B's d = 2560, instead of a 1.6 GB fp32 copy of the whole
# (151936, 2560) weight for every chunk of positions.
VOCAB_BLOCK = 16384


def _autocast_off(method):
    """Runs an autograd Function's forward or backward with autocast switched off on the device of its tensors.

    Under the student's bf16 autocast (train.py on CUDA) autocast would re-cast ops inside the kernels:
    torch.linalg.vecdot and every matmul are on its low-precision list (on CPU as on CUDA), so sum_v p log p would
    become a bf16 dot product and the KL a difference of two bf16 sums, and a backward that reads the saved KL would
    carry that error into the gradient. These kernels decide their own precision (fp32 wherever the method says)."""
    @functools.wraps(method)
    def wrapper(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return method(ctx, *args)
    return wrapper


# ----------------------------------------------------------------------------------------------------------------
# Chunked fp32 log-softmax kernels (spec "Notation": all log-probs from fp32 logits, whatever the model dtype)
# ----------------------------------------------------------------------------------------------------------------

def _shared_vocab(*logits: torch.Tensor, vocab_size: int | None) -> int:
    """Number of vocabulary columns the tensors really share.

    Models of one family often pad `config.vocab_size` past the tokenizer (Qwen2.5: 151936 vs 152064 columns),
    so the two logit tensors can differ in width. The extra columns are never-sampled padding rows; we slice every
    tensor to `vocab_size` (the tokenizer's size) when given, else to the narrowest tensor (OPD trap 10).
    """
    width = min(x.shape[-1] for x in logits)
    if vocab_size is not None:
        if vocab_size > width:
            raise ValueError(f"vocab_size={vocab_size} exceeds the logits' last dimension ({width})")
        width = vocab_size
    return width


def _position_chunks(num_positions: int, chunk_size: int):
    """Yield slices covering range(num_positions) in pieces of at most chunk_size."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, num_positions, chunk_size):
        yield slice(start, min(start + chunk_size, num_positions))


class _ChunkedKL(torch.autograd.Function):
    """KL(p || q) per position, p = softmax(a), q = softmax(b), exact over the full vocabulary.

    Forward and backward both loop over chunks of positions and upcast only the current chunk to fp32, so peak
    extra memory is O(chunk x V) instead of O(positions x V). The backward recomputes the softmaxes from the saved
    log-normalisers instead of saving them (the trick of fused cross-entropy kernels): autograd through a plain
    chunked loop would keep every chunk's fp32 log-softmax alive until backward, i.e. O(positions x V) again.
    Every full-width operation below is one memory pass; the code counts them because on both CPU and GPU this
    kernel is bandwidth-bound, and it has to be as fast as the naive version it replaces (bench.py measures it).

    Gradients, for one position with kl = sum_v p_v (log p_v - log q_v):
        d kl / d a_v = p_v * (log p_v - log q_v - kl)          (through p; the student in reverse KL)
        d kl / d b_v = q_v - p_v                                (through q)
    and log p_v - log q_v = (a_v - b_v) - (lse_a - lse_b), so the backward needs only a - b and per-row scalars.

    Rows with -inf logits (a masked token) would give 0 * inf = NaN; they are detected from a non-finite result and
    recomputed with log-probs clamped at LOGP_FLOOR (_kl_rows_clamped), which costs nothing when there are none.
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, a, b, chunk_size):
        # a, b: (M, V) logits of any float dtype, already sliced to the shared vocabulary
        M = a.shape[0]
        kl = torch.empty(M, dtype=torch.float32, device=a.device)  # (M,)
        entropy = torch.empty_like(kl)  # (M,) entropy of p: a free by-product, logged as a diagnostic
        lse_a, lse_b = torch.empty_like(kl), torch.empty_like(kl)  # (M,) log-normalisers, kept for backward
        clamped = torch.zeros(M, dtype=torch.bool, device=a.device)  # rows that needed the -inf-safe path
        for rows in _position_chunks(M, chunk_size):
            # (c, V) fp32 log-probs; dtype= upcasts inside the fused kernel, no separate conversion pass
            logp = torch.log_softmax(a[rows], -1, dtype=torch.float32)
            logq = torch.log_softmax(b[rows], -1, dtype=torch.float32)
            lse_a[rows] = _log_normaliser(a[rows], logp)
            lse_b[rows] = _log_normaliser(b[rows], logq)
            p = logp.exp()
            p_logp = torch.linalg.vecdot(p, logp)  # sum_v p log p, multiply and sum in one pass
            kl[rows] = p_logp - torch.linalg.vecdot(p, logq)
            entropy[rows] = -p_logp
            bad = ~torch.isfinite(kl[rows])  # (c,) only rows with -inf logits
            if bad.any():
                idx = bad.nonzero().squeeze(-1)
                kl[rows][idx], entropy[rows][idx] = _kl_rows_clamped(a[rows][idx].float(), b[rows][idx].float())
                clamped[rows] |= bad
        ctx.save_for_backward(a, b, kl, lse_a, lse_b, clamped)  # the inputs (no copy) + 4 numbers per position
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy)
        return kl, entropy

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_kl, _grad_entropy):
        a, b, kl, lse_a, lse_b, clamped = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_a = torch.empty_like(a) if need_a else None  # (M, V) in the logits' own dtype
        grad_b = torch.empty_like(b) if need_b else None
        for rows in _position_chunks(a.shape[0], ctx.chunk_size):
            g = grad_kl[rows].float().unsqueeze(-1)  # (c, 1) upstream gradient per position
            if clamped[rows].any():  # the rare -inf path: clamped log-probs, as in the forward
                logp = (a[rows].float() - lse_a[rows, None]).clamp_min_(LOGP_FLOOR)
                logq = (b[rows].float() - lse_b[rows, None]).clamp_min_(LOGP_FLOOR)
                p = logp.exp()
                if need_a:
                    grad_a[rows] = (g * p * (logp - logq - kl[rows, None])).to(a.dtype)
                if need_b:
                    grad_b[rows] = (g * (logq.exp() - p)).to(b.dtype)
                continue
            # mixed-dtype arithmetic (bf16 - fp32) computes in fp32 in one pass, without a conversion pass first
            p = (a[rows] - lse_a[rows, None]).exp_()  # (c, V) fp32 softmax, 2 passes
            if need_a:
                d = a[rows].float() - b[rows]  # log p - log q up to a per-row constant
                d.sub_((lse_a[rows] - lse_b[rows] + kl[rows]).unsqueeze(-1))  # in place
                d.mul_(p)
                torch.mul(d, g, out=grad_a[rows])  # the last multiply writes straight into the gradient's dtype
            if need_b:
                q = (b[rows] - lse_b[rows, None]).exp_()
                torch.mul(q.sub_(p), g, out=grad_b[rows])
        return grad_a, grad_b, None


def _log_normaliser(z: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """log sum_v exp(z_v) per row, read off a row's finite maximum: lse = z_max - log p(z_max).

    The maximum of a row is finite unless every logit is -inf, so this stays correct when some columns are -inf
    (a masked token). Reading it off column 0 instead gives -inf - (-inf) = NaN whenever column 0 is masked: a
    finite loss with a NaN gradient. One read pass (the max), no second exp pass as logsumexp would need.
    z (c, V) any float dtype, logp (c, V) fp32 = log_softmax(z). Returns (c,) fp32.
    """
    z_max, where = z.max(dim=-1, keepdim=True)  # (c, 1)
    return (z_max.float() - logp.gather(-1, where)).squeeze(-1)


def _kl_rows_clamped(za: torch.Tensor, zb: torch.Tensor):
    """KL and entropy of a few rows with -inf logits: log-probs clamped at LOGP_FLOOR so 0 * inf never happens."""
    logp = torch.log_softmax(za, -1).clamp_min(LOGP_FLOOR)
    logq = torch.log_softmax(zb, -1).clamp_min(LOGP_FLOOR)
    p = logp.exp()
    return (p * (logp - logq)).sum(-1), -(p * logp).sum(-1)


class _ChunkedTokenLogprob(torch.autograd.Function):
    """log softmax(logits)[id] per position, chunked the same way: gather the logit, subtract the logsumexp.

    Backward: d logp(y) / d z_v = 1[v == y] - softmax(z)_v, recomputed chunk by chunk.
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, logits, ids, chunk_size, with_entropy):
        # logits: (M, V), ids: (M,) long
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # (M,)
        entropy = torch.full_like(out, math.nan)  # (M,) filled only when asked for (two extra passes per chunk)
        for rows in _position_chunks(logits.shape[0], chunk_size):
            z = logits[rows].float()  # (c, V)
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            out[rows] = z.gather(-1, ids[rows, None]).squeeze(-1) - lse
            if with_entropy:  # H = lse - sum_v softmax(z)_v z_v  (a masked -inf column contributes 0)
                p = torch.softmax(z, dim=-1)
                entropy[rows] = lse - torch.linalg.vecdot(p, z.clamp_min(LOGP_FLOOR))
        ctx.save_for_backward(logits, ids)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_out, _grad_entropy):
        logits, ids = ctx.saved_tensors
        grad = torch.empty_like(logits)  # (M, V)
        for rows in _position_chunks(logits.shape[0], ctx.chunk_size):
            g = grad_out[rows].float().unsqueeze(-1)  # (c, 1)
            minus_softmax = -torch.softmax(logits[rows].float(), dim=-1)  # (c, V)
            minus_softmax.scatter_add_(-1, ids[rows, None], torch.ones_like(g))  # + one-hot(y)
            grad[rows] = (g * minus_softmax).to(logits.dtype)
        return grad, None, None, None


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, *, vocab_size: int | None = None,
                   chunk_size: int = DEFAULT_CHUNK, return_entropy: bool = False):
    """log pi(ids[..., t] | s_t) in fp32, differentiable, O(chunk x V) extra memory (and, with return_entropy,
    the distribution's entropy per position, detached: the `entropy` diagnostic of the `sampled` estimator).

    logits: (..., V) logits, or a Head (the fused path: no (..., V) tensor is ever built), ALREADY ALIGNED with ids:
    logits[..., t, :] is the distribution that produced ids[..., t].
    For a causal LM over a sequence x this means logits[:, :-1] against x[:, 1:] (OPD trap 1); the callers in
    sample.py / teacher.py do that shift once, with a worked example, so nothing here shifts anything.
    Returns (...) fp32.

    Example: logits = [[0, 0, log 2]] (softmax = [.25, .25, .5]), ids = [2]  ->  log 0.5 = -0.693.
    """
    width = _shared_vocab(logits, vocab_size=vocab_size)
    if ids.numel() and int(ids.max()) >= width:
        raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of size {width}")
    if isinstance(logits, Head):  # fused: the logits exist one chunk at a time (see Head)
        head = logits.flat()
        out, entropy = _HeadTokenLogprob.apply(head.hidden, head.weight, ids.reshape(-1), (head.scale, head.softcap),
                                               width, chunk_size, return_entropy)
    else:
        flat = logits[..., :width].reshape(-1, width)  # (M, V); a view when no slicing is needed
        out, entropy = _ChunkedTokenLogprob.apply(flat, ids.reshape(-1), chunk_size, return_entropy)  # (M,), (M,)
    return (out.view(ids.shape), entropy.view(ids.shape)) if return_entropy else out.view(ids.shape)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, *, vocab_size: int | None = None,
                  chunk_size: int = DEFAULT_CHUNK, return_entropy: bool = False):
    """Exact KL(softmax(p_logits) || softmax(q_logits)) per position, fp32, gradients to both inputs.

    p_logits, q_logits: (..., V) and (..., V'), the same leading shape; the vocab is sliced to the shared size.
    Either both logits tensors or both Heads (the fused path, with gradients to hidden states and head weights).
    Returns (...) fp32 (and the entropy of p, detached, when return_entropy).
    """
    if p_logits.shape[:-1] != q_logits.shape[:-1]:
        raise ValueError(f"logit shapes differ before the vocab dim: {tuple(p_logits.shape)} vs "
                         f"{tuple(q_logits.shape)}")
    width = _shared_vocab(p_logits, q_logits, vocab_size=vocab_size)
    lead = p_logits.shape[:-1]
    if isinstance(p_logits, Head) != isinstance(q_logits, Head):
        raise TypeError("kl_divergence takes two logits tensors or two Heads, not one of each")
    if isinstance(p_logits, Head):
        a, b = p_logits.flat(), q_logits.flat()
        kl, entropy = _HeadKL.apply(a.hidden, a.weight, b.hidden, b.weight, (a.scale, a.softcap),
                                    (b.scale, b.softcap), width, chunk_size)
        return (kl.view(lead), entropy.view(lead)) if return_entropy else kl.view(lead)
    a = p_logits[..., :width].reshape(-1, width)  # (M, V)
    b = q_logits[..., :width].reshape(-1, width)
    kl, entropy = _ChunkedKL.apply(a, b, chunk_size)
    return (kl.view(lead), entropy.view(lead)) if return_entropy else kl.view(lead)


# ----------------------------------------------------------------------------------------------------------------
# Fused head-and-loss: the same two quantities from final hidden states, without any (positions, V) logits tensor
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Head:
    """A model's next-token logits, never materialised: logits = softcap(scale * hidden @ weight[:V].T).

    hidden   (..., d) final hidden states (after the model's last norm), in the model's dtype, with grad or not
    weight   (V_model, d) the LM head's weight (the embedding matrix when the embeddings are tied)
    scale    multiplies the logits (Cohere's logit_scale, Granite's 1 / logits_scaling; 1 for most models)
    softcap  cap * tanh(z / cap) applied last (Gemma 2's final_logit_softcapping), or None

    The kernels below take a Head wherever they take logits: they compute the logits of `chunk` positions at a time
    in fp32, use them, and drop them; backward recomputes them and returns gradients for `hidden` and `weight`. This
    is the technique of fused linear cross-entropy kernels, in plain torch. At Qwen's 151,936-column vocabulary an
    8k-token rollout's logits are 2.5 GB in bf16 (plus as much for their gradient); its hidden states are 40 MB.
    """
    hidden: torch.Tensor
    weight: torch.Tensor
    scale: float = 1.0
    softcap: float | None = None

    @property
    def shape(self):  # the leading shape and the model's vocabulary width, like a logits tensor's
        return torch.Size(self.hidden.shape[:-1] + self.weight.shape[:1])

    def flat(self) -> "Head":
        return Head(self.hidden.reshape(-1, self.hidden.shape[-1]), self.weight, self.scale, self.softcap)

    def select(self, index) -> "Head":
        return Head(self.hidden[index], self.weight, self.scale, self.softcap)

    def logits(self, rows=slice(None), width: int | None = None) -> torch.Tensor:
        """fp32 logits of hidden[rows] over the first `width` columns, (c, width); the pre-cap values are not kept."""
        return _head_logits(self.hidden[rows], self.weight, width or self.weight.shape[0], self.scale,
                            self.softcap)[0]


def _matmul_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (c, d) @ w (V, d).T in fp32, whatever the operands' dtypes: bf16 logits at |z| of 16-32 are off by 0.125,
    the size of error the fp32 rule exists to avoid. Never builds an fp32 copy of the whole weight: on CUDA a
    half-precision matmul writes fp32 directly (exact products, fp32 accumulation); elsewhere the weight is upcast
    VOCAB_BLOCK rows at a time."""
    with torch.autocast(x.device.type, enabled=False):  # called under the student's bf16 autocast: stay in fp32
        if x.dtype == w.dtype == torch.float32:
            return x @ w.T
        if x.is_cuda and x.dtype == w.dtype:
            try:
                return torch.mm(x, w.T, out_dtype=torch.float32)
            except (RuntimeError, TypeError):
                pass
        x32 = x.float()
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)  # (c, V)
        for block in _position_chunks(w.shape[0], VOCAB_BLOCK):  # (c, block) of logits from (block, d) of weight
            out[:, block] = x32 @ w[block].float().T
        return out


def _matmul_fp32_into(dz: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out (c, d) = dz (c, V) fp32 @ w (V, d), in fp32, never building an fp32 copy of the whole weight.

    The backward counterpart of _matmul_fp32 (the gradient reaching the hidden states). dz is genuinely fp32, so on
    CUDA it is split into two bf16 halves, dz = hi + lo with |lo| <= 2^-8 |dz|, and each half meets the bf16 weight
    in an fp32-output matmul: the result carries dz's precision to ~2^-16 relative, with no weight copy at all.
    Elsewhere the weight is upcast VOCAB_BLOCK rows at a time and the blocks' products summed."""
    if w.dtype == torch.float32:
        torch.mm(dz, w, out=out)
        return
    if dz.is_cuda:
        try:
            hi = dz.to(w.dtype)
            lo = (dz - hi.float()).to(w.dtype)
            out.copy_(torch.mm(hi, w, out_dtype=torch.float32).add_(torch.mm(lo, w, out_dtype=torch.float32)))
            return
        except (RuntimeError, TypeError):
            pass
    out.zero_()
    for block in _position_chunks(w.shape[0], VOCAB_BLOCK):  # sum over the vocabulary, one block of rows at a time
        out.addmm_(dz[:, block], w[block].float())


def _head_logits(x, w, width, scale, softcap):
    """(fp32 logits (c, width), the pre-cap logits or None): scale, then the soft-cap."""
    z = _matmul_fp32(x, w[:width])
    if scale != 1.0:
        z = z * scale
    if softcap is None:
        return z, None
    return torch.tanh(z / softcap) * softcap, z


def _log_softmax_(z: torch.Tensor) -> torch.Tensor:
    """log_softmax of fp32 logits (c, V) over the last dim, IN PLACE (z is consumed): no second (c, V) tensor."""
    return z.sub_(torch.logsumexp(z, -1, keepdim=True))


def _head_backward(dz, pre, x, w, width, scale, softcap, need_x, need_w, grad_x, grad_w, rows):
    """Chain d loss / d logits (c, width) fp32 through soft-cap and scale into hidden[rows] and weight[:width]."""
    if softcap is not None:
        dz = dz * (1 - torch.tanh(pre / softcap) ** 2)  # d/dz cap * tanh(z / cap) = 1 - tanh^2
    if scale != 1.0:
        dz = dz * scale
    if need_x:
        _matmul_fp32_into(dz, w[:width], grad_x[rows])  # (c, d) fp32, written in place
    if need_w:  # (width, d), accumulated in fp32 over chunks IN PLACE: `grad_w += dz.T @ x` would allocate a
        grad_w[:width].addmm_(dz.T, x.to(dz.dtype))  # second (width, d) fp32 tensor per chunk (1.6 GB for Qwen3-4B)


class _HeadKL(torch.autograd.Function):
    """KL(softmax(a) || softmax(b)) per position for two Heads; the logits exist one chunk of positions at a time.

    Same gradients as _ChunkedKL (d kl / d z_a = p (log p - log q - kl), d kl / d z_b = q - p), chained into each
    side's hidden states and weight. Saved for backward: the inputs themselves and one number per position."""

    @staticmethod
    @_autocast_off
    def forward(ctx, xa, wa, xb, wb, spec_a, spec_b, width, chunk_size):
        kl = torch.empty(xa.shape[0], dtype=torch.float32, device=xa.device)
        entropy = torch.empty_like(kl)
        for rows in _position_chunks(xa.shape[0], chunk_size):  # at most 3 (c, V) fp32 tensors live at once
            logp = _log_softmax_(_head_logits(xa[rows], wa, width, *spec_a)[0])  # (c, V) fp32, in place
            logq = _log_softmax_(_head_logits(xb[rows], wb, width, *spec_b)[0])
            p = logp.exp()
            p_logp = torch.linalg.vecdot(p, logp)
            kl[rows], entropy[rows] = p_logp - torch.linalg.vecdot(p, logq), -p_logp
        ctx.save_for_backward(xa, wa, xb, wb, kl)
        ctx.specs, ctx.width, ctx.chunk_size = (spec_a, spec_b), width, chunk_size
        ctx.mark_non_differentiable(entropy)
        return kl, entropy

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_kl, _grad_entropy):
        xa, wa, xb, wb, kl = ctx.saved_tensors
        (spec_a, spec_b), width = ctx.specs, ctx.width
        need = ctx.needs_input_grad[:4]
        grads = [torch.zeros_like(t, dtype=torch.float32) if n else None for t, n in zip((xa, wa, xb, wb), need)]
        for rows in _position_chunks(xa.shape[0], ctx.chunk_size):  # 4 (c, V) fp32 tensors live at most
            g = grad_kl[rows].float().unsqueeze(-1)  # (c, 1)
            za, pre_a = _head_logits(xa[rows], wa, width, *spec_a)
            zb, pre_b = _head_logits(xb[rows], wb, width, *spec_b)
            logp, logq = _log_softmax_(za), _log_softmax_(zb)  # in place: za and zb are gone
            p = logp.exp()
            if need[0] or need[1]:  # d kl / d z_a = g p (log p - log q - kl), built in place in logp's buffer
                dz = logp.sub_(logq).sub_(kl[rows, None]).mul_(p).mul_(g)
                _head_backward(dz, pre_a, xa[rows], wa, width, *spec_a, need[0], need[1], grads[0], grads[1], rows)
                del dz, logp
            if need[2] or need[3]:  # d kl / d z_b = g (q - p), in logq's buffer
                dz = logq.exp_().sub_(p).mul_(g)
                _head_backward(dz, pre_b, xb[rows], wb, width, *spec_b, need[2], need[3], grads[2], grads[3], rows)
        out = [None if gr is None else gr.to(t.dtype) for gr, t in zip(grads, (xa, wa, xb, wb))]
        return (*out, None, None, None, None)


class _HeadTokenLogprob(torch.autograd.Function):
    """log softmax(head logits)[id] per position (and the entropy, detached), chunked like _HeadKL.
    Backward: d logp(y) / d z_v = 1[v == y] - softmax(z)_v, chained into hidden and weight."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, w, ids, spec, width, chunk_size, with_entropy):
        out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        entropy = torch.full_like(out, math.nan)
        for rows in _position_chunks(x.shape[0], chunk_size):
            logp = _log_softmax_(_head_logits(x[rows], w, width, *spec)[0])  # (c, V) fp32
            out[rows] = logp.gather(-1, ids[rows, None]).squeeze(-1)
            if with_entropy:
                entropy[rows] = -torch.linalg.vecdot(logp.exp(), logp)
        ctx.save_for_backward(x, w, ids)
        ctx.spec, ctx.width, ctx.chunk_size = spec, width, chunk_size
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_out, _grad_entropy):
        x, w, ids = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = torch.zeros_like(x, dtype=torch.float32) if need_x else None
        grad_w = torch.zeros_like(w, dtype=torch.float32) if need_w else None
        for rows in _position_chunks(x.shape[0], ctx.chunk_size):
            z, pre = _head_logits(x[rows], w, ctx.width, *ctx.spec)
            dz = -torch.softmax(z, -1)  # (c, V)
            dz.scatter_add_(-1, ids[rows, None], torch.ones_like(dz[:, :1]))  # + one-hot(y)
            dz.mul_(grad_out[rows].float().unsqueeze(-1))
            _head_backward(dz, pre, x[rows], w, ctx.width, *ctx.spec, need_x, need_w, grad_x, grad_w, rows)
        return (None if grad_x is None else grad_x.to(x.dtype), None if grad_w is None else grad_w.to(w.dtype),
                None, None, None, None, None)
