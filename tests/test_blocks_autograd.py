"""The fused autograd Functions of the shared blocks: gradients (float64 gradcheck), same values and
gradients as the plain autograd formulation, any memory format, autocast and torch.compile (the
precision checks under bf16/fp16 autocast are in tests/archs/test_blocks_amp.py)."""
import os

import pytest
import torch
import torch.nn.functional as F

import vlunet  # noqa: F401
from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.blocks import (LN_EPS, Attention, ChannelAttention, DepthwiseConv, FeedForward, GatedLinear,
                                 LayerNorm, NormLinear, TransformerBlock, channel_attention)

CL = torch.channels_last
TINY = dict(de_dim=3, dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8])


def _rand(*shape, cl=True, grad=True):
    t = torch.randn(*shape, dtype=torch.float64)
    if cl and t.dim() == 4:
        t = t.contiguous(memory_format=CL)
    return t.requires_grad_(grad)


@pytest.mark.parametrize('cl', [True, False])
@pytest.mark.parametrize('bias', [True, False])
def test_norm_linear_gradcheck(cl, bias):
    torch.manual_seed(0)
    x = _rand(2, 4, 3, 5, cl=cl)
    args = (x, _rand(4), _rand(4), _rand(6, 4), _rand(6) if bias else None)
    assert torch.autograd.gradcheck(NormLinear.apply, args)
    # same as layer_norm over the channels then a 1x1 convolution
    ref = F.conv2d(F.layer_norm(x.permute(0, 2, 3, 1), (4, ), args[1], args[2], LN_EPS).permute(0, 3, 1, 2),
                   args[3][..., None, None], args[4])
    torch.testing.assert_close(NormLinear.apply(*args), ref, rtol=0, atol=1e-12)


def _dw(x, weight, bias):
    return x if weight is None else F.conv2d(x, weight, bias, padding=1, groups=x.shape[1])


@pytest.mark.parametrize('heads', [1, 2])
@pytest.mark.parametrize('separate_k', [False, True])
@pytest.mark.parametrize('dw', [None, 'nobias', 'bias'])
@pytest.mark.parametrize('bias, residual, beta', [(False, False, 1.0), (True, True, 1.0), (False, True, -1.0)])
def test_channel_attention_gradcheck(heads, separate_k, dw, bias, residual, beta):
    torch.manual_seed(0)
    c, c_out = 4, 3
    c_src = 2 * c if separate_k else 3 * c
    src = _rand(2, c_src, 3, 4)
    dw_w = None if dw is None else _rand(c_src, 1, 3, 3)
    dw_b = _rand(c_src) if dw == 'bias' else None
    k_src = _rand(2, c, 3, 4) if separate_k else None
    args = (src, dw_w, dw_b, k_src, _rand(heads, 1, 1), _rand(c_out, c), _rand(c_out) if bias else None,
            _rand(2, c_out, 3, 4) if residual else None, heads, beta)
    assert torch.autograd.gradcheck(ChannelAttention.apply, args)

    # same as the plain formulation: dwconv, channel_attention, the 1x1 projection, the residual
    qkv = _dw(src, dw_w, dw_b)
    if separate_k:
        (q, v), k = qkv.chunk(2, dim=1), k_src
    else:
        q, k, v = qkv.chunk(3, dim=1)
    ref = F.conv2d(channel_attention(q, k, v, args[4], heads), args[5][..., None, None], args[6])
    if residual:
        ref = ref + beta * args[7]
    torch.testing.assert_close(ChannelAttention.apply(*args), ref, rtol=0, atol=1e-12)


def test_channel_attention_zero_query_row_matches_normalize_clamp():
    torch.manual_seed(0)
    src = _rand(1, 6, 2, 3, grad=False)
    src[:, 0] = 0  # one query channel is all zero: F.normalize clamps its norm at eps
    src.requires_grad_()
    args = (src, None, None, None, _rand(1, 1, 1), _rand(2, 2), None, None, 1, 1.0)
    # (no gradcheck: |q| is not differentiable at 0; the gradient must be autograd's through F.normalize)
    q, k, v = src.chunk(3, dim=1)
    ref = F.conv2d(channel_attention(q, k, v, args[4], 1), args[5][..., None, None])
    out = ChannelAttention.apply(*args)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    # the gradient of the zero channel is ~1/eps large: compare relatively
    torch.testing.assert_close(torch.autograd.grad(out, src, g)[0], torch.autograd.grad(ref, src, g)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('dw', [None, 'nobias', 'bias'])
@pytest.mark.parametrize('bias, residual', [(False, False), (True, True)])
def test_gated_linear_gradcheck(dw, bias, residual):
    torch.manual_seed(0)
    src = _rand(2, 6, 3, 4)
    dw_w = None if dw is None else _rand(6, 1, 3, 3)
    dw_b = _rand(6) if dw == 'bias' else None
    args = (src, dw_w, dw_b, _rand(2, 3), _rand(2) if bias else None, _rand(2, 2, 3, 4) if residual else None, 3)
    assert torch.autograd.gradcheck(GatedLinear.apply, args)
    a, b = _dw(src, dw_w, dw_b).chunk(2, dim=1)
    ref = F.conv2d(F.gelu(a) * b, args[3][..., None, None], args[4])
    if residual:
        ref = ref + args[5]
    torch.testing.assert_close(GatedLinear.apply(*args), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize('kernel, bias', [(3, True), (7, False)])
def test_depthwise_conv_gradcheck(kernel, bias):
    torch.manual_seed(0)
    args = (_rand(2, 4, 5, 6), _rand(4, 1, kernel, kernel), _rand(4) if bias else None)
    assert torch.autograd.gradcheck(DepthwiseConv.apply, args)
    torch.testing.assert_close(DepthwiseConv.apply(*args),
                               F.conv2d(args[0], args[1], args[2], padding=kernel // 2, groups=4), rtol=0, atol=1e-12)


def test_gated_linear_ignores_padding_channels():
    torch.manual_seed(0)
    src = _rand(1, 8, 3, 4)  # 2h = 6 used, 2 padding channels
    args = (src, _rand(8, 1, 3, 3), None, _rand(2, 3), None, None, 3)
    assert torch.autograd.gradcheck(GatedLinear.apply, args)
    a, b = _dw(src, args[1], None)[:, :6].chunk(2, dim=1)
    torch.testing.assert_close(GatedLinear.apply(*args), F.conv2d(F.gelu(a) * b, args[3][..., None, None]),
                               rtol=0, atol=1e-12)


def _plain(fn):
    """Run fn on the plain autograd path (the published formulation; forced here)."""
    import vlunet.archs.blocks as blocks
    saved = blocks.use_fused
    blocks.use_fused = lambda x: False
    try:
        return fn()
    finally:
        blocks.use_fused = saved


@pytest.mark.parametrize('bias, ln', [(False, 'WithBias'), (True, 'WithBias'), (False, 'BiasFree')])
@pytest.mark.parametrize('cl', [True, False])
def test_transformer_block_matches_plain_autograd(bias, ln, cl):
    torch.manual_seed(0)
    block = TransformerBlock(8, 2, 2.66, bias, ln).double()
    with torch.no_grad():  # non-trivial affine parameters
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = _rand(2, 8, 5, 6, cl=cl)
    g = torch.randn(2, 8, 5, 6, dtype=torch.float64)

    def run():
        out = block(x)
        grads = torch.autograd.grad(out, [x, *block.parameters()], g)
        return out, grads

    out, grads = run()
    ref, ref_grads = _plain(run)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_attention_scale_and_residual_match_plain():
    torch.manual_seed(0)
    attn = Attention(8, 2, False).double()
    r = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    x, res = _rand(1, 8, 4, 4), _rand(1, 8, 4, 4)
    g = torch.randn(1, 8, 4, 4, dtype=torch.float64)

    def run():
        out = attn(x, residual=res, scale=-r)
        return out, torch.autograd.grad(out, [x, res, r, *attn.parameters()], g)

    out, grads = run()
    ref, ref_grads = _plain(run)
    torch.testing.assert_close(out, res - r * attn.project_out(channel_attention(
        *attn.qkv_dwconv(attn.qkv(x)).chunk(3, dim=1), attn.temperature, 2)), rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_layer_norm_module_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    for kind in ('WithBias', 'BiasFree'):
        norm = LayerNorm(5, kind).double()
        with torch.no_grad():
            norm.body.weight.normal_()
            if norm.body.bias is not None:
                norm.body.bias.normal_()
        var, mean = torch.var_mean(x, dim=1, keepdim=True, unbiased=False)
        w = norm.body.weight.view(1, -1, 1, 1)
        ref = (x - mean) / torch.sqrt(var + LN_EPS) * w + norm.body.bias.view(1, -1, 1, 1) if kind == 'WithBias' \
            else x / torch.sqrt(var + LN_EPS) * w
        torch.testing.assert_close(norm(x), ref, rtol=0, atol=1e-12)


def test_no_grad_for_frozen_weights():
    torch.manual_seed(0)
    ffn = FeedForward(8, 2.66, False).double().requires_grad_(False)
    x = _rand(1, 8, 4, 4)
    ffn(x, residual=x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in ffn.parameters())


@pytest.mark.parametrize('arch, kwargs, size', [
    ('VLUNet', TINY, (2, 3, 16, 24)),
    ('Restormer', dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, bias=True), (1, 3, 16, 16)),
    ('Restormer', dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, LayerNorm_type='BiasFree'),
     (1, 3, 16, 16)),
    ('PromptIR', dict(num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, decoder=True), (1, 3, 16, 16)),
])
def test_network_grads_match_plain_autograd(arch, kwargs, size):
    torch.manual_seed(0)
    net = ARCH_REGISTRY.get(arch)(**kwargs).double()
    x = torch.rand(*size, dtype=torch.float64)
    args = (x, torch.randn(size[0], 512, dtype=torch.float64)) if arch == 'VLUNet' else (x, )

    def run():
        out = net(*args)
        loss = F.l1_loss(out, x)
        return out, torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)

    out, grads = run()
    ref, ref_grads = _plain(run)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for (name, _), a, b in zip(net.named_parameters(), grads, ref_grads):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_bf16_autocast_training_step_runs():
    torch.manual_seed(0)
    net = ARCH_REGISTRY.get('VLUNet')(**TINY)
    x = torch.rand(1, 3, 16, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = F.l1_loss(net(x, torch.randn(1, 512)).float(), x)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.skipif(os.environ.get('VLUNET_SLOW_TESTS') != '1', reason='torch.compile on CPU is slow: set '
                    'VLUNET_SLOW_TESTS=1')
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    net = ARCH_REGISTRY.get('VLUNet')(**TINY)
    x, e = torch.rand(1, 3, 16, 16), torch.randn(1, 512)
    out = net(x, e)
    grads = torch.autograd.grad(out.square().mean(), list(net.parameters()), allow_unused=True)
    compiled = torch.compile(net, fullgraph=True)  # the Functions trace without graph breaks
    out_c = compiled(x, e)
    grads_c = torch.autograd.grad(out_c.square().mean(), list(net.parameters()), allow_unused=True)
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_c, grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
