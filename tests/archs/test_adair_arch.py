"""AdaIR beyond the conformance suite (tests/archs/test_conformance.py: fixtures, listing, any size,
recognition, conversion, a training step): the frequency band split where its low band is not empty,
the ignored noise_emb, decoder=False is Restormer, gradients."""

import pytest
import torch
import torch.nn.functional as F

import vlunet  # noqa: F401
from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.adair_arch import FrequencyLearningBlock, split_bands

from conftest import load_fixture
TINY = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4])
# constructed but without gradient in the published model: never used, or reached only through int()
NO_GRADIENT = ('conv.weight', 'score_gen.weight', 'score_gen.bias', 'rate_conv.0.weight', 'rate_conv.2.weight')
# With an empty low band (small inputs) channel_cross_h attends from zeros: its query side
# (temperature, q, q_dwconv) gets zero gradients, in the published model too.


def test_without_frequency_blocks_it_is_restormer():
    torch.manual_seed(0)
    adair = ARCH_REGISTRY.get('AdaIR')(decoder=False, **TINY).eval()
    restormer = ARCH_REGISTRY.get('Restormer')(**TINY).eval()
    restormer.load_state_dict(adair.state_dict(), strict=True)
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(adair(x), restormer(x), rtol=0, atol=0)


def test_any_size_and_ignored_noise_emb():
    fx = load_fixture('AdaIR_A2.pt')
    net = ARCH_REGISTRY.get('AdaIR')(**fx['config']).double().eval()
    net.load_state_dict(fx['state_dict'])
    x = torch.rand(2, 3, 21, 35, dtype=torch.float64)
    with torch.no_grad():
        out = net(x)
        padded = F.pad(x, (0, 5, 0, 3), mode='reflect')
        torch.testing.assert_close(out, net(padded)[..., :21, :35], rtol=0, atol=0)
        torch.testing.assert_close(net(x, noise_emb=torch.rand(2, 8)), out, rtol=0, atol=0)
    assert out.shape == x.shape and out.is_contiguous()


def test_decoder_needs_dim_8():
    with pytest.raises(ValueError, match='dim >= 8'):
        ARCH_REGISTRY.get('AdaIR')(dim=6, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1)
    ARCH_REGISTRY.get('AdaIR')(dim=6, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, decoder=False)


def test_gradients_flow():
    torch.manual_seed(0)
    net = ARCH_REGISTRY.get('AdaIR')(**TINY).train()
    with torch.no_grad():
        for name in ('fre1', 'fre2', 'fre3'):
            getattr(net, name).para1.fill_(0.5)  # published init 0 would stop the attended branch's gradient
    x = torch.rand(2, 3, 16, 24, requires_grad=True)
    net(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        if name.startswith('fre') and name.split('.', 1)[1] in NO_GRADIENT:
            assert p.grad is None, name
        else:  # some are exactly 0 here (the empty band's queries; a ReLU'd 1-channel gate)
            assert p.grad is not None, name
            assert p.grad.abs().sum() > 0 or name.startswith('fre'), name
    for name in ('fre1', 'fre2', 'fre3'):
        block = getattr(net, name)
        assert all(p.grad.abs().sum() > 0 for p in (block.conv1.weight, block.para1, block.para2)), name
        assert all(p.grad.abs().sum() == 0 for p in (block.channel_cross_h.temperature,
                                                      block.channel_cross_h.q.weight)), name


# --- the frequency band split where the low band is not empty -------------------------------------
# An independent re-derivation of the published block (net/model.py, FreModule) with plain torch
# ops, in the published formulation: the spectrum is rolled so that DC sits at (H//2, W//2), a
# centred window [H//2 - a, H//2 + a) x [W//2 - b, W//2 + b) of it is the low band, rolled back.

def reference_cross(m, x, y):
    b, c, h, w = x.shape
    heads = m.num_heads
    q = F.conv2d(F.conv2d(x, m.q.weight, m.q.bias), m.q_dwconv.weight, m.q_dwconv.bias, padding=1, groups=c)
    kv = F.conv2d(F.conv2d(y, m.kv.weight, m.kv.bias), m.kv_dwconv.weight, m.kv_dwconv.bias, padding=1, groups=2 * c)
    k, v = kv[:, :c], kv[:, c:]
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    attn = torch.softmax(q @ k.transpose(-2, -1) * m.temperature, dim=-1)
    return F.conv2d((attn @ v).reshape(b, c, h, w), m.project_out.weight, m.project_out.bias)


def reference_halves(m, f):
    """Per-image half-widths (a, b) of the published low band of features f."""
    h, w = f.shape[-2:]
    hidden = F.gelu(F.conv2d(F.adaptive_avg_pool2d(f, 1), m.rate_conv[0].weight))
    rate = torch.sigmoid(F.conv2d(hidden, m.rate_conv[2].weight))
    return [(int(h // 128 * r[0, 0, 0]), int(w // 128 * r[1, 0, 0])) for r in rate]


def reference_split(f, halves):
    """(high, low) of the published band split with the given half-widths."""
    h, w = f.shape[-2:]
    mask = torch.zeros_like(f)
    for i, (a, b) in enumerate(halves):
        mask[i, :, h // 2 - a:h // 2 + a, w // 2 - b:w // 2 + b] = 1
    shifted = torch.roll(torch.fft.fft2(f, norm='forward'), shifts=(h // 2, w // 2), dims=(2, 3))

    def back(spec):
        unrolled = torch.roll(spec, shifts=(-(h // 2), -(w // 2)), dims=(2, 3))
        return torch.fft.ifft2(unrolled, norm='forward').abs()

    return back(shifted * (1 - mask)), back(shifted * mask)


def reference_block(m, img, y):
    x = F.interpolate(img, size=y.shape[-2:], mode='bilinear', align_corners=False)
    f = F.conv2d(x, m.conv1.weight, padding=1)
    high, low = reference_split(f, reference_halves(m, f))
    high, low = reference_cross(m.channel_cross_l, high, y), reference_cross(m.channel_cross_h, low, y)
    g = m.frequency_refine
    spatial = torch.sigmoid(F.conv2d(torch.cat([high.amax(1, keepdim=True), high.mean(1, keepdim=True)], 1),
                                     g.SpatialGate.spatial.weight, padding=3))
    mlp = g.ChannelGate.mlp

    def channel_mlp(t):
        return F.conv2d(F.relu(F.conv2d(t, mlp[0].weight)), mlp[2].weight)

    channel = torch.sigmoid(channel_mlp(low.mean((2, 3), keepdim=True)) + channel_mlp(low.amax((2, 3), True)))
    agg = F.conv2d(low * spatial + high * channel, g.proj.weight, g.proj.bias)
    return reference_cross(m.channel_cross_agg, y, agg) * m.para1 + y * m.para2


def image_features(block, img, size):
    return F.conv2d(F.interpolate(img, size=size, mode='bilinear', align_corners=False), block.conv1.weight, padding=1)


def non_empty_band_block(img, size, logits):
    """A 16-channel block (the least its channel gate allows) whose rate logits for image 0 at ``size`` are
    ``logits`` (rows, columns)."""
    torch.manual_seed(5)
    block = FrequencyLearningBlock(16, num_heads=2, bias=False).double()
    with torch.no_grad():
        block.para1.uniform_(0.5, 1.5)
        block.para2.uniform_(0.5, 1.5)
        block.conv1.weight.abs_()
        block.rate_conv[0].weight.abs_()
        feat = image_features(block, img[:1], size)
        hidden = F.gelu(F.conv2d(feat.mean((2, 3), keepdim=True), block.rate_conv[0].weight))[0, :, 0, 0]
        target = torch.tensor(logits, dtype=torch.float64)[:, None]
        block.rate_conv[2].weight.copy_((target * hidden / hidden.dot(hidden)).view(2, -1, 1, 1))
    return block


def test_non_empty_low_band_split_matches_the_published_formulas():
    # at 256 x 384, size // 128 = (2, 3); rates sigmoid(0.8) = 0.69, sigmoid(2.0) = 0.88 give image 0
    # half-widths (1, 2): a 2 x 4 window of frequencies. The dark image 1 gets rates below 0.5: no
    # row frequency, so an empty band.
    size = (256, 384)
    img = torch.rand(2, 3, 384, 576, dtype=torch.float64)
    img[1] = -img[1]
    block = non_empty_band_block(img, size, (0.8, 2.0))
    with torch.no_grad():
        feat = image_features(block, img, size)
        mask = block.band_mask(feat)
    halves = reference_halves(block, feat)
    assert halves[0] == (1, 2) and halves[1][0] == 0
    assert mask.shape == (2, 1, *size) and mask[0].sum() == 2 * 4 and mask[1].sum() == 0
    part = feat[:, :3].clone().requires_grad_()  # the split itself works channel by channel
    high, low = split_bands(part, mask)
    ref_high, ref_low = reference_split(part, halves)
    assert ref_low[0].sum() > 1 and ref_low[1].abs().max() == 0
    torch.testing.assert_close(low, ref_low, rtol=0, atol=1e-12)
    torch.testing.assert_close(high, ref_high, rtol=0, atol=1e-12)
    weights = torch.rand_like(high), torch.rand_like(low)
    grad, = torch.autograd.grad((high * weights[0] + low * weights[1]).sum(), part)
    ref_grad, = torch.autograd.grad((ref_high * weights[0] + ref_low * weights[1]).sum(), part)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-9)  # d|z|/dz = z/|z|: round-off grows near 0


def test_non_empty_low_band_block_matches_the_published_formulas():
    # Also below 256 px: at 136 columns size // 128 = 1, and a rate that rounds to exactly 1.0
    # (sigmoid(40) in float64) keeps one frequency on each side, as in the published code.
    size = (256, 136)
    img = torch.rand(1, 3, 384, 200, dtype=torch.float64)
    block = non_empty_band_block(img, size, (0.8, 40.0))
    y = torch.randn(1, 16, *size, dtype=torch.float64)
    with torch.no_grad():
        assert reference_halves(block, image_features(block, img, size)) == [(1, 1)]
        assert block.band_mask(image_features(block, img, size)).sum() == 2 * 2
        torch.testing.assert_close(block(img, y), reference_block(block, img, y), rtol=0, atol=1e-9)


def test_cross_attention_gradients_match_the_published_formulas():
    torch.manual_seed(2)
    block = FrequencyLearningBlock(16, num_heads=4, bias=True).double()
    x, y = (torch.randn(2, 16, 6, 10, dtype=torch.float64, requires_grad=True) for _ in range(2))
    att = block.channel_cross_agg
    out, ref = att(x.contiguous(memory_format=torch.channels_last), y), reference_cross(att, x, y)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    params = [x, y] + list(att.parameters())
    weight = torch.rand_like(ref)
    for g, r in zip(torch.autograd.grad((out * weight).sum(), params), torch.autograd.grad((ref * weight).sum(), params)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


# --- which architecture is this checkpoint? ---------------------------------------------------------
