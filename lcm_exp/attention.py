"""`trainer.attention`: which attention kernel the UNets' attention layers run.

- `sdpa`: torch's `scaled_dot_product_attention` everywhere (diffusers' default `AttnProcessor2_0`).
- `auto` (default): the same, except where torch's CPU kernels are slow: on a CPU, float32 heads of at
  most `SMALL_HEAD_DIM` channels (the tiny teachers have 4-12) run `small_head_attention` below.
- `xformers`: xformers' memory-efficient kernel (CUDA only).

Why a kernel of our own: with 4-channel heads, attention costs almost nothing in FLOPs but everything in
passes over the L x L score matrix, and torch's fused CPU kernel (flash attention for CPU) computes it with
many tiny GEMMs of inner size D, and recomputes the softmax in its backward. `small_head_attention` keeps
the softmax P (a few MB at these sizes) and lays every product out so that the L x L matrix is the GEMM's
wide operand (X^T = B^T A^T: a product with D output columns is slow, one with D output rows is fast). Where
the scores are bounded it skips softmax's max pass (`_forward`).
lcm-exp-bench measures it (`bench.ablate=[attention]`); tests/test_attention.py checks it against SDPA.
"""
from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict, deque

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, XFormersAttnProcessor

from .config import ATTENTION_MODES as MODES

SMALL_HEAD_DIM = 12  # at or below this head size the kernel below beats torch's on a CPU (lcm-exp-bench)
MAX_SCORE_BYTES = 256 * 2 ** 20  # it holds P (B·H·L·S floats) from forward to backward: keep that bounded
TILE_BYTES = 4 * 2 ** 20  # score rows of this many bytes are computed and used while they sit in cache
UNSHIFTED_MIN_KEYS = 256  # rows of at least this many scores may skip softmax's max pass (see _forward)
MAX_EXPONENT = 32.0  # ... when |log2(e)·Q Kᵀ| <= this: E, l and dO / l stay normal (for |dO| > ~1e-26)
LOG2E = 1.4426950408889634


def _tiles(n: int, l: int, s: int, element_size: int):
    step = max(1, TILE_BYTES // (l * s * element_size))
    return [(i, min(i + step, n)) for i in range(0, n, step)], step


class _Buffers:
    """Reused storage for score matrices. A fresh tensor of several MB comes from mmap, and its pages fault in
    on first touch and go back to the OS when it is freed: every training step would pay that again for each
    attention layer. A kept P is taken in the forward and given back once nothing can read it again: at the
    end of a backward that freed the graph's saved tensors, or when the graph is dropped (never while
    `retain_graph` keeps it); not at all under saved-tensor hooks (gradient checkpointing), which hold P on
    their own terms. A scratch tile goes back at the end of the call that took it. At most `max_bytes` are
    kept, the least recently given dropped first."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.lock = max_bytes, 0, threading.Lock()
        self.free: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()  # oldest key first
        self.returned: deque[torch.Tensor] = deque()  # given back, not yet filed (give never waits for the lock)

    def take(self, shape, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(shape), like.dtype, like.device)
        with self.lock:
            self._file_returned()
            bufs = self.free.get(key)
            if bufs:
                buf = bufs.pop()
                if not bufs:
                    del self.free[key]
                self.bytes -= buf.nbytes
                return buf
        return like.new_empty(shape)

    def give(self, buf: torch.Tensor) -> None:
        """Called from finalizers, i.e. from whatever code triggers a garbage collection, perhaps while this
        thread holds the lock: it only queues the buffer, and files it if the lock is free right now. A tensor
        made under `torch.inference_mode` is dropped: outside it, nothing may write into it."""
        if buf.is_inference():
            return
        self.returned.append(buf)
        if self.lock.acquire(blocking=False):
            try:
                self._file_returned()
            finally:
                self.lock.release()

    def _file_returned(self) -> None:  # (the lock held)
        while self.returned:
            buf = self.returned.popleft()
            key = (tuple(buf.shape), buf.dtype, buf.device)
            self.free.setdefault(key, []).append(buf)
            self.free.move_to_end(key)
            self.bytes += buf.nbytes
            while self.bytes > self.max_bytes:
                old_key, old = next(iter(self.free.items()))
                self.bytes -= old.pop(0).nbytes
                if not old:
                    del self.free[old_key]

    def clear(self) -> None:
        with self.lock:
            self.returned.clear()
            self.free.clear()
            self.bytes = 0


_P_BUFFERS = _Buffers(MAX_SCORE_BYTES)  # the kept P (E), given back when nothing can read it again
_TILES = _Buffers(16 * 2 ** 20)  # a call's scratch tile of scores, given back at the end of the call


def release_buffers() -> None:
    """Frees the buffers held for reuse (at most `MAX_SCORE_BYTES` of kept P and 16 MB of scratch tiles)."""
    _P_BUFFERS.clear()
    _TILES.clear()


def _hooks_hold_saved() -> bool:
    """Whether saved-tensor hooks (non-reentrant checkpointing, `save_on_cpu`) hold what a Function saves: then
    P lives as long as they keep it, not as long as the graph, and must not go back to the pool."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _exponent_bound(q, k) -> float:
    """A bound on |log2(e) · q_i·k_j| over all heads (q comes scaled): by Cauchy–Schwarz ‖q_i‖ ‖k_j‖, bounded
    in turn by √D max|q| · √D max|k| (two cheap reductions), which is tried first."""
    d = q.shape[-1]
    q_max, k_max = (max(abs(x.item()) for x in torch.aminmax(t)) for t in (q, k))
    bound = LOG2E * d * q_max * k_max
    if bound <= MAX_EXPONENT:
        return bound
    norm = functools.partial(torch.linalg.vector_norm, dim=-1)
    return LOG2E * norm(q).amax().item() * norm(k).amax().item()


def _forward(q, k, v, e_all: torch.Tensor | None = None):
    """O = softmax(Q Kᵀ) V (q comes scaled), a few heads at a time, as Oᵀ = Vᵀ Pᵀ. With `e_all` ([N, L, S]) the
    softmax's numerator E is kept there for a backward, with its row sums l ([N, 1, L]; P = E / l, and l is None
    where E = P); without, only a tile of it exists at a time. Returns O and l.

    softmax subtracts each row's max before its exp so that no exp overflows. Where |Q Kᵀ| is known to be small
    (`_exponent_bound` ≤ MAX_EXPONENT, as in the tiny teachers) no exp can overflow or leave a row without a
    normal term, and long rows (the tiny teacher's self-attention at 64 px) skip that pass: E = 2^(log2(e)·Q Kᵀ),
    l = rowsum(E), and the division by l moves to the D-wide O. On the 2-core CPU exp2 and the row sum take 60%
    of torch.softmax's time over a 4 MB tile of 256-long rows (torch.exp is slower than exp2 there), which makes
    the forward about 15% faster with 4-channel heads; with rows of 64 it is slower, hence UNSHIFTED_MIN_KEYS.
    """
    n, l, d = q.shape
    s = k.shape[1]
    tiles, step = _tiles(n, l, s, q.element_size())
    buf = None if e_all is not None else _TILES.take((min(step, n), l, s), q)
    ot = q.new_empty(n, d, l)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    unshifted = s >= UNSHIFTED_MIN_KEYS and _exponent_bound(q, k) <= MAX_EXPONENT
    rowsum = q.new_empty(n, 1, l) if unshifted else None
    for i, j in tiles:
        e = e_all[i:j] if e_all is not None else buf[: j - i]
        if unshifted:
            torch.baddbmm(e, q[i:j], kt[i:j], beta=0, alpha=LOG2E, out=e)  # log2(e)·S, S = (scale·Q) Kᵀ
            e.exp2_()  # E = exp(S)
            torch.sum(e, dim=-1, out=rowsum[i:j, 0])  # l = rowsum(E)
        else:
            torch.bmm(q[i:j], kt[i:j], out=e)  # S
            torch.softmax(e, dim=-1, out=e)  # E = P = softmax(S), row-wise
        torch.bmm(vt[i:j], e.transpose(1, 2), out=ot[i:j])  # Vᵀ Eᵀ
    if buf is not None:
        _TILES.give(buf)
    if unshifted:
        ot.div_(rowsum)  # Oᵀ = Vᵀ Eᵀ / l = Vᵀ Pᵀ
    return ot.transpose(1, 2), rowsum


class _SmallHeadAttention(torch.autograd.Function):
    """softmax(Q Kᵀ) V over [N, L, D] queries (scaled) and [N, S, D] keys/values (N = batch · heads).

    Backward (FlashAttention-2, Dao 2023, Alg. 2, with P kept instead of recomputed): dV = Pᵀ dO, dP = dO Vᵀ,
    dS = P ∘ (dP − rowsum(dO ∘ O)), dQ = dS K, dK = dSᵀ Q; each product with D columns computed as its
    transpose, a few heads at a time. What is kept is E = diag(l) P (see `_forward`): with dÕ = dO / l the
    same products give dV = Eᵀ dÕ and dS = E ∘ (dÕ Vᵀ − rowsum(dÕ ∘ O))."""

    @staticmethod
    def forward(ctx, q, k, v):
        pooled = not _hooks_hold_saved()
        n, l, s = *q.shape[:2], k.shape[1]
        e = _P_BUFFERS.take((n, l, s), q) if pooled else q.new_empty(n, l, s)
        o, rowsum = _forward(q, k, v, e)
        ctx.save_for_backward(q, k, v, e, o, rowsum)
        ctx.give_back = None
        if pooled:  # P's storage is reused once this graph is freed (or, see backward, once it lets go of P)
            ctx.give_back = weakref.finalize(ctx, _P_BUFFERS.give, e)
            ctx.give_back.atexit = False
        return o

    @staticmethod
    @once_differentiable  # (the products below write into buffers: no double backward)
    def backward(ctx, do):
        q, k, v, e_all, o, rowsum = ctx.saved_tensors
        if ctx.give_back is not None:  # a kept graph (a stored loss) must not pin P after a backward that freed it
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_give_back_if_freed, ctx))
        n, l, d = q.shape
        s = k.shape[1]
        tiles, step = _tiles(n, l, s, q.element_size())
        do = do.contiguous() if rowsum is None else do / rowsum.transpose(1, 2)  # dÕ = dO / l
        need_q, need_k, need_v = ctx.needs_input_grad  # (a frozen projection's input needs none)
        dqt = q.new_empty(n, d, l) if need_q else None
        dkt = q.new_empty(n, d, s) if need_k else None
        dvt = q.new_empty(n, d, s) if need_v else None
        buf = _TILES.take((min(step, n), l, s), q) if need_q or need_k else None
        delta = (do * o).sum(-1, keepdim=True) if buf is not None else None  # rowsum(dÕ ∘ O) = rowsum(P ∘ dP) / l
        qt, kt, vt, dot = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), do.transpose(1, 2)
        for i, j in tiles:
            e = e_all[i:j]
            if need_v:
                torch.bmm(dot[i:j], e, out=dvt[i:j])  # dVᵀ = dÕᵀ E
            if buf is None:
                continue
            ds = buf[: j - i]
            torch.bmm(do[i:j], vt[i:j], out=ds)  # dP / l = dÕ Vᵀ
            ds.sub_(delta[i:j]).mul_(e)  # dS = P ∘ (dP − rowsum(dO ∘ O)) = E ∘ (dP − rowsum(dO ∘ O)) / l
            if need_q:
                torch.bmm(kt[i:j], ds.transpose(1, 2), out=dqt[i:j])  # dQᵀ = Kᵀ dSᵀ
            if need_k:
                torch.bmm(qt[i:j], ds, out=dkt[i:j])  # dKᵀ = Qᵀ dS
        if buf is not None:
            _TILES.give(buf)
        return tuple(None if g is None else g.transpose(1, 2) for g in (dqt, dkt, dvt))


def _give_back_if_freed(ctx) -> None:
    """At the end of a backward: if it freed the graph's saved tensors (no `retain_graph`), P is only the pool's
    to reuse now, even while something keeps the graph itself alive."""
    try:
        ctx.saved_tensors
    except RuntimeError:  # "...after they have already been freed"
        ctx.give_back()  # (a finalize object runs once: the graph's later death gives nothing back again)


def small_head_attention(query, key, value, scale: float | None = None):
    """`F.scaled_dot_product_attention(query, key, value)` (no mask, no dropout) for [B, H, L, D] inputs."""
    b, h, l, d = query.shape
    s = key.shape[2]
    scale = d ** -0.5 if scale is None else scale
    q, k, v = (query * scale).reshape(b * h, l, d), key.reshape(b * h, s, d), value.reshape(b * h, s, d)
    if _keeps_p(query, key, value):
        o = _SmallHeadAttention.apply(q, k, v)
    else:
        o, _ = _forward(q, k, v)
    return o.reshape(b, h, l, d)


def _keeps_p(*tensors) -> bool:
    """Whether a backward will follow, so that P is kept from the forward (else only a tile of it exists)."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def use_small_head(query, key, value=None, attn_mask=None) -> bool:
    """Where the kernel beats torch's: a CPU, float32/64 (it keeps S and P in the input dtype; torch's fused
    kernel accumulates bf16/fp16 in fp32), no mask, small heads, P of bounded size when it is kept."""
    b, h, l, d = query.shape
    keep = _keeps_p(query, key, value)
    return (query.device.type == "cpu" and query.dtype in (torch.float32, torch.float64) and attn_mask is None
            and d <= SMALL_HEAD_DIM
            and not torch.compiler.is_compiling()  # a compiled graph gets SDPA, which inductor knows
            and (not keep or b * h * l * key.shape[2] * query.element_size() <= MAX_SCORE_BYTES))


class AutoAttnProcessor(AttnProcessor2_0):
    """diffusers' `AttnProcessor2_0` (the same projections, norms and residual) whose attention itself runs
    `small_head_attention` where `use_small_head` says it is faster, and torch's SDPA elsewhere."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        plain = (attention_mask is None and attn.spatial_norm is None and attn.group_norm is None
                 and attn.norm_q is None and attn.norm_k is None and hidden_states.ndim == 3)
        if not plain:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        b, heads = hidden_states.shape[0], attn.heads
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        d = key.shape[-1] // heads
        query, key, value = (x.view(b, -1, heads, d).transpose(1, 2) for x in (query, key, value))
        if use_small_head(query, key, value):
            out = small_head_attention(query, key, value)
        else:
            out = F.scaled_dot_product_attention(query, key, value)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, -1, heads * d).to(query.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


PLAIN = (AttnProcessor2_0, AutoAttnProcessor, XFormersAttnProcessor)  # the processors `set_attention` swaps


def set_attention(unet, mode: str) -> None:
    """Puts `mode`'s processor on the attention layers of `unet` that run plain scaled dot-product attention
    (a layer diffusers gave another processor, e.g. `scale_qk=False` or added K/V, keeps it); a no-op when
    they already have it."""
    if mode not in MODES:
        raise ValueError(f"trainer.attention={mode!r}: use one of {', '.join(MODES)}")
    on_cpu = next(unet.parameters()).device.type == "cpu"
    cls = {"xformers": XFormersAttnProcessor, "auto": AutoAttnProcessor if on_cpu else AttnProcessor2_0,
           "sdpa": AttnProcessor2_0}[mode]  # (off a CPU, auto is SDPA)
    layers = [m for m in unet.modules() if isinstance(m, Attention) and type(m.processor) in PLAIN]
    if all(type(m.processor) is cls for m in layers):
        return
    if mode == "xformers":
        unet.enable_xformers_memory_efficient_attention()
        return
    processor = cls()
    for m in layers:
        m.set_processor(processor)
