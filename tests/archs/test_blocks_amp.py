"""The fused autograd Functions of the shared blocks under bf16 and fp16 autocast (CPU).

Each Function, and a tiny network of every method that uses them (read from the method cards),
is checked against float64 and against the plain formulation under the same autocast. Errors are
norm-wise relative errors, ||a - ref|| / ||ref|| over a whole tensor (per output, per gradient);
the tolerances are those of the formats: bfloat16 keeps 8 significant bits (unit roundoff 2^-9 =
2.0e-3), float16 11 (2^-12 = 2.4e-4), and a result goes through a few roundings:

* against float64: ``TOL[dtype]`` (output, each gradient);
* against the plain formulation under autocast: the fused error (output; root mean square of the
  gradients' errors) is at most ``PLAIN_FACTOR`` x the plain one + ``FLOOR[dtype]`` (the fused
  path is no less accurate than autocast's own formulation).

Also: results in the dtype that the plain formulation gives under autocast, gradients in the
dtype of their inputs, and every activation-sized tensor the Functions save in the autocast dtype.
"""
import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

import vlunet  # noqa: F401
import vlunet.archs.blocks as blocks
from basicsr.archs import build_network
from vlunet.archs.blocks import (LN_EPS, Attention, ChannelAttention, DepthwiseConv, FeedForward, GatedLinear,
                                 NormLinear, TransformerBlock, channel_attention, compute_dtypes)
from vlunet.archs.card import example_inputs, list_methods

CL = torch.channels_last
DTYPES = [torch.bfloat16, torch.float16]
NAMES = {torch.bfloat16: 'bf16', torch.float16: 'fp16'}
TOL = {torch.bfloat16: (1e-2, 5e-2), torch.float16: (1.5e-3, 8e-3)}  # (output, each gradient) against float64
PLAIN_FACTOR = 1.5
FLOOR = {torch.bfloat16: 2e-3, torch.float16: 3e-4}
SEEDS = range(6)
MIN_NUMEL = 32
FUSED_NODES = ('NormLinearBackward', 'ChannelAttentionBackward', 'GatedLinearBackward', 'DepthwiseConvBackward')


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def _plain(fn):
    """fn() on the plain autograd formulation (the fused Functions switched off)."""
    saved = blocks.use_fused
    blocks.use_fused = lambda x: False
    try:
        return fn()
    finally:
        blocks.use_fused = saved


def _autocast(dtype):
    return torch.autocast('cpu', dtype=dtype)


def _run(fn, args, grad_out, dtype=None):
    """(output, gradients of every tensor in args that requires one) of fn(*args), under autocast if dtype."""
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = fn(*args)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return out, torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


def _float64(args):
    return [a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


def _errors(fused, plain, ref):
    """[(fused error, plain error, numel)] of the output and of each gradient, against float64."""
    (out, grads), (out_p, grads_p), (out_64, grads_64) = fused, plain, ref
    return [(_rel(a, r), _rel(p, r), r.numel())
            for a, p, r in [(out, out_p, out_64)] + list(zip(grads, grads_p, grads_64))]


def _compare(make_args, fused_fn, plain_fn, grad_shape, dtype, what, plain=True):
    """Run fused_fn and plain_fn under autocast and plain_fn in float64 on make_args() for every seed of
    SEEDS and check the errors: against float64 for every seed (the output, and every gradient of at least
    MIN_NUMEL elements: one of a few elements, e.g. a temperature, is a sum with cancellation whose error is
    heavy-tailed in either formulation), against the plain formulation (if ``plain``) as medians over the
    seeds. Returns the fused run of the last seed."""
    tol_out, tol_grad = TOL[dtype]
    table = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        args = make_args()
        g = torch.randn(grad_shape)
        fused, plain = _run(fused_fn, args, g, dtype), _run(plain_fn, args, g, dtype)
        assert fused[0].dtype == plain[0].dtype, \
            f'{what}: result dtype {fused[0].dtype}, the plain formulation gives {plain[0].dtype}'
        table.append(_errors(fused, plain, _run(plain_fn, _float64(args), g.double())))
        for i, (err, _, numel) in enumerate(table[-1]):
            name = 'output' if i == 0 else f'gradient {i - 1}'
            tol = tol_out if i == 0 else tol_grad
            assert err <= tol or (i and numel < MIN_NUMEL), \
                f'{what} {NAMES[dtype]} seed {seed}: {name} error {err:.2e} against float64 > {tol}'
    for i in range(len(table[0])):
        med = statistics.median(row[i][0] for row in table)
        plain_errors = [row[i][1] for row in table if math.isfinite(row[i][1])] if plain else []
        if plain_errors:  # (the plain formulation can overflow in float16 where the fused one does not)
            med_plain = statistics.median(plain_errors)
            assert med <= PLAIN_FACTOR * med_plain + FLOOR[dtype], \
                f'{what} {NAMES[dtype]}: {"output" if i == 0 else f"gradient {i - 1}"} median error {med:.2e}, ' \
                f'plain autocast {med_plain:.2e}'
    return fused


def _check(fused, plain, ref, dtype, what):
    """One run (a network): output and the concatenated gradients against float64 and the plain run."""
    assert fused[0].dtype == plain[0].dtype, \
        f'{what}: result dtype {fused[0].dtype}, the plain formulation gives {plain[0].dtype}'
    for i, (err, err_plain, _) in enumerate(_errors(fused, plain, ref)):
        name, tol = ('output', TOL[dtype][0]) if i == 0 else ('gradient', TOL[dtype][1])
        assert err <= tol, f'{what} {NAMES[dtype]}: {name} error {err:.2e} against float64 > {tol}'
        if math.isfinite(err_plain):
            assert err <= PLAIN_FACTOR * err_plain + FLOOR[dtype], \
                f'{what} {NAMES[dtype]}: {name} error {err:.2e}, plain autocast {err_plain:.2e}'


def _saved_dtypes(fn):
    """[(numel, dtype)] of every tensor saved for backward while fn() runs."""
    saved = []

    def pack(t):
        saved.append((t.numel(), t.dtype))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def _rand(*shape, scale=1.0, cl=True, grad=True, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    t = torch.randn(*shape, generator=g) * scale
    if cl and t.dim() == 4:
        t = t.contiguous(memory_format=CL)
    return t.requires_grad_(grad)


# ------------------------------------------------------------------------------------------------
# the dtypes the Functions compute in


def test_compute_dtypes():
    x = torch.zeros(1)
    assert compute_dtypes(x) == (torch.float32, torch.float32)
    assert compute_dtypes(x.double()) == (torch.float64, torch.float64)
    assert compute_dtypes(x.bfloat16()) == (torch.bfloat16, torch.float32)  # a bf16 model without autocast
    for dtype in DTYPES:
        with _autocast(dtype):
            assert compute_dtypes(x) == (dtype, torch.float32)
            assert compute_dtypes(x.bfloat16()) == (dtype, torch.float32)
            assert compute_dtypes(x.double()) == (torch.float64, torch.float64)  # autocast leaves float64 alone
    assert blocks.use_fused(x) and not blocks.use_fused(x.to('meta'))
    with _autocast(torch.bfloat16):
        assert blocks.use_fused(x)  # the fused path under autocast too


# ------------------------------------------------------------------------------------------------
# each Function


def _norm_linear_ref(x, nw, nb, w, b):
    normed = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1], ), nw, nb, LN_EPS).permute(0, 3, 1, 2)
    return F.conv2d(normed, w[..., None, None], b)


@pytest.mark.parametrize('dtype', DTYPES, ids=NAMES.get)
@pytest.mark.parametrize('input_dtype', [torch.float32, 'autocast'])
@pytest.mark.parametrize('mixed_affine', [True, False], ids=['native', 'composite-statistics'])
def test_norm_linear_under_autocast(dtype, input_dtype, mixed_affine, monkeypatch):
    if not mixed_affine:  # a device whose layer_norm returns reduced-precision statistics: computed in float32 here
        monkeypatch.setattr(blocks, '_MIXED_AFFINE_DEVICES', ())

    def make_args():
        x = _rand(2, 16, 6, 7, grad=False).to(dtype if input_dtype == 'autocast' else input_dtype).requires_grad_()
        return [x, 1 + _rand(16, scale=0.2), _rand(16, scale=0.2), _rand(24, 16, scale=0.3), _rand(24)]
    out, grads = _compare(make_args, NormLinear.apply, _norm_linear_ref, (2, 24, 6, 7), dtype, 'NormLinear')
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    torch.manual_seed(0)
    args = make_args()
    assert [t.dtype for t in grads] == [a.dtype for a in args]
    saved = _saved_dtypes(lambda: _run(NormLinear.apply, args, torch.randn(2, 24, 6, 7), dtype))
    assert all(d == dtype for n, d in saved if n >= args[0].numel())  # the input, kept in the autocast dtype


def _attention_args(heads, separate_k, dw, bias, residual, inputs=torch.float32):
    """ChannelAttention's tensor arguments; src and k_src in ``inputs`` (in a network, the autocast dtype of
    the convolution before), the residual in ``residual`` or None."""
    c, c_out = 8, 6
    c_src = 2 * c if separate_k else 3 * c

    def act(*shape):
        return _rand(*shape, grad=False).to(inputs).requires_grad_()
    return [act(2, c_src, 5, 6), _rand(c_src, 1, 3, 3, scale=0.5) if dw else None,
            _rand(c_src, scale=0.1) if dw == 'bias' else None, act(2, c, 5, 6) if separate_k else None,
            1 + _rand(heads, 1, 1, scale=0.2), _rand(c_out, c, scale=0.4), _rand(c_out) if bias else None,
            _rand(2, c_out, 5, 6, grad=False).to(residual).requires_grad_() if residual else None]


def _attention_ref(src, dw_w, dw_b, k_src, t, w, b, res, heads, beta):
    qkv = src if dw_w is None else F.conv2d(src, dw_w, dw_b, padding=1, groups=src.shape[1])
    if k_src is None:
        q, k, v = qkv.chunk(3, dim=1)
    else:
        (q, v), k = qkv.chunk(2, dim=1), k_src
    out = F.conv2d(channel_attention(q, k, v, t, heads), w[..., None, None], b)
    return out if res is None else out + beta * res


@pytest.mark.parametrize('dtype', DTYPES, ids=NAMES.get)
@pytest.mark.parametrize('heads', [1, 2])
@pytest.mark.parametrize('separate_k, dw', [(False, 'bias'), (True, None), (False, 'nobias')])
@pytest.mark.parametrize('bias, residual, beta', [(False, None, 1.0), (True, 'float32', 1.0),
                                                  (False, 'autocast', -1.0)])
def test_channel_attention_under_autocast(dtype, heads, separate_k, dw, bias, residual, beta):
    res_dtype = {None: None, 'float32': torch.float32, 'autocast': dtype}[residual]

    def make_args():
        return _attention_args(heads, separate_k, dw, bias, res_dtype, inputs=dtype)

    def fused_fn(*a):
        return ChannelAttention.apply(*a, heads, beta)
    out, grads = _compare(make_args, fused_fn, lambda *a: _attention_ref(*a, heads, beta), (2, 6, 5, 6), dtype,
                          'ChannelAttention')
    # the plain formulation's dtype: the autocast dtype, promoted with a float32 residual's
    assert out.dtype == (torch.float32 if residual == 'float32' else dtype)
    args = make_args()
    assert [t.dtype for t in grads] == [a.dtype for a in args if a is not None]
    saved = _saved_dtypes(lambda: _run(fused_fn, args, torch.randn(2, 6, 5, 6), dtype))
    # the inputs (q, k, v at least) in the autocast dtype; the small attention matrices in float32
    assert all(d == dtype for n, d in saved if n >= args[0].numel() // 3)


@pytest.mark.parametrize('dtype', DTYPES, ids=NAMES.get)
@pytest.mark.parametrize('separate_k, dw', [(False, 'bias'), (True, None)])
def test_channel_attention_float32_inputs(dtype, separate_k, dw):
    """Inputs wider than the autocast dtype are rounded to it first (and kept so). The plain formulation
    normalises q and k before rounding them, so only the errors against float64 are compared here."""
    def make_args():
        return _attention_args(2, separate_k, dw, True, torch.float32)
    out, grads = _compare(make_args, lambda *a: ChannelAttention.apply(*a, 2, 1.0),
                          lambda *a: _attention_ref(*a, 2, 1.0), (2, 6, 5, 6), dtype, 'ChannelAttention', plain=False)
    assert out.dtype == torch.float32 and all(t.dtype == torch.float32 for t in grads)


@pytest.mark.parametrize('dtype', DTYPES, ids=NAMES.get)
def test_channel_attention_out_dtype_and_zero_query(dtype):
    """``out_dtype`` sets the result's dtype; an all-zero query channel (F.normalize's eps clamp) stays finite,
    also in float16 where 1/eps does not fit."""
    torch.manual_seed(0)
    args = _attention_args(1, False, None, False, None)
    with torch.no_grad():
        args[0][:, 0] = 0
    with _autocast(dtype):
        out = ChannelAttention.apply(*args, 1, 1.0, None, torch.float32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    grad_src, grad_w, grad_t = torch.autograd.grad(out.sum(), [args[0], args[5], args[4]])
    assert torch.isfinite(grad_w).all() and torch.isfinite(grad_t).all()
    # the zero channel's own gradient is ~1/eps, as published: beyond float16's range
    assert torch.isfinite(grad_src if dtype == torch.bfloat16 else grad_src[:, 1:]).all()
    with torch.no_grad():
        ref = _attention_ref(*_float64(args), 1, 1.0)
    assert _rel(out, ref) <= TOL[dtype][0]


def _gated_ref(src, dw_w, dw_b, w, b, res, hidden):
    a, gate = F.conv2d(src, dw_w, dw_b, padding=1, groups=src.shape[1])[:, :2 * hidden].chunk(2, dim=1)
    out = F.conv2d(F.gelu(a) * gate, w[..., None, None], b)
    return out if res is None else out + res


@pytest.mark.parametrize('dtype', DTYPES, ids=NAMES.get)
@pytest.mark.parametrize('bias, residual', [(False, None), (True, 'float32'), (False, 'autocast')])
def test_gated_linear_under_autocast(dtype, bias, residual):
    hidden = 5
    res_dtype = {None: None, 'float32': torch.float32, 'autocast': dtype}[residual]

    def make_args():  # 2 padding channels past 2 * hidden
        res = None if res_dtype is None else _rand(2, 4, 6, 5, grad=False).to(res_dtype).requires_grad_()
        return [_rand(2, 2 * hidden + 2, 6, 5), _rand(2 * hidden + 2, 1, 3, 3, scale=0.5),
                _rand(2 * hidden + 2, scale=0.1), _rand(4, hidden, scale=0.4), _rand(4) if bias else None, res]

    def fused_fn(*a):
        return GatedLinear.apply(*a, hidden)
    out, _ = _compare(make_args, fused_fn, lambda *a: _gated_ref(*a, hidden), (2, 4, 6, 5), dtype, 'GatedLinear')
    assert out.dtype == (torch.float32 if residual == 'float32' else dtype)
    args = make_args()
    saved = _saved_dtypes(lambda: _run(fused_fn, args, torch.randn(2, 4, 6, 5), dtype))
    assert all(d == dtype for n, d in saved if n >= args[0].numel())  # src in the autocast dtype


@pytest.mark.parametrize('dtype', DTYPES, ids=NAMES.get)
@pytest.mark.parametrize('kernel', [3, 7])  # 7: weight gradients from float32 copies on CPU
def test_depthwise_conv_under_autocast(dtype, kernel):
    def make_args():
        return [_rand(2, 6, 9, 8), _rand(6, 1, kernel, kernel, scale=0.3), _rand(6, scale=0.1)]

    def plain_fn(x, w, b):
        return F.conv2d(x, w, b, padding=kernel // 2, groups=6)
    out, grads = _compare(make_args, DepthwiseConv.apply, plain_fn, (2, 6, 9, 8), dtype, 'DepthwiseConv')
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    assert [t.dtype for t in grads] == [torch.float32] * 3


@pytest.mark.parametrize('dtype', DTYPES, ids=NAMES.get)
def test_attention_scale_gives_the_plain_dtype(dtype):
    """``scale * project_out(.)`` with a float32 (1,) tensor is float32 under autocast; a float scale keeps the
    autocast dtype: the fused path gives what the plain formulation gives."""
    torch.manual_seed(0)
    attn = Attention(8, 2, False)
    x = _rand(1, 8, 4, 4, grad=False).to(dtype)
    r = torch.tensor([0.7], requires_grad=True)
    g = torch.randn(1, 8, 4, 4)
    for scale in (-r, 0.5):
        def run():
            return _run(lambda x_: attn(x_, residual=x_, scale=scale), [x.requires_grad_()], g, dtype)
        fused, plain = run(), _plain(run)
        assert fused[0].dtype == plain[0].dtype == (dtype if isinstance(scale, float) else torch.float32)
        assert _rel(fused[0], plain[0].double()) <= TOL[dtype][0]


@pytest.mark.parametrize('dtype', DTYPES, ids=NAMES.get)
def test_transformer_block_under_autocast(dtype):
    torch.manual_seed(0)
    block = TransformerBlock(16, 2, 2.66, True, 'WithBias')
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    block64 = copy.deepcopy(block).double()
    x = _rand(2, 16, 8, 8, grad=False).to(dtype)  # the autocast dtype, as the blocks meet their input in a network
    g = torch.randn(2, 16, 8, 8)

    def run(net, x_, dtype_=None):
        with torch.autocast('cpu', dtype=dtype_ or torch.bfloat16, enabled=dtype_ is not None):
            out = net(x_)
        grads = torch.autograd.grad(out, list(net.parameters()), g.to(out.dtype))
        return out, (torch.cat([t.flatten() for t in grads]), )  # all gradients as one vector
    _check(run(block, x, dtype), _plain(lambda: run(block, x, dtype)), run(block64, x.double()), dtype,
           'TransformerBlock')
    saved = _saved_dtypes(lambda: run(block, x, dtype))
    assert all(d == dtype for n, d in saved if n >= x.numel())
    assert sum(n for n, d in saved if n >= x.numel()) <= sum(
        n for n, d in _saved_dtypes(lambda: _plain(lambda: run(block, x, dtype))) if n >= x.numel())


def test_frozen_weights_under_autocast():
    torch.manual_seed(0)
    ffn = FeedForward(8, 2.66, False).requires_grad_(False)
    x = _rand(1, 8, 4, 4)
    with _autocast(torch.bfloat16):
        out = ffn(x, residual=x)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and all(p.grad is None for p in ffn.parameters())


# ------------------------------------------------------------------------------------------------
# a tiny network of every method that uses the fused Functions


def _graph_nodes(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack += [n for n, _ in node.next_functions]
    return {type(n).__name__ for n in seen}


CARDS = [c for c in list_methods() if c.tiny]


@pytest.mark.parametrize('card', CARDS, ids=[c.arch for c in CARDS])
def test_tiny_network_under_autocast(card):
    torch.manual_seed(0)
    net = build_network(card.tiny_opt()).train()
    net64 = copy.deepcopy(net).double()
    inputs = example_inputs(card, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))

    def run(model, dtype=None, wide=torch.float32):
        torch.manual_seed(5)  # the same draws (random routing) in every run
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = card.read_output(model, model(*[t.to(wide) for t in inputs])).image
        loss = (out.to(wide) * weights.to(wide)).sum()  # smooth: every output pixel weighs in
        params = [p for p in model.parameters()]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([g.flatten() for g in grads if g is not None])
        return out, (flat, )

    ref = run(net64, wide=torch.float64)
    if not set(FUSED_NODES) & _graph_nodes(ref[0]):
        pytest.skip(f'{card.name} uses none of the fused Functions')
    for dtype in DTYPES:
        fused, plain = run(net, dtype), _plain(lambda: run(net, dtype))
        if card.name == 'DFPIR':
            # its top-90% attention keeps the largest scores of every row: reduced-precision rounding moves
            # some entries across the cut, in the published formulation as much: only the comparison with it
            assert all(_rel(a, r) <= PLAIN_FACTOR * _rel(p, r) + FLOOR[dtype]
                       for a, p, r in ((fused[0], plain[0], ref[0]), (fused[1][0], plain[1][0], ref[1][0])))
            continue
        _check(fused, plain, ref, dtype, card.name)
