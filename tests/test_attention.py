"""trainer.attention: the small-head CPU kernel computes torch's SDPA (values and gradients), `auto` uses it only
where it is meant to, and a whole UNet gives the same outputs and gradients with `auto` as with `sdpa`."""
import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from lcm_exp import attention
from lcm_exp.attention import AutoAttnProcessor, set_attention, small_head_attention, use_small_head
from lcm_exp.teachers.tiny_random import build_components


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def path(self) -> str:
        """Which pass the attention took: the exp2 one without the max, or torch.softmax."""
        exp2, softmax = "exp2_" in self.ops, bool({"softmax", "_softmax"} & set(self.ops))
        assert exp2 != softmax, self.ops
        return "exp2" if exp2 else "softmax"


@pytest.mark.parametrize("unshifted", [True, False])  # the exp2 pass without softmax's max, or torch.softmax
@pytest.mark.parametrize("shape_q,shape_kv", [((2, 3, 37, 4), (2, 3, 37, 4)),  # self-attention, odd length
                                              ((2, 8, 64, 6), (2, 8, 19, 6)),  # cross-attention
                                              ((1, 2, 300, 4), (1, 2, 300, 4))])
def test_small_head_attention_is_sdpa_with_its_gradients(shape_q, shape_kv, unshifted, monkeypatch):
    monkeypatch.setattr(attention, "TILE_BYTES", 20_000)  # several tiles of heads, and a last partial one
    monkeypatch.setattr(attention, "UNSHIFTED_MIN_KEYS", 0 if unshifted else float("inf"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in (shape_q, shape_kv, shape_kv))
    expected = F.scaled_dot_product_attention(q, k, v)
    got = small_head_attention(q, k, v)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    grad_out = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad_out), torch.autograd.grad(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad(), OpCounter() as counter:  # the no-grad path keeps no P and reuses one tile buffer
        torch.testing.assert_close(small_head_attention(q, k, v), expected, rtol=1e-10, atol=1e-12)
    assert counter.path() == ("exp2" if unshifted else "softmax")
    # a wrong kernel would not pass: a different scale changes the result
    assert (small_head_attention(q, k, v, scale=1.0) - expected).abs().max() > 1e-3


def test_exp2_pass_only_where_no_exponent_can_overflow():
    """Long rows skip softmax's max pass only when |Q Kᵀ| is bounded (as in the tiny teachers): with large
    scores they take torch.softmax and still equal SDPA, where exp2 of the raw scores would overflow."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, 4, generator=g) for _ in range(3))
    assert 256 >= attention.UNSHIFTED_MIN_KEYS  # (the bench's self-attention; cross-attention rows are short)
    for scale, unshifted in ((1.0, True), (40.0, False)):
        qs, ks = q * scale, k * scale
        with torch.no_grad(), OpCounter() as counter:
            got = small_head_attention(qs, ks, v)
        assert counter.path() == ("exp2" if unshifted else "softmax")
        torch.testing.assert_close(got, F.scaled_dot_product_attention(qs, ks, v), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), OpCounter() as counter:  # rows of 64 (the shipped teacher at 32 px): softmax is faster
        small_head_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64])
    assert counter.path() == "softmax"
    with torch.no_grad():  # the bound is what keeps it right: without it, exp2 overflows
        attention.MAX_EXPONENT, keep = float("inf"), attention.MAX_EXPONENT
        try:
            assert not small_head_attention(q * 40, k * 40, v).isfinite().all()
        finally:
            attention.MAX_EXPONENT = keep


def test_exponent_bound_bounds_the_scores():
    g = torch.Generator().manual_seed(0)
    cases = [(torch.full((6, 100, 4), 0.5), torch.full((6, 80, 4), 2.0))]  # aligned rows: √D max|x| is tight
    for scale in (0.5, 3.0, 10.0):  # one large row: the row norms are the tighter bound (the second stage)
        q, k = torch.randn(6, 100, 4, generator=g) * scale, torch.randn(6, 80, 4, generator=g)
        q[0, 0] = 8 * scale
        cases.append((q, k))
    for q, k in cases:
        true = (torch.bmm(q, k.transpose(1, 2)).abs().amax() * attention.LOG2E).item()
        bound = attention._exponent_bound(q, k)
        assert true <= bound * (1 + 1e-6) and bound <= 4 * true
    assert attention._exponent_bound(*cases[0]) <= attention.MAX_EXPONENT  # (the first stage answered)


def test_auto_picks_the_kernel_only_for_small_heads_on_a_cpu():
    small, wide = torch.zeros(2, 8, 16, 4), torch.zeros(2, 8, 16, 64)
    assert use_small_head(small, small)
    assert not use_small_head(wide, wide)  # torch's fused kernel is faster there
    assert not use_small_head(small, small, attn_mask=torch.ones(2, 1, 16, 16, dtype=torch.bool))
    big = torch.zeros(64, 8, 4096, 4, requires_grad=True)  # P kept for backward would be 32 GB
    assert not use_small_head(big, big)
    with torch.no_grad():
        assert use_small_head(big, big)  # without backward only a tile of P exists at a time
    frozen = big.detach()
    assert not use_small_head(frozen, frozen, big)  # P is kept when only the values need a gradient, too
    assert not use_small_head(small.bfloat16(), small.bfloat16())  # torch's kernel accumulates in fp32


def test_compiled_graphs_get_sdpa(monkeypatch):
    small = torch.zeros(2, 8, 16, 4)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not use_small_head(small, small)


def _unet():
    unet = build_components({})["unet"]
    torch.manual_seed(1)
    with torch.no_grad():  # random weights everywhere (a fresh UNet zero-initialises its output convs)
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return unet


def test_auto_unet_matches_sdpa_unet_in_outputs_and_gradients(monkeypatch):
    calls = []
    kernel = attention.small_head_attention
    monkeypatch.setattr(attention, "small_head_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ref = _unet()
    ours = copy.deepcopy(ref)
    set_attention(ref, "sdpa")
    set_attention(ours, "auto")
    layers = [m for m in ours.modules() if isinstance(m, Attention)]
    assert layers and all(type(m.processor) is AutoAttnProcessor for m in layers)
    assert all(type(m.processor) is AttnProcessor2_0 for m in ref.modules() if isinstance(m, Attention))
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 32, 32, generator=g)
    t = torch.tensor([10, 500, 990])
    out_ref = ref(x, t, encoder_hidden_states=c).sample
    assert not calls
    out = ours(x, t, encoder_hidden_states=c).sample
    assert len(calls) == 2 * 4  # self and cross attention of the UNet's 4 transformer blocks: all ran the kernel
    assert out_ref.abs().mean() > 1e-2
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    out_ref.square().mean().backward()
    out.square().mean().backward()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        scale = b.grad.abs().max().clamp(min=1e-8)
        assert ((a.grad - b.grad).abs().max() / scale) < 1e-3, name


def test_set_attention_validates_and_is_idempotent():
    unet = build_components({})["unet"]
    set_attention(unet, "auto")
    first = next(m.processor for m in unet.modules() if isinstance(m, Attention))
    set_attention(unet, "auto")
    assert next(m.processor for m in unet.modules() if isinstance(m, Attention)) is first
    with pytest.raises(ValueError, match="auto, sdpa, xformers"):
        set_attention(unet, "flash")


@pytest.mark.parametrize("batch", [1, 3])
def test_processor_matches_diffusers_for_cross_attention_with_norm_residual_and_rescale(batch):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=4, dim_head=4, cross_attention_norm="layer_norm",
                     residual_connection=True, rescale_output_factor=2.0, out_bias=True)
    x, ctx = torch.randn(batch, 20, 16, requires_grad=True), torch.randn(batch, 7, 12)
    attn.set_processor(AttnProcessor2_0())
    expected = attn(x, encoder_hidden_states=ctx)
    (gx_ref,) = torch.autograd.grad(expected.square().sum(), x)
    attn.set_processor(AutoAttnProcessor())
    got = attn(x, encoder_hidden_states=ctx)
    (gx,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)


def test_set_attention_leaves_layers_diffusers_gave_another_processor():
    from diffusers.models.attention_processor import AttnProcessor

    net = torch.nn.ModuleDict({"plain": Attention(query_dim=8, heads=2, dim_head=4),
                               "unscaled": Attention(query_dim=8, heads=2, dim_head=4, scale_qk=False)})
    assert type(net["unscaled"].processor) is AttnProcessor  # its scale is 1, not 1/sqrt(d)
    set_attention(net, "auto")
    assert type(net["plain"].processor) is AutoAttnProcessor and type(net["unscaled"].processor) is AttnProcessor
    set_attention(net, "sdpa")
    assert type(net["plain"].processor) is AttnProcessor2_0 and type(net["unscaled"].processor) is AttnProcessor


def test_kept_p_buffers_are_reused_only_once_their_graph_is_freed():
    attention.release_buffers()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 4, generator=g, requires_grad=True) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    grad_out = torch.randn(expected.shape, generator=g)
    want = torch.autograd.grad(expected, (q, k, v), grad_out)

    def saved_p(out):  # the P tensor the graph saved for its backward
        return out.grad_fn.next_functions[0][0].saved_tensors[3]

    first = small_head_attention(q, k, v)
    ptr = saved_p(first).data_ptr()
    held = small_head_attention(q, k, v)  # while the first graph lives, its P is not handed out again
    assert saved_p(held).data_ptr() != ptr
    # retain_graph keeps the graph, so its P stays its own: a forward in between does not overwrite it
    got = torch.autograd.grad(first, (q, k, v), grad_out, retain_graph=True)
    other = small_head_attention(q * 3, k, v)
    assert saved_p(other).data_ptr() != ptr
    for a, b in zip(torch.autograd.grad(first, (q, k, v), grad_out), want):
        torch.testing.assert_close(a, b)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # that backward freed the saved tensors: P went back although `first` (a stored loss, say) keeps its graph
    assert ptr in pooled() and first.grad_fn is not None
    free = pooled()
    again = small_head_attention(q, k, v)  # takes a buffer from the pool
    kept = {saved_p(x).data_ptr() for x in (again, held, other)}
    assert saved_p(again).data_ptr() in free
    for a, b in zip(torch.autograd.grad(again, (q, k, v), grad_out), want):
        torch.testing.assert_close(a, b)
    del again, held, other, first  # (`first` gives nothing back twice)
    assert kept | {ptr} <= pooled()
    assert attention._P_BUFFERS.bytes == 4 * 40 * 40 * len(pooled()) * 2 * 3
    attention.release_buffers()
    assert attention._P_BUFFERS.bytes == 0 and not attention._P_BUFFERS.free


def pooled() -> set[int]:
    return {b.data_ptr() for bufs in attention._P_BUFFERS.free.values() for b in bufs}


def test_scratch_tiles_are_reused_from_call_to_call(monkeypatch):
    """The no-grad forward's tile of scores and the backward's tile of dS come from a pool, not from a fresh
    mmap whose pages fault in on every call; the kept P never goes there."""
    attention.release_buffers()
    taken = []
    take = attention._TILES.take
    monkeypatch.setattr(attention._TILES, "take", lambda *a: taken.append(take(*a)) or taken[-1])
    q = torch.randn(2, 8, 64, 4)
    with torch.no_grad():
        small_head_attention(q, q, q)
        small_head_attention(q, q, q)
    q.requires_grad_()
    out = small_head_attention(q, q, q)
    p = out.grad_fn.next_functions[0][0].saved_tensors[3]
    out.sum().backward()
    assert len(taken) == 3 and len({t.data_ptr() for t in taken}) == 1  # forward, forward, backward
    assert p.data_ptr() != taken[0].data_ptr() and attention._TILES.bytes == taken[0].nbytes
    attention.release_buffers()


def test_inference_mode_tiles_stay_out_of_the_pool():
    """A tile made under torch.inference_mode is an inference tensor: nothing outside that mode may write into it,
    so it must not be handed to a later training step."""
    attention.release_buffers()
    q = torch.randn(2, 8, 64, 4)
    with torch.inference_mode():
        small_head_attention(q, q, q)
    assert attention._TILES.bytes == 0
    with torch.no_grad():
        small_head_attention(q, q, q)  # a normal tile: pooled, and then usable under inference_mode too
    with torch.inference_mode():
        small_head_attention(q, q, q)
    qg = q.clone().requires_grad_()
    small_head_attention(qg, qg, qg).sum().backward()
    assert attention._TILES.bytes > 0 and not any(b.is_inference() for bs in attention._TILES.free.values() for b in bs)
    attention.release_buffers()


def test_kept_p_buffers_are_bounded_least_recently_given_first():
    pool = attention._Buffers(max_bytes=3 * 400)
    bufs = [torch.empty(10, 10), torch.empty(10, 10), torch.empty(5, 20), torch.empty(5, 20)]
    for b in bufs:
        pool.give(b)
    assert pool.bytes == 1200 and len(pool.free[((10, 10), torch.float32, torch.device("cpu"))]) == 1
    assert pool.take((5, 20), bufs[0]) is bufs[3] and pool.take((5, 20), bufs[0]) is bufs[2]
    fresh = pool.take((5, 20), bufs[0])  # none left of that shape: a new tensor
    assert fresh.shape == (5, 20) and all(fresh is not b for b in bufs)
    assert pool.take((10, 10), bufs[0]) is bufs[1] and pool.bytes == 0 and not pool.free
    # a shape emptied by `take` and then the oldest when the pool overflows: still bounded, nothing raised
    pool.give(bufs[1])
    assert pool.take((10, 10), bufs[0]) is bufs[1]
    for b in [torch.empty(2, 50) for _ in range(5)]:
        pool.give(b)
    assert pool.bytes == 1200 and list(pool.free) == [((2, 50), torch.float32, torch.device("cpu"))]


def test_giving_back_never_waits_for_the_lock():
    """Finalizers give buffers back from whatever code triggers a garbage collection, perhaps code of the pool
    itself holding its lock: `give` must queue, not wait (a plain lock would deadlock that thread)."""
    pool = attention._Buffers(max_bytes=10 ** 6)
    buf = torch.empty(10, 10)
    with pool.lock:
        pool.give(buf)  # would hang here if give took the lock
        assert pool.bytes == 0 and list(pool.returned) == [buf]
    assert pool.take((10, 10), buf) is buf and not pool.returned


@pytest.mark.parametrize("needs", [(False, True, True), (True, False, False), (False, False, True), (True, True, False),
                                   (False, True, False), (True, False, True)])
def test_backward_computes_only_the_gradients_its_inputs_need(needs, monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 30, 4, generator=g, dtype=torch.float64).requires_grad_(n) for n in needs)
    grad_out = torch.randn(2, 3, 30, 4, generator=g, dtype=torch.float64)
    want = [x for x in (q, k, v) if x.requires_grad]
    out = small_head_attention(q, k, v)
    products = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **kw: products.append(1) or bmm(*a, **kw))
    got = torch.autograd.grad(out, want, grad_out)
    monkeypatch.undo()
    need_q, need_k, need_v = needs  # one tile here: dV, then dP (for dQ or dK), dQ, dK, each only when needed
    assert len(products) == need_v + (need_q or need_k) + need_q + need_k
    expected = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), want, grad_out)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradient_checkpointing_keeps_p_out_of_the_pool_and_matches_sdpa():
    """Non-reentrant checkpointing (diffusers') recomputes the forward in the backward and holds the recomputed
    P itself, after the recomputed graph is gone: such a P must never be handed to another forward."""
    attention.release_buffers()
    ref = _unet()
    ours = copy.deepcopy(ref)
    set_attention(ref, "sdpa")
    set_attention(ours, "auto")
    for m in (ref, ours):
        m.enable_gradient_checkpointing()
        m.train()
    g = torch.Generator().manual_seed(0)
    for step in range(2):  # the second step would reuse whatever the first gave back
        x, c = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 32, 32, generator=g)
        t = torch.tensor([10, 500, 990])
        for m in (ref, ours):
            m.zero_grad()
            m(x, t, encoder_hidden_states=c).sample.square().mean().backward()
        for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
            scale = b.grad.abs().max().clamp(min=1e-8)
            assert ((a.grad - b.grad).abs().max() / scale) < 1e-3, (step, name)
        assert attention._P_BUFFERS.bytes == 0
    with torch.autograd.graph.save_on_cpu():  # any saved-tensor hooks: their P is theirs
        q = torch.randn(1, 2, 8, 4, requires_grad=True)
        small_head_attention(q, q, q).sum().backward()
    assert attention._P_BUFFERS.bytes == 0
