"""DFPIR beyond the conformance suite: the fixtures through the plain (unfused) path too, the text
code shared by a batch, gradients as published (none for the text projections), text_code checks."""

import pytest
import torch
import torch.nn.functional as F

import vlunet  # noqa: F401
from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs import blocks, dfpir_arch
from vlunet.archs.blocks import ChannelAttention, channel_attention, keep_largest
from vlunet.archs.conditioning import CLIP_DIM

from conftest import load_fixture

NAMES = ['DFPIR_withbias.pt', 'DFPIR_biasfree.pt']
TEXT_LAYERS = ('linear_layer1', 'linear_layer3')


def fixture_net(fx):
    net = ARCH_REGISTRY.get('DFPIR')(**fx['config']).double().eval()
    net.load_state_dict(fx['state_dict'], strict=True)
    return net


@pytest.fixture
def plain(monkeypatch):
    """Force the plain autograd path (the published formulation) in the shared blocks and DFPIR."""
    def force():
        monkeypatch.setattr(blocks, 'use_fused', lambda x: False)
    return force


@pytest.mark.parametrize('name', NAMES)
def test_published_fixture_float64_through_the_plain_path(name, plain):
    fx = load_fixture(name)
    net = fixture_net(fx)
    plain()  # the default (fused) path: tests/archs/test_conformance.py
    with torch.no_grad():
        out = net(*fx['inputs'].values())
    torch.testing.assert_close(out, fx['output'], rtol=0, atol=1e-9)


def test_any_size_and_shared_text_code():
    fx = load_fixture('DFPIR_biasfree.pt')
    net = fixture_net(fx)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 21, 13, generator=g, dtype=torch.float64)
    text = torch.randn(2, CLIP_DIM, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = net(x, text)
        padded = F.pad(x, (0, 3, 0, 3), mode='reflect')
        torch.testing.assert_close(out, net(padded, text)[..., :21, :13], rtol=0, atol=0)
        # one (1, 512) code for the whole batch, as the published indexing broadcasts it
        torch.testing.assert_close(net(x, text[:1]), net(x, text[:1].expand(2, -1)), rtol=0, atol=1e-12)
        assert net(x[:1, :, :5, :7], text[:1]).shape == (1, 3, 5, 7)


@pytest.mark.parametrize('bad', [torch.randn(2, 256), torch.randn(3, CLIP_DIM), torch.randn(CLIP_DIM), None])
def test_wrong_text_code_is_named(bad):
    net = ARCH_REGISTRY.get('DFPIR')(dim=6, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 2, 2])
    with pytest.raises(ValueError, match=rf'text_code must be .*\(B, {CLIP_DIM}\) .*B = 2'):
        net(torch.rand(2, 3, 8, 8), bad)


def test_gradients_as_published(plain):
    """Every parameter but the text projections gets a gradient (fused = plain autograd path); the
    text projections and text_code get none, as published (only their sort order is used)."""
    torch.manual_seed(0)
    net = ARCH_REGISTRY.get('DFPIR')(dim=6, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[2, 3, 4, 6],
                                      ffn_expansion_factor=2.2, bias=True, LayerNorm_type='BiasFree').double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    text = torch.randn(2, CLIP_DIM, dtype=torch.float64, requires_grad=True)
    params = list(net.parameters())

    def run():
        out = net(x, text)
        return out, torch.autograd.grad(F.l1_loss(out, x), params + [text], allow_unused=True)

    out, grads = run()
    plain()
    ref, ref_grads = run()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert grads[-1] is None and ref_grads[-1] is None  # text_code
    for (name, _), a, b in zip(net.named_parameters(), grads, ref_grads):
        if name.split('.')[1] in TEXT_LAYERS:
            assert a is None and b is None, name
        else:
            assert a is not None and b is not None, name
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_channel_order_is_topk_of_the_text_projection_ties_included():
    block = dfpir_arch.DegradationGuidedPerturbation(4, 2, 'WithBias', 2.66, False).double()
    text = torch.randn(3, CLIP_DIM, dtype=torch.float64)
    code = block.linear_layer3(block.linear_layer1(text))
    assert torch.equal(block.channel_order(text), torch.topk(code, k=8).indices)
    with torch.no_grad():  # all projections equal: torch.topk's tie order, as published
        block.linear_layer3.weight.zero_()
        block.linear_layer3.bias.fill_(0.5)
    order = block.channel_order(text)
    assert torch.equal(order, torch.topk(torch.full((3, 8), 0.5, dtype=torch.float64), k=8).indices)
    # the fused shuffle (folded into one C x C map per image) is the published gather
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    gathered = block.conv_out(block.conv1x1(x)[torch.arange(3).unsqueeze(1), order])
    torch.testing.assert_close(block.shuffled(x, order), gathered, rtol=0, atol=1e-12)


@pytest.mark.parametrize('keep', [1, 3])
def test_top_k_channel_attention_gradcheck(keep):
    torch.manual_seed(0)
    c, heads = 8, 2

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64).requires_grad_()

    qv, k, t, w = rand(2, 2 * c, 3, 4), rand(2, c, 3, 4), rand(heads, 1, 1), rand(c, c)
    args = (qv, None, None, k, t, w, None, None, heads, 1.0, keep)
    assert torch.autograd.gradcheck(ChannelAttention.apply, args)
    q, v = qv.chunk(2, dim=1)
    ref = F.conv2d(channel_attention(q, k, v, t, heads, keep), w[..., None, None])
    torch.testing.assert_close(ChannelAttention.apply(*args), ref, rtol=0, atol=1e-12)
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0]])
    assert torch.isinf(keep_largest(scores, 2)).sum() == 2 and keep_largest(scores, 2)[0, 0] == 3


